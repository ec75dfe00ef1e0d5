"""The notebooks' measurements (stablesr_min/app/analysis.py), each checked against numbers worked out by hand."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablesr_min import degradation as realesrgan
from stablesr_min import objective
from stablesr_min.app.analysis import (HELDOUT, NOTEBOOK_PHOTOS, Demo, color_shift, degradation_stages, heldout_crops, heldout_scores,
                                       hue_round_trip_error, jump_profile, laplacian_variance, load_demo, load_photo, log_snr_timesteps,
                                       loss_by_timestep, matched_noise, prior_alone, sample_with_previews,
                                       seam_strength, sft_feature_similarity, snr, tile_borders, timestep_at_snr,
                                       to_numpy_image)
from stablesr_min.app.evaluate import score
from stablesr_min.config import DiffusionConfig
from stablesr_min.image_io import load_image
from stablesr_min.model import load_stablesr
from stablesr_min.pipeline import (StableSRPipeline, UpscaleOptions, draw, pad_canvas, start_latent, text_context,
                                   upsample)
from stablesr_min.schedule import Schedule
from stablesr_min.tiny import sampling_defaults, tiny_stablesr_files
from stablesr_min.train import sr as train
from stablesr_min.unet import SFT


def rand(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def checkerboard(size: int) -> torch.Tensor:
    """(1, 3, size, size) of 0 and 1 alternating pixel by pixel."""
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2).double().expand(1, 3, size, size)


# ------------------------------------------------------------------------------------------------------
# SNR


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    assert snr(torch.tensor([0.5, 0.9, 0.2], dtype=torch.float64)).tolist() == pytest.approx([1.0, 9.0, 0.25])
    ab = Schedule.from_config(DiffusionConfig()).alphas_cumprod
    values = snr(ab)
    # t = 0: ab = 1 - beta_0 = 0.99915, so SNR = 0.99915 / 0.00085
    assert values[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-12)
    assert values[-1].item() == pytest.approx(0.0046819, rel=1e-4)
    assert bool((values.diff() < 0).all())


def test_timestep_at_snr_finds_the_paper_s_5e_2():
    ab = Schedule.from_config(DiffusionConfig()).alphas_cumprod
    t = timestep_at_snr(ab, 5e-2)
    assert t == 770
    assert snr(ab)[t].item() == pytest.approx(5e-2, rel=0.01)


def test_log_snr_timesteps_spread_evenly_in_log_snr():
    ab = Schedule.from_config(DiffusionConfig()).alphas_cumprod
    timesteps = log_snr_timesteps(ab, 20)
    assert timesteps[0] == 0 and timesteps[-1] == 999 and timesteps == sorted(set(timesteps))
    # Steps of log10 SNR: (log10 1175.5 - log10 0.00468) / 19 = 0.284 each, up to rounding t to an integer
    # (which matters most near t = 0, where SNR falls fastest).
    gaps = snr(ab)[timesteps].log10().diff().neg()
    assert len(timesteps) == 20
    assert gaps.tolist() == pytest.approx([0.284] * 19, abs=0.04)


# ------------------------------------------------------------------------------------------------------
# The sharpness proxy


def test_laplacian_variance():
    assert laplacian_variance(torch.full((1, 3, 8, 8), 0.3)).item() == pytest.approx(0.0, abs=1e-24)
    # Every pixel of a 0/1 checkerboard has four opposite neighbours: the Laplacian is +4 or -4, variance 16.
    assert laplacian_variance(checkerboard(8)).item() == pytest.approx(16.0)


# ------------------------------------------------------------------------------------------------------
# Seams


def test_tile_borders():
    assert tile_borders(48, 16, 8) == [128, 256]
    assert tile_borders(32, 16) == [16]
    assert tile_borders(16, 16, 8) == []


def test_seam_strength_finds_a_planted_seam():
    rows = torch.arange(16, dtype=torch.float64)
    # A ramp rising 0.1 per row, with a step of 1 added at row 8: the jump there is 1.1, elsewhere 0.1.
    image = (0.1 * rows + (rows >= 8)).view(1, 1, 16, 1).expand(1, 3, 16, 10)
    profile = jump_profile(image, axis=-2)
    assert profile.shape == (15,)
    assert profile[7].item() == pytest.approx(1.1)
    assert seam_strength(image, [8], axis=-2) == pytest.approx(11.0)
    assert seam_strength(image, [4], axis=-2) == pytest.approx(0.1 / ((13 * 0.1 + 1.1) / 14))
    # A uniform ramp has no seam anywhere.
    ramp = (0.1 * torch.arange(12, dtype=torch.float64)).expand(1, 3, 5, 12)
    assert seam_strength(ramp, [3, 6, 9], axis=-1) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------
# Colour shift


def test_color_shift_is_the_per_channel_mean_difference():
    reference = rand(1, 3, 8, 8)
    output = torch.nn.functional.interpolate(reference, scale_factor=4, mode="nearest")
    output = output + torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert color_shift(output, reference)[0].tolist() == pytest.approx([0.1, -0.2, 0.0], abs=1e-12)


class StubVAE(torch.nn.Module):
    """An "autoencoder" whose latent is the image and whose decoder applies `decode` to it."""

    def __init__(self, decode):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device
        self.decoder = decode

    def encode(self, x):
        return type("Posterior", (), {"mean": x})()

    def decode(self, z):
        return self.decoder(z)


def test_hue_round_trip_error_is_zero_for_a_perfect_autoencoder_and_the_same_at_every_angle_for_a_grey_one():
    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 1
    assert hue_round_trip_error(StubVAE(lambda z: z), red) == {0: 0.0, 120: 0.0, 240: 0.0}
    # a decoder that drops colour: pure red, green or blue against grey 85 (rounded from 255/3) in every block:
    # (|255 - 85| + 85 + 85) / 3 = 113.33 levels at every angle
    grey = hue_round_trip_error(StubVAE(lambda z: z.mean(dim=1, keepdim=True).expand_as(z)), red)
    assert grey == pytest.approx({0: 340 / 3, 120: 340 / 3, 240: 340 / 3})
    # a decoder that knows one colour only (red) is right at 0 degrees and wrong at the others
    only_red = hue_round_trip_error(StubVAE(lambda z: torch.zeros_like(z).index_fill(1, torch.tensor([0]), 1.0) * 2 - 1), red)
    assert only_red[0] == 0 and only_red[120] == pytest.approx(170) and only_red[240] == pytest.approx(170)


# ------------------------------------------------------------------------------------------------------
# Photos and display


def test_load_photo_covers_and_crops():
    photo = load_photo("coffee.png", (40, 30))  # coffee.png is 600 x 400: scaled to height 40, then cropped
    assert photo.shape == (1, 3, 40, 30)
    assert 0 <= photo.min().item() and photo.max().item() <= 1


def test_to_numpy_image_maps_the_value_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    image = to_numpy_image(x, value_range=(-1, 1))
    assert image.shape == (2, 2, 3)
    assert image[..., 0].ravel().tolist() == [0.0, 0.5, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------------
# SFT similarity (Fig. 3), on the golden-size model


@pytest.fixture
def latents(stablesr):
    g = torch.Generator().manual_seed(0)
    z0, lr_latent, noise = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        context = text_context(stablesr, "", 1)
    return z0, lr_latent, context, noise


def sft_layers(model):
    return [m for m in model.unet.modules() if isinstance(m, SFT)]


def with_sft(model, gamma_bias: float, beta_bias: float):
    """A copy of `model` whose SFT layers output (1 + gamma_bias) * F + beta_bias, F = the plain
    normalisation of the feature (GroupNorm with weight 1, bias 0)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in sft_layers(model):
            for conv, bias in ((layer.mlp_gamma, gamma_bias), (layer.mlp_beta, beta_bias)):
                conv.weight.zero_()
                conv.bias.fill_(bias)
            layer.param_free_norm.weight.fill_(1)
            layer.param_free_norm.bias.zero_()
    return model


