"""Several processes (`torchrun --nproc_per_node N -m stablesr_min train ...`), and the seeds of a run's
random streams.

One process per device, each with its own data stream and random generators (seeded from the run's seed and
its rank), the gradients of the trainable networks averaged over the processes by DistributedDataParallel.
Every rank takes the same decisions at the same step (stop, save, a non-finite loss), because it decides on
all-reduced numbers; only rank 0 writes the run folder, and its state file holds every rank's generators and
data state. A process started with plain `python -m` (or a trainer called from Python) is rank 0 of 1:
nothing distributed runs, and its numbers are those of a run without this machinery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..devices import pick_device
from ..errors import USER_ERRORS, Terminated, UsageError
from .run_folder import STATE, TrainState, release_locks

# ------------------------------------------------------------------------------------------------------
# Seeds


def derive_seeds(seed: int, names: list[str]) -> dict[str, int]:
    """One seed per random stream (data, noise, init, ...), all drawn from one generator seeded with `seed`,
    so that no two streams share their numbers."""
    draws = torch.randint(2**62, (len(names),), generator=torch.Generator().manual_seed(seed))
    return dict(zip(names, draws.tolist()))


# ------------------------------------------------------------------------------------------------------
# Joining the run's processes

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
def torchrun_processes(device_name: str | None, timeout_s: float = DIST_TIMEOUT,
                       out: str | None = None) -> Iterator[Processes]:
    """Join the run's other processes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT in each one's environment): NCCL between GPUs, gloo between CPUs, every collective
    operation given up after `timeout_s`, so that a process that died makes the others
    exit rather than hang, saying whether the run folder `out` holds a save to resume. A user error on
    rank r > 0 is printed as one line naming the rank."""
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
        way = (f"{out} keeps the last save: once the cause (an error above, a process that died) is fixed, "
               "continue with --resume" if out is not None and (Path(out) / STATE).is_file() else
               "nothing was saved: fix the cause (an error above, a process that died) and run the command again")
        print(f"error: rank {rank}: lost the other processes of the run ({first_line}); {way}", file=sys.stderr)
        raise SystemExit(1) from None


@contextlib.contextmanager
def one_process(command: str) -> Iterator[None]:
    """A command that runs as one process (`train vae`, `train unet`, `train cfw-data`: each process of a torchrun
    would do the whole job into the same folder), the run folder's lock released on the way out. Under torchrun
    with several processes it is refused before any work, in one line naming the command to run instead (said
    by each machine's first process; every process exits with code 2)."""
    # Refused, not run on rank 0 alone: torchrun prints its own traceback and exits 1 whenever a worker exits with
    # an error (its ChildFailedError; seen with exit code 2), so no worker can make it report a failure cleanly.
    # Rank 0 alone avoided that report only while nothing went wrong, and held the other devices idle for the whole
    # run; the refusal comes at once, its line first, and names the one way these commands run.
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            raise SystemExit(2)
        raise UsageError(f"{command} runs as one process, not under torchrun: start it with `python -m "
                         f"stablesr_min {command} ...` (only `train sr` and `train cfw` run under torchrun)")
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
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {timeout_s:g}")
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
