"""ambient.rng: the stream constants are distinct, and mix_seed's values never change."""

import ambient.rng as rng
from ambient.rng import mix_seed


def streams() -> dict[str, int]:
    return {name: value for name, value in vars(rng).items() if name.endswith("_STREAM")}


def test_stream_constants_are_distinct():
    found = streams()
    assert len(found) >= 12
    assert len(set(found.values())) == len(found), found


def test_streams_live_only_in_rng():
    """No other module defines a *_STREAM of its own (they import the table)."""
    import ambient.data.corruption as corruption
    import ambient.learners.core as core
    import ambient.learners.em as em
    import ambient.learners.gaussian_prior as gaussian_prior
    import ambient.sampling.fixed_mask as fixed_mask

    for module in (corruption, core, em, gaussian_prior, fixed_mask):
        for name, value in vars(module).items():
            if name.endswith("_STREAM"):
                assert getattr(rng, name.lstrip("_"), None) == value, f"{module.__name__}.{name}"


def test_mix_seed_is_stable():
    assert mix_seed(1, 2) == mix_seed(1, 2)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert 0 <= mix_seed(2**70, -5) < 2**63
    # the values every written mask, sample and weight of a seed depends on
    assert [mix_seed(), mix_seed(0), mix_seed(1, 2), mix_seed(0x5EED, 7), mix_seed(2**70, -5)] == [
        2177342782468422677, 7960286522194355700, 327095433057816640, 1975666907288072740, 2932812156669663071]


def test_seed_noise_depends_only_on_the_seed():
    import pytest
    import torch

    from ambient.rng import NOISE_STREAM, SeedNoise

    noise = SeedNoise([3, 9], stream=NOISE_STREAM)
    both = noise.randn((2, 1, 4, 4))
    alone = SeedNoise([9], stream=NOISE_STREAM).randn((1, 1, 4, 4))
    assert both.dtype == torch.float64 and torch.equal(both[1], alone[0])
    g = torch.Generator().manual_seed(mix_seed(NOISE_STREAM, 9))
    first = torch.randn((1, 4, 4), generator=g, dtype=torch.float64)
    assert torch.equal(alone[0], first)
    # a second call continues each seed's stream
    assert torch.equal(noise.randn((2, 3))[1], torch.randn(3, generator=g, dtype=torch.float64))
    # stream=None: the seed as given
    raw = SeedNoise([9], stream=None, dtype=torch.float32).randn((1, 5))
    assert torch.equal(raw[0], torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=torch.float32))
    with pytest.raises(ValueError, match="number of seeds"):
        noise.randn((3, 4))
