"""Bit-identity check for refactors: the same tiny runs with two checkouts give the same bytes.

Runs, through the command line only (so that any two versions of the package can be compared), the
configurations docs/refactor.md lists: five ``ambient train`` runs (ambient with the default weighting;
naive; fixed Ã with flips; naive with flips; sum-normalised loss with dropout), one ``ambient em`` lap,
two ``ambient finetune`` runs (mask channels with flips and gradient accumulation; input masking
without clipping or EMA), a ``sample`` of every model (with mask-agreement guidance for one) and a
``restore``. Prints a SHA-256 per run of its final EMA weights and of its samples, and writes them as
JSON. Compare two checkouts:

    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/base/src python benchmarks/refactor_check.py --out old.json
    OMP_NUM_THREADS=1 python benchmarks/refactor_check.py --out new.json --compare old.json

One thread, one machine: bit identity is only promised between runs on the same CPU and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

TRAIN = ["--arch", "tiny", "--batch", "8", "--kimg", "0.048", "--snapshot-kimg", "0.048", "--tick-kimg", "0.016",
         "--grid-samples", "0", "--device", "cpu", "--no-progress", "--seed", "3"]
TRAIN_CASES = {
    "train-ambient": ["--corruption-probability", "0.6", "--delta-probability", "0.2"],
    "train-naive": ["--corruption-probability", "0.6", "--objective", "naive"],
    "train-fixed-flips": ["--corruption-probability", "0.5", "--delta-probability", "0.2", "--fixed-further",
                          "--augment", "0.5"],
    "train-naive-flips": ["--corruption-probability", "0.5", "--objective", "naive", "--augment", "0.5"],
    "train-sum-dropout": ["--corruption-probability", "0.5", "--delta-probability", "0.2", "--loss-normalize",
                          "sum", "--dropout", "0.1"],
}
EM = ["--laps", "2", "--lap-kimg", "0.032", "--estep-size", "12", "--rank", "3", "--gaussian-iters", "4",
      "--steps", "3", "--estep-batch", "5", "--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.032",
      "--grid-samples", "0", "--device", "cpu", "--no-progress", "--seed", "2"]
FINETUNE = ["--corruption-probability", "0.5", "--delta-probability", "0.1", "--lr", "1e-3", "--log-every", "1",
            "--snapshot-every", "100", "--device", "cpu", "--steps", "3"]
FINETUNE_CASES = {
    "finetune-channels": ["--mask-mode", "channels", "--xflip", "0.5", "--grad-accum", "2", "--batch", "2"],
    "finetune-input": ["--mask-mode", "input", "--grad-clip", "0", "--ema", "0", "--batch", "4"],
}


def ambient(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "ambient", *argv], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def sha_of_safetensors(path: Path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()[:16]


def sha_of_npz(path: Path) -> str:
    with np.load(path) as z:
        return hashlib.sha256(b"".join(np.ascontiguousarray(z[k]).tobytes() for k in sorted(z.files))).hexdigest()[:16]


def latest_ema(folder: Path) -> Path:
    snaps = sorted(folder.rglob("ema.safetensors"))
    return snaps[-1] if snaps else folder / "unet" / "diffusion_pytorch_model.safetensors"


def write_data(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    n = 16
    images = np.full((n, 8, 8), 20, np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 5, 2)
        images[i, r:r + 3, c:c + 3] = rng.integers(150, 255)
    paths = {"train": root / "train.npz", "em": root / "em.npz"}
    np.savez(paths["train"], images=images)
    np.savez(paths["em"], images=images, masks=(rng.random((n, 8, 8)) < 0.5).astype(np.uint8))
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(str(root / "pre" / "unet"), safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(root / "pre" / "scheduler"))
    paths["pre"] = root / "pre"
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a JSON written by an earlier run: report the rows that differ")
    args = ap.parse_args()
    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root)
        runs = {}
        for name, extra in TRAIN_CASES.items():
            ambient("train", "--data", str(data["train"]), "--outdir", str(root / name), *TRAIN, *extra)
            runs[name] = root / name
        ambient("em", "--data", str(data["em"]), "--outdir", str(root / "em"), *EM)
        runs["em"] = root / "em"
        for name, extra in FINETUNE_CASES.items():
            ambient("finetune", "--pretrained", str(data["pre"]), "--data", str(data["train"]), "--outdir",
                    str(root / name), *FINETUNE, *extra)
            runs[name] = root / name
        for name, folder in runs.items():
            result[f"{name} weights"] = sha_of_safetensors(latest_ema(folder))
            out = root / f"{name}-samples.npz"
            ambient("sample", "--model", str(folder), "--seeds", "0-5", "--steps", "5", "--out", str(out),
                    "--device", "cpu")
            result[f"{name} samples"] = sha_of_npz(out)
        out = root / "guided.npz"
        ambient("sample", "--model", str(runs["train-ambient"]), "--seeds", "0-3", "--steps", "4", "--num-masks", "2",
                "--guidance-scale", "1", "--out", str(out), "--device", "cpu")
        result["train-ambient guided samples"] = sha_of_npz(out)
        out = root / "restored.npz"
        ambient("restore", "--model", str(runs["em"]), "--data", str(data["em"]), "--out", str(out), "--steps", "4",
                "--device", "cpu")
        result["em restore"] = sha_of_npz(out)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    old = json.loads(Path(args.compare).read_text()) if args.compare else {}
    print(f"| run | sha256 | {'same as ' + args.compare if old else ''} |\n| --- | --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value} | {('yes' if old.get(key) == value else 'NO') if old else ''} |")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


if __name__ == "__main__":
    main()
