"""LR image -> SR image, as the official canvas script does it (`sr_val_ddpm_text_T_vqganfin_oldcanvas.py`).

    lr (--Lanczos to sides of 8k, opt-in: `official_resize`--> lr)
       --bicubic x scale--> upsampled --zero-pad--> canvas --VAE--> z_0 --q(x_999|z_0)--> x_T
       --N respaced DDPM steps, aggregation over tiles (Sec. 3.3)--> x_0
       --CFW decoder with the canvas's encoder features, weight w (Sec. 3.2)--> crop --colour fix--> SR

Each stage is a function of its own, so a notebook can run them one by one. Every random draw (the VAE
posterior sample, the noise of x_T, one noise per step) comes from one seeded `torch.Generator`, in that
order, unless the caller passes the draws in (`Noises`), as the golden pipeline case does.

`UpscaleOptions(sampler="ddim")` samples as the official DDIM script does instead
(`sr_val_ddim_text_T_negativeprompt_canvas.py`): DDIM steps (Song et al. 2021) from pure noise, and
either sampler can use classifier-free guidance against a negative prompt (`make_denoiser`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cfw import CFWAutoencoder
from .colorfix import METHODS as COLORFIX_METHODS
from .colorfix import color_fix
from .config import SCALE, StableSRConfig
from .errors import OptionError
from .model import StableSR
from .sampler import Progress, aggregation_step, ddim_step, gaussian_weights, tile_starts
from .schedule import DDIMSchedule, Schedule
from .tokenizer import tokenize
from .vae import AutoencoderKL, DiagonalGaussian


SAMPLERS = ("ddpm", "ddim")  # UpscaleOptions.sampler: the paper's DDPM, or the official DDIM script's


@dataclass
class UpscaleOptions:
    scale: float = float(SCALE)  # output size / input size
    steps: int = 200  # sampling steps; 200 respaced DDPM steps is the paper's setting and what the official
    #                   README's commands pass (the official script's own --ddpm_steps default is 1000)
    sampler: str = "ddpm"  # "ddpm" (the paper's) or "ddim" (the official DDIM script's; 20-50 steps there)
    # DDIM's eta: 0 deterministic, 1 the DDPM posterior's noise. The official author found 1 better than 0
    # (github IceClear/StableSR issue #108; the README's DDIM example uses --ddim_eta 1.0).
    eta: float = 1.0
    guidance_scale: float = 1.0  # classifier-free guidance against `negative_prompt`; 1 = none (official: 7)
    negative_prompt: str = ""  # what guidance steers away from; "" = no guidance
    tile: int = 64  # latent tile of aggregation sampling (64 latents = 512 px, the training size)
    overlap: int = 32  # latent overlap between neighbouring tiles
    tile_batch: int = 4  # tiles per network call
    tile_weights: str = "paper"  # Gaussian tile weights (std 0.1 tile: the official code's; the paper gives
    #                              no sigma): "paper" centred on the tile, "official" the reference's (row centre T/2)
    dec_w: float = 0.5  # CFW fusion weight w of Eq. 2: 0 = most realistic, 1 = most faithful
    colorfix: str = "adain"  # "adain" (the paper's), "wavelet" (the official repo's) or "none"
    prompt: str = ""  # text prompt; StableSR was trained with the empty prompt
    vae_tile: int = 512  # VAE/CFW tile in pixels for large images (0: never tile); see `tiled_vae`
    vae_overlap: int = 64  # pixel overlap of VAE tiles
    official_resize: bool = False  # first cut each LR side down to a multiple of 8 (Pillow's Lanczos), as the
    #                                official script does: output int(8k * scale), not int(side * scale)

    def __post_init__(self):
        checks = [  # (holds, the field, what it must be)
            (self.scale > 0, "scale", "must be > 0"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.sampler in SAMPLERS, "sampler", "must be 'ddpm' or 'ddim'"),
            (0 <= self.eta <= 1, "eta", "must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise)"),
            (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale",
             "must be a number >= 0 (1: no guidance)"),
            (self.tile >= 8, "tile", "must be >= 8 latents"),
            (0 <= self.overlap < self.tile, "overlap", f"must be >= 0 and below the tile ({self.tile})"),
            (self.tile_batch >= 1, "tile_batch", "must be >= 1"),
            (self.tile_weights in ("paper", "official"), "tile_weights", "must be 'paper' or 'official'"),
            (0 <= self.dec_w <= 1, "dec_w", "(the CFW weight w) must be in [0, 1]"),
            (self.colorfix in COLORFIX_METHODS, "colorfix",
             f"must be {', '.join(COLORFIX_METHODS[:-1])} or {COLORFIX_METHODS[-1]}"),
            (self.vae_overlap >= 0 and self.vae_overlap % 8 == 0, "vae_overlap", "must be a multiple of 8, >= 0"),
            (self.vae_tile == 0 or (self.vae_tile % 64 == 0 and self.vae_tile > 2 * self.vae_overlap), "vae_tile",
             f"must be 0 or a multiple of 64 above twice the tiles' overlap of {self.vae_overlap} px"),
        ]
        for holds, name, rule in checks:
            if not holds:
                value = getattr(self, name)
                shown = f"{value:g}" if isinstance(value, float) else repr(value)  # a number as typed: 2, not 2.0
                raise OptionError(name, f"{rule}, got {shown}")

    @property
    def guided(self) -> bool:
        """Does sampling run the networks a second time, on the negative prompt? (Not at scale 1, where
        the guided prediction equals the positive one, nor without a negative prompt, as officially.)"""
        return bool(self.negative_prompt) and self.guidance_scale != 1


@dataclass
class Noises:
    """Random draws passed in from outside; whatever is None is drawn from the generator."""

    vae: torch.Tensor | None = None  # posterior sample noise, latent-shaped
    x_T: torch.Tensor | None = None  # noise of q(x_999 | z_0); with sampler "ddim" the start latent itself
    steps: list[torch.Tensor] = field(default_factory=list)  # one per step taken, first step first


# ------------------------------------------------------------------------------------------------------
# Stages


def official_size(h: int, w: int) -> tuple[int, int]:
    """The LR size the official script works at: each side cut down to a multiple of 8 (37 -> 32)."""
    if h < 8 or w < 8:
        raise ValueError(f"the official resize cuts each side down to a multiple of 8, so it needs sides of "
                         f"at least 8 px, got {w}x{h}; leave it off for this image")
    return h - h % 8, w - w % 8


def official_resize(lr: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) in [-1, 1] -> (B, 3, h - h % 8, w - w % 8): the official script's input resize.

    Its `load_img` resizes every input with Pillow's Lanczos to sides cut down to a multiple of 8 before
    the bicubic upscale. When the two sides lose different fractions the output is stretched (official
    issue #81), which is why this is opt-in. Pillow does the resize here too, so it is the same
    operation: an image of 8-bit values (every 8-bit file `load_image` reads) is resized as the 8-bit
    RGB image the official script resizes, which gives its numbers exactly; any other image (16-bit
    files, computed tensors) in Pillow's 32-bit float mode, channel by channel: the same filter without
    the 8-bit path's rounding and clipping (also between its horizontal and vertical passes), so the
    two differ by about a level on photos. It is a pipeline stage rather than part of `load_image` so that
    one option (`UpscaleOptions.official_resize`) serves the command line, the Python API and tensors
    that never were files, and the loader stays a plain reader of what is in the file.
    """
    h, w = lr.shape[-2:]
    size = official_size(h, w)
    if size == (h, w):
        return lr  # Pillow's resize to the same size is a copy
    return torch.stack([_pillow_lanczos(image, size) for image in lr.cpu().float()]).to(lr)


