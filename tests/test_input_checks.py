"""Every input is checked before the first write (issue 22, items 2, 5 and 6): devices, labels, --init,
masks, non-finite weights, numeric ranges, bounded seed and class lists, and messages that say what
is wrong. Refusals: exit 2, one line starting "error:" that names the flag or file, nothing written."""

import hashlib
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient.cli import main
from ambient.data.corruption import Corruption
from ambient.learners.em import EMConfig, EMRun
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.store.snapshots import save_snapshot
from tests.helpers_cli import FIXTURES, run
from tests.helpers_data import blobs, write_npz

TRAIN = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008", "--kimg", "0.008",
         "--grid-samples", "0", "--no-progress"]


def refused(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return True


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def observations(path, n=16, masks=None):
    rng = np.random.default_rng(3)
    masks = (rng.random((n, 8, 8)) < 0.5).astype(np.uint8) if masks is None else masks
    np.savez(path, images=blobs(n, 8, 1, seed=5), masks=masks)
    return path


def tiny_model(path: Path, *, corruption=Corruption("dust", 0.5, 0.1), imported=False, nan=False) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", resolution=8)
    weights = build_denoiser(cfg).state_dict()
    if nan:
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name] = torch.full_like(weights[name], float("nan"))
    config = {"model": cfg.to_dict(), "sampling": SamplingSpec(corruption).to_dict()}
    if imported:
        config["imported"] = {"source": "x.pkl", "sha256": "0", "format": "ambient"}
    return save_snapshot(path, config=config, model=weights)


def reference_pickle(path: Path, *, label_dim=0, nan=False, corruption=0.5) -> Path:
    """A network in the reference's training-loop format (pickled by torch), as in test_importer."""
    from ambient.nets.songunet import SongUNet, SongUNetConfig

    torch.manual_seed(0)
    net = SongUNet(SongUNetConfig(img_resolution=8, in_channels=2, out_channels=2, label_dim=label_dim,
                                  model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                                  dropout=0.0))
    sd = OrderedDict(("_orig_mod.model." + k, v.clone()) for k, v in net.state_dict().items())
    if nan:
        sd["_orig_mod.model.map_layer0.weight"][0, 0] = float("nan")
    kwargs = {"resolution": 8, "use_labels": bool(label_dim)}
    if corruption:
        kwargs.update(corruption_probability=corruption, delta_probability=0.1)
    path.write_bytes(pickle.dumps({"ema": sd, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": kwargs}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    plain = tiny_model(root / "plain")
    with pytest.raises(SystemExit) as exc:
        main(["import", "--pkl", str(reference_pickle(root / "cond.pkl", label_dim=3)), "--out", str(root / "cond")])
    assert exc.value.code == 0
    return {"plain": plain, "cond": root / "cond", "root": root}


# ----------------------------------------------------------------------------- devices
DEVICE_CASES = ["cuda", "bogus", "meta"]


def _device_argv(command, tmp_path, models):
    data = str(write_npz(tmp_path / "d.npz"))
    obs = str(observations(tmp_path / "obs.npz"))
    out = tmp_path / "out"
    argv = {
        "train": ["train", "--data", data, "--outdir", str(out), "--corruption-probability", "0.5", *TRAIN],
        "em": ["em", "--data", obs, "--outdir", str(out), "--no-progress"],
        "sample": ["sample", "--model", str(models["plain"]), "--num", "1", "--out", str(out)],
        "restore": ["restore", "--model", str(models["plain"]), "--data", obs, "--out", str(out) + ".npz",
                    "--method", "ambient-mean"],
        "finetune": ["finetune", "--pretrained", str(tmp_path / "pretrained"), "--data", data,
                     "--outdir", str(out), "--steps", "1"],
    }[command]
    return argv, out


@pytest.mark.parametrize("command", ["train", "em", "sample", "restore", "finetune"])
@pytest.mark.parametrize("device", DEVICE_CASES)
def test_a_device_this_torch_cannot_use_is_one_line(command, device, tmp_path, capsys, models):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv, out = _device_argv(command, tmp_path, models)
    code, _, err = run([*argv, "--device", device], capsys)
    assert refused(code, err, f"--device {device}" if device != "bogus" else "--device 'bogus'")
    assert not out.exists() and not Path(str(out) + ".npz").exists()


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("labels", ["some", "all"])
def test_negative_labels_are_refused_before_anything_is_written(labels, tmp_path, capsys):
    y = np.arange(16) % 3 if labels == "some" else np.full(16, -1)
    y[:4] = -1
    np.savez(tmp_path / "d.npz", images=blobs(16, 8, 1), labels=y)
    out = tmp_path / "out"
    code, _, err = run(["train", "--data", str(tmp_path / "d.npz"), "--outdir", str(out), "--cond",
                        "--arch", "ddpmpp-cifar", "--kimg", "0.008", "--no-progress", "--device", "cpu"], capsys)
    assert refused(code, err, "--cond", "negative labels", "every image" if labels == "all" else "4 of 16")
    assert not out.exists()


# ----------------------------------------------------------------------------- em --init
def test_em_init_with_a_conditional_model_is_refused_before_em_config(tmp_path, capsys, models):
    obs = observations(tmp_path / "obs.npz")
    out = tmp_path / "em"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), "--init", str(models["cond"]),
                        "--device", "cpu", "--no-progress"], capsys)
    assert refused(code, err, f"--init {models['cond']}", "class-conditional")
    assert not out.exists()


