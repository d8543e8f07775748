"""EM's lap-0 Gaussian fit: plain (PX-)EM vs SQUAREM-accelerated, log-likelihood per EM map and wall time.

Cases: Fashion-MNIST at p = 0.8 (dust masks, rank 64; the data ``ambient em`` fits), and the smooth 8×8 Gaussian
of benchmarks/fidelity.py at p = 0.8 and 0.9 (rank 64, the truth known: relative covariance error
‖Σ̂ − Σ‖_F/‖Σ‖_F). Both fits start from the same ``initial_prior``. For each tolerance (nats per observed value,
``fit_gaussian``'s ``tol``) the table gives the EM maps the accelerated fit runs before it stops and how far its
log-likelihood then is below the best one found (per observed value).

    OMP_NUM_THREADS=1 python benchmarks/gaussian_fit.py [--quick]

prints the tables and writes docs/gaussian_fit.json (``--quick``: about a minute, smaller sizes, to
docs/gaussian_fit_quick.json unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ambient.learners.gaussian_prior import fit_gaussian, initial_prior
from ambient.nets.oracle import smooth_covariance

ROOT = Path(__file__).resolve().parents[1]
TOLS = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
STD = 0.3  # as benchmarks/fidelity.py


def fashion(n: int):
    from ambient.data.corruption import Corruption
    from ambient.data.datasets import load_dataset

    ds = load_dataset("builtin:fashion-mnist", max_size=n, corruption=Corruption("dust", 0.8, 0.0), seed=0)
    y, mask = ds.batch(torch.arange(n))[:2]
    return y, mask, None


def smooth8(n: int, p: float):
    cov = smooth_covariance(8, 8, 2.0, jitter=1e-3 * STD**2, scale=STD**2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    m = (torch.rand(n, 64, generator=g, dtype=torch.float64) >= p).double()
    return (x * m).reshape(n, 1, 8, 8), m.reshape(n, 1, 8, 8), cov


def run(y, mask, cov, rank: int, cap: int, accelerate: bool, start) -> dict:
    trace, report, t0 = [], {}, time.perf_counter()
    prior, history = fit_gaussian(y, mask, rank, cap, init=start, accelerate=accelerate, report=report,
                                  callback=lambda i, ll: trace.append((i + 1, time.perf_counter() - t0, ll)))
    seconds = time.perf_counter() - t0
    out = {"accelerate": accelerate, "maps": report["maps"], "seconds": seconds, "history": history,
           "trace": trace, "gains": report["gains"], "observed": report["observed"], "final": history[-1],
           "monotone": min((b - a for a, b in zip(history, history[1:])), default=0.0)}
    if cov is not None:
        out["cov_error"] = float((prior.covariance() - cov).norm() / cov.norm())
    out["prior"] = prior
    return out


def loglik_at(res: dict, maps: int) -> float:
    """The best log-likelihood per image kept within the first ``maps`` EM maps (the start at 0 maps)."""
    kept = [ll for i, _, ll in res["trace"] if i - 1 < maps]  # the value reported by map i is of its input
    return max(kept) if kept else float("nan")


def stop_at(res: dict, tol: float) -> int | None:
    return next((m for m, g in res["gains"] if g < tol), None)


def case(name: str, y, mask, cov, rank: int, cap: int) -> dict:
    start = initial_prior(y, mask, rank)
    plain = run(y, mask, cov, rank, cap, False, start)
    acc = run(y, mask, cov, rank, cap, True, start)
    best = max(plain["final"], acc["final"])
    obs = acc["observed"]
    reach = next((i for i, _, ll in acc["trace"] if ll >= plain["final"]), None)
    row = {"case": name, "images": int(y.shape[0]), "pixels": int(y[0].numel()), "observed": obs, "rank": rank,
           "cap": cap, "start": plain["history"][0],
           "plain": {k: v for k, v in plain.items() if k != "prior"},
           "accelerated": {k: v for k, v in acc.items() if k != "prior"},
           "acc_maps_to_plain_final": reach,
           "tolerances": {}}
    for tol in TOLS:
        m = stop_at(acc, tol)
        mp = stop_at(plain, tol)
        row["tolerances"][f"{tol:g}"] = {
            "acc_maps": m, "acc_gap": None if m is None else (best - loglik_at(acc, m)) / obs,
            "plain_maps": mp, "plain_gap": None if mp is None else (best - loglik_at(plain, mp)) / obs}
    pa, pp = acc["prior"], plain["prior"]
    ca, cp = pa.covariance(), pp.covariance()
    row["plain_vs_acc_cov"] = float((cp - ca).norm() / ca.norm())
    # is the accelerated answer a fixed point of the plain map? (20 more plain maps from it)
    again, _ = fit_gaussian(y, mask, rank, 20, init=pa, accelerate=False)
    row["acc_drift_20_plain"] = float((again.covariance() - ca).norm() / ca.norm())
    return row


def fmt(v, spec=".4f"):
    return "—" if v is None else format(v, spec)


def print_case(row: dict, marks) -> None:
    p, a = row["plain"], row["accelerated"]
    print(f"\n## {row['case']}: {row['images']} images, {row['pixels']} pixels, {row['observed']:.1f} observed per "
          f"image, rank {row['rank']}; start {row['start']:.3f} nats/image")
    print("| EM maps | " + " | ".join(str(m) for m in marks) + " | s/map |")
    print("| --- " * (len(marks) + 2) + "|")
    for r in (p, a):
        print(f"| {'SQUAREM' if r['accelerate'] else 'plain'} | " + " | ".join(f"{loglik_at(r, m):.3f}" for m in marks)
              + f" | {r['seconds'] / max(r['maps'], 1):.2f} |")
    extra = ""
    if "cov_error" in p:
        extra = f"; covariance error plain {p['cov_error']:.4f}, SQUAREM {a['cov_error']:.4f}"
    print(f"SQUAREM reaches plain's {row['cap']}-map value at map {fmt(row['acc_maps_to_plain_final'], 'd')}; "
          f"‖Σ_plain − Σ_SQUAREM‖/‖Σ‖ {row['plain_vs_acc_cov']:.2e}; 20 plain maps from SQUAREM's answer move Σ by "
          f"{row['acc_drift_20_plain']:.2e}{extra}; smallest step of the history: plain {p['monotone']:.1e}, "
          f"SQUAREM {a['monotone']:.1e}")
    print("| tol (nats/observed value) | SQUAREM stops at map | its gap to the best (per observed value) | "
          "plain stops at map | its gap |")
    print("| --- | --- | --- | --- | --- |")
    for tol, t in row["tolerances"].items():
        print(f"| {tol} | {fmt(t['acc_maps'], 'd')} | {fmt(t['acc_gap'], '.1e')} | {fmt(t['plain_maps'], 'd')} | "
              f"{fmt(t['plain_gap'], '.1e')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    quick = args.quick
    out = Path(args.out) if args.out else ROOT / "docs" / ("gaussian_fit_quick.json" if quick else "gaussian_fit.json")
    t0 = time.perf_counter()
    rows = []
    n_fm, cap_fm = (600, 12) if quick else (3000, 60)
    y, mask, _ = fashion(n_fm)
    rows.append(case("fashion-mnist p=0.8", y, mask, None, 64, cap_fm))
    print_case(rows[-1], [m for m in (5, 10, 20, 50, 60) if m <= cap_fm])
    n8, cap8 = (600, 30) if quick else (2000, 200)
    for p in (0.8, 0.9):
        y, mask, cov = smooth8(n8, p)
        rows.append(case(f"smooth8 p={p}", y, mask, cov, 64, cap8))
        print_case(rows[-1], [m for m in (10, 20, 50, 100, 200) if m <= cap8])
    meta = {"command": "python benchmarks/gaussian_fit.py" + (" --quick" if quick else ""),
            "threads": torch.get_num_threads(), "minutes": (time.perf_counter() - t0) / 60,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    print(f"\n{meta['minutes']:.1f} min, {meta['threads']} thread(s); wrote {out}")


if __name__ == "__main__":
    main()
