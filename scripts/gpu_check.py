"""Every GPU question in one run: half-precision numerics, speed, tiled memory, notebooks, training throughput.

    python scripts/gpu_check.py --out DIR                          # on CUDA when available, else the CPU
    python scripts/gpu_check.py --device cpu --small --out DIR     # CI: small sizes, under a minute on 2 cores
    python scripts/gpu_check.py --only numerics,speed --out DIR    # some sections (default: all)

Writes DIR/report.json and DIR/report.md (again after every section, atomically, so a stopped run leaves
what it measured). Every section is a key of report.json and a `## ` heading of report.md; one that was not
run, or does not apply here, holds {"skipped": why}, one that failed {"error": what}.

  numerics   float32 vs float16 vs bfloat16 on one latent tile (64 x 64 latents; --small 16 x 16) of the
             official-size networks with random weights (--small: the tiny model's sizes, whose float16
             convolutions the CPU runs in PyTorch's slow reference kernel in seconds, not minutes): one
             time-aware encoder + UNet call, the VAE encoder, the VAE decoder, the CFW decode (w 0.5). Max
             abs and relative L2 difference to float32, NaN/inf, and the block that first produced a NaN/inf.
  speed      128 -> 512 px end to end (--small: 32 -> 128): DDPM 200 steps (the paper's), DDIM 20, DDPM 4;
             float16 and bfloat16, with and without torch.compile; seconds and peak memory. The CPU runs
             float32 only, and with --small only DDPM 4 without compile.
  memory     one step of 512 -> 2048 px (--small: 64 -> 256) against one of 128 -> 512 (32 -> 128): with
             sampling and VAE tiles the peak should follow the tiles per batch, not the image's pixels.
  notebooks  CUDA only: notebooks/*.ipynb run in memory (never written) with STABLESR_DEVICE set.
  training   steps/s of a few steps (20; --small 2) of each tiny training stage (scripts/train_tiny.py's
             commands) on the device; --small runs `train vae`, `train unet` and `train sr` only.

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set (weights
included), reset before each run where Linux allows it. A full-size run on the CPU takes hours: use --small.
Exit codes: 0 all sections ran, 1 a section failed (see its "error"), 2 bad options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablesr_min.app.cli import CommandLineParser  # noqa: E402
from stablesr_min.app.measure import peak_memory_gb, reset_peak_memory, timed  # noqa: E402
from stablesr_min.app.notebooks import NOTEBOOKS, execute  # noqa: E402
from stablesr_min.atomic import atomic_write  # noqa: E402
from stablesr_min.cfw import CFWAutoencoder  # noqa: E402
from stablesr_min.config import StableSRConfig  # noqa: E402
from stablesr_min.devices import DTYPES, pick_device  # noqa: E402
from stablesr_min.errors import OptionError  # noqa: E402
from stablesr_min.model import StableSR  # noqa: E402
from stablesr_min.objective import Denoiser  # noqa: E402
from stablesr_min.pipeline import (StableSRPipeline, UpscaleOptions, pad_canvas, text_context,  # noqa: E402
                                   tiled_cfw_decode, vae_tiles)
from stablesr_min.sampler import tile_grid  # noqa: E402
from stablesr_min.train.prior import prior_config, sr_config  # noqa: E402

SECTIONS = ("numerics", "speed", "memory", "notebooks", "training")
SETTINGS = {"ddpm200": ("ddpm", 200), "ddim20": ("ddim", 20), "ddpm4": ("ddpm", 4)}  # name: (sampler, steps)
NUMERICS_T = 500  # the timestep of the numerics' network call
TRAIN_TIMEOUT_S = 900  # per training stage


@dataclass
class Sizes:
    """What --small changes."""

    latent: int  # numerics: latent tile side (times the VAE's downscale in pixels)
    speed_lr: int  # speed: LR side of the 4x upscale
    memory_lr: int  # memory: LR side of the large 4x upscale
    train_steps: int  # training: steps per stage
    tiling: dict = field(default_factory=dict)  # UpscaleOptions fields (tiles that fit the small networks)


FULL = Sizes(latent=64, speed_lr=128, memory_lr=512, train_steps=20)
SMALL = Sizes(latent=16, speed_lr=32, memory_lr=64, train_steps=2,  # the tiny model's tiles (32 latents = 128 px)
              tiling=dict(tile=32, overlap=16, vae_tile=128, vae_overlap=32))


@dataclass
class Check:
    """Where the sections run, at which sizes, and the random-weight networks they share."""

    device: torch.device
    small: bool
    model: StableSR | None = None
    cfw: CFWAutoencoder | None = None

    @property
    def sizes(self) -> Sizes:
        return SMALL if self.small else FULL

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def quick_cpu(self) -> bool:
        """--small on the CPU: the speed section times the least it can."""
        return self.small and not self.cuda

    def networks(self) -> tuple[StableSR, CFWAutoencoder]:
        """StableSR and CFW with random weights (seed 0), built once: the official sizes, or with --small the
        tiny model's (the sizes scripts/train_tiny.py trains: a 4x VAE, widths 32-64)."""
        if self.model is None:
            cfg = sr_config(prior_config(None)) if self.small else StableSRConfig()
            torch.manual_seed(0)
            with torch.device(self.device):
                self.model, self.cfw = StableSR(cfg).eval(), CFWAutoencoder(cfg.cfw).eval()
        return self.model, self.cfw

    def options(self, **kwargs) -> UpscaleOptions:
        return UpscaleOptions(**self.sizes.tiling, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Measuring


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# 1. numerics


def output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in output_tensors(item)]
    return []


