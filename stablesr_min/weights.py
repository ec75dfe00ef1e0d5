"""Loading the official weights: a strict, checked copy from safetensors (the `.ckpt` converter is `app/convert.py`).

Every module in this package names its parameters exactly as the official checkpoints do, so loading is a
plain copy: for a prefix such as `first_stage_model.`, the file's keys under it must equal the module's
state-dict keys, each with the same shape. Anything else is an error that says which file, what is
missing, unexpected or mis-shaped, and what the file probably is instead.

"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write
from .errors import WeightsError
from .schedule import TABLES

CONFIG_METADATA_KEY = "stablesr_min.config"

# Key prefixes that official files carry but inference never uses: EMA copies (SD 2.1) and the CFW
# training losses (LPIPS network and discriminator).
IGNORABLE_PREFIXES = ("model_ema.", "loss.")


def is_ignorable(key: str) -> bool:
    """The schedule's tables, which the reference stores as buffers and we recompute from the config
    (`schedule.TABLES`), and the IGNORABLE_PREFIXES."""
    return key.split(".", 1)[0] in TABLES or key.startswith(IGNORABLE_PREFIXES)


# --------------------------------------------------------------------------------------------------
# Reading safetensors files


class WeightFiles:
    """A key -> file index over one or more safetensors files; tensors are read on demand."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise WeightsError("no weights file given")
        self._handles = {}
        self.key_to_path: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self._configs: dict[Path, str] = {}  # each file's stored config
        for path in self.paths:
            handle = _open_safetensors(path)
            self._handles[path] = handle
            self.metadata.update(handle.metadata() or {})
            if CONFIG_METADATA_KEY in (handle.metadata() or {}):
                self._configs[path] = handle.metadata()[CONFIG_METADATA_KEY]
            for key in handle.keys():
                if key in self.key_to_path:
                    raise WeightsError(
                        f"{path}: key {key!r} is also in {self.key_to_path[key]}; pass each checkpoint once"
                    )
                self.key_to_path[key] = path

    def keys(self) -> list[str]:
        return list(self.key_to_path)

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.key_to_path[key]].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self.key_to_path[key]].get_tensor(key)

    def config_json(self) -> str | None:
        """The config this project writes into files it makes (tiny weights, converted files). Files loaded
        together must carry one model's config; the one exception is a prior (`unet.use_sft` false) with the
        SFT layers and time-aware encoder trained on it: their configs agree but for those two, and the pair
        is the model with SFT (the SR file's config)."""
        if not self._configs:
            return None
        configs = {path: json.loads(text) for path, text in self._configs.items()}
        with_sft = [path for path, c in configs.items() if c.get("unet", {}).get("use_sft")]
        chosen = with_sft[0] if with_sft else next(iter(configs))

        def prior_part(c: dict) -> dict:  # what a prior's config has a say on: not the parts it does not hold
            return {**{k: v for k, v in c.items() if k != "time_encoder"},
                    "unet": {**c.get("unet", {}), "use_sft": None}}

        for path, c in configs.items():
            same = c == configs[chosen] if path in with_sft else prior_part(c) == prior_part(configs[chosen])
            if not same:
                raise WeightsError(f"{chosen} and {path} carry the configs of two different models; load the files "
                                   "of one model together")
        return self._configs[chosen]

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)


def file_format(path: Path, if_folder: str) -> str:
    """"safetensors", "torch" (what `torch.save` writes: a zip archive, or a pickle in the legacy
    format), "empty" or "other", from the first bytes; a missing path or a folder is an error."""
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder{if_folder}")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip's magic; pickle's PROTO opcode (protocol 2+)
        return "torch"
    return "other" if head else "empty"


def _open_safetensors(path: Path):
    if file_format(path, if_folder="; pass the .safetensors file inside it") == "torch":
        raise WeightsError(
            f"{path}: is a PyTorch pickle (.ckpt), not safetensors; convert it first with "
            f"`python -m stablesr_min convert {path} {path.with_suffix('.safetensors')}`"
        )
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


