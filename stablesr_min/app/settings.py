"""What `upscale` and `evaluate` share: which weights, which sampling settings, their checks, loading them."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UsageError
from ..weights import WeightFiles


def choose_weights(weights: list[str] | None, cfw: str | None) -> tuple[list, Path, str | None]:
    """(StableSR files, CFW file, notice): --weights and --cfw, else $STABLESR_WEIGHTS, else the shipped tiny
    model (with a one-line notice to show). Shared by `upscale` and `evaluate`."""
    from ..tiny import find_weights

    if weights:
        if not cfw:
            raise UsageError("--weights needs --cfw too (the CFW decoder, vqgan_cfw_00011.safetensors)")
        return weights, cfw, None
    choice = find_weights()
    return choice.stablesr, cfw or choice.cfw, choice.notice


SAMPLING_OPTIONS = ("sampler", "steps", "tile", "overlap", "dec_w", "colorfix")


def given_values(args, names) -> dict:
    """{name: value} of the options among `names` given on the command line (argparse's None: not given)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def sampling_settings(stablesr_paths, given: dict | None = None) -> dict:
    """The sampling options (SAMPLING_OPTIONS): those `given` ({name: value}), else the ones stored with the
    weights (the shipped tiny model's), else `UpscaleOptions`' defaults (the official settings)."""
    from ..tiny import sampling_defaults
    from ..pipeline import UpscaleOptions

    stored = sampling_defaults(stablesr_paths)
    return {name: (given or {}).get(name, stored.get(name, getattr(UpscaleOptions, name))) for name in SAMPLING_OPTIONS}


def checked_config(stablesr_paths, config, steps: int, tile: int):
    """The weights' config (read from the files' headers only), refusing the diffusion prior alone, more steps
    than its schedule has and tiles smaller than its networks can take."""
    from ..model import check_sampling_weights, resolve_config
    from ..pipeline import smallest_tile
    from ..schedule import check_steps

    files = WeightFiles(stablesr_paths)
    check_sampling_weights(files)
    cfg = resolve_config(files, config)
    check_steps(cfg.diffusion.timesteps, steps)
    least = smallest_tile(cfg)
    if tile < least:
        raise UsageError(f"--tile {tile}: too small for these weights (their deepest level would be under 2x2); "
                         f"use --tile {least} or more")
    return cfg


def load_pipeline(stablesr_paths, cfw_path, cfg, config, notice: str | None, device, dtype):
    """The pipeline of the chosen weights, `cfg` their StableSR config (`checked_config`), `config` the
    --config given (the CFW file's config else); after the notice about which weights, if any."""
    from ..model import load_cfw, load_stablesr
    from ..pipeline import StableSRPipeline

    if notice:
        print(notice, file=sys.stderr)
    model = load_stablesr(stablesr_paths, cfg, dtype=dtype, device=device)
    return StableSRPipeline(model, load_cfw(cfw_path, config, dtype=dtype, device=device))


def check_not_an_input(output: Path, inputs: set[Path]) -> None:
    """Refuse an output file that is one of the `inputs` (by any path to it)."""
    if output.resolve() in {p.resolve() for p in inputs}:
        raise UsageError(f"{output}: writing it would overwrite an input; choose another --out folder")
