"""The time-aware encoder (`structcond_stage_model.`, `EncoderUNetModelWT`): paper Sec. 3.1.

"Time-aware guidance": a small half-UNet encodes the LR latent into one feature map per UNet resolution,
and those features modulate the frozen SD UNet through SFT (`unet.SFT`). The encoder also sees the
timestep t, because the guidance strength should vary with the noise level: at large t (low SNR) the noisy
latent holds little of the image and the LR condition has to supply its structure; as t falls (SNR rises)
the latent holds more of it and the guidance should give way to the diffusion prior. A condition blind to t
would have one strength for every step; with t as input the encoder learns a strength per noise level.

Attribute names mirror the checkpoint keys under `structcond_stage_model.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TimeEncoderConfig
from .layers import conv3x3
from .unet import Downsample, ResBlock, TimestepBlocks, attention_heads, normalization, timestep_embedding


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, with 1x1 Conv1d projections (the reference's legacy layout).

    `qkv` outputs, per head, that head's q, k and v channels one after another: (B, heads * 3 * d, N).
    """

    def __init__(self, channels: int, heads: int, norm_groups: int = 32):
        super().__init__()
        self.heads = heads
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, C, H*W)
        x = x.flatten(2)
        # (B, heads * 3 * d, N) -> (B, heads, N, 3 * d), made contiguous: SDPA's fused CPU kernel needs unit
        # stride along d, else it falls back to materialising the N x N attention matrix.
        qkv = self.qkv(self.norm(x)).view(b, self.heads, 3 * c // self.heads, -1).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, d) -> (B, C, N)
        out = out.transpose(2, 3).reshape(b, c, -1)
        return (x + self.proj_out(out)).view(b, c, h, w)


class TimeAwareEncoder(nn.Module):
    """LR latent and t -> {spatial width: (B, out_channels, width, width)}, one feature per UNet level.

    The features are taken at the end of each level (before its downsample) and after the middle block,
    and each goes through its own output head, a ResBlock to `out_channels` (`fea_tran`).
    """

    def __init__(self, cfg: TimeEncoderConfig | None = None):
        super().__init__()
        cfg = cfg or TimeEncoderConfig()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        n_levels = len(cfg.channel_mult)

        def attention(channels: int) -> AttentionBlock:
            heads, _ = attention_heads(channels, cfg.num_heads, cfg.num_head_channels)
            return AttentionBlock(channels, heads, cfg.norm_groups)

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, norm_groups=cfg.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepBlocks([conv3x3(cfg.in_channels, mc)])])
        feature_widths = []  # channels of each tapped feature: every level's end, then the middle block
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepBlocks(layers))
            if level != n_levels - 1:
                self.input_blocks.append(TimestepBlocks([Downsample(ch)]))
                feature_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepBlocks([res_block(ch, ch), attention(ch), res_block(ch, ch)])
        feature_widths.append(ch)

        self.fea_tran = nn.ModuleList(res_block(c, cfg.out_channels) for c in feature_widths)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, C, H, W) LR latent, (B,) timesteps -> features keyed by their spatial width.

        A time-blind encoder (`cfg.time_aware = False`, trained by `train sr --time-blind`) is given t = 0
        whatever the noise level, in training and in sampling alike, so its features cannot follow the SNR.
        """
        if not self.cfg.time_aware:
            timesteps = torch.zeros_like(timesteps)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        features = []
        h = x
        for block in self.input_blocks:
            if isinstance(block[0], Downsample):
                features.append(h)
            h = block(h, emb)
        features.append(self.middle_block(h, emb))
        return {f.shape[-1]: head(f, emb) for f, head in zip(features, self.fea_tran)}
