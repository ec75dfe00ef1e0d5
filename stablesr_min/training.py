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

from .atomic import atomic_write
from .cli import ProgressLine, UsageError, pick_device
from .data import DataError
from .image_io import ImageError
from .weights import WeightFiles, WeightsError, save_safetensors

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
# The options every training command has


@dataclass
class RunOptions:
    """The options `train sr`, `train cfw`, `train vae` and `train unet` share; each command's own dataclass
    adds its data, sizes and learning rate."""

    out: str  # the run folder
    steps: int  # optimizer steps in total (a resumed run continues up to it)
    seed: int = 0  # every random stream's seed is drawn from it (derive_seeds)
    device: str | None = None  # cpu, cuda, cuda:N (default: cuda if available)
    dtype: str = "float32"  # autocast dtype on a GPU; the weights stay float32
    resume: bool = False  # continue the run in `out`
    save_every: int = 500  # steps between saves (and at the end, and on Ctrl-C)
    val_every: int = 100  # steps between validation losses (0: never)


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

    def finish(self, step: int, steps: int, announce: bool = True) -> None:
        """Say where the checkpoint is (`announce`: only one process of a run speaks). A run stopped before
        `steps` (Ctrl-C) ends as interrupted, and --resume continues it."""
        if announce:
            print(f"wrote {self.checkpoint_path} (step {step})")
        if step < steps:
            if announce:
                print(f"stopped at step {step} of {steps}; continue with --resume", file=sys.stderr)
            raise KeyboardInterrupt

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
# Options


