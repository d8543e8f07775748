"""Measurements files (y + operator + value_range): round trip, units, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ambient.errors import AmbientInputError
from ambient.operators.blur import BlurOperator, gaussian_kernel
from ambient.operators.kspace import KSpaceOperator, cartesian_mask
from ambient.operators.mask import MaskOperator
from ambient.operators.measurements import is_measurements_file, load_measurements, save_measurements


def _images(n=6, c=1, h=8, w=8, lo=100.0, hi=300.0):
    g = torch.Generator().manual_seed(0)
    return lo + (hi - lo) * torch.rand(n, c, h, w, generator=g, dtype=torch.float64)


def _operators(n, c=1, h=8, w=8):
    masks = cartesian_mask(n, h, w, 4, 0.25, seed=1)
    return {
        "kspace": KSpaceOperator(torch.as_tensor(masks), (c, h, w), sigma_y=0.5),
        "blur": BlurOperator(gaussian_kernel(1.0)[None], (c, h, w), sigma_y=2.0),
        "mask": MaskOperator((torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(2)) < 0.5).double()),
    }


@pytest.mark.parametrize("kind", ["kspace", "blur", "mask"])
def test_round_trip_in_model_units(tmp_path, kind):
    lo, hi = 100.0, 300.0
    x = _images(lo=lo, hi=hi)
    op = _operators(x.shape[0])[kind]
    y = op(x)
    path = save_measurements(tmp_path / "m.npz", y, op, (lo, hi))
    assert is_measurements_file(path)
    with np.load(path) as z:
        assert np.iscomplexobj(z["y"]) == (kind == "kspace")
    meas = load_measurements(path)
    assert len(meas) == x.shape[0] and meas.shape == (1, 8, 8)
    x_model = 2 * (x - lo) / (hi - lo) - 1
    # ỹ = A x̃ exactly (float32 storage of y aside), σ̃_y = σ_y / a
    assert torch.allclose(meas.y, meas.operator(x_model), atol=1e-4 * (1 + float(meas.y.abs().max())))
    assert meas.sigma_y == pytest.approx(op.sigma_y / ((hi - lo) / 2))
    assert torch.allclose(meas.to_original(x_model), x)
    # exact images are data-consistent up to float32 storage
    assert float(meas.consistency(x_model, torch.arange(len(meas))).max()) < 1e-5
    sub = load_measurements(path, max_size=2)
    assert len(sub) == 2 and torch.allclose(sub.y, meas.y[:2])
    assert meas.fingerprint() != sub.fingerprint()


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_errors_name_the_file_and_the_array(tmp_path):
    x = _images()
    op = _operators(6)["kspace"]
    good = save_measurements(tmp_path / "good.npz", op(x), op, (100.0, 300.0))
    with np.load(good) as z:
        base = {k: z[k] for k in z.files}
    cases = {
        "no 'value_range'": {k: v for k, v in base.items() if k != "value_range"},
        "'value_range' must be two finite numbers": {**base, "value_range": np.array([1.0, 1.0])},
        "NaN or infinite values in 1 observation": {**base, "y": np.where(np.arange(6)[:, None, None, None] == 3,
                                                                       np.nan, base["y"]).astype(np.complex64)},
        "'y' must be float or complex": {**base, "y": base["y"].real.astype(np.int32)},
        "'operator': operator spec: kind 'swirl' is unknown": {**base, "operator": np.array(json.dumps(
            {**json.loads(str(base["operator"])), "kind": "swirl"}))},
        "the operator": {**base, "y": base["y"][:, :, :4]},
    }
    for want, arrays in cases.items():
        path = _write(tmp_path / "bad.npz", **arrays)
        with pytest.raises(AmbientInputError) as e:
            load_measurements(path)
        msg = str(e.value)
        assert str(path) in msg and want in msg and "\n" not in msg, msg
