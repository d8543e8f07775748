"""Does ambient finetuning of a pretrained model copy its few finetuning images less than vanilla?

Stand-in for a foundation model: a small diffusers ``UNet2DModel`` (DDPM, ε-prediction, 1000
linear-β timesteps) pretrained here on clean Fashion-MNIST classes 0–4. It is then finetuned on
at most 300 training images of classes 5–9 in three arms:

* ``vanilla``: clean images, no masks (``mask_mode=input``, p = δ = 0);
* ``ambient``: dust corruption p = 0.8, δ = 0.1, mask channels, ``hidden_x0=direct``;
* ``ambient-formula``: the same with ``hidden_x0=formula`` (the ε formula at hidden pixels too).

Reported per arm (and for the pretrained model itself): FID/KID of samples against held-out
test images of classes 5–9 (Inception features; with ``--quick`` only for vanilla and ambient,
as Inception costs ~0.5 s per image on 2 shared cores), the share of samples whose nearest finetuning
image has cosine similarity > 0.95 (Inception and pixel features) with its histogram, and for
the two ambient arms the x0 error at hidden and visible pixels on held-out clean images.

    python benchmarks/finetune_memorization.py --quick     # ~5-15 min on 2 CPU cores (100 images)
    python benchmarks/finetune_memorization.py --threads 1  # full size (~80 min)
    python benchmarks/finetune_memorization.py --threads 1 --extend-to 3600   # + vanilla/ambient trained 3× longer

Finished stages are reused (pretraining, finished finetuning runs; ``--extend-to`` resumes copies of the
vanilla and ambient runs). To extend both arms on two cores at once, run the two `ambient finetune`
commands this script prints with ``--extend-to`` first, in parallel; the script then only evaluates.

Writes docs/finetune.json, the results section of docs/finetune.md and docs/finetune_*.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient.data.corruption import Corruption
from ambient.data.datasets import load_dataset
from ambient.data.images import save_grid, save_png
from ambient.distributed import resolve_device
from ambient.io import atomic_write_json, atomic_write_text
from ambient.learners.finetune import finetune
from ambient.learners.finetune_config import FinetuneConfig
from ambient.metrics.features import cached_features
from ambient.metrics.fid import compute_kid, fid_from_features
from ambient.metrics.inception import load_inception
from ambient.metrics.neighbors import leave_one_out_max_similarity, nearest_neighbors, pixel_features
from ambient.metrics.plots import pairs_panel, similarity_histogram
from ambient.nets.ddpm_denoiser import FinetunedDenoiser
from ambient.nets.pretrained import MaskedUNet, load_pretrained
from ambient.nets.schedules import alphas_cumprod
from ambient.sampling.fixed_mask import sample_in_batches
from ambient.store.finetune_export import load_finetuned

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # quick: Inception costs ~0.5 s per image on 2 shared CPU cores, so FID only for two models.
    "quick": dict(pretrain_steps=300, pretrain_batch=32, pretrain_lr=1e-3, finetune_steps=60, lr=5e-4, ema=0.9,
                  batch=16, num_train=100, num_samples=50, num_ref=100, sample_steps=12, num_eval=100,
                  fid_models=["vanilla", "ambient"]),
    # full: ~80 min with --threads 1 on this 2-core CPU (55 train img/s, 140 forward img/s, ~5 Inception img/s).
    # 100 finetuning images x 384 epochs: enough for the vanilla arm to start copying them.
    "full": dict(pretrain_steps=2500, pretrain_batch=32, pretrain_lr=5e-4, finetune_steps=1200, lr=3e-4,
                 ema=0.995, batch=32, num_train=100, num_samples=500, num_ref=1000, sample_steps=18,
                 num_eval=500, fid_models=["pretrained", "vanilla", "ambient", "ambient-formula"]),
}
ARMS = {
    "vanilla": dict(corruption_probability=0.0, delta_probability=0.0, mask_mode="input"),
    "ambient": dict(corruption_probability=0.8, delta_probability=0.1, mask_mode="channels", hidden_x0="direct"),
    "ambient-formula": dict(corruption_probability=0.8, delta_probability=0.1, mask_mode="channels",
                            hidden_x0="formula"),
}
THRESHOLD = 0.95


def pretrain(folder: Path, images: torch.Tensor, size: dict, seed: int, device: torch.device) -> float:
    """DDPM ε-loss training of the stand-in foundation model; saved as a diffusers pipeline folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    if (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return 0.0  # reused: delete the folder to pretrain again
    t0 = time.time()
    torch.manual_seed(seed)  # parameter init only
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    ab = alphas_cumprod(sched).float()
    opt = torch.optim.AdamW(unet.parameters(), lr=size["pretrain_lr"])
    g = torch.Generator().manual_seed(seed)
    for step in range(size["pretrain_steps"]):
        x0 = images[torch.randint(0, images.shape[0], (size["pretrain_batch"],), generator=g)].to(device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(device)
        a = ab[t].reshape(-1, 1, 1, 1).to(device)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.to(device)).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"pretrain {step}/{size['pretrain_steps']} loss {loss.item():.4f}", flush=True)
    unet.cpu().save_pretrained(str(folder / "unet"), safe_serialization=True)
    sched.save_pretrained(str(folder / "scheduler"))
    return time.time() - t0


