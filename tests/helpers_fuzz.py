"""Machinery of the CLI fuzz suite (tests/test_cli_fuzz.py).

The case table is read from the click definitions: every leaf command of ``ambient.cli.cli`` and every option
in its ``params``, each given a fixed list of boundary and garbage values chosen by the option's click type
(int, float, choice, flag, string; every string option also gets paths: a file, folders, a missing path, a
path under a file, and the folders the other commands write). One case = one option of one command changed
in a known-fast valid base command; nothing is random, so the table is the same on every run.

A case runs in its own fresh folder (the working directory), into which the templates its command line names
are copied; the templates (tiny data, a tiny train run, an em run, a finetune run, an imported model…) are
built once per session. Checked per case: exit code 0 or 2, no exception escaping ``ambient.cli.main`` and no
traceback on stderr; on exit 2 the last stderr line starts with ``error:`` and names the option (or the path
given to it), and the case folder is byte-for-byte as before (same files, sizes, mtimes and contents), so a
refusal leaves no new file and changes no existing folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from tests.helpers_data import blobs, write_npz

# ------------------------------------------------------------------------------------------------ the table

TINY_TRAIN = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.008", "--tick-kimg", "0.008",
              "--grid-samples", "0", "--no-progress", "--device", "cpu"]
TINY_EM = ["--laps", "1", "--lap-kimg", "0.008", "--rank", "2", "--gaussian-iters", "2", "--steps", "2",
           "--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.008", "--grid-samples", "0", "--device", "cpu",
           "--no-progress"]

# A known-fast valid command line per leaf command ("@name": template `name` copied into the case folder;
# "@new/name": a path in the case folder that does not exist). A new command needs an entry here
# (test_every_command_has_a_base_command says so).
BASE = {
    "train": ["--data", "@data.npz", "--outdir", "@new/out", "--kimg", "0.008", *TINY_TRAIN],
    "sample": ["--model", "@train-run", "--num-images", "2", "--out", "@new/out.npz", "--steps", "2", "--batch", "2",
               "--device", "cpu"],
    "demo": ["--data", "@data.npz", "--outdir", "@new/out", "--kimg", "0.008", "--arch", "tiny", "--num-samples", "4",
             "--num-ref", "0", "--no-progress"],
    "eval fid": ["--samples", "@samples.npz", "--ref", "@ref.npz", "--kid-subsets", "1", "--kid-subset-size", "2",
                 "--max-size", "4", "--no-cache", "--device", "cpu"],
    "eval ref": ["--data", "@samples.npz", "--out", "@new/ref.npz", "--max-size", "4", "--no-cache", "--device", "cpu"],
    "eval swd": ["--samples", "@samples.npz", "--ref", "@ref.npz", "--num-projections", "4"],
    "neighbors": ["--samples", "@samples.npz", "--train", "@data.npz", "--out", "@new/out", "--features", "pixels",
                  "--loo-max", "2", "--num-pairs", "1", "--no-cache", "--device", "cpu"],
    "finetune": ["--pretrained", "@pretrained", "--data", "@data.npz", "--outdir", "@new/out", "--steps", "1",
                 "--batch", "2", "--snapshot-every", "1", "--log-every", "1", "--device", "cpu"],
    "import": ["--pkl", "@model.pkl", "--out", "@new/out"],
    "restore": ["--model", "@naive-run", "--data", "@obs.npz", "--out", "@new/out.npz", "--steps", "2",
                "--cg-iters", "1", "--max-size", "2", "--device", "cpu"],
    "em": ["--data", "@obs.npz", "--outdir", "@new/out", *TINY_EM],
    "measure": ["--data", "@data.npz", "--operator", "kspace", "--acceleration", "2", "--center-fraction", "0.25",
                "--out", "@new/out.npz"],
}

TINY_DDPMPP = ["--arch", "ddpmpp-cifar", "--arch-kwargs",
               json.dumps({"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []})]
COND_TRAIN = ["--data", "@labelled.npz", "--cond", *TINY_DDPMPP]

# While one option is fuzzed: options of the base command to leave out (they would conflict with every value),
# and options to set instead of the base's (the option only means something with them: a conditional model).
DROP_WHILE_FUZZING = {
    ("sample", "seeds_text"): ("num",),
}
SET_WHILE_FUZZING = {
    ("sample", "class_idx"): ["--model", "@cond-run"],
    ("sample", "classes_text"): ["--model", "@cond-run"],
    ("train", "cond"): COND_TRAIN,
    ("train", "noise_sigma"): ["--objective", "noisy"],  # the noise level of the noisy objective's data
    # by case id: the paper's DDPM++ presets (up to 56M parameters) with few channels, to stay fast
    **{f"train:--arch=choice-{arch}": TINY_DDPMPP[2:] for arch in ("ddpmpp-cifar", "ddpmpp-cifar-ungated",
                                                                      "ddpmpp-celeba", "ddpmpp-celeba-ungated")},
}

INT_VALUES = [("empty", ""), ("negative", "-1"), ("zero", "0"), ("fraction", "1.5"), ("nan", "nan"),
              ("huge", str(2 ** 64))]
FLOAT_VALUES = [("empty", ""), ("negative", "-1"), ("zero", "0"), ("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"),
                ("huge", "1e308"), ("text", "abc")]
STRING_VALUES = [("empty", ""), ("negative", "-1"), ("nan", "nan"), ("unicode", "\u00e9\u2603"),
                 ("long-name", "x" * 300), ("huge-range", "0-999999999")]
# Paths, for every string option: whatever the option means, each must be used or refused cleanly.
PATH_VALUES = [("a-file", "@file.txt"), ("empty-folder", "@empty-dir"), ("other-folder", "@other-dir"),
               ("missing", "@new/missing"), ("under-a-file", "@file.txt/sub"),
               ("in-a-read-only-folder", "@read-only/new"), ("data-npz", "@data.npz"),
               ("observations-npz", "@obs.npz"), ("train-run", "@train-run"), ("em-run", "@em-run"),
               ("conditional-run", "@cond-run"), ("finetune-run", "@finetune-run"), ("imported-model", "@imported"),
               ("diffusers-folder", "@pretrained"), ("kspace-measurements", "@kspace.npz"),
               ("kspace-run", "@kspace-run")]
CHOICE_GARBAGE = [("empty", ""), ("bogus", "bogus")]

# Templates that are folders of a kind (what the commands write); no command may add, change or remove a file in
# one, except a command given a folder of its own kind as its output (a resume). The other templates (data, a
# diffusers folder, a user's folders) may gain files when given as an output, but never lose or change one.
KIND_FOLDERS = {"train-run": "train run", "naive-run": "train run", "cond-run": "train run", "em-run": "em run",
                "finetune-run": "finetune run", "imported": "imported model", "kspace-run": "kspace-ambient run"}
OWN_OUTPUT = {("train", "outdir"): "train run", ("demo", "outdir"): "demo run", ("em", "outdir"): "em run",
              ("finetune", "outdir"): "finetune run"}


@dataclass(frozen=True)
class Case:
    command: str  # "train", "eval fid", …
    param: str  # the click parameter's name
    flag: str  # its first option string
    label: str  # which value
    tokens: tuple[str, ...]  # what the fuzzed option adds to the base command line
    names: tuple[str, ...]  # every option string of the parameter (an error line must name one)

    @property
    def id(self) -> str:
        return f"{self.command.replace(' ', '-')}:{self.flag}={self.label}"

    def argv(self) -> list[str]:
        """The base command line without the fuzzed option (and its conflicts), then the fuzzed tokens."""
        command = leaf_commands()[self.command]
        changes = split_argv(command, SET_WHILE_FUZZING.get((self.command, self.param),
                                                            SET_WHILE_FUZZING.get(self.id, [])))
        drop = {self.param, *DROP_WHILE_FUZZING.get((self.command, self.param), ()), *(p for p, _ in changes)}
        kept = [tok for param, toks in split_argv(command, BASE[self.command]) if param not in drop for tok in toks]
        changed = [tok for param, toks in changes if param != self.param for tok in toks]
        return [*self.command.split(), *kept, *changed, *self.tokens]


def leaf_commands(group: click.Group | None = None, prefix: str = "") -> dict[str, click.Command]:
    """Every runnable command of the CLI by its words ("eval fid"), read from the click group."""
    if group is None:
        from ambient.cli import cli

        group = cli
    out: dict[str, click.Command] = {}
    for name in sorted(group.commands):
        command = group.commands[name]
        words = f"{prefix} {name}".strip()
        if isinstance(command, click.Group):
            out.update(leaf_commands(command, words))
        else:
            out[words] = command
    return out


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def split_argv(command: click.Command, argv: list[str]) -> list[tuple[str, list[str]]]:
    """[(param name, its tokens)] of a command line made only of this command's options."""
    by_name = {opt: p for p in options(command) for opt in (*p.opts, *p.secondary_opts)}
    out, i = [], 0
    while i < len(argv):
        param = by_name[argv[i]]
        takes_value = not param.is_flag and param.nargs == 1
        out.append((param.name, argv[i:i + 1 + takes_value]))
        i += 1 + takes_value
    return out