def first_nonfinite_module(net: nn.Module, run: Callable[[], Any]) -> str | None:
    """Run `run()` with a forward hook on every submodule of `net`: the name of the first, in execution
    order, whose output holds a NaN or an infinity (inner modules finish first, so: the origin)."""
    found = []

    def hook(name):
        def check(module, inputs, output):
            if not found and any(not torch.isfinite(t).all() for t in output_tensors(output)):
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in net.named_modules() if name]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def top_level_block(net: nn.Module, name: str) -> str:
    """The block of `net` that holds submodule `name`: a child's child (`unet.middle_block`, `decoder.mid`),
    one level deeper in a ModuleList (`unet.input_blocks.7`, `encoder.down.2`)."""
    parts = name.split(".")
    depth = 3 if len(parts) > 2 and type(net.get_submodule(".".join(parts[:2]))) is nn.ModuleList else 2
    return ".".join(parts[:depth])


def numerics_cases(model: StableSR, cfw: CFWAutoencoder, latent: int, device: torch.device) -> dict:
    """name: (network, call(network, *inputs) -> tensor, float32 inputs)."""
    gen = torch.Generator().manual_seed(0)
    side = latent * model.vae.downscale
    image = (torch.rand(1, 3, side, side, generator=gen) * 2 - 1).to(device)
    z_t, z_lr = (torch.randn(1, 4, latent, latent, generator=gen).to(device) for _ in range(2))
    t = torch.tensor([NUMERICS_T], device=device)
    with torch.inference_mode():
        context = text_context(model, "", 1)
        z = model.vae.encode(image).mean  # the image's (unscaled) latent: what the decoders see in the pipeline
    cfw_options = UpscaleOptions(dec_w=0.5)
    return {
        "unet_step": (Denoiser(model), lambda net, *a: net(*a), (z_t, t, context, z_lr)),
        "vae_encode": (model.vae, lambda vae, x: vae.encode(x).mean, (image,)),
        "vae_decode": (model.vae, lambda vae, z: vae.decode(z), (z,)),
        "cfw_decode": (cfw, lambda net, z, canvas: tiled_cfw_decode(net, z, canvas, cfw_options), (z, image)),
    }


def nonfinite_origin(net: nn.Module, run: Callable[[], Any]) -> dict:
    module = first_nonfinite_module(net, run)
    return {"first_nonfinite_block": module and top_level_block(net, module), "first_nonfinite_module": module}


