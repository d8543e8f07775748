"""The config base: every command config round-trips through JSON, refuses unknown keys in one line, and
reports a bad value as ``--flag-name: what is wrong`` naming the value."""

import json

import pytest

from ambient.configbase import ConfigBase, flag_error, is_int
from ambient.errors import AmbientInputError
from ambient.learners.em import EMConfig
from ambient.learners.finetune_config import FinetuneConfig
from ambient.learners.train_config import TrainConfig
from ambient.sampling.restore import RestoreConfig

CONFIGS = {
    "training": TrainConfig(),
    "em": EMConfig(),
    "finetune": FinetuneConfig(pretrained="p", data="d", outdir="o"),
    "restore": RestoreConfig(),
}


@pytest.mark.parametrize("what", sorted(CONFIGS))
def test_round_trip_and_unknown_keys(what):
    cfg = CONFIGS[what]
    assert isinstance(cfg, ConfigBase)
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(AmbientInputError) as exc:
        type(cfg).from_dict({**cfg.to_dict(), "colour": 1, "blue": 2})
    assert str(exc.value) == f"{what} config has unknown keys: blue, colour"


@pytest.mark.parametrize("make,message", [
    (lambda: TrainConfig(batch=0).validate(), "--batch: must be positive, got 0"),
    (lambda: TrainConfig(arch_kwargs="{").validate(), "--arch-kwargs: only for the DDPM++ archs"),
    (lambda: EMConfig(laps=0).validate(), "--laps: must be an integer >= 1, got 0"),
    (lambda: EMConfig(lap0="x").validate(), "--lap0: must be one of mean, sample, got 'x'"),
    (lambda: FinetuneConfig(pretrained="p", data="d", outdir="o", snr_gamma=0.0).validate(),
     "--snr-gamma: must be > 0, got 0.0"),
    (lambda: FinetuneConfig(pretrained="p", data="d", outdir="o", log_every=0).validate(),
     "--log-every: must be an integer >= 1, got 0"),
    (lambda: RestoreConfig(cg_iters=0), "--cg-iters: must be an integer >= 1, got 0"),
    (lambda: RestoreConfig(sigma_y=-0.5), "--sigma-y: must be >= 0, got -0.5"),
])
def test_one_error_format(make, message):
    with pytest.raises(AmbientInputError) as exc:
        make()
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_helpers():
    assert str(flag_error("num_per_image", "bad")) == "--num-per-image: bad"
    assert str(flag_error("--dps-step", "bad")) == "--dps-step: bad"
    assert is_int(3, 1) and not is_int(0, 1) and not is_int(True, 0) and not is_int(2.0, 1)
