"""The training core shared by `ambient train` and `ambient finetune`: step guard, EMA, resume rules."""

from __future__ import annotations

import copy

import pytest
import torch

from ambient.errors import AmbientInputError, TrainingDiverged
from ambient.learners.core import (
    EpochOrder,
    NonFiniteGuard,
    check_resume_compatible,
    ema_beta,
    guarded_step,
    learning_rate,
    resume_source,
    update_ema,
)


def _net_and_grads(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).pow(2).sum().backward()
    return net, opt


def test_guarded_step_without_clipping_is_the_plain_step():
    net, opt = _net_and_grads()
    ref, ref_opt = copy.deepcopy(net), None
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for p, q in zip(ref.parameters(), net.parameters()):
        p.grad = q.grad.clone()
    ref_opt.step()
    guard = NonFiniteGuard(3)
    assert guarded_step(opt, list(net.parameters()), guard, loss=1.0, max_grad_norm=0.0, where="x", outdir="o")
    for p, q in zip(ref.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert (guard.skipped, guard.consecutive) == (0, 0)


def test_guarded_step_clips_to_the_norm():
    net, opt = _net_and_grads()
    before = [p.detach().clone() for p in net.parameters()]
    guarded_step(opt, list(net.parameters()), NonFiniteGuard(3), loss=1.0, max_grad_norm=0.5, where="x", outdir="o")
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
    assert float(step.norm()) == pytest.approx(0.1 * 0.5, rel=1e-5)  # lr × clipped norm


def test_non_finite_steps_are_skipped_counted_and_stop_the_run():
    net, opt = _net_and_grads()
    before = [p.detach().clone() for p in net.parameters()]
    guard = NonFiniteGuard(2)
    assert not guarded_step(opt, list(net.parameters()), guard, loss=float("nan"), max_grad_norm=1.0, where="x",
                            outdir="o")
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters())) and all(
        p.grad is None for p in net.parameters())
    assert (guard.skipped, guard.consecutive) == (1, 1)
    guard.record(True, where="x", outdir="o")
    assert (guard.skipped, guard.consecutive) == (1, 0)
    guard.record(False, where="x", outdir="o")
    with pytest.raises(TrainingDiverged, match="stopped at step 9: 2 consecutive .* kept in runs/a"):
        guard.record(False, where="step 9", outdir="runs/a")


def test_ema_update_and_halflife():
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    old = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, net, 0.75)
    for o, p, e in zip(old, net.parameters(), ema.parameters()):
        torch.testing.assert_close(e, 0.75 * o + 0.25 * p.detach())
    # EDM: after `halflife` images the old weights count half
    beta = ema_beta(0.5, 0.0, nimg=10**6, batch=50)
    assert beta ** (500 / 50) == pytest.approx(0.5)
    assert ema_beta(0.5, 0.05, nimg=2000, batch=50) == pytest.approx(0.5 ** (50 / 100))  # ramp-up: 0.05 × 2000


def test_learning_rate_schedules():
    total, batch = 100_000, 128
    # warm-up: linear in the images seen after the step, the same for both schedules
    for schedule in ("constant", "cosine"):
        assert learning_rate(1e-3, 1.0, schedule, 0, batch, total) == pytest.approx(1e-3 * 128 / 1000, rel=1e-3)
        assert learning_rate(1e-3, 0.0, schedule, 0, batch, total) == pytest.approx(1e-3)
    assert [learning_rate(1e-3, 1.0, "constant", n, batch, total) for n in (1000, 50_000, total)] == [1e-3] * 3
    cos = [learning_rate(1e-3, 0.0, "cosine", n, batch, total) for n in range(0, total + 1, 1000)]
    assert cos[0] == pytest.approx(1e-3) and cos[50] == pytest.approx(5e-4) and cos[-1] == pytest.approx(0.0, abs=1e-12)
    assert cos[25] == pytest.approx(1e-3 * (1 + 2**-0.5) / 2)
    assert all(a > b for a, b in zip(cos, cos[1:]))  # strictly decreasing to 0 at the end of the run
    assert learning_rate(1e-3, 0.0, "cosine", 2 * total, batch, total) == 0.0  # past --kimg: stays at 0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(1e-3, 0.0, "linear", 0, batch, total)


def test_epoch_order_is_shared_by_both_loops():
    order = EpochOrder(7, seed=5)
    idx = order.indices(0, 21)
    assert all(sorted(idx[e * 7:(e + 1) * 7].tolist()) == list(range(7)) for e in range(3))
    assert torch.equal(EpochOrder(7, seed=5).indices(5, 10), idx[5:15])


def test_resume_rules(tmp_path):
    from ambient.store.snapshots import save_snapshot

    out = tmp_path / "run"
    assert resume_source(out, None) is None and resume_source(out, "none") is None
    with pytest.raises(AmbientInputError, match="^--resume: --outdir .*run holds no snapshot"):
        resume_source(out, "latest")
    for step in (1, 2):
        save_snapshot(out / f"snapshot-{step:06d}", config={}, model={"w": torch.zeros(1)})
    assert resume_source(out, None).name == resume_source(out, "latest").name == "snapshot-000002"
    assert resume_source(out, "none") is None
    assert resume_source(tmp_path, str(out / "snapshot-000001")).name == "snapshot-000001"
    assert resume_source(tmp_path, str(out)).name == "snapshot-000002"
    with pytest.raises(AmbientInputError, match="--resume .*empty: no snapshot"):
        (tmp_path / "empty").mkdir()
        resume_source(out, str(tmp_path / "empty"))

    saved = {"lr": 1e-3, "seed": 0, "kimg": 10}
    check_resume_compatible(saved, {"lr": 1e-3, "seed": 0, "kimg": 20, "new_flag": 1}, {"kimg"}, "run")
    with pytest.raises(AmbientInputError, match=r"^--seed is 1 but the run in run used 0; use the same value"):
        check_resume_compatible(saved, {"lr": 1e-3, "seed": 1, "kimg": 10}, {"kimg"}, "run")


def test_finetuning_skips_non_finite_steps_and_names_a_changed_flag_on_resume(tmp_path, monkeypatch):
    from ambient.learners.finetune import finetune
    from ambient.learners.finetune_config import FinetuneConfig
    from ambient.objectives.ddpm_loss import FinetuneLoss
    from ambient.store.snapshots import latest_snapshot, load_snapshot
    from tests.test_finetune import save_npz, save_pipeline, tiny_unet

    pre = save_pipeline(tmp_path / "pre", tiny_unet(), "epsilon")
    cfg = dict(pretrained=str(pre), data=str(save_npz(tmp_path / "d.npz")), outdir=str(tmp_path / "out"),
               corruption_probability=0.3, delta_probability=0.1, steps=4, batch=2, snapshot_every=2)
    real, calls = FinetuneLoss.__call__, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(FinetuneLoss, "__call__", flaky)
    finetune(FinetuneConfig(**cfg))
    snap = load_snapshot(latest_snapshot(tmp_path / "out"))
    assert (snap.extra_state["skipped"], snap.extra_state["consecutive_skipped"]) == (2, 0)
    assert all(torch.isfinite(v).all() for v in snap.model.values())
    monkeypatch.undo()
    with pytest.raises(AmbientInputError, match=r"^--seed is 1 but the run in .*snapshot-000004 used 0"):
        finetune(FinetuneConfig(**{**cfg, "seed": 1, "steps": 6}))