def test_em_init_of_a_model_imported_without_corruption_hints_at_reimporting(tmp_path, capsys):
    obs = observations(tmp_path / "obs.npz")
    model = tiny_model(tmp_path / "imp", corruption=Corruption(), imported=True)
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "em"), "--init", str(model),
                        "--device", "cpu", "--no-progress"], capsys)
    assert refused(code, err, "--init", "--corruption-probability")
    code, _, err = run(["restore", "--model", str(model), "--data", str(obs), "--out", str(tmp_path / "r.npz"),
                        "--method", "ambient-mean", "--device", "cpu"], capsys)
    assert refused(code, err, "--method ambient-mean", "import again", "--corruption-probability")


# ----------------------------------------------------------------------------- masks
def test_all_zero_masks_are_refused_naming_the_data(tmp_path, capsys):
    obs = observations(tmp_path / "zero.npz", masks=np.zeros((16, 8, 8), np.uint8))
    for argv in (["train", *TRAIN, "--device", "cpu"], ["em", "--device", "cpu", "--no-progress"]):
        out = tmp_path / argv[0]
        code, _, err = run([*argv, "--data", str(obs), "--outdir", str(out)], capsys)
        assert refused(code, err, f"--data {obs}", "all zero")
        assert not out.exists()


def test_all_one_masks_give_a_one_line_notice(tmp_path, capsys):
    obs = observations(tmp_path / "ones.npz", masks=np.ones((16, 8, 8), np.uint8))
    code, _, err = run(["train", *TRAIN, "--device", "cpu", "--data", str(obs), "--outdir", str(tmp_path / "r")],
                       capsys)
    assert code == 0, err
    notices = [line for line in err.splitlines() if "nothing is hidden" in line]
    assert len(notices) == 1 and notices[0].startswith("notice: --data")


# ----------------------------------------------------------------------------- non-finite weights
def test_non_finite_weights_are_refused_at_import(tmp_path, capsys):
    pkl = reference_pickle(tmp_path / "nan.pkl", nan=True)
    code, _, err = run(["import", "--pkl", str(pkl), "--out", str(tmp_path / "m")], capsys)
    assert refused(code, err, f"--pkl {pkl}", "non-finite", "map_layer0.weight")
    assert not (tmp_path / "m").exists()


def test_non_finite_weights_are_refused_at_load(tmp_path, capsys):
    model = tiny_model(tmp_path / "nan", nan=True)
    code, _, err = run(["sample", "--model", str(model), "--num", "1", "--out", str(tmp_path / "s.npz")], capsys)
    assert refused(code, err, "non-finite")
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------- numeric ranges
def test_em_records_the_rank_it_uses(tmp_path):
    obs = observations(tmp_path / "obs.npz")
    messages = []
    em = EMRun(EMConfig(data=str(obs), outdir=str(tmp_path / "em"), rank=1000, device="cpu"), log=messages.append)
    assert em.cfg.rank == 64  # 8×8 pixels, one channel: the value recorded in em_config.json
    assert any("--rank 1000" in m and "64" in m for m in messages)
    assert not (tmp_path / "em").exists()


