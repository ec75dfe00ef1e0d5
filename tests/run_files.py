"""Reading what a training run wrote (checkpoint tensors, their metadata, the log), and the tiny model's recipe
(scripts/train_tiny.py): shared by the training tests."""

import contextlib
import dataclasses
import importlib.util
import json
import signal
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from stablesr_min.train import loop as training

ROOT = Path(__file__).resolve().parent.parent


def load_recipe():
    """scripts/train_tiny.py as a module."""
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def signals_after_step(monkeypatch, step: int, *signums: int):
    """A context in which a training run gets these signals (Ctrl-C is SIGINT; a scheduler sends SIGTERM), one
    after another, right after its step `step`."""
    update = training.TrainProgress.update

    def update_then_interrupt(self, done, loss):
        update(self, done, loss)
        if done == step:
            for signum in signums:
                signal.raise_signal(signum)

    with monkeypatch.context() as m:
        m.setattr(training.TrainProgress, "update", update_then_interrupt)
        m.setattr(training.StopRequest, "SAME_STOP_WITHIN_S", 0.0)  # signals back to back are a person's two
        yield


def ctrl_c_after_step_1(monkeypatch, signum: int = signal.SIGINT):
    return signals_after_step(monkeypatch, 1, signum)


def assert_same_run(ours: Path, theirs: Path) -> None:
    """Two run folders hold bit-identical checkpoints and states and the same log (but for the seconds)."""
    for name in ("last.safetensors", "state.safetensors"):
        a, b = tensors(ours / name), tensors(theirs / name)
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after the resume"
    without_time = [[{k: v for k, v in r.items() if k != "seconds"} for r in log(run)] for run in (ours, theirs)]
    assert without_time[0] == without_time[1]


def flags(options: dict) -> list[str]:
    """{field: value} -> the command line's flags (True: the flag alone; a list: its items)."""
    words = []
    for name, value in options.items():
        words.append("--" + name.replace("_", "-"))
        if isinstance(value, list):
            words += map(str, value)
        elif value is not True:
            words.append(str(value))
    return words


def assert_a_resume_kept_every_option(run: Path, options: type, started: dict) -> None:
    """The run in `run`, started with `started` ({field: value}) and resumed with --out, --steps and --resume
    alone, stored every option that persists (train/options.py) with the value it was started with, the
    others at their defaults. `started` must change every stored option from its default, so that a
    trainer that forgets one fails here."""
    from stablesr_min.train.options import STORED, fields_that

    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    assert all(started.get(name, defaults[name]) != defaults[name] for name in fields_that(options, STORED))
    expected = {name: started.get(name, defaults[name]) for name in fields_that(options)}
    assert training.TrainState.from_file(run / "state.safetensors").options == expected
