"""DDIM (Song et al. 2021) as the official negative-prompt script samples, and classifier-free guidance
against a negative prompt: the tables, the update's defining properties, guidance at scale 1 being exactly
no guidance, and a deterministic DDIM at eta 0. (The golden `ddim_step` case checks the numbers against
the official code: tests/test_golden.py.)"""

import math

import pytest
import torch

from stablesr_min.config import DiffusionConfig
from stablesr_min.pipeline import Noises, StableSRPipeline, UpscaleOptions, make_denoiser, start_latent, text_context
from stablesr_min.schedule import DDIMSchedule, Schedule, ddim_timesteps

from golden import relative_error

TRAIN = Schedule.from_config(DiffusionConfig())


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps, expected", [
    (5, [0, 200, 400, 600, 800]),
    (4, [0, 250, 500, 750]),
    (7, list(range(0, 1000, 142))),  # 8 timesteps, 0 .. 994: more than the 7 steps taken
])
def test_ddim_timesteps_every_1000_over_steps_from_0(steps, expected):
    assert ddim_timesteps(1000, steps) == expected
    assert DDIMSchedule(TRAIN, steps, 1.0).ddim_timesteps.tolist() == expected


def test_networks_are_told_the_respaced_timesteps():
    """The official script's loop runs over the DDPM respacing's timesteps, rounded half to even."""
    assert DDIMSchedule(TRAIN, 7, 1.0).network_timesteps.tolist() == [0, 166, 333, 500, 666, 832, 999]
    assert DDIMSchedule(TRAIN, 5, 1.0).network_timesteps.tolist() == [0, 250, 500, 749, 999]


def test_alphas_and_the_first_steps_target():
    ddim = DDIMSchedule(TRAIN, 5, 1.0)
    ab = TRAIN.alphas_cumprod
    assert torch.equal(ddim.ddim_alphas, ab[[0, 200, 400, 600, 800]])
    assert torch.equal(ddim.ddim_alphas_prev, ab[[0, 0, 200, 400, 600]])  # ab[0], not 1, before the first


