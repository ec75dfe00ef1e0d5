"""PSNR and SSIM, the two full-reference image quality numbers SR papers report (StableSR's Table 1 too).

Convention (the common one, basicsr's `calculate_psnr` / `calculate_ssim`, which the StableSR paper's
numbers come from): both images are 8-bit RGB, as they are saved to and read from PNG files, and the
metrics are computed on their values in [0, 255] as float64, on all three RGB channels (not on the Y
channel of YCbCr), after cutting an optional `border` of pixels off every edge. `to_levels` makes those
values from this project's [0, 1] float images with the rounding `image_io.to_pil` uses to save them, so
a number computed here is the number of the PNG files written.

Images are (B, C, H, W) tensors of levels in [0, 255]; every function returns one value per image, (B,).
"""

from __future__ import annotations

import math

import torch

from ..degradation import grouped_conv, opencv_gaussian_kernel

PEAK = 255.0  # L, the dynamic range of 8-bit levels
SSIM_WINDOW = 11  # the Gaussian window of Wang et al. (Sec. III-C): 11 x 11 ...
SSIM_SIGMA = 1.5  # ... with standard deviation 1.5, normalised to sum 1
SSIM_K1 = 0.01  # C1 = (K1 L)^2, Eq. 7
SSIM_K2 = 0.03  # C2 = (K2 L)^2, Eq. 9


def to_levels(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float image -> its 8-bit levels (0, 1, ..., 255) as float64, rounded as PNGs are saved."""
    return (image.clamp(0, 1) * 255).round().to(torch.float64)


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """Cut `border` pixels off each edge (SR papers often ignore a border of `scale` pixels)."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return image
    h, w = image.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"border {border} leaves nothing of a {w}x{h} image")
    return image[..., border:h - border, border:w - border]


