"""Real-ESRGAN's second-order degradation: how StableSR makes its (LR, HR) training pairs on the fly.

StableSR (Sec. 4.1) fine-tunes on HR crops degraded by the pipeline of Real-ESRGAN (Wang, Xie, Dong, Shan,
"Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", ICCVW 2021,
arXiv 2107.10833; equation numbers below are that paper's).

Sec. 3.1, the classical degradation model, Eq. 1:

    x = D(y) = [(y ⊛ k)↓r + n]_JPEG

the HR image y blurred by a kernel k, downsampled by r, plus noise n, then JPEG-compressed. The kernels
(Eq. 2, 3) are Gaussians k(i, j) = 1/N exp(-1/2 Cᵀ Σ⁻¹ C), C = [i, j]ᵀ, Σ = R diag(σ1², σ2²) Rᵀ with R
the rotation by θ (isotropic when σ1 = σ2), and their generalized-Gaussian (exp(-1/2 (CᵀΣ⁻¹C)^β)) and
plateau (1 / (1 + (CᵀΣ⁻¹C)^β)) relatives. Noise is Gaussian or Poisson, in colour or grey (one noise
for all three channels).

Sec. 3.2, the high-order model, Eq. 4:

    x = Dⁿ(y) = (D_n ∘ ··· ∘ D_2 ∘ D_1)(y)

each D_i a classical degradation with its own random draws; Real-ESRGAN (and StableSR) use n = 2.
`DegradationConfig.order = 1` is n = 1: Eq. 1 once, with the first stage's draws and ↓r straight to the LR
size (`train sr --degradation first-order`; not the official setting, the tiny model's recipe uses it).
Sec. 3.3 adds the 2-D sinc filter (Eq. 5) k(i, j) = ω_c / (2π √(i²+j²)) · J1(ω_c √(i²+j²)), which makes
ringing and overshoot: as a blur kernel (with probability `sinc_prob`) and as a final filter.

The order of operations, every probability and range, and the quirks follow the official training code
(StableSR's `LatentDiffusionSRTextWT.get_input` and `_dequeue_and_enqueue`, basicsr's
`RealESRGANDataset`, `degradations.py` and `img_process_util.py`, config
`configs/stableSRNew/v2-finetune_text_T_512.yaml`). It draws from Python's, NumPy's and torch's global
random states; here every draw comes from one `torch.Generator` passed in, so the same seed gives the
same pairs, but not the official code's pairs.

Shapes: images are (B, 3, H, W) float32 in [0, 1]; kernels are (K, K) or (B, K, K).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image_io import to_pil

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
ORDERS = {"second-order": 2, "first-order": 1}  # `--degradation` NAME -> DegradationConfig.order


@dataclass
class DegradationConfig:
    """The official degradation and training-data settings (v2-finetune_text_T_512.yaml, `degradation`
    and `data.params.train.params`; the rest are basicsr's hard-coded values). Names follow the yaml.
    `*2` fields are the second stage's."""

    # -- first stage: blur (RealESRGANDataset)
    kernel_list: tuple[str, ...] = KERNEL_KINDS  # blur kernel kinds to choose from
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # their probabilities
    sinc_prob: float = 0.1  # probability that the blur kernel is a sinc instead
    blur_sigma: tuple[float, float] = (0.2, 1.5)  # range of sigma_x and sigma_y (pixels)
    betag_range: tuple[float, float] = (0.5, 2.0)  # shape beta of the generalized Gaussian
    betap_range: tuple[float, float] = (1.0, 1.5)  # shape beta of the plateau kernel
    # -- first stage: resize, noise, JPEG (`degradation` section)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # probabilities of up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)  # scale range (down from the low end, up to the high)
    gaussian_noise_prob: float = 0.5  # Gaussian noise with this probability, else Poisson
    noise_range: tuple[float, float] = (1.0, 15.0)  # Gaussian sigma, on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)  # Poisson noise scale
    gray_noise_prob: float = 0.4  # per image: one noise for all channels instead of one per channel
    jpeg_range: tuple[float, float] = (60.0, 95.0)  # JPEG quality range
    # -- second stage
    second_blur_prob: float = 0.5  # the second stage blurs with this probability
    kernel_list2: tuple[str, ...] = KERNEL_KINDS  # as kernel_list
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # as kernel_prob
    sinc_prob2: float = 0.1  # as sinc_prob
    blur_sigma2: tuple[float, float] = (0.2, 1.0)  # as blur_sigma
    betag_range2: tuple[float, float] = (0.5, 2.0)  # as betag_range
    betap_range2: tuple[float, float] = (1.0, 1.5)  # as betap_range
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)  # as resize_prob
    resize_range2: tuple[float, float] = (0.6, 1.2)  # as resize_range
    gaussian_noise_prob2: float = 0.5  # as gaussian_noise_prob
    noise_range2: tuple[float, float] = (1.0, 12.0)  # as noise_range
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)  # as poisson_scale_range
    gray_noise_prob2: float = 0.4  # as gray_noise_prob
    jpeg_range2: tuple[float, float] = (60.0, 100.0)  # as jpeg_range
    # -- final sinc filter
    final_sinc_prob: float = 0.8  # probability of a sinc low-pass after the final resize (else none)
    # The dataset draws every kernel size from 7..21 (hard-coded; the yaml's blur_kernel_size: 21 and
    # blur_kernel_size2: 11 are never read) and zero-pads every kernel to the largest.
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)  # odd kernel sizes, drawn uniformly
    # -- the model's order n of Eq. 4
    order: int = 2  # 2: D_2 ∘ D_1, as StableSR trains; 1: D_1 alone, resized straight to the LR size
    # -- the batch
    no_degradation_prob: float = 0.01  # a whole batch is kept clean with this probability (see `clean_lr`)
    use_usm: bool = True  # sharpen the GT with USM before degrading it (it is also the training target)
    usm_radius: int = 50  # USM Gaussian kernel size (made odd: 51), basicsr USMSharp's default
    usm_weight: float = 0.5  # USM: sharp = img + weight * (img - blur)
    usm_threshold: float = 10.0  # USM: sharpen where |img - blur| * 255 exceeds this
    use_hflip: bool = True  # random horizontal flip of each crop
    use_rot: bool = False  # random vertical flip and transpose (90-degree rotations); off officially
    queue_size: int = 180  # training pair pool size; a multiple of the batch size; 0 turns the pool off
    crop_size: int | None = None  # HR crop that is degraded before the paired crop to gt_size; None = gt_size
    # (the official crop_size and gt_size are both 512)