def _pillow_lanczos(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) in [-1, 1] -> (3, *size) in [-1, 1], resized by Pillow's Lanczos filter."""
    levels = (image.double() + 1) / 2 * 255
    pil_size = (size[1], size[0])  # Pillow sizes are (width, height)
    if (levels - levels.round()).abs().max() < 1e-3:
        # (3, h, w) -> (h, w, 3) 8-bit, resized, -> (3, H, W) in [0, 1], as `load_image` divides
        rgb = Image.fromarray(levels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        resized = torch.from_numpy(np.asarray(rgb.resize(pil_size, Image.LANCZOS), dtype=np.float32) / 255.0)
        resized = resized.permute(2, 0, 1)
    else:
        channels = ((image + 1) / 2).numpy()
        resized = torch.stack([torch.from_numpy(np.array(Image.fromarray(c).resize(pil_size, Image.LANCZOS)))
                               for c in channels]).clamp(0, 1)  # clipped to [0, 1] as the 8-bit resize clips
    return resized * 2 - 1


def upsample(lr: torch.Tensor, scale: float) -> torch.Tensor:
    """Bicubic upscale (align_corners False, no antialias), clamped to [-1, 1] as the official script."""
    h, w = lr.shape[-2:]
    size = (int(h * scale), int(w * scale))
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def smallest_tile(cfg: StableSRConfig) -> int:
    """The smallest latent tile (`UpscaleOptions.tile`) this model takes: its UNet and time-aware encoder halve
    a tile once per level after the first, and their deepest maps should stay at least 2x2 (at 1x1 a narrow
    model's GroupNorm groups of one channel have a single value to normalise in a batch of one tile, which
    PyTorch refuses; wider models compute, but on a single pixel)."""
    halvings = max(len(cfg.unet.channel_mult), len(cfg.time_encoder.channel_mult)) - 1
    return max(8, 2 * 2**halvings)


def pad_canvas(image: torch.Tensor, min_size: int, multiple: int = 8) -> torch.Tensor:
    """Zero-pad bottom/right to at least `min_size` (one full tile) and to a multiple of `multiple`.

    The official script pads only to `min_size`. A longer side that is not a multiple of 8 breaks its CFW
    decoder (the VAE floors the latent, so encoder and decoder features differ by a pixel where they are
    concatenated); it meets one only at non-integer scales, because it resizes the LR input to sides of
    8k first (`official_resize`). Without that resize, padding to 8 is what keeps exact output sizes.
    """
    h, w = image.shape[-2:]
    new_h = math.ceil(max(h, min_size) / multiple) * multiple
    new_w = math.ceil(max(w, min_size) / multiple) * multiple
    return F.pad(image, (0, new_w - w, 0, new_h - h))


def text_context(model: StableSR, prompt: str, batch: int) -> torch.Tensor:
    tokens = tokenize([prompt] * batch).to(next(model.text_encoder.parameters()).device)
    return model.text_encoder(tokens)


def start_latent(schedule: Schedule, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_T = sqrt(ab_999) z_0 + sqrt(1 - ab_999) noise, with the 1000-step schedule.

    StableSR starts from the LR latent noised to the last training step, not from pure noise: at
    t = 999 almost nothing of z_0 survives (sqrt(ab) ~ 0.068), but the little that does anchors the
    low frequencies.
    """
    return schedule.q_sample(z0, len(schedule) - 1, noise)


def make_denoiser(model: StableSR, context: torch.Tensor, negative_context: torch.Tensor | None = None,
                  guidance_scale: float = 1.0):
    """The per-tile network call: time-aware encoder on the LR tile, then the UNet modulated by it.

    With a `negative_context` and a scale s != 1: classifier-free guidance (Ho & Salimans 2022, Eq. 6,
    with s = 1 + w) against a negative prompt, as the official DDIM script does it; the UNet runs on the
    negative and the positive context in one batch and

        e = e_neg + s * (e_pos - e_neg)

    The time-aware encoder does not read the text, so its features are computed once and used for both
    halves (the official script runs it on both; the numbers are the same). At s = 1 or without a negative
    context the second half is skipped, and the output is exactly the unguided one.

    The networks run in their own dtype (fp16/bf16 on a GPU); the latents and every sampling update stay
    in float32, so half precision never accumulates over the steps.
    """
    dtype = next(model.unet.parameters()).dtype
    guided = negative_context is not None and guidance_scale != 1

    def per_tile(ctx: torch.Tensor, rows: int) -> torch.Tensor:
        # tiles are stacked tile-major: row i belongs to image i % B
        return ctx.repeat(rows // ctx.shape[0], 1, 1).to(dtype)

    def denoise(x_tiles: torch.Tensor, lr_tiles: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x_tiles.shape[0]
        x_tiles, lr_tiles = x_tiles.to(dtype), lr_tiles.to(dtype)
        struct_cond = model.time_encoder(lr_tiles, t) if model.time_encoder is not None else None
        if not guided:
            return model.unet(x_tiles, t, per_tile(context, rows), struct_cond).float()
        # the negative half first, then the positive one: (n, ...) -> (2n, ...)
        both = torch.cat([per_tile(negative_context, rows), per_tile(context, rows)])
        twice = None if struct_cond is None else {w: torch.cat([s, s]) for w, s in struct_cond.items()}
        e_neg, e_pos = model.unet(torch.cat([x_tiles, x_tiles]), torch.cat([t, t]), both, twice).float().chunk(2)
        # e_neg + s * (e_pos - e_neg)
        return e_neg + guidance_scale * (e_pos - e_neg)

    return denoise


def tile_weight_map(opts: UpscaleOptions) -> torch.Tensor:
    return gaussian_weights(opts.tile, opts.tile, official=opts.tile_weights == "official")


# ------------------------------------------------------------------------------------------------------
# The whole pipeline

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step taken, steps, x after the step)


@dataclass
class Sampled:
    upsampled: torch.Tensor  # bicubic-upscaled LR, [-1, 1]: the colour fix's reference
    canvas: torch.Tensor  # `upsampled` zero-padded to whole tiles: the CFW encoder's input
    x0: torch.Tensor  # the latent after the last reverse step


class StableSRPipeline:
    def __init__(self, model: StableSR, cfw: CFWAutoencoder):
        self.model = model
        self.cfw = cfw
        self.cfg = model.cfg
        self.train_schedule = Schedule.from_config(self.cfg.diffusion)

    def speed_up(self, channels_last: bool = False, compile: bool = False) -> "StableSRPipeline":
        """Opt-in speed-ups meant for GPUs. Channels-last convolutions were 40% slower on this project's
        CPU (oneDNN, 2 cores); `torch.compile` of the per-step networks took minutes to compile there and
        gained nothing. Neither changes what is computed beyond rounding."""
        if channels_last:
            for module in (self.model, self.cfw):
                module.to(memory_format=torch.channels_last)
        if compile:
            self.model.model.diffusion_model = torch.compile(self.model.unet)
            if self.model.time_encoder is not None:
                self.model.structcond_stage_model = torch.compile(self.model.time_encoder)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    def canvas(self, upsampled: torch.Tensor, opts: UpscaleOptions) -> torch.Tensor:
        """The padded image the VAE encodes: at least one sampling tile, and a multiple of 8."""
        return pad_canvas(upsampled, opts.tile * self.model.vae.downscale, self.model.vae.downscale)

    def encode(self, canvas: torch.Tensor, opts: UpscaleOptions, *, mean: bool = False,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Canvas in [-1, 1] -> z_0 = scale_factor * (mean + std * noise), in float32: a posterior sample
        (`noise`, else drawn from `generator`), or with `mean` the posterior's mean."""
        moments = tiled_moments(self.model.vae, canvas.to(self.dtype), opts)
        posterior = DiagonalGaussian(moments.float())
        if mean:
            return self.cfg.diffusion.scale_factor * posterior.mean
        if noise is None:
            noise = draw(posterior.mean, generator)
        return self.cfg.diffusion.scale_factor * posterior.sample(noise.to(posterior.mean))

    def sample(self, x: torch.Tensor, z0: torch.Tensor, context: torch.Tensor, opts: UpscaleOptions, *,
               noises: list[torch.Tensor] = (), generator: torch.Generator | None = None,
               weights: torch.Tensor | None = None, progress: Progress | None = None,
               on_step: StepCallback | None = None) -> torch.Tensor:
        """N reverse steps of `opts.sampler` with aggregation from x (x_T); the time-aware encoder is
        conditioned on z_0. `noises`: the steps' noises (the first ones; the rest drawn from `generator`).
        With `opts.guided`, every network call is guided against `opts.negative_prompt`."""
        weights = tile_weight_map(opts) if weights is None else weights
        negative_context = text_context(self.model, opts.negative_prompt, x.shape[0]) if opts.guided else None
        denoise = make_denoiser(self.model, context, negative_context, opts.guidance_scale)
        tiling = dict(tile=opts.tile, overlap=opts.overlap, weights=weights, batch_size=opts.tile_batch,
                      progress=progress)
        if opts.sampler == "ddim":
            ddim = DDIMSchedule(self.train_schedule, opts.steps, opts.eta)

            def take_step(x: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
                return ddim_step(ddim, x, z0, k, denoise, noise, **tiling)[0]
        else:
            schedule = self.train_schedule.respace(opts.steps)

            def take_step(x: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
                return aggregation_step(schedule, x, z0, k, denoise, noise, **tiling)
        for i, k in enumerate(reversed(range(opts.steps))):
            noise = noises[i] if i < len(noises) else draw(x, generator)
            x = take_step(x, k, noise.to(x))
            if on_step is not None:
                on_step(i + 1, opts.steps, x)
        return x

    def decode(self, x0: torch.Tensor, canvas: torch.Tensor, opts: UpscaleOptions) -> torch.Tensor:
        """CFW decode of the final latent, fused with the canvas's encoder features (Eq. 2), in float32.

        The SD VAE decoder is known to overflow in float16 on some images: a non-finite result is
        decoded again in float32 (and the decoder stays float32 from then on), with a warning.
        """
        z = x0 / self.cfg.diffusion.scale_factor
        dtype = next(self.cfw.parameters()).dtype
        decoded = tiled_cfw_decode(self.cfw, z.to(dtype), canvas.to(dtype), opts).float()
        if dtype != torch.float32 and not torch.isfinite(decoded).all():
            warnings.warn(f"the CFW decoder overflowed in {dtype}; decoding again in float32", stacklevel=2)
            self.cfw.float()
            decoded = tiled_cfw_decode(self.cfw, z, canvas, opts)
        return decoded

    @torch.inference_mode()
    def sample_latent(self, lr: torch.Tensor, opts: UpscaleOptions, *, generator: torch.Generator | None = None,
                      noises: Noises | None = None, weights: torch.Tensor | None = None,
                      progress: Progress | None = None, on_step: StepCallback | None = None) -> Sampled:
        """Everything up to the final latent: (official resize,) upsample, pad, encode, x_T, N reverse steps."""
        noises = noises or Noises()
        lr = lr.to(self.device, torch.float32)
        if opts.official_resize:
            lr = official_resize(lr)
        upsampled = upsample(lr, opts.scale)
        canvas = self.canvas(upsampled, opts)
        z0 = self.encode(canvas, opts, noise=noises.vae, generator=generator)
        noise = (noises.x_T if noises.x_T is not None else draw(z0, generator)).to(z0)
        # The official DDIM canvas script computes q(x_999 | z_0) too, then discards it (`x_T = None`) and
        # starts from pure noise; its DDPM canvas script (and its untiled DDIM script) start from
        # q(x_999 | z_0). Each sampler starts as its official canvas script does.
        x_T = noise if opts.sampler == "ddim" else start_latent(self.train_schedule, z0, noise)
        context = text_context(self.model, opts.prompt, lr.shape[0])
        x0 = self.sample(x_T, z0, context, opts, noises=noises.steps, generator=generator, weights=weights,
                         progress=progress, on_step=on_step)
        return Sampled(upsampled, canvas, x0)

    @torch.inference_mode()
    def finish(self, sampled: Sampled, opts: UpscaleOptions) -> torch.Tensor:
        """CFW decode with `opts.dec_w` (Eq. 2), crop, colour fix: the SR image in [0, 1]. w and the colour
        fix only enter here, so one sampled latent can be finished several ways."""
        return colour_fixed(self.decoded(sampled, opts), sampled, opts.colorfix)

    def decoded(self, sampled: Sampled, opts: UpscaleOptions) -> torch.Tensor:
        """CFW decode with `opts.dec_w` (Eq. 2), cropped to the upsampled input's size: in [-1, 1], before the
        colour fix."""
        upsampled = sampled.upsampled
        return self.decode(sampled.x0, sampled.canvas, opts)[..., : upsampled.shape[-2], : upsampled.shape[-1]]

    def __call__(self, lr: torch.Tensor, opts: UpscaleOptions | None = None, *,
                 generator: torch.Generator | None = None, noises: Noises | None = None,
                 weights: torch.Tensor | None = None, progress: Progress | None = None,
                 on_step: StepCallback | None = None) -> torch.Tensor:
        """lr: (B, 3, h, w) in [-1, 1] -> SR image (B, 3, int(h*scale), int(w*scale)) in [0, 1]; with
        `opts.official_resize`, h and w are first cut down to multiples of 8."""
        opts = opts or UpscaleOptions()
        sampled = self.sample_latent(lr, opts, generator=generator, noises=noises, weights=weights,
                                     progress=progress, on_step=on_step)
        return self.finish(sampled, opts)


def colour_fixed(decoded: torch.Tensor, sampled: Sampled, method: str) -> torch.Tensor:
    """A decoded image (`StableSRPipeline.decoded`) colour-fixed towards the upsampled input: in [0, 1]."""
    return ((color_fix(decoded, sampled.upsampled, method) + 1) / 2).clamp(0, 1)


def draw(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the CPU (the same numbers on every device)."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like)


# ------------------------------------------------------------------------------------------------------
# Bounded memory: the VAE encoder and the CFW decoder in overlapping pixel tiles


@dataclass
class VAETile:
    rows: slice  # pixel rows of the canvas
    cols: slice  # pixel columns
    borders: tuple[bool, bool, bool, bool]  # does it touch the canvas's top, bottom, left, right?

    def latent(self, f: int) -> tuple[slice, slice]:
        return slice(self.rows.start // f, self.rows.stop // f), slice(self.cols.start // f, self.cols.stop // f)

    def weight(self, f: int, overlap: int) -> torch.Tensor:
        """Blending weights at 1/f resolution: linear ramps across the overlap, flat at canvas borders."""
        top, bottom, left, right = self.borders
        h, w = (self.rows.stop - self.rows.start) // f, (self.cols.stop - self.cols.start) // f
        return torch.outer(_ramp(h, overlap // f, top, bottom), _ramp(w, overlap // f, left, right))


def _ramp(size: int, overlap: int, start_is_border: bool, end_is_border: bool) -> torch.Tensor:
    w = torch.ones(size, dtype=torch.float64)
    ramp = (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap
    if overlap and not start_is_border:
        w[:overlap] = ramp
    if overlap and not end_is_border:
        w[-overlap:] = ramp.flip(0)
    return w


def vae_tiles(h: int, w: int, opts: UpscaleOptions) -> list[VAETile]:
    """Overlapping pixel tiles of an (h, w) canvas; one tile when tiling is off or not needed."""
    if opts.vae_tile == 0 or (h <= opts.vae_tile and w <= opts.vae_tile):
        return [VAETile(slice(0, h), slice(0, w), (True, True, True, True))]
    tile, overlap = opts.vae_tile, opts.vae_overlap
    tops, lefts = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    return [VAETile(slice(top, top + th), slice(left, left + tw),
                    (top == tops[0], top == tops[-1], left == lefts[0], left == lefts[-1]))
            for top in tops for left in lefts]


def tiled_moments(vae: AutoencoderKL, canvas: torch.Tensor, opts: UpscaleOptions) -> torch.Tensor:
    """The VAE posterior's moments (mean, log-variance) of the canvas. Large canvases are encoded in
    overlapping tiles whose moments are blended with linear ramps.

    Trade-off: GroupNorm statistics are then per tile, not per image, so tiles can differ slightly in
    tone; the overlap ramps hide the seams. Memory stays at one tile's activations (`vae_tile=0` turns
    tiling off and reproduces the official whole-image encoding exactly).
    """
    f = vae.downscale
    tiles = vae_tiles(*canvas.shape[-2:], opts)
    if len(tiles) == 1:
        return vae.moments(canvas)
    b, _, h, w = canvas.shape
    moments = canvas.new_zeros(b, 2 * vae.cfg.embed_dim, h // f, w // f)
    total = canvas.new_zeros(h // f, w // f)
    for tile in tiles:
        rows, cols = tile.latent(f)
        weight = tile.weight(f, opts.vae_overlap).to(canvas)
        moments[..., rows, cols] += weight * vae.moments(canvas[..., tile.rows, tile.cols])
        total[rows, cols] += weight
    return moments / total


def tiled_cfw_decode(cfw: CFWAutoencoder, z: torch.Tensor, canvas: torch.Tensor, opts: UpscaleOptions):
    """CFW decode (Eq. 2) of an unscaled latent with the canvas's encoder features, in overlapping pixel
    tiles for large canvases: each tile runs the CFW encoder on its own canvas region (so the features
    never exist for the whole image at once) and decodes its latent region; tiles are blended with
    linear ramps. Same trade-off as `tiled_moments`."""
    f = cfw.downscale
    tiles = vae_tiles(*canvas.shape[-2:], opts)
    if len(tiles) == 1:
        return _cfw_decode_tile(cfw, z, canvas, opts.dec_w)
    out = torch.zeros_like(canvas)
    total = canvas.new_zeros(canvas.shape[-2:])
    for tile in tiles:
        rows, cols = tile.latent(f)
        weight = tile.weight(1, opts.vae_overlap).to(canvas)
        out[..., tile.rows, tile.cols] += weight * _cfw_decode_tile(
            cfw, z[..., rows, cols], canvas[..., tile.rows, tile.cols], opts.dec_w)
        total[tile.rows, tile.cols] += weight
    return out / total


def _cfw_decode_tile(cfw: CFWAutoencoder, z: torch.Tensor, canvas: torch.Tensor, w: float) -> torch.Tensor:
    features = cfw.encode_with_features(canvas)[1] if w != 0 else None
    return cfw.decode(z, features, w)
