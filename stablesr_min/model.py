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

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .cfw import CFWAutoencoder
from .config import StableSRConfig
from .golden import GoldenSet
from .text import TextEncoder
from .time_encoder import TimeAwareEncoder
from .unet import UNet
from .vae import AutoencoderKL
from .weights import WeightFiles, WeightsError, load_module


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


def resolve_config(files: WeightFiles, config: StableSRConfig | str | os.PathLike | None) -> StableSRConfig:
    """An explicit config (object or JSON file) wins; else the one stored in the file; else the official."""
    if isinstance(config, StableSRConfig):
        return config
    if config is not None:
        try:
            return StableSRConfig.from_json(open(config).read())
        except (OSError, ValueError, TypeError) as e:
            raise WeightsError(f"{config}: not a readable stablesr-min config JSON ({e})") from None
    stored = files.config_json()
    return StableSRConfig.from_json(stored) if stored else StableSRConfig()


def load_stablesr(
    paths: Iterable[str | os.PathLike],
    config: StableSRConfig | str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> StableSR:
    """Load the StableSR checkpoint (one or more safetensors files) strictly; see `weights.load_module`."""
    files = WeightFiles(paths)
    cfg = resolve_config(files, config)
    with torch.device("meta"):
        model = StableSR(cfg)
    return load_module(model, files, "", what="the StableSR model", dtype=dtype, device=device).eval()


def load_cfw(
    path: str | os.PathLike,
    config: StableSRConfig | str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> CFWAutoencoder:
    """Load the CFW checkpoint (`vqgan_cfw_00011`) strictly."""
    files = WeightFiles([path])
    cfg = resolve_config(files, config)
    with torch.device("meta"):
        cfw = CFWAutoencoder(cfg.cfw)
    return load_module(cfw, files, "", what="the CFW autoencoder", dtype=dtype, device=device).eval()


def load_vae(
    path: str | os.PathLike,
    config: StableSRConfig | str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> AutoencoderKL:
    """Load the VAE (`first_stage_model.`) of a checkpoint strictly: a file of `train vae`, or the VAE inside
    an SD 2.x or StableSR checkpoint (their other tensors are left unread)."""
    files = WeightFiles([path])
    cfg = resolve_config(files, config)
    with torch.device("meta"):
        vae = AutoencoderKL(cfg.vae)
    return load_module(vae, files, "first_stage_model.", what="the VAE", dtype=dtype, device=device).eval()


# ------------------------------------------------------------------------------------------------------
# Where the weights are: the converted official files, or (for demos without them) tiny random ones

OFFICIAL_STABLESR = "stablesr_000117.safetensors"  # from stablesr_000117.ckpt (or the turbo checkpoint)
OFFICIAL_CFW = "vqgan_cfw_00011.safetensors"  # from vqgan_cfw_00011.ckpt
RANDOM_WEIGHTS_WARNING = ("**These weights are RANDOM** (tiny models filled by a hash rule, from "
                          "scripts/make_tiny_weights.py): outputs show the computation, not super-resolution. "
                          "Convert the official checkpoints and point STABLESR_WEIGHTS (or --weights/--cfw) "
                          "at them for real results.")


@dataclass
class WeightsChoice:
    stablesr: list[Path]
    cfw: Path
    random: bool  # True: the tiny random demo weights


def tiny_weights_dir() -> Path:
    """Tiny random weights written (once) from the project's golden set into a cache folder."""
    golden = GoldenSet()
    tag = hashlib.sha1((golden.path / "manifest.json").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("STABLESR_CACHE", Path.home() / ".cache" / "stablesr-min"))
    folder = root / f"tiny-{tag}"
    if not all((folder / name).is_file() for name in ("stablesr.safetensors", "cfw.safetensors")):
        golden.write_weights(folder)
    return folder


def find_weights(folder: str | os.PathLike | None = None) -> WeightsChoice:
    """The official files in `folder` (default: $STABLESR_WEIGHTS); the tiny random ones if no folder is
    named at all. A folder that is named but lacks the files is an error, not a silent fallback."""
    folder = folder or os.environ.get("STABLESR_WEIGHTS")
    if not folder:
        tiny = tiny_weights_dir()
        return WeightsChoice([tiny / "stablesr.safetensors"], tiny / "cfw.safetensors", random=True)
    folder = Path(folder)
    missing = [name for name in (OFFICIAL_STABLESR, OFFICIAL_CFW) if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder}: lacks {', '.join(missing)}; convert the official .ckpt files into it "
                           "(see the README, 'Official weights')")
    return WeightsChoice([folder / OFFICIAL_STABLESR], folder / OFFICIAL_CFW, random=False)
