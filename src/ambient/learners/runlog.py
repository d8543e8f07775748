"""What a training run writes beside its snapshots: stats.jsonl, TensorBoard events, a progress
bar, and per-snapshot figures (corrupted training images | samples)."""

from __future__ import annotations

import errno
import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from ambient.data.images import make_grid, save_png
from ambient.errors import AmbientInputError
from ambient.io import append_jsonl
from ambient.nets.registry import SamplingSpec
from ambient.sampling.fixed_mask import ambient_sample


def check_writable(outdir: Path) -> None:
    """Create ``outdir`` if needed and prove it is writable; else a one-line error naming it."""
    try:
        if outdir.exists() and not outdir.is_dir():
            raise AmbientInputError(f"--outdir {outdir}: exists and is not a directory")
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        why = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise AmbientInputError(f"--outdir {outdir}: not writable ({why})") from None


LOCK_FILE = ".lock"


class OutdirLock:
    """One writer per folder: an exclusive ``flock`` on ``<folder>/.lock``, held while a command writes.

    The kernel drops the lock when its file is closed, so a process that crashes or is SIGKILLed
    never leaves it stuck; the file itself (with the holder's pid, for the message) stays. A second
    process asking for a held lock is refused at once with a one-line AmbientInputError. Use it as a
    context manager around the command and call :meth:`acquire` once every input check has passed
    (it creates the folder): the lock is released on any exit. Where ``fcntl`` is missing (Windows)
    nothing is locked.
    """

    def __init__(self) -> None:
        self._file = None

    def acquire(self, folder: str | os.PathLike, flag: str = "--outdir") -> None:
        folder = Path(folder)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        if self._file is not None:
            raise RuntimeError("OutdirLock.acquire called twice")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / LOCK_FILE, "a+")
        except OSError as exc:
            why = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise AmbientInputError(f"{flag} {folder}: not writable ({why})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a file system without locks (some network mounts): go on unlocked
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise AmbientInputError(f"{flag} {folder}: another ambient process{who} is writing into it; wait for "
                                    f"it to finish or use another {flag}") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError:
            pass  # the pid is only for the message
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> OutdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def sample_grid(denoiser, spec: SamplingSpec, shape, n: int, device, num_steps: int = 18) -> torch.Tensor:
    """n samples from fixed seeds 0..n−1 (so grids of successive snapshots are comparable)."""
    kwargs = spec.sampler_kwargs()
    was_training = denoiser.training
    denoiser.eval()
    try:
        return ambient_sample(denoiser, (n, *shape), list(range(n)), num_steps=num_steps, device=device,
                              **kwargs).cpu()
    finally:
        denoiser.train(was_training)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 4) -> np.ndarray:
    """Two square-ish grids of the same tile size, with a white gap between them."""
    nrow = max(1, math.ceil(math.sqrt(left.shape[0])))
    a, b = make_grid(left, nrow, padding=1), make_grid(right, nrow, padding=1)
    h = max(a.shape[0], b.shape[0])
    pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)))  # noqa: E731
    sep = np.full((h, gap, a.shape[2]), 255, dtype=np.uint8)
    return np.concatenate([pad(a), sep, pad(b)], axis=1)


def write_grid_pair(path: Path, real: torch.Tensor, denoiser, spec: SamplingSpec, shape, device) -> None:
    samples = sample_grid(denoiser, spec, shape, real.shape[0], device)
    save_png(path, side_by_side(real, samples))


class RunLogger:
    """stats.jsonl per tick, TensorBoard scalars when tensorboard is installed, a tqdm bar.

    :meth:`close` writes the steps since the last tick as a final row, so every run that took a
    step (even one shorter than a tick) ends with a line in stats.jsonl.
    """

    def __init__(self, outdir: Path, *, enabled: bool, progress: bool, total_nimg: int, start_nimg: int):
        self.enabled = enabled
        self.outdir = outdir
        self.tb = None
        self.bar = None
        self._reset_tick(time.perf_counter(), start_nimg)
        self._last: tuple[int, int, float] | None = None  # (nimg, skipped, lr) of the latest step
        if not enabled:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(outdir / "tensorboard"))
        except ImportError:
            self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_nimg / 1000, initial=start_nimg / 1000, unit="kimg", file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}{postfix}]")

    def _reset_tick(self, now: float, nimg: int) -> None:
        self.tick_start, self.tick_nimg = now, nimg
        self.losses: list[float] = []

    def step(self, *, loss: float, nimg: int, batch: int, skipped: int, lr: float, tick_nimg: float) -> None:
        if not self.enabled:
            return
        self.losses.append(loss)
        self._last = (nimg, skipped, lr)
        if self.bar is not None:
            self.bar.update(batch / 1000)
        if nimg - self.tick_nimg >= tick_nimg:
            self._write_row(nimg, skipped, lr)

    def _write_row(self, nimg: int, skipped: int, lr: float) -> None:
        now = time.perf_counter()
        finite = [v for v in self.losses if math.isfinite(v)]
        row = {"kimg": round(nimg / 1000, 4), "loss": float(np.mean(finite)) if finite else None,
               "img_per_sec": (nimg - self.tick_nimg) / max(now - self.tick_start, 1e-9),
               "skipped_steps": skipped, "lr": lr, "time": time.time()}
        append_jsonl(self.outdir / "stats.jsonl", row)
        if self.tb is not None:
            for key in ("loss", "img_per_sec", "lr", "skipped_steps"):
                if row[key] is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], nimg)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}" if row["loss"] is not None else "nan",
                                 img_s=f"{row['img_per_sec']:.1f}")
        self._reset_tick(now, nimg)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. writing a snapshot) out of the current tick's img/s."""
        self.tick_start += seconds

    def event(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif os.environ.get("AMBIENT_QUIET", "") in ("", "0"):
            print(message, file=sys.stderr)

    def abort(self) -> None:
        """Close the progress bar and TensorBoard without another row (after an error; no-op after close)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:
                pass  # e.g. the disk that made the run fail is still full
            self.tb = None

    def close(self) -> None:
        """Write the pending partial tick (if any step was not logged yet) and close the writers."""
        if self.enabled and self.losses and self._last is not None:
            self._write_row(*self._last)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
