"""The measurements behind the notebooks in `notebooks/`: one function per quantity a notebook plots.

The notebooks only call these functions and the pipeline's stages (`pipeline.py`) and plot the results,
so the tests of this module (`tests/test_analysis.py`) cover every number they show.

    setup                    load_demo (weights, device, sizes), load_photo, heldout_crops, to_numpy_image
    the pipeline in pieces   predicted_x0, sample_with_previews (and StableSRPipeline.sample_latent/finish)
    Sec. 3.1 time awareness  snr, timestep_at_snr, log_snr_timesteps, sft_feature_similarity, matched_noise,
                             relative_change, t_sensitivity; prior_alone (the UNet without guidance)
    Sec. 3.2 CFW trade-off   laplacian_variance (fidelity: evaluate.evaluation_lr and evaluate.score)
    Sec. 3.3 aggregation     flat_weights, tile_borders, jump_profile, seam_strength
    Sec. 3.4 colour          color_shift, hue_round_trip_error (the tiny VAE's colours)
    training, ablation       degradation_stages, loss_by_timestep, heldout_scores (and tiny.training_logs)
    controls of 01-03        block_correlation (what of z_0 survives in x_T), encoder_input_change (t's floor)
    controls of 04-06        finish_each_fix (every colour fix from one decode), windowed_trend (is a curve still
                             moving), per_training_seed_difference (the ablation per training seed)

Images are (B, 3, H, W) tensors. Photos, degradations and metrics use [0, 1], the range of the pipeline's
output; the pipeline's input and its intermediate images use [-1, 1] (`2 * x - 1` converts).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .. import degradation
from ..devices import pick_device
from ..image_io import load_image
from ..model import StableSR, load_cfw, load_stablesr
from ..objective import Denoiser, diffusion_loss, latents
from ..pipeline import StableSRPipeline, UpscaleOptions, colour_fixed, make_denoiser, text_context, tile_weight_map
from ..sampler import aggregate, tile_grid, tile_starts
from ..schedule import Schedule
from ..tiny import find_weights, sampling_defaults
from ..train.data import hue_rotate
from ..train.sr import is_trainable
from ..unet import SFT
from ..vae import AutoencoderKL
from .evaluate import EvalDegradation, mean_row, score, upscale_both_ways
from .metrics import lowpass_colour_error, to_levels

# ------------------------------------------------------------------------------------------------------
# Setup: weights, device, sizes, photos


def demo_device() -> torch.device:
    """$STABLESR_DEVICE if set (checked as --device is), else cuda when available, else cpu."""
    return pick_device(os.environ.get("STABLESR_DEVICE") or None)


@dataclass
class Demo:
    """A loaded pipeline, which weights it runs, and the sampling settings a notebook uses with them."""

    pipe: StableSRPipeline
    weights: str  # one line naming the weights (for the notebooks' first cell)
    defaults: dict  # the weights' stored sampling settings (the shipped tiny model's); {} for the official
    device: torch.device

    def options(self, **changes) -> UpscaleOptions:
        """`UpscaleOptions` with the weights' own sampling settings (the tiny model's 32-latent tiles and
        20 DDPM steps), or its defaults (the paper's: 64-latent = 512 px tiles, 200 DDPM steps) for the
        official weights; `changes` override both."""
        return UpscaleOptions(**{**self.defaults, **changes})

    @property
    def tile_px(self) -> int:
        """One sampling tile in output pixels."""
        return self.options().tile * self.pipe.model.vae.downscale

    def lr_size(self, tiles_high: float, tiles_wide: float, scale: float = 4.0) -> tuple[int, int]:
        """(height, width) of an LR image whose upscaled output covers this many sampling tiles."""
        return round(tiles_high * self.tile_px / scale), round(tiles_wide * self.tile_px / scale)


def load_demo(device: str | torch.device | None = None, variant: str = "time_aware", shipped: bool = False) -> Demo:
    """The pipeline on `find_weights()`: the official files in $STABLESR_WEIGHTS, else (or with `shipped`,
    always) the shipped tiny model, its time-aware or time-blind `variant`; on `device` (default
    `demo_device()`)."""
    device = torch.device(device) if device is not None else demo_device()
    choice = find_weights(variant=variant, shipped=shipped)
    model = load_stablesr(choice.stablesr, device=device)
    cfw = load_cfw(choice.cfw, device=device)
    if choice.notice:
        name = f"the tiny StableSR shipped with stablesr-min ({variant.replace('_', '-')}; stablesr_min/tiny/MODEL_CARD.md)"
    else:
        name = f"the official weights in {Path(choice.stablesr[0]).parent}"
    return Demo(StableSRPipeline(model, cfw), name, sampling_defaults(choice.stablesr), device)


DATA = Path(__file__).resolve().parents[2] / "data"  # the project's CC0/public-domain photos (LICENCES.md)
HELDOUT = DATA / "heldout"  # ten photos never trained on (data/LICENCES.md)
# The notebooks' held-out photos: two of the ten, few enough to sample every crop at several seeds in seconds.
# The headline evaluation (scripts/heldout_eval.py) measures all ten.
NOTEBOOK_PHOTOS = ("chelsea.png", "coffee.png")
TRAINING = DATA / "photos"  # what the shipped tiny model was trained on


def photo_path(name: str) -> Path:
    """A photo of the project: held out (data/heldout) or a training one (data/photos)."""
    for folder in (HELDOUT, TRAINING):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name}: not in {HELDOUT} or {TRAINING}")


def load_photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A photo of the project (`photo_path`) as (1, 3, h, w) in [0, 1]: scaled (bicubic, antialiased) to
    cover `size` = (h, w), then centre-cropped to it."""
    image = (load_image(photo_path(name)).rgb + 1) / 2
    (h, w), (src_h, src_w) = size, image.shape[-2:]
    factor = max(h / src_h, w / src_w)
    cover = (max(h, round(src_h * factor)), max(w, round(src_w * factor)))
    image = F.interpolate(image, size=cover, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (cover[0] - h) // 2, (cover[1] - w) // 2
    return image[..., top:top + h, left:left + w]


def heldout_crops(size: int, per_image: int = 3, photos: Iterable[str] = NOTEBOOK_PHOTOS) -> dict[str, torch.Tensor]:
    """`per_image` size x size crops of each of the held-out `photos` at full resolution, spread evenly along its
    longer side and centred on the shorter: {"chelsea.png@x,y": (1, 3, size, size) in [0, 1]}."""
    crops = {}
    for path in (HELDOUT / name for name in photos):
        image = (load_image(path).rgb + 1) / 2
        h, w = image.shape[-2:]
        for i in range(per_image):
            along = round(i * (max(h, w) - size) / max(per_image - 1, 1))
            across = (min(h, w) - size) // 2
            top, left = (across, along) if w >= h else (along, across)
            crops[f"{path.name}@{left},{top}"] = image[..., top:top + size, left:left + size]
    return crops


def to_numpy_image(image: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """First image of a (B, C, H, W) batch as an (H, W, C) float array in [0, 1], for `plt.imshow`."""
    low, high = value_range
    x = ((image[0].detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    return x.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------------
# The pipeline in pieces: sample once, then decode and colour-fix several ways


@torch.no_grad()
def predicted_x0(pipe: StableSRPipeline, x: torch.Tensor, z0: torch.Tensor, context: torch.Tensor,
                 opts: UpscaleOptions, k: int) -> torch.Tensor:
    """The clean latent the network predicts from x_k (respaced step k), blended over tiles exactly as
    a sampling step blends them: x_0 = sqrt(1/ab_k) x_k - sqrt(1/ab_k - 1) eps_theta (Ho et al. Eq. 15)."""
    schedule = pipe.train_schedule.respace(opts.steps)
    tiles = tile_grid(x.shape[-2], x.shape[-1], opts.tile, opts.overlap)
    t = schedule.network_timestep(k, x.shape[0]).to(x.device)
    output = aggregate(x, z0, t, make_denoiser(pipe.model, context), tiles, tile_weight_map(opts), opts.tile_batch)
    return schedule.predict_x0(x, k, output)


@dataclass
class Preview:
    steps_done: int  # reverse steps taken before this state (0: x_T)
    timestep: int  # the training timestep of its noise level
    x: torch.Tensor  # the noisy latent
    x0: torch.Tensor  # the clean latent the network predicts from it


@torch.no_grad()
def sample_with_previews(pipe: StableSRPipeline, x_T: torch.Tensor, z0: torch.Tensor, context: torch.Tensor,
                         opts: UpscaleOptions, generator: torch.Generator,
                         at: Iterable[int]) -> tuple[torch.Tensor, list[Preview]]:
    """`pipe.sample`, plus the predicted x_0 of the states after `at` steps (each in [0, opts.steps)).

    Each preview costs one more network pass over all tiles; it draws no noise, so the final latent is
    the one `pipe.sample` gives for the same generator.
    """
    at = sorted(set(at))
    if any(not 0 <= n < opts.steps for n in at):
        raise ValueError(f"previews must be taken after 0 .. {opts.steps - 1} steps, got {at}")
    schedule = pipe.train_schedule.respace(opts.steps)
    previews = []

    def preview(steps_done: int, x: torch.Tensor) -> None:
        k = opts.steps - 1 - steps_done  # the respaced step that would be taken next
        x0 = predicted_x0(pipe, x, z0, context, opts, k)
        previews.append(Preview(steps_done, int(schedule.timestep_map[k]), x, x0))

    def on_step(steps_done: int, steps: int, x: torch.Tensor) -> None:
        if steps_done in at:
            preview(steps_done, x)

    if 0 in at:
        preview(0, x_T)
    x0 = pipe.sample(x_T, z0, context, opts, generator=generator, on_step=on_step)
    return x0, previews


# ------------------------------------------------------------------------------------------------------
# Sec. 3.1: time-aware guidance


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each timestep: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps has signal power
    ab_t and noise power 1 - ab_t, so SNR(t) = ab_t / (1 - ab_t)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def timestep_at_snr(alphas_cumprod: torch.Tensor, target: float) -> int:
    """The timestep whose SNR is closest to `target` on a log scale."""
    return int((snr(alphas_cumprod).log() - math.log(target)).abs().argmin())


def log_snr_timesteps(alphas_cumprod: torch.Tensor, n: int) -> list[int]:
    """About `n` timesteps, ascending, evenly spread in log SNR from the first timestep to the last (an
    even spread on a log-SNR axis; evenly spaced t would crowd the noisy end). Duplicates are dropped."""
    values = snr(alphas_cumprod)
    targets = torch.logspace(math.log10(values[0]), math.log10(values[-1]), n, dtype=torch.float64)
    return sorted({timestep_at_snr(alphas_cumprod, float(target)) for target in targets})


@torch.no_grad()
def sft_feature_similarity(model: StableSR, z0: torch.Tensor, lr_latent: torch.Tensor, context: torch.Tensor,
                           timesteps: Iterable[int], noise: torch.Tensor,
                           fixed_encoder_t: int | None = None,
                           random_condition: torch.Generator | None = None) -> torch.Tensor:
    """How strongly the time-aware guidance modulates the UNet at each timestep (the paper's Fig. 3).

    For each t, the clean latent `z0` is noised to x_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) noise, the
    time-aware encoder turns `lr_latent` and t into the conditions s, and the UNet runs on x_t. At every
    SFT layer (Eq. 1, F_mod = (1 + alpha) F + beta with (alpha, beta) = M_theta(s); F is the GroupNorm-ed
    UNet feature, as in the official code) a forward hook takes the cosine similarity between F and F_mod,
    each flattened per image: 1 means s left the feature's direction alone, lower means stronger
    modulation. Returns (len(timesteps),) float64: the mean over SFT layers and images.

    fixed_encoder_t: feed the encoder this one timestep whatever t the UNet sees (the ablation without
    time awareness); None feeds it t.
    random_condition: replace each of the encoder's feature maps by Gaussian noise with its per-channel mean
    and standard deviation, drawn from this generator (the calibration: what SFT does with a condition of
    the right statistics that carries no information about the image).
    """
    if model.time_encoder is None:
        raise ValueError("this model has no SFT layers (use_sft=False): nothing modulates the UNet")
    schedule = Schedule.from_config(model.cfg.diffusion)
    batch = z0.shape[0]
    layer_similarities: list[torch.Tensor] = []

    def hook(module: SFT, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        feature = module.param_free_norm(inputs[0])
        layer_similarities.append(F.cosine_similarity(feature.flatten(1).double(), output.flatten(1).double(), dim=1))

    handles = [m.register_forward_hook(hook) for m in model.unet.modules() if isinstance(m, SFT)]
    try:
        similarities = []
        for t in timesteps:
            layer_similarities.clear()
            unet_t = torch.full((batch,), int(t), device=z0.device)
            encoder_t = unet_t if fixed_encoder_t is None else torch.full_like(unet_t, fixed_encoder_t)
            x_t = schedule.q_sample(z0, int(t), noise)
            features = model.time_encoder(lr_latent, encoder_t)
            if random_condition is not None:
                features = {width: matched_noise(f, random_condition) for width, f in features.items()}
            model.unet(x_t, unet_t, context, features)
            similarities.append(torch.stack(layer_similarities).mean())
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(similarities).cpu()



def matched_noise(feature: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with `feature`'s mean and standard deviation per image and channel, and nothing else."""
    mean, std = feature.mean(dim=(-2, -1), keepdim=True), feature.std(dim=(-2, -1), keepdim=True)
    noise = torch.randn(feature.shape, generator=generator, dtype=torch.float32).to(feature)
    return mean + std * noise


def prior_alone(model: StableSR) -> StableSR:
    """The diffusion prior without StableSR's guidance: the same frozen UNet, VAE and text encoder, built
    without SFT layers and without the time-aware encoder (`use_sft=False`), sharing `model`'s tensors.
    What StableSR fine-tunes (`train.sr.is_trainable`) is exactly what is left out; the copy is strict."""
    cfg = replace(model.cfg, unet=replace(model.cfg.unet, use_sft=False))
    with torch.device("meta"):
        prior = StableSR(cfg)
    prior.load_state_dict({k: v for k, v in model.state_dict().items() if not is_trainable(k)}, strict=True,
                          assign=True)
    return prior.eval()

# ------------------------------------------------------------------------------------------------------
# Sec. 3.2: the fidelity-realism trade-off of CFW (its fidelity side is `evaluate.score`)


def laplacian_variance(image: torch.Tensor) -> torch.Tensor:
    """A no-reference sharpness proxy per image: the variance of the 4-neighbour Laplacian of the grey
    image (the channel mean), over every pixel with all four neighbours. Blur lowers it; fine texture,
    real or hallucinated, raises it. Not a realism metric: noise raises it too."""
    grey = image.double().mean(1, keepdim=True)
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    return F.conv2d(grey, kernel.to(grey.device)).flatten(1).var(1, unbiased=False)


# ------------------------------------------------------------------------------------------------------
# Sec. 3.3: aggregation sampling vs naive tiling


def flat_weights(opts: UpscaleOptions) -> torch.Tensor:
    """A constant tile weight map: with `overlap=0` the sampler then runs naive tiling, each latent cell
    denoised by exactly one tile."""
    return torch.ones(opts.tile, opts.tile, dtype=torch.float64)


def tile_borders(size: int, tile: int, downscale: int = 1) -> list[int]:
    """Where naive (non-overlapping) tiles of a latent side `size` meet, in pixels at `downscale` per
    latent cell (a border p lies between pixels p - 1 and p)."""
    return [start * downscale for start in tile_starts(size, tile, 0)[1:]]


def jump_profile(image: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean absolute difference between neighbouring rows (axis=-2) or columns (axis=-1), averaged over
    batch, channels and the other axis: entry p - 1 is the jump across border p. Float64."""
    jumps = image.double().diff(dim=axis).abs()
    other = [d for d in range(image.dim()) if d != axis % image.dim()]
    return jumps.mean(dim=other)


def seam_strength(image: torch.Tensor, positions: Iterable[int], axis: int) -> float:
    """Mean jump across the borders at `positions` divided by the mean jump across all other borders
    along `axis` (see `jump_profile`): about 1 where the tiles join invisibly, > 1 for a visible seam."""
    profile = jump_profile(image, axis)
    at_seams = torch.zeros_like(profile, dtype=torch.bool)
    at_seams[[p - 1 for p in positions]] = True
    return (profile[at_seams].mean() / profile[~at_seams].mean()).item()


def relative_change(outputs: list[torch.Tensor]) -> float:
    """max_i ||o_i - o_0|| / ||o_0||: how far a network's output moves from its first value as one input varies
    (0: not at all; 1: by as much as the output's own size)."""
    first = outputs[0].double()
    return max(((o.double() - first).norm() / first.norm()).item() for o in outputs[1:])


@torch.no_grad()
def t_sensitivity(model: StableSR, z_lr: torch.Tensor, timesteps: Iterable[int] = (0, 100, 500, 999),
                  seed: int = 0) -> dict[str, float]:
    """How much the networks respond to t (`relative_change` across `timesteps`): the time-aware encoder's
    features s(z_lr, t) (every level, flattened together), and the UNet's eps(z, t, c, s) with everything but
    its own t fixed (a seeded noise latent z, the empty prompt, s at the first timestep)."""
    ts = [torch.full((z_lr.shape[0],), t, device=z_lr.device) for t in timesteps]
    features = [model.time_encoder(z_lr, t) for t in ts]
    flat = [torch.cat([f[k].flatten() for k in sorted(f)]) for f in features]
    z = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(seed)).to(z_lr)
    context = text_context(model, "", z_lr.shape[0])
    eps = [model.unet(z, t, context, features[0]) for t in ts]
    return {"encoder": relative_change(flat), "unet": relative_change(eps)}


# ------------------------------------------------------------------------------------------------------
# Sec. 3.4: colour correction


@torch.no_grad()
def hue_round_trip_error(vae: AutoencoderKL, images: torch.Tensor, degrees: Iterable[float] = (0, 120, 240)
                         ) -> dict[float, float]:
    """How well the autoencoder keeps colours its training photos may lack: `images` (B, 3, H, W) in [0, 1]
    turned by each hue angle (`data.hue_rotate`), encoded (posterior mean), decoded, and scored against the
    turned image by `metrics.lowpass_colour_error` in 8-bit levels, averaged over the batch: {degrees: levels}.
    An autoencoder that keeps every colour scores about the same at every angle."""
    device = next(vae.parameters()).device
    errors = {}
    for angle in degrees:
        turned = torch.stack([hue_rotate(image, math.radians(angle)) for image in images]).to(device)
        decoded = ((vae.decode(vae.encode(turned * 2 - 1).mean).float() + 1) / 2).clamp(0, 1)
        errors[angle] = lowpass_colour_error(to_levels(decoded), to_levels(turned)).mean().item()
    return errors


def color_shift(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel mean of `output` minus that of `reference`, (B, C) float64. Sizes may
    differ (an SR output against its LR input): only the means are compared."""
    return output.double().mean(dim=(-2, -1)) - reference.double().mean(dim=(-2, -1))


# ------------------------------------------------------------------------------------------------------
# Training and the time-awareness ablation (notebook 06)


def degradation_stages(hr: torch.Tensor, seed: int, order: str = "second-order"
                       ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """One draw of the training degradation (`degradation.degrade` of `order`, a `--degradation` name:
    Real-ESRGAN's two stages, or the first alone) of `hr` (1, 3, H, W) in [0, 1]: its three kernels (3, K, K)
    (first blur, second blur, final sinc; first order uses the first alone) and the image after every
    operation, as `train sr` draws them (`data.TrainingPairs` per image, seeded here)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = degradation.DegradationConfig(order=degradation.ORDERS[order])
    kernels = degradation.draw_image_kernels(gen, cfg).unsqueeze(0)
    trace: list[tuple[str, torch.Tensor]] = [("HR", hr)]
    degradation.degrade(hr, kernels, cfg, gen, trace=trace)
    return kernels[0], trace


@torch.no_grad()
def loss_by_timestep(model: StableSR, lr: torch.Tensor, hr: torch.Tensor, bands: list[tuple[int, int]],
                     per_band: int = 4, seed: int = 0) -> torch.Tensor:
    """The `train sr` objective || eps - eps_theta(z_t, t, c, s(z_lr, t)) ||^2 (`objective.diffusion_loss`) on LR/HR
    pairs (B, 3, h, w) / (B, 3, 4h, 4w) in [0, 1], averaged over `per_band` evenly spaced timesteps in each
    [first, last] band: (len(bands),). Latent samples and noise come from `seed` alone, so two models
    with the same VAE (the time-aware and time-blind fine-tunes) are scored on identical inputs."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    z_lr, z = latents(model, lr.to(device), hr.to(device), gen)
    noise = torch.randn(z.shape, generator=gen).to(z)
    context = text_context(model, "", z.shape[0])
    schedule = Schedule.from_config(model.cfg.diffusion)
    denoiser = Denoiser(model)
    losses = []
    for first, last in bands:
        ts = torch.linspace(first, last, per_band).round().long().tolist()
        batch_t = [torch.full((z.shape[0],), t, device=device) for t in ts]
        losses.append(torch.stack([diffusion_loss(denoiser, schedule, z_lr, z, t, noise, context)
                                   for t in batch_t]).mean())
    return torch.stack(losses).cpu()


def heldout_scores(pipe: StableSRPipeline, crops: dict[str, torch.Tensor], opts: UpscaleOptions,
                   seed: int = 42) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, torch.Tensor]]]:
    """Each held-out crop degraded by the evaluation degradation (`evaluate.evaluation_lr`), upscaled by
    bicubic and by `pipe` at `opts` (seeded as `evaluate` does), and scored by `evaluate.score` (on 8-bit RGB):
    ({method: {measure: mean over the crops}}, {crop name: {"lr", "bicubic", "sr": image}})."""
    methods = ["bicubic", "sr"]
    images, rows = {}, []
    for name, hr in crops.items():
        lr, results = upscale_both_ways(pipe, hr, [opts], methods, EvalDegradation(), seed)
        images[name] = {"lr": lr, **results}
        scores = {m: score(image, hr, 0) for m, image in results.items()}
        rows.append({"scores": {m: {k: [v] for k, v in s.items()} for m, s in scores.items()}})  # one seed
    means = mean_row(rows, methods)
    return means, images


# ------------------------------------------------------------------------------------------------------
# Noise floors and controls for notebooks 01-03 (issue 42)


def block_correlation(a: torch.Tensor, b: torch.Tensor, block: int) -> float:
    """How alike the low frequencies of two (B, C, H, W) maps are: the Pearson correlation of their `block` x
    `block` means (`F.avg_pool2d`), over every image, channel and block together. 1 for a map and itself plus any
    pattern whose block means are 0; -1 against its negative; about 0 against independent noise."""
    means_a, means_b = (F.avg_pool2d(x.double(), block).flatten() for x in (a, b))
    return torch.corrcoef(torch.stack([means_a, means_b]))[0, 1].item()


@torch.no_grad()
def encoder_input_change(model: StableSR, z_lrs: list[torch.Tensor], t: int = 0) -> float:
    """How far the time-aware encoder's features s(z_lr, t) (every level, flattened together) move as its LR
    latent input changes at one fixed t (`relative_change` from the first of `z_lrs`): the floor that
    `t_sensitivity`'s movement across t is read against (two posterior draws of one LR latent, or two crops)."""
    ts = torch.full((z_lrs[0].shape[0],), t, device=z_lrs[0].device)
    features = [model.time_encoder(z, ts) for z in z_lrs]
    return relative_change([torch.cat([f[k].flatten() for k in sorted(f)]) for f in features])


# ------------------------------------------------------------------------------------------------------
# Notebooks 04-06: one decode for every colour fix, training trends, the ablation per training seed


def finish_each_fix(pipe: StableSRPipeline, sampled, opts: UpscaleOptions, methods: Iterable[str]
                    ) -> dict[str, torch.Tensor]:
    """`pipe.finish(sampled, replace(opts, colorfix=m))` for each colour fix m in `methods`, from one CFW decode
    (the fix enters only after decoding): {m: SR image in [0, 1]}."""
    decoded = pipe.decoded(sampled, opts)
    return {m: colour_fixed(decoded, sampled, m) for m in methods}


def windowed_trend(steps: list[float], values: list[float], window: float = 0.4, min_points: int = 4,
                   tolerance: float = 0.02) -> dict:
    """Whether a logged curve still moves at its end: the least-squares line v = a + b * step through the points
    in the last `window` of the run (steps >= (1 - window) * last step; at least the last `min_points`), b's standard error
    se = sqrt(sum(residual^2) / (n - 2) / sum((step - mean step)^2)), and the change the line makes over the
    window relative to the window's mean, change = b * (last step - first step) / mean(v). Verdict "falling"
    when change < -tolerance and b < -2 se, "rising" when change > tolerance and b > 2 se, else "flat": one
    outlying point moves b little and se much. {"slope", "se", "change", "points", "verdict"}."""
    cut = (1 - window) * steps[-1]
    n = max(min_points, sum(s >= cut for s in steps))
    x = torch.tensor(steps[-n:], dtype=torch.float64)
    y = torch.tensor(values[-n:], dtype=torch.float64)
    dx = x - x.mean()
    slope = (dx * (y - y.mean())).sum() / (dx * dx).sum()
    residual = y - y.mean() - slope * dx
    se = torch.sqrt((residual * residual).sum() / (n - 2) / (dx * dx).sum())
    change = (slope * (x[-1] - x[0]) / y.mean()).item()
    slope, se = slope.item(), se.item()
    verdict = ("falling" if change < -tolerance and slope < -2 * se else
               "rising" if change > tolerance and slope > 2 * se else "flat")
    return {"slope": slope, "se": se, "change": change, "points": n, "verdict": verdict}


def per_training_seed_difference(cell: dict, arms: tuple[str, str] = ("time-aware", "time-blind")) -> list[float]:
    """One ablation measure's paired difference (first arm minus second) at each training seed: the difference of
    the arms' means over the sampling seeds (`scripts/ablation.py`'s summary cell: {arm: {"training_seed_means"}}).
    Two training seeds give two values; their spread, not the spread of the sampling seeds, is the noise of a
    retrained model."""
    first, second = (cell[arm]["training_seed_means"] for arm in arms)
    return [a - b for a, b in zip(first, second)]
