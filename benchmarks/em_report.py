"""Docs of benchmarks/em.py: the markdown page and the per-lap curve (PIL only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ambient.data.images import save_png

COLOURS = {"em samples": (200, 40, 40), "em --init samples": (150, 40, 160), "em completions": (230, 150, 30),
           "ambient": (40, 90, 200),
           "clean": (40, 150, 60), "naive": (120, 120, 120)}


def write_curve(path: Path, rows: list[dict], width: int = 560, height: int = 340) -> Path:
    """KID ×10³ per lap: EM samples and completions as lines, the baselines as horizontal lines."""
    em = sorted((r for r in rows if r["method"] == "em"), key=lambda r: r["lap"])
    init = sorted((r for r in rows if r["method"] == "em-init"), key=lambda r: r["lap"])
    series = {"em samples": [1e3 * r["kid"] for r in em], "em completions": [1e3 * r["completions_kid"] for r in em]}
    if init:
        series["em --init samples"] = [1e3 * r["kid"] for r in init]
    flat = {r["method"]: 1e3 * r["kid"] for r in rows if r["method"] in ("ambient", "clean", "naive")}
    values = [v for s in series.values() for v in s] + list(flat.values())
    lo, hi = 0.0, max(values + [1.0]) * 1.1
    left, right, top, bottom = 60, 150, 20, 40
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    laps = max(len(em) - 1, len(init) - 1, 1)

    def xy(lap: float, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * lap / laps
        return x, top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))

    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=(0, 0, 0))
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        d.text((8, y - 6), f"{v:.0f}", fill=(0, 0, 0), font=font)
        d.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
    for lap in range(len(em)):
        x, _ = xy(lap, lo)
        d.text((x - 3, height - bottom + 6), str(lap), fill=(0, 0, 0), font=font)
    d.text((left + 60, height - 16), "lap (KID x10^3 vs clean test images)", fill=(0, 0, 0), font=font)
    legend_y = top
    for name, value in flat.items():
        y = xy(0, value)[1]
        d.line([(left, y), (width - right, y)], fill=COLOURS[name], width=1)
        d.text((width - right + 8, legend_y), f"{name} {value:.0f}", fill=COLOURS[name], font=font)
        legend_y += 14
    for name, vals in series.items():
        points = [xy(i, v) for i, v in enumerate(vals)]
        if len(points) > 1:
            d.line(points, fill=COLOURS[name], width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[name])
        d.text((width - right + 8, legend_y), name, fill=COLOURS[name], font=font)
        legend_y += 14
    return save_png(path, np.asarray(img))


def _row(r: dict) -> str:
    kid = f"{1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f}"
    lap = "—" if r.get("lap") is None else str(r["lap"])
    comp = "—" if r.get("completions_kid") is None else f"{1e3 * r['completions_kid']:.1f}"
    psnr = "—" if r.get("hidden_psnr") is None else f"{r['hidden_psnr']:.2f}"
    estep = "—" if r.get("estep_s") is None else f"{r['estep_s'] / 60:.1f}"
    return (f"| {r['method']} | {lap} | {r['kimg']:g} | {r['fid']:.1f} | {kid} | {100 * r['swd']:.2f} | {comp} | "
            f"{psnr} | {r['train_s'] / 60:.1f} | {estep} | {r['sample_s'] / 60:.1f} |")


def _fit_text(e: dict) -> str:
    if e.get("gaussian_tol") is None:
        return f"{e['gaussian_iters']} closed-form EM iterations"
    per = "per observed value" if e.get("gaussian_tol_per") == "value" else "per image"
    return (f"closed-form missing-data EM until the log-likelihood gains under {e['gaussian_tol']:g} nats {per}, "
            f"at most {e['gaussian_iters']} iterations")


def _redraw_text(e: dict) -> str:
    if e.get("redraw") == "rotate":
        return "in rotation: blocks of one seeded permutation, so every observation is redrawn in turn"
    return "a fresh random subset per lap"


def _mstep_lr_text(e: dict) -> str:
    """The M-steps' learning-rate schedule as the run recorded it (runs from before the option: constant)."""
    if e.get("lr_schedule", "constant") == "cosine":
        return "lr decayed by cosine to 0 at each lap's end"
    return "constant lr"


def write_markdown(rows: list[dict], meta: dict) -> str:
    m, e, v = meta, meta["em"], meta["val"]
    quick = m["mode"] != "full"
    title = "# EM learner vs Ambient Diffusion on Fashion-MNIST, p = 0.8"
    lines = [title + (f" ({m['mode']} run)" if quick else ""), ""]
    if m["mode"] == "curve":
        lines += [f"**Convergence run on a subset: the first {e.get('max_size')} training observations** (the same "
                  "ones for every method; baselines trained on them here). Compare rows within this table.", ""]
    elif quick:
        lines += [f"**{m['mode'].capitalize()} run: a pipeline check at a tiny budget, not a result.** The full "
                  "configuration is `python benchmarks/em.py --threads 2`.", ""]
    lines += [
        f"Command: `{m['command']}` ({m['date']}, {m['threads']} torch threads, {m['wall_s'] / 60:.1f} min this "
        "invocation; stages reused from earlier invocations not counted).", "",
        f"Baselines: benchmarks/validate.py's {m['mode']} models (`{v['arch']}` backbone, batch {v['batch']}, lr "
        f"{v['lr']:g} ({v.get('lr_schedule') or 'constant'}), {v['kimg']:g} kimg, seed {v['seed']}). EM: the same "
        f"observations as ambient p = 0.8, {e['laps']} laps × {e['lap_kimg']:g} kimg (same images seen in total; "
        f"M-steps at a {_mstep_lr_text(e)}), lap 0 = Gaussian prior ({e['gaussian_noise']} + rank {e['rank']}, "
        f"{_fit_text(e)} on {e['gaussian_size']} observations; lap-0 completions = its posterior "
        f"{e.get('lap0', 'sample')}{'' if e.get('lap0', 'sample') == 'mean' else ' draws'}), then MMPS E-steps "
        f"({e['steps']} Heun steps, {e['cg_iters']} CG iteration, σ_y = {e['sigma_y']:g}) on {e['estep_size']} "
        f"observations per lap ({_redraw_text(e)}); each M-step warm-starts from the previous lap with a fresh "
        "optimizer.", "",
        f"Scores: {v['num_samples']} samples (seeds 0..{v['num_samples'] - 1}, Heun 18 steps) against the first "
        f"{v['num_ref']} clean test images: FID, KID (mean ± sd over 100 subsets), pixel SWD. `compl. KID`: KID of "
        f"{v['num_samples']} of the lap's completions (what its M-step trained on); `hidden PSNR`: the completions "
        "against the clean images on the hidden pixels (dB, range [−1, 1]). `train min`: cumulative wall time "
        "(EM: E-steps + M-steps up to that lap); `E-step min`: that lap's E-step.", "",
        "| method | lap | kimg | FID ↓ | KID ×10³ ↓ | SWD ×10² ↓ | compl. KID ×10³ | hidden PSNR | train min | "
        "E-step min | sample min |",
        "|" + " --- |" * 11,
        *[_row(r) for r in rows], "",
        f"Figures: `docs/{m['figures']['curve']}` (KID per lap), `docs/{m['figures']['grid']}` (rows: clean data, "
        "observations, ambient, the last EM lap, clean-trained; seeds 0..11).", "",
    ]
    return "\n".join(lines)
