"""ambient.sampling.classical: the TV baseline against exact minimisers (two pixels, least squares, the mean
at large λ), its monotone objective, batch independence, and λ chosen on clean references."""

import math

import pytest
import torch

from ambient.operators.mask import MaskOperator
from ambient.sampling.classical import (
    choose_lambda,
    gradient,
    gradient_adjoint,
    operator_norm_sq,
    prox_tv,
    total_variation,
    tv_objective,
    tv_reconstruct,
    zero_filled,
)


class Dense:
    """A toy operator: forward = matrix multiply of the flattened image, adjoint = the transpose; with
    ``pairs`` the measurements are laid out (N, M/2, 2) like complex values in the real layout."""

    def __init__(self, matrix: torch.Tensor, image_shape, pairs: bool = False):
        self.matrix, self.image_shape, self.pairs = matrix, tuple(image_shape), pairs

    def forward(self, x):
        out = x.flatten(1) @ self.matrix.T.to(x.dtype)
        return out.reshape(len(out), -1, 2) if self.pairs else out

    __call__ = forward

    def adjoint(self, v):
        return (v.flatten(1) @ self.matrix.to(v.dtype)).reshape(len(v), *self.image_shape)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blocks(n=3, size=16, seed=0):
    """Piecewise-constant images (N, 1, size, size) in [0, 1]: a few random rectangles each."""
    g = gen(seed)
    out = torch.zeros(n, 1, size, size, dtype=torch.float64)
    for i in range(n):
        for _ in range(3):
            r0, c0 = torch.randint(0, size - 2, (2,), generator=g).tolist()
            h, w = torch.randint(max(2, size // 4), size // 2 + 1, (2,), generator=g).tolist()
            out[i, :, r0:r0 + h, c0:c0 + w] += 0.2 + 0.3 * torch.rand((), generator=g, dtype=torch.float64)
    return out


def test_gradient_adjoint_is_the_adjoint():
    g = gen(1)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    px, py = torch.randn(2, 2, 3, 5, 7, generator=g, dtype=torch.float64).unbind(1)
    gx, gy = gradient(x)
    assert (gx[..., -1] == 0).all() and (gy[..., -1, :] == 0).all()
    lhs = (gx * px).sum() + (gy * py).sum()
    assert lhs.item() == pytest.approx((x * gradient_adjoint(px, py)).sum().item(), rel=1e-12)


def test_total_variation_by_hand():
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.0  # one bright pixel: |∇| = √2 at (1,1), 1 at (0,1) and (1,0)
    assert total_variation(x).item() == pytest.approx(math.sqrt(2) + 2)


def test_two_pixels_exact_minimiser():
    """min ½x₁² + ½(x₂ − 1)² + λ|x₂ − x₁| = (λ, 1 − λ) for λ < ½, else (½, ½)."""
    op = Dense(torch.eye(2, dtype=torch.float64), (1, 1, 2))
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    for lam, want in ((0.0, [0.0, 1.0]), (0.2, [0.2, 0.8]), (0.45, [0.45, 0.55]), (0.7, [0.5, 0.5])):
        x = tv_reconstruct(op, y, lam=lam, iters=100)
        torch.testing.assert_close(x.flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    x32 = tv_reconstruct(op, y.float(), lam=0.2, iters=100)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.flatten(), torch.tensor([0.2, 0.8]), atol=1e-5, rtol=0)


def test_zero_lambda_full_rank_gives_least_squares():
    g = gen(2)
    matrix = torch.randn(24, 16, generator=g, dtype=torch.float64) + 3 * torch.eye(24, 16, dtype=torch.float64)
    op = Dense(matrix, (1, 4, 4))
    y = torch.randn(3, 24, generator=g, dtype=torch.float64)  # not in A's range: a true least-squares problem
    ls = torch.linalg.lstsq(matrix, y.T).solution.T.reshape(3, 1, 4, 4)
    torch.testing.assert_close(tv_reconstruct(op, y, lam=0.0, iters=500), ls, atol=1e-7, rtol=0)
    near = tv_reconstruct(op, y, lam=1e-4, iters=500)
    assert (near - ls).abs().max() < 1e-3


def test_identity_operator_large_lambda_gives_the_mean():
    """A = I, λ beyond the dual bound: the TV-denoised image is constant, each channel at its mean."""
    g = gen(3)
    y = torch.rand(2, 2, 6, 6, generator=g, dtype=torch.float64)
    op = Dense(torch.eye(72, dtype=torch.float64), (2, 6, 6))
    x = tv_reconstruct(op, y.flatten(1), lam=50.0, iters=400, tv_iters=20)
    torch.testing.assert_close(x, y.mean((2, 3), keepdim=True).expand_as(y), atol=1e-4, rtol=0)


def test_objective_never_increases_and_converges():
    img = blocks(3, 16, seed=4)
    mask = (torch.rand(img.shape, generator=gen(5)) < 0.5).float()
    op = MaskOperator(mask)
    y = op(img) + 0.02 * torch.randn(img.shape, generator=gen(6), dtype=torch.float64) * mask
    seen = []
    x = tv_reconstruct(op, y, lam=0.05, iters=150, callback=lambda k, xk, f: seen.append(f.clone()))
    hist = torch.stack(seen)
    assert len(seen) == 150
    assert (hist[1:] <= hist[:-1] + 1e-12).all()
    torch.testing.assert_close(hist[-1], tv_objective(op, x, y, 0.05), rtol=1e-12, atol=0)
    start = tv_objective(op, zero_filled(op, y), y, 0.05)
    best = tv_objective(op, tv_reconstruct(op, y, lam=0.05, iters=600, tv_iters=20), y, 0.05)
    assert (hist[-1] - best <= 1e-4 * (start - best)).all()


def test_mask_recovery_beats_zero_filling():
    img = blocks(4, 16, seed=7)
    mask = (torch.rand(img.shape, generator=gen(8)) < 0.4).float()
    op = MaskOperator(mask)
    y = op(img)
    mse_zf = (zero_filled(op, y) - img).square().flatten(1).mean(1)
    mse_tv = (tv_reconstruct(op, y, lam=0.02, iters=300) - img).square().flatten(1).mean(1)
    assert (mse_tv < 0.5 * mse_zf).all()


@pytest.mark.parametrize("shared", [True, False])
def test_batch_independence(shared):
    img = blocks(4, 12, seed=9)
    mask = (torch.rand((1 if shared else 4, 1, 12, 12), generator=gen(10)) < 0.5).float()
    op = MaskOperator(mask)
    y = op(img) + 0.01 * torch.randn(img.shape, generator=gen(11), dtype=torch.float64)
    lam = torch.tensor([0.01, 0.05, 0.02, 0.1], dtype=torch.float64)
    together = tv_reconstruct(op, y, lam=lam, iters=60)
    for i in range(4):
        alone = tv_reconstruct(op if shared else op.select([i]), y[i:i + 1], lam=float(lam[i]), iters=60)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-6, rtol=0)
    # another image in the batch changes nothing either
    swapped = tv_reconstruct(op if shared else op.select([0, 3]), torch.stack([y[0], y[3]]),
                             lam=lam[[0, 3]], iters=60)
    torch.testing.assert_close(swapped[0], together[0], atol=1e-6, rtol=0)


def test_deterministic_and_opaque_measurements():
    """Same answer twice; measurements laid out as (N, M/2, 2) pairs are handled like flat ones."""
    g = gen(12)
    matrix = torch.randn(32, 36, generator=g, dtype=torch.float64)
    img = blocks(2, 6, seed=13)
    flat, paired = Dense(matrix, (1, 6, 6)), Dense(matrix, (1, 6, 6), pairs=True)
    y = paired(img)
    assert y.shape == (2, 16, 2)
    a = tv_reconstruct(paired, y, lam=0.1, iters=80)
    torch.testing.assert_close(a, tv_reconstruct(paired, y, lam=0.1, iters=80), atol=0, rtol=0)
    torch.testing.assert_close(a, tv_reconstruct(flat, y.flatten(1), lam=0.1, iters=80), atol=1e-12, rtol=0)
    torch.testing.assert_close(zero_filled(paired, y), paired.adjoint(y))


def test_operator_norm_by_power_iteration():
    g = gen(14)
    matrix = torch.randn(10, 16, generator=g, dtype=torch.float64)
    est = operator_norm_sq(Dense(matrix, (1, 4, 4)), (2, 1, 4, 4), iters=200)
    top = torch.linalg.matrix_norm(matrix, ord=2).item() ** 2
    torch.testing.assert_close(est, torch.full((2,), top, dtype=torch.float64), rtol=1e-6, atol=0)
    mask = (torch.rand((3, 1, 8, 8), generator=g) < 0.5).float()
    torch.testing.assert_close(operator_norm_sq(MaskOperator(mask), (3, 1, 8, 8)),
                               torch.ones(3, dtype=torch.float64))


def test_prox_with_zero_weight_is_the_identity():
    z = torch.rand(2, 1, 5, 5, generator=gen(15), dtype=torch.float64)
    x, _ = prox_tv(z, torch.zeros(2, 1, 1, 1, dtype=torch.float64), 5)
    torch.testing.assert_close(x, z, atol=0, rtol=0)


def test_choose_lambda_by_clean_references():
    img = blocks(3, 12, seed=16)
    mask = (torch.rand(img.shape, generator=gen(17)) < 0.5).float()
    op = MaskOperator(mask)
    y = op(img) + 0.05 * torch.randn(img.shape, generator=gen(18), dtype=torch.float64) * mask
    grid = [0.0, 0.003, 0.03, 0.3, 3.0]
    lam, scores = choose_lambda(op, y, img, grid, data_range=1.0, iters=100)
    assert len(scores) == len(grid) and lam in grid
    assert scores[grid.index(lam)] == max(scores)
    assert 0 < lam < 3.0  # neither no regularisation nor a flat image
    want = [float((10 * torch.log10(1 / (tv_reconstruct(op, y, lam=v, iters=100) - img).square().flatten(1)
                                    .mean(1))).mean()) for v in grid]
    assert scores == pytest.approx(want, rel=1e-12)
    # the data range shifts the scores, not the choice; a custom score (higher is better) is used as given
    lam2, scores2 = choose_lambda(op, y, img, grid, data_range=2.0, iters=100)
    assert lam2 == lam and scores2[0] - scores[0] == pytest.approx(20 * math.log10(2))
    lam3, _ = choose_lambda(op, y, img, grid, iters=100, score=lambda x, r: -total_variation(x))
    assert lam3 == 3.0


@pytest.mark.parametrize("bad", [dict(lam=-1.0), dict(lam=float("nan")), dict(lam=torch.ones(3)),
                                 dict(lam="a"), dict(lam=0.1, iters=-1), dict(lam=0.1, lipschitz=0.0)])
def test_bad_arguments(bad):
    op = MaskOperator(torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError):
        tv_reconstruct(op, torch.zeros(2, 1, 4, 4), **bad)
