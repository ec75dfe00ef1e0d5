"""Reading what a training run wrote (checkpoint tensors, their metadata, the log): shared by the training tests."""

import json
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
