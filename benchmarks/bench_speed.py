"""Speed of training and sampling per backbone, with FLOP/s and MFU against a matmul peak measured here.

    python benchmarks/bench_speed.py            # full run (~9 min on one core)
    python benchmarks/bench_speed.py --quick    # ~2 min
    python benchmarks/bench_speed.py --threads 1   # when another job holds a core (see docs/speed.md)

The paper's DDPM++ (gated and ungated, CIFAR-10 layout, batch 4) beside the diffusers preset, at the
configuration of the reference code's anchor (REFERENCE_IMG_S):

    python benchmarks/bench_speed.py --archs ddpmpp32,ddpmpp-cifar,ddpmpp-cifar-ungated --threads 2

and timed step by step against the reference code's own network (needs a checkout of
giannisdaras/ambient-diffusion, which is not in this repository; see docs/speed.md):

    python benchmarks/bench_ddpmpp_vs_seed.py --seed /tmp/seed --threads 1

For each backbone (tiny, small at 1×28×28; ddpmpp32, ddpmpp-cifar[-ungated] at 3×32×32) it times one training step
(loss, backward, gradient clipping, Adam) in fp32, bf16 autocast and channels_last; counts the
FLOPs of a forward+backward with ``FlopCounterMode`` and divides by the fp32 step time
(achieved FLOP/s; MFU = that / the fp32 matmul peak); times an ambient step against a plain
EDM step (no masks anywhere) on the same backbone; times single denoiser calls (img-NFE/s) and
the ambient sampler with guidance 0 and > 0 (seconds per image-NFE). Prints a table, writes
JSON (default benchmarks/results/bench_speed.json) with the load average, and a torch.profiler
summary (top ops by self CPU time) of the fp32 training step. Targets (not tests): MFU ≥ 0.6,
bf16 ≥ 1.5× fp32 img/s, ambient/EDM step ≤ 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ambient.data.corruption import Corruption
from ambient.nets.backbones import count_parameters
from ambient.nets.registry import ModelConfig, build_denoiser
from ambient.objectives.losses import AmbientLoss
from ambient.sampling.fixed_mask import ambient_sample

# arch: (channels, resolution, batch, batch in --quick)
SETTINGS = {"tiny": (1, 28, 64, 32), "small": (1, 28, 64, 32), "ddpmpp32": (3, 32, 16, 4),
            "ddpmpp-cifar": (3, 32, 4, 4), "ddpmpp-cifar-ungated": (3, 32, 4, 4)}
# The reference code's own speed (giannisdaras/ambient-diffusion, CIFAR-10 DDPM++ config, batch 4, fp32,
# 2 threads, one training step), measured on this CPU for issue 17: img/s our rows must reach.
REFERENCE_IMG_S = {"ddpmpp-cifar": 0.48, "ddpmpp-cifar-ungated": 1.18}
CORRUPTION = Corruption("dust", 0.5, 0.1)


def timed(fn, iters: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int, iters: int) -> float:
    """Best FLOP/s of an n×n by n×n matmul in ``dtype`` (2n³ FLOPs)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    best = min(timed(lambda: torch.mm(a, b), 1, warmup=0) for _ in range(iters + 1))
    return 2 * n**3 / best