def _pair(a: torch.Tensor, b: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two (B, C, H, W) images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return crop_border(a.to(torch.float64), border), crop_border(b.to(torch.float64), border)


def psnr(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image, of two (B, C, H, W) images of levels in [0, 255]:

        PSNR = 10 log10(L^2 / MSE),   L = 255,   MSE = mean over C, H, W of (a - b)^2

    inf for identical images (MSE = 0). Symmetric in a and b.
    """
    a, b = _pair(a, b, border)
    # MSE = mean of (a - b)^2 over every channel and pixel of each image
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    # 10 log10(L^2 / MSE); log10 of +inf is inf where MSE = 0
    return 10 * torch.log10(PEAK**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Mean structural similarity, per image, of two (B, C, H, W) images of levels in [0, 255].

    Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004. Eq. 13, at every pixel of each channel:

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, L = 255, and the local statistics weighted by
    an 11 x 11 Gaussian window w of sigma 1.5 summing to 1 (Eq. 14-16):

        mu_x = sum w_i x_i,   sigma_x^2 = sum w_i (x_i - mu_x)^2,   sigma_xy = sum w_i (x_i - mu_x)(y_i - mu_y)

    computed here as sum w_i x_i^2 - mu_x^2 and sum w_i x_i y_i - mu_x mu_y (the same, as w sums to 1).
    The window only visits positions where it lies wholly inside the image ('valid': an H x W channel
    gives (H - 10) x (W - 10) values), and Eq. 17's MSSIM is their mean. A colour image's SSIM is the
    mean over its three channels, as basicsr (and the MATLAB reference per channel) computes it.
    Symmetric in a and b; exactly 1 for identical images.
    """
    a, b = _pair(a, b, border)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (after the border), "
                         f"got {a.shape[-1]}x{a.shape[-2]}")
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    taps = opencv_gaussian_kernel(SSIM_WINDOW, SSIM_SIGMA)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        # sum_i w_i x_i with the separable window w = outer(taps, taps), valid positions only:
        # (B, C, H, W) -> (B, C, H - 10, W - 10)
        n = x.shape[0]
        columns = grouped_conv(x, taps.expand(n, SSIM_WINDOW).reshape(n, 1, SSIM_WINDOW, 1))
        return grouped_conv(columns, taps.expand(n, SSIM_WINDOW).reshape(n, 1, 1, SSIM_WINDOW))

    # mu_x, mu_y
    mu_a, mu_b = local_mean(a), local_mean(b)
    # sigma_x^2 = sum w x^2 - mu_x^2, sigma_y^2 likewise, sigma_xy = sum w x y - mu_x mu_y
    var_a = local_mean(a * a) - mu_a**2
    var_b = local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    # Eq. 13
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    # Eq. 17, the mean over positions, then the mean over channels
    return ssim_map.mean(dim=(1, 2, 3))


def lowpass_colour_error(a: torch.Tensor, b: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Colour error: the mean absolute difference, in levels, of the two images' block means (`block` x
    `block` pixels, every channel): what a colour cast changes and texture does not (a pattern with the same
    block means scores 0; a constant shift of d levels scores |d|). Sides must be multiples of `block`."""
    if a.shape != b.shape or a.shape[-1] % block or a.shape[-2] % block:
        raise ValueError(f"lowpass_colour_error needs two images of one size, sides multiples of {block}; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    means_a, means_b = (torch.nn.functional.avg_pool2d(x.double(), block) for x in (a, b))
    return (means_a - means_b).abs().mean(dim=(1, 2, 3))


def mean_hue(image: torch.Tensor) -> torch.Tensor:
    """Where each image's mean colour lies on the colour wheel: the HSV hue of its mean RGB, in degrees in
    [0, 360) (0 red, 60 yellow, 120 green, 180 cyan, 240 blue, 300 magenta); NaN where the mean is grey. Any
    value range (levels or [0, 1]): the hue does not depend on it."""
    r, g, b = image.double().mean(dim=(2, 3)).unbind(dim=1)
    top, bottom = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = top - bottom
    sector = torch.where(top == r, ((g - b) / chroma) % 6,
                         torch.where(top == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return torch.where(chroma > 0, 60 * sector, torch.nan)


def radial_power_spectrum(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grey image's (mean of its channels) power spectrum averaged over rings of equal spatial frequency:
    (frequencies in cycles per pixel, (B, R) mean power per ring), rings 1 / min(H, W) wide from 0 to 0.5.
    A Hann window first, so that the borders do not add a cross of false high frequencies."""
    grey = image.double().mean(dim=1)
    h, w = grey.shape[-2:]
    window = torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None] * \
        torch.hann_window(w, periodic=False, dtype=torch.float64)[None]
    grey = (grey - grey.mean(dim=(-2, -1), keepdim=True)) * window
    power = torch.fft.fft2(grey).abs() ** 2 / (h * w)
    radius = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                        + torch.fft.fftfreq(w, dtype=torch.float64)[None] ** 2)
    step = 1 / min(h, w)
    ring = (radius / step).round().long().flatten()
    keep = ring <= round(0.5 / step)
    n = int(ring[keep].max()) + 1
    sums = torch.zeros(grey.shape[0], n, dtype=torch.float64).index_add_(1, ring[keep], power.flatten(1)[:, keep])
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, ring[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return torch.arange(n, dtype=torch.float64) * step, sums / counts


def highfreq_spectrum_distance(a: torch.Tensor, b: torch.Tensor, band: tuple[float, float] = (0.125, 0.5)) -> torch.Tensor:
    """A realism axis that needs no learned network: how far image a's high-frequency power is from image b's
    (the HR crop), the mean over the rings in `band` (cycles per pixel) of |log10 P_a(f) - log10 P_b(f)|
    (`radial_power_spectrum`), per image (B,). 0 when a has b's spectrum there; a blurred image (too little
    power) and a noisy one (too much) both score higher. It sees texture statistics, not where the texture is:
    a faithful image and one with invented texture of the right amount score alike (PSNR tells them apart)."""
    freqs, ratio = log_power_ratio(a, b)
    return ratio[:, (freqs >= band[0]) & (freqs <= band[1])].abs().mean(dim=1)


def mean(values: list[float]) -> float:
    """The mean over images, as SR tables report it: the mean of per-image PSNRs (not the PSNR of the mean
    MSE), and of per-image SSIMs."""
    return math.fsum(values) / len(values)


def sample_sd(values: list[float]) -> float:
    """The sample standard deviation (n - 1 in the denominator) of two or more values."""
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


VERDICT_RULE = ("ahead when the mean paired difference (per photo: the mean over its crops and seeds) is better "
                "than zero by more than two standard errors over photos, behind when worse by more than two, "
                "level otherwise; no verdict from fewer than 2 photos")


def paired_verdict(per_photo: list[float], higher_is_better: bool) -> dict:
    """The verdict of VERDICT_RULE on paired differences (method minus baseline, one mean per photo: the unit
    that is independent, since crops of one photo share its content): {"mean", "se", "verdict"}, with verdict
    "ahead", "level", "behind", or "n/a" for fewer than two photos (se None)."""
    m = mean(per_photo)
    if len(per_photo) < 2:
        return {"mean": m, "se": None, "verdict": "n/a"}
    se = sample_sd(per_photo) / math.sqrt(len(per_photo))
    better = m if higher_is_better else -m
    verdict = "ahead" if better > 2 * se else "behind" if better < -2 * se else "level"
    return {"mean": m, "se": se, "verdict": verdict}


# ------------------------------------------------------------------------------------------------------
# Notebook 03 (issue 42): on which side of the HR spectrum an image lies, ring by ring


def log_power_ratio(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log10 P_a(f) - log10 P_b(f) per ring of `radial_power_spectrum`: (frequencies in cycles per pixel,
    (B, R)). Negative where a has less power than b (smoother), positive where more; 1 is ten times the power.
    `highfreq_spectrum_distance` is the mean of its absolute value over a band."""
    freqs, pa = radial_power_spectrum(a)
    _, pb = radial_power_spectrum(b)
    tiny = 1e-12  # a flat image has no power at all
    return freqs, torch.log10(pa + tiny) - torch.log10(pb + tiny)