# ----------------------------------------------------------------------------- seeds and classes
@pytest.mark.parametrize("args,words", [
    (["--seeds", "0-999999999"], ["--seeds", "more than"]),
    (["--seeds", str(2**64)], ["--seeds", "0.."]),
    (["--seeds", "0,5-3"], ["--seeds '5-3'", "ends before"]),
    (["--seed", str(2**64), "--num", "1"], ["--seed"]),
    (["--seed", str(2**63 - 1), "--num", "2"], ["--seed", "0.."]),
    (["--seed", "-1", "--num", "1"], ["--seed -1"]),
    (["--num", str(10**9)], ["--num-images"]),
])
def test_seed_lists_are_bounded_before_they_are_built(args, words, tmp_path, capsys, models):
    code, _, err = run(["sample", "--model", str(models["plain"]), *args, "--out", str(tmp_path / "s.npz")], capsys)
    assert refused(code, err, *words)
    assert len(err) < 300 and not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("args,words", [
    (["--classes", "0-99999"], ["--classes '0-99999'", "0..2"]),
    (["--classes", "x"], ["--classes 'x'", "not a class"]),
    (["--classes", "2-1"], ["--classes '2-1'"]),
    (["--class", "7"], ["--class", "0..2"]),
])
def test_class_errors_name_the_flag_and_the_range_as_given(args, words, tmp_path, capsys, models):
    code, _, err = run(["sample", "--model", str(models["cond"]), "--num", "1", *args,
                        "--out", str(tmp_path / "s.npz")], capsys)
    assert refused(code, err, *words)
    assert len(err) < 300 and "seed" not in err


@pytest.mark.parametrize("args", [["--classes", "all"], ["--classes", "0"], ["--class", "0"]])
def test_classes_on_an_unconditional_model_are_refused(args, tmp_path, capsys, models):
    code, _, err = run(["sample", "--model", str(models["plain"]), "--num", "1", *args,
                        "--out", str(tmp_path / "s.npz")], capsys)
    assert refused(code, err, args[0], "not class-conditional")


def test_sample_out_that_is_an_existing_file_says_so(tmp_path, capsys, models):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, _, err = run(["sample", "--model", str(models["plain"]), "--num", "1", "--out", str(target)], capsys)
    assert refused(code, err, f"--out {target}", "existing file")
    assert target.read_text() == "mine"


# ----------------------------------------------------------------------------- import options
@pytest.mark.skipif(not (FIXTURES / "ambient-format.pkl").is_file(), reason="reference checkpoint fixtures missing")
@pytest.mark.parametrize("key,value", [("label_dim", 10), ("img_channels", 1)])
def test_contradictory_training_options_are_refused(key, value, tmp_path, capsys):
    options = json.loads((FIXTURES / "training_options.json").read_text())
    options[key] = value
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    code, _, err = run(["import", "--pkl", str(FIXTURES / "ambient-format.pkl"), "--training-options", str(path),
                        "--out", str(tmp_path / "m")], capsys)
    assert refused(code, err, f"--training-options {path}", f"{key}={value}")
    assert not (tmp_path / "m").exists()


def test_non_finite_weights_of_a_finetuned_model_are_refused_at_load(tmp_path, capsys):
    from diffusers import UNet2DModel

    from ambient import folders
    from tests.test_finetune import save_npz, save_pipeline, tiny_unet

    pre = save_pipeline(tmp_path / "pre", tiny_unet())
    out = tmp_path / "ft"
    code, _, err = run(["finetune", "--pretrained", str(pre), "--data", save_npz(tmp_path / "d.npz"),
                        "--outdir", str(out), "--steps", "1", "--batch", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert folders.folder_kind(out) == folders.FINETUNE_RUN
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    with torch.no_grad():
        next(unet.parameters()).fill_(float("inf"))
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    capsys.readouterr()  # diffusers' own warnings while loading above
    code, _, err = run(["sample", "--model", str(out), "--num", "1", "--out", str(tmp_path / "s.npz")], capsys)
    assert refused(code, err, f"--model {out}", "non-finite")


def test_restore_out_that_is_the_data_file_is_refused(tmp_path, capsys, models):
    obs = observations(tmp_path / "obs.npz")
    before = obs.read_bytes()
    code, _, err = run(["restore", "--model", str(models["plain"]), "--data", str(obs), "--out", str(obs),
                        "--method", "ambient-mean", "--device", "cpu"], capsys)
    assert refused(code, err, f"--out {obs}", "--data file")
    assert obs.read_bytes() == before
