"""KID and pixel SWD of a validate.py model at each of its snapshots: is it still improving, or flat?

    python benchmarks/validate_curve.py --out-dir runs/validate/medium --models ambient-p0.8-d0.1 clean-p0

Samples seeds 0..N−1 (Heun, 18 steps, one mask) from every ``snapshot-*`` folder of each model and scores
them against the first ``--num-ref`` clean test images, as validate.py does. Prints one JSON line per
snapshot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ambient.data.datasets import load_images
from ambient.data.images import float_to_uint8
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid
from ambient.metrics.inception import load_inception
from ambient.metrics.swd import sliced_wasserstein
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="runs/validate/medium")
    ap.add_argument("--models", nargs="+", default=["ambient-p0.8-d0.1", "clean-p0"])
    ap.add_argument("--num-samples", type=int, default=125)
    ap.add_argument("--num-ref", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = load_inception()
    fid_id = f"inception-{net.sha256}"
    ref = load_images("builtin:fashion-mnist:test", max_size=args.num_ref)
    ref_feats = cached_features(ref, net, fid_id, 64, progress=False)
    for key in args.models:
        for snap in sorted(Path(args.out_dir, key).glob("snapshot-*")):
            loaded = load_model(snap)
            u8 = float_to_uint8(sample_model(loaded, list(range(args.num_samples)), batch=args.num_samples))
            feats = cached_features(u8, net, fid_id, 64, progress=False)
            kid, kid_std = compute_kid(feats, ref_feats, 100, min(len(feats), len(ref_feats)), seed=0)
            swd = sliced_wasserstein(u8, ref, 256, generator=torch.Generator().manual_seed(0))
            kimg = int(snap.name.split("-")[-1]) * loaded.config["train"]["batch"] / 1000  # snapshot-<step>
            print(json.dumps({"model": key, "snapshot": snap.name, "kimg": kimg, "kid": kid, "kid_std": kid_std,
                              "swd": swd}), flush=True)


if __name__ == "__main__":
    main()
