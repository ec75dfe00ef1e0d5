"""A training run's folder: its files, its resume state and its lock.

A run folder holds three files, each replaced atomically (temp file, then rename):

    RUN/last.safetensors    the complete model at the last save, its config in the metadata: loadable like
                            any checkpoint of this project (`upscale --weights RUN/last.safetensors`)
    RUN/state.safetensors   what resuming needs besides the model: the trainable tensors, the optimizer's
                            moments, every random generator's state and the data pipeline's state as
                            tensors; the step, the run's options and the optimizer's settings as JSON in
                            the metadata. Never a pickle.
    RUN/log.jsonl           one JSON line per step: step, loss, lr, seconds, and val_loss when measured

A run continues bit-identically from its state on the CPU: a run stopped at step k and resumed computes
the same numbers as one that never stopped (loop.py puts the state back).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, check_output_folder
from ..errors import UsageError, WeightsError
from ..weights import WeightFiles, guess_kind, save_safetensors
from .options import KEPT, continued_options, fields_that, persisting

CHECKPOINT = "last.safetensors"
STATE = "state.safetensors"
LOG = "log.jsonl"
GENERATION = "generation.json"  # `train cfw-data`'s record of a data folder (cfw_data.py)
# The command that writes each kind of checkpoint (`weights.guess_kind`) as its run's last.safetensors
WRITERS = {"stablesr": "train sr", "cfw": "train cfw", "vae": "train vae", "sd2": "train unet"}
STATE_METADATA_KEY = "stablesr_min.train_state"


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
            raise ValueError(f"{path}: not a training state written by stablesr-min")
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


HELD_LOCKS: list[tuple[int, Path, bool]] = []  # (handle, folder, made by the lock): until `release_locks`


def lock_folder(path: Path) -> None:
    """An exclusive lock on the folder (created if needed) until `release_locks` (which every training command
    calls on its way out) or the end of the process; refused in one line if another process holds it. Where
    there is no flock (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        return
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise UsageError(f"--out {path}: another training run is using this folder; wait for it to end, or "
                         "choose another folder") from None
    HELD_LOCKS.append((handle, path, made))


def release_locks() -> None:
    """Unlock every run folder this process locked; one the lock made and nothing was written to goes again
    (a run refused before its first write leaves nothing behind)."""
    while HELD_LOCKS:
        handle, path, made = HELD_LOCKS.pop()
        os.close(handle)
        if made and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def set_aside(path: Path) -> Path:
    """Rename `path` to PATH.old, or PATH.old.1, .old.2, ... (the first not taken): nothing kept is replaced."""
    kept, n = path.with_name(path.name + ".old"), 0
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}.old.{n}")
    path.replace(kept)
    return kept


# What each kind of folder a training command writes holds: one kind's --out is refused on another's files
FOLDER_KINDS = {"a training run": (CHECKPOINT, STATE, LOG), "a `train cfw-data` folder": (GENERATION, "latent")}


def refuse_another_kind(path: Path, kind: str) -> None:
    """Refuse an --out folder that holds the files of another kind (FOLDER_KINDS) than `kind`: they would mix."""
    for other, names in FOLDER_KINDS.items():
        found = [name for name in names if (path / name).exists()]
        if other != kind and found:
            raise UsageError(f"--out {path}: holds the files of {other} ({', '.join(found)}), which those of {kind} "
                             "would mix with; choose another folder")


# How a training run ends: done, or stopped and saved by Ctrl-C or by SIGTERM (the command line: exit 0, 130, 143)
FINISHED, STOPPED, TERMINATED = "finished", "stopped", "terminated"


