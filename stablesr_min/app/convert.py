"""`python -m stablesr_min convert`: the official `.ckpt` files to safetensors, without running their pickles.

The official `.ckpt` files are pickles written by PyTorch Lightning: besides the tensors they reference
`pytorch_lightning...ModelCheckpoint` and friends, so `torch.load(weights_only=True)` refuses them and a
plain `torch.load` would import (and could run) anything a pickle names. `convert_ckpt` unpickles them with
an allow-list: tensor reconstruction is allowed, Lightning/OmegaConf/NumPy objects become inert stand-ins
that are dropped, and any other global (`os.system`, `builtins.eval`, ...) stops the load before it runs.
"""

from __future__ import annotations

import os
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from ..errors import WeightsError
from ..weights import file_format, guess_kind, save_safetensors

# Module prefixes whose classes a Lightning checkpoint names but we never need: they become stand-ins.
FOREIGN_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "pathlib",
                   "typing", "enum")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """A tensor viewing `storage`: what the pickle's tensor-rebuild calls ask for (extra arguments, such
    as requires_grad and backward hooks, are dropped: we only keep the numbers)."""
    with warnings.catch_warnings():  # torch.load hands us TypedStorage, whose every public use warns
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        untyped, dtype = storage.untyped(), storage.dtype
    return torch.empty(0, dtype=dtype, device=untyped.device).set_(untyped, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type(func, new_type, args, state):
    # `func` was itself resolved through the allow-list, so it is one of the rebuilders here.
    return func(*args)


# Exactly these globals may be called. PyTorch pickles name its tensor-rebuild helpers in its private
# submodules `_utils` and `_tensor` of torch; we answer them with our own equivalents above, so nothing of
# PyTorch's private API runs.
TORCH_REBUILDERS = {
    ("_utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("_utils", "_rebuild_tensor"): _rebuild_tensor,
    ("_utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}
ALLOWED_GLOBALS = {
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class ForeignObject:
    """Inert stand-in for a class the pickle names but that is never imported (Lightning callbacks...)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list: it could run code."""


class _AllowListUnpickler(pickle.Unpickler):
    _stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        torch_submodule = module.split(".", 1)[1] if module.startswith("torch.") else None
        if (torch_submodule, name) in TORCH_REBUILDERS:
            return TORCH_REBUILDERS[(torch_submodule, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in FOREIGN_MODULES:
            key = (module, name)
            if key not in self._stand_ins:
                self._stand_ins[key] = type(name, (ForeignObject,), {"__module__": module})
            return self._stand_ins[key]
        raise ForbiddenGlobal(f"global {module}.{name} is not allowed")


def check_ckpt_file(path: Path) -> None:
    """A file that starts as `torch.save` writes."""
    kind = file_format(path, if_folder=", not a checkpoint file")
    if kind == "empty":
        raise WeightsError(f"{path}: is empty")
    if kind == "safetensors":
        raise WeightsError(f"{path}: is already safetensors; use it as it is (no conversion needed)")
    if kind == "other":
        raise WeightsError(f"{path}: not a PyTorch checkpoint (a .ckpt is the zip archive or the pickle "
                           "that torch.save writes; this file is neither)")


# torch.load accepts any object with `Unpickler` and `load` as its pickle module.
_safe_pickle = types.ModuleType("stablesr_min_safe_pickle")
_safe_pickle.Unpickler = _AllowListUnpickler
_safe_pickle.load = lambda f, **kw: _AllowListUnpickler(f, **kw).load()


def read_ckpt_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an official `.ckpt`'s `state_dict`, unpickled with the allow-list above."""
    path = Path(path)
    check_ckpt_file(path)
    try:
        # Memory-map the zip format (every checkpoint since PyTorch 1.6): a 5 GB file is not read twice.
        obj = torch.load(path, map_location="cpu", pickle_module=_safe_pickle, weights_only=False,
                         mmap=zipfile.is_zipfile(path))
    except ForbiddenGlobal as e:
        raise WeightsError(f"{path}: refused to unpickle it: {e} (only tensors and Lightning "
                           "bookkeeping may appear in a checkpoint; this file could run code)") from None
    except Exception as e:  # a damaged zip or pickle fails in whatever way the bytes lead it to
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint, perhaps damaged or cut short "
                           f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds no state_dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: its state_dict holds no tensors")
    return tensors


def convert_ckpt(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert an official `.ckpt` to safetensors (atomically); returns the tensors written."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise WeightsError(f"{dst}: the output would overwrite the input; choose another name")
    if dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: the output name should end in .safetensors")
    tensors = read_ckpt_state_dict(src)
    meta = {"source": src.name, "kind": guess_kind(tensors)}
    save_safetensors(tensors, dst, metadata=meta)
    return tensors