def values_for(param: click.Option) -> list[tuple[str, tuple[str, ...]]]:
    """(label, tokens) for one option, from its click type."""
    flag = param.opts[0]
    if param.is_flag:
        cases = [("on", (flag,))]
        if param.secondary_opts:
            cases.append(("off", (param.secondary_opts[0],)))
        return cases
    typ = param.type
    if isinstance(typ, click.Choice):
        values = [*CHOICE_GARBAGE, *((f"choice-{c}", str(c)) for c in typ.choices if c != param.default)]
    elif isinstance(typ, click.types.IntParamType):
        values = INT_VALUES
    elif isinstance(typ, click.types.FloatParamType):
        values = FLOAT_VALUES
    else:  # strings and click.Path: garbage and every kind of path
        values = [*STRING_VALUES, *PATH_VALUES]
    cases = [(label, (flag, value)) for label, value in values]
    if getattr(param, "_flag_needs_value", False):  # an option whose value may be left out (train --resume)
        cases.append(("bare", (flag,)))
    return cases


def all_cases() -> list[Case]:
    cases = []
    for name, command in leaf_commands().items():
        for param in options(command):
            for label, tokens in values_for(param):
                cases.append(Case(name, param.name, param.opts[0], label, tokens,
                                  (*param.opts, *param.secondary_opts)))
    return cases


