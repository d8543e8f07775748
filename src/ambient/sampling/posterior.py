"""Posterior denoisers: draw x ~ p(x | y) for y = A x + σ_y n with the plain solvers.

Each class wraps a full-image denoiser ``D(x_t, sigma) -> E[x | x_t]`` (any callable, e.g. a
:class:`ambient.nets.denoiser.FullImageDenoiser`; the model is never modified) and is itself a
:class:`~ambient.nets.denoiser.FullImageDenoiser` ``(x_t, sigma) -> x0`` that estimates E[x | x_t, y],
with the wrapped model's σ range and schedule (:class:`~ambient.nets.denoiser.DenoiserWrapper`). The
probability-flow ODE of p(x_t | y) has that estimate in place of D, so
:func:`ambient.sampling.solvers.sample_heun` / ``sample_euler`` with the usual σ schedules and
per-seed noise draw posterior samples unchanged. Operators come from :mod:`ambient.operators.base`.

* :class:`MMPS` (moment matching, Rozet et al. 2024): x | x_t is taken Gaussian with mean
  x̂ = D(x_t) and Tweedie's covariance Cov[x | x_t] = σ² ∂D/∂x_t =: σ² J. Then
  E[x | x_t, y] = x̂ + σ² Jᵀ Aᵀ v with (σ_y² I + σ² A J Aᵀ) v = y − A x̂, solved by
  ``cg_iters`` conjugate-gradient iterations. J is applied by vector–Jacobian products (J is
  symmetric for an exact denoiser): a call costs 1 forward + (cg_iters + 1) VJPs. Exact when
  the data are Gaussian and D is exact (enough CG iterations). ``covariance="identity"`` replaces
  σ² J by σ² I (an ablation: no VJP, and no longer exact).
* :class:`DPS` (diffusion posterior sampling, Chung et al. 2023), in denoiser form: the
  likelihood score ∇ log p(y | x_t) is replaced by −ζ √k ∇_{x_t} ‖y − A D(x_t)‖, the paper's step
  normalised by the residual, so the estimate is x̂ + ζ σ² Jᵀ Aᵀ r / rms(r) with r = y − A x̂ and
  rms(r) = ‖r‖/√k over the k observed values (the paper's ζ' is ζ√k; dividing by the RMS keeps ζ
  independent of the image size). 1 forward + 1 VJP per call. Approximate; ζ (``step``) needs tuning.
* :class:`Projection` (gradient-free, DDNM-style): x̂ + A⁺ (y − A x̂), i.e. for a mask the observed
  pixels of x̂ are replaced by y. 1 forward per call. Approximate; ignores σ_y.
* :class:`AmbientMean`, for ambient (mask-input) models: D(A ⊙ y, σ, A) with the observation's own
  mask — the model's estimate of the posterior *mean* E[x | y], not a sample.

Every wrapper counts its network work in ``calls`` (``forward``, ``vjp``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ambient.nets.denoiser import DenoiserWrapper
from ambient.operators.base import LinearOperator
from ambient.operators.mask import MaskOperator
from ambient.rng import SeedNoise
from ambient.sampling.fixed_mask import model_sigmas
from ambient.sampling.solvers import solver_by_name

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COVARIANCES = ("tweedie", "identity")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products, shaped to broadcast against a (N, ...) tensor."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def conjugate_gradient(apply: Callable, b: torch.Tensor, iters: int, floor: float = 0.0, *,
                       lifted: bool = False, tol: float = 0.0, info: dict | None = None):
    """``iters`` conjugate-gradient iterations for ``apply(v) = b``, from v = 0, one system per sample.

    Truncated CG: a sample stops, keeping its current iterate, at the first search direction p with
    pᵀ apply(p) <= ``floor`` · pᵀp. For a symmetric operator >= floor · I that never happens (plain
    CG); MMPS passes floor = σ_y², the least curvature of σ_y² I + σ² A J Aᵀ when the model's
    covariance σ² J is positive semi-definite. A learned network's J need not be (measured on the
    1.5-kimg Fashion-MNIST model: indefinite along observed directions at σ >= 5), and CG on an
    indefinite system can blow up (there, 5 iterations at σ_y = 0.1 gave pixel values of 380).
    A vanishing residual (e.g. nothing observed, σ_y = 0) also stops it: 0/0 steps are taken as 0.

    ``lifted``: ``apply(p)`` returns ``(apply(p), L p)`` for a linear map L the caller needs of the solution,
    and the result is ``(v, L v)``, L v accumulated as Σ α_i L p_i from the iterations' own products. MMPS
    needs σ² Jᵀ Aᵀ v, and Jᵀ Aᵀ p_i is the VJP each iteration computes anyway: one VJP fewer per call.

    ``tol`` > 0: a sample also stops once its residual is below ``tol`` · ‖b‖, and the loop ends when every sample
    has stopped (the Gaussian prior's solves); ``info``, if given, receives the iterations run (``"iterations"``).
    """
    v = torch.zeros_like(b)
    lv = None
    r = b.clone()
    p = r.clone()
    rr = _dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    stop = (tol * tol) * rr
    done = 0
    for _ in range(int(iters)):
        if tol > 0:
            active = active & (rr > stop)
            if not bool(active.any()):
                break
        ap = apply(p)
        if lifted:
            ap, lp = ap
        pap = _dot(p, ap)
        active = active & (pap > floor * _dot(p, p))
        alpha = torch.where(active, rr / torch.where(active, pap, 1.0), 0.0)
        v = v + alpha * p
        if lifted:
            lv = _scale(alpha, lp) if lv is None else lv + _scale(alpha, lp)
        r = r - alpha * ap
        rr_new = _dot(r, r)
        beta = torch.where(active & (rr > 0), rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        p = r + beta * p
        rr = rr_new
        done += 1
    if info is not None:
        info["iterations"] = done
    if lifted:
        return v, lv
    return v


def _scale(alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """α (shaped like :func:`_dot`'s result, per sample) times u, in u's dtype; u may have another number of
    dimensions than the system (an image for measurements with a trailing complex dimension)."""
    return alpha.to(u.dtype).reshape(-1, *([1] * (u.ndim - 1))) * u


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a scalar or (N,) → broadcastable (N or 1, 1, 1, 1) in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class PosteriorDenoiser(DenoiserWrapper):
    """Base of the wrappers: ``denoiser`` D(x, σ) → x0, observations ``y`` = A x + σ_y n, ``operator`` A."""

    def __init__(self, denoiser: Denoise, y: torch.Tensor, operator: LinearOperator, sigma_y: float = 0.0):
        super().__init__(denoiser)
        if not float(sigma_y) >= 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y!r}")
        self.y = y
        self.operator = operator
        self.sigma_y = float(sigma_y)
        self.calls = {"forward": 0, "vjp": 0}

    def _forward_with_graph(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t with grad, D(x_t, σ) attached to it)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = self.denoiser(xg, sigma)
        self.calls["forward"] += 1
        return xg, x0

    def _vjp(self, x0: torch.Tensor, xg: torch.Tensor, u: torch.Tensor, retain: bool = True) -> torch.Tensor:
        """Jᵀ u with J = ∂D/∂x_t."""
        (g,) = torch.autograd.grad(x0, xg, grad_outputs=u.to(x0.dtype), retain_graph=retain)
        self.calls["vjp"] += 1
        return g.to(xg.dtype)

    def residual(self, x0: torch.Tensor) -> torch.Tensor:
        return self.y.to(x0.dtype) - self.operator(x0)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MMPS(PosteriorDenoiser):
    """Moment-matching posterior denoiser (see the module doc); ``cg_iters`` >= 1."""

    def __init__(self, denoiser: Denoise, y: torch.Tensor, operator: LinearOperator, sigma_y: float = 0.0,
                 cg_iters: int = 1, covariance: str = "tweedie"):
        super().__init__(denoiser, y, operator, sigma_y)
        if int(cg_iters) != cg_iters or cg_iters < 1:
            raise ValueError(f"cg_iters must be an integer >= 1, got {cg_iters!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.cg_iters = int(cg_iters)
        self.covariance = covariance

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s2 = _sigma_like(sigma, x) ** 2
        sy2 = self.sigma_y**2
        a = self.operator
        if self.covariance == "identity":
            with torch.no_grad():  # Cov[x | x_t] taken as σ² I
                x0 = self.denoiser(x, sigma).to(x.dtype)
                self.calls["forward"] += 1
                v = conjugate_gradient(lambda w: sy2 * w + a(s2 * a.adjoint(w)), self.residual(x0), self.cg_iters)
                return x0 + s2 * a.adjoint(v)
        xg, x0 = self._forward_with_graph(x, sigma)

        def apply(w):  # (σ_y² w + σ² A J Aᵀ w, Jᵀ Aᵀ w): the second is what the solution's update needs
            u = self._vjp(x0, xg, a.adjoint(w))
            return sy2 * w + a(s2 * u), u

        with torch.no_grad():
            x0d = x0.detach().to(x.dtype)
            _, jv = conjugate_gradient(apply, self.residual(x0d), self.cg_iters, floor=sy2, lifted=True)
            return x0d + s2 * jv


class DPS(PosteriorDenoiser):
    """Diffusion posterior sampling in denoiser form: x̂ + ζ σ² Jᵀ Aᵀ r / rms(r) (``step`` = ζ > 0)."""

    def __init__(self, denoiser: Denoise, y: torch.Tensor, operator: LinearOperator, sigma_y: float = 0.0,
                 step: float = 5.0):
        super().__init__(denoiser, y, operator, sigma_y)
        if not float(step) > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        self.step = float(step)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s2 = _sigma_like(sigma, x) ** 2
        xg, x0 = self._forward_with_graph(x, sigma)
        k = self.operator.num_observations().to(x.device, x0.dtype).clamp_min(1.0)
        with torch.enable_grad():
            r = self.y.to(x0.dtype) - self.operator(x0)
            rms = (r.flatten(1).pow(2).sum(1) / k + 1e-30).sqrt()
            (grad,) = torch.autograd.grad(rms.sum(), xg)  # = −Jᵀ Aᵀ r / (k rms(r)), sample by sample
        self.calls["vjp"] += 1
        grad = grad.to(x.dtype) * k.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x0.detach().to(x.dtype) - self.step * s2 * grad


class Projection(PosteriorDenoiser):
    """Gradient-free baseline: x̂ + A⁺ (y − A x̂); for a mask, y replaces the observed pixels of x̂."""

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        with torch.no_grad():
            x0 = self.denoiser(x, sigma).to(x.dtype)
            self.calls["forward"] += 1
            return x0 + self.operator.pinv(self.residual(x0))


class AmbientMean(DenoiserWrapper):
    """D(A ⊙ y, σ_obs, A) for a mask-input denoiser ``D(x, sigma, mask)``: the posterior mean E[x | y].

    The model learnt E[x0 | A ⊙ (x0 + σ n), A]; fed the observation with its own mask at the noise
    level of the observation, σ_obs = max(σ_y, ``sigma_floor``), it returns its estimate of
    E[x | y]. The result does not depend on x_t or σ: in an ODE solver the last step returns it
    exactly, so one step (one network call) is all it needs. It is a mean, not a sample.
    """

    def __init__(self, denoiser, y: torch.Tensor, mask: torch.Tensor, sigma_y: float = 0.0,
                 sigma_floor: float = 0.002):
        super().__init__(denoiser)
        if not float(sigma_y) >= 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y!r}")
        self.operator = MaskOperator(mask)
        self.y = y
        self.sigma_obs = max(float(sigma_y), float(sigma_floor))
        self.calls = {"forward": 0, "vjp": 0}
        self._mean: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self._mean is None:
            mask = self.operator.mask.to(x.device, torch.float32)
            y = self.operator(self.y.to(x.device, torch.float32))
            sig = torch.full((y.shape[0],), self.sigma_obs, dtype=torch.float32, device=x.device)
            with torch.no_grad():
                self._mean = self.denoiser(y, sig, mask).to(x.dtype)
            self.calls["forward"] += 1
        return self._mean


def mmps_samples(denoiser, y: torch.Tensor, mask: torch.Tensor, seeds: list[int], *, steps: int, cg_iters: int,
                 sigma_y: float, solver: str = "heun") -> tuple[torch.Tensor, dict]:
    """One MMPS posterior sample per observation (observed pixels put back), and the network calls.

    Sample i starts from noise drawn by its own generator seeded with ``seeds[i]`` itself (EM's seeds are mixed).
    """
    wrapper = MMPS(denoiser, y, MaskOperator(mask), sigma_y, cg_iters=cg_iters)
    sigmas = model_sigmas(denoiser, steps).to(y.device)
    x = SeedNoise(seeds, stream=None, device=y.device).randn(y.shape)
    out = solver_by_name(solver)(wrapper, x * sigmas[0], sigmas).to(y.dtype)
    return mask * y + (1 - mask) * out, dict(wrapper.calls)


def ambient_mean(denoiser, y: torch.Tensor, mask: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """E[x | y] by a mask-input (ambient) model, D(A ⊙ y, σ_min, A), observed pixels put back; float32."""
    out = []
    for s in range(0, y.shape[0], batch):
        yb, mb = y[s:s + batch], mask[s:s + batch]
        mean = AmbientMean(denoiser, yb, mb, sigma_floor=float(getattr(denoiser, "sigma_min", 0.002)))
        with torch.no_grad():
            est = mean(yb, torch.ones(())).to(torch.float32)
        out.append(mb * yb + (1 - mb) * est)
    return torch.cat(out) if out else y.clone()


def mmps_operator_samples(denoiser, y: torch.Tensor, operator: LinearOperator, seeds: list[int], *, steps: int,
                          cg_iters: int, sigma_y: float, solver: str = "heun",
                          image_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """One MMPS posterior sample per observation y = A x + σ_y n for any operator (blur, k-space, masks), and the
    network calls. Nothing is put back: the measurements constrain the sample only through MMPS's correction.
    Sample i starts from noise drawn by its own generator seeded with ``seeds[i]`` itself (EM's seeds are mixed).
    """
    shape = (y.shape[0], *(image_shape or operator.image_shape))
    wrapper = MMPS(denoiser, y, operator, sigma_y, cg_iters=cg_iters)
    sigmas = model_sigmas(denoiser, steps).to(y.device)
    x = SeedNoise(seeds, stream=None, device=y.device).randn(shape)
    out = solver_by_name(solver)(wrapper, x * sigmas[0], sigmas).to(torch.float32)
    return out, dict(wrapper.calls)
