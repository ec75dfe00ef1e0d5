"""The training loop's bookkeeping, which every trainer writes its loop around (train/sr.py shows it): the
steps, the log and progress, validation and saving on time, Ctrl-C and SIGTERM, a non-finite loss, out of
memory; and the small pieces of a run's start and end (optimizer helpers, the state to save, putting a saved
state back).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import Terminated, UsageError
from ..progress import ProgressLine, format_seconds
from .processes import Processes, check_world_size, first_signal, gather_ranks, mean_over_ranks, of_rank, rank_seed
from .run_folder import STOPPED, TERMINATED, RunFolder, TrainState

# ------------------------------------------------------------------------------------------------------
# Progress, Ctrl-C, precision, memory, a non-finite loss


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
    # not "--resume": it would repeat this step with the same data and noise, and the run keeps its --lr; a saved
    # state makes the same command refuse the folder without --restart
    change = "with a lower --lr (or --dtype bfloat16 rather than float16)"
    way = (f"{checkpoint} keeps step {saved_step}; start a new run {change}: --restart to start it in this folder "
           "(its files kept as *.old), or another --out" if saved_step is not None
           else f"no step had been saved yet; run the command again {change}")
    raise UsageError(f"step {step}: the loss is {loss} (not finite); stopped without saving this step. {way}")


# ------------------------------------------------------------------------------------------------------
# The loop


def save_due(step: int, steps: int, save_every: int, stopped: bool) -> bool:
    """Save every `save_every` steps (0: never on the way), at the last step, and when stopped."""
    return bool(save_every and step % save_every == 0 or step == steps or stopped)


class Loop:
    """The bookkeeping around a training loop whose body each trainer writes out itself (train/sr.py):

        with Loop("train sr", run, opts, procs, step, seconds, oom_hint) as loop:
            while loop.running():
                ...                                     # zero the gradients, forward, backward
                loss = loop.mean_finite_loss(loss)      # averaged over the processes; not finite: stop, unsaved
                scaler.step(optimizer)
                scaler.update()
                record = loop.count_step(loss)          # the step is done: its log line
                if loop.validation_due():
                    record["val_loss"] = ...
                loop.finish_step(record)                # rank 0 logs; have any process been asked to stop?
                loop.save_if_due(save)                  # save(step, seconds), on time or when stopped
        return loop.outcome                             # FINISHED, or STOPPED / TERMINATED (saved; --resume)

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

    def mean_finite_loss(self, loss: float) -> float:
        """This step's loss averaged over the processes (an all-reduce); a non-finite one ends the run (a
        UsageError in every process alike), before the optimizer step and without saving it."""
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

    def finish_step(self, record: dict[str, float]) -> None:
        """Rank 0 logs the step's record and shows progress; then every process learns whether any of them was
        asked to stop (an all-reduce), so that all stop, and save, at this step."""
        if self.procs.is_main:
            self.run.log(record)
            self.progress.update(self.step, record["loss"])
        # a signal reaches the processes at different moments: all stop at the step where the first saw one
        self.stopped_by = first_signal(self.procs, self._stop.requested)

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def save_if_due(self, save: Callable[[int, float], None]) -> None:
        """`save(step, seconds)` every `--save-every` steps, at the last step, and when stopped (in every
        process: each hands rank 0 its random streams, `snapshot`)."""
        if save_due(self.step, self.opts.steps, self.opts.save_every, self.stopped):
            save(self.step, self.seconds)
            self.saved_step = self.step


# ------------------------------------------------------------------------------------------------------
# A run's start and end


def loss_scaler(dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for float16 (its gradients would underflow); a no-op in float32 and bfloat16."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def noise_generator(seed: int, procs: Processes) -> torch.Generator:
    """This process's stream of diffusion noise (t and eps): its own on every rank (`rank_seed`)."""
    return torch.Generator().manual_seed(rank_seed(seed, procs.rank))


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
    """Everything a resume needs, as `restore_run` puts it back: every rank hands its random streams to
    rank 0, which gets the state (the other ranks get None: they write nothing). `trainable`: the tensors
    the state keeps, by key; `generator`: the noise stream (None: a run without one, `train cfw`)."""
    generators = gather_ranks(procs, {"noise": generator.get_state()} if generator is not None else {})
    data_state = gather_ranks(procs, data.state_dict())
    if not procs.is_main:
        return None
    return TrainState(step, options, {k: p.detach() for k, p in trainable.items()}, optimizer.state_dict(),
                      generators, data_state, {"seconds": seconds, "scaler": scaler.state_dict(),
                                               "world_size": procs.world_size})


def restore_run(state: TrainState, run: RunFolder, procs: Processes, trainable: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator | None,
                data) -> tuple[int, float]:
    """Continue a run where its saved state stopped: the `trainable` tensors (copied into), the optimizer,
    the loss scaler, this rank's noise `generator` and `data` stream, on as many processes as it was saved
    from; and its log cut to the state's step (later lines will be run again). Returns (step, seconds
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