@dataclass(frozen=True)
class Stage:
    """The settings of one of the two degradation stages, read from a `DegradationConfig`."""

    kernel_list: tuple[str, ...]
    kernel_prob: tuple[float, ...]
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    resize_prob: tuple[float, float, float]
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]


def stage(cfg: DegradationConfig, n: int) -> Stage:
    """Stage 1 reads the plain names, stage 2 the names ending in 2."""
    suffix = "" if n == 1 else "2"
    return Stage(**{name: getattr(cfg, name + suffix) for name in Stage.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------------
# Random draws: each from the generator passed in, as Python floats/ints (or per-image tensors).


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


def chance(gen: torch.Generator, probability: float) -> bool:
    """True with `probability`."""
    return uniform(gen, 0.0, 1.0) < probability


def choose(gen: torch.Generator, options, weights=None):
    """One of `options`, with the given (unnormalised) weights, or uniformly."""
    weights = torch.ones(len(options)) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return options[torch.multinomial(weights, 1, generator=gen).item()]


def uniform_per_image(gen: torch.Generator, low: float, high: float, batch: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=gen)


# ------------------------------------------------------------------------------------------------------
# Blur kernels (Sec. 3.1 "Blur", Sec. 3.3 sinc), computed in float64, returned as float32 summing to 1.


def kernel_grid(size: int) -> torch.Tensor:
    """C = [i, j]ᵀ over a size x size grid centred on the kernel: (size, size, 2) with [..., 0] the column
    offset and [..., 1] the row offset."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    return torch.stack([cols, rows], dim=-1)


def quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """CᵀΣ⁻¹C on the grid, (size, size)."""
    # Eq. 3: Σ = R diag(σ1², σ2²) Rᵀ, R the rotation by θ
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rotation @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rotation.T
    grid = kernel_grid(size)
    # CᵀΣ⁻¹C for every grid point C
    return ((grid @ torch.linalg.inv(sigma)) * grid).sum(-1)


def normalized(kernel: torch.Tensor) -> torch.Tensor:
    """1/N: the kernel divided by its sum, as float32."""
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    # Eq. 2: k(i, j) = 1/N exp(-1/2 CᵀΣ⁻¹C)
    return normalized(torch.exp(-0.5 * quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float,
                                beta: float) -> torch.Tensor:
    # k(i, j) = 1/N exp(-1/2 (CᵀΣ⁻¹C)^β)
    return normalized(torch.exp(-0.5 * quadratic_form(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    # k(i, j) = 1/N · 1 / ((CᵀΣ⁻¹C)^β + 1)
    return normalized(1 / (quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1))


def sinc_kernel(cutoff: float, size: int, pad_to: int = 0) -> torch.Tensor:
    """The circular low-pass filter with cutoff ω_c (radians, π the Nyquist), zero-padded to `pad_to`."""
    r = kernel_grid(size).norm(dim=-1)
    # Eq. 5: k(i, j) = ω_c J1(ω_c r) / (2π r), r = √(i²+j²); at r = 0 its limit ω_c² / (4π)
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    return pad_kernel(normalized(kernel), max(pad_to, size))


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (k, k) kernel to (size, size), centred."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


def pulse_kernel(size: int) -> torch.Tensor:
    """The identity filter: 1 at the centre (the official "no final sinc")."""
    return pad_kernel(torch.ones(1, 1), size)


def draw_blur_kind(gen: torch.Generator, st: Stage) -> str:
    """'sinc' with probability sinc_prob, else one of kernel_list by kernel_prob."""
    if chance(gen, st.sinc_prob):
        return "sinc"
    return choose(gen, st.kernel_list, st.kernel_prob)


def draw_sinc_cutoff(gen: torch.Generator, size: int) -> float:
    # basicsr's rule for kernels of 7..21: small kernels get a cutoff of at least π/3, others π/5
    return uniform(gen, math.pi / 3 if size < 13 else math.pi / 5, math.pi)


def draw_beta(gen: torch.Generator, beta_range: tuple[float, float]) -> float:
    # basicsr: half the time below 1, half above (it assumes low < 1 < high; with the plateau's
    # (1, 1.5) the lower half is exactly 1)
    if chance(gen, 0.5):
        return uniform(gen, beta_range[0], 1.0)
    return uniform(gen, 1.0, beta_range[1])


def draw_kernel_of_kind(gen: torch.Generator, kind: str, size: int, st: Stage) -> torch.Tensor:
    """A random kernel of one kind from kernel_list: σ1 (and for anisotropic kinds σ2 and θ ∈ [-π, π])
    uniform in blur_sigma, β as `draw_beta`."""
    sigma_x = uniform(gen, *st.blur_sigma)
    if kind.split("_")[-1] == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = uniform(gen, *st.blur_sigma), uniform(gen, -math.pi, math.pi)
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, draw_beta(gen, st.betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, draw_beta(gen, st.betap_range))
    raise ValueError(f"unknown blur kernel kind {kind!r}; expected one of {', '.join(KERNEL_KINDS)}")


def draw_blur_kernel(gen: torch.Generator, st: Stage, sizes: tuple[int, ...]) -> torch.Tensor:
    """One stage's blur kernel k, padded to max(sizes)."""
    size = choose(gen, sizes)
    kind = draw_blur_kind(gen, st)
    if kind == "sinc":
        return sinc_kernel(draw_sinc_cutoff(gen, size), size, pad_to=max(sizes))
    return pad_kernel(draw_kernel_of_kind(gen, kind, size, st), max(sizes))


def draw_final_sinc(gen: torch.Generator, cfg: DegradationConfig) -> torch.Tensor:
    """The final filter: a sinc with cutoff in [π/3, π] with probability final_sinc_prob, else identity."""
    if chance(gen, cfg.final_sinc_prob):
        size = choose(gen, cfg.kernel_sizes)
        return sinc_kernel(uniform(gen, math.pi / 3, math.pi), size, pad_to=max(cfg.kernel_sizes))
    return pulse_kernel(max(cfg.kernel_sizes))


def draw_image_kernels(gen: torch.Generator, cfg: DegradationConfig) -> torch.Tensor:
    """The three kernels the dataset draws for each image: (3, K, K) = first blur, second blur, final."""
    return torch.stack([draw_blur_kernel(gen, stage(cfg, 1), cfg.kernel_sizes),
                        draw_blur_kernel(gen, stage(cfg, 2), cfg.kernel_sizes),
                        draw_final_sinc(gen, cfg)])


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with a kernel: reflect padding of K//2, then a grouped convolution.

    `kernel` is (K, K) or (1, K, K) for one kernel for all images, or (B, K, K) for one per image.
    """
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    kernels = kernel.reshape(-1, k, k).to(img.dtype).expand(b, k, k)
    return grouped_conv(F.pad(img, (k // 2,) * 4, mode="reflect"), kernels[:, None])


def grouped_conv(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Valid correlation of each image's channels with that image's (B, 1, kh, kw) kernel."""
    b, c = padded.shape[:2]
    # (B, C, H, W) -> (1, B*C, H, W): each channel of each image its own group (on the CPU this layout
    # is about twice as fast as B*C single-channel images)
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[2:]), kernels.repeat_interleave(c, dim=0), groups=b * c)
    return out.reshape(b, c, *out.shape[2:])


