"""Building blocks shared by the VAE, the CFW decoder, the UNet and the time-aware encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Winograd F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): each
# m x m block of a 3x3 convolution's output comes from the (m+2) x (m+2) input tile d around it as
#     Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A,
# (m+2)^2 multiplications per input channel where the direct convolution needs 9 m^2: 16 against 36 for
# m = 2, 36 against 144 for m = 4. Summed over the input channels, the ⊙ becomes (m+2)^2 matrix products,
# one per position in the tile. A larger m saves more products but has larger transforms and rounding
# error: F(2x2, 3x3) lands at 3e-7 from float64, F(4x4, 3x3) at 2e-6, like oneDNN's direct convolution.


@dataclass(frozen=True)
class Winograd:
    """F(m x m, 3 x 3): the transforms as single matrices on flattened tiles, by vec(L X R^T) = (L ⊗ R) vec(X)."""

    m: int  # side of an output tile; input tiles are m + 2
    kron_g: torch.Tensor  # ((m+2)^2, 9), float64: filters to tile positions
    kron_bt: torch.Tensor  # ((m+2)^2, (m+2)^2): input tiles to tile positions
    kron_at: torch.Tensor  # (m^2, (m+2)^2): tile positions to output tiles

    @classmethod
    def from_matrices(cls, bt: list, g: list, at: list) -> "Winograd":
        bt, g, at = torch.tensor(bt), torch.tensor(g, dtype=torch.float64), torch.tensor(at)
        return cls(len(at), torch.kron(g, g), torch.kron(bt, bt), torch.kron(at, at))


F2X3 = Winograd.from_matrices(
    bt=[[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    g=[[1.0, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    at=[[1.0, 1, 1, 0], [0, 1, -1, -1]],
)
F4X3 = Winograd.from_matrices(  # interpolation points 0, ±1, ±2 and infinity
    bt=[[4.0, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    g=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    at=[[1.0, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
)


def winograd_filters(weight: torch.Tensor, f: Winograd) -> torch.Tensor:
    """(Cout, Cin, 3, 3) filters g -> U = G g G^T, as ((m+2)^2, Cout, Cin): one matrix per tile position."""
    # (Cout, Cin, 9) @ (9, (m+2)^2) -> (Cout, Cin, (m+2)^2) -> ((m+2)^2, Cout, Cin), in float64: G has sixths
    u = weight.double().flatten(2) @ f.kron_g.T.to(weight.device)
    return u.permute(2, 0, 1).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor, f: Winograd) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1, of x (B, C, H, W), with `filters` from `winograd_filters(w, f)`."""
    b, c, h, w = x.shape
    m, a = f.m, f.m + 2
    th, tw = -(-h // m), -(-w // m)  # m x m output tiles down and across
    if (h, w) != (m * th, m * tw):
        x = F.pad(x, (0, m * tw - w, 0, m * th - h))  # bottom/right zeros up to whole tiles
    # V = B^T d B for every a x a input tile d (at stride m, with the conv's padding 1): row p of B^T ⊗ B^T
    # is an a x a stencil, so this is one strided convolution with every channel as its own image.
    # (B*C, 1, H, W) -> (B*C, a*a, th, tw) -> (a*a, C, B*th*tw): a view when B = 1
    stencils = f.kron_bt.view(a * a, 1, a, a).to(x)
    v = F.conv2d(x.reshape(b * c, 1, m * th, m * tw), stencils, stride=m, padding=1)
    v = v.view(b, c, a * a, th * tw).permute(2, 1, 0, 3).reshape(a * a, c, -1)
    # M = sum over input channels of U ⊙ V: one (Cout, C) @ (C, B*th*tw) product per tile position
    prod = torch.bmm(filters, v)
    # Y = A^T M A: (a*a, Cout, B*th*tw) -> (m, m, Cout, B, th, tw) -> (B, Cout, m*th, m*tw)
    y = (f.kron_at.to(x) @ prod.view(a * a, -1)).view(m, m, -1, b, th, tw)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(b, -1, m * th, m * tw)[:, :, :h, :w]
    return y + bias[:, None, None]


# NNPACK ships inside PyTorch's CPU builds (x86 with AVX2, and ARM); asking whether it is available also
# initialises it, which its convolution needs before the first call.
NNPACK = torch._nnpack_available()


class Conv3x3(nn.Conv2d):
    """3x3 conv, padding 1. Every path computes the same convolution; on CPU the fastest depends on the map.

    Measured on this project's 2-core CPUs (float32, batch 1; see the README's Performance section):
    * At most 64 output pixels (the UNet's deepest maps: few pixels, 1280-2560 channels, large weights):
      one matrix product over unfolded patches, 2-4x faster than oneDNN's direct convolution.
    * Larger maps up to 63x63, stride 1: Winograd above. F(2x2, 3x3) is 1.1-2.6x faster than oneDNN on
      16x16 maps; from 32x32 (`WINOGRAD_F4_MIN_PIXELS`) F(4x4, 3x3) is another 1.2-1.45x faster (on
      16x16 maps its larger transforms eat the saving). The transformed filters are kept, (m+2)^2/9 the
      size of the weights (16/9 or 4x), rebuilt when the weights change or the map needs the other m, and
      freed when a map takes another path (a layer sees one map size for a whole upscale: all sampling
      tiles have one size).
    * At least 64x64 output pixels, stride 1 (the first UNet level of a 512 px tile, the VAE): NNPACK's
      Winograd F(6x6, 3x3), 1.5-2.5x faster than oneDNN on all but the thinnest layers. It transforms the
      weights at every call, which is why it is slower than oneDNN on small maps with many channels.
    Against float64, F(2x2, 3x3) lands nearer than the direct convolution (3e-7 against 1e-6 relative),
    F(4x4, 3x3) and NNPACK a little further (2e-6, 3e-6). Everything else (GPUs, half precision, stride 2
    beyond 64 pixels, autograd through Winograd, torch.compile) takes PyTorch's convolution.
    """

    GEMM_MAX_PIXELS = 64
    WINOGRAD_F4_MIN_PIXELS = 32 * 32
    NNPACK_MIN_PIXELS = 64 * 64
    # The kept filters cost about 2.6 GB for the full-size UNet and encoder at a 64x64 latent tile (the
    # README's Performance section); False saves that memory for slower CPU steps.
    KEEP_WINOGRAD_FILTERS = True

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=1)
        self._winograd: tuple[tuple, torch.Tensor] | None = None  # (weight identity and m, U); not in the state dict

    def _apply(self, fn, recurse=True):
        self._winograd = None  # .to(), .cuda(), .half(): the kept filters belong to the old weights
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        s = self.stride[0]
        h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1
        pixels = h_out * w_out
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        stride1_float32 = s == 1 and x.dtype == torch.float32  # what Winograd and NNPACK both need
        if stride1_float32 and self.GEMM_MAX_PIXELS < pixels < self.NNPACK_MIN_PIXELS:
            f = F4X3 if pixels >= self.WINOGRAD_F4_MIN_PIXELS else F2X3
            filters = self.kept_winograd_filters(f)
            return super().forward(x) if filters is None else winograd_conv3x3(x, filters, self.bias, f)
        self._winograd = None  # kept for a map size this layer no longer sees: free them
        if pixels <= self.GEMM_MAX_PIXELS:
            # (B, C, H, W) -> (B, C*9, H_out*W_out) patches; (Cout, C*9) @ patches -> (B, Cout, H_out*W_out)
            patches = F.unfold(x, 3, padding=1, stride=s)
            out = torch.baddbmm(self.bias[:, None], self.weight.flatten(1).expand(b, -1, -1), patches)
            return out.view(b, -1, h_out, w_out)
        if stride1_float32 and pixels >= self.NNPACK_MIN_PIXELS and NNPACK and x.is_contiguous():
            return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1])
        return super().forward(x)

    def kept_winograd_filters(self, f: Winograd) -> torch.Tensor | None:
        """The kept U = G g G^T of the current weights for F(m x m, 3 x 3).

        None when switched off, with autograd on (U would cut the weights' gradient), or for weights made
        under inference_mode, which have no version counter to tell an in-place change. (An edit through
        `.data` bumps no version either: edit weights in place under torch.no_grad(), or assign new ones.)
        """
        weight = self.weight
        if not self.KEEP_WINOGRAD_FILTERS or torch.is_grad_enabled() or weight.is_inference():
            return None
        # A load (assign=True), .to() or an in-place edit changes the storage or bumps the version.
        identity = (weight.data_ptr(), weight._version, weight.dtype, f.m)
        if self._winograd is None or self._winograd[0] != identity:
            self._winograd = None  # free the old filters before making the new ones
            self._winograd = identity, winograd_filters(weight.detach(), f)
        return self._winograd[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (W x^T)^T on CPU for at most `Linear.TRANSPOSED_MAX_ROWS` rows.

    The UNet's deepest levels have 16-64 tokens and weights up to 1280x5120. MKL runs such a product
    10-35% faster with the long side as the rows: W (out, in) @ x^T (in, rows). The result is returned as
    a transposed view; the elementwise ops and products after it take any strides.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 0 < rows <= Linear.TRANSPOSED_MAX_ROWS:
        return F.linear(x, weight, bias)
    # (..., in) -> (in, rows); (out, in) @ (in, rows) -> (out, rows) -> (..., out)
    x_t = x.reshape(rows, -1).t()
    out_t = weight @ x_t if bias is None else torch.addmm(bias[:, None], weight, x_t)
    return out_t.t().view(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """nn.Linear through `linear` above: the same weights and result, a faster product for few tokens."""

    TRANSPOSED_MAX_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def conv3x3(cin: int, cout: int, stride: int = 1) -> Conv3x3:
    return Conv3x3(cin, cout, stride)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