# --------------------------------------------------------------------------------------------------
# What kind of checkpoint is this?

CHECKPOINT_KINDS = {  # guess_kind's answers, in words (the command line adds which option takes the file)
    "stablesr": "the StableSR checkpoint (stablesr_000117 or the turbo one)",
    "sr-part": "only the time-aware encoder and SFT layers of a StableSR checkpoint (as the tiny model's "
               "sr.safetensors), without the diffusion prior they go after (given together: prior.safetensors "
               "sr.safetensors)",
    "sd2": "a plain Stable Diffusion 2.x checkpoint (no time-aware encoder / SFT), not StableSR's (stablesr_000117)",
    "cfw": "the CFW checkpoint (vqgan_cfw_00011)",
    "vae": "a VAE-only checkpoint, not the full StableSR one (stablesr_000117)",
    "unknown": "not a StableSR, SD 2.x or CFW checkpoint",
}


def guess_kind(keys: Iterable[str]) -> str:
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("structcond_stage_model."):
        return "stablesr" if has("first_stage_model.") else "sr-part"
    if has("model.diffusion_model."):
        return "sd2"
    if has("decoder.fusion_layer_"):
        return "cfw"
    if has("first_stage_model.") or (has("encoder.") and has("decoder.")):
        return "vae"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# Strict loading


def check_keys(expected: Mapping[str, Iterable[int]], found: Mapping[str, Iterable[int]]):
    """Compare two key -> shape maps; returns (missing, unexpected, mis-shaped) lists, sorted."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: file {list(found[k])} vs model {list(expected[k])}"
        for k in set(expected) & set(found)
        if list(found[k]) != list(expected[k])
    )
    return missing, unexpected, misshaped


def _first(items: list[str], n: int = 3) -> str:
    more = f", ... (+{len(items) - n})" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def mismatch_message(where: str, missing, unexpected, misshaped, kind: str | None = None) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if misshaped:
        parts.append(f"{len(misshaped)} with the wrong shape ({_first(misshaped, 2)})")
    msg = f"{where}: " + "; ".join(parts)
    if kind is not None:
        msg += f". This looks like {CHECKPOINT_KINDS[kind]}"
    return msg


def load_module(
    module: nn.Module,
    files: WeightFiles,
    prefix: str,
    *,
    what: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Copy `files[prefix + name]` into every `module.state_dict()[name]`, strictly.

    fp16 or fp32 on disk; floating tensors land in `dtype` (default float32), on `device`. The module may
    live on the `meta` device: its tensors are then replaced, not copied into.
    """
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    found = {k[len(prefix):]: files.shape(k) for k in files.keys()
             if k.startswith(prefix) and not is_ignorable(k)}
    missing, unexpected, misshaped = check_keys(expected, found)
    if missing or unexpected or misshaped:
        kind = guess_kind(files.keys())
        under = f" (keys under {prefix!r})" if prefix else ""
        where = f"{files.describe()} does not fit {what or type(module).__name__}{under}"
        raise WeightsError(mismatch_message(where, missing, [prefix + k for k in unexpected], misshaped, kind), kind)
    # Ordinary tensors even when loaded under inference_mode, so that the model can later be trained.
    with torch.inference_mode(False):
        state = {}
        for name in expected:
            t = files.tensor(prefix + name)
            if t.is_floating_point():
                t = t.to(dtype or torch.float32)
            state[name] = t.to(device)
        module.load_state_dict(state, strict=True, assign=True)
    return module


# --------------------------------------------------------------------------------------------------
# Writing safetensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    seen: set[int] = set()
    clean = {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one storage).
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[k] = t
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=dict(metadata or {})))


def config_metadata(config_json: str) -> dict[str, str]:
    json.loads(config_json)  # must be valid JSON
    return {CONFIG_METADATA_KEY: config_json}
