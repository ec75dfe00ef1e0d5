"""Colour correction of the SR output against the (upsampled) LR input.

Diffusion sampling can drift in colour. StableSR (Sec. 3.4) corrects it after decoding: AdaIN gives the
output the per-channel mean and standard deviation of the LR image (the paper's choice); the official
repo also offers a wavelet variant that keeps the output's fine detail and takes the coarse colour from
the LR image (it comes, as the official file says, from Li Yi's sd-webui-stablesr extension). Both work
on images in [-1, 1], shaped (B, C, H, W). The official script's default is no colour fix at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("adain", "wavelet", "none")


def channel_mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased variance + eps), each (B, C, 1, 1)."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    std = (flat.var(dim=2) + eps).sqrt()
    return mean[..., None, None], std[..., None, None]


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Adaptive instance normalisation: content's per-channel statistics replaced by style's,
    AdaIN(c, s) = sigma(s) * (c - mu(c)) / sigma(c) + mu(s)."""
    content_mean, content_std = channel_mean_std(content)
    style_mean, style_std = channel_mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The 3x3 binomial blur [1,2,1] x [1,2,1] / 16 with holes (`dilation` apart), replicate-padded,
    applied to each channel on its own."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = torch.outer(taps, taps) / 16
    channels = x.shape[1]
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels, dilation=dilation)


def wavelet_low_frequency(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest band of an a-trous wavelet decomposition: `levels` blurs, dilated 1, 2, 4, ..."""
    for level in range(levels):
        x = wavelet_blur(x, 2**level)
    return x


def wavelet(content: torch.Tensor, style: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Content's high frequencies on top of style's low frequency.

    The reference sums the detail bands (x_i - blur(x_i)) of every level as "high frequency"; that sum
    telescopes to x - low, so content - low(content) + low(style) is the same image.
    """
    return content - wavelet_low_frequency(content, levels) + wavelet_low_frequency(style, levels)


def color_fix(content: torch.Tensor, style: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """Colour-correct `content` (the SR output) towards `style` (the upsampled LR image)."""
    if method == "adain":
        return adain(content, style)
    if method == "wavelet":
        return wavelet(content, style)
    if method == "none":
        return content
    raise ValueError(f"unknown colour fix {method!r} (expected one of {METHODS})")