def pretrained_denoiser(folder: Path) -> FinetunedDenoiser:
    pre = load_pretrained(folder)
    net = MaskedUNet(pre.unet, 1, "input")
    return FinetunedDenoiser(net, alphas_cumprod(pre.scheduler), pre.prediction_type).eval().requires_grad_(False)


def sample(den: FinetunedDenoiser, corruption: Corruption | None, size: dict) -> torch.Tensor:
    """Heun samples on the model's own σ range (EDM spacing; timesteps interpolated), clamped x0."""
    sig = den.timestep_sigmas
    n = size["num_samples"]
    return sample_in_batches(den, n, list(range(n)), 100, image_shape=(1, 28, 28), corruption=corruption,
                             num_steps=size["sample_steps"], sigma_min=float(sig[0]), sigma_max=float(sig[-1]),
                             clip="static")


def hidden_pixel_errors(den: FinetunedDenoiser, clean: torch.Tensor, corruption: Corruption) -> dict:
    """Mean squared x0 error (clamped to [-1, 1]) at hidden / visible pixels of Ã, on clean held-out
    images, per timestep."""
    g = torch.Generator().manual_seed(123)
    mask = corruption.further(corruption.mask(clean.shape, g), g).to(clean.device)
    out = {}
    for t in (10, 100, 300, 600, 900):
        sigma = float(den.timestep_sigmas[t])
        x = clean + sigma * torch.randn(clean.shape, generator=g).to(clean.device)
        with torch.no_grad():
            x0 = den(mask * x, sigma, mask)
        err = (x0.clamp(-1, 1) - clean) ** 2  # clamped as the sampler does (clip="static")
        out[str(t)] = {"sigma": sigma, "hidden_mse": float(err[mask == 0].mean()),
                       "visible_mse": float(err[mask == 1].mean())}
    return out


