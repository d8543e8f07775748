"""Restoration benchmark: posterior sampling on masked held-out Fashion-MNIST test images.

Observations: clean test images (indices from 8000 on, disjoint from the KID reference, which is the
first ``--num-ref`` test images) under dust masks at p = 0.8 (a pure function of (seed, index)).
Models: the clean-trained and the ambient p = 0.8 (δ = 0.1) models of benchmarks/validate.py, reused from
its run folder (runs/validate/<mode>) when trained there with the same budget, else trained the same way.

Methods: MMPS with 1 and 3 CG iterations (and 1 with σ_y = 0.1, to show that observed pixels then follow y
to about σ_y), DPS, projection (clean model), ambient-mean (ambient model; the posterior mean, one call).
Scores: PSNR on the hidden pixels (uint8, peak 255, mean over images), KID (×10³) of the restorations
against the reference, RMS distance to y on the observed pixels; cost: wall time per image, counted forwards and VJPs
per image, and the wall time of each method relative to plain Heun sampling of the same model on the
same batch, timed side by side (alternating, median of ``--repeats``); network-call equivalents =
that ratio × (2·steps − 1), the forwards of one plain Heun trajectory.

    python benchmarks/restore.py --quick --threads 1   # validate's quick models (1.5 kimg), 32 observations
    python benchmarks/restore.py --mode medium --threads 2   # validate's medium models (18 kimg), 200 observations
    python benchmarks/restore.py --threads 2           # full: validate's full models (60 kimg), 500 observations

Writes this mode's section of docs/restore.md (between its markers), its rows of docs/restore.json and
docs/restore.png (full) or docs/restore_<mode>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ambient.data.corruption import Corruption
from ambient.data.datasets import ImageDataset, load_images
from ambient.data.images import float_to_uint8
from ambient.io import atomic_write_json, atomic_write_text
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid
from ambient.metrics.inception import load_inception
from ambient.sampling.fixed_mask import model_sigmas
from ambient.sampling.restore import RestoreConfig, restore, restore_rows
from ambient.sampling.solvers import sample_heun
from ambient.store.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import Method, train_stage  # noqa: E402
from validate_report import write_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST = "builtin:fashion-mnist:test"
OBS_START = 8000  # observations: test images from here on; the KID reference is the first --num-ref
P = 0.8
MODES = {"quick": dict(kimg=1.5, num_obs=32, num_ref=128, repeats=2, time_batch=16),
         "medium": dict(kimg=18.0, num_obs=200, num_ref=1000, repeats=3, time_batch=32),
         "full": dict(kimg=60.0, num_obs=500, num_ref=2000, repeats=3, time_batch=32)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --mode quick")
    ap.add_argument("--validate-dir", default=None, help="validate.py's run folder (default runs/validate/<mode>)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--kimg", type=float, default=None, help="training budget of each model (validate's mode's)")
    ap.add_argument("--num-obs", type=int, default=None, help="observations restored (one draw each)")
    ap.add_argument("--num-ref", type=int, default=None, help="clean test images in the KID reference")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--dps-step", type=float, default=RestoreConfig().dps_step)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="side-by-side timing repeats")
    ap.add_argument("--time-batch", type=int, default=None, help="observations in the side-by-side timing batch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.mode = "quick"
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_ref > OBS_START or OBS_START + args.num_obs > 10000:
        ap.error(f"need --num-ref <= {OBS_START} and --num-obs <= {10000 - OBS_START}")
    args.validate_dir = Path(args.validate_dir or ROOT / "runs" / "validate" / args.mode)
    return args


def observations(n: int, seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """(masked observations as a dataset with data masks, the clean truths uint8 (n, 1, 28, 28))."""
    truth = load_images(TEST, max_size=OBS_START + n)[OBS_START:]
    masks = Corruption("dust", P, 0.0).masks_for_indices(seed, range(OBS_START, OBS_START + n), truth.shape[1:])
    return ImageDataset(truth.clone(), masks.to(torch.uint8), source=f"{TEST}[{OBS_START}:] p={P}"), truth


def hidden_psnr(u8: torch.Tensor, truth: torch.Tensor, masks: torch.Tensor) -> float:
    hidden = masks == 0
    err = (u8.double() - truth.double()).pow(2) * hidden
    mse = err.flatten(1).sum(1) / hidden.flatten(1).sum(1).clamp_min(1)
    return float((10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).mean())


def observed_rms(images: torch.Tensor, data: ImageDataset) -> float:
    """RMS distance (images in [−1, 1]) between restorations and y on the observed pixels."""
    y, masks = data.batch(range(len(data)))
    return float(((images - y) * masks).pow(2).sum().div(masks.sum()).sqrt())


def methods(args) -> list[tuple[str, Method, RestoreConfig]]:
    clean, amb = Method("clean", 0.0, 0.0), Method("ambient", P, 0.1)
    base = dict(steps=args.steps, batch=args.batch, seed=args.seed)
    return [("MMPS, 1 CG", clean, RestoreConfig(method="mmps", cg_iters=1, **base)),
            ("MMPS, 3 CG", clean, RestoreConfig(method="mmps", cg_iters=3, **base)),
            ("MMPS, 1 CG, sigma_y=0.1", clean, RestoreConfig(method="mmps", cg_iters=1, sigma_y=0.1, **base)),
            (f"DPS, zeta={args.dps_step:g}", clean, RestoreConfig(method="dps", dps_step=args.dps_step, **base)),
            ("projection", clean, RestoreConfig(method="project", **base)),
            ("ambient-mean (ambient p=0.8)", amb, RestoreConfig(method="ambient-mean", **base))]


def side_by_side(args, data: ImageDataset, runs: list, root: Path) -> dict[str, float]:
    """Median wall time of each method on one batch, divided by plain Heun sampling of the same model."""
    rows = list(range(min(args.time_batch, len(data))))
    models = {m.key: load_model(root / m.key) for _, m, _ in runs}
    times: dict[str, list[float]] = {}

    def plain(key):
        den = models[key].denoiser
        sig = model_sigmas(den, args.steps)
        x = sig[0] * torch.randn(len(rows), *data.shape, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
        with torch.no_grad():
            sample_heun(lambda z, s: den(z, s), x, sig)

    for _ in range(args.repeats):  # per model: plain Heun, then each of its methods, alternating over repeats
        for key in models:
            jobs = [(f"plain:{key}", lambda k=key: plain(k))]
            jobs += [(name, lambda c=cfg, k=key: restore_rows(models[k], data, rows, c))
                     for name, m, cfg in runs if m.key == key]
            for label, fn in jobs:
                t0 = time.perf_counter()
                fn()
                times.setdefault(label, []).append(time.perf_counter() - t0)
    return {name: statistics.median(times[name]) / statistics.median(times[f"plain:{m.key}"]) for name, m, _ in runs}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = args.validate_dir
    root.mkdir(parents=True, exist_ok=True)
    runs = methods(args)
    vargs = SimpleNamespace(kimg=args.kimg, arch="small", batch=32, lr=2e-3, seed=0)  # validate.py's defaults
    train_s = {m.key: train_stage(m, vargs, root)["train_s"] for m in {m.key: m for _, m, _ in runs}.values()}
    data, truth = observations(args.num_obs, args.seed)
    masks = data.masks
    net = load_inception()
    fid_id = f"inception-{net.sha256}"
    ref = cached_features(load_images(TEST, max_size=args.num_ref), net, fid_id, 64, progress=False)

    def kid(u8):
        feats = cached_features(u8, net, fid_id, 64, progress=False)
        return compute_kid(feats, ref, num_subsets=100, max_subset_size=min(len(feats), len(ref)), seed=args.seed)

    observed_u8 = float_to_uint8(data.batch(range(len(data)))[0])
    (k, ks), (ko, kos) = kid(truth), kid(observed_u8)
    rows = [{"method": "held-out clean images (floor)", "psnr": None, "kid": k, "kid_std": ks},
            {"method": "observation, hidden = 0 (gray)", "psnr": hidden_psnr(observed_u8, truth, masks),
             "kid": ko, "kid_std": kos}]
    samples = {}
    for name, m, cfg in runs:
        res = restore(load_model(root / m.key), data, cfg)
        u8 = float_to_uint8(res.images)
        samples[name] = u8
        batches = math.ceil(len(data) / cfg.batch)
        k, ks = kid(u8)
        rows.append({"method": name, "model": m.key, "psnr": hidden_psnr(u8, truth, masks), "kid": k, "kid_std": ks,
                     "observed_rms": observed_rms(res.images, data),
                     "seconds_per_image": res.seconds / len(data), "forwards_per_image": res.calls["forward"] / batches,
                     "vjps_per_image": res.calls["vjp"] / batches, "steps": cfg.steps})
        log(f"{name}: PSNR(hidden) {rows[-1]['psnr']:.2f} dB  KID×10³ {1e3 * k:.1f}  "
            f"{1e3 * rows[-1]['seconds_per_image']:.0f} ms/image")
    ratios = side_by_side(args, data, runs, root)
    for row in rows:
        if row["method"] in ratios:
            row["ratio_to_plain_heun"] = ratios[row["method"]]
            row["network_call_equivalents"] = ratios[row["method"]] * (2 * args.steps - 1)
    log("ratio to plain Heun: " + ", ".join(f"{n} {r:.2f}×" for n, r in ratios.items()))
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "mode": args.mode, "kimg": args.kimg, "num_obs": args.num_obs, "num_ref": args.num_ref, "p": P,
            "steps": args.steps, "batch": args.batch, "repeats": args.repeats, "time_batch": args.time_batch,
            "seed": args.seed, "train_s": train_s,
            "wall_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    publish(Path(args.docs_dir), args.mode, rows, meta, observed_u8, samples, truth)


def markers(mode: str) -> tuple[str, str]:
    return (f"<!-- restore:{mode}:start (written by benchmarks/restore.py; edit outside the markers) -->",
            f"<!-- restore:{mode}:end -->")


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def section(rows: list[dict], meta: dict, figure: str) -> str:
    out = [f"### Mode `{meta['mode']}` — measured {meta['date']}", "",
           f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min, {meta['torch_threads']} torch thread(s), "
           f"{meta['machine']}). Models trained {meta['kimg']:g} kimg each; {meta['num_obs']} observations "
           f"(p = {meta['p']:g} dust masks, one restoration each), KID reference {meta['num_ref']} clean test "
           f"images; {meta['steps']} Heun steps; batch {meta['batch']}. Side-by-side timing: batches of "
           f"{meta['time_batch']}, median of {meta['repeats']}.", "",
           "| method | PSNR hidden (dB) ↑ | KID ×10³ ↓ | RMS vs y, observed | ms / image | forwards / image "
           "| VJPs / image | × plain Heun | network-call equivalents |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ms = r.get("seconds_per_image")
        out.append(f"| {r['method']} | {_f(r['psnr'], '.2f')} | {1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f} | "
                   f"{_f(r.get('observed_rms'), '.3f')} | {_f(None if ms is None else 1e3 * ms, '.0f')} | "
                   f"{_f(r.get('forwards_per_image'), '.0f')} | "
                   f"{_f(r.get('vjps_per_image'), '.0f')} | {_f(r.get('ratio_to_plain_heun'), '.2f')} | "
                   f"{_f(r.get('network_call_equivalents'), '.0f')} |")
    out += ["", f"![observation, each method, truth]({figure})", ""]
    return "\n".join(out)


def publish(docs: Path, mode: str, rows, meta, observed, samples, truth) -> None:
    figure = "restore.png" if mode == "full" else f"restore_{mode}.png"
    n = min(10, truth.shape[0])
    write_figure(docs / figure, [("observation", observed[:n]), *[(k, v[:n]) for k, v in samples.items()],
                                 ("truth", truth[:n])], label_width=190)
    md = docs / "restore.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Restoration benchmark\n"
    start, end = markers(mode)
    block = f"{start}\n{section(rows, meta, figure)}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(md, text)
    path = docs / "restore.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    atomic_write_json(path, {**old, mode: {"meta": meta, "rows": rows}})
    log(f"wrote {md}, {path}, {docs / figure}")


if __name__ == "__main__":
    main()