# ------------------------------------------------------------------------------------------------ templates


def _write_observations(path: Path, n: int = 6, seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=blobs(n, 8, 1, seed=11), masks=(rng.random((n, 8, 8)) < 0.5).astype(np.uint8))
    return path


def _write_pickle(path: Path) -> Path:
    """A reference-format network pickle (state dict under 'ema'): a small unconditional DDPM++ SongUNet."""
    import torch

    from ambient.nets.songunet import SongUNet, SongUNetConfig

    torch.manual_seed(0)  # parameter init only
    net = SongUNet(SongUNetConfig(img_resolution=8, in_channels=2, out_channels=2, label_dim=0, model_channels=16,
                                  channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0))
    sd = OrderedDict(("model." + k, v) for k, v in net.state_dict().items())
    path.write_bytes(pickle.dumps({"ema": sd, "dataset_kwargs": {
        "resolution": 8, "corruption_probability": 0.5, "delta_probability": 0.1}}))
    return path


def _write_pretrained(root: Path) -> Path:
    """A tiny diffusers pipeline folder (unet/ + scheduler/) for `ambient finetune`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)  # parameter init only
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(root / "scheduler"))
    return root


class Templates:
    """The files and folders cases copy in, each built once (on first use) under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Path:
        path = self.root / name
        if not path.exists():
            self._build(name, path)
        return path

    def _cli(self, argv: list[str]) -> None:
        result = invoke(argv, self.root, timeout=300)
        assert result.code == 0, f"template {argv}: exit {result.code}\n{result.err}{result.exception}"

    def _build(self, name: str, path: Path) -> None:
        if name == "file.txt":
            path.write_text("not a model, not data, not a folder\n")
        elif name == "empty-dir":
            path.mkdir()
        elif name == "read-only":  # unwritable unless run as root (root writes anyway: then the case must succeed)
            path.mkdir()
            path.chmod(0o555)
        elif name == "other-dir":
            path.mkdir()
            (path / "notes.txt").write_text("a user's folder\n")
        elif name == "data.npz":
            write_npz(path)
        elif name == "obs.npz":
            _write_observations(path)
        elif name in ("samples.npz", "ref.npz"):
            np.savez(path, images=blobs(4, 8, 1, seed=1 if name == "samples.npz" else 2))
        elif name == "model.pkl":
            _write_pickle(path)
        elif name == "pretrained":
            _write_pretrained(path)
        elif name in ("train-run", "naive-run"):
            self.get("data.npz")
            extra = ["--objective", "naive", "--corruption-probability", "0.3"] if name == "naive-run" else []
            self._cli(["train", "--data", "data.npz", "--outdir", name, "--kimg", "0.008", *extra, *TINY_TRAIN])
        elif name == "labelled.npz":  # two classes: dark and bright images
            labels = np.arange(24) % 2
            np.savez(path, images=np.where(labels[:, None, None] == 0, 40, 200).astype(np.uint8) + blobs(24, 8, 1) // 8,
                     labels=labels)
        elif name == "kspace.npz":  # k-space measurements of data.npz (one line mask per image)
            self.get("data.npz")
            self._cli(["measure", "--data", "data.npz", "--operator", "kspace", "--acceleration", "2",
                       "--center-fraction", "0.25", "--out", name])
        elif name == "kspace-run":  # k-space ambient training (ambient train on k-space measurements)
            self.get("kspace.npz")
            self._cli(["train", "--data", "kspace.npz", "--outdir", name, "--kimg", "0.008", "--arch", "tiny",
                       "--batch", "8", "--delta-probability", "0.5", "--device", "cpu"])
        elif name == "cond-run":
            self.get("labelled.npz")
            argv = ["train", "--data", "labelled.npz", "--outdir", name, "--kimg", "0.008", *TINY_TRAIN]
            argv[argv.index("--arch"):argv.index("--arch") + 2] = []
            self._cli([*argv, "--cond", *TINY_DDPMPP])
        elif name == "em-run":
            self.get("obs.npz")
            self._cli(["em", "--data", "obs.npz", "--outdir", name, *TINY_EM])
        elif name == "finetune-run":
            self.get("pretrained"), self.get("data.npz")
            self._cli(["finetune", "--pretrained", "pretrained", "--data", "data.npz", "--outdir", name,
                       "--steps", "1", "--batch", "2", "--snapshot-every", "1", "--device", "cpu"])
        elif name == "imported":
            self.get("model.pkl")
            self._cli(["import", "--pkl", "model.pkl", "--out", name])
        else:
            raise KeyError(f"no template {name!r}")

    def materialise(self, argv: list[str], case_dir: Path) -> list[str]:
        """argv with each "@name" replaced by a fresh copy of template `name` in case_dir (relative paths)."""
        out = []
        for token in argv:
            if not token.startswith("@"):
                out.append(token)
                continue
            rel = token[1:]
            if rel.startswith("new/"):
                rel = rel[len("new/"):]
            else:
                top = rel.split("/")[0]
                src, dst = self.get(top), case_dir / top
                if not dst.exists():
                    if src.is_dir():
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst)
            out.append(rel)
        return out


