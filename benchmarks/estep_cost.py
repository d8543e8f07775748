"""What one EM E-step observation costs against one plain sampler image, side by side in one run.

Same network (a full-image denoiser of the given backbone, random weights: cost does not depend on them),
same batch, same Heun steps. Rows, timed alternately ``--rounds`` times (median reported):

* ``plain``: one image of the plain sampler (Heun, ``--steps`` steps), no guidance;
* ``mmps (before)``: one MMPS posterior draw as before 2026-12-04: CG's VJPs, then one more VJP for the
  solution's update σ² Jᵀ Aᵀ v;
* ``mmps``: today's (:func:`ambient.sampling.posterior.mmps_samples`): the update accumulated from CG's own VJPs;
* ``mmps <operator>`` (``--operators``, issue 25): the same draw through an operator object
  (:func:`ambient.sampling.posterior.mmps_operator_samples`): ``mask`` (the pixel mask, as above, but through the
  generic operator path), ``blur`` (a Gaussian PSF of ``--blur-sigma`` px, grouped convolution), ``kspace``
  (single-coil Cartesian k-space at acceleration ``--acceleration``, centred orthonormal FFT). Each row's
  ``× mask`` is its time over ``mmps mask``'s: what the operator itself adds to an E-step.

Every MMPS row runs the same Heun steps as ``plain``, so ``× plain`` is also one MMPS step over one plain Heun step.
Prints a table (seconds per image, ratio to plain, network forward / VJP calls per image) and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/estep_cost.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/estep_cost.py --threads 1 --resolution 64 --operators mask blur kspace \
        --out benchmarks/results/estep_cost_operators.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ambient.nets.registry import ModelConfig, build_denoiser
from ambient.nets.schedules import edm_sigmas
from ambient.operators.blur import BlurOperator, gaussian_kernel
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.mask import MaskOperator
from ambient.sampling import posterior
from ambient.sampling.posterior import MMPS, conjugate_gradient, mmps_operator_samples, mmps_samples
from ambient.sampling.solvers import sample_heun

ROOT = Path(__file__).resolve().parents[1]


class MMPSBefore(MMPS):
    """MMPS as computed before: a final VJP for σ² Jᵀ Aᵀ v after CG (the same result up to rounding)."""

    def forward(self, x, sigma):
        s2 = posterior._sigma_like(sigma, x) ** 2
        sy2, a = self.sigma_y**2, self.operator
        xg, x0 = self._forward_with_graph(x, sigma)
        with torch.no_grad():
            x0d = x0.detach().to(x.dtype)
            v = conjugate_gradient(lambda w: sy2 * w + a(s2 * self._vjp(x0, xg, a.adjoint(w))),
                                   self.residual(x0d), self.cg_iters, floor=sy2)
            return x0d + s2 * self._vjp(x0, xg, a.adjoint(v), retain=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--cg-iters", type=int, default=1)
    ap.add_argument("--survival", type=float, default=0.2, help="observed share of the masks")
    ap.add_argument("--operators", nargs="*", default=[], choices=("mask", "blur", "kspace"),
                    help="add one MMPS row per operator, through the generic operator path")
    ap.add_argument("--blur-sigma", type=float, default=2.0, help="PSF std in pixels (blur row)")
    ap.add_argument("--acceleration", type=float, default=4.0, help="k-space acceleration R (kspace row)")
    ap.add_argument("--no-before", action="store_true", help="skip the 'mmps (before)' row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estep_cost.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    den = build_denoiser(ModelConfig(arch=args.arch, img_channels=1, resolution=args.resolution,
                                     mask_channels=False, mask_aware=False)).eval()
    n, shape = args.batch, (args.batch, 1, args.resolution, args.resolution)
    g = torch.Generator().manual_seed(1)
    y = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(shape, generator=g) < args.survival).float()
    y = y * mask
    seeds = list(range(n))
    sigmas = edm_sigmas(args.steps)

    def plain():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[0]
        with torch.no_grad():
            sample_heun(lambda z, s: den(z.float(), s).double(), x, sigmas)
        return {}

    def mmps_before():
        w = MMPSBefore(den, y, MaskOperator(mask), 1e-3, cg_iters=args.cg_iters)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[0]
        sample_heun(w, x, sigmas)
        return dict(w.calls)

    def mmps_now():
        _, calls = mmps_samples(den, y, mask, seeds, steps=args.steps, cg_iters=args.cg_iters, sigma_y=1e-3)
        return calls

    res = args.resolution
    operators = {
        "mask": lambda: MaskOperator(mask, sigma_y=1e-3),
        "blur": lambda: BlurOperator(gaussian_kernel(args.blur_sigma), (1, res, res), sigma_y=1e-3),
        "kspace": lambda: KSpaceOperator(cartesian_mask(n, res, res, args.acceleration, seed=3), (1, res, res),
                                         sigma_y=1e-3),
    }

    def mmps_through(kind):
        op = operators[kind]()
        x_true = torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
        y_op = op(x_true)

        def run():
            _, c = mmps_operator_samples(den, y_op, op, seeds, steps=args.steps, cg_iters=args.cg_iters,
                                         sigma_y=1e-3)
            return c
        return run

    rows = {"plain": plain, "mmps (before)": mmps_before, "mmps": mmps_now}
    if args.no_before:
        del rows["mmps (before)"]
    for kind in args.operators:
        rows[f"mmps {kind}"] = mmps_through(kind)
    times: dict[str, list[float]] = {k: [] for k in rows}
    calls: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            t = time.perf_counter()
            calls[name] = fn()
            times[name].append(time.perf_counter() - t)
    plain_s = statistics.median(times["plain"]) / n
    nfe = 2 * args.steps - 1
    out = {"arch": args.arch, "resolution": args.resolution, "batch": n, "steps": args.steps,
           "operators": args.operators, "blur_sigma": args.blur_sigma, "acceleration": args.acceleration,
           "cg_iters": args.cg_iters, "threads": torch.get_num_threads(), "machine": platform.processor() or
           platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": {}}
    print(f"{args.arch} {args.resolution}px, batch {n}, {args.steps} Heun steps, {args.cg_iters} CG iteration(s), "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds}")
    mask_s = statistics.median(times["mmps mask"]) / n if "mmps mask" in times else None
    print("| row | s / image | × plain | × mask | forward calls | VJPs |\n| --- | --- | --- | --- | --- | --- |")
    for name in rows:
        s = statistics.median(times[name]) / n
        c = calls[name] or {"forward": nfe, "vjp": 0}
        vs_mask = s / mask_s if mask_s and name.startswith("mmps ") and name != "mmps (before)" else None
        out["rows"][name] = {"seconds_per_image": s, "ratio_to_plain": s / plain_s, "ratio_to_mask": vs_mask, **c,
                             "all_seconds": times[name]}
        print(f"| {name} | {s:.4f} | {s / plain_s:.2f} | {'' if vs_mask is None else f'{vs_mask:.2f}'} | "
              f"{c.get('forward', 0)} | {c.get('vjp', 0)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