def _net(arch: str, c: int, r: int, mask_channels: bool, channels_last: bool = False) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_denoiser(ModelConfig(arch=arch, img_channels=c, resolution=r, mask_channels=mask_channels))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def train_step(arch: str, c: int, r: int, batch: int, *, kind: str = "ambient", bf16: bool = False,
               channels_last: bool = False):
    """(step, forward_backward) closures for one training step as ambient.learners.train does it.

    kind "ambient": mask input channels, a fresh further mask Ã each step, the ambient loss.
    kind "edm": the same backbone without mask channels and a plain EDM loss (no masks at all).
    """
    net = _net(arch, c, r, kind == "ambient", channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = AmbientLoss()
    g = torch.Generator().manual_seed(1)
    y = torch.rand((batch, c, r, r), generator=g) * 2 - 1
    mask = CORRUPTION.mask(y.shape, g)
    y = y * mask
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def forward_backward():
        sigma = loss_fn.sample_sigma(batch, g)
        noise = torch.randn(y.shape, generator=g)
        with autocast():
            if kind == "ambient":
                loss = loss_fn(net, y, mask, CORRUPTION.further(mask, g), sigma=sigma, noise=noise)
            else:
                err = (net(y + sigma.reshape(-1, 1, 1, 1) * noise, sigma).float() - y) ** 2
                loss = loss_fn.weight(sigma) * err.flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return net, step, forward_backward


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def profile_top(fn, steps: int, top: int = 12) -> list[dict]:
    """Top ops of ``steps`` calls by self CPU time: name, ms per step, share of the total, calls per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // steps}
            for e in events[:top]]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (images × calls = image-NFEs)."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, sigma, mask):
        self.calls += 1
        return self.net(x, sigma, mask)


def sampler_cost(net, c: int, r: int, n: int, steps: int, guidance: float) -> dict:
    den = CountingDenoiser(net)
    run = lambda: ambient_sample(den, (n, c, r, r), list(range(n)), corruption=CORRUPTION,  # noqa: E731
                                 num_steps=steps, num_masks=2, guidance_scale=guidance)
    seconds = timed(run, 1)
    calls = den.calls // 2  # warm-up + timed run
    return {"guidance": guidance, "seconds": seconds, "calls": calls, "sec_per_img_nfe": seconds / (calls * n)}


def bench_arch(arch: str, quick: bool, peak32: float, peak16: float) -> dict:
    c, r, batch, qbatch = SETTINGS[arch]
    batch = qbatch if quick else batch
    iters = 2 if quick else 6
    big = arch.startswith("ddpmpp")
    out: dict = {"arch": arch, "shape": [c, r, r], "batch": batch}
    net, step, fwd_bwd = train_step(arch, c, r, batch)
    out["params"] = count_parameters(net)
    t32 = timed(step, iters)
    flops = count_flops(fwd_bwd)
    out["train"] = {"fp32_img_s": batch / t32, "step_s": t32, "gflop_per_img": flops / batch / 1e9,
                    "achieved_gflop_s": flops / t32 / 1e9, "mfu_fp32": flops / t32 / peak32}
    if arch in REFERENCE_IMG_S:
        out["train"]["reference_code_fp32_img_s"] = REFERENCE_IMG_S[arch]
    _, step16, _ = train_step(arch, c, r, batch, bf16=True)
    t16 = timed(step16, iters)
    out["train"].update(bf16_img_s=batch / t16, bf16_speedup=t32 / t16, mfu_bf16=flops / t16 / peak16)
    _, step_cl, _ = train_step(arch, c, r, batch, channels_last=True)
    t_cl = timed(step_cl, iters)
    out["train"].update(channels_last_img_s=batch / t_cl, channels_last_speedup=t32 / t_cl)
    _, step_edm, _ = train_step(arch, c, r, batch, kind="edm")
    # ambient vs EDM: interleave repeats so that load changes hit both alike
    pairs = [(timed(step, 1, 0), timed(step_edm, 1, 0)) for _ in range(max(iters, 3))]
    out["train"]["ambient_over_edm"] = statistics.median(a / e for a, e in pairs)
    out["profile_fp32_train_step"] = profile_top(step, 1 if (quick or big) else 3)
    net.eval().requires_grad_(False)  # as ambient.store.models.load_model leaves it
    x = torch.randn(batch, c, r, r)
    m = CORRUPTION.mask(x.shape, torch.Generator().manual_seed(2))
    sig = torch.full((batch,), 1.0)
    with torch.no_grad():
        t_nfe = timed(lambda: net(x * m, sig, m), iters)
    n_s = 2 if big else 8
    with torch.no_grad():
        plain = sampler_cost(net, c, r, n_s, 2 if quick else 4, 0.0)
    guided = sampler_cost(net, c, r, n_s, 2 if quick else 4, 1.0)
    out["sample"] = {"img_nfe_s": batch / t_nfe, "sampler_guidance0": plain, "sampler_guidance1": guided,
                     "guided_over_plain_per_nfe": guided["sec_per_img_nfe"] / plain["sec_per_img_nfe"]}
    return out


def table(results: list[dict]) -> str:
    head = ("arch", "params", "batch", "fp32 img/s", "bf16 img/s", "bf16 x", "ch-last x", "GFLOP/img",
            "GFLOP/s", "MFU fp32", "amb/EDM", "img-NFE/s", "guided/plain")
    rows = [head]
    for r in results:
        t, s = r["train"], r["sample"]
        rows.append((r["arch"], f"{r['params'] / 1e6:.2f}M", str(r["batch"]), f"{t['fp32_img_s']:.1f}",
                     f"{t['bf16_img_s']:.1f}", f"{t['bf16_speedup']:.2f}", f"{t['channels_last_speedup']:.2f}",
                     f"{t['gflop_per_img']:.3f}", f"{t['achieved_gflop_s']:.1f}", f"{t['mfu_fp32']:.1%}",
                     f"{t['ambient_over_edm']:.3f}", f"{s['img_nfe_s']:.1f}", f"{s['guided_over_plain_per_nfe']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (~2 min)")
    parser.add_argument("--archs", default="tiny,small,ddpmpp32")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_speed.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); use 1 when another job holds a core")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in SETTINGS:
            parser.error(f"--archs: unknown backbone {a!r} (choose from {', '.join(SETTINGS)})")
    started, load_before = time.time(), os.getloadavg()
    n = 1024 if args.quick else 2048
    peak32 = matmul_peak(torch.float32, n, 3 if args.quick else 5)
    peak16 = matmul_peak(torch.bfloat16, n, 3 if args.quick else 5)
    print(f"matmul peak ({n}x{n}): fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for arch in archs:
        results.append(bench_arch(arch, args.quick, peak32, peak16))
        print(f"{arch}: done ({time.time() - started:.0f} s)", flush=True)
    print(table(results))
    report = {"quick": args.quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": time.time() - started,
              "matmul_peak_gflop_s": {"fp32": peak32 / 1e9, "bf16": peak16 / 1e9, "n": n},
              "targets": {"mfu_fp32": 0.6, "bf16_speedup": 1.5, "ambient_over_edm": 1.05}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