def given_options(args, options: type, paths: Iterable[str]) -> dict[str, Any]:
    """argparse's namespace -> {field of the `options` dataclass: value}, None where not given; the `paths`
    options made absolute (a run may be continued from another folder)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(options)}
    for name in paths:
        if given[name] is not None:
            given[name] = absolute(given[name])
    return given


def absolute(value: str | list[str]) -> str | list[str]:
    return [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())


def continued_options(stored: dict[str, Any], given: dict[str, Any], kept: Iterable[str]) -> dict[str, Any]:
    """The options to continue a run (or a data folder) with: the ones it stored, overridden by those given
    again (None: not given). A `kept` option given again must have its stored value."""
    for name in kept:
        if given[name] is not None and given[name] != stored.get(name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {given[name]}: this run was started with {stored.get(name)}, and a "
                             f"resumed run keeps its options; leave {flag} out or start a new run")
    return stored | {k: v for k, v in given.items() if v is not None}


def resume_options(out: str | Path, steps: int, given: dict[str, Any],
                   kept: Iterable[str]) -> tuple[dict[str, Any], TrainState]:
    """`--resume`: the options to continue with (`continued_options`) and the run's state, which `--steps`
    must take further."""
    state = RunFolder(out, resume=True).load_state()
    if steps <= state.step:
        raise UsageError(f"--steps {steps}: the run in {out} is already at step {state.step}; "
                         "pass a larger --steps to continue it")
    return continued_options(state.options, given, kept), state


def command_options(args, options: type, paths: Iterable[str], kept: Iterable[str],
                    required: dict[str, str]) -> tuple[Any, TrainState | None]:
    """A training command's options (the `options` dataclass) and, with --resume, its run's state: a
    resumed run takes its `kept` options from the state; a new one needs the `required` options
    ({name: how --help shows it})."""
    given = given_options(args, options, paths)
    state = None
    if args.resume:
        given, state = resume_options(args.out, args.steps, given, kept)
    elif any(given[name] is None for name in required):
        raise UsageError(f"train {args.what} needs {' and '.join(required.values())} (or --resume to continue a run)")
    return options(**{k: v for k, v in given.items() if v is not None}), state


def check_option_ranges(opts, at_least_one: Iterable[str] = (), at_least_zero: Iterable[str] = (),
                        positive: Iterable[str] = ()) -> None:
    """Options that must be >= 1 (steps, batch size, ...), >= 0 (intervals) or > 0 (the learning rate)."""
    rules = [(at_least_one, ">= 1", lambda v: v >= 1), (at_least_zero, ">= 0", lambda v: v >= 0),
             (positive, "> 0", lambda v: v > 0)]
    for names, rule, ok in rules:
        for name in names:
            value = getattr(opts, name)
            if not ok(value):  # (NaN fails every rule)
                raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


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


def stop_on_non_finite(loss: float, step: int, saved_step: int | None, checkpoint: Path) -> None:
    """A NaN or infinite loss ends the run before its optimizer step, and nothing of that step is saved:
    the run folder keeps its last good checkpoint."""
    if math.isfinite(loss):
        return
    kept = (f"{checkpoint} keeps step {saved_step}; continue from it with --resume" if saved_step is not None
            else "no step had been saved yet; start again")
    raise UsageError(f"step {step}: the loss is {loss} (not finite); stopped without saving this step. {kept}, "
                     "with a lower --lr (or --dtype bfloat16 rather than float16)")


# ------------------------------------------------------------------------------------------------------
# Several processes (torchrun)

DIST_TIMEOUT = 600.0  # seconds a collective operation waits for the other processes (--dist-timeout)
USER_ERRORS = (UsageError, WeightsError, ImageError, DataError)  # what `main` prints as one line, exit code 2


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
def torchrun_processes(device_name: str | None, timeout_s: float | None) -> Iterator[Processes]:
    """Join the run's other processes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT in each one's environment): NCCL between GPUs, gloo between CPUs, every collective
    operation given up after `timeout_s` (None: DIST_TIMEOUT), so that a process that died makes the others
    exit rather than hang. Errors are said once, by rank 0; the other ranks exit with the same code, silently."""
    rank = int(os.environ.get("RANK", 0))
    try:
        procs = join_processes(device_name, DIST_TIMEOUT if timeout_s is None else timeout_s)
        try:
            yield procs
        finally:
            if procs.distributed:
                dist.destroy_process_group()
    except USER_ERRORS:
        if rank != 0:
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        if rank != 0:
            raise SystemExit(130) from None
        raise
    except RuntimeError as e:
        if not lost_a_process(e):
            raise
        first_line = str(e).strip().splitlines()[0]
        print(f"error: rank {rank}: lost the other processes of the run ({first_line}); continue from the "
              "last checkpoint with --resume", file=sys.stderr)
        raise SystemExit(1) from None


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


def any_rank(procs: Processes, flag: bool) -> bool:
    """Whether `flag` holds on some rank (Ctrl-C reaches the processes at different moments): every rank
    stops and saves at the same step."""
    if not procs.distributed:
        return flag
    count = torch.tensor([int(flag)], device=procs.device)
    dist.all_reduce(count)
    return count.item() > 0


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


def run_steps(name: str, run: RunFolder, opts: Any, step: int, seconds: float, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, backward: Callable[[], tuple[float, dict[str, float]]],
              val_loss: Callable[[], float] | None, save: Callable[[int, float], None], device: torch.device,
              dtype: torch.dtype, oom_hint: str, procs: Processes | None = None, val_name: str = "val_loss") -> None:
    """The loop every training command shares, from `step` up to `opts.steps`: each iteration, `backward()`
    computes the gradients (returns this process's loss and any terms to log), the loss is averaged over
    the processes and must be finite, then one optimizer step; rank 0 logs (`val_loss()` every
    `opts.val_every` steps, under `val_name`) and shows progress; `save(step, seconds)` every
    `opts.save_every` steps, at the end and on Ctrl-C. A run stopped early says how to continue and raises
    KeyboardInterrupt."""
    procs = procs or Processes(device)
    progress = TrainProgress(name, opts.steps, step) if procs.is_main else None
    saved_step = step if step > 0 else None  # a resumed run starts from its saved step
    with StopRequest() as stop, out_of_memory_is_a_usage_error(device, oom_hint):
        stopped = False
        while step < opts.steps and not stopped:
            started = time.monotonic()
            optimizer.zero_grad(set_to_none=True)
            loss, terms = backward()
            loss = mean_over_ranks(procs, loss)
            stop_on_non_finite(loss, step + 1, saved_step, run.checkpoint_path)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seconds += time.monotonic() - started

            if procs.is_main:
                record = {"step": step, "loss": loss, **terms, "lr": opts.lr, "seconds": round(seconds, 3)}
                if val_loss is not None and opts.val_every and step % opts.val_every == 0:
                    with autocast(device, dtype):
                        record[val_name] = val_loss()
                run.log(record)
                progress.update(step, record["loss"])
            stopped = any_rank(procs, stop.requested)  # Ctrl-C reaches the processes at different moments
            if save_due(step, opts.steps, opts.save_every, stopped):
                save(step, seconds)
                saved_step = step
    run.finish(step, opts.steps, announce=procs.is_main)
