"""`ambient em` on tiny data: folder layout, stats, completions, resume, sampling, warm start, bad input."""

import json

import numpy as np
import pytest
import torch

import ambient.learners.em as em_module
from ambient.cli import main
from ambient.errors import AmbientInputError
from ambient.learners.train import train
from ambient.learners.train_config import TrainConfig
from ambient.store.models import load_model
from ambient.store.statedict import read_tensors
from tests.helpers_data import blobs

TINY = ["--laps", "2", "--lap-kimg", "0.032", "--estep-size", "12", "--rank", "3", "--gaussian-iters", "4",
        "--steps", "3", "--estep-batch", "5", "--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016",
        "--grid-samples", "0", "--device", "cpu", "--no-progress"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def observations(path, n=24, seed=3):
    rng = np.random.default_rng(seed)
    np.savez(path, images=blobs(n, 8, 1, seed=5), masks=(rng.random((n, 8, 8)) < 0.5).astype(np.uint8))
    return path


def ema_weights(lap_dir):
    snaps = sorted(lap_dir.glob("snapshot-*"))
    return read_tensors(snaps[-1] / "ema.safetensors", "cpu")[0]


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tensorboard" not in p.parts)


@pytest.fixture(scope="module")
def em_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("em")
    obs = observations(root / "obs.npz")
    with pytest.raises(SystemExit) as exc:
        main(["em", "--data", str(obs), "--outdir", str(root / "run"), *TINY])
    assert exc.value.code == 0
    return root, obs


def test_layout_stats_and_completions(em_run):
    root, obs = em_run
    run_dir = root / "run"
    for name in ("em_config.json", "gaussian.npz", "stats.jsonl", "model_pointer.json",
                 "completions/lap-00.npz", "completions/lap-01.npz", "lap-00/config.json", "lap-01/config.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "completions" / "lap-01.parts").exists()  # merged and removed
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in rows] == [0, 1]
    assert rows[0]["estep_forward"] == 0 and rows[0]["gaussian_rank"] == 3
    # lap 1: 12 observations in batches of 5 (3 batches), Heun with 3 steps = 5 calls per batch,
    # MMPS with 1 CG iteration = 1 forward + 2 VJPs per call
    assert rows[1]["estep_images"] == 12 and rows[1]["estep_forward"] == 3 * 5 and rows[1]["estep_vjp"] == 3 * 5
    for r in rows:
        assert r["mstep_loss"] > 0 and r["lap_seconds"] >= r["mstep_seconds"] > 0
    assert json.loads((run_dir / "model_pointer.json").read_text()) == {"model": "lap-01"}
    # completions are full images whose observed pixels are the observations, bit for bit
    with np.load(obs) as z:
        images, masks = z["images"], z["masks"].astype(bool)
    laps = []
    for lap, count in ((0, 24), (1, 12)):  # lap 0 (Gaussian) completes every observation, lap 1 --estep-size
        with np.load(run_dir / "completions" / f"lap-{lap:02d}.npz") as z:
            done, index = z["images"][..., 0], z["index"]
        assert done.shape == (count, 8, 8) and len(set(index.tolist())) == count
        assert np.array_equal(done[masks[index]], images[index][masks[index]])
        assert done[~masks[index]].std() > 0  # hidden pixels are filled, not constant
        laps.append((done, index))
    # lap 1's M-step trained on the pool: lap 1's fresh completions, lap 0's for the other observations
    with np.load(run_dir / "completions" / "pool-01.npz") as z:
        pool = z["images"][..., 0]
    fresh = np.zeros(24, bool)
    fresh[laps[1][1]] = True
    assert np.array_equal(pool[laps[1][1]], laps[1][0]) and np.array_equal(pool[~fresh], laps[0][0][~fresh])
    # the M-step trains a plain full-image model on the completions, warm-started from the previous lap
    cfg = json.loads((run_dir / "lap-01" / "config.json").read_text())
    assert cfg["train"]["objective"] == "naive" and cfg["train"]["init"].endswith("lap-00")
    assert cfg["train"]["data"].endswith("pool-01.npz") and cfg["data"]["num_images"] == 24
    assert cfg["model"]["mask_channels"] is False and cfg["data"]["has_data_masks"] is False


def test_sample_from_the_run_folder(em_run, capsys):
    root, _ = em_run
    loaded = load_model(root / "run")
    assert loaded.path.parent.name == "lap-01"
    code, _, err = run(["sample", "--model", str(root / "run"), "--num", "3", "--steps", "2",
                        "--out", str(root / "samples.npz")], capsys)
    assert code == 0, err
    with np.load(root / "samples.npz") as z:
        assert z["images"].shape[0] == 3


def test_resume_after_a_crash_ends_as_an_uninterrupted_run(em_run, tmp_path, monkeypatch, capsys):
    root, obs = em_run
    real = em_module.mmps_samples
    calls = {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(em_module, "mmps_samples", crash_on_second_batch)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["em", "--data", str(obs), "--outdir", str(out), *TINY])
    assert len(list((out / "completions" / "lap-01.parts").glob("part-*.npz"))) == 1  # one E-step batch kept
    assert json.loads((out / "model_pointer.json").read_text()) == {"model": "lap-00"}
    monkeypatch.setattr(em_module, "mmps_samples", real)
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY], capsys)
    assert code == 0, err
    for lap in ("lap-00", "lap-01"):
        a, b = ema_weights(root / "run" / lap), ema_weights(out / lap)
        assert all(torch.equal(a[k], b[k]) for k in a), lap
    with np.load(root / "run" / "completions" / "lap-01.npz") as za, np.load(out / "completions" / "lap-01.npz") as zb:
        assert np.array_equal(za["images"], zb["images"])
    # a finished run: running again changes nothing
    before = (out / "stats.jsonl").read_text()
    assert run(["em", "--data", str(obs), "--outdir", str(out), *TINY], capsys)[0] == 0
    assert (out / "stats.jsonl").read_text() == before


