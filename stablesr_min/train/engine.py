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

Several processes (`torchrun --nproc_per_node N -m stablesr_min train ...`): one process per device, each
with its own data stream and random generators (seeded from the run's seed and its rank), the gradients of
the trainable networks averaged over the processes by DistributedDataParallel. Every rank takes the same
decisions at the same step (stop, save, a non-finite loss), because it decides on all-reduced numbers; only
rank 0 writes the run folder, and its state file holds every rank's generators and data state. A process
started with plain `python -m` is rank 0 of 1: nothing distributed runs, and its numbers are those of a
run without this machinery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_write, check_output_folder
from ..devices import pick_device
from ..errors import USER_ERRORS, Terminated, UsageError
from ..progress import ProgressLine, format_seconds
from ..weights import WeightFiles, save_safetensors
from .options import KEPT, continued_options, fields_that, persisting

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


# How a training run ends: done, or stopped and saved by Ctrl-C or by SIGTERM (the command line: exit 0, 130, 143)
FINISHED, STOPPED, TERMINATED = "finished", "stopped", "terminated"


class RunFolder:
    """A training run's folder: last.safetensors, state.safetensors, log.jsonl. A run exists once its state is
    saved; files without a state (a run stopped before its first save, or a deleted state) are set aside as
    *.old when a new run starts there. The process that writes (`writer`) holds a lock on the folder while it
    runs, so that a second run on the same --out is refused; the system drops the lock if the process dies."""

    def __init__(self, path: str | Path, resume: bool, writer: bool = True):
        self.path = Path(path)
        check_output_folder(self.path, f"--out {self.path}")
        if resume and not self.state_path.is_file():
            raise UsageError(f"--resume: {self.path} holds no run to resume (no {STATE}); start it without --resume")
        if not resume and self.state_path.is_file():
            raise UsageError(f"--out {self.path}: already holds a run; pass --resume to continue it, "
                             "or choose another folder")
        if writer:
            lock_folder(self.path)
            if not resume:
                self.set_aside_stale_files()

    def set_aside_stale_files(self) -> None:
        """What a run that never saved its state left (a log, a checkpoint) is kept as *.old, said in one line."""
        stale = [p for p in (self.checkpoint_path, self.log_path) if p.exists()]
        for p in stale:
            p.replace(p.with_name(p.name + ".old"))
        if stale:
            print(f"note: {self.path} held {' and '.join(p.name for p in stale)} of a run without a saved state; "
                  "kept as *.old, starting a new run", file=sys.stderr)

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
        return TrainState.from_file(self.state_path)

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
        """On resume: drop log lines of steps after the saved state (they will be run again)."""
        if not self.log_path.is_file():
            return
        lines = [line for line in self.log_path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def save_due(step: int, steps: int, save_every: int, stopped: bool) -> bool:
    """Save every `save_every` steps (0: never on the way), at the last step, and when stopped."""
    return bool(save_every and step % save_every == 0 or step == steps or stopped)


# ------------------------------------------------------------------------------------------------------
# Resuming


def resume_options(options: type, given: dict[str, Any], command: str) -> tuple[Any, TrainState]:
    """The `options` (a dataclass) to continue the run in `given["out"]` up to `given["steps"]`, and its state:
    what the run stored (options.py), overridden by the rest of `given` ({field: value}, each one given; a kept
    one must have its stored value). `command`: the command's name, for the errors."""
    out, steps = given["out"], given["steps"]
    state = RunFolder(out, resume=True, writer=False).load_state()
    if steps <= state.step:
        raise UsageError(f"--steps {steps}: the run in {out} is already at step {state.step}; "
                         "pass a larger --steps to continue it")
    names = {f.name for f in dataclasses.fields(options)}
    foreign = sorted(set(state.options) - names)
    if foreign:  # options this command does not have: another command wrote the run
        raise UsageError(f"--resume: {out} holds a run of another training command (its options include "
                         f"{', '.join(foreign)}; `{command}` has none of them); resume it with that command, or "
                         "choose another --out")
    kept = continued_options(state.options, given, fields_that(options, KEPT))
    return options(**{**kept, "resume": True}), state


def check_resumed_with_its_options(opts: Any, state: TrainState) -> None:
    """A run resumed from Python with options of its own: the kept ones must be the run's (`resume_options`
    gives them)."""
    continued_options(state.options, persisting(opts), fields_that(type(opts), KEPT))


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


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (`kill`, `timeout`, a scheduler's stop) asks the loop to stop after
    the step under way, save and exit; a second one ends the program at once (without saving: the run folder
    keeps its last save)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # A signal this soon after the first is the same stop: a launcher forwards the stop to its workers (torchrun
    # sends SIGTERM, or SIGINT, to each when the terminal's Ctrl-C or a scheduler's SIGTERM reached them all).
    SAME_STOP_WITHIN_S = 1.0

    def __init__(self, announce: bool = True):
        self.requested: int | None = None  # the signal that asked
        self.requested_at = 0.0  # when (time.monotonic())
        self.announce = announce

    def __enter__(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            if time.monotonic() - self.requested_at < self.SAME_STOP_WITHIN_S:
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.requested, self.requested_at = signum, time.monotonic()
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n{name}: stopping after this step and saving (again to quit without saving)",
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


def stop_on_non_finite(loss: float, step: int, saved_step: int | None, checkpoint: Path) -> None:
    """A NaN or infinite loss ends the run before its optimizer step, and nothing of that step is saved:
    the run folder keeps its last good checkpoint."""
    if math.isfinite(loss):
        return
    # not "--resume": it would repeat this step with the same data and noise, and the run keeps its --lr
    kept = (f"{checkpoint} keeps step {saved_step}; start a new run (another --out)" if saved_step is not None
            else "no step had been saved yet; start again")
    raise UsageError(f"step {step}: the loss is {loss} (not finite); stopped without saving this step. {kept}, "
                     "with a lower --lr (or --dtype bfloat16 rather than float16)")


# ------------------------------------------------------------------------------------------------------
# Several processes (torchrun)

DIST_TIMEOUT = 600.0  # seconds a collective operation waits for the other processes (--dist-timeout)


@dataclass
class Processes:
    """This process among the run's processes; `python -m` starts one alone (rank 0 of 1)."""

    device: torch.device  # this process's device (on GPUs: cuda:LOCAL_RANK)
    rank: int = 0  # 0 .. world_size - 1, over every machine; rank 0 writes the run folder
    world_size: int = 1  # processes in the run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def torchrun_processes(device_name: str | None, timeout_s: float = DIST_TIMEOUT) -> Iterator[Processes]:
    """Join the run's other processes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT in each one's environment): NCCL between GPUs, gloo between CPUs, every collective
    operation given up after `timeout_s`, so that a process that died makes the others
    exit rather than hang. A user error on rank r > 0 is printed as one line naming the rank."""
    rank = int(os.environ.get("RANK", 0))
    try:
        procs = join_processes(device_name, timeout_s)
        try:
            yield procs
        finally:
            release_locks()
            if procs.distributed:
                dist.destroy_process_group()
    except USER_ERRORS as e:
        if rank != 0:  # rank 0's error is printed by the command line; the others' here, naming their rank
            print(f"error: rank {rank}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        if rank != 0:
            raise SystemExit(130) from None
        raise
    except Terminated:
        if rank != 0:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    except RuntimeError as e:
        if not lost_a_process(e):
            raise
        first_line = str(e).strip().splitlines()[0]
        print(f"error: rank {rank}: lost the other processes of the run ({first_line}); continue from the "
              "last checkpoint with --resume", file=sys.stderr)
        raise SystemExit(1) from None


@contextlib.contextmanager
def one_process(command: str) -> Iterator[None]:
    """A command that runs as one process (`train vae`, `train unet`, `train cfw-data`): refused in one line
    under torchrun with several (each process would do the whole job into the same folder); the run folder's
    lock released on the way out."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if int(os.environ.get("RANK", 0)) != 0:
            raise SystemExit(2)  # rank 0 says it
        raise UsageError(f"{command} runs as one process, not under torchrun with {world_size}; start it with "
                         "python -m stablesr_min")
    try:
        yield
    finally:
        release_locks()


def lost_a_process(error: RuntimeError) -> bool:
    """A collective operation failed: a peer died or did not answer within --dist-timeout. NCCL says so
    with a DistError; gloo with a plain RuntimeError from its sources."""
    return isinstance(error, dist.DistError) or "gloo" in str(error)


def join_processes(device_name: str | None, timeout_s: float) -> Processes:
    if not timeout_s > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    device = pick_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Processes(device)
    if device.type == "cuda" and device.index is None:  # one GPU per process of the machine
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Processes(device, dist.get_rank(), dist.get_world_size())


def check_same_options(procs: Processes, opts: Any) -> None:
    """Each process reads its own command line: refuse a run whose processes were given different options
    (a different --lr or --seed on one machine would train something nobody asked for)."""
    if not procs.distributed:
        return
    mine = {k: v for k, v in dataclasses.asdict(opts).items() if k != "device"}  # a device may differ per process
    everyone: list[dict] = [{}] * procs.world_size
    dist.all_gather_object(everyone, mine)
    differ = [k for k in mine if any(other.get(k) != mine[k] for other in everyone)]
    if differ:
        name = differ[0]
        values = ", ".join(f"rank {r}: {other.get(name)}" for r, other in enumerate(everyone))
        raise UsageError(f"--{name.replace('_', '-')} differs between the processes of the run ({values}); give "
                         "every process the same options")


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps `seed` (so a one-process run is unchanged); rank r > 0 draws its own from it."""
    return seed if rank == 0 else derive_seeds(seed, [f"rank {r}" for r in range(1, rank + 1)])[f"rank {rank}"]


def distribute(network: nn.Module, procs: Processes) -> nn.Module:
    """DistributedDataParallel over `network` when there are several processes: its gradients are
    averaged over the ranks during backward. Only parameters with requires_grad take part in that
    all-reduce, so a network holding frozen parts costs nothing more than its trainable ones (they are
    broadcast from rank 0 once, when wrapped: identical already, they stay bit-identical)."""
    if not procs.distributed:
        return network
    device_ids = [procs.device.index] if procs.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def gradient_sync(network: nn.Module, last_micro_batch: bool):
    """With gradient accumulation, the all-reduce runs once, on the last micro-batch's backward."""
    if isinstance(network, DistributedDataParallel) and not last_micro_batch:
        return network.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(procs: Processes, value: float) -> float:
    """The mean of every rank's `value` (the loss that rank 0 logs): every rank sees the same number, so
    a non-finite loss on one rank stops them all at the same step."""
    if not procs.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=procs.device)
    dist.all_reduce(total)
    return total.item() / procs.world_size


def first_signal(procs: Processes, signum: int | None) -> int | None:
    """The stop signal some rank has seen (SIGTERM if any saw one, else SIGINT), or None: every rank then
    stops and saves at the same step, and all end alike."""
    if not procs.distributed:
        return signum
    seen = torch.tensor([0 if signum is None else int(signum)], device=procs.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)  # SIGTERM (15) outranks SIGINT (2)
    return int(seen.item()) or None


RANK_PREFIX = re.compile(r"rank(\d+)\.")


def gather_ranks(procs: Processes, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's entries (generator states, data state) in one dict on rank 0: rank 0's under their own
    names (a one-process run's state is what it always was), rank r's under `rank<r>.<name>`. Other ranks
    get {} (they write nothing)."""
    if not procs.distributed:
        return entries
    gathered = [None] * procs.world_size if procs.is_main else None
    dist.gather_object({k: v.cpu() for k, v in entries.items()}, gathered, dst=0)
    if not procs.is_main:
        return {}
    merged = dict(gathered[0])
    for rank, theirs in enumerate(gathered[1:], start=1):
        merged |= {f"rank{rank}.{k}": v for k, v in theirs.items()}
    return merged


def of_rank(merged: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's entries of a dict written by gather_ranks."""
    if rank == 0:
        return {k: v for k, v in merged.items() if not RANK_PREFIX.match(k)}
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)}


def check_world_size(state: TrainState, procs: Processes) -> None:
    """A run resumes on as many processes as it ran on: each rank continues its own data stream."""
    saved = state.extra.get("world_size", 1)
    if saved != procs.world_size:
        raise UsageError(f"--resume: this run was trained by {saved} process(es), this one has {procs.world_size}; "
                         f"resume it with the same number (torchrun --nproc_per_node ..., x machines)")


# ------------------------------------------------------------------------------------------------------
# The loop


class Loop:
    """The bookkeeping around a training loop whose body each trainer writes out itself (train/sr.py):

        with Loop("train sr", run, opts, procs, step, seconds, oom_hint) as loop:
            while loop.running():
                ...                                  # zero the gradients, forward, backward
                loss = loop.checked(loss)            # averaged over the processes; not finite: stop, unsaved
                scaler.step(optimizer)
                scaler.update()
                record = loop.count_step(loss)       # the step is done: its log line
                if loop.validation_due():
                    record["val_loss"] = ...
                loop.log(record)                     # rank 0 logs and shows progress; a signal is seen here
                if loop.save_due():
                    save(loop.step, loop.seconds)
        return loop.outcome                          # FINISHED, or STOPPED / TERMINATED (saved; --resume)

    The first Ctrl-C or SIGTERM stops the loop after the step under way (every process at the same step), which
    is then saved; running out of memory is a one-line error naming `oom_hint`. `seconds` counts training time
    only (not validation, logging or saving), added up across resumes."""

    def __init__(self, name: str, run: RunFolder, opts: Any, procs: Processes, step: int, seconds: float,
                 oom_hint: str):
        self.name, self.run, self.opts, self.procs, self.oom_hint = name, run, opts, procs, oom_hint
        self.step, self.seconds = step, seconds
        self.saved_step = step if step > 0 else None  # a resumed run starts from its saved step
        self.stopped_by: int | None = None  # the signal that stopped the run (every process alike)
        self.outcome: str | None = None
        self.progress = TrainProgress(name, opts.steps, step) if procs.is_main else None

    def __enter__(self) -> "Loop":
        self._exits = contextlib.ExitStack()
        self._stop = self._exits.enter_context(StopRequest(announce=self.procs.is_main))
        self._exits.enter_context(out_of_memory_is_a_usage_error(self.procs.device, self.oom_hint))
        return self

    def __exit__(self, *exc) -> bool:
        handled = self._exits.__exit__(*exc)
        if exc[0] in (KeyboardInterrupt, Terminated) and self.procs.is_main:  # a second signal: no save
            way = (f"{self.run.checkpoint_path} keeps the last save; continue with --resume"
                   if self.saved_step is not None else "no step was saved; run the command again without --resume")
            print(f"\nquit without saving: {way}", file=sys.stderr, flush=True)
        if exc[0] is None:
            stopped_by = TERMINATED if self.stopped_by == signal.SIGTERM else STOPPED
            self.outcome = self.run.finish(self.step, self.opts.steps, self.procs.is_main, stopped_by)
        return handled

    def running(self) -> bool:
        """Whether to take another step (the clock of that step starts here)."""
        self._started = time.monotonic()
        return self.step < self.opts.steps and not self.stopped

    def checked(self, loss: float) -> float:
        """This step's loss averaged over the processes (so all of them stop together on a non-finite one,
        before the optimizer step and without saving it)."""
        loss = mean_over_ranks(self.procs, loss)
        stop_on_non_finite(loss, self.step + 1, self.saved_step, self.run.checkpoint_path)
        return loss

    def count_step(self, loss: float, lr: float | None = None, **terms: float) -> dict[str, float]:
        """The step is taken: count it and its time; its log line (the loss, `terms`, the lr it took, by
        default --lr, and the seconds)."""
        self.step += 1
        self.seconds += time.monotonic() - self._started
        lr = self.opts.lr if lr is None else lr
        return {"step": self.step, "loss": loss, **terms, "lr": lr, "seconds": round(self.seconds, 3)}

    def validation_due(self) -> bool:
        """Every `--val-every` steps, on rank 0 (which alone logs)."""
        return self.procs.is_main and bool(self.opts.val_every) and self.step % self.opts.val_every == 0

    def log(self, record: dict[str, float]) -> None:
        if self.procs.is_main:
            self.run.log(record)
            self.progress.update(self.step, record["loss"])
        # a signal reaches the processes at different moments: all stop at the step where the first saw one
        self.stopped_by = first_signal(self.procs, self._stop.requested)

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def save_due(self) -> bool:
        """Every `--save-every` steps, at the last step, and when stopped; the caller then saves."""
        due = save_due(self.step, self.opts.steps, self.opts.save_every, self.stopped)
        if due:
            self.saved_step = self.step
        return due


# ------------------------------------------------------------------------------------------------------
# The state a resume needs


def start_optimizer(trainable: dict[str, nn.Parameter], lr: float, dtype: torch.dtype, noise_seed: int,
                    run: RunFolder, state: TrainState | None, data, procs: Processes):
    """AdamW (PyTorch's defaults besides the lr), a loss scaler for float16 and this process's noise
    generator, at the start of a run or, with `state`, where it stopped (this rank's data stream too, and
    the log cut to its step). Returns (optimizer, scaler, generator, step, seconds trained)."""
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(rank_seed(noise_seed, procs.rank))
    step, seconds = restore(state, run, procs, trainable, optimizer, scaler, generator, data) if state else (0, 0.0)
    return optimizer, scaler, generator, step, seconds


def decayed_lr(lr: float, step: int, steps: int, decay: int) -> float:
    """The lr of the step after `step` steps of `steps`: `lr`, then over the last `decay` steps linearly down
    toward 0 (the last step takes lr / decay). A run continued to a larger --steps decays at its new end."""
    return lr * min(1.0, (steps - step) / decay) if decay else lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def snapshot(step: int, seconds: float, options: dict, trainable: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator | None,
             data, procs: Processes) -> TrainState | None:
    """Everything a resume needs, as `restore` puts it back: every rank hands its random streams to
    rank 0, which gets the state (the other ranks get None: they write nothing). `trainable`: the tensors
    the state keeps, by key; `generator`: the noise stream (None: a run without one, `train cfw`)."""
    generators = gather_ranks(procs, {"noise": generator.get_state()} if generator is not None else {})
    data_state = gather_ranks(procs, data.state_dict())
    if not procs.is_main:
        return None
    return TrainState(step, options, {k: p.detach() for k, p in trainable.items()}, optimizer.state_dict(),
                      generators, data_state, {"seconds": seconds, "scaler": scaler.state_dict(),
                                               "world_size": procs.world_size})


def restore(state: TrainState, run: RunFolder, procs: Processes, trainable: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator | None,
            data) -> tuple[int, float]:
    """Put a saved state back in place (copied into the `trainable` tensors; this rank's generator and
    data), on as many processes as it was saved from, and cut the log to its step; returns (step, seconds
    trained)."""
    check_world_size(state, procs)
    if sorted(state.weights) != sorted(trainable):
        raise UsageError("the run's state does not match its checkpoint's trainable tensors; start a new run")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state.weights[name])
    optimizer.load_state_dict(state.optimizer)
    scaler.load_state_dict(state.extra["scaler"])
    if generator is not None:
        generator.set_state(of_rank(state.generators, procs.rank)["noise"])
    data.load_state_dict(of_rank(state.data, procs.rank))
    if procs.is_main:
        run.keep_log_until(state.step)
    return state.step, state.extra["seconds"]
