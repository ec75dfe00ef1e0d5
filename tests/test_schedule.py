"""The DDPM schedule, its respacing, and the reverse-step equations, against direct formulas."""

import math
from fractions import Fraction

import pytest
import torch

from stablesr_min.config import DiffusionConfig
from stablesr_min.schedule import TABLES, Schedule, spaced_timesteps


@pytest.fixture(scope="module")
def base() -> Schedule:
    return Schedule.from_config(DiffusionConfig())


def exact_spacing(num_steps: int) -> list[int]:
    """round(999 k / (N - 1)) in exact rational arithmetic (half to even)."""
    return [round(Fraction(999 * k, num_steps - 1)) for k in range(num_steps)]


def test_linear_betas(base):
    assert len(base) == 1000
    assert base.betas.dtype == torch.float64
    assert base.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert base.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # Linear in sqrt(beta).
    steps = base.betas.sqrt().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9, atol=0)
    # SD's well-known final alpha-bar.
    assert base.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)


def test_four_steps():
    assert spaced_timesteps(1000, 4) == [0, 333, 666, 999]


@pytest.mark.parametrize("num_steps", [2, 4, 50, 200, 1000])
def test_spacing_matches_exact_formula(num_steps):
    assert spaced_timesteps(1000, num_steps) == exact_spacing(num_steps)


def test_spacing_rounds_half_to_even():
    # 999/6 = 166.5 exactly: 499.5 -> 500 and 832.5 -> 832 (rounding half up would give 833).
    assert spaced_timesteps(1000, 7) == [0, 166, 333, 500, 666, 832, 999]


def test_spacing_accumulates_in_float64():
    # N = 21: 10 * 49.95 is the tie 499.5, but the running sum lands at 499.49999999999994.
    assert exact_spacing(21)[10] == 500
    assert spaced_timesteps(1000, 21)[10] == 499


def test_spacing_edges():
    assert spaced_timesteps(1000, 1) == [0]
    assert spaced_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 1001)


def test_respacing_to_all_steps_is_identity(base):
    same = base.respace(1000)
    for name in TABLES:
        ours, ref = getattr(same, name), getattr(base, name)
        assert torch.allclose(ours.double(), ref.double(), rtol=1e-10, atol=0), name


@pytest.mark.parametrize("num_steps", [4, 200])
def test_respaced_schedule_keeps_alpha_bar(base, num_steps):
    spaced = base.respace(num_steps)
    keep = torch.tensor(exact_spacing(num_steps))
    assert torch.equal(spaced.timestep_map, keep)
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12, atol=0)
    # beta_k = 1 - ab[map[k]] / ab[map[k-1]], with ab[map[-1]] = 1
    ab = base.alphas_cumprod[keep].tolist()
    expected = [1 - ab[0]] + [1 - ab[k] / ab[k - 1] for k in range(1, num_steps)]
    assert torch.allclose(spaced.betas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_four_step_betas(base):
    betas = base.respace(4).betas.tolist()
    assert betas[0] == pytest.approx(0.00085, rel=1e-10)
    assert betas == pytest.approx([0.00085, 0.4645828, 0.8035740, 0.9556521], rel=1e-6)


def test_posterior_tables_match_direct_formulas(base):
    s = base.respace(50)
    beta, alpha, ab = s.betas, 1 - s.betas, s.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    # The same variance written as 1 / (1/(1 - ab_{t-1}) + alpha_t / beta_t).
    variance = 1 / (1 / (1 - ab_prev) + alpha / beta)
    assert torch.allclose(s.posterior_variance, variance, rtol=1e-10, atol=1e-30)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))
    assert torch.allclose(s.posterior_log_variance_clipped[1:], variance[1:].log(), rtol=1e-10)
    assert torch.allclose(s.posterior_mean_coef1, beta * ab_prev.sqrt() / (1 - ab), rtol=1e-12)
    assert torch.allclose(s.posterior_mean_coef2, (1 - ab_prev) * alpha.sqrt() / (1 - ab), rtol=1e-12)
    assert torch.allclose(s.sqrt_recipm1_alphas_cumprod, ((1 - ab) / ab).sqrt(), rtol=1e-12)
    assert torch.allclose(s.log_one_minus_alphas_cumprod, torch.log1p(-ab), rtol=1e-12)


def test_posterior_mean_equals_eps_form(base):
    # Ho et al. Eq. 11: mu = (x_t - beta / sqrt(1 - ab) * eps) / sqrt(alpha), the same mean as
    # Eq. 7 with x_0 read off eps by Eq. 15.
    s = base.respace(20)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64).unbind(0)
    for k in (1, 7, 19):
        mean, _ = s.posterior(s.predict_x0(x_t, k, eps), x_t, k)
        beta, ab = s.betas[k], s.alphas_cumprod[k]
        expected = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
        assert torch.allclose(mean, expected, rtol=1e-10, atol=1e-12)


def test_eps_and_v_recover_the_same_x0(base):
    eps_schedule = base.respace(10)
    v_schedule = Schedule(base.betas, parameterization="v").respace(10)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=g).unbind(0)
    k = torch.tensor([2, 5, 9])
    x_t = eps_schedule.q_sample(x0, k, eps)
    ab = eps_schedule.alphas_cumprod[k].float().reshape(-1, 1, 1, 1)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert torch.allclose(eps_schedule.predict_x0(x_t, k, eps), x0, atol=1e-4)
    assert torch.allclose(v_schedule.predict_x0(x_t, k, v), x0, atol=1e-5)
    assert v_schedule.timestep_map.tolist() == eps_schedule.timestep_map.tolist()


def test_q_sample_per_image_and_dtype(base):
    x0 = torch.full((2, 1, 2, 2), 2.0)
    noise = torch.ones_like(x0)
    x_t = base.q_sample(x0, torch.tensor([0, 999]), noise)
    assert x_t.dtype == torch.float32
    ab = [1 - 0.00085, 0.0046601]
    for i in range(2):
        expected = 2 * math.sqrt(ab[i]) + math.sqrt(1 - ab[i])
        assert x_t[i].flatten().tolist() == pytest.approx([expected] * 4, rel=1e-4)


def test_p_sample_adds_noise_except_at_the_last_step(base):
    s = base.respace(4)
    g = torch.Generator().manual_seed(2)
    x_t, eps, noise = torch.randn(3, 1, 4, 6, 6, generator=g, dtype=torch.float64).unbind(0)
    for k in (3, 1):
        mean, log_variance = s.posterior(s.predict_x0(x_t, k, eps), x_t, k)
        sigma = s.posterior_variance[k].sqrt()
        assert torch.allclose(s.p_sample(x_t, k, eps, noise), mean + sigma * noise, rtol=1e-12)
    mean, _ = s.posterior(s.predict_x0(x_t, 0, eps), x_t, 0)
    assert torch.equal(s.p_sample(x_t, 0, eps, noise), mean)
    # At k = 0 the posterior mean is x_0 itself (coef1 = 1, coef2 = 0).
    assert torch.allclose(mean, s.predict_x0(x_t, 0, eps), rtol=1e-12)


def test_network_timestep(base):
    s = base.respace(4)
    assert s.network_timestep(2, 3).tolist() == [666, 666, 666]
    assert s.network_timestep(2, 3).dtype == torch.int64


def test_unknown_parameterization():
    with pytest.raises(ValueError):
        Schedule(torch.full((10,), 0.01), parameterization="x0")