@pytest.mark.parametrize("case", ["laps0", "estep_size", "other_data", "other_rank", "not_em_folder", "no_masks"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(em_run, tmp_path, case, capsys):
    root, obs = em_run
    out, args = tmp_path / "new", list(TINY)
    if case == "laps0":
        args[args.index("--laps") + 1] = "0"
    elif case == "estep_size":
        args[args.index("--estep-size") + 1] = "25"
    elif case in ("other_data", "other_rank"):
        out = root / "run"
        if case == "other_data":
            obs = observations(tmp_path / "other.npz", seed=4)
        else:
            args[args.index("--rank") + 1] = "2"
    elif case == "no_masks":
        np.savez(tmp_path / "clean.npz", images=blobs(24, 8, 1, seed=5))
        obs = tmp_path / "clean.npz"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = files(out) if out.exists() else None
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    flag = {"laps0": "--laps", "estep_size": "--estep-size", "other_data": "--data", "other_rank": "--rank",
            "not_em_folder": "--outdir", "no_masks": "--data"}[case]
    assert flag in err
    assert (files(out) if out.exists() else None) == before


def test_warm_start_takes_the_ema_weights_and_refuses_another_network(em_run, tmp_path):
    root, _ = em_run
    data = str(root / "run" / "completions" / "lap-00.npz")
    base = dict(data=data, objective="naive", corruption_probability=0.0, batch=8, kimg=0.008, grid_samples=0,
                device="cpu", lr=1e-12, lr_warmup_kimg=0.0)
    train(TrainConfig(outdir=str(tmp_path / "warm"), arch="tiny", init=str(root / "run"), **base), progress=False)
    start, got = ema_weights(root / "run" / "lap-01"), ema_weights(tmp_path / "warm")
    assert all(torch.allclose(start[k], got[k], atol=1e-8) for k in start)
    train(TrainConfig(outdir=str(tmp_path / "cold"), arch="tiny", **base), progress=False)
    cold = ema_weights(tmp_path / "cold")
    assert not all(torch.allclose(start[k], cold[k], atol=1e-3) for k in start)
    with pytest.raises(AmbientInputError, match="--init .*differs"):
        train(TrainConfig(outdir=str(tmp_path / "other"), arch="small", init=str(root / "run"), **base),
              progress=False)
    assert not (tmp_path / "other").exists()  # a refused run writes nothing, not even its folder


def test_init_from_an_ambient_model_changes_only_the_hidden_pixels_of_lap_0(em_run, tmp_path, capsys):
    root, obs = em_run
    code, _, err = run(["train", "--data", str(obs), "--outdir", str(tmp_path / "amb"), "--arch", "tiny",
                        "--batch", "8", "--kimg", "0.016", "--snapshot-kimg", "0.016", "--grid-samples", "0",
                        "--delta-probability", "0.2", "--no-progress"], capsys)
    assert code == 0, err
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "run"), *args,
                        "--init", str(tmp_path / "amb")], capsys)
    assert code == 0, err
    with np.load(obs) as z:
        masks = z["masks"].astype(bool)
    with np.load(root / "run" / "completions" / "lap-00.npz") as za, \
            np.load(tmp_path / "run" / "completions" / "lap-00.npz") as zb:
        a, b, index = za["images"][..., 0], zb["images"][..., 0], za["index"]
    observed = masks[index]
    assert np.array_equal(a[observed], b[observed])
    assert np.abs(a[~observed].astype(int) - b[~observed].astype(int)).mean() > 1
    # a full-image model is not an ambient model: refused before anything is written
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "bad"), *args,
                        "--init", str(root / "run" / "lap-00")], capsys)
    assert code == 2 and "--init" in err and not (tmp_path / "bad").exists()


