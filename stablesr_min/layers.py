"""Building blocks shared by the VAE, the CFW decoder, the UNet and the time-aware encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): each
# 2x2 block of a 3x3 convolution's output comes from the 4x4 input tile d around it as
#     Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A,
# 16 multiplications per input channel where the direct convolution needs 36. Summed over the input
# channels, the ⊙ becomes 16 matrix products, one per position in the 4x4 tile.
WINOGRAD_BT = torch.tensor([[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
WINOGRAD_G = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
WINOGRAD_AT = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])
# The transforms as single matrices on flattened tiles, by vec(L X R^T) = (L ⊗ R) vec(X) (row-major vec).
KRON_G = torch.kron(WINOGRAD_G, WINOGRAD_G)  # (16, 9)
KRON_BT = torch.kron(WINOGRAD_BT, WINOGRAD_BT)  # (16, 16)
KRON_AT = torch.kron(WINOGRAD_AT, WINOGRAD_AT)  # (4, 16)


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) filters g -> U = G g G^T, as (16, Cout, Cin): one matrix per tile position."""
    # (Cout, Cin, 9) @ (9, 16) -> (Cout, Cin, 16) -> (16, Cout, Cin)
    return (weight.flatten(2) @ KRON_G.T.to(weight)).permute(2, 0, 1).contiguous()


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1, of x (B, C, H, W), with `filters` from `winograd_filters`."""
    b, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles down and across
    # The conv's own padding (1), plus bottom/right padding up to whole tiles.
    x = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    # 4x4 input tiles at stride 2: (B, C, th, tw, 4, 4) -> (16, C*B*th*tw), one column per tile and channel
    d = x.unfold(2, 4, 2).unfold(3, 4, 2).permute(4, 5, 1, 0, 2, 3).reshape(16, -1)
    # V = B^T d B for every tile: (16, C, B*th*tw)
    v = (KRON_BT.to(x) @ d).view(16, c, -1)
    # M = sum over input channels of U ⊙ V: one (Cout, C) @ (C, B*th*tw) product per tile position
    m = torch.bmm(filters, v)
    # Y = A^T M A: (16, Cout, B*th*tw) -> (2, 2, Cout, B, th, tw) -> (B, Cout, 2*th, 2*tw)
    y = (KRON_AT.to(x) @ m.view(16, -1)).view(2, 2, -1, b, th, tw)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(b, -1, 2 * th, 2 * tw)[:, :, :h, :w]
    return y + bias[:, None, None]


# NNPACK ships inside PyTorch's CPU builds (x86 with AVX2, and ARM); asking whether it is available also
# initialises it, which its convolution needs before the first call.
NNPACK = torch._nnpack_available()


class Conv3x3(nn.Conv2d):
    """3x3 conv, padding 1. Every path computes the same convolution; on CPU the fastest depends on the map.

    Measured on this project's 2-core CPUs (float32, batch 1; see the README's Performance section):
    * At most 64 output pixels (the UNet's deepest maps: few pixels, 1280-2560 channels, large weights):
      one matrix product over unfolded patches, 2-4x faster than oneDNN's direct convolution.
    * 16x16 to 32x32 maps, stride 1: Winograd F(2x2, 3x3) above, 1.1-2.6x faster than oneDNN. The
      transformed filters are kept (16/9 the size of the weights) and rebuilt when the weights change.
    * At least 64x64 output pixels, stride 1 (the first UNet level of a 512 px tile, the VAE): NNPACK's
      Winograd F(6x6, 3x3), 1.5-2.5x faster than oneDNN on all but the thinnest layers. It transforms the
      weights at every call, which is why it is slower than oneDNN on small maps with many channels.
    Against float64, F(2x2, 3x3) lands nearer than the direct convolution (3e-7 against 1e-6 relative),
    NNPACK a little further (3e-6). Everything else (GPUs, half precision, stride 2 beyond 64 pixels,
    autograd through Winograd) takes PyTorch's convolution.
    """

    GEMM_MAX_PIXELS = 64
    NNPACK_MIN_PIXELS = 64 * 64
    # The kept filters cost about 2 GB for the full-size UNet and encoder at a 64x64 latent tile; False
    # saves that memory for about 10% slower CPU steps.
    KEEP_WINOGRAD_FILTERS = True

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=1)
        self._winograd: tuple[tuple, torch.Tensor] | None = None  # (weight identity, U); not in the state dict

    def _apply(self, fn, recurse=True):
        self._winograd = None  # .to(), .cuda(), .half(): the kept filters belong to the old weights
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        s = self.stride[0]
        h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1
        pixels = h_out * w_out
        if x.device.type != "cpu":
            return super().forward(x)
        if pixels <= self.GEMM_MAX_PIXELS:
            # (B, C, H, W) -> (B, C*9, H_out*W_out) patches; (Cout, C*9) @ patches -> (B, Cout, H_out*W_out)
            patches = F.unfold(x, 3, padding=1, stride=s)
            out = torch.baddbmm(self.bias[:, None], self.weight.flatten(1).expand(b, -1, -1), patches)
            return out.view(b, -1, h_out, w_out)
        if s != 1 or x.dtype != torch.float32:
            return super().forward(x)
        if pixels >= self.NNPACK_MIN_PIXELS:
            if NNPACK and x.is_contiguous():
                return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1])
            return super().forward(x)
        filters = self.kept_winograd_filters()
        return super().forward(x) if filters is None else winograd_conv3x3(x, filters, self.bias)

    def kept_winograd_filters(self) -> torch.Tensor | None:
        """The kept U = G g G^T of the current weights; None when switched off, with autograd on (U would
        cut the weights' gradient), or for weights made under inference_mode, which have no version counter
        to tell an in-place change. (An edit through `.data` bumps no version either: edit weights in place
        under torch.no_grad(), or assign new ones.)"""
        weight = self.weight
        if not self.KEEP_WINOGRAD_FILTERS or torch.is_grad_enabled() or weight.is_inference():
            return None
        # A load (assign=True), .to() or an in-place edit changes the storage or bumps the version.
        identity = (weight.data_ptr(), weight._version, weight.dtype)
        if self._winograd is None or self._winograd[0] != identity:
            self._winograd = identity, winograd_filters(weight.detach())
        return self._winograd[1]


def conv3x3(cin: int, cout: int, stride: int = 1) -> Conv3x3:
    return Conv3x3(cin, cout, stride)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
