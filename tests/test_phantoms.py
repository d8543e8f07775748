"""ambient.data.phantoms: range, determinism per (seed, index), prefixes, variety, the npz file."""

import numpy as np
import pytest

from ambient.data.phantoms import phantoms, write_phantoms_npz


def test_shape_dtype_and_range():
    x = phantoms(40, size=32, seed=3)
    assert x.shape == (40, 32, 32) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert phantoms(2, size=16, dtype=np.float64).dtype == np.float64
    assert phantoms(0).shape == (0, 64, 64)


def test_deterministic_and_prefix():
    """phantoms(n) is a prefix of phantoms(m), also across rendering chunks (128 phantoms per chunk at 64×64)."""
    many = phantoms(260, size=64, seed=7)
    for n in (1, 5, 129, 131):
        np.testing.assert_array_equal(phantoms(n, size=64, seed=7), many[:n])
    assert not np.array_equal(phantoms(5, size=64, seed=8), many[:5])


def test_same_phantom_at_every_resolution():
    """The parameters do not depend on size: a 64×64 phantom averaged over 2×2 blocks is close to the 32×32 one."""
    hi = phantoms(6, size=64, seed=2).astype(np.float64)
    lo = phantoms(6, size=32, seed=2).astype(np.float64)
    pooled = hi.reshape(6, 32, 2, 32, 2).mean((2, 4))
    assert np.abs(pooled - lo).mean() < 0.02
    other = phantoms(6, size=32, seed=3).astype(np.float64)
    assert np.abs(other - lo).mean() > 5 * np.abs(pooled - lo).mean()


def test_variety():
    x = phantoms(24, size=48, seed=0).astype(np.float64)
    flat = x.reshape(len(x), -1)
    dist = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    off = dist[~np.eye(len(x), dtype=bool)]
    assert off.min() > 0.02  # no two phantoms alike
    assert np.median(off) > 0.05
    for img in x:
        assert img.std() > 0.05  # not constant
        assert (img == 0).mean() > 0.1  # background outside the head
        assert len(np.unique(np.round(img, 3))) > 50  # texture: many grey levels, not a few flat regions
    # the brain is textured: its centre's values vary smoothly (not one flat level)
    centre = x[:, 20:28, 20:28]
    assert np.median(centre.reshape(len(x), -1).std(1)) > 0.005


def test_head_has_darker_rim():
    """Along the middle row, from the background inward: 0, then the rim, then the brighter brain."""
    x = phantoms(50, size=64, seed=4)
    row = x[:, 32, :]
    first = (row > 0.05).argmax(1)  # the head's left edge
    rim = np.take_along_axis(row, first[:, None] + 2, 1)[:, 0]
    assert np.median(rim) < 0.36
    assert np.median(x[:, 28:36, 28:36]) > np.median(rim)


@pytest.mark.parametrize("bad", [dict(num=-1), dict(num=2.5), dict(size=0), dict(num=True), dict(seed="a")])
def test_bad_arguments(bad):
    args = dict(num=2, size=8, seed=0) | bad
    with pytest.raises(ValueError):
        phantoms(**args)


def test_write_npz(tmp_path):
    path = write_phantoms_npz(tmp_path / "ph.npz", 4, size=16, seed=5)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["images", "value_range"]
        assert npz["images"].dtype == np.float32 and npz["images"].shape == (4, 16, 16)
        np.testing.assert_array_equal(npz["images"], phantoms(4, size=16, seed=5))
        np.testing.assert_array_equal(npz["value_range"], [0.0, 1.0])
        assert npz["value_range"].dtype == np.float64  # as ambient.operators.measurements writes it
