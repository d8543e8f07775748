"""DDPMSchedule: the one σ ↔ timestep object of DDPM-style models (finetuning loss and denoiser)."""

import pytest
import torch
from diffusers import DDPMScheduler

from ambient.nets.schedules import DDPMSchedule, alpha_bar_from_sigma, alphas_cumprod, sigma_from_alpha_bar


@pytest.fixture(scope="module")
def sched():
    return DDPMSchedule(alphas_cumprod(DDPMScheduler(num_train_timesteps=50)))


def test_sigma_and_timestep_are_inverse_on_the_grid(sched):
    t = torch.arange(50)
    sig = sched.t_to_sigma(t)
    assert bool((sig[1:] > sig[:-1]).all())  # σ_t increases with t
    torch.testing.assert_close(alpha_bar_from_sigma(sig), sched.alpha_bar(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma_from_alpha_bar(sched.alpha_bar(t)), sig, rtol=1e-12, atol=0)
    for mode in ("interpolate", "nearest"):
        torch.testing.assert_close(sched.sigma_to_t(sig, mode), t.double(), rtol=0, atol=1e-9)


def test_between_and_beyond_the_grid(sched):
    sig = sched.sigmas
    mid = (0.3 * sig[20].log() + 0.7 * sig[21].log()).exp()
    assert float(sched.sigma_to_t(mid)) == pytest.approx(20.7, abs=1e-9)
    assert float(sched.sigma_to_t(mid, "nearest")) == 21.0
    assert sched.sigma_to_t(torch.tensor([1e-9, 1e9])).tolist() == [0.0, 49.0]  # clamped


def test_sampling_sigmas_are_the_models_own(sched):
    s = sched.sampling_sigmas(10)
    assert s.shape == (11,) and s[-1] == 0 and s[0] == sched.sigmas[-1] and s[-2] == sched.sigmas[0]
    assert all(bool(torch.isclose(sched.sigmas, v, rtol=1e-12).any()) for v in s[:-1])
    k = sched.sampling_sigmas(50, "karras")
    assert bool((k[1:] < k[:-1]).all()) and len(k) <= 51
    with pytest.raises(ValueError, match="num_steps"):
        sched.sampling_sigmas(51)


def test_buffers_follow_the_module_and_strictness():
    with pytest.raises(ValueError, match="decrease strictly"):
        DDPMSchedule(torch.tensor([0.9, 0.9, 0.5]))
    assert DDPMSchedule(torch.tensor([0.9, 0.9, 0.5]), strict=False).num_timesteps == 3
    s = DDPMSchedule(torch.tensor([0.9, 0.5]))
    assert {n for n, _ in s.named_buffers()} == {"alphas_cumprod", "sigmas", "log_sigmas"} and not s.state_dict()