def test_sigmas_at_eta_1_are_the_ddpm_posterior_std_and_0_at_eta_0():
    ddim = DDIMSchedule(TRAIN, 20, 1.0)
    # a DDPM whose steps jump between the DDIM timesteps: beta_i = 1 - a_i / a_{i-1}
    a = ddim.ddim_alphas
    ddpm = Schedule(1 - a / torch.cat([a.new_ones(1), a[:-1]]))
    assert torch.allclose(ddim.ddim_sigmas[1:] ** 2, ddpm.posterior_variance[1:], rtol=1e-12, atol=0)
    assert ddim.ddim_sigmas[0] == 0  # a_prev = a_t at the first timestep
    assert torch.equal(DDIMSchedule(TRAIN, 20, 0.0).ddim_sigmas, torch.zeros(20, dtype=torch.float64))
    half = DDIMSchedule(TRAIN, 20, 0.5).ddim_sigmas
    assert torch.allclose(half, ddim.ddim_sigmas / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("index", [0, 2, 4])
def test_deterministic_step_keeps_the_noise_direction(index):
    """DDIM at eta 0 with the true noise: x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps gives back x0 exactly and
    moves to sqrt(a_prev) x0 + sqrt(1-a_prev) eps, the same x0 and noise at the earlier timestep."""
    ddim = DDIMSchedule(TRAIN, 5, 0.0)
    a_t, a_prev = float(ddim.ddim_alphas[index]), float(ddim.ddim_alphas_prev[index])
    x0, eps = randn(2, 4, 8, 8, seed=1).double(), randn(2, 4, 8, 8, seed=2).double()
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    x_prev, pred_x0 = ddim.step(x_t, index, eps, randn(2, 4, 8, 8, seed=3).double())
    assert torch.allclose(pred_x0, x0, rtol=0, atol=1e-10)
    assert torch.allclose(x_prev, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, rtol=0, atol=1e-10)


def test_v_prediction_gives_the_eps_step():
    """A v-model's output v = sqrt(a_t) eps - sqrt(1 - a_t) x0 takes the same step as an eps-model's eps."""
    eps_ddim, v_ddim = DDIMSchedule(TRAIN, 5, 1.0), DDIMSchedule(Schedule(TRAIN.betas, parameterization="v"), 5, 1.0)
    a_t = float(eps_ddim.ddim_alphas[3])
    x0, eps, noise = (randn(1, 4, 8, 8, seed=s).double() for s in (1, 2, 3))
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    v = math.sqrt(a_t) * eps - math.sqrt(1 - a_t) * x0
    for ours, expected in zip(v_ddim.step(x_t, 3, v, noise), eps_ddim.step(x_t, 3, eps, noise)):
        assert torch.allclose(ours, expected, rtol=0, atol=1e-10)


def test_eta_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        DDIMSchedule(TRAIN, 5, 1.5)


# ------------------------------------------------------------------------------------------------------
# Guidance, on the golden-size model


@pytest.fixture(scope="module")
def tiles(stablesr):
    """Two tiles of a batch of two images (rows tile-major), their LR tiles, two contexts per image."""
    cfg = stablesr.cfg
    x, lr = randn(4, 4, 16, 16, seed=1), randn(4, 4, 16, 16, seed=2)
    context = randn(2, cfg.text.context_length, cfg.unet.context_dim, seed=3)
    negative = randn(2, cfg.text.context_length, cfg.unet.context_dim, seed=4)
    return x, lr, torch.tensor([600] * 4), context, negative


@torch.inference_mode()
def test_guidance_scale_1_is_exactly_no_guidance(stablesr, tiles):
    x, lr, t, context, negative = tiles
    plain = make_denoiser(stablesr, context)(x, lr, t)
    assert torch.equal(make_denoiser(stablesr, context, negative, 1.0)(x, lr, t), plain)
    assert torch.equal(make_denoiser(stablesr, context, None, 7.0)(x, lr, t), plain)


@torch.inference_mode()
def test_guided_output_is_negative_plus_scale_times_the_difference(stablesr, tiles):
    """One batched pass over both contexts equals two separate passes combined, per image."""
    x, lr, t, context, negative = tiles
    e_pos = make_denoiser(stablesr, context)(x, lr, t)
    e_neg = make_denoiser(stablesr, negative)(x, lr, t)
    guided = make_denoiser(stablesr, context, negative, 5.0)(x, lr, t)
    assert relative_error(guided, e_neg + 5.0 * (e_pos - e_neg)) < 1e-5  # batch-size rounding only
    assert (guided - e_pos).abs().max() > 1e-2


@pytest.fixture(scope="module")
def start(stablesr, cfw):
    """A pipeline, a (1, 4, 16, 24) LR latent (two 16-latent tiles), a start latent and the text context."""
    pipe = StableSRPipeline(stablesr, cfw)
    z0, x_T = randn(1, 4, 16, 24, seed=5), randn(1, 4, 16, 24, seed=6)
    return pipe, z0, x_T, text_context(stablesr, "", 1)


def sample(start, seed, **options):
    pipe, z0, x_T, context = start
    opts = UpscaleOptions(steps=2, tile=16, overlap=6, **options)
    with torch.inference_mode():
        return pipe.sample(x_T, z0, context, opts, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pipeline_guidance_scale_1_and_no_negative_prompt_are_bit_identical(start, sampler):
    plain = sample(start, 0, sampler=sampler)
    assert torch.equal(sample(start, 0, sampler=sampler, negative_prompt="blurry", guidance_scale=1.0), plain)
    assert torch.equal(sample(start, 0, sampler=sampler, guidance_scale=5.0), plain)
    guided = sample(start, 0, sampler=sampler, negative_prompt="blurry", guidance_scale=5.0)
    assert (guided - plain).abs().max() > 1e-2


def test_ddim_at_eta_0_is_deterministic_given_the_start_latent(start):
    a, b = sample(start, 0, sampler="ddim", eta=0.0), sample(start, 1, sampler="ddim", eta=0.0)
    assert torch.equal(a, b)
    c, d = sample(start, 0, sampler="ddim", eta=1.0), sample(start, 1, sampler="ddim", eta=1.0)
    assert (c - d).abs().max() > 1e-2  # eta 1 does use the generator


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddim_starts_from_pure_noise_and_ddpm_from_the_noised_lr_latent(stablesr, cfw, sampler):
    """The official DDIM canvas script discards q(x_999 | z_0) and starts from the noise itself."""
    pipe = StableSRPipeline(stablesr, cfw)
    pipe.sample = lambda x_T, z0, *args, **kwargs: torch.stack([x_T, z0])  # what sampling would start from
    lr, noise = randn(1, 3, 16, 16, seed=7).clamp(-1, 1), randn(1, 4, 16, 16, seed=8)
    opts = UpscaleOptions(tile=16, overlap=6, sampler=sampler)
    x_T, z0 = pipe.sample_latent(lr, opts, noises=Noises(x_T=noise), generator=torch.Generator().manual_seed(0)).x0
    assert torch.equal(x_T, noise if sampler == "ddim" else start_latent(pipe.train_schedule, z0, noise))
    assert (z0 - noise).abs().max() > 0.1


@pytest.mark.parametrize("options, message", [
    ({"sampler": "euler"}, "sampler must be 'ddpm' or 'ddim', got 'euler'"),
    ({"eta": -1.0}, "eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got -1"),
    ({"eta": float("nan")}, "eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got nan"),
    ({"guidance_scale": -2.0}, "guidance_scale must be a number >= 0 (1: no guidance), got -2"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a number >= 0 (1: no guidance), got inf"),
    ({"dec_w": 2.0}, "dec_w (the CFW weight w) must be in [0, 1], got 2"),
])
def test_bad_sampler_options(options, message):
    with pytest.raises(ValueError) as error:
        UpscaleOptions(**options)
    assert str(error.value) == message
