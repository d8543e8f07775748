"""Scale: multi-process runs through PyTorch's own engine (torchrun + DistributedDataParallel),
and :func:`compile_regions`, the ``--compile`` fast path.

``torchrun --nproc_per_node=N -m ambient train …`` (multi-node: add torchrun's ``--nnodes`` and
rendezvous flags) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we then join
the process group (nccl on CUDA, gloo on CPU) and wrap the model in DDP. Every rank draws the
randomness of the whole global batch and keeps its slice (see :mod:`ambient.learners.train`), so a
W-process run sees the same data, masks and noise as one process, and its gradient, the mean of
the ranks' gradients, is the single-process gradient of the global batch.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ambient.errors import AmbientInputError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise AmbientInputError(f"environment variable {name} is not set (start multi-process runs with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise AmbientInputError(f"environment variable {name}={raw!r} is not an integer") from None


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun, 1 without it; read before joining any process group."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise AmbientInputError(f"environment variable WORLD_SIZE={world} must be >= 1")
    return world


def rank_from_env() -> int:
    """RANK as set by torchrun, 0 without it (the process that writes outputs and prints)."""
    return _env_int("RANK", 0) if world_size_from_env() > 1 else 0


def _wants_cuda(device: str | torch.device) -> bool:
    name = str(device)
    return torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))


def init_from_env(device: str | torch.device = "auto") -> DistEnv:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1), else a single process.

    Under torchrun each process uses ``cuda:LOCAL_RANK`` when ``device`` is auto/cuda/cuda:N and
    CUDA exists (backend nccl), else the CPU (backend gloo). Calling it again returns the same answer.
    """
    world = world_size_from_env()
    if world <= 1:
        return DistEnv()
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = _wants_cuda(device)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # leave the group before the interpreter tears down: a live gloo group at exit can abort a rank
        # ("terminate called without an active exception"), failing a run whose work was all done
        atexit.register(_leave_group)
    return DistEnv(rank, world, local_rank, dev)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``module`` itself in a single process, else DistributedDataParallel around it (rank 0's
    weights are broadcast, gradients averaged over ranks in backward)."""
    if env.world_size <= 1:
        return module
    ids = [env.local_rank] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def mean_across(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a scalar over ranks (the same on every rank)."""
    if env.world_size <= 1:
        return value
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / env.world_size


def barrier(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()


def shard(items: list, env: DistEnv) -> list:
    """This rank's share of a list (round-robin), e.g. seeds for sampling."""
    return items[env.rank::env.world_size]


def shard_and_gather(num: int, work: Callable[[list[int]], tuple[torch.Tensor, Any]],
                     env: DistEnv) -> tuple[torch.Tensor, list] | None:
    """Items 0..num-1 shared over the ranks (round-robin, :func:`shard`), their results gathered on rank 0.

    Each rank calls ``work(indices)`` on its share; it returns (rows, extra) with ``rows[i]`` the result
    of item ``indices[i]`` and ``extra`` anything picklable (e.g. timings). Rank 0 gets every row in item
    order, (num, …) on the CPU in the rows' dtype, and the ranks' extras in rank order; the others get None.

    If ``work`` raises on any rank, every rank raises (the others after the gather, so none waits for ever in
    it): the rank that failed its own exception, the others the first failing rank's (or a RuntimeError
    naming it where that exception cannot be pickled).
    """
    mine = shard(list(range(num)), env)
    if env.world_size == 1:
        rows, extra = work(mine)
        gathered = [(mine, rows.cpu(), extra)]
    else:
        own = None
        try:
            rows, extra = work(mine)
            part = (mine, rows.cpu(), extra)
        except Exception as exc:  # the other ranks are (or will be) in the gather: reach it, then raise
            own, part = exc, ("failed", env.rank, _picklable(exc))
        gathered = [None] * env.world_size if env.rank == 0 else None
        dist.gather_object(part, gathered, dst=0)
        failure = [next((g for g in gathered if g[0] == "failed"), None) if env.rank == 0 else None]
        dist.broadcast_object_list(failure, src=0)
        if own is not None:
            raise own
        if failure[0] is not None:
            raise failure[0][2]
    if env.rank != 0:
        return None
    first = gathered[0][1]
    out = torch.empty((num, *first.shape[1:]), dtype=first.dtype)
    for idx, r, _ in gathered:
        out[idx] = r
    return out, [e for _, _, e in gathered]


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to cross ranks), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def compile_regions(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` a denoiser in place, one UNet block at a time (down blocks, mid block, up blocks).

    Compiling each block rather than the whole model compiles faster, and on CPU with torch 2.13
    the whole-UNet graph gets wrong gradients (zero from the first downsampler on; the forward is
    right), while per block they match eager mode (tests/test_fastpaths.py). A backbone without ``.unet`` is compiled
    whole. Parameter names, hence checkpoints, do not change.
    """
    unet = getattr(getattr(module, "backbone", None), "unet", None)
    if unet is None:
        module.compile()
        return module
    for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        if block is not None:
            block.compile()
    return module


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` → cuda if available else cpu; otherwise the named device, which must be a CPU, a CUDA
    device this torch can use, or an available ``mps``. One-line AmbientInputError naming ``flag`` if not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise AmbientInputError(f"{flag} {name!r}: not a torch device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise AmbientInputError(f"{flag} {name}: this torch is a CPU-only build (no CUDA); use --device cpu, "
                                    "or install a torch build for your CUDA")
        if not torch.cuda.is_available():
            raise AmbientInputError(f"{flag} {name}: no CUDA device is available to this torch; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AmbientInputError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                                    f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise AmbientInputError(f"{flag} {name}: MPS is not available to this torch; use --device cpu")
    elif device.type != "cpu":
        raise AmbientInputError(f"{flag} {name}: device type {device.type!r} is not supported "
                                "(auto, cpu, cuda or cuda:N)")
    return device