def difference(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = out - reference
    return {"max_abs_diff": diff.abs().max().item(), "rel_l2": (diff.norm() / reference.norm()).item()}


def numerics_row(name: str, dtype: str, net: nn.Module, call: Callable, inputs: tuple,
                 reference: torch.Tensor | None, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """One check in one dtype, on copies of the network and the inputs in it: (row, output as float32)."""
    row = {"check": name, "dtype": dtype}
    try:
        net = copy.deepcopy(net).to(DTYPES[dtype])
        inputs = tuple(x.to(DTYPES[dtype]) if x.is_floating_point() else x for x in inputs)
        with torch.inference_mode():
            out, row["seconds"] = timed(device, lambda: call(net, *inputs).float())
            row["nonfinite"] = not torch.isfinite(out).all().item()
            if row["nonfinite"]:
                row.update(nonfinite_origin(net, lambda: call(net, *inputs)))
            elif reference is not None:
                row.update(difference(out, reference))
    except Exception as e:  # an op without a half-precision kernel here, say
        return {**row, "error": error_text(e)}, None
    return row, out


@contextmanager
def exact_float32():
    """float32 as float32 on a GPU: no TF32 convolutions or matmuls (cuDNN allows them by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@exact_float32()
def numerics(check: Check) -> dict:
    model, cfw = check.networks()
    latent = check.sizes.latent
    rows = []
    for name, (net, call, inputs) in numerics_cases(model, cfw, latent, check.device).items():
        reference = None
        for dtype in ("float32", "float16", "bfloat16"):
            row, out = numerics_row(name, dtype, net, call, inputs, reference, check.device)
            if dtype == "float32" and row.get("nonfinite") is False:
                reference = out
            rows.append(row)
        free_memory()
    return {"latent_tile": f"{latent}x{latent}", "image_px": latent * model.vae.downscale, "t": NUMERICS_T,
            "note": "max_abs_diff and rel_l2 against float32 (no TF32); rel_l2 = |out - ref| / |ref|, L2 norms",
            "rows": rows}


# ------------------------------------------------------------------------------------------------------
# 2. speed and 3. memory: the pipeline end to end


def fresh_pipeline(check: Check, dtype: str, compiled: bool) -> StableSRPipeline:
    """A pipeline on copies of the networks in `dtype` (compiling, and the decoder's float32 fallback,
    change the networks they run)."""
    model, cfw = check.networks()
    copies = copy.deepcopy(model).to(DTYPES[dtype]), copy.deepcopy(cfw).to(DTYPES[dtype])
    return StableSRPipeline(*copies).speed_up(compile=compiled)


def upscale_run(check: Check, pipe: StableSRPipeline, lr_px: int, opts: UpscaleOptions) -> dict:
    """One 4x upscale of a random lr_px x lr_px image: seconds, peak memory, whether the output is finite."""
    lr = torch.rand(1, 3, lr_px, lr_px, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reset = reset_peak_memory(check.device)
    sr, seconds = timed(check.device, lambda: pipe(lr, opts, generator=torch.Generator().manual_seed(0)))
    run = {"seconds": seconds, "peak_gb": peak_memory_gb(check.device), "finite_output": bool(torch.isfinite(sr).all())}
    return run if reset else {**run, "peak_of": "the whole process (no reset here)"}


def speed_plan(check: Check) -> tuple[list[str], list[bool], list[str]]:
    """(dtypes, compile choices, settings) this device times."""
    dtypes = ["float16", "bfloat16"] if check.cuda else ["float32"]
    if check.quick_cpu:
        return dtypes, [False], ["ddpm4"]
    return dtypes, [False, True], list(SETTINGS)


def pipeline_runs(check: Check, dtype: str, compiled: bool, settings: list[str]) -> tuple[dict, list[dict]]:
    """One pipeline's first run (1 step: warm-up, and compilation) and its timed runs of each setting."""
    lr_px = check.sizes.speed_lr
    pipe = fresh_pipeline(check, dtype, compiled)
    first = upscale_run(check, pipe, lr_px, check.options(steps=1))
    rows = []
    for setting in settings:
        sampler, steps = SETTINGS[setting]
        run = upscale_run(check, pipe, lr_px, check.options(sampler=sampler, steps=steps))
        rows.append({"dtype": dtype, "compile": compiled, "setting": setting, **run})
    return {"dtype": dtype, "compile": compiled, "seconds": first["seconds"]}, rows


def speed(check: Check) -> dict:
    dtypes, compile_choices, settings = speed_plan(check)
    warmups, rows = [], []
    for dtype in dtypes:
        for compiled in compile_choices:
            try:
                warmup, runs = pipeline_runs(check, dtype, compiled, settings)
            except Exception as e:  # a compiler missing here, out of memory: the other pipelines still run
                warmup, runs = {"dtype": dtype, "compile": compiled, "error": error_text(e)}, []
            warmups.append(warmup)
            rows += runs
            free_memory()
    return {"upscale": f"{check.sizes.speed_lr} -> {4 * check.sizes.speed_lr} px",
            "note": "warmups: a first 1-step run before the timed ones; with compile it includes the compilation",
            "warmups": warmups, "rows": rows}


def tile_counts(check: Check, lr_px: int, opts: UpscaleOptions) -> dict:
    """Sampling tiles per step and VAE tiles of a 4x upscale of lr_px (its canvas as the pipeline pads it)."""
    f = check.networks()[0].vae.downscale
    h, w = pad_canvas(torch.empty(1, 3, 4 * lr_px, 4 * lr_px, device="meta"), opts.tile * f, f).shape[-2:]
    return {"sampling_tiles": len(tile_grid(h // f, w // f, opts.tile, opts.overlap)),
            "vae_tiles": len(vae_tiles(h, w, opts))}


def memory(check: Check) -> dict:
    dtype = speed_plan(check)[0][0]
    pipe = fresh_pipeline(check, dtype, compiled=False)
    opts = check.options(steps=1)
    rows = []
    for lr_px in (check.sizes.speed_lr, check.sizes.memory_lr):
        run = upscale_run(check, pipe, lr_px, opts)
        rows.append({"upscale": f"{lr_px} -> {4 * lr_px} px", **tile_counts(check, lr_px, opts), **run})
    small, large = rows
    return {"dtype": dtype, "steps": 1, "tile_batch": opts.tile_batch,
            "peak_ratio": large["peak_gb"] / small["peak_gb"],
            "pixel_ratio": (check.sizes.memory_lr / check.sizes.speed_lr) ** 2, "rows": rows}


# ------------------------------------------------------------------------------------------------------
# 4. notebooks


def notebooks(check: Check) -> dict:
    if not check.cuda:
        return {"skipped": "CUDA only: the notebook tests already run them on the CPU"}
    from nbclient.exceptions import CellExecutionError

    previous = os.environ.get("STABLESR_DEVICE")
    os.environ["STABLESR_DEVICE"] = str(check.device)
    rows = []
    try:
        for path in sorted(NOTEBOOKS.glob("*.ipynb")):
            row = {"notebook": path.name}
            start = time.perf_counter()
            try:
                execute(path)  # in memory: the file is only read
            except CellExecutionError as e:
                row["error"] = f"{e.ename}: {e.evalue}"
            except Exception as e:  # a dead kernel, a cell timeout
                row["error"] = error_text(e)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    finally:
        if previous is None:
            os.environ.pop("STABLESR_DEVICE")
        else:
            os.environ["STABLESR_DEVICE"] = previous
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------------
# 5. training


def last_log_line(run: Path) -> dict:
    return json.loads((run / "log.jsonl").read_text().strip().splitlines()[-1])


def train_stage(name: str, cmd: list[str], device: torch.device) -> dict:
    """Run `python -m stablesr_min CMD --device D`; steps/s from its run folder's last log line."""
    row = {"stage": name}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "stablesr_min", *cmd, "--device", str(device)], cwd=ROOT,
                              capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"no end after {TRAIN_TIMEOUT_S} s"}
    row["wall_s"] = time.perf_counter() - start
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {**row, "error": f"exit code {done.returncode}: {lines[-1] if lines else ''}"}
    if name == "cfw_data":  # it samples cfw's training data and writes no log
        samples = int(cmd[cmd.index("--count") + 1])
        return {**row, "samples": samples, "samples_per_s": samples / row["wall_s"]}
    last = last_log_line(Path(cmd[cmd.index("--out") + 1]))
    return {**row, "steps": last["step"], "seconds": last["seconds"], "steps_per_s": last["step"] / last["seconds"]}


def training(check: Check) -> dict:
    from train_tiny import Recipe, stage_commands  # beside this file: scripts/ is on sys.path when it runs

    n = check.sizes.train_steps
    recipe = Recipe(vae_steps=n, vae_lr_decay=0, unet_steps=n, sr_steps=n, cfw_samples=8, cfw_sample_steps=2,
                    cfw_steps=n, save_every=0, val_every=0, ablation_seeds=())
    wanted = ("vae", "unet", "sr") if check.small else ("vae", "unet", "sr", "cfw_data", "cfw")
    rows, failed = [], None
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as runs:
        for stage in stage_commands(recipe, Path(runs)):
            name, cmd = stage[0], stage[1]  # a stage's first run (sr, not its time-blind twin)
            if name not in wanted:
                rows.append({"stage": name, "skipped": "--small runs vae, unet and sr only"})
            elif failed:
                rows.append({"stage": name, "skipped": f"needs the {failed} stage, which failed"})
            else:
                rows.append(train_stage(name, cmd, check.device))
                failed = name if "error" in rows[-1] else None
    return {"steps_per_stage": n, "data": "data/photos",
            "note": "seconds: training time from the run's log.jsonl; wall_s: the whole command (start-up too)",
            "rows": rows}


# ------------------------------------------------------------------------------------------------------
# The report


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]


def section_markdown(name: str, section: dict) -> list[str]:
    """Scalars as a list, lists of rows as tables, other lists as bullets."""
    lines = [f"## {name}", ""]
    for key, value in section.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", *([] if key == "rows" else [f"{key}:", ""]), *table(value), ""]
        elif isinstance(value, list):
            lines += ["", f"{key}:", "", *(f"- {fmt(v)}" for v in value), ""]
        else:
            lines.append(f"- {key}: {fmt(value)}")
    return lines + [""]


def markdown(report: dict) -> str:
    head = [f"# GPU check: {report['device_name']}", ""]
    head += [f"- {key}: {fmt(report[key])}" for key in report if key not in SECTIONS]
    body = [line for name in SECTIONS if name in report for line in section_markdown(name, report[name])]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(head + [""] + body)).rstrip() + "\n"


