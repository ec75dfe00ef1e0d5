"""Pipeline stages, the tiled VAE's blending, and the reduced-precision paths."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stablesr_min import pipeline as pl
from stablesr_min.config import StableSRConfig
from stablesr_min.image_io import load_image
from stablesr_min.pipeline import StableSRPipeline, UpscaleOptions, official_resize, pad_canvas, upsample, vae_tiles
from stablesr_min.unet import UNet
from stablesr_min.weights import load_module

from golden import relative_error


def test_upsample_and_pad_sizes():
    lr = torch.rand(1, 3, 21, 37) * 2 - 1
    up = upsample(lr, 4)
    assert up.shape[-2:] == (84, 148) and up.min() >= -1 and up.max() <= 1
    canvas = pad_canvas(up, 128)
    assert canvas.shape[-2:] == (128, 152)  # at least one tile, then a multiple of 8
    assert torch.equal(canvas[..., :84, :148], up) and canvas[..., 84:, :].abs().max() == 0


def test_vae_tiles_cover_the_canvas_once_after_blending():
    opts = UpscaleOptions(vae_tile=128, vae_overlap=32)
    total = torch.zeros(200, 328, dtype=torch.float64)
    tiles = vae_tiles(200, 328, opts)
    assert len(tiles) == 2 * 4  # rows start at 0, 72; columns at 0, 96, 192, 200
    for tile in tiles:
        total[tile.rows, tile.cols] += tile.weight(1, opts.vae_overlap)
    assert total.min() > 0  # every pixel is covered, with weight


class PointwiseVAE(nn.Module):
    """A stand-in whose output at a pixel depends on that pixel's 8x8 cell only: tiling must not change it."""

    downscale = 8

    class cfg:
        embed_dim = 4

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.back = nn.Conv2d(4, 3, 1)

    def moments(self, x):
        return self.proj(F.avg_pool2d(x, 8))

    def encode_with_features(self, x):
        return self.moments(x), {}

    def decode(self, z, features=None, w=0.0):
        return self.back(F.interpolate(z, scale_factor=8, mode="nearest"))


def test_tiled_encode_and_decode_blend_back_to_the_whole_image_result():
    torch.manual_seed(0)
    vae = PointwiseVAE()
    canvas = torch.randn(2, 3, 200, 328)
    whole, tiled = UpscaleOptions(vae_tile=0), UpscaleOptions(vae_tile=128, vae_overlap=32)
    assert len(vae_tiles(200, 328, tiled)) > 1
    assert relative_error(pl.tiled_moments(vae, canvas, tiled), pl.tiled_moments(vae, canvas, whole)) < 1e-6
    z = torch.randn(2, 4, 25, 41)
    assert relative_error(pl.tiled_cfw_decode(vae, z, canvas, tiled), pl.tiled_cfw_decode(vae, z, canvas, whole)) < 1e-6


def test_tiled_vae_on_the_real_networks_stays_close(stablesr, cfw):
    """Tiles change GroupNorm statistics, so this is close, not equal: the seam trade-off in numbers."""
    torch.manual_seed(0)
    canvas = F.interpolate(torch.rand(1, 3, 20, 30) * 2 - 1, size=(160, 240), mode="bilinear")
    with torch.inference_mode():
        whole = pl.tiled_moments(stablesr.vae, canvas, UpscaleOptions(vae_tile=0))
        tiled = pl.tiled_moments(stablesr.vae, canvas, UpscaleOptions(vae_tile=128, vae_overlap=32))
    assert 0 < relative_error(tiled, whole) < 0.2


@torch.inference_mode()
def test_golden_unet_in_bfloat16_on_cpu(golden, stablesr_files):
    """A precision smoke test, not parity: the golden `unet` case (its stored encoder features as
    struct_cond) with bf16 weights and activations; GroupNorm and the attention softmax run in fp32."""
    unet = load_module(UNet(golden.config.unet), stablesr_files, "model.diffusion_model.", dtype=torch.bfloat16)
    struct_cond = {width: feature.bfloat16() for width, feature in golden.struct_cond().items()}
    out = unet(golden["unet.x"].bfloat16(), golden["unet.t"], golden["unet.context"].bfloat16(), struct_cond)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, golden["unet.output"]) < 2e-2


def small_run(pipe, generator_seed=0, **kw):
    opts = UpscaleOptions(scale=2, steps=2, tile=16, overlap=6, **kw)
    lr = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return pipe(lr, opts, generator=torch.Generator().manual_seed(generator_seed))


def test_pipeline_in_bfloat16_is_close_to_float32(golden_weights):
    from stablesr_min.model import load_cfw, load_stablesr

    fp32 = StableSRPipeline(load_stablesr([golden_weights[0]]), load_cfw(golden_weights[1]))
    bf16 = StableSRPipeline(load_stablesr([golden_weights[0]], dtype=torch.bfloat16),
                            load_cfw(golden_weights[1], dtype=torch.bfloat16))
    a, b = small_run(fp32), small_run(bf16)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (1, 3, 48, 80)
    assert relative_error(b, a) < 0.05


def test_fp16_decoder_overflow_falls_back_to_float32(stablesr, golden_weights, monkeypatch):
    from stablesr_min.model import load_cfw

    pipe = StableSRPipeline(stablesr, load_cfw(golden_weights[1], dtype=torch.float16))
    real = pl.tiled_cfw_decode

    def overflowing(cfw, z, canvas, opts):  # what an fp16 overflow looks like (without slow CPU fp16 convs)
        if next(cfw.parameters()).dtype == torch.float16:
            return torch.full_like(canvas, float("inf"))
        return real(cfw, z, canvas, opts)

    monkeypatch.setattr(pl, "tiled_cfw_decode", overflowing)
    with pytest.warns(UserWarning, match="overflowed in torch.float16; decoding again in float32"):
        out = small_run(pipe)
    assert torch.isfinite(out).all()
    assert next(pipe.cfw.parameters()).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_run(pipe)  # no second warning: the decoder stays float32


