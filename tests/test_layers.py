"""The package's layer order, read from the import graph of src/ambient.

Lower layers never import higher ones (not even inside a function), and no import circle exists
between modules. The order is the one README's Layout table gives.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "ambient"
LAYERS = [
    {"ambient", "ambient.errors", "ambient.io", "ambient.configbase", "ambient.rng", "ambient.distributed",
     "ambient.folders"},
    "ambient.data", "ambient.nets", "ambient.objectives", "ambient.operators", "ambient.store",
    "ambient.sampling", "ambient.metrics", "ambient.learners", "ambient.cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "ambient.__main__":
        return len(LAYERS) - 1
    for i, layer in enumerate(LAYERS):
        if module in layer if isinstance(layer, set) else (module == layer or module.startswith(layer + ".")):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to README's Layout table")


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported ambient module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "ambient":
            targets = [node.module]
            if node.module == "ambient":  # from ambient import io, distributed: submodules by name
                targets = [f"ambient.{a.name}" if (SRC / f"{a.name}.py").exists() else "ambient" for a in node.names]
            out += [(t, node.lineno, id(node) in top) for t in targets]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.split(".")[0] == "ambient"]
    return out


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer(name):
    mine = layer_of(name)
    for target, line, _ in imports_of(MODULES[name]):
        assert layer_of(target) <= mine, \
            f"{name} (layer {mine}) imports {target} (layer {layer_of(target)}) at line {line}"


def test_no_import_circle():
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _, _ in imports_of(path):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                deps.add(target)
        graph[name] = deps
    # a package imports its submodules from __init__ and each submodule implies its package: drop those edges
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".") and not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " → ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The check is not vacuous: a data module importing a learner is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ambient.learners.train import train\n")
    (target, line, at_top), = imports_of(bad)
    assert (target, line, at_top) == ("ambient.learners.train", 2, False)
    assert layer_of(target) > layer_of("ambient.data.readers")


def test_readme_layout_lists_every_module():
    """README's Layout table names every package and, in its row, every module of it (cli: one per command)."""
    readme = (SRC.parents[1] / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2] for line in layout.splitlines()
            if line.startswith("| `ambient")}
    for name in MODULES:
        if name in ("ambient", "ambient.__main__") or name.startswith("ambient.cli"):
            continue
        package, _, leaf = name.rpartition(".")
        if name in rows:  # a package itself
            continue
        assert package in rows, f"README's Layout has no row for {package}"
        assert f"`{leaf}`" in rows[package], f"README's Layout row {package} does not name {leaf}"
