"""What every trainer needs to know about the networks it trains: which crop sizes they take, how their new
layers start, and whether their residual blocks can see t."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..config import SCALE, StableSRConfig
from ..errors import UsageError
from ..model import time_blindness
from ..pipeline import smallest_tile
from ..time_encoder import AttentionBlock
from ..unet import ResBlock, SpatialTransformer


def default_init(modules: list[nn.Module], seed: int) -> None:
    """PyTorch's default initialisation of every layer of the modules, drawn from a generator seeded with
    `seed` (the global one is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):  # what each layer's constructor calls
                    layer.reset_parameters()


@torch.no_grad()
def zero_init_like_official(network: nn.Module) -> None:
    """The official EncoderUNetModelWT (and SD's UNetModel) wrap the last conv of every residual branch and
    the output projection of every attention and spatial transformer in `zero_module`, so each block
    starts as its skip path. (The SPADE layers keep PyTorch's default initialisation.)"""
    for layer in network.modules():
        if isinstance(layer, ResBlock):
            out = layer.out_layers[-1]
        elif isinstance(layer, (AttentionBlock, SpatialTransformer)):
            out = layer.proj_out
        else:
            continue
        out.weight.zero_()
        out.bias.zero_()


def check_gt_size(gt_size: int, batch_size: int, cfg: StableSRConfig, at_least: int = 0) -> None:
    """--gt-size must give whole latents at every level of the networks and a whole LR image; with one crop
    per process it must also keep their deepest feature map at 2 x 2 or more (`pipeline.smallest_tile`): at
    1 x 1 a GroupNorm of one channel per group has a single value to normalise, which PyTorch refuses.
    `at_least`: what the data needs besides (`data.smallest_gt_size`: crops larger than the blur kernels)."""
    multiple = gt_size_multiple(cfg, SCALE)
    smallest = math.ceil(at_least / multiple) * multiple if at_least > multiple else multiple
    if batch_size == 1:
        smallest = max(smallest, math.ceil(smallest_tile(cfg) * cfg.vae.downscale / multiple) * multiple)
    if gt_size < smallest or gt_size % multiple:
        why = ""
        if batch_size == 1 and smallest > multiple:
            why += " with --batch-size 1 (a deepest feature map of 2 x 2 or more)"
        if at_least > multiple:
            why += " (and crops larger than the degradation's blur kernels)"
        raise UsageError(f"--gt-size {gt_size}: these networks need a multiple of {multiple} (whole latents at "
                         f"every level, a whole LR image at x{SCALE}), at least {smallest}{why}; use --gt-size "
                         f"{max(smallest, math.ceil(gt_size / multiple) * multiple)}")


def warn_time_blind(cfg: StableSRConfig, speak: bool = True) -> None:
    """One warning line if some residual block of the networks cannot see t (`model.time_blindness`): training
    still runs (the golden test models are built so), but that block learns one function for every t."""
    note = time_blindness(cfg)
    if note and speak:
        print(f"WARNING: {note}", file=sys.stderr)


def gt_size_multiple(cfg: StableSRConfig, scale: int) -> int:
    """GT crops must give whole latents that survive every downsampling of the UNet and the encoder,
    and a whole LR image: 8 x the VAE factor (8) = 64 px for the official networks."""
    network_factor = 2 ** (max(len(cfg.unet.channel_mult), len(cfg.time_encoder.channel_mult)) - 1)
    return math.lcm(cfg.vae.downscale * network_factor, scale)
