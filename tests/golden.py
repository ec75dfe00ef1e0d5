"""Golden sets: tensors the official code computed on small models, and the weights rule that made them.

A golden set (see FORMAT.md in ../shared/golden) is a folder with `cases.json` (config and case
parameters), `manifest.json` (every state-dict key and shape of the small models) and `cases.safetensors`
(inputs and outputs). Weights are not stored: each entry is a pure function of its key and shape
(`fill_value`). This module rebuilds them and writes them as ordinary weight files, so the golden tests,
the CLI and the notebooks all load weights through the same strict loader as the official files.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from stablesr_min.config import StableSRConfig
from stablesr_min.weights import config_metadata, save_safetensors

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"


def golden_dir() -> Path:
    """The set named by `STABLESR_GOLDEN` (default: the project's copy in tests/golden)."""
    return Path(os.environ.get("STABLESR_GOLDEN", DEFAULT_DIR))


def fill_value(key: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """FORMAT.md's weight rule: a hash of (index + crc32(key)), scaled like a fan-in initialisation."""
    n = math.prod(shape)
    mask = 0xFFFFFFFF
    x = (torch.arange(n, dtype=torch.int64) + zlib.crc32(key.encode("utf-8"))) & mask
    x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    u = x.to(torch.float64) / 2**32 * 2 - 1
    if len(shape) >= 2:
        value = u * math.sqrt(3 / math.prod(shape[1:]))
    elif len(shape) == 1 and key.endswith("weight"):
        value = 1 + 0.1 * u
    else:
        value = 0.1 * u
    return value.reshape(shape).to(torch.float32)


def filled_state_dict(manifest: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: fill_value(key, shape) for key, shape in manifest.items()}


class GoldenSet:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else golden_dir()
        if not (self.path / "cases.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a golden set (no cases.json); set STABLESR_GOLDEN")
        spec = json.loads((self.path / "cases.json").read_text())
        self.raw_config = spec["config"]
        self.cases = spec["cases"]
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._tensors = safe_open(str(self.path / "cases.safetensors"), framework="pt")

    @property
    def config(self) -> StableSRConfig:
        return StableSRConfig.from_dict(self.raw_config)

    def params(self, case: str) -> dict:
        """The case's parameters from cases.json ({} where it only has a note)."""
        p = self.cases.get(case, {})
        return p if isinstance(p, dict) else {}

    def names(self, case: str) -> list[str]:
        """Tensor names stored for a case (without the `<case>.` prefix)."""
        return sorted(k[len(case) + 1:] for k in self._tensors.keys() if k.startswith(case + "."))

    def __getitem__(self, name: str) -> torch.Tensor:
        """`golden["vae.image"]`: one stored tensor."""
        return self._tensors.get_tensor(name)

    def struct_cond(self) -> dict[int, torch.Tensor]:
        """The time_encoder case's features keyed by spatial width, as the UNet takes them."""
        names = [n for n in self.names("time_encoder") if n.startswith("feature_")]
        return {int(n.removeprefix("feature_")): self[f"time_encoder.{n}"] for n in names}

    def write_weights(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write the filled weights as `stablesr.safetensors` and `cfw.safetensors`, config in metadata."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = config_metadata(self.config.to_json())
        paths = out_dir / "stablesr.safetensors", out_dir / "cfw.safetensors"
        for path, section in zip(paths, ("stablesr", "cfw")):
            save_safetensors(filled_state_dict(self.manifest[section]), path, metadata=meta)
        return paths


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64: the golden tolerance is 1e-4."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return ((ours - ref).norm() / ref.norm()).item()
