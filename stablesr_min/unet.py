"""The SD 2.x denoising UNet, with StableSR's SFT modulation in every residual block (paper Sec. 3.1).

eps_theta(z_t, t, c, s): the latent z_t is processed down and up through `channel_mult` levels; every level
has residual blocks (conditioned on t), spatial transformers (self-attention over pixels, cross-attention to
the text context c) and, in StableSR, an SFT layer per residual block that modulates the features with the
time-aware encoder's feature s of the same spatial size. With `use_sft=False` the same tree without the SFT
layers is the plain SD 2.x UNet, so an SD 2.1-base checkpoint loads and runs as the diffusion prior alone.

Attribute names mirror the checkpoint keys under `model.diffusion_model.` (`input_blocks.1.0.spade.mlp_shared.0
.weight`, ...); Sequential indices that held dropout in training are kept as Identity so the indices match.
The time-aware encoder (`time_encoder.py`) reuses the timestep embedding, GroupNorm32, ResBlock and the
block container defined here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig
from .layers import Upsample, conv3x3


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim): [cos(t * f_i), sin(t * f_i)], f_i = P^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype (as the reference does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """The UNet's GroupNorm: `groups` groups (officially 32), eps 1e-5."""
    return GroupNorm32(groups, channels)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, channels per head): a fixed head width if `num_head_channels` is set, else a fixed head count."""
    if num_head_channels == -1:
        return num_heads, channels // num_heads
    return channels // num_head_channels, num_head_channels


class SFT(nn.Module):
    """Spatial feature transform: UNet features F modulated by the time-aware encoder's feature s of the same size.

    Paper Eq. 1:  F_hat = (1 + alpha) ⊙ F + beta,   (alpha, beta) = M_theta(s)
    M_theta is a shared 3x3 conv + ReLU feeding one 3x3 conv for alpha (`mlp_gamma`) and one for beta
    (`mlp_beta`). The official code builds it as a SPADE block, hence the key names.
    """

    HIDDEN = 128  # width of the shared conv, fixed in the reference

    def __init__(self, channels: int, cond_channels: int, norm_groups: int = 32):
        super().__init__()
        self.param_free_norm = normalization(channels, norm_groups)  # named so in the reference, though it has affine weights
        self.mlp_shared = nn.Sequential(conv3x3(cond_channels, self.HIDDEN), nn.ReLU())
        self.mlp_gamma = conv3x3(self.HIDDEN, channels)
        self.mlp_beta = conv3x3(self.HIDDEN, channels)

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(s)
        # F = GroupNorm(h): the official code normalises before modulating, Eq. 1 does not; we follow the code,
        # since the released weights were trained that way.
        return self.param_free_norm(h) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class ResBlock(nn.Module):
    """x -> skip(x) + out_layers(in_layers(x) + emb_layers(t_emb)), with the time embedding added per channel.

    With `semb_channels` set (StableSR's ResBlockDual) the residual branch ends with SFT: it modulates the
    output of out_layers' last conv, before the skip addition, with the struct_cond feature of the same
    width: skip(x) + SFT(out_layers(...), s). The skip path itself is not modulated.
    """

    def __init__(self, cin: int, emb_channels: int, cout: int, semb_channels: int | None = None,
                 norm_groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(cin, norm_groups), nn.SiLU(), conv3x3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, cout))
        if semb_channels is not None:
            self.spade = SFT(cout, semb_channels, norm_groups)
        # The reference falls back to one group per channel when the width is not a multiple of the groups.
        out_norm = normalization(cout, norm_groups) if cout % norm_groups == 0 else GroupNorm32(cout, cout)
        self.out_layers = nn.Sequential(out_norm, nn.SiLU(), nn.Identity(), conv3x3(cout, cout))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, struct_cond: dict[int, torch.Tensor] | None = None):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        if hasattr(self, "spade"):
            h = self.spade(h, struct_cond[h.shape[-1]])
        return self.skip_connection(x) + h


def time_blind_blocks(network: nn.Module) -> list[str]:
    """The residual blocks of `network` whose time embedding cannot reach their output: it is added as a
    per-channel constant right before a GroupNorm of one channel per group, whose mean subtraction removes
    it exactly (a width of 32 with 32 groups). The network then computes the same thing at every t."""
    return [name for name, m in network.named_modules()
            if isinstance(m, ResBlock) and m.out_layers[0].num_groups == m.out_layers[0].num_channels]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, N, heads * d) -> (B, heads, N, d)
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (B, heads, N, d) -> (B, N, heads * d)
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


class CrossAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V per head; self-attention when no context is given."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # index 1 held dropout in training

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class GEGLU(nn.Module):
    """(x W_a + b_a) * GELU(x W_g + b_g); `proj` holds [W_a; W_g] as one Linear, as in the checkpoint."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 held dropout in training
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention to the text, GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Pixels as tokens: GroupNorm, linear in, transformer blocks, linear out, plus the input (SD 2.x)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, norm_groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, H*W, C)
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # (B, H*W, C) -> (B, C, H, W)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepBlocks(nn.ModuleList):
    """One entry of input_blocks / output_blocks: layers run in order, each given the inputs it needs."""

    def forward(self, h, emb, context=None, struct_cond=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, struct_cond)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """eps_theta(z_t, t, c, s): input blocks down, middle block, output blocks up with skip concatenations."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        if not cfg.use_linear_in_transformer:
            raise ValueError("only SD 2.x spatial transformers (use_linear_in_transformer=True) are implemented")
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        n_levels = len(cfg.channel_mult)

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, cfg.semb_channels if cfg.use_sft else None, cfg.norm_groups)

        def transformer(channels: int) -> SpatialTransformer:
            heads, dim_head = attention_heads(channels, cfg.num_heads, cfg.num_head_channels)
            return SpatialTransformer(channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepBlocks([conv3x3(cfg.in_channels, mc)])])
        skip_widths = [mc]  # width of every input block's output, consumed in reverse by the output blocks
        ch, ds = mc, 1  # current width and downsampling factor
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepBlocks(layers))
                skip_widths.append(ch)
            if level != n_levels - 1:
                self.input_blocks.append(TimestepBlocks([Downsample(ch)]))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepBlocks([res_block(ch, ch), transformer(ch), res_block(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_widths.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepBlocks(layers))

        self.out = nn.Sequential(normalization(ch, cfg.norm_groups), nn.SiLU(), conv3x3(ch, cfg.out_channels))
        # Training only (`train sr --checkpointing`): keep no activations inside a block for the backward
        # pass, recompute them there: much less memory for about a third more compute.
        self.checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        struct_cond: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) noisy latent, (B,) timesteps, (B, L, context_dim) text -> (B, out_channels, H, W).

        `struct_cond` maps a spatial width to the time-aware encoder's feature of that width; it is
        required with SFT on and refused with SFT off.
        """
        if self.cfg.use_sft != (struct_cond is not None):
            raise ValueError(
                "this UNet has SFT layers: pass struct_cond (the time-aware encoder's features)"
                if self.cfg.use_sft
                else "this UNet has no SFT layers (use_sft=False): struct_cond cannot be used"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = self.run_block(block, h, emb, context, struct_cond)
            skips.append(h)
        h = self.run_block(self.middle_block, h, emb, context, struct_cond)
        for block in self.output_blocks:
            h = self.run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, struct_cond)
        return self.out(h)

    def run_block(self, block: TimestepBlocks, h, emb, context, struct_cond) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, struct_cond, use_reentrant=False)
        return block(h, emb, context, struct_cond)