def test_without_the_pool_each_m_step_trains_on_its_own_completions(em_run, tmp_path, capsys):
    _, obs = em_run
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "run"), *args, "--no-pool"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "run" / "completions" / "lap-00.npz") as z:
        assert z["images"].shape[0] == 12
    cfg = json.loads((tmp_path / "run" / "lap-00" / "config.json").read_text())
    assert cfg["train"]["data"].endswith("lap-00.npz") and cfg["data"]["num_images"] == 12


def test_lap0_completions_are_the_gaussian_posterior_draws_or_its_mean(em_run, tmp_path, capsys):
    from ambient.data.images import to_hwc
    from ambient.learners.gaussian_prior import GaussianPrior
    from ambient.rng import EM_DRAW_STREAM, mix_seed

    root, obs = em_run
    from ambient.data.datasets import load_dataset

    y, mask = (t.double() for t in load_dataset(str(obs)).batch(torch.arange(24)))
    with np.load(root / "run" / "gaussian.npz") as z:
        prior = GaussianPrior.from_arrays(z)
    with np.load(root / "run" / "completions" / "lap-00.npz") as z:  # the default: exact posterior draws
        drawn, index = z["images"], z["index"]
    assert np.array_equal(index, np.arange(24))
    seeds = [mix_seed(EM_DRAW_STREAM, 0, 0, i) for i in range(24)]
    expect = to_hwc((mask * y + (1 - mask) * prior.sample_posterior(y, mask, seeds)).float())
    assert np.abs(drawn.astype(int) - expect.astype(int)).max() <= 1  # float rounding at the uint8 step
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "run"), *args, "--lap0", "mean"],
                       capsys)
    assert code == 0, err
    with np.load(tmp_path / "run" / "completions" / "lap-00.npz") as z:
        mean_done = z["images"]
    expect = to_hwc((mask * y + (1 - mask) * prior.posterior_mean(y, mask)).float())
    assert np.abs(mean_done.astype(int) - expect.astype(int)).max() <= 1
    hidden = ~mask[:, 0].bool().numpy()
    # draws scatter around the mean: same mean over many pixels, more spread
    gap = drawn[..., 0][hidden].astype(float) - mean_done[..., 0][hidden].astype(float)
    assert abs(gap.mean()) < 0.2 * gap.std() and gap.std() > 1
    # lap0 acts once: a run whose lap 0 is done resumes with either value, its completions unchanged
    saved = json.loads((tmp_path / "run" / "em_config.json").read_text())
    del saved["em"]["lap0"]  # an old folder (no lap0 recorded)
    (tmp_path / "run" / "em_config.json").write_text(json.dumps(saved))
    args[args.index("--laps") + 1] = "2"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(tmp_path / "run"), *args], capsys)
    assert code == 0, err
    with np.load(tmp_path / "run" / "completions" / "lap-00.npz") as z:
        assert np.array_equal(z["images"], mean_done)


def test_rotating_redraws_cover_every_observation_before_any_repeats():
    from ambient.learners.em import rotating_subset

    n, size = 10, 4
    laps = [rotating_subset(n, size, lap, 7, 0) for lap in range(1, 6)]
    assert all(len(x) == size and torch.equal(x, x.sort().values) for x in laps)
    assert len(set(torch.cat(laps[:2]).tolist())) == 8  # laps 1-2: no observation twice
    assert set(torch.cat(laps[:3]).tolist()) == set(range(n))  # by lap ceil(10/4) = 3 every one was redrawn
    assert torch.equal(rotating_subset(n, None, 3, 7, 0), torch.arange(n))
    assert torch.equal(laps[0], rotating_subset(n, size, 1, 7, 0))  # a pure function of its arguments
    assert not torch.equal(laps[0], rotating_subset(n, size, 1, 8, 0))


def test_pool_ages_are_recorded_and_bounded_by_the_rotation(em_run, tmp_path, capsys):
    root, obs = em_run
    rows = [json.loads(line) for line in (root / "run" / "stats.jsonl").read_text().splitlines()]
    assert "pool_age_max" not in rows[0] or rows[0]["pool_age_max"] == 0
    # 24 observations, 12 redrawn per lap: after lap 1 half are 1 lap old (lap 0's), half fresh
    assert rows[1]["pool_age_counts"] == {"0": 12, "1": 12} and rows[1]["pool_age_max"] == 1
    cfg = json.loads((root / "run" / "em_config.json").read_text())["em"]
    assert cfg["redraw"] == "rotate"
    # an old run (no redraw recorded) keeps redrawing a fresh random subset when resumed without the flag
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    out = tmp_path / "old"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *args], capsys)
    assert code == 0, err
    saved = json.loads((out / "em_config.json").read_text())
    del saved["em"]["redraw"]
    (out / "em_config.json").write_text(json.dumps(saved))
    args[args.index("--laps") + 1] = "2"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *args], capsys)
    assert code == 0, err
    assert json.loads((out / "em_config.json").read_text())["em"]["redraw"] == "random"
    from ambient.learners.em import subset
    from ambient.rng import EM_SUBSET_STREAM

    with np.load(out / "completions" / "lap-01.npz") as z:
        assert np.array_equal(z["index"], subset(24, 12, EM_SUBSET_STREAM, 0, 1).numpy())


