"""The tiny StableSR this project trained itself (`scripts/train_tiny.py`; MODEL_CARD.md beside this file).

A teaching model, not a substitute for the official weights: a 4x-down VAE, a UNet of widths 32-64-64 and
their StableSR encoder, SFT and CFW layers, trained on the 25 photos of data/photos on a 2-core CPU.
`upscale`, `evaluate` and the notebooks use it when no other weights are named. Its files:

    prior.safetensors          VAE, UNet (without SFT), text encoder: the frozen diffusion prior
    sr.safetensors             time-aware encoder + SFT layers, with the config and the sampling defaults
    sr_time_blind.safetensors  the same tensors of the time-blind ablation (`train sr --time-blind`)
    cfw.safetensors            the CFW autoencoder (VAE + fusion layers)

A model is `prior` + one of the `sr` files: `load_stablesr(tiny_stablesr_files())` is the same strict load
as the official checkpoint's. `find_weights` is the choice of default weights every command and notebook
makes: the official files in $STABLESR_WEIGHTS, else these.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import WeightsError
from ..weights import WeightFiles

TINY_DIR = Path(__file__).resolve().parent
TINY_FILES = {"prior": "prior.safetensors", "sr": "sr.safetensors", "sr_time_blind": "sr_time_blind.safetensors",
              "cfw": "cfw.safetensors"}
# The metadata key of the sampling defaults (sampler, steps, tile, overlap, dec_w, colorfix) in sr*.safetensors.
SAMPLING_METADATA_KEY = "stablesr_min.sampling"
HELDOUT_EVAL = TINY_DIR / "heldout_eval.json"  # the headline evaluation: scripts/heldout_eval.py writes it
VARIANTS = ("time_aware", "time_blind")


def tiny_stablesr_files(variant: str = "time_aware") -> list[Path]:
    """The shipped StableSR: the prior and the SR tensors of `variant` ("time_aware" or "time_blind")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    sr = TINY_FILES["sr"] if variant == "time_aware" else TINY_FILES["sr_time_blind"]
    return [TINY_DIR / TINY_FILES["prior"], TINY_DIR / sr]


def tiny_cfw_file() -> Path:
    return TINY_DIR / TINY_FILES["cfw"]


def ablation() -> dict:
    """The time-awareness ablation of this model (`scripts/ablation.py`: both arms at every training seed and
    sampling seed, their paired differences and spreads), as its `ablation.json` records it."""
    return json.loads((TINY_DIR / "ablation.json").read_text())


def heldout_eval() -> dict:
    """The headline evaluation of this model on the ten held-out photos (`scripts/heldout_eval.py`: every crop's
    scores at every seed and w, and per measure the mean, seed sd and paired verdict against bicubic)."""
    return json.loads(HELDOUT_EVAL.read_text())


def training_logs() -> dict[str, list[dict]]:
    """Every training stage's shipped log (every 10th step and every validation line), by stage name."""
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in sorted((TINY_DIR / "logs").glob("*.jsonl"))}


# ------------------------------------------------------------------------------------------------------
# Where the weights are: the converted official files, or the tiny model this project trained and ships

OFFICIAL_STABLESR = "stablesr_000117.safetensors"  # from stablesr_000117.ckpt (or the turbo checkpoint)
OFFICIAL_CFW = "vqgan_cfw_00011.safetensors"  # from vqgan_cfw_00011.ckpt
TINY_MODEL_NOTICE = ("using the tiny StableSR shipped with stablesr-min (a teaching model trained on 25 photos "
                     "on a CPU: stablesr_min/tiny/MODEL_CARD.md); for the official model pass --weights and "
                     "--cfw, or set STABLESR_WEIGHTS")


@dataclass
class WeightsChoice:
    stablesr: list[Path]
    cfw: Path
    notice: str | None  # a line to show the user (the shipped tiny model), or None (the files they named)


def find_weights(folder: str | os.PathLike | None = None, variant: str = "time_aware",
                 shipped: bool = False) -> WeightsChoice:
    """The official files in `folder` (default: $STABLESR_WEIGHTS); the shipped tiny model (its time-aware
    or time-blind `variant`) if no folder is named at all, or if `shipped`. A folder that is named but lacks
    the files is an error, not a silent fallback."""
    folder = None if shipped else folder or os.environ.get("STABLESR_WEIGHTS")
    if not folder:
        files = [*tiny_stablesr_files(variant), tiny_cfw_file()]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"the shipped tiny model is incomplete ({', '.join(missing)} missing); reinstall "
                               "stablesr-min, or rebuild it with scripts/train_tiny.py")
        return WeightsChoice(files[:-1], files[-1], TINY_MODEL_NOTICE)
    folder = Path(folder)
    missing = [name for name in (OFFICIAL_STABLESR, OFFICIAL_CFW) if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder}: lacks {', '.join(missing)}; convert the official .ckpt files into it "
                           "(see docs/official-weights.md)")
    return WeightsChoice([folder / OFFICIAL_STABLESR], folder / OFFICIAL_CFW, None)


def sampling_defaults(paths: Iterable[str | os.PathLike]) -> dict:
    """The sampling settings stored with the weights (the shipped tiny model's: sampler, steps, tile, overlap,
    dec_w, colorfix), {} for files that store none (the official ones)."""
    stored = WeightFiles(paths).metadata.get(SAMPLING_METADATA_KEY)
    return json.loads(stored) if stored else {}
