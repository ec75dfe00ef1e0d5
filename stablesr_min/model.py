"""The StableSR checkpoint as one module tree, and the CFW checkpoint beside it.

`StableSR().state_dict()` has exactly the keys of `stablesr_000117.ckpt` (less the schedule buffers, which
`schedule.py` recomputes), so loading the official file is one strict, checked copy:

    first_stage_model.       the VAE                       (vae.py)
    model.diffusion_model.   the UNet with SFT             (unet.py)
    cond_stage_model.model.  the OpenCLIP text encoder     (text.py)
    structcond_stage_model.  the time-aware encoder        (time_encoder.py)

With `cfg.unet.use_sft = False` the same tree holds a plain SD 2.x checkpoint (no time-aware encoder),
so the diffusion prior alone can be run for comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .cfw import CFWAutoencoder
from .config import StableSRConfig
from .errors import ConfigError, UsageError, WeightsError
from .text import TextEncoder
from .time_encoder import TimeAwareEncoder
from .unet import UNet, time_blind_blocks
from .vae import AutoencoderKL
from .weights import CHECKPOINT_KINDS, WeightFiles, guess_kind, load_module


class _Holder(nn.Module):
    """An empty level of the key path (`model.`, `cond_stage_model.`), as in the reference."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class StableSR(nn.Module):
    def __init__(self, cfg: StableSRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or StableSRConfig()
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.model = _Holder(diffusion_model=UNet(cfg.unet))
        self.cond_stage_model = _Holder(model=TextEncoder(cfg.text))
        self.structcond_stage_model = TimeAwareEncoder(cfg.time_encoder) if cfg.unet.use_sft else None

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model.model

    @property
    def time_encoder(self) -> TimeAwareEncoder | None:
        return self.structcond_stage_model


def time_blind_layers(cfg: StableSRConfig) -> list[str]:
    """Checkpoint names of the residual blocks of cfg's UNet and time-aware encoder that cannot see t
    (`unet.time_blind_blocks`); built on the meta device, so it costs no memory."""
    with torch.device("meta"):
        networks = {"model.diffusion_model.": UNet(cfg.unet), "structcond_stage_model.": TimeAwareEncoder(cfg.time_encoder)}
    return [prefix + name for prefix, net in networks.items() for name in time_blind_blocks(net)]


def time_blindness(cfg: StableSRConfig) -> str | None:
    """One line naming the first residual block that cannot see t and the fix, or None if every one can."""
    layers = time_blind_layers(cfg)
    if not layers:
        return None
    more = f" and {len(layers) - 1} more residual blocks" if len(layers) > 1 else ""
    return (f"{layers[0]}{more} add the time embedding right before a GroupNorm of one channel per group, which "
            "subtracts it again, so they compute the same thing at every t; give the config's unet and "
            "time_encoder a norm_groups that leaves several channels per group (e.g. 8 at width 32)")


def resolve_config(files: WeightFiles, config: StableSRConfig | str | os.PathLike | None) -> StableSRConfig:
    """An explicit config (object or JSON file) wins; else the one stored in the file; else the official."""
    if isinstance(config, StableSRConfig):
        return config
    if config is not None:
        try:
            text = Path(config).read_text()
            json.loads(text)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{config}: not a readable stablesr-min config JSON ({e})") from None
        cfg = config_from_json(text, str(config))
        check_networks(cfg, str(config))
        return cfg
    stored = files.config_json()
    return config_from_json(stored, f"{files.describe()}: its stored config") if stored else StableSRConfig()


def config_from_json(text: str, where: str) -> StableSRConfig:
    """The config in a JSON `text` read from `where` (a file): a field that cannot be is one line naming `where`
    and the field (`config.StableSRConfig.from_dict` checks them)."""
    try:
        return StableSRConfig.from_json(text)
    except ConfigError as e:
        raise ConfigError(e.field, e.problem, where) from None


def check_networks(cfg: StableSRConfig, where: str) -> None:
    """Build every network of `cfg` on the meta device (no memory, a fraction of a second): sizes each fine
    alone that together do not make them are one UsageError naming `where`, in the networks' own words."""
    try:
        with torch.device("meta"):
            StableSR(cfg)
            CFWAutoencoder(cfg.cfw)
    except (ValueError, TypeError, IndexError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise UsageError(f"{where}: these sizes do not make the networks ({e})") from None


def check_sampling_weights(files: WeightFiles) -> None:
    """Sampling needs the whole StableSR checkpoint: the diffusion prior alone (which `load_stablesr` loads too,
    for `train sr` to start from) is refused, as it would sample without the LR's guidance, and so are the
    layers that go after it alone."""
    kind = guess_kind(files.keys())
    if kind == "sr-part":
        raise WeightsError(f"{files.describe()}: is {CHECKPOINT_KINDS[kind]}")
    if kind == "sd2":
        raise WeightsError(f"{files.describe()}: is {CHECKPOINT_KINDS[kind]}; sampling needs the time-aware encoder "
                           "and SFT layers too (the tiny model's sr.safetensors goes after its prior.safetensors)")


def load_network(paths: Iterable[str | os.PathLike], config: StableSRConfig | str | os.PathLike | None,
                 build: Callable[[StableSRConfig], nn.Module], prefix: str, what: str,
                 dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
    """`build(cfg)` on the meta device (no memory), its tensors then read from the files strictly
    (`weights.load_module`, keys under `prefix`), in eval mode; cfg as `resolve_config` chooses it."""
    files = WeightFiles(paths)
    cfg = resolve_config(files, config)
    with torch.device("meta"):
        network = build(cfg)
    return load_module(network, files, prefix, what=what, dtype=dtype, device=device).eval()


def load_stablesr(paths: Iterable[str | os.PathLike], config: StableSRConfig | str | os.PathLike | None = None, *,
                  dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> StableSR:
    """Load the StableSR checkpoint (one or more safetensors files) strictly; see `weights.load_module`."""
    return load_network(paths, config, StableSR, "", "the StableSR model", dtype, device)


def load_cfw(path: str | os.PathLike, config: StableSRConfig | str | os.PathLike | None = None, *,
             dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> CFWAutoencoder:
    """Load the CFW checkpoint (`vqgan_cfw_00011`) strictly."""
    return load_network([path], config, lambda cfg: CFWAutoencoder(cfg.cfw), "", "the CFW autoencoder", dtype, device)


def load_vae(path: str | os.PathLike, config: StableSRConfig | str | os.PathLike | None = None, *,
             dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> AutoencoderKL:
    """Load the VAE (`first_stage_model.`) of a checkpoint strictly: a file of `train vae`, or the VAE inside
    an SD 2.x or StableSR checkpoint (their other tensors are left unread)."""
    return load_network([path], config, lambda cfg: AutoencoderKL(cfg.vae), "first_stage_model.", "the VAE", dtype,
                        device)
