"""What `upscale` and `evaluate` share: which weights, which sampling settings, and their checks."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..weights import WeightFiles


def choose_weights(args) -> tuple[list, Path, str | None]:
    """(StableSR files, CFW file, notice): --weights and --cfw, else $STABLESR_WEIGHTS, else the shipped tiny
    model (with a one-line notice to show). Shared by `upscale` and `evaluate`."""
    from ..tiny import find_weights

    if args.weights:
        if not args.cfw:
            raise UsageError("--weights needs --cfw too (the CFW decoder, vqgan_cfw_00011.safetensors)")
        return args.weights, args.cfw, None
    choice = find_weights()
    return choice.stablesr, args.cfw or choice.cfw, choice.notice


SAMPLING_OPTIONS = ("sampler", "steps", "tile", "overlap", "dec_w", "colorfix")


def sampling_settings(args, stablesr_paths) -> dict:
    """The sampling options not given on the command line: the ones stored with the weights (the shipped tiny
    model's), else `UpscaleOptions`' defaults (the official settings)."""
    from ..tiny import sampling_defaults
    from ..pipeline import UpscaleOptions

    stored = sampling_defaults(stablesr_paths)
    return {name: stored.get(name, getattr(UpscaleOptions, name)) if getattr(args, name) is None
            else getattr(args, name) for name in SAMPLING_OPTIONS}


def checked_config(stablesr_paths, config, steps: int, tile: int):
    """The weights' config (read from the files' headers only), refusing more steps than its schedule has
    and tiles smaller than its networks can take."""
    from ..model import resolve_config
    from ..pipeline import smallest_tile

    cfg = resolve_config(WeightFiles(stablesr_paths), config)
    if steps > cfg.diffusion.timesteps:
        raise UsageError(f"--steps {steps}: the schedule has {cfg.diffusion.timesteps} steps; "
                         f"use at most {cfg.diffusion.timesteps}")
    least = smallest_tile(cfg)
    if tile < least:
        raise UsageError(f"--tile {tile}: too small for these weights (their deepest level would be under 2x2); "
                         f"use --tile {least} or more")
    return cfg
