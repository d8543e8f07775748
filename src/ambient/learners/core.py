"""The training core shared by ``ambient train`` (:mod:`ambient.learners.train`) and ``ambient finetune``
(:mod:`ambient.learners.finetune`): data order, the optimizer step with gradient clipping and the
non-finite-step guard, EMA, and where and whether to resume.

Both loops draw every random number from generators seeded by ``mix_seed(stream, seed, …)``;
the streams (:mod:`ambient.rng`) are shared, so the same seed gives the same image order in both.

Where the two loops still differ, and why:

* The step's randomness: ``ambient train`` draws flips, then Ã, σ and noise for the global batch
  (:meth:`ambient.objectives.losses.AmbientLoss.draw`) so that W processes see what one process sees;
  finetuning draws Ã, then flips, t and noise per micro-batch (:meth:`FinetuneLoss.draw`), as it
  always has: reordering either would change every trained model of a given seed.
* EMA: training uses EDM's half-life in images with a ramp-up (:func:`ema_beta`); finetuning a
  pretrained model uses a fixed decay per step (``--ema``), the diffusers convention.
* Logging: training logs per kimg tick (img/s, :class:`ambient.learners.runlog.RunLogger`, TensorBoard);
  finetuning per ``--log-every`` optimizer steps (s/step). Both end with a final row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ambient.errors import AmbientInputError, TrainingDiverged
from ambient.rng import ORDER_STREAM, mix_seed
from ambient.store.snapshots import damaged_snapshots, latest_snapshot, snapshot_step


class EpochOrder:
    """Global sample positions → dataset indices; each epoch a fresh permutation from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(ORDER_STREAM, self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos // self.n == epoch
            out[sel] = self._permutation(epoch)[pos[sel] % self.n]
        return out


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; stops after ``limit`` in a row.

    ``skipped`` and ``consecutive`` are part of the training state (saved in snapshots).
    """

    def __init__(self, limit: int, skipped: int = 0, consecutive: int = 0):
        self.limit, self.skipped, self.consecutive = int(limit), int(skipped), int(consecutive)

    def record(self, finite: bool, *, where: str, outdir: Path | str, hint: str = "lower --lr, or check the data"
               ) -> None:
        """Count one step; raise :class:`TrainingDiverged` when ``limit`` non-finite steps came in a row."""
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise TrainingDiverged(f"training stopped at {where}: {self.consecutive} consecutive steps had a "
                                   f"non-finite loss or gradient ({hint}); last snapshot kept in {outdir}")


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to ``max_norm`` (0: no clipping); return the norm before clipping.

    With no clipping the gradients are multiplied by exactly 1, so the step does not change.
    """
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def guarded_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], guard: NonFiniteGuard, *,
                 loss: float, max_grad_norm: float, where: str, outdir: Path | str, lr: float | None = None) -> bool:
    """Clip, then take the optimizer step unless the loss or the gradient norm is not finite.

    A skipped step clears the gradients and is counted by ``guard`` (which stops the run after too
    many in a row). ``lr``, if given, is set on every parameter group before the step. Returns
    whether the step was taken. Under DDP pass the loss averaged over the ranks, so all agree.
    """
    grad_norm = clip_gradients(params, max_grad_norm)
    finite = bool(torch.isfinite(grad_norm)) and math.isfinite(loss)
    if not finite:
        opt.zero_grad(set_to_none=True)
    guard.record(finite, where=where, outdir=outdir)
    if not finite:
        return False
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    opt.step()
    return True


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·net, parameter by parameter (buffers are left alone)."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, warmup_kimg: float, schedule: str, nimg: int, batch: int, total_nimg: int) -> float:
    """The learning rate of the step taken after ``nimg`` images: a linear warm-up over ``warmup_kimg``
    thousand images, then ``base`` (``constant``) or ``base`` × ½(1 + cos(π · nimg / total_nimg))
    (``cosine``: SGDR's annealing without restarts, Loshchilov & Hutter 2017; it reaches 0 at the end of the
    run, so raising ``--kimg`` on resume stretches the curve and raises the rate again)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    lr = base * min(1.0, (nimg + batch) / max(warmup_kimg * 1000, 1e-8))
    if schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(nimg / max(total_nimg, 1), 1.0)))
    return lr


def ema_beta(halflife_kimg: float, rampup: float, nimg: int, batch: int) -> float:
    """EDM's EMA decay per step: half-life ``halflife_kimg`` thousand images, at most ``rampup`` × the
    images seen so far (0 disables the ramp-up)."""
    halflife = halflife_kimg * 1000
    if rampup > 0:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def resume_source(outdir: Path, resume: str | None, *, flag: str = "--resume") -> Path | None:
    """The snapshot to resume from.

    ``resume`` None: the latest snapshot in ``outdir`` if there is one; ``"latest"``: the same but
    required; ``"none"``: start afresh; else a snapshot folder or an outdir (its latest snapshot).
    """
    if resume == "none":
        return None
    if resume == "latest":
        snap = latest_snapshot(outdir) if outdir.is_dir() else None
        if snap is None:
            raise AmbientInputError(f"{flag}: --outdir {outdir} holds no snapshot to resume from")
        return snap
    if resume:
        p = Path(resume)
        if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            return p
        snap = latest_snapshot(p) if p.is_dir() else None
        if snap is None:
            raise AmbientInputError(f"{flag} {p}: no snapshot to resume from")
        return snap
    return latest_snapshot(outdir) if outdir.is_dir() else None


def skipped_snapshots_notice(outdir: Path, source: Path | None) -> str | None:
    """One line naming the damaged or incomplete snapshots of ``outdir`` newer than ``source`` (the
    snapshot a resume uses, None: a fresh start), which resuming passes over; None if there are none."""
    newest = snapshot_step(source) if source is not None else None
    skipped = [p.name for p in damaged_snapshots(outdir) if newest is None or snapshot_step(p) > newest]
    if not skipped:
        return None
    names = ", ".join(skipped) if len(skipped) <= 3 else f"{', '.join(skipped[:3])} and {len(skipped) - 3} more"
    then = f"resuming from {source.name}" if source is not None else "no complete snapshot left: starting afresh"
    return (f"notice: skipping {names} in {outdir}: incomplete or damaged (files missing or of other sizes than "
            f"its COMPLETE marker lists); {then}")


def check_resume_compatible(saved: dict, current: dict, may_change: Iterable[str], source: Path | str, *,
                            fresh_start: str = "another --outdir") -> None:
    """One-line error naming the first option (as a flag) whose value differs from the run in
    ``source``, among the options not in ``may_change``. Options the saved run did not record
    (older versions) are not compared."""
    allowed = set(may_change)
    for key, new_value in current.items():
        if key in allowed or key not in saved:
            continue
        if saved[key] != new_value:
            raise AmbientInputError(f"--{key.replace('_', '-')} is {new_value!r} but the run in {source} used "
                                    f"{saved[key]!r}; use the same value or {fresh_start}")
