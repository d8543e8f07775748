"""Docs of benchmarks/validate.py: the results table (markdown between markers), the JSON rows, the figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ambient.data.images import make_grid, save_png
from ambient.io import atomic_write_text

HEADER = "# Validation on Fashion-MNIST: ambient vs naive vs clean training\n"


def write_figure(path: Path, rows: list[tuple[str, torch.Tensor]], scale: int = 2, label_width: int = 130) -> Path:
    """One labelled row per (label, uint8 images (n, C, H, W)), tiles upscaled ``scale``× (nearest)."""
    strips = [make_grid(images, nrow=images.shape[0], padding=1) for _, images in rows]
    width = max(s.shape[1] for s in strips) * scale
    gap = 4
    height = sum(s.shape[0] * scale + gap for s in strips) + gap
    canvas = Image.new("RGB", (label_width + width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    top = gap
    for (label, _), strip in zip(rows, strips):
        img = Image.fromarray(strip[..., 0] if strip.shape[2] == 1 else strip).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        canvas.paste(img, (label_width, top))
        draw.text((6, top + img.height // 2 - 6), label, fill=(0, 0, 0), font=font)
        top += img.height + gap
    return save_png(path, np.asarray(canvas))


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _minutes(seconds: float | None) -> str:
    return "—" if not seconds else f"{seconds / 60:.1f}"


def _table(rows: list[dict], sampler: bool, dated: bool = False) -> list[str]:
    """Markdown rows; ``dated`` adds the columns a section mixing runs needs (loss weighting, date measured)."""
    head = "| method | p | δ |" + (" masks | steps |" if sampler else "") + \
        (" weighting | measured |" if dated else "") + \
        " FID ↓ | KID ×10³ ↓ | SWD ×10² ↓ | memorised > 0.95 | memorised > 0.99 | kimg | train min | sample min |"
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        kid = f"{1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f}"
        out.append(f"| {r['method']} | {r['p']:g} | {r['delta']:g} |"
                   + (f" {r['num_masks']} | {r['steps']} |" if sampler else "")
                   + (f" {_weighting_cell(r)} | {r.get('measured') or '—'} |" if dated else "")
                   + f" {r['fid']:.1f} | {kid} | {100 * r['swd']:.2f} | {r['memorized_share']:.3f} |"
                   f" {_fmt(r.get('memorized_share_strict'), '.3f')} |"
                   f" {_fmt(r['kimg'], 'g')} | {_minutes(r['train_s'])} | {_minutes(r['sample_s'])} |")
    return out


def markers(mode: str) -> tuple[str, str]:
    """The comment lines around one configuration's section of results.md (one section per mode)."""
    return (f"<!-- validate:{mode}:start (written by benchmarks/validate.py; edit outside the markers) -->",
            f"<!-- validate:{mode}:end -->")


def figure_name(mode: str) -> str:
    """docs/fashion_mnist.png belongs to the full configuration; other modes get their own file."""
    return "fashion_mnist.png" if mode == "full" else f"fashion_mnist_{mode}.png"


def results_section(rows: list[dict], meta: dict) -> str:
    order = {"real-test": 0, "clean": 1, "naive": 2, "ambient": 3}
    main = sorted((r for r in rows if r["table"] in ("reference", "main")),
                  key=lambda r: (order.get(r["method"], 4), r["method"], r["p"]))
    ablation = [r for r in rows if r["table"] == "ablation"]
    dated = len({r.get("measured") for r in rows if r["table"] != "reference"}) > 1
    m = meta
    start, end = markers(m["mode"])
    lines = [
        start,
        f"## Results: {m['mode']} configuration", "",
        *([] if m.get("complete", True) else [
            "**Partial:** written while the run was still going; models missing from the table had not "
            "finished. Rerun the command to finish (every stage resumes).", ""]),
        f"Command: `{m['command']}` ({m['date']}, {m['machine']}, {m['torch_threads']} torch threads; "
        f"this invocation took {m['wall_s'] / 60:.1f} min, stages reused from earlier invocations not counted).", "",
        f"Setup: `{m['arch']}` backbone, 28×28, batch {m['batch']}, lr {m['lr']:g}, {m['kimg']:g} kimg per model, "
        f"seed {m['seed']}, dust corruption (per pixel), ambient δ = {m['delta']:g}. Samples: seeds "
        f"0..{m['num_samples'] - 1}, Heun 18 steps (35 network calls), one fixed mask per sample for ambient "
        f"models (survival (1 − p)(1 − δ)). FID and KID: Inception-v3 (2015-12-05) pool features of "
        f"{m['num_samples']} samples against the first {m['num_ref']} clean test images; KID is the mean over "
        "100 subsets ± their standard deviation. At this N, FID is biased upwards (compare with the "
        "`real-test` row); KID is unbiased. SWD: sliced Wasserstein-2 distance in pixel space ([−1, 1], 256 "
        f"projections) against the same reference. Memorised share: samples whose nearest of the 60 000 clean "
        f"training images has pixel correlation (cosine of mean-centred pixels) > {m['threshold']:g}, and "
        f"> {m.get('strict_threshold', 0.99):g} (near-exact copies); pixel features because Inception runs at "
        "~6 img/s here. `real-test` = held-out test images (not in the "
        "reference): the floor of each metric at this N, and the share of fresh real images that already "
        "look 'memorised' by this criterion.", "",
        f"`train min` / `sample min`: wall time as measured with {m['torch_threads']} torch threads "
        "(other jobs on the machine at the same time slow these down).", "",
        *(["Rows of models not rerun by this invocation (`--methods`) are kept from the earlier run of this "
           "configuration, with the date they were measured (`measured`) and the ambient loss weighting they "
           "were trained with (`weighting`); every row is scored against the same reference images."]
          + [""] if dated else []),
        *_table(main, sampler=False, dated=dated), "",
    ]
    if ablation:
        lines += [f"Sampler ablation (ambient, p = 0.8; {m['ablation_samples']} samples per setting, so FID is "
                  "not comparable with the main table; compare rows with each other):", "",
                  *_table(ablation, sampler=True, dated=dated), ""]
    lines += [f"Figure: `docs/{figure_name(m['mode'])}` (rows: clean data; per p: the corrupted training images "
              "exactly as the models saw them (hidden pixels = 0, grey), naive samples, ambient samples; "
              "last row: samples of the clean-trained model; seeds 0..11"
              + ("; only models sampled by this invocation have a row" if dated else "") + ").", "", end]
    return "\n".join(lines)


