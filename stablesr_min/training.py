"""What every training command shares: the run folder, the resume state, the log, progress and Ctrl-C.

A run folder holds three files, each replaced atomically (temp file, then rename):

    RUN/last.safetensors    the complete model at the last save, its config in the metadata: loadable like
                            any checkpoint of this project (`upscale --weights RUN/last.safetensors`)
    RUN/state.safetensors   what resuming needs besides the model: the trainable tensors, the optimizer's
                            moments, every random generator's state and the data pipeline's state as
                            tensors; the step, the run's options and the optimizer's settings as JSON in
                            the metadata. Never a pickle.
    RUN/log.jsonl           one JSON line per step: step, loss, lr, seconds, and val_loss when measured

A run continues bit-identically from its state on the CPU: a run stopped at step k and resumed computes
the same numbers as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .atomic import atomic_write
from .cli import ProgressLine, UsageError
from .weights import WeightFiles, save_safetensors

CHECKPOINT = "last.safetensors"
STATE = "state.safetensors"
LOG = "log.jsonl"
STATE_METADATA_KEY = "stablesr_min.train_state"


# ------------------------------------------------------------------------------------------------------
# Seeds


def derive_seeds(seed: int, names: list[str]) -> dict[str, int]:
    """One seed per random stream (data, noise, init, ...), all drawn from one generator seeded with `seed`,
    so that no two streams share their numbers."""
    draws = torch.randint(2**62, (len(names),), generator=torch.Generator().manual_seed(seed))
    return dict(zip(names, draws.tolist()))


# ------------------------------------------------------------------------------------------------------
# The resume state


@dataclass
class TrainState:
    step: int  # optimizer steps taken
    options: dict[str, Any]  # the run's options (JSON): a resumed run keeps them
    weights: dict[str, torch.Tensor]  # the trainable tensors, by checkpoint key
    optimizer: dict[str, Any]  # optimizer.state_dict()
    generators: dict[str, torch.Tensor]  # torch.Generator.get_state() of every generator, by name
    data: dict[str, torch.Tensor]  # the data pipeline's state_dict()
    extra: dict[str, Any]  # anything else as JSON (seconds trained, the loss scaler's state, ...)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors under `weights.`, `optimizer.<param index>.`, `generator.`, `data.`; the rest as JSON."""
        tensors = {f"weights.{k}": v for k, v in self.weights.items()}
        tensors |= {f"generator.{k}": v for k, v in self.generators.items()}
        tensors |= {f"data.{k}": v for k, v in self.data.items()}
        per_param_json = {}
        for index, param_state in self.optimizer["state"].items():
            for name, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{name}"] = value
                else:
                    per_param_json.setdefault(str(index), {})[name] = value
        info = {"step": self.step, "options": self.options, "extra": self.extra,
                "optimizer": {"param_groups": self.optimizer["param_groups"], "state": per_param_json}}
        return {k: v.detach().cpu() for k, v in tensors.items()}, {STATE_METADATA_KEY: json.dumps(info)}

    @classmethod
    def from_file(cls, path: Path) -> "TrainState":
        files = WeightFiles([path])
        if STATE_METADATA_KEY not in files.metadata:
            raise UsageError(f"{path}: not a training state written by stablesr-min")
        info = json.loads(files.metadata[STATE_METADATA_KEY])
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key in files.keys():
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = files.tensor(key)
        # optimizer.state_dict() keys its per-parameter state by int index
        param_state: dict[int, dict[str, Any]] = {}
        for name, value in groups.get("optimizer", {}).items():
            index, field = name.split(".", 1)
            param_state.setdefault(int(index), {})[field] = value
        for index, fields in info["optimizer"]["state"].items():
            param_state.setdefault(int(index), {}).update(fields)
        optimizer = {"state": param_state, "param_groups": info["optimizer"]["param_groups"]}
        return cls(info["step"], info["options"], groups.get("weights", {}), optimizer,
                   groups.get("generator", {}), groups.get("data", {}), info["extra"])


# ------------------------------------------------------------------------------------------------------
# The run folder


