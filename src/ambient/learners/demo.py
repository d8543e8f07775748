"""`ambient demo`: a naive and an ambient model trained on the same corrupted images, side by side.

Both models are trained with the same backbone, budget and seed on the same observations y = A ⊙ x0 (each
training image only ever seen through its own fixed mask A): the naive one with plain EDM as if y were clean
(``objective="naive"``), the ambient one with the ambient objective and the train defaults (its loss weighting
included). Then each draws ``num_samples`` images from the same seeds, ``demo.png`` shows
observations | naive samples | ambient samples, and the KID (Inception features, ×10³, with its spread) of each
model's samples against held-out clean images is printed and written to ``demo.json``.

The outdir is a demo run (``demo.json`` records the kind) holding two train runs, ``naive/`` and ``ambient/``;
running the demo again into it resumes them (or, at their --kimg already, only samples and scores again).

Data: Fashion-MNIST (KID against the test split). Where it is not installed (and no --data is given), the demo
says so in one line and uses scikit-learn's bundled 8×8 digits upscaled to 28×28, training on the first
1497 and scoring against the last 300 (held out). Any other --data has no held-out clean set: KID is skipped
with a notice. Without the Inception weights KID is skipped with a one-line notice, never an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ambient.data.datasets import load_dataset, load_images
from ambient.data.images import float_to_uint8, save_png
from ambient.data.readers import fashion_mnist_dir
from ambient.errors import AmbientInputError
from ambient.folders import DEMO_RUN, TRAIN_RUN, claim_outdir, folder_kind, stamped
from ambient.io import atomic_write_text
from ambient.learners.runlog import OutdirLock
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid
from ambient.metrics.inception import HOW_TO_GET, find_inception_weights, load_inception
from ambient.metrics.plots import labelled_panels
from ambient.sampling.generate import sample_model
from ambient.store.models import load_model

DEFAULT_DATA = "builtin:fashion-mnist"
FALLBACK_DATA, FALLBACK_RESOLUTION = "builtin:digits", 28
DIGITS_TRAIN = 1497  # builtin:digits has 1797 images and no splits: the last 300 are held out for KID
FASHION_TRAIN = ("builtin:fashion-mnist", "builtin:fashion-mnist:train")
FASHION_TEST = "builtin:fashion-mnist:test"
MODELS = ("naive", "ambient")
MAX_SAMPLES = 50_000
MAX_REF = 10_000
PANEL = 64  # images per panel of demo.png (8 × 8)


@dataclass
class DemoConfig:
    """What ``ambient demo`` runs (its flags)."""

    outdir: str = "runs/demo"
    data: str = DEFAULT_DATA
    data_dir: str | None = None
    corruption_probability: float = 0.8
    delta_probability: float = 0.1
    kimg: float = 12.0
    arch: str = "small"
    seed: int = 0
    num_samples: int = 100
    num_ref: int = 250

    def validate(self) -> DemoConfig:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or not 2 <= self.num_samples <= MAX_SAMPLES:
            raise AmbientInputError(f"--num-samples: must be an integer in [2, {MAX_SAMPLES}], "
                                    f"got {self.num_samples!r}")
        if isinstance(self.num_ref, bool) or not isinstance(self.num_ref, int) or not 0 <= self.num_ref <= MAX_REF:
            raise AmbientInputError(f"--num-ref: must be an integer in [0, {MAX_REF}] (0: no KID), "
                                    f"got {self.num_ref!r}")
        return self


@dataclass
class DemoResult:
    figure: Path
    kid: dict[str, tuple[float, float]]  # model -> (KID, spread); empty where KID was skipped
    num_ref: int
    seconds: float


def demo_data(data: str, data_dir: str | None) -> tuple[str, int | None, str | None]:
    """(data, resolution, notice): the default Fashion-MNIST if it can be found, else the fallback."""
    if data != DEFAULT_DATA:
        return data, None, None
    try:
        fashion_mnist_dir("train", data_dir)
        return data, None, None
    except AmbientInputError:
        return FALLBACK_DATA, FALLBACK_RESOLUTION, (
            "notice: Fashion-MNIST not found (apt-get install dataset-fashion-mnist, or --data-dir); this demo "
            "uses scikit-learn's 8x8 digits (builtin:digits, 1797 images) upscaled to 28x28 instead")


def held_out(data: str) -> tuple[int | None, str | None]:
    """(max_size for training, the clean held-out reference spec) of ``data``; (None, None): no held-out set."""
    if data in FASHION_TRAIN:
        return None, FASHION_TEST
    if data == FALLBACK_DATA:
        return DIGITS_TRAIN, FALLBACK_DATA
    return None, None


def train_configs(cfg: DemoConfig, data: str, resolution: int | None) -> dict[str, TrainConfig]:
    """The two runs, identical but for the objective (the ambient one keeps the train default weighting)."""
    max_size, _ = held_out(data)
    kimg = cfg.kimg
    base = TrainConfig(data=data, data_dir=cfg.data_dir, resolution=resolution, max_size=max_size,
                       corruption_probability=cfg.corruption_probability, delta_probability=cfg.delta_probability,
                       arch=cfg.arch, batch=32, lr=2e-3, lr_warmup_kimg=1.0, kimg=kimg,
                       ema=max(kimg / 16, 0.1), snapshot_kimg=kimg, tick_kimg=max(kimg / 50, 0.05), grid_samples=0,
                       seed=cfg.seed)  # a bad --kimg is named by TrainConfig.validate before --ema or --tick-kimg
    out = Path(cfg.outdir)
    return {m: replace(base, objective=m, outdir=str(out / m)) for m in MODELS}


def _claim(outdir: Path) -> None:
    """A new or empty folder, a demo run, or a demo interrupted before it recorded its kind (only a naive/
    train run in it); anything else is refused in one line before anything is written."""
    entries = [e for e in outdir.iterdir() if not e.name.startswith(".")] if outdir.is_dir() else []
    if entries and {e.name for e in entries} <= {"naive"} and folder_kind(outdir / "naive") in (None, TRAIN_RUN):
        return
    claim_outdir(outdir, DEMO_RUN, command="ambient demo")


def _inception(num_ref: int, log):
    """The Inception network for KID, or None with a one-line notice (weights not installed)."""
    if num_ref == 0:
        return None
    try:
        return load_inception(find_inception_weights(download=False))
    except AmbientInputError:
        log(f"notice: Inception weights not found, KID skipped ({HOW_TO_GET.split(', or')[0]})")
        return None


def _reference(data: str, data_dir: str | None, resolution: int | None, num_ref: int) -> torch.Tensor:
    max_size, spec = held_out(data)
    if spec == FASHION_TEST:
        return load_images(spec, data_dir=data_dir, max_size=num_ref)
    images = load_images(spec, data_dir=data_dir, resolution=resolution)
    return images[max_size:max_size + num_ref]


def _observations(tc: TrainConfig, n: int) -> torch.Tensor:
    """The first ``n`` training images as both models saw them, y = A ⊙ x0 in [-1, 1] (hidden pixels grey)."""
    data = load_dataset(tc.data, data_dir=tc.data_dir, max_size=min(n, tc.max_size or n), resolution=tc.resolution,
                        corruption=replace(tc, mask_full_rgb=False).corruption, seed=tc.seed)
    return data.batch(torch.arange(len(data)))[0]


def write_demo_json(outdir: Path, cfg: DemoConfig, data: str, result: dict | None) -> None:
    atomic_write_text(outdir / "demo.json", json.dumps(stamped({"demo": asdict(cfg), "data": data,
                                                                "result": result}, DEMO_RUN), indent=2) + "\n")


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print, echo=print) -> DemoResult:
    """Train both models (or resume them), sample, score and draw; ``log``: notices and progress lines,
    ``echo``: the results (the KID lines and where the figure went)."""
    started = time.perf_counter()
    cfg.validate()
    data, resolution, notice = demo_data(cfg.data, cfg.data_dir)
    if notice:
        log(notice)
    runs = train_configs(cfg, data, resolution)
    for tc in runs.values():
        tc.validate()
    outdir = Path(cfg.outdir)
    _claim(outdir)
    for tc in runs.values():
        claim_outdir(tc.outdir, TRAIN_RUN, command="ambient demo")
    _, ref_spec = held_out(data)
    if ref_spec is None and cfg.num_ref:
        log(f"notice: --data {data} has no held-out clean images, KID skipped (the demo scores builtin:fashion-mnist "
            "and builtin:digits)")
    net = _inception(cfg.num_ref, log) if ref_spec is not None else None
    num_samples = cfg.num_samples if net is not None else min(cfg.num_samples, PANEL)

    with OutdirLock() as lock:
        for i, name in enumerate(MODELS):
            what = "plain EDM on the corrupted images as if they were clean" if name == "naive" else \
                "the ambient objective"
            log(f"demo: training the {name} model ({what}) into {runs[name].outdir}")
            train(runs[name], progress=progress, log=log)
            if i == 0:  # every input check has passed: the folder records its kind from now on
                lock.acquire(outdir)
                if folder_kind(outdir) != DEMO_RUN:
                    write_demo_json(outdir, cfg, data, None)
        samples = {}
        for name in MODELS:
            log(f"demo: sampling {num_samples} images from the {name} model")
            samples[name] = float_to_uint8(sample_model(load_model(runs[name].outdir), list(range(num_samples)),
                                                        batch=100, num_steps=18, progress=progress))
        kid: dict[str, tuple[float, float]] = {}
        ref = None
        if net is not None:
            ref = _reference(data, cfg.data_dir, resolution, cfg.num_ref)
            log(f"demo: KID against {len(ref)} held-out clean images ({ref_spec})")
            feature_id = f"inception-{net.sha256}"
            ref_feats = cached_features(ref, net, feature_id, 64, progress=progress, desc="reference features")
            for name in MODELS:
                feats = cached_features(samples[name], net, feature_id, 64, progress=progress, cache=False,
                                        desc=f"{name} features")
                kid[name] = compute_kid(feats, ref_feats, num_subsets=100, max_subset_size=1000, seed=cfg.seed)

        p = cfg.corruption_probability
        observed = _observations(runs["ambient"], PANEL)
        n_obs = observed.shape[0]
        score = {m: (f"KID x1e3 {1e3 * kid[m][0]:.1f} +- {1e3 * kid[m][1]:.1f}" if m in kid else "") for m in MODELS}
        panels = [
            ([f"observations: {n_obs} training images", f"({round(100 * p)}% of pixels hidden, grey)"], observed),
            (["naive: plain EDM on the observations", score["naive"]], samples["naive"][:PANEL]),
            (["ambient: the ambient objective", score["ambient"]], samples["ambient"][:PANEL]),
        ]
        figure = save_png(outdir / "demo.png", labelled_panels(panels, nrow=8))
        seconds = time.perf_counter() - started
        result = {"num_samples": num_samples, "num_ref": 0 if ref is None else len(ref), "reference": ref_spec,
                  "kid": {m: {"kid": v[0], "kid_std": v[1]} for m, v in kid.items()}, "seconds": seconds}
        write_demo_json(outdir, cfg, data, result)
    if kid:
        echo(f"KID x10^3 against {len(ref)} held-out clean images ({ref_spec}), {num_samples} samples per model, "
             "lower is better:")
        for name in MODELS:
            echo(f"  {name:8s} {1e3 * kid[name][0]:7.1f} +- {1e3 * kid[name][1]:.1f}")
    echo(f"wrote {figure} (observations | naive samples | ambient samples) in {seconds:.0f} s")
    return DemoResult(figure, kid, 0 if ref is None else len(ref), seconds)
