"""Old-folder upgrades: each rule fills in what an older version did not record, and leaves today's sections
(and its argument) as they are. The folders themselves are loaded in test_fixture_folders.py, test_cli.py
(loss weighting, learning-rate schedule), test_em.py (lap0) and test_mask_law.py (mask law)."""

import copy

from ambient.data.corruption import Corruption
from ambient.nets.registry import SamplingSpec
from ambient.store.upgrades import em_section, mask_law_notice, sampling_section, train_section


def test_train_section():
    assert train_section({}) == {}
    old = {"kimg": 1.0}
    assert train_section(old) == {"kimg": 1.0, "loss_weighting": "edm", "lr_schedule": "constant"} and \
        old == {"kimg": 1.0}
    assert train_section({"loss_weighting": None})["loss_weighting"] == "edm"
    today = {"loss_weighting": "tilted", "lr_schedule": "cosine"}
    assert train_section(today) == today


def test_em_section():
    data = {"fingerprint": "f", "shape": [1, 8, 8]}
    assert em_section({}, data) == {}
    old = {"rank": 1000}
    assert em_section(old, data) == {"rank": 64, "lap0": "sample", "gaussian_tol": None, "redraw": "random",
                                     "gaussian_tol_per": "value", "lr_schedule": "constant"} and old == {"rank": 1000}
    today = {"rank": 16, "lap0": "mean", "gaussian_tol": 1e-4, "gaussian_tol_per": "value", "redraw": "rotate",
             "lr_schedule": "cosine"}
    assert em_section(today, data) == today
    assert em_section({"rank": 1000, "lap0": "mean"}, {}) == {"rank": 1000, "lap0": "mean", "gaussian_tol": None,
                                                               "redraw": "random", "gaussian_tol_per": "value",
                                                               "lr_schedule": "constant"}


def test_em_section_gaussian_tol_per_image_becomes_per_observed_value():
    """2026-12-04: --gaussian-tol was nats per image, now nats per observed value; an old run's criterion is kept."""
    old = {"rank": 16, "lap0": "sample", "redraw": "rotate", "gaussian_tol": 2e-3}
    fm = {"shape": [1, 28, 28], "observed_share": 0.2}  # 156.8 observed values per image
    assert em_section(old, fm) == {**old, "gaussian_tol": 2e-3 / 156.8, "gaussian_tol_per": "value",
                                   "lr_schedule": "constant"}
    assert old["gaussian_tol"] == 2e-3 and "gaussian_tol_per" not in old
    assert em_section(old, {"shape": [1, 8, 8]})["gaussian_tol"] == 2e-3 / 64  # share not recorded: every pixel
    assert em_section({**old, "gaussian_tol": None}, fm)["gaussian_tol"] is None


def test_sampling_section_and_notice():
    today = SamplingSpec(Corruption("dust", 0.5, 0.1, True), 0.4).to_dict()
    assert sampling_section(today) is today
    for full_rgb, law in ((True, "pixel"), (False, "channel")):
        old = copy.deepcopy(today)
        del old["mask_law"]
        old["corruption"]["mask_full_rgb"] = full_rgb
        spec = SamplingSpec.from_dict(sampling_section(old))
        assert "mask_law" not in old and spec.mask_law == law and not spec.mask_law_recorded
        assert spec.corruption == Corruption.from_dict(old["corruption"])
        assert f"masks per {law}" in mask_law_notice(spec, 3, "RUN") and mask_law_notice(spec, 1, "RUN") is None
    assert mask_law_notice(SamplingSpec.from_dict(today), 3, "RUN") is None