def test_m_step_learning_rate_schedule_is_recorded_kept_on_resume_and_old_runs_stay_constant(em_run, tmp_path,
                                                                                             capsys):
    root, obs = em_run
    default = em_module.MSTEP_LR_SCHEDULE
    assert json.loads((root / "run" / "em_config.json").read_text())["em"]["lr_schedule"] == default
    for lap in ("lap-00", "lap-01"):
        assert json.loads((root / "run" / lap / "config.json").read_text())["train"]["lr_schedule"] == default
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    out = tmp_path / "cos"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *args, "--lr-schedule", "cosine",
                        "--lr-warmup-kimg", "0"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "lap-00" / "stats.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs and lrs[-1] < 0.2 * 1e-3  # decayed towards 0 by the lap's end
    # resumed without the flag: the run keeps cosine in its next lap; asking for another schedule is refused
    before = files(out)
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY, "--lr-schedule", "constant",
                        "--lr-warmup-kimg", "0"], capsys)
    assert code == 2 and "--lr-schedule" in err and err.count("\n") == 1, err
    assert files(out) == before
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY, "--lr-warmup-kimg", "0"], capsys)
    assert code == 0, err
    assert json.loads((out / "lap-01" / "config.json").read_text())["train"]["lr_schedule"] == "cosine"
    # a run from before the option (nothing recorded) resumes at a constant rate
    old = tmp_path / "old"
    assert run(["em", "--data", str(obs), "--outdir", str(old), *args, "--lr-schedule", "constant"], capsys)[0] == 0
    saved = json.loads((old / "em_config.json").read_text())
    del saved["em"]["lr_schedule"]
    (old / "em_config.json").write_text(json.dumps(saved))
    assert run(["em", "--data", str(obs), "--outdir", str(old), *TINY], capsys)[0] == 0
    assert json.loads((old / "em_config.json").read_text())["em"]["lr_schedule"] == "constant"
    assert json.loads((old / "lap-01" / "config.json").read_text())["train"]["lr_schedule"] == "constant"


def test_diverged_completions_of_uint8_data_are_counted_and_reported(em_run, tmp_path, monkeypatch, capsys):
    """A diverging E-step (a learned Jacobian at a tiny σ_y can blow values up) must not pass unseen: the values
    beyond ±2 in model units are counted in stats.jsonl and one notice names --sigma-y."""
    _, obs = em_run
    real = em_module.mmps_samples
    hidden_values = []

    def diverging(*args, **kwargs):
        images, calls = real(*args, **kwargs)
        mask = args[2]
        hidden_values.append(int((mask == 0).sum()))
        return mask * images + (1 - mask) * 10.0, calls  # every hidden value far beyond the range

    monkeypatch.setattr(em_module, "mmps_samples", diverging)
    out = tmp_path / "run"
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert rows[1]["estep_clipped"] == sum(hidden_values) > 0
    with np.load(out / "completions" / "lap-01.npz") as z:
        assert int((z["images"] == 255).sum()) >= sum(hidden_values)  # stored clipped to the uint8 range
    notices = [line for line in err.splitlines() if line.startswith("notice:") and "diverged" in line]
    assert len(notices) == 1 and "--sigma-y" in notices[0] and "lap 1" in notices[0]


def test_sigma_y_default_for_masks_and_a_resumed_run_keeps_its_own(em_run, tmp_path, capsys):
    root, obs = em_run
    assert json.loads((root / "run" / "em_config.json").read_text())["em"]["sigma_y"] == em_module.MASK_SIGMA_Y
    args = list(TINY)
    args[args.index("--laps") + 1] = "1"
    out = tmp_path / "old"
    assert run(["em", "--data", str(obs), "--outdir", str(out), *args, "--sigma-y", "0.001"], capsys)[0] == 0
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY], capsys)  # no flag: its own
    assert code == 0, err
    assert json.loads((out / "em_config.json").read_text())["em"]["sigma_y"] == 0.001
    before = files(out)
    code, _, err = run(["em", "--data", str(obs), "--outdir", str(out), *TINY, "--sigma-y", "0.1"], capsys)
    assert code == 2 and "--sigma-y" in err and err.count("\n") == 1, err
    assert files(out) == before