MEASURED_TABLES = ("reference", "main", "ablation")  # rows a run of one mode replaces; others (e.g. "variant") stay


def merge_rows(old: list[dict], new: list[dict], mode: str) -> list[dict]:
    """results.json after a run of ``mode``: its measured rows replace that mode's, other rows are kept."""
    kept = [r for r in old if not (r.get("mode") == mode and r.get("table") in MEASURED_TABLES)]
    return kept + new


def row_key(r: dict) -> tuple:
    """One model's row: a model trained with another learning-rate schedule is another model."""
    return (r.get("table"), r.get("method"), r.get("p"), r.get("delta"), r.get("num_masks"), r.get("steps"),
            r.get("lr_schedule") or "constant")


def _weighting_cell(r: dict) -> str:
    cell = r.get("loss_weighting") or "—"
    schedule = r.get("lr_schedule")
    return cell + (f", {schedule} lr" if schedule and schedule != "constant" else "")


def kept_rows(old: list[dict], new: list[dict], mode: str, old_date: str | None) -> list[dict]:
    """Rows of ``mode``'s earlier run (main and ablation tables) that ``new`` does not measure again, each
    labelled with the date it was measured (``old_date``, that section's date, where the row has none)."""
    done = {row_key(r) for r in new}
    out = []
    for r in old:
        if r.get("mode") == mode and r.get("table") in ("main", "ablation") and row_key(r) not in done:
            r = {**r, "measured": r.get("measured") or old_date}
            if r.get("method") == "ambient" and not r.get("loss_weighting"):
                r["loss_weighting"] = weighting_before(r["measured"])
            out.append(r)
    return out


def weighting_before(measured: str | None) -> str:
    """The loss weighting of an ambient row that did not record one: validate.py trained with the paper's
    ``edm`` until --loss-weighting came (2026-12-01); rows from then until rows recorded it say so."""
    return "edm" if measured and measured < "2026-12-01" else "not recorded"


def section_date(text: str, mode: str) -> str | None:
    """The date (YYYY-MM-DD) in the Command line of ``mode``'s section of results.md, None if there is none."""
    start, end = markers(mode)
    found = re.search(re.escape(start) + r".*?Command: `[^`]*` \((\d{4}-\d{2}-\d{2})", text, re.S)
    return found.group(1) if found and end in text[found.end():] else None


def read_rows(path: Path) -> list[dict]:
    """The rows of an existing results.json ([] if there is none); a one-line SystemExit if it is unusable."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: expected a list of rows, got {type(rows).__name__}")
    return rows


def write_docs(docs: Path, rows: list[dict], meta: dict) -> None:
    """Update docs/results.json (rows of every mode run so far) and this mode's section of results.md.

    Both files are written atomically. A section is replaced in place; a mode run for the first time
    gets its section appended at the end. With ``meta["keep_others"]`` (validate.py --methods), the
    earlier rows of models this run does not measure stay, dated."""
    docs.mkdir(parents=True, exist_ok=True)
    keys = ("method", "p", "delta", "fid", "kid", "kid_std", "swd", "memorized_share", "memorized_share_strict",
            "max_similarity_mean", "loss_normalize", "loss_weighting", "lr_schedule", "measured",
            "kimg", "table", "num_masks", "steps", "num_samples", "num_ref", "train_s", "sample_s", "arch", "mode")
    path_json = docs / "results.json"
    path = docs / "results.md"
    old = read_rows(path_json)
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    today = meta["date"][:10]
    new = [{k: r.get(k) for k in keys} | {"measured": r.get("measured") or today} for r in rows]
    if meta.get("keep_others"):
        earlier = kept_rows(old, new, meta["mode"], section_date(text, meta["mode"]))
        new += [{k: r.get(k) for k in keys} for r in earlier]
    atomic_write_text(path_json, json.dumps(merge_rows(old, new, meta["mode"]), indent=1) + "\n")
    body = results_section(new, meta)
    start, end = markers(meta["mode"])
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    atomic_write_text(path, text)