def test_sft_similarity_of_known_modulations(stablesr, latents):
    timesteps = [0, 500, 999]
    identity = sft_feature_similarity(with_sft(stablesr, 0, 0), *latents[:3], timesteps, latents[3])
    assert identity.tolist() == pytest.approx([1, 1, 1], abs=1e-12)
    flipped = sft_feature_similarity(with_sft(stablesr, -2, 0), *latents[:3], timesteps, latents[3])
    assert flipped.tolist() == pytest.approx([-1, -1, -1], abs=1e-12)
    # F has zero mean per group and unit variance, so <F, F + 1> = |F|^2 = N and |F + 1|^2 = 2N:
    # the cosine is 1 / sqrt(2) (up to GroupNorm's eps).
    shifted = sft_feature_similarity(with_sft(stablesr, 0, 1), *latents[:3], timesteps, latents[3])
    assert shifted.tolist() == pytest.approx([2**-0.5] * 3, abs=1e-4)


def test_sft_similarity_with_a_fixed_encoder_timestep(stablesr, latents):
    z0, lr_latent, context, noise = latents
    aware = sft_feature_similarity(stablesr, z0, lr_latent, context, [100, 800], noise)
    assert aware.shape == (2,) and bool((aware.abs() < 1).all())
    # Fixing the encoder's t at the UNet's own t changes nothing; fixing it elsewhere does.
    same = sft_feature_similarity(stablesr, z0, lr_latent, context, [800], noise, fixed_encoder_t=800)
    assert same.item() == aware[1].item()
    other = sft_feature_similarity(stablesr, z0, lr_latent, context, [800], noise, fixed_encoder_t=100)
    assert other.item() != aware[1].item()
    assert all(not layer._forward_hooks for layer in sft_layers(stablesr))


