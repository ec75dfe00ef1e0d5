"""Building blocks shared by the VAE, the CFW decoder, the UNet and the time-aware encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv3x3(nn.Conv2d):
    """3x3 conv, padding 1.

    On CPU, oneDNN's convolution is 2-4x slower than one matrix product over unfolded patches on the UNet's
    deepest maps (8x8 outputs and smaller, 1280-2560 channels: few pixels, large weights), so those run as
    a GEMM.
    """

    GEMM_MAX_PIXELS = 64

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        s = self.stride[0]
        h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1
        if x.device.type != "cpu" or h_out * w_out > self.GEMM_MAX_PIXELS:
            return super().forward(x)
        # (B, C, H, W) -> (B, C*9, H_out*W_out) patches; (Cout, C*9) @ patches -> (B, Cout, H_out*W_out)
        patches = F.unfold(x, 3, padding=1, stride=s)
        out = torch.baddbmm(self.bias[:, None], self.weight.flatten(1).expand(b, -1, -1), patches)
        return out.view(b, -1, h_out, w_out)


def conv3x3(cin: int, cout: int, stride: int = 1) -> Conv3x3:
    return Conv3x3(cin, cout, stride)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
