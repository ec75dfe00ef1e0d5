"""Building blocks shared by the VAE, the CFW decoder, the UNet and the time-aware encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """The 3x3 convolution every network here uses: padding 1, so stride 1 keeps the map's size."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
