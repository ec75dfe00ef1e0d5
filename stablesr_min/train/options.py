"""The options every training command has, and what a resumed run keeps of them.

Each field of an options dataclass says here, once, what happens to it across a resume:

    kept(...)     a resumed run keeps it from its start; given again, it must have the same value
    stored(...)   a resumed run continues with it, unless it is given again (then the new value holds)
    plain         given anew each time (out, steps, device, resume, restart): never stored

A run stores every kept and stored option in its state (`persisting`), so `--resume` alone continues it
with all of them. Options naming files or folders (`path=True`) are stored resolved, so that a run may be
continued from another folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from ..errors import OptionError, UsageError

KEPT, STORED = "kept", "stored"


def kept(default: Any = dataclasses.MISSING, path: bool = False) -> Any:
    """A field a resumed run keeps from its start (given again, it must be the same)."""
    return field(default=default, metadata={"resume": KEPT, "path": path})


def stored(default: Any) -> Any:
    """A field a resumed run continues with unless it is given again."""
    return field(default=default, metadata={"resume": STORED})


def fields_that(options: type, resume: str | None = None, path: bool | None = None) -> tuple[str, ...]:
    """The names of `options`' fields that persist as `resume` (KEPT or STORED; None: either), or name
    files (`path`)."""
    chosen = []
    for f in dataclasses.fields(options):
        how = f.metadata.get("resume")
        if how is None or (resume is not None and how != resume) or (path is not None and f.metadata.get("path", False) != path):
            continue
        chosen.append(f.name)
    return tuple(chosen)


def persisting(opts: Any) -> dict[str, Any]:
    """The options a run stores in its state: every kept and stored one."""
    return {name: getattr(opts, name) for name in fields_that(type(opts))}


@dataclass
class RunOptions:
    """The options `train sr`, `train cfw`, `train vae` and `train unet` share; each command's own dataclass
    adds its data, sizes and learning rate."""

    command: ClassVar[str]  # the command whose options these are (each command's class names it)
    out: str  # the run folder
    steps: int  # optimizer steps in total (a resumed run continues up to it)
    seed: int = kept(0)  # every random stream's seed is drawn from it (derive_seeds)
    device: str | None = None  # cpu, cuda, cuda:N (default: cuda if available)
    dtype: str = stored("float32")  # autocast dtype on a GPU; the weights stay float32
    resume: bool = False  # continue the run in `out`
    restart: bool = False  # start a new run in `out` though it holds one (its files kept as *.old)
    save_every: int = stored(500)  # steps between saves (and at the end, and on Ctrl-C)
    val_every: int = stored(100)  # steps between validation losses (0: never)


def continued_options(stored: dict[str, Any], given: dict[str, Any], kept: Iterable[str]) -> dict[str, Any]:
    """The options to continue a run (or a data folder) with: the ones it `stored`, overridden by those
    `given` again. A `kept` option given again must have its stored value."""
    for name in kept:
        if name in given and given[name] != stored.get(name):
            flag = "--" + name.replace("_", "-")
            started = as_typed(flag, stored.get(name))
            raise UsageError(f"{as_typed(flag, given[name])}: this run was started "
                             f"{started if started.startswith('without') else 'with ' + started}, and a resumed run "
                             f"keeps its options; leave {flag} out or start a new run")
    return stored | given


def as_typed(flag: str, value: Any) -> str:
    """An option as a user types it: `--time-blind`, `without --time-blind`, `--data a b`, `--lr 0.0001`."""
    if isinstance(value, bool) or value is None:
        return flag if value else f"without {flag}"
    if isinstance(value, list):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def check_option_ranges(opts, at_least_one: Iterable[str] = (), at_least_zero: Iterable[str] = (),
                        positive: Iterable[str] = ()) -> None:
    """Options that must be >= 1 (steps, batch size, ...), >= 0 (intervals) or > 0 and finite (the learning
    rate)."""
    rules = [(at_least_one, ">= 1", lambda v: v >= 1), (at_least_zero, ">= 0", lambda v: v >= 0),
             (positive, "> 0 and finite", lambda v: 0 < v < math.inf)]
    for names, rule, ok in rules:
        for name in names:
            value = getattr(opts, name)
            if not ok(value):  # (NaN fails every rule)
                raise OptionError(name, f"must be {rule}, got {value:g}")