def write_report(out: Path, report: dict) -> None:
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown(report)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


RUNNERS = {"numerics": numerics, "speed": speed, "memory": memory, "notebooks": notebooks, "training": training}


def run_section(name: str, check: Check) -> dict:
    """The section's results, with the warnings it raised; {"error": ...} if it failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            section = RUNNERS[name](check)
        except Exception as e:
            section = {"error": error_text(e), "traceback": traceback.format_exc().splitlines()[-6:]}
    messages = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    return {**section, "warnings": messages} if messages else section


def summary(section: dict) -> str:
    for key in ("skipped", "error"):
        if key in section:
            return f"{key}: {section[key]}"
    return "done"


# ------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandLineParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder of report.json and report.md (created)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="small networks and images (CI)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown or not args.only:
        what = f"unknown section {', '.join(map(repr, unknown))}" if unknown else "no section given"
        parser.error(f"--only: {what}; give some of {','.join(SECTIONS)}, comma-separated")
    try:
        args.device = pick_device(args.device)
    except OptionError as e:
        parser.error(f"--device {e.problem}")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are checked; use one of them")
    check_out(args.out, parser)
    return args


def check_out(out: Path, parser: argparse.ArgumentParser) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: is a file; name a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out}: cannot create it ({e.strerror}); name a folder you can write to")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args.device, args.small)
    started = time.perf_counter()
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": str(args.device), "device_name": device_name(args.device),
              "threads": torch.get_num_threads(), "small": args.small, "wall_s": 0.0}
    for name in SECTIONS:
        section_start = time.perf_counter()
        report[name] = run_section(name, check) if name in args.only else {"skipped": "not in --only"}
        report["wall_s"] = time.perf_counter() - started
        write_report(args.out, report)
        print(f"[gpu_check] {name}: {summary(report[name])} ({time.perf_counter() - section_start:.1f} s)",
              file=sys.stderr)
    return 1 if any("error" in report[name] for name in SECTIONS) else 0


if __name__ == "__main__":
    sys.exit(main())
