"""Inception featurisation speed (images/s) at several batch sizes.

Random 32 x 32 RGB uint8 images go through the full FID path (quantise, resize to 299,
Inception-v3 pool features). Prints a table and writes JSON.

    python benchmarks/bench_inception.py [--batch-sizes 8,16,32,64] [--num-images 64]
        [--device cpu] [--out benchmarks/results/bench_inception.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from ambient.io import atomic_write_json
from ambient.metrics.inception import load_inception


def bench(batch_sizes: list[int], num_images: int, device: str, inception: str | None) -> dict:
    net = load_inception(inception, device=device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(num_images, max(batch_sizes)), 3, 32, 32), generator=gen,
                           dtype=torch.uint8)
    net(images[:2])  # warm-up: TorchScript optimises on the first calls
    rows = []
    for b in batch_sizes:
        for _ in range(2):  # warm-up at this shape: the TorchScript executor re-specialises per shape
            net(images[:b])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while done < num_images:
            net(images[:b])
            done += b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"batch": b, "images": done, "seconds": seconds, "images_per_s": done / seconds})
        print(f"{b:>6}  {done:>7}  {seconds:>8.2f}  {done / seconds:>8.2f}", flush=True)
    return {
        "benchmark": "inception_featurisation",
        "input": "random uint8 RGB 32x32, resized to 299x299",
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "inception_sha256": net.sha256,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--num-images", type=int, default=64, help="images timed per batch size (rounded up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inception", default=None, help="weights file (default: usual lookup)")
    parser.add_argument("--out", default="benchmarks/results/bench_inception.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.num_images < 1:
        parser.error("--batch-sizes and --num-images must be positive")
    print(f"{'batch':>6}  {'images':>7}  {'seconds':>8}  {'img/s':>8}")
    result = bench(sizes, args.num_images, args.device, args.inception)
    atomic_write_json(Path(args.out), result, sort_keys=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
