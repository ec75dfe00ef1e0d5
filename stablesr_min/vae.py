"""The SD 2.x VAE (AutoencoderKL): image <-> latent, 4 channels, 8x down (SD's; the shipped tiny model's VAE,
three levels, is 4x down: one halving per level after the first, `VAEConfig.downscale`).

StableSR keeps the VAE frozen: the LR image is encoded once (the start of sampling, Sec. 3.3) and the
final latent is decoded, by this decoder or by the CFW decoder (`cfw.py`), which shares this module tree.
Attribute names mirror the checkpoint keys under `first_stage_model.`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .layers import Upsample, conv3x3


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """The VAE's GroupNorm: 32 groups (`VAEConfig.norm_groups`), eps 1e-6 (the UNet's uses eps 1e-5)."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 shortcut when the width changes.

    The shortcut's checkpoint key is `nin_shortcut` in the VAE and `conv_out` in the CFW fusion layers.
    """

    def __init__(self, cin: int, cout: int, shortcut_name: str = "nin_shortcut", groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = conv3x3(cin, cout)
        self.norm2 = Normalize(cout, groups)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return getattr(self, self.shortcut_name)(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C)
        q, k, v = (p(hn).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, 1, H*W, C) -> (B, C, H, W)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class PaddedDownsample(nn.Module):
    """Stride-2 3x3 conv with the reference's asymmetric zero padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups=groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: residual blocks (each optionally followed by attention), then a resampler."""

    def __init__(self, cin: int, cout: int, n_blocks: int, with_attn: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups=groups) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_blocks if with_attn else 0))

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    # The CFW encoder hands its decoder the activations of down levels 1 and 2 (after their residual
    # blocks, before the downsample). The reference hard-codes these two levels; so do we.
    FEATURE_LEVELS = (1, 2)

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        cin, res = cfg.ch, cfg.resolution
        for i, cout in enumerate(widths):
            level = Level(cin, cout, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg.norm_groups)
            if i != len(widths) - 1:
                level.downsample = PaddedDownsample(cout)
                res //= 2
            self.down.append(level)
            cin = cout
        self.mid = MidBlock(cin, cfg.norm_groups)
        self.norm_out = Normalize(cin, cfg.norm_groups)
        self.conv_out = conv3x3(cin, 2 * cfg.z_channels)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """(B, 3, H, W) -> (B, 2*z, H/f, W/f): mean and log-variance, before quant_conv; with
        `return_features`, also {level: its activations} for the FEATURE_LEVELS."""
        h = self.conv_in(x)
        features = {}
        for i, level in enumerate(self.down):
            h = level.blocks(h)
            if i in self.FEATURE_LEVELS:
                features[i] = h
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return (h, features) if return_features else h


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        cin, res = widths[-1], cfg.resolution // 2 ** (n - 1)
        self.conv_in = conv3x3(cfg.z_channels, cin)
        self.mid = MidBlock(cin, cfg.norm_groups)
        # Built from the lowest resolution up, stored so that up[i] is level i (as in the checkpoint).
        up = []
        for i in reversed(range(n)):
            level = Level(cin, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg.norm_groups)
            if i != 0:
                level.upsample = Upsample(widths[i])
                res *= 2
            up.insert(0, level)
            cin = widths[i]
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(cin, cfg.norm_groups)
        self.conv_out = conv3x3(cin, cfg.out_ch)

    def forward(self, z: torch.Tensor, fuse: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        """(B, z, h, w) -> (B, 3, 8h, 8w). `fuse(level, h)` runs after each up level's blocks, before its
        upsample (the CFW decoder's hook)."""
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i].blocks(h)
            if fuse is not None:
                h = fuse(i, h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, std^2), from the 2*C moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # The reference clamps the log-variance before exponentiating.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + std * noise, with noise ~ N(0, I) drawn by the caller (so runs are reproducible)."""
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, (B,): the VAE's regulariser (Kingma & Welling 2014, App. B)

            KL = 1/2 sum_j (mean_j^2 + std_j^2 - 1 - log std_j^2)
        """
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1 - self.logvar).flatten(1).sum(1)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or VAEConfig()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return self.cfg.downscale

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image in [-1, 1], (B, 3, H, W) -> posterior over (B, embed_dim, H/8, W/8) (unscaled)."""
        return DiagonalGaussian(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
