"""Sliced Wasserstein distance between two image sets, in pixel space (no network, no weights).

SW_p(X, Y) = ( E_theta [ W_p^p(<X, theta>, <Y, theta>) ] )^(1/p), theta uniform on the unit
sphere of R^D (D = C*H*W), estimated with ``num_projections`` random directions. Each 1-D
W_p between the projected empirical measures is computed exactly, also for sets of different
sizes (the quantile functions are step functions; we integrate over the merged breakpoints).
Images are compared as float in [-1, 1] (uint8 input is mapped with v / 127.5 - 1), so the
value is in those units.
"""

from __future__ import annotations

import torch

from ambient.data.images import images_uint8_to_float


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = images_uint8_to_float(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: need at least one sample, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Exact W_p between the empirical measures of the columns of u (n, P) and v (m, P) -> (P,)."""
    if p < 1:
        raise ValueError(f"p: must be >= 1, got {p}")
    n, m = u.shape[0], v.shape[0]
    us, _ = torch.sort(u, dim=0)
    vs, _ = torch.sort(v, dim=0)
    # Merged breakpoints {0} u {i/n} u {j/m}: on each interval both quantile functions are constant.
    f64 = torch.float64
    t = torch.cat([torch.zeros(1, dtype=f64), torch.arange(1, n + 1, dtype=f64) / n,
                   torch.arange(1, m + 1, dtype=f64) / m])
    t = torch.unique(t)  # sorted
    widths = t[1:] - t[:-1]
    mids = (t[1:] + t[:-1]) / 2
    iu = torch.clamp((mids * n).floor().long(), max=n - 1)
    iv = torch.clamp((mids * m).floor().long(), max=m - 1)
    diff = (us[iu] - vs[iv]).abs() ** p  # (K, P)
    return (widths[:, None] * diff).sum(dim=0) ** (1.0 / p)


def random_directions(dim: int, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` directions uniform on the unit sphere of R^dim, as columns of a (dim, num) matrix."""
    d = torch.randn(dim, num, generator=generator, dtype=torch.float64)
    return d / d.norm(dim=0, keepdim=True)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
    p: float = 2.0,
    chunk: int = 64,
) -> float:
    """Monte-Carlo SW_p between sample sets x (N, ...) and y (M, ...) of equal per-sample shape.

    Projections are drawn from ``generator`` (pass one for reproducible values) in chunks of
    ``chunk`` directions to bound memory.
    """
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x, y: per-sample shapes differ: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
    if num_projections < 1:
        raise ValueError(f"num_projections: must be >= 1, got {num_projections}")
    xr, yr = _as_rows(x, "x"), _as_rows(y, "y")
    total = torch.zeros((), dtype=torch.float64)
    done = 0
    while done < num_projections:
        k = min(chunk, num_projections - done)
        theta = random_directions(xr.shape[1], k, generator)
        total = total + (wasserstein_1d(xr @ theta, yr @ theta, p) ** p).sum()
        done += k
    return float((total / num_projections) ** (1.0 / p))
