"""Controllable Feature Wrapping (CFW), paper Sec. 3.2: the VAE decoder, with the LR image's encoder
features fused back in, by an amount set by the user.

Diffusion makes realistic but not always faithful detail. CFW trades the two off at decode time: the
encoder of the CFW autoencoder sees the (upsampled) LR image, and at two decoder levels a small network
C (residual blocks and RRDBs) turns [encoder feature, decoder feature] into a correction,

    F_m = F_d + C(F_e, F_d; theta) * w                                              (paper Eq. 2)

w = 0 is the plain VAE decoder (most realistic), w = 1 the most faithful; the official script uses 0.5.
Keys mirror `vqgan_cfw_00011.ckpt`: `encoder.`, `decoder.` (with `decoder.fusion_layer_<level>`),
`quant_conv.`, `post_quant_conv.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CFWConfig
from .layers import conv3x3
from .vae import AutoencoderKL, Decoder, ResnetBlock


class ResidualDenseBlock(nn.Module):
    """ESRGAN's dense block: five 3x3 convs, each seeing all earlier outputs; residual scaled by 0.2."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.conv1 = conv3x3(channels, growth)
        self.conv2 = conv3x3(channels + growth, growth)
        self.conv3 = conv3x3(channels + 2 * growth, growth)
        self.conv4 = conv3x3(channels + 3 * growth, growth)
        self.conv5 = conv3x3(channels + 4 * growth, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(features, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block (ESRGAN): three dense blocks, residual scaled by 0.2."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, growth)
        self.rdb2 = ResidualDenseBlock(channels, growth)
        self.rdb3 = ResidualDenseBlock(channels, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class FusionLayer(nn.Module):
    """C(F_e, F_d; theta) of Eq. 2: [F_e, F_d] -> ResBlock -> RRDBs -> ResBlock."""

    def __init__(self, channels: int, num_blocks: int, growth: int, groups: int):
        super().__init__()
        self.encode_enc_1 = ResnetBlock(2 * channels, channels, shortcut_name="conv_out", groups=groups)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, growth) for _ in range(num_blocks)))
        self.encode_enc_3 = ResnetBlock(channels, channels, shortcut_name="conv_out", groups=groups)

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor) -> torch.Tensor:
        h = self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))
        return self.encode_enc_3(self.encode_enc_2(h))


class CFWDecoder(Decoder):
    """The VAE decoder plus a fusion layer at every up level except the first and the last."""

    def __init__(self, cfg: CFWConfig):
        super().__init__(cfg)
        self.fusion_levels = range(1, len(cfg.ch_mult) - 1)
        for level in self.fusion_levels:
            width = cfg.ch * cfg.ch_mult[level]
            self.add_module(f"fusion_layer_{level}", FusionLayer(width, cfg.num_fuse_block, cfg.num_grow_ch, cfg.norm_groups))

    def forward(self, z: torch.Tensor, enc_features: dict[int, torch.Tensor] | None = None, w: float = 0.0):
        if w == 0:
            return super().forward(z)
        if not enc_features:
            raise ValueError("CFW decoding with w != 0 needs the encoder features of the LR image")

        def fuse(level: int, h: torch.Tensor) -> torch.Tensor:
            if level not in self.fusion_levels:
                return h
            fusion = getattr(self, f"fusion_layer_{level}")
            # F_m = F_d + C(F_e, F_d) * w   (Eq. 2); up level l fuses the encoder's features of down level l
            return h + w * fusion(enc_features[level], h)

        return super().forward(z, fuse)


class CFWAutoencoder(AutoencoderKL):
    """The CFW checkpoint: the VAE encoder (returning its features too) and the fusing decoder."""

    def __init__(self, cfg: CFWConfig | None = None):
        cfg = cfg or CFWConfig()
        super().__init__(cfg)
        self.decoder = CFWDecoder(cfg)

    def encode_with_features(self, x: torch.Tensor):
        """Image -> (moments, encoder features F_e by down level: {1: ..., 2: ...})."""
        h, features = self.encoder(x, return_features=True)
        return self.quant_conv(h), features

    def decode(self, z: torch.Tensor, enc_features: dict[int, torch.Tensor] | None = None, w: float = 0.0):
        """Unscaled latent -> image, fusing `enc_features` with weight w (w = 0: the plain decoder)."""
        return self.decoder(self.post_quant_conv(z), enc_features, w)