def test_the_smallest_tile_keeps_the_deepest_level_at_2x2():
    assert pl.smallest_tile(StableSRConfig()) == 16  # the official UNet: 4 levels, 3 halvings
    tiny = StableSRConfig.from_dict({"unet": {"channel_mult": [1, 2, 2]}, "time_encoder": {"channel_mult": [1, 2, 2]}})
    assert pl.smallest_tile(tiny) == 8  # 3 levels: 2 halvings, and never below 8
    deeper_encoder = StableSRConfig.from_dict({"unet": {"channel_mult": [1, 2, 2]},
                                               "time_encoder": {"channel_mult": [1, 1, 2, 2, 2]}})
    assert pl.smallest_tile(deeper_encoder) == 32  # the deeper of the two networks decides


def test_injected_noises_override_the_generator(stablesr, cfw):
    pipe = StableSRPipeline(stablesr, cfw)
    assert torch.equal(small_run(pipe, 0), small_run(pipe, 0))
    assert not torch.equal(small_run(pipe, 0), small_run(pipe, 1))


def test_sample_latent_then_finish_is_the_pipeline(stablesr, cfw):
    pipe = StableSRPipeline(stablesr, cfw)
    lr = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    opts = UpscaleOptions(tile=16, overlap=6, steps=3, colorfix="wavelet", dec_w=0.3)
    whole = pipe(lr, opts, generator=torch.Generator().manual_seed(7))
    pieces = pipe.finish(pipe.sample_latent(lr, opts, generator=torch.Generator().manual_seed(7)), opts)
    assert torch.equal(pieces, whole)


def test_sides_that_are_not_a_multiple_of_8_keep_their_exact_size(stablesr, cfw):
    """4x of 37 px is 148, not a multiple of 8: the canvas is padded to 152 and the output cropped back.
    (The official script resizes 37 px to 32 first; given 148 px, its CFW decoder fails on the floored
    latent.)"""
    pipe = StableSRPipeline(stablesr, cfw)
    lr = torch.rand(1, 3, 10, 37, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for colorfix in ("adain", "wavelet"):
        opts = UpscaleOptions(tile=16, overlap=6, steps=1, colorfix=colorfix)
        assert pipe(lr, opts, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 40, 148)


def official_load_img(path, size):
    """What the official script's `load_img` makes of a file, written out here as the reference: RGB,
    Pillow's Lanczos to `size` (w, h), float32 / 255, to [-1, 1], (1, 3, h, w)."""
    array = np.asarray(Image.open(path).convert("RGB").resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


@pytest.fixture
def photo_37x29(tmp_path):
    """A 37x29 8-bit RGB file of noise (Lanczos overshoots most on it, so the 8-bit clipping is exercised)."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (29, 37, 3), dtype=np.uint8)).save(path)
    return path


def test_official_resize_is_pillows_lanczos_to_multiples_of_8(photo_37x29):
    lr = load_image(photo_37x29).rgb
    assert torch.equal(official_resize(lr), official_load_img(photo_37x29, (32, 24)))
    assert torch.equal(official_resize(lr[..., :24, :32]), lr[..., :24, :32])  # already multiples of 8


def test_official_resize_of_a_non_8_bit_image_is_not_rounded_to_8_bits():
    """An image that is not 8-bit levels (a 16-bit file, a computed tensor) goes through Pillow's float
    mode: the same filter, within about a level of the 8-bit path (which rounds and clips between its
    horizontal and vertical passes), and values that are not 8-bit levels."""
    smooth = F.interpolate(torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(0)), size=(29, 37),
                           mode="bilinear", align_corners=False)
    eight_bit = (smooth * 255).round() / 255 * 2 - 1
    finer = eight_bit + 0.3 / 127.5 * torch.rand(eight_bit.shape, generator=torch.Generator().manual_seed(1))
    resized = official_resize(finer)
    levels = (resized + 1) / 2 * 255
    assert resized.shape == (1, 3, 24, 32) and (levels - levels.round()).abs().max() > 0.1
    assert 0 < (resized - official_resize(eight_bit)).abs().max() < 2 / 127.5  # under 2 levels


def test_official_resize_needs_sides_of_8(photo_37x29):
    with pytest.raises(ValueError, match=r"needs sides of at least 8 px, got 37x7; leave it off"):
        official_resize(load_image(photo_37x29).rgb[..., :7, :])


def test_official_resize_option_gives_the_official_size_and_lr_stage(stablesr, cfw, photo_37x29):
    """37x29 at x4: 128x96 with the official resize (its LR stage is Pillow's Lanczos to 32x24, then the
    bicubic upscale), 148x116 by default."""
    pipe = StableSRPipeline(stablesr, cfw)
    lr = load_image(photo_37x29).rgb
    official = UpscaleOptions(tile=16, overlap=6, steps=1, official_resize=True)
    sampled = pipe.sample_latent(lr, official, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.upsampled, upsample(official_load_img(photo_37x29, (32, 24)), 4))
    assert pipe.finish(sampled, official).shape == (1, 3, 96, 128)
    exact = UpscaleOptions(tile=16, overlap=6, steps=1)
    assert pipe(lr, exact, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 116, 148)