class RunFolder:
    """A training run's folder: last.safetensors, state.safetensors, log.jsonl. A run exists once its state is
    saved; files without a state (a run stopped before its first save, or a deleted state) are set aside as
    *.old when a new run starts there, and so are a run's files when it is started anew (`restart`). A run
    resumed (from the command line or from Python) must be one of `command`'s. The process that writes
    (`writer`) holds a lock on the folder while it runs, so that a second run on the same --out is refused; the
    system drops the lock if the process dies."""

    def __init__(self, path: str | Path, command: str, resume: bool, writer: bool = True, restart: bool = False):
        self.path = Path(path)
        check_output_folder(self.path, f"--out {self.path}")
        refuse_another_kind(self.path, "a training run")
        if resume and restart:
            raise UsageError("--resume and --restart: pass one of them (continue the run, or start it anew)")
        if resume:
            self.check_resumable(command)
        elif self.state_path.is_file() and not restart:
            raise UsageError(f"--out {self.path}: already holds a run; pass --resume to continue it, --restart to "
                             "start a new run there (its files kept as *.old), or choose another folder")
        if writer:
            lock_folder(self.path)
            if not resume:
                self.set_aside_old_files()

    def held_command(self) -> str:
        """The command whose run the folder holds, from the kind of checkpoint it saved (each writes its own)."""
        kind = guess_kind(WeightFiles([self.checkpoint_path]).keys())
        if kind not in WRITERS:
            raise UsageError(f"--resume: {self.checkpoint_path}: not a checkpoint of any training command; pass "
                             "--restart instead of --resume to start a new run there (its files kept as *.old)")
        return WRITERS[kind]

    def check_resumable(self, command: str) -> None:
        """A run of `command` to resume: its state and its checkpoint (the model it continues), both readable;
        else one line naming the ways out."""
        if not self.state_path.is_file():
            raise UsageError(f"--resume: {self.path} holds no run to resume (no {STATE}); start it without --resume")
        if not self.checkpoint_path.is_file():
            raise UsageError(f"--resume: {self.path} holds no {CHECKPOINT} (the model its state continues); put it "
                             f"back, or pass --restart instead of --resume to start a new run there (its files kept "
                             "as *.old)")
        for path in (self.checkpoint_path, self.state_path):
            try:
                WeightFiles([path])
            except WeightsError as e:
                raise UsageError(f"--resume: {e}; pass --restart instead of --resume to start a new run there (its "
                                 "files kept as *.old), or choose another folder") from None
        writer = self.held_command()
        if writer != command:
            raise UsageError(f"--resume: {self.path} holds a run of `{writer}`, not `{command}`; resume it with "
                             f"`{writer} --out {self.path} --steps N --resume`, or choose another --out")

    def set_aside_old_files(self) -> None:
        """What a run left that a new one would replace (a log, a checkpoint, a state) is kept as *.old (*.old.1,
        ... when one is there already), said in one line."""
        kept = [set_aside(p) for p in (self.checkpoint_path, self.state_path, self.log_path) if p.exists()]
        if kept:
            print(f"note: {self.path} held the files of an earlier run; kept as {', '.join(p.name for p in kept)}, "
                  "starting a new run", file=sys.stderr)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def save(self, checkpoint: dict[str, torch.Tensor], metadata: dict[str, str], state: TrainState) -> None:
        """The complete model, then the resume state. A crash between the two leaves an older state,
        which carries its own trainable tensors, so resuming from it is still consistent."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu() for k, v in checkpoint.items()}, self.checkpoint_path,
                         metadata={**metadata, "stablesr_min.step": str(state.step)})
        tensors, state_metadata = state.to_tensors()
        save_safetensors(tensors, self.state_path, metadata=state_metadata)

    def load_state(self) -> TrainState:
        try:
            return TrainState.from_file(self.state_path)
        except (ValueError, KeyError, TypeError):  # readable safetensors, but not a state of this project's
            raise UsageError(f"--resume: {self.state_path}: not a training state written by stablesr-min; pass "
                             "--restart instead of --resume to start a new run there (its files kept as *.old), "
                             "or choose another folder") from None

    def log(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, step: int, steps: int, announce: bool = True, stopped_by: str = STOPPED) -> str:
        """Say where the checkpoint is (`announce`: only one process of a run speaks); returns FINISHED, or
        for a run stopped before `steps`, which --resume continues, `stopped_by` (STOPPED or TERMINATED)."""
        if announce:
            print(f"wrote {self.checkpoint_path} (step {step})")
        if step < steps:
            if announce:
                print(f"stopped at step {step} of {steps}; continue with --resume", file=sys.stderr)
            return stopped_by
        return FINISHED

    def keep_log_until(self, step: int) -> None:
        """On resume: drop log lines of steps after the saved state (they will be run again), and lines that
        are not a step's record (a write cut short by a crash), saying so."""
        if not self.log_path.is_file():
            return
        records = [(line, log_record(line)) for line in self.log_path.read_text().splitlines() if line.strip()]
        torn = sum(record is None for _, record in records)
        if torn:
            print(f"note: {self.log_path}: dropped {torn} line(s) that are not a whole step's record (a write cut "
                  "short); the log continues from the saved step", file=sys.stderr)
        lines = [line for line, record in records if record is not None and record["step"] <= step]
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def log_record(line: str) -> dict[str, Any] | None:
    """A log line's record, or None for a line that is not one (a write cut short)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


# ------------------------------------------------------------------------------------------------------
# Resuming


def resume_options(options: type, given: dict[str, Any]) -> tuple[Any, TrainState]:
    """The `options` (a dataclass) to continue the run in `given["out"]` up to `given["steps"]`, and its state:
    what the run stored (options.py), overridden by the rest of `given` ({field: value}, each one given; a kept
    one must have its stored value). The run must be one of the options' command (RunFolder checks it)."""
    out, steps = given["out"], given["steps"]
    run = RunFolder(out, options.command, resume=True, writer=False)
    state = run.load_state()
    if steps <= state.step:
        raise UsageError(f"--steps {steps}: the run in {out} is already at step {state.step}; "
                         "pass a larger --steps to continue it")
    kept = continued_options(state.options, given, fields_that(options, KEPT))
    return options(**{**kept, "resume": True}), state


def check_resumed_with_its_options(opts: Any, state: TrainState) -> None:
    """A run resumed from Python with options of its own: the kept ones must be the run's (`resume_options`
    gives them)."""
    continued_options(state.options, persisting(opts), fields_that(type(opts), KEPT))