def test_sft_similarity_calibration_with_a_random_condition(stablesr, latents):
    z0, lr_latent, context, noise = latents
    first = sft_feature_similarity(stablesr, z0, lr_latent, context, [100, 800], noise,
                                   random_condition=torch.Generator().manual_seed(3))
    again = sft_feature_similarity(stablesr, z0, lr_latent, context, [100, 800], noise,
                                   random_condition=torch.Generator().manual_seed(3))
    real = sft_feature_similarity(stablesr, z0, lr_latent, context, [100, 800], noise)
    assert torch.equal(first, again)  # the draw comes from the generator alone
    assert bool((first != real).all()) and bool((first.abs() < 1).all())


def test_matched_noise_keeps_mean_and_std_per_channel_and_nothing_else():
    feature = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 5.0])[:, None, None] + 7
    noise = matched_noise(feature, torch.Generator().manual_seed(1))
    std = feature.std(dim=(-2, -1))
    assert ((noise.mean(dim=(-2, -1)) - feature.mean(dim=(-2, -1))).abs() / std).max() < 4 / 64  # 4 sigma of 64x64 draws
    assert torch.allclose(noise.std(dim=(-2, -1)), std, rtol=0.05)
    centred = [(x - x.mean(dim=(-2, -1), keepdim=True)).flatten(1) for x in (feature, noise)]
    assert F.cosine_similarity(*centred, dim=1).abs().max() < 0.05  # uncorrelated with the feature


def test_prior_alone_is_the_unet_without_guidance(stablesr, latents):
    prior = prior_alone(stablesr)
    assert prior.time_encoder is None and not sft_layers(prior)
    shared = {k: v for k, v in stablesr.state_dict().items() if not train.is_trainable(k)}
    assert prior.state_dict().keys() == shared.keys()
    assert all(torch.equal(prior.state_dict()[k], v) for k, v in shared.items())
    z0, lr_latent, context, noise = latents
    t = torch.tensor([500])
    with torch.no_grad():
        unguided = prior.unet(noise, t, context)
        guided = stablesr.unet(noise, t, context, stablesr.time_encoder(lr_latent, t))
    assert unguided.shape == guided.shape and not torch.allclose(unguided, guided)


# ------------------------------------------------------------------------------------------------------
# The pipeline in pieces


@pytest.fixture(scope="module")
def pipe(stablesr, cfw):
    return StableSRPipeline(stablesr, cfw)


SMALL = dict(tile=16, overlap=6, steps=3)


def test_previews_leave_sampling_alone_and_end_at_the_result(pipe):
    opts = UpscaleOptions(**SMALL)
    lr = rand(1, 3, 16, 16, seed=4).float() * 2 - 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        canvas = pad_canvas(upsample(lr, opts.scale), opts.tile * 8)
        z0 = pipe.encode(canvas, opts, generator=g)
        x_T = start_latent(pipe.train_schedule, z0, draw(z0, g))
        context = text_context(pipe.model, "", 1)
        plain = pipe.sample(x_T, z0, context, opts, generator=torch.Generator().manual_seed(2))
    x0, previews = sample_with_previews(pipe, x_T, z0, context, opts, torch.Generator().manual_seed(2), at=[0, 2])
    assert torch.equal(x0, plain)
    assert [(p.steps_done, p.timestep) for p in previews] == [(0, 999), (2, 0)]
    assert torch.equal(previews[0].x, x_T)
    # The last step (k = 0) returns the posterior mean with coefficients (1, 0): the predicted x_0 itself.
    assert torch.allclose(previews[1].x0, x0, atol=1e-6)
    with pytest.raises(ValueError):
        sample_with_previews(pipe, x_T, z0, context, opts, g, at=[3])