class RunFolder:
    def __init__(self, path: str | Path, resume: bool):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a folder")
        if resume and not self.state_path.is_file():
            raise UsageError(f"--resume: {self.path} holds no run to resume (no {STATE}); start it without --resume")
        if not resume and self.holds_run():
            raise UsageError(f"--out {self.path}: already holds a run; pass --resume to continue it, "
                             "or choose another folder")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def holds_run(self) -> bool:
        return any(p.exists() for p in (self.checkpoint_path, self.state_path, self.log_path))

    def save(self, checkpoint: dict[str, torch.Tensor], metadata: dict[str, str], state: TrainState) -> None:
        """The complete model, then the resume state. A crash between the two leaves an older state,
        which carries its own trainable tensors, so resuming from it is still consistent."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu() for k, v in checkpoint.items()}, self.checkpoint_path,
                         metadata={**metadata, "stablesr_min.step": str(state.step)})
        tensors, state_metadata = state.to_tensors()
        save_safetensors(tensors, self.state_path, metadata=state_metadata)

    def load_state(self) -> TrainState:
        return TrainState.from_file(self.state_path)

    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_log_until(self, step: int) -> None:
        """On resume: drop log lines of steps after the saved state (they will be run again)."""
        if not self.log_path.is_file():
            return
        lines = [line for line in self.log_path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def resume_options(out: str | Path, steps: int, given: dict[str, Any],
                   kept: tuple[str, ...]) -> tuple[dict[str, Any], TrainState]:
    """`--resume`: the run's state, and the options to continue with: the ones it stored, overridden by
    those given again (None: not given). A `kept` option given again must have its stored value."""
    state = RunFolder(out, resume=True).load_state()
    if steps <= state.step:
        raise UsageError(f"--steps {steps}: the run in {out} is already at step {state.step}; "
                         "pass a larger --steps to continue it")
    for name in kept:
        if given[name] is not None and given[name] != state.options.get(name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {given[name]}: this run was started with {state.options.get(name)}, and a "
                             f"resumed run keeps its options; leave {flag} out or start a new run")
    return state.options | {k: v for k, v in given.items() if v is not None}, state


# ------------------------------------------------------------------------------------------------------
# Progress, Ctrl-C, devices


class TrainProgress(ProgressLine):
    """step, loss, steps/s (this session) and the time left, on one line."""

    def __init__(self, name: str, steps: int, first_step: int):
        super().__init__(name, steps)
        self.first_step = first_step

    def update(self, step: int, loss: float) -> None:
        done = step - self.first_step
        rate = done / max(time.monotonic() - self.start, 1e-9)
        eta = (self.steps - step) / rate if rate > 0 else math.inf
        if self.tty or step == self.steps or step % max(1, self.steps // 20) == 0:
            text = f"step {step}/{self.steps}, loss {loss:.4f}, {rate:.2f} steps/s, ETA {format_seconds(eta)}"
            self._write(text, end="\r" if self.tty and step < self.steps else "\n")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the step under way, save and exit; a second one
    interrupts at once (without saving)."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving (Ctrl-C again to quit without saving)",
              file=sys.stderr, flush=True)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward passes (the weights stay float32); nothing in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def out_of_memory_is_a_usage_error(device: torch.device, hint: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory on {device}: {hint}") from None
    except RuntimeError as e:  # the CPU allocator's failure is a plain RuntimeError
        if "allocate memory" not in str(e):
            raise
        raise UsageError(f"out of memory on {device}: {hint}") from None


# ------------------------------------------------------------------------------------------------------
# The loop


def run_steps(name: str, run: RunFolder, opts: Any, step: int, seconds: float, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, backward: Callable[[], tuple[float, dict[str, float]]],
              val_loss: Callable[[], float] | None, save: Callable[[int, float], None], device: torch.device,
              dtype: torch.dtype, oom_hint: str) -> None:
    """The loop every training command shares, from `step` up to `opts.steps`: each iteration, `backward()`
    computes the gradients (returns the loss and any terms to log), then one optimizer step; the log line,
    val_loss every `opts.val_every` steps, progress, `save(step, seconds)` every `opts.save_every` steps,
    at the end and on Ctrl-C. A run stopped early says how to continue and raises KeyboardInterrupt."""
    progress = TrainProgress(name, opts.steps, step)
    with StopRequest() as stop, out_of_memory_is_a_usage_error(device, oom_hint):
        while step < opts.steps and not stop.requested:
            started = time.monotonic()
            optimizer.zero_grad(set_to_none=True)
            loss, terms = backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seconds += time.monotonic() - started

            record = {"step": step, "loss": loss, **terms, "lr": opts.lr, "seconds": round(seconds, 3)}
            if val_loss is not None and opts.val_every and step % opts.val_every == 0:
                with autocast(device, dtype):
                    record["val_loss"] = val_loss()
            run.log(record)
            progress.update(step, record["loss"])
            if opts.save_every and step % opts.save_every == 0 or step == opts.steps or stop.requested:
                save(step, seconds)
    print(f"wrote {run.checkpoint_path} (step {step})")
    if step < opts.steps:
        print(f"stopped at step {step} of {opts.steps}; continue with --resume", file=sys.stderr)
        raise KeyboardInterrupt