def evaluate(name: str, samples: torch.Tensor, feats: dict, inception, train_u8: torch.Tensor, docs: Path,
             with_inception: bool) -> dict:
    """FID/KID (if ``with_inception``) and nearest-training-image similarities of ``samples``; also the
    share of samples closer to their nearest finetuning image than to their nearest held-out image of
    the same classes (as many as finetuning images): about 0.5 for a model that does not copy."""
    result = {"num_samples": int(samples.shape[0]), "fid": None, "kid": None, "kid_std": None,
              "memorized_share_inception": None, "max_similarity_mean_inception": None,
              "closer_to_train_share_inception": None}
    spaces = [("pixels", pixel_features(samples), pixel_features(train_u8), feats["loo_px"], feats["heldout_px"])]
    if with_inception:
        f = cached_features(samples, inception, feats["id"], 64, False, True)
        kid, kid_std = compute_kid(f, feats["ref"], num_subsets=50, max_subset_size=min(len(f), 1000))
        result.update(fid=fid_from_features(f, feats["ref"]), kid=kid, kid_std=kid_std)
        spaces.insert(0, ("inception", f, feats["train"], feats["loo"], feats["heldout"]))
    for i, (space, sf, tf, loo, hf) in enumerate(spaces):
        sims, idx = nearest_neighbors(sf, tf, k=1)
        best = sims[:, 0]
        held = nearest_neighbors(sf, hf, k=1)[0][:, 0]
        result[f"memorized_share_{space}"] = float((best > THRESHOLD).mean())
        result[f"max_similarity_mean_{space}"] = float(best.mean())
        result[f"max_similarity_mean_heldout_{space}"] = float(held.mean())
        result[f"closer_to_train_share_{space}"] = float((best > held).mean())
        if i == 0:
            result["histogram_space"] = space
            save_png(docs / f"finetune_hist_{name}.png", similarity_histogram(best, loo, THRESHOLD))
        if space == "pixels":  # the copy test that separates the arms most clearly here
            save_png(docs / f"finetune_hist_{name}_pixels.png", similarity_histogram(best, loo, THRESHOLD))
            top = np.argsort(-best, kind="stable")[:6]
            save_png(docs / f"finetune_pairs_{name}.png", pairs_panel(samples, train_u8, top, idx, sims, tile=56))
    save_grid(docs / f"finetune_samples_{name}.png", samples[:64], nrow=8)
    return result


def _fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(scale * value, spec)


