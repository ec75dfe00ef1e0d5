"""The tiny StableSR this project trained itself (`scripts/train_tiny.py`; MODEL_CARD.md beside this file).

A teaching model, not a substitute for the official weights: a 4x-down VAE, a UNet of widths 32-64-64 and
their StableSR encoder, SFT and CFW layers, trained on nine CC0/public-domain photos on a 2-core CPU.
`upscale`, `evaluate` and the notebooks use it when no other weights are named. Its files:

    prior.safetensors          VAE, UNet (without SFT), text encoder: the frozen diffusion prior
    sr.safetensors             time-aware encoder + SFT layers, with the config and the sampling defaults
    sr_time_blind.safetensors  the same tensors of the time-blind ablation (`train sr --time-blind`)
    cfw.safetensors            the CFW autoencoder (VAE + fusion layers)

A model is `prior` + one of the `sr` files: `load_stablesr(tiny_stablesr_files())` is the same strict load
as the official checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent
TINY_FILES = {"prior": "prior.safetensors", "sr": "sr.safetensors", "sr_time_blind": "sr_time_blind.safetensors",
              "cfw": "cfw.safetensors"}
# The metadata key of the sampling defaults (sampler, steps, tile, overlap, dec_w, colorfix) in sr*.safetensors.
SAMPLING_METADATA_KEY = "stablesr_min.sampling"
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


def training_logs() -> dict[str, list[dict]]:
    """Every training stage's shipped log (every 10th step and every validation line), by stage name."""
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in sorted((TINY_DIR / "logs").glob("*.jsonl"))}
