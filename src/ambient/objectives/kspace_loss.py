"""The ambient loss on undersampled k-space (issue 25, item 4a): learn E[x0 | Ã x_σ, Ã] from y = A x0 only.

Observation i: y = A_i x0, A_i = (line mask M_i) ∘ F, F the centred orthonormal FFT (single coil,
:class:`ambient.operators.kspace.KSpaceOperator`; measurements (N, C, H, W, 2) on the k-space grid, zeros where
M_i = 0). A further operator Ã = B ∘ A_i drops some acquired lines (:func:`ambient.data.kspace_law.further_lines`).
For each image: σ ~ exp(N(P_mean, P_std²)), η ~ N(0, I) in *image* space, and the network sees

    x_in = Ã⁺(B ⊙ (y + σ A η)) = Ã⁺Ã (x0 + σ η) = P (x0 + σ η),

computed without x0 (B ⊙ A = Ã since Ã ⊆ A). Because η is a real image, A η has the Hermitian symmetry of a real
spectrum and x_in is exactly the projection of x_σ = x0 + σ η: independent complex noise added in k-space would
not be (its mirror entries would disagree). Ã⁺ rather than Ãᵀ: Ãᵀ halves a frequency whose mirror is unsampled
(ÃᵀÃ = F^H diag((M̃ + M̃')/2) F), Ã⁺ gives P; each is an invertible function of the other given Ã, so the
conditional expectation the loss targets is the same. The network also gets ``seen``, Ã's seen spectrum
s = M̃ ∨ M̃' as an image-shaped map (:func:`ambient.data.kspace_law.seen_spectrum`), and the projection P for its
preconditioning (:class:`ambient.nets.projection_denoiser.ProjectionDenoiser`).

Loss, graded on A's acquired entries only (y is known only there; unacquired entries of y are zeroed first, so
they never enter):

    loss = Σ_k∈A w_k |(A D)_k − y_k|² / (number of acquired real values),
    w_k = w(σ) = (σ² + σ_d²)/(σ σ_d)² where s_k = 1 (seen by the network), 1/σ_d² where s_k = 0 (hidden),

the k-space analogue of the pixel loss's ``pixel`` weighting: 1/c_out² per subspace, so the backbone's output has
a unit-scale target in both. Minimiser: for fixed Ã the law of A given Ã does not depend on (x0, η), so
E[Aᵀ W A (D − x0) | x_in, Ã] = E[AᵀWA | Ã] (D − E[x0 | x_in, Ã]); when E[AᵀWA | Ã] is full rank (every frequency
pair outside Ã has positive probability of being in A given Ã) the unique minimiser is D = E[x0 | P x_σ, Ã].
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class KSpaceAmbientLoss:
    """Callable ``loss(net, y, op, op_hat, seen, *, sigma, noise) -> (N,)`` per-image losses.

    ``net(x_in, sigma, seen, project)``; ``y`` (N, C, H, W, 2) the measurements of ``op`` (A, with ``forward``
    and ``support``); ``op_hat`` Ã ⊆ A (``forward`` and ``pinv``); ``seen`` (N, 1, H, W) Ã's seen spectrum;
    ``sigma`` (N,) and ``noise`` η (N, C, H, W) image-space noise (drawn from ``generator`` when not given).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError("P_std and sigma_data must be positive")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return (torch.randn(n, generator=generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    @staticmethod
    def network_input(y: torch.Tensor, op, op_hat, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_in = Ã⁺(B ⊙ (y + σ A η)) (= P(x0 + σ η) when y = A x0)."""
        n = y.shape[0]
        return op_hat.pinv(y + sigma.reshape(n, 1, 1, 1, 1) * op.forward(noise))

    def __call__(self, net: Callable, y: torch.Tensor, op, op_hat, seen: torch.Tensor,
                 generator: torch.Generator | None = None, *, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        n = y.shape[0]
        c, h, w = op.image_shape
        if y.ndim != 5 or tuple(y.shape[1:]) != (c, h, w, 2) or tuple(seen.shape) != (n, 1, h, w):
            raise ValueError(f"y must be (N, {c}, {h}, {w}, 2) and seen (N, 1, {h}, {w}), got {tuple(y.shape)}, "
                             f"{tuple(seen.shape)}")
        if sigma is None:
            sigma = self.sample_sigma(n, generator)
        sigma = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1).expand(n)
        if noise is None:
            noise = torch.randn((n, c, h, w), generator=generator, dtype=y.dtype)
        support = op.support().to(y.dtype)
        y = y * support  # values at unacquired entries are never used
        x_in = self.network_input(y, op, op_hat, sigma, noise)

        def project(v: torch.Tensor) -> torch.Tensor:
            return op_hat.pinv(op_hat.forward(v))

        denoised = net(x_in, sigma, seen, project)
        r = op.forward(denoised.to(y.dtype)) - y  # zero at unacquired entries
        s = seen[..., None].to(y.dtype)
        wk = s * self.weight(sigma).reshape(n, 1, 1, 1, 1) + (1 - s) * self.sigma_data ** -2
        count = support.expand_as(r).flatten(1).sum(1).clamp_min(1.0)
        return (wk * r**2).flatten(1).sum(1) / count
