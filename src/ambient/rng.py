"""Every random stream of the package, and how seeds become generators.

All randomness goes through explicit ``torch.Generator``s seeded by ``mix_seed(stream, seed, …)``
with one of the stream constants below, so that two uses of the same user seed never share draws
and each draw is a pure function of its integers (the same on every machine, batch and worker).
The values are part of every result the package has written: changing one changes the masks,
samples or weights of a given seed. ``tests/test_rng.py`` checks that they are distinct.

:class:`SeedNoise` holds one generator per seed of a batch; ``randn((N, …))`` stacks each seed's own
draw, so image i's noise depends only on ``seeds[i]`` (not on the batch it is drawn in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# data (ambient.data.corruption, ambient.data.phantoms)
MASK_STREAM = 0x5A17  # the mask A of image i drawn from the corruption law: (dataset seed, i)
FURTHER_STREAM = 0xB0C5  # a further mask Ã fixed per image (the paper's variant): (seed, i)
SAMPLER_STREAM = 0x7E57  # the fixed-mask sampler's mask of a sample: (seed)
PHANTOM_STREAM = 0xF4A7  # the ellipses and textures of procedural phantom i: (seed, i)

# simulated measurements (ambient.operators.simulate, `ambient measure`)
MEASURE_STREAM = 0x3EA5  # `ambient measure`: k-space line masks (seed, 0) as cartesian_mask's seed; noise (seed, 1, i)

# sampling (ambient.sampling)
NOISE_STREAM = 0x5EED  # a sample's starting and churn noise, `ambient sample` and `ambient restore`: (seed)
KSPACE_SAMPLER_STREAM = 0x4B5A  # the k-space ambient sampler's further operator Ã of a sample: (seed)

# training (ambient.learners.core, shared by train and finetune)
ORDER_STREAM = 0x0DE7  # the permutation of the data in an epoch: (seed, epoch)
STEP_STREAM = 0x57E9  # a training step's flips, Ã, σ and noise: (seed, step, …)
INIT_STREAM = 0x1417  # the global RNG while a fresh network is built (its initial weights): (seed)

# k-space ambient training (ambient.learners.kspace_ambient)
KSPACE_STEP_STREAM = 0x4B57  # a training step's Ã, σ and noise: (seed, step)

# EM (ambient.learners.em, ambient.learners.gaussian_prior)
POSTERIOR_STREAM = 0x6A55  # an exact draw of the Gaussian prior's posterior x | y for one image: (seed)
EM_SUBSET_STREAM = 0x5B5E  # the observations an E-step completes: (seed, lap)
EM_GFIT_STREAM = 0x6F17  # the observations the Gaussian prior is fitted on: (seed)
EM_DRAW_STREAM = 0xD8A3  # the posterior-sampling seed of observation i in a lap: (seed, lap, i)
EM_MSTEP_STREAM = 0x3573  # the training seed of a lap's M-step: (seed, lap)


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain); the same on every machine."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


class SeedNoise:
    """Gaussian noise for a batch of seeds: one CPU generator per seed, draws stacked along dim 0.

    Seed s's generator is seeded with ``mix_seed(stream, s)`` (e.g. ``stream=NOISE_STREAM``), or with
    s itself when ``stream`` is None (for seeds that are already mixed). :meth:`randn` of a shape
    (N, …), N = len(seeds), draws ``shape[1:]`` from each generator in turn, in ``dtype``, and moves
    the stack to ``device``; successive calls continue each generator's stream (a solver's churn
    noise follows the starting noise). Because the generators live on the CPU, a seed gives the same
    numbers at any batch size and on any device.
    """

    def __init__(self, seeds: Sequence[int], *, stream: int | None,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s if stream is None else mix_seed(stream, s))
                           for s in self.seeds]
        self.dtype = dtype
        self.device = device

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"shape {shape}: the first size must be the number of seeds ({len(self.generators)})")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=self.dtype) for g in self.generators])
        return out if self.device is None else out.to(self.device)
