"""The text encoder: OpenCLIP ViT-H/14's text tower, read the way SD 2.x reads it.

Token and position embeddings, a stack of pre-LayerNorm transformer blocks with a causal mask, and a final
LayerNorm. SD 2.x (and so StableSR) skips the last block ("penultimate") and keeps every position: the
UNet cross-attends to all 77 vectors. StableSR always encodes the empty prompt. Attribute names mirror the
checkpoint keys under `cond_stage_model.model.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with `nn.MultiheadAttention`'s parameters (q, k, v packed)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # (B, L, C) -> (B, heads, L, C/heads)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # (B, heads, L, C/heads) -> (B, L, C)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, not CLIP's QuickGELU


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    LAYERS = ("last", "penultimate")

    def __init__(self, cfg: TextConfig | None = None):
        super().__init__()
        cfg = cfg or TextConfig()
        if cfg.layer not in self.LAYERS:
            raise ValueError(f"text layer must be one of {self.LAYERS}, got {cfg.layer!r}")
        self.cfg = cfg
        # Parameters are created as zeros: every value comes from the checkpoint. (`nn.Embedding(n, d)` would
        # draw a normal init, which on the meta device the loaders build on costs PyTorch ~2 s of imports.)
        self.token_embedding = nn.Embedding.from_pretrained(torch.zeros(cfg.vocab_size, cfg.width), freeze=False)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        blocks = [ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)]
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(blocks)})
        self.ln_final = nn.LayerNorm(cfg.width)
        # CLIP's contrastive head (pooled-text projection, logit temperature): stored in every SD 2.x
        # checkpoint and kept so that loading stays strict, but SD 2.x never uses them.
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) token ids -> (B, context_length, width) context for cross-attention."""
        if tokens.ndim != 2 or tokens.shape[1] != self.cfg.context_length:
            raise ValueError(f"tokens must be (B, {self.cfg.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        blocks = self.transformer.resblocks
        used = len(blocks) - 1 if self.cfg.layer == "penultimate" else len(blocks)
        for block in blocks[:used]:
            x = block(x)
        return self.ln_final(x)