# ------------------------------------------------------------------------------------------------ running


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs past its time (a BaseException: no `except Exception` eats it)."""


@dataclass
class Result:
    code: object  # the exit code, or "exception" / "timeout"
    out: str
    err: str
    exception: str = ""
    seconds: float = 0.0


def _address_space() -> int:
    """This process's virtual size in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return 0


@contextlib.contextmanager
def _limits(timeout: float, memory_bytes: int):
    """Alarm after `timeout` s; address space capped at `memory_bytes` more than the process holds now (a case
    that would eat the machine fails with MemoryError instead; the margin above the current size leaves room for
    the thread pools of a many-core machine); torch's thread count, the environment and the working directory
    restored."""
    import torch

    threads = torch.get_num_threads()
    env = dict(os.environ)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + memory_bytes
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

    def on_alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env)


CASE_ENV_DROP = ("AMBIENT_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


def invoke(argv: list[str], cwd: Path, timeout: float = 60, memory_bytes: int = 6 << 30) -> Result:
    """`ambient.cli.main(argv)` in this process, in `cwd`, with stdout/stderr captured."""
    from ambient.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    start = time.perf_counter()
    exception = ""
    with _limits(timeout, memory_bytes):
        for key in CASE_ENV_DROP:
            os.environ.pop(key, None)
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(argv)
            code: object = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
        except CaseTimeout:
            code, exception = "timeout", f"ran past {timeout} s"
        except BaseException:  # noqa: BLE001 - any exception escaping main() is a finding
            code, exception = "exception", traceback.format_exc()
        finally:
            os.chdir(here)
    return Result(code, out.getvalue(), err.getvalue(), exception, time.perf_counter() - start)


def invoke_subprocess(argv: list[str], cwd: Path, timeout: float = 120) -> Result:
    """`python -m ambient argv` in a real process."""
    env = {k: v for k, v in os.environ.items() if k not in CASE_ENV_DROP}
    env.setdefault("OMP_NUM_THREADS", "1")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "ambient", *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Result("timeout", str(exc.stdout or ""), str(exc.stderr or ""), f"ran past {timeout} s",
                      time.perf_counter() - start)
    return Result(proc.returncode, proc.stdout, proc.stderr, "", time.perf_counter() - start)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind; files with size, mtime and a content hash (directory mtimes not)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            else:
                state[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return state


def tree_diff(before: dict, after: dict, limit: int = 6) -> list[str]:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    out = [f"new: {p}" for p in new[:limit]] + [f"removed: {p}" for p in gone[:limit]]
    return out + [f"changed: {p}" for p in changed[:limit]]


TRACEBACK = "Traceback (most recent call last)"
MAX_ERROR_LINE = 2000


def problems(case: Case, argv: list[str], result: Result, before: dict, after: dict) -> list[str]:
    """What is wrong with one case's outcome (an empty list: the invariants hold)."""
    found = []
    if result.code not in (0, 2):
        found.append(f"exit {result.code!r} (wanted 0 or 2)")
    if result.exception:
        found.append(f"{result.code}: {result.exception.strip().splitlines()[-1]}")
    if TRACEBACK in result.err or TRACEBACK in result.out:
        found.append("traceback in the output")
    if result.code == 2:
        lines = result.err.rstrip().splitlines()
        last = lines[-1] if lines else ""
        if not last.startswith("error:"):
            found.append(f"last stderr line does not start with 'error:': {last[:200]!r}")
        elif len(last) > MAX_ERROR_LINE:
            found.append(f"error line of {len(last)} characters")
        value = argv[-1] if len(case.tokens) == 2 else ""  # the fuzzed value as given (a path: relative)
        # the value counts as named where it stands as a word of its own ("error: -1: …", "'nan'"), not inside
        # another number ("got 0.5" does not name "0")
        as_word = re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", last) if value else None
        named = any(n in last for n in case.names) or as_word is not None
        if last.startswith("error:") and not named:
            found.append(f"error line names neither {case.flag} nor its value: {last[:300]!r}")
        diff = tree_diff(before, after)
        if diff:
            found.append("refused but changed the case folder: " + "; ".join(diff))
    elif result.code == 0:
        found.extend(foreign_writes(case, argv, before, after))
    return found


def foreign_writes(case: Case, argv: list[str], before: dict, after: dict) -> list[str]:
    """After a success: the copied templates are as they were, but for the fuzzed option's own output (a run
    folder of the command's own kind: a resume; a plain file or a kind-less folder given to it: overwritten or
    filled as asked)."""
    value = argv[-1] if len(case.tokens) == 2 else None
    found = []
    for top in sorted({rel.split("/")[0] for rel in before}):
        if top == value and (top not in KIND_FOLDERS or KIND_FOLDERS[top] == OWN_OUTPUT.get((case.command,
                                                                                             case.param))):
            continue
        mine = {k: v for k, v in before.items() if k == top or k.startswith(top + "/")}
        now = {k: v for k, v in after.items() if k == top or k.startswith(top + "/")}
        if top not in KIND_FOLDERS:  # a data file or a user's folder: may gain files, never lose or change one
            now = {k: v for k, v in now.items() if k in mine}
        diff = tree_diff(mine, now)
        if diff:
            what = KIND_FOLDERS.get(top, "input")
            found.append(f"exit 0 but wrote into {top} ({what}): " + "; ".join(diff))
    return found


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    result: Result
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        err_tail = "\n".join(self.result.err.rstrip().splitlines()[-4:])
        return (f"{self.case.id}\n  ambient {' '.join(map(_quote, self.argv))}\n  exit {self.result.code!r} "
                f"in {self.result.seconds:.1f} s\n  problems: {self.problems}\n  stderr tail:\n{err_tail}\n"
                f"{self.result.exception}")


def _quote(token: str) -> str:
    return json.dumps(token) if (not token or any(c in token for c in " '\"")) else token[:80]


def run_case(templates: Templates, case: Case, scratch: Path, subprocess_run: bool = False,
             timeout: float = 60) -> Outcome:
    """Run one case in a fresh folder under scratch, check it, remove the folder."""
    case_dir = scratch / "case"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    try:
        argv = templates.materialise(case.argv(), case_dir)
        before = tree_state(case_dir)
        result = (invoke_subprocess(argv, case_dir, timeout=max(timeout, 120)) if subprocess_run
                  else invoke(argv, case_dir, timeout=timeout))
        after = tree_state(case_dir)
        return Outcome(case, argv, result, problems(case, argv, result, before, after))
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