def write_markdown(path: Path, report: dict) -> None:
    rows = ["| model | finetuning steps | FID ↓ | KID ×1e3 ↓ | memorised share (Inception > 0.95) | "
            "memorised share (pixels > 0.95) | mean nearest similarity (Inception): finetuning set / held-out | "
            "closer to finetuning set than to held-out (Inception / pixels) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["results"].items():
        kid = "n/a" if r["kid"] is None else f"{_fmt(r['kid'], '.1f', 1e3)} ± {_fmt(r['kid_std'], '.1f', 1e3)}"
        rows.append(f"| {name} | {r.get('finetune_steps', 0)} | {_fmt(r['fid'], '.1f')} | {kid} | "
                    f"{_fmt(r['memorized_share_inception'])} | {_fmt(r['memorized_share_pixels'])} | "
                    f"{_fmt(r['max_similarity_mean_inception'])} / "
                    f"{_fmt(r.get('max_similarity_mean_heldout_inception'))} | "
                    f"{_fmt(r.get('closer_to_train_share_inception'))} / "
                    f"{_fmt(r.get('closer_to_train_share_pixels'))} |")
    loo = report["train_loo_share"]
    hid = ["| timestep | σ | direct: hidden MSE | formula: hidden MSE | direct: visible MSE | formula: visible MSE |",
           "| --- | --- | --- | --- | --- | --- |"]
    d, f = report["hidden_x0"]["ambient"], report["hidden_x0"]["ambient-formula"]
    for t in d:
        hid.append(f"| {t} | {d[t]['sigma']:.3g} | {d[t]['hidden_mse']:.4f} | {f[t]['hidden_mse']:.4f} | "
                   f"{d[t]['visible_mse']:.4f} | {f[t]['visible_mse']:.4f} |")
    s = report["sizes"]
    body = "\n".join([
        "<!-- results:start (written by benchmarks/finetune_memorization.py) -->",
        f"## Results ({report['mode']} run)", "",
        f"Command: `{report['command']}` — wall time {report['wall_time_s'] / 60:.1f} min on "
        f"{report['device']} with {report['threads']} CPU threads ({report['date']})"
        + (", pretraining reused from an earlier run of the same command." if not report["timings"]["pretrain_s"]
           else "."), "",
        f"Stand-in for a foundation model: a {report['parameters'] / 1e6:.1f}M-parameter `UNet2DModel` "
        "(DDPM ε-prediction, 1000 "
        f"timesteps) pretrained here for {s['pretrain_steps']} steps (batch {s['pretrain_batch']}) on clean "
        "Fashion-MNIST classes 0–4. "
        f"Finetuned for {s['finetune_steps']} steps (batch {s['batch']}, lr {s['lr']}, EMA {s['ema']}) on "
        f"{report['num_train']} training images of classes 5–9. FID/KID: {s['num_samples']} samples against "
        f"{report['num_ref']} held-out test images of classes 5–9. Ambient samples use fixed dust masks "
        "of survival (1 − 0.8)(1 − 0.1) (the training law of Ã).", "",
        *rows, "",
        f"The finetuning set's own leave-one-out share above {THRESHOLD} is "
        f"{loo['inception']:.3f} (Inception) and {loo['pixels']:.3f} (pixels): a model that only "
        "reproduces the data distribution scores about that. Pixel similarity is the cosine of the "
        "mean-centred flattened images. Held-out: the "
        f"{report['num_train']} test images of classes 5–9 after the reference ones; 'closer to the finetuning "
        "set' is the share of samples whose nearest finetuning image is more similar than their nearest "
        "held-out image: about 0.5 when samples are no closer to the training images than to fresh ones "
        "of the same classes, towards 1 when they copy.", "",
        "Histograms (Inception similarity where computed, else pixels; with the training set's "
        "leave-one-out similarities): `docs/finetune_hist_<model>.png`, in pixels "
        "`docs/finetune_hist_<model>_pixels.png`; the six samples most similar to a finetuning image (pixels), "
        "each beside that image: `docs/finetune_pairs_<model>.png`; samples: "
        "`docs/finetune_samples_<model>.png`. Wall time above: this invocation only; finished "
        "stages (pretraining, finetuning runs, Inception features) are reused.", "",
        "x0 error on held-out clean images under Ã (p = 0.8, δ = 0.1), `--hidden-x0 direct` vs `formula`:", "",
        *hid, "", "<!-- results:end -->"])
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Finetuning pretrained models\n"
    pattern = re.compile(r"<!-- results:start.*?<!-- results:end -->", re.S)
    text = pattern.sub(lambda _m: body, old) if pattern.search(old) else old.rstrip() + "\n\n" + body + "\n"
    atomic_write_text(path, text)


def arm_config(arm: str, pre_dir: Path, work: Path, size: dict, seed: int, device, steps: int,
               outdir: Path) -> FinetuneConfig:
    return FinetuneConfig(pretrained=str(pre_dir), data=str(work / "finetune_data.npz"), outdir=str(outdir),
                          steps=steps, batch=size["batch"], lr=size["lr"], ema=size["ema"], seed=seed, log_every=50,
                          snapshot_every=size["finetune_steps"], device=str(device), resume=True, **ARMS[arm])


def cli_command(cfg: FinetuneConfig) -> str:
    """The `ambient finetune` command line that runs (or resumes) ``cfg``."""
    skip = {"resume", "device"}
    parts = ["ambient", "finetune"]
    for key, value in cfg.to_dict().items():
        if key not in skip and value is not None and value is not False:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~10 min on 2 CPU cores)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "finetune_memorization"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    ap.add_argument("--extend-to", type=int, default=None,
                    help="also continue the vanilla and ambient runs to this many steps and evaluate them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    work, docs = Path(args.workdir) / mode, Path(args.docs)
    work.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)

    train = load_dataset("builtin:fashion-mnist")
    test = load_dataset("builtin:fashion-mnist:test")
    to_float = lambda u8: u8.float() / 127.5 - 1.0  # noqa: E731
    pre_images = to_float(train.images[train.labels < 5])
    ft_u8 = train.images[train.labels >= 5][: size["num_train"]]
    ref_u8 = test.images[test.labels >= 5][: size["num_ref"]]
    heldout_u8 = test.images[test.labels >= 5][size["num_ref"]: size["num_ref"] + size["num_train"]]
    np.savez(work / "finetune_data.npz", images=ft_u8[:, 0].numpy(), labels=train.labels[train.labels >= 5]
             [: size["num_train"]].numpy())
    device = resolve_device(args.device)
    pre_dir = work / f"pretrained-{size['pretrain_steps']}-s{args.seed}"
    pretrain_s = pretrain(pre_dir, pre_images, size, args.seed, device)

    inception = load_inception(device=device)
    fid_id = f"inception-{inception.sha256}"
    train_feats = cached_features(ft_u8, inception, fid_id, 64, False, True)
    feats = {"id": fid_id, "ref": cached_features(ref_u8, inception, fid_id, 64, False, True),
             "train": train_feats, "loo": leave_one_out_max_similarity(train_feats)[0],
             "loo_px": leave_one_out_max_similarity(pixel_features(ft_u8))[0],
             "heldout": cached_features(heldout_u8, inception, fid_id, 64, False, True),
             "heldout_px": pixel_features(heldout_u8)}
    results, hidden, timings = {}, {}, {"pretrain_s": pretrain_s}
    den = pretrained_denoiser(pre_dir).to(device)
    parameters = sum(p.numel() for p in den.parameters())
    results["pretrained (classes 0-4)"] = evaluate("pretrained", sample(den, None, size), feats, inception,
                                                   ft_u8, docs, "pretrained" in size["fid_models"])
    runs = [(arm, arm, size["finetune_steps"]) for arm in ARMS]
    if args.extend_to:
        if args.extend_to <= size["finetune_steps"]:
            ap.error(f"--extend-to must exceed the {size['finetune_steps']} finetuning steps of this mode")
        runs += [(f"{arm}-{args.extend_to}", arm, args.extend_to) for arm in ("vanilla", "ambient")]
    for name, arm, steps in runs:
        t0 = time.time()
        outdir = work / (arm if steps == size["finetune_steps"] else f"{arm}-to{steps}")
        cfg = arm_config(arm, pre_dir, work, size, args.seed, device, steps, outdir)
        if outdir.name != arm and not outdir.exists():  # continue a copy of the finished shorter run
            shutil.copytree(work / arm, outdir)
        print(f"[{name}] {cli_command(cfg)}", flush=True)
        finetune(cfg, log=lambda m, name=name: print(f"[{name}] {m}", flush=True))
        timings[f"finetune_{name}_s"] = time.time() - t0
        den = load_finetuned(outdir, device=device)
        corr = cfg.corruption() if cfg.corruption_probability > 0 else None
        results[name] = evaluate(name, sample(den, corr, size), feats, inception, ft_u8, docs,
                                 arm in size["fid_models"])
        results[name]["finetune_steps"] = steps
        if corr is not None and name == arm:
            hidden[arm] = hidden_pixel_errors(den, to_float(ref_u8[: size["num_eval"]]).to(device), corr)
        print(name, json.dumps(results[name]), flush=True)
    report = {"mode": mode, "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
              "wall_time_s": time.time() - t_start, "threads": args.threads, "device": str(device),
              "date": time.strftime("%Y-%m-%d"), "sizes": size, "num_train": int(ft_u8.shape[0]),
              "num_ref": int(ref_u8.shape[0]), "threshold": THRESHOLD, "arms": ARMS, "results": results,
              "hidden_x0": hidden, "timings": timings, "parameters": parameters,
              "train_loo_share": {"inception": float((feats["loo"] > THRESHOLD).mean()),
                                  "pixels": float((feats["loo_px"] > THRESHOLD).mean())}}
    atomic_write_json(docs / "finetune.json", report)
    write_markdown(docs / "finetune.md", report)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
