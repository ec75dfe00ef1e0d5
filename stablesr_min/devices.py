"""Where the networks run and in which precision: a device and a dtype by name, checked with one-line errors
that name the option (`device`, `dtype`)."""

from __future__ import annotations

import sys

import torch

from .errors import OptionError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str | None) -> torch.device:
    """`name` checked (cpu, cuda, cuda:N, mps, and that it exists here); None: cuda if available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError("device", f"{name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise OptionError("device", f"{name}: the networks cannot run there; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{name}: CUDA is not available here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OptionError("device", f"{name}: there are only {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", f"{name}: MPS is not available here; use cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """A `DTYPES` name checked against the device (float16 needs a GPU; bfloat16 is slow without AVX-512)."""
    if name == "float16" and device.type == "cpu":
        raise OptionError("dtype", "float16 needs a GPU; on the CPU use float32 or bfloat16")
    if name == "bfloat16" and device.type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        # Without AVX-512, PyTorch runs bfloat16 convolutions through its slow reference kernel: 50-100x
        # slower than float32 (seen on an AVX2-only EPYC).
        print("WARNING: this CPU has no fast bfloat16 kernels (they need AVX-512); float32 will be "
              "much faster here", file=sys.stderr)
    return DTYPES[name]