def test_demo_options_are_the_weights_own_then_the_official(pipe):
    stored = {"sampler": "ddim", "steps": 20, "tile": 16, "overlap": 6, "dec_w": 1.0, "colorfix": "adain"}
    tiny = Demo(pipe, "test weights", stored, device=torch.device("cpu"))
    opts = tiny.options(dec_w=0.25)
    assert (opts.sampler, opts.tile, opts.overlap, opts.steps, opts.dec_w) == ("ddim", 16, 6, 20, 0.25)
    assert tiny.tile_px == 16 * pipe.model.vae.downscale
    assert tiny.lr_size(1, 1.5) == (tiny.tile_px // 4, round(1.5 * tiny.tile_px / 4))
    official = Demo(pipe, "official", {}, device=torch.device("cpu")).options()
    assert (official.sampler, official.tile, official.overlap, official.steps) == ("ddpm", 64, 32, 200)


def test_demo_loads_the_shipped_model_by_default(monkeypatch):
    monkeypatch.delenv("STABLESR_WEIGHTS", raising=False)
    demo = load_demo("cpu")
    assert "tiny StableSR shipped with stablesr-min (time-aware" in demo.weights
    assert demo.defaults == sampling_defaults(tiny_stablesr_files())
    blind = load_demo("cpu", variant="time_blind")
    assert not blind.pipe.model.cfg.time_encoder.time_aware and demo.pipe.model.cfg.time_encoder.time_aware


def test_heldout_crops_are_full_resolution_pieces_of_the_heldout_photos():
    crops = heldout_crops(96, per_image=3)
    assert len(crops) == 6 and all(c.shape == (1, 3, 96, 96) for c in crops.values())
    assert sorted({name.split("@")[0] for name in crops}) == ["chelsea.png", "coffee.png"]
    assert set(NOTEBOOK_PHOTOS) < {p.name for p in HELDOUT.iterdir()}  # held-out photos, two of the ten
    kodak = heldout_crops(96, per_image=1, photos=["kodim03.png"])  # 768 x 512: at x = 0, centred in y
    assert list(kodak) == ["kodim03.png@0,208"]
    assert torch.equal(kodak["kodim03.png@0,208"], ((load_image(HELDOUT / "kodim03.png").rgb + 1) / 2)[..., 208:304, 0:96])
    chelsea = (load_image(HELDOUT / "chelsea.png").rgb + 1) / 2  # 451 x 300: crops along x, centred in y
    first, last = crops["chelsea.png@0,102"], crops["chelsea.png@355,102"]
    assert torch.equal(first, chelsea[..., 102:198, 0:96]) and torch.equal(last, chelsea[..., 102:198, 355:451])


def test_degradation_stages_end_in_the_lr_that_degrade_makes():
    hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kernels, stages = degradation_stages(hr, seed=3)
    assert kernels.shape[0] == 3 and stages[0] == ("HR", hr)
    assert [name for name, _ in stages[1:3]] == ["1: blur", stages[2][0]] and stages[2][0].startswith("1: resize")
    gen = torch.Generator().manual_seed(3)
    cfg = realesrgan.DegradationConfig()
    lr = realesrgan.degrade(hr, realesrgan.draw_image_kernels(gen, cfg).unsqueeze(0), cfg, gen)
    assert torch.equal(stages[-1][1], lr) and lr.shape == (1, 3, 16, 16)
    assert torch.equal(kernels, realesrgan.draw_image_kernels(torch.Generator().manual_seed(3), cfg))


def test_loss_by_timestep_is_the_training_objective(golden_weights):
    model = load_stablesr([golden_weights[0]])
    hr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    lr = F.avg_pool2d(hr, 4)
    bands = [(0, 0), (100, 300)]
    losses = loss_by_timestep(model, lr, hr, bands, per_band=3, seed=5)
    assert losses.shape == (2,) and torch.equal(losses, loss_by_timestep(model, lr, hr, bands, per_band=3, seed=5))
    # by hand: the same latents and noise, the objective at t = 0
    gen = torch.Generator().manual_seed(5)
    z_lr, z = objective.latents(model, lr, hr, gen)
    noise = torch.randn(z.shape, generator=gen)
    expected = objective.diffusion_loss(objective.Denoiser(model), Schedule.from_config(model.cfg.diffusion), z_lr, z,
                              torch.zeros(2, dtype=torch.long), noise, text_context(model, "", 2))
    assert torch.allclose(losses[0], expected)


def test_heldout_scores_are_evaluate_scores(pipe):
    crops = dict(list(heldout_crops(64, per_image=1).items())[:1])
    opts = UpscaleOptions(steps=2, tile=16, overlap=6)
    means, images = heldout_scores(pipe, crops, opts, seed=1)
    (name, hr), = crops.items()
    assert images[name]["sr"].shape == hr.shape and images[name]["lr"].shape == (1, 3, 16, 16)
    assert means["sr"] == score(images[name]["sr"], hr, 0) and means["bicubic"] == score(images[name]["bicubic"], hr, 0)


def test_the_vae_hue_check_uses_fifteen_training_crops_and_no_held_out_photo():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "vae_hue_check.py"
    spec = importlib.util.spec_from_file_location("vae_hue_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    crops = script.training_crops()
    assert crops.shape == (15, 3, 128, 128) and 0 <= crops.min() and crops.max() <= 1
    assert not set(script.COLOUR_PHOTOS) & {p.name for p in HELDOUT.iterdir()}
    assert all(crop.std(dim=0).mean() > 0.01 for crop in crops)  # colour photos: the channels differ