# ------------------------------------------------------------------------------------------------------
# USM sharpening of the GT (basicsr's USMSharp)


def opencv_gaussian_kernel(size: int, sigma: float = 0.0) -> torch.Tensor:
    """OpenCV's getGaussianKernel(size, sigma), float64: for sigma <= 0 sizes 1, 3, 5, 7 use its fixed
    binomial-like tables, others sigma = 0.3·((size − 1)/2 − 1) + 0.8."""
    fixed = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
             7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}
    if sigma <= 0 and size in fixed:
        return torch.tensor(fixed[size], dtype=torch.float64)
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-x**2 / (2 * sigma**2))
    return taps / taps.sum()


def separable_filter(img: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """filter2d with the kernel outer(taps, taps), as a column pass then a row pass (the same sums with
    K/2 times fewer multiplications: the USM kernel is 51 x 51)."""
    b, k = img.shape[0], taps.shape[0]
    taps = taps.to(img.dtype).expand(b, k)
    columns = grouped_conv(F.pad(img, (k // 2,) * 4, mode="reflect"), taps.reshape(b, 1, k, 1))
    return grouped_conv(columns, taps.reshape(b, 1, 1, k))


def usm_sharpen(img: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking, only where the image has detail, blended in softly."""
    taps = opencv_gaussian_kernel(radius + 1 if radius % 2 == 0 else radius)
    residual = img - separable_filter(img, taps)
    # a hard mask of the pixels whose detail exceeds the threshold (on the 0..255 scale), then softened
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = separable_filter(mask, taps)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# ------------------------------------------------------------------------------------------------------
# Resize, noise, JPEG


def draw_resize(gen: torch.Generator, st: Stage) -> tuple[float, str]:
    """(scale, mode): up, down or keep by resize_prob, the scale uniform in [1, high] or [low, 1]."""
    direction = choose(gen, ("up", "down", "keep"), st.resize_prob)
    scale = {"up": lambda: uniform(gen, 1.0, st.resize_range[1]),
             "down": lambda: uniform(gen, st.resize_range[0], 1.0),
             "keep": lambda: 1.0}[direction]()
    return scale, choose(gen, RESIZE_MODES)


def resize(img: torch.Tensor, mode: str, size=None, scale_factor=None) -> torch.Tensor:
    """F.interpolate as the official calls it (no antialiasing, align_corners False)."""
    align = None if mode == "area" else False
    return F.interpolate(img, size=size, scale_factor=scale_factor, mode=mode, align_corners=align)


@dataclass
class NoiseDraw:
    """One batch's noise: `kind` for the whole batch, amount and grey flag per image."""

    kind: str  # "gaussian" or "poisson"
    amount: torch.Tensor  # (B,) Gaussian sigma (0..255 scale) or Poisson scale
    gray: torch.Tensor  # (B,) bool: one noise for all three channels


def draw_noise(gen: torch.Generator, st: Stage, batch: int) -> NoiseDraw:
    if chance(gen, st.gaussian_noise_prob):
        kind, amount_range = "gaussian", st.noise_range
    else:
        kind, amount_range = "poisson", st.poisson_scale_range
    amount = uniform_per_image(gen, *amount_range, batch)
    gray = torch.rand(batch, generator=gen) < st.gray_noise_prob
    return NoiseDraw(kind, amount, gray)


def gaussian_noise(img: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = img.shape
    sigma = sigma.view(b, 1, 1, 1) / 255
    noise = torch.randn(img.shape, generator=gen) * sigma
    if gray.any():
        # The official draws ONE (H, W) grey field and scales it by each image's sigma, so the images of
        # a batch that get grey noise share its pattern; followed here.
        gray_noise = torch.randn(h, w, generator=gen) * sigma
        noise = torch.where(gray.view(b, 1, 1, 1), gray_noise, noise)
    return noise


def poisson_noise(img: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    b = img.shape[0]
    noise = shot_noise(img, gen)
    if gray.any():
        # ITU-R 601 luma, as torchvision's rgb_to_grayscale
        luma = (0.2989 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
        noise = torch.where(gray.view(b, 1, 1, 1), shot_noise(luma, gen).expand_as(img), noise)
    return noise * scale.view(b, 1, 1, 1)


def shot_noise(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Poisson(img·v)/v − img per image, the image first rounded to 8 bits and v the number of its
    distinct values rounded up to a power of two (basicsr's rule, from scikit-image)."""
    levels = (img * 255).round().clamp(0, 255)
    img = levels / 255
    # the number of distinct 8-bit values in each image: a 256-bin histogram per image
    bins = levels.flatten(1).long() + 256 * torch.arange(len(img))[:, None]
    distinct = torch.bincount(bins.flatten(), minlength=256 * len(img)).view(-1, 256).count_nonzero(1)
    vals = (2 ** torch.ceil(torch.log2(distinct.double()))).to(img.dtype).view(-1, 1, 1, 1)
    return torch.poisson(img * vals, generator=gen) / vals - img


def add_noise(img: torch.Tensor, draw: NoiseDraw, gen: torch.Generator) -> torch.Tensor:
    # Eq. 1: + n
    make = gaussian_noise if draw.kind == "gaussian" else poisson_noise
    return (img + make(img, draw.amount, draw.gray, gen)).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Eq. 1's [·]_JPEG: each image through Pillow's (libjpeg's) encoder and decoder at its quality.

    The official code simulates JPEG on the GPU with DiffJPEG (differentiable, float quality, float
    input); here a real codec runs on the CPU, image by image, on the image rounded to 8 bits, at the
    quality rounded to an integer, with the same 4:2:0 chroma subsampling and the standard (IJG)
    quantisation tables scaled by quality. Values are clamped to [0, 1] first, as the official does
    (JPEG of out-of-range values makes unpleasant artifacts).
    """
    out = []
    for x, q in zip(img, quality.tolist()):
        # to_pil clamps to [0, 1] and rounds to 8 bits
        buffer = io.BytesIO()
        to_pil(x[None]).save(buffer, format="JPEG", quality=int(round(q)), subsampling=2)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out)


def random_jpeg(img: torch.Tensor, gen: torch.Generator, quality_range: tuple[float, float]) -> torch.Tensor:
    return jpeg(img, uniform_per_image(gen, *quality_range, img.shape[0]))


# ------------------------------------------------------------------------------------------------------
# The pipeline


def degrade(gt: torch.Tensor, kernels: torch.Tensor, cfg: DegradationConfig, gen: torch.Generator,
            scale: int = 4, trace: list | None = None) -> torch.Tensor:
    """Eq. 4 with n = cfg.order (2, or 1: `first_order`): the LR image (B, 3, H/scale, W/scale) of the HR batch
    `gt` (B, 3, H, W).

    `kernels` (B, 3, K, K) holds each image's first blur, second blur and final sinc
    (`draw_image_kernels`). Resize, noise kind, the second blur's coin and the final order are drawn once
    for the batch, per-image sigmas, grey flags and JPEG qualities per image, as the official does.
    `trace`, if a list, receives (stage name, image) after every operation (notebook 06 shows them).
    """
    def done(name: str, image: torch.Tensor) -> torch.Tensor:
        if trace is not None:
            trace.append((name, image.clamp(0, 1)))
        return image

    h, w = gt.shape[-2:]
    batch = gt.shape[0]
    if cfg.order == 1:
        return first_order(gt, kernels[:, 0], cfg, gen, scale, done)
    # ---- D_1: Eq. 1 with a random resize for ↓r
    st = stage(cfg, 1)
    # y ⊛ k
    out = done("1: blur", filter2d(gt, kernels[:, 0]))
    # ↓r: up, down or keep, relative to the current size
    factor, mode = draw_resize(gen, st)
    out = done(f"1: resize x{factor:.2f} ({mode})", resize(out, mode, scale_factor=factor))
    # + n
    out = done("1: noise", add_noise(out, draw_noise(gen, st, batch), gen))
    # [·]_JPEG
    out = done("1: JPEG", random_jpeg(out, gen, st.jpeg_range))

    # ---- D_2
    st = stage(cfg, 2)
    # ⊛ k, only with probability second_blur_prob
    if chance(gen, cfg.second_blur_prob):
        out = done("2: blur", filter2d(out, kernels[:, 1]))
    # ↓r: here relative to the target LR size (int(H / scale · factor) as the official truncates)
    factor, mode = draw_resize(gen, st)
    out = done(f"2: resize to x{factor:.2f} of LR ({mode})",
               resize(out, mode, size=(int(h / scale * factor), int(w / scale * factor))))
    # + n
    out = done("2: noise", add_noise(out, draw_noise(gen, st, batch), gen))
    # [·]_JPEG and [resize to H/scale + final sinc], in either order with equal chance (the official:
    # other orders make twisted lines)
    if chance(gen, 0.5):
        out = done("2: resize to LR + sinc", resize_back_and_sinc(out, kernels[:, 2], (h // scale, w // scale), gen))
        out = done("2: JPEG", random_jpeg(out, gen, st.jpeg_range))
    else:
        out = done("2: JPEG", random_jpeg(out, gen, st.jpeg_range))
        out = done("2: resize to LR + sinc", resize_back_and_sinc(out, kernels[:, 2], (h // scale, w // scale), gen))
    # StableSR only clamps here; Real-ESRGAN also rounds the LR to 8 bits, StableSR's code does not.
    return out.clamp(0, 1)


def first_order(gt: torch.Tensor, kernel: torch.Tensor, cfg: DegradationConfig, gen: torch.Generator,
                scale: int, done) -> torch.Tensor:
    """Eq. 1 once, x = [(y ⊛ k)↓r + n]_JPEG, with the first stage's blur, noise and JPEG draws; ↓r goes
    straight to the LR size (H/scale) by area, bilinear or bicubic, drawn as the final resize of D_2 is."""
    h, w = gt.shape[-2:]
    st = stage(cfg, 1)
    # y ⊛ k
    out = done("blur", filter2d(gt, kernel))
    # ↓r
    mode = choose(gen, RESIZE_MODES)
    out = done(f"resize to LR ({mode})", resize(out, mode, size=(h // scale, w // scale)))
    # + n
    out = done("noise", add_noise(out, draw_noise(gen, st, gt.shape[0]), gen))
    # [·]_JPEG
    out = done("JPEG", random_jpeg(out, gen, st.jpeg_range))
    return out.clamp(0, 1)


def resize_back_and_sinc(img: torch.Tensor, sinc: torch.Tensor, size: tuple[int, int],
                         gen: torch.Generator) -> torch.Tensor:
    return filter2d(resize(img, choose(gen, RESIZE_MODES), size=size), sinc)


def paired_random_crop(lr: torch.Tensor, gt: torch.Tensor, gt_size: int, scale: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of every image of the batch: gt_size // scale in the LR, gt_size in the GT."""
    size = gt_size // scale
    top = int(torch.randint(lr.shape[-2] - size + 1, (), generator=gen))
    left = int(torch.randint(lr.shape[-1] - size + 1, (), generator=gen))
    lr = lr[..., top:top + size, left:left + size]
    gt = gt[..., top * scale:top * scale + gt_size, left * scale:left * scale + gt_size]
    return lr, gt


def clean_lr(gt: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR of a batch kept clean (no_degradation_prob): the GT averaged over scale x scale blocks.

    The official hands the encoder the (upsampled) LR at GT size and, for a clean batch, the GT itself;
    this project's pairs carry the LR at GT/scale, so a clean batch gets the GT's block average instead.
    """
    return F.avg_pool2d(gt, scale)


class PairPool:
    """Real-ESRGAN's training pair pool (queue): mixes the degradations of many batches.

    One batch shares its resize, noise kind and order of operations; the pool keeps `size` pairs and,
    once full, answers each new batch with `batch` random pairs from it (putting the new ones in their
    place). Until it is full it stores each batch and returns that batch unchanged, as the official does.
    """

    def __init__(self, size: int, batch: int):
        self.size, self.batch = size, batch
        self.lr: torch.Tensor | None = None  # (size, 3, h, w)
        self.gt: torch.Tensor | None = None  # (size, 3, H, W)
        self.filled = 0

    def exchange(self, lr: torch.Tensor, gt: torch.Tensor, gen: torch.Generator):
        if self.size == 0:
            return lr, gt
        if self.lr is None:
            self.lr = lr.new_zeros((self.size, *lr.shape[1:]))
            self.gt = gt.new_zeros((self.size, *gt.shape[1:]))
        if self.filled < self.size:
            self.lr[self.filled:self.filled + self.batch] = lr
            self.gt[self.filled:self.filled + self.batch] = gt
            self.filled += self.batch
            return lr, gt
        # shuffle the whole pool, hand out its first `batch` pairs and put the new ones there
        order = torch.randperm(self.size, generator=gen)
        self.lr, self.gt = self.lr[order], self.gt[order]
        out = self.lr[:self.batch].clone(), self.gt[:self.batch].clone()
        self.lr[:self.batch], self.gt[:self.batch] = lr, gt
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored pairs (only the filled part)."""
        if self.lr is None:
            return {}
        return {"pool_lr": self.lr[:self.filled].clone(), "pool_gt": self.gt[:self.filled].clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lr = self.gt = None
        self.filled = 0
        if "pool_lr" in state:
            lr, gt = state["pool_lr"], state["pool_gt"]
            self.lr = lr.new_zeros((self.size, *lr.shape[1:]))
            self.gt = gt.new_zeros((self.size, *gt.shape[1:]))
            self.filled = lr.shape[0]
            self.lr[:self.filled], self.gt[:self.filled] = lr, gt
