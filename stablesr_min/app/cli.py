"""Command line.

    python -m stablesr_min upscale photo.png [more.png ...] --out results/
    python -m stablesr_min convert stablesr_000117.ckpt stablesr_000117.safetensors
    python -m stablesr_min train sr --base stablesr_000117.safetensors --data photos/ --out runs/sr --steps 1000
    python -m stablesr_min train cfw-data --weights stablesr_000117.safetensors --data photos/ --out cfw_data --count 5000
    python -m stablesr_min train cfw --cfw-base v2-1_512-ema-pruned.safetensors --data cfw_data --out runs/cfw --steps 1000
    python -m stablesr_min train vae --data photos/ --out runs/vae --steps 3000     (then `train unet`: a tiny prior)

Every user error ends in one line on stderr and exit code 2; no traceback. Everything that can be checked
before a model loads is checked then (inputs, output folder, options, device, memory), so a bad run fails
in a second, not after its last step. Ctrl-C ends with "interrupted" (exit code 130), SIGTERM with
"terminated" (143), leaving no temp files. The checks below are small functions for every command to use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import check_output_file, check_output_folder
from ..colorfix import METHODS as COLORFIX_METHODS
from ..degradation import ORDERS
from ..devices import DTYPES, pick_device, pick_dtype
from ..errors import USER_ERRORS, OptionError, Terminated, UsageError, WeightsError
from ..image_io import image_size, load_image, save_png_atomically, to_pil
from ..progress import ProgressLine
from ..weights import guess_kind
from .convert import convert_ckpt
from .signals import terminate_on_sigterm
from .settings import (SAMPLING_OPTIONS, check_not_an_input, checked_config, choose_weights, given_values,
                       load_pipeline, sampling_settings)


# ------------------------------------------------------------------------------------------------------
# Checks shared by every command


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the problem and where the help is), not the usage block.
    Subcommand parsers are made of the same class, so they inherit this."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        self.exit(2)


def finite_float(text: str) -> float:
    """argparse type: a number that is neither nan nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


# Which option takes a checkpoint of each kind (`weights.guess_kind`), said after "This looks like ..."
KIND_ADVICE = {"stablesr": "pass it as --weights", "sd2": "StableSR needs stablesr_000117 as --weights",
               "cfw": "pass it as --cfw", "vae": "StableSR needs the full stablesr_000117 checkpoint as --weights"}


def in_flags(error: Exception, flags: set[str]) -> str:
    """A user error of the layers below in the command line's words: an option named by its flag where the
    command line has one (`dec_w` -> `--dec-w`), a checkpoint's kind with the option that takes it."""
    if isinstance(error, OptionError):
        flag = "--" + error.field.replace("_", "-")
        return f"{flag if flag in flags else error.field} {error.problem}"
    if isinstance(error, WeightsError) and error.kind in KIND_ADVICE:
        return f"{error}: {KIND_ADVICE[error.kind]}"
    return str(error)


def option_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of the parser and its subcommands'."""
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= option_flags(sub)
    return flags


# ------------------------------------------------------------------------------------------------------
# convert


def cmd_convert(args) -> None:
    check_output_file(Path(args.output))
    tensors = convert_ckpt(args.input, args.output)
    print(f"wrote {args.output}: {len(tensors)} tensors ({guess_kind(tensors)} checkpoint)")


# ------------------------------------------------------------------------------------------------------
# upscale


def unique_inputs(names: list[str]) -> list[Path]:
    """Each file once, in the order first named: a file named twice (or by two paths) is upscaled once."""
    seen, unique = set(), []
    for path in map(Path, names):
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def output_paths(inputs: list[Path], out_dir: Path) -> list[Path]:
    """DIR/<name>.png per input; refuses to overwrite an input or to write two inputs to one file."""
    outputs = [out_dir / f"{p.stem}.png" for p in inputs]
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, outputs):
        check_not_an_input(dst, set(inputs))
        if dst in seen:
            raise UsageError(f"{src} and {seen[dst]} would both be written to {dst}; rename one of them")
        seen[dst] = src
    return outputs


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def pending(inputs: list[Path], outputs: list[Path], overwrite: bool) -> list[tuple[Path, Path]]:
    """(input, output) pairs still to do: an output that exists is skipped (a note says so), so that an
    interrupted batch can be resumed, unless `overwrite` asks to redo it."""
    todo = []
    for src, dst in zip(inputs, outputs):
        if dst.is_dir():
            raise UsageError(f"{dst}: is a folder, where the output of {src} goes; move it away")
        if dst.exists() and not overwrite:
            print(f"skipped {src}: {dst} exists (--overwrite redoes it)")
        else:
            todo.append((src, dst))
    return todo


def canvas_bytes(h: int, w: int, scale: float) -> int:
    """What grows with the image: about eight full-size RGB float32 buffers (upsampled, canvas, CFW
    output and its blend weights, colour fix, result) and about eight latent-sized float32 ones (the
    pipeline keeps both in float32 whatever the network dtype). Network activations are bounded by the
    tiles and do not grow with the image."""
    out_pixels = int(h * scale) * int(w * scale)
    return out_pixels * 3 * 4 * 8 + out_pixels // 64 * 4 * 4 * 8


def warn_unused_guidance(opts) -> None:
    """One line on stderr when the guidance options were given but cannot act (`UpscaleOptions.guided`)."""
    if opts.negative_prompt and opts.guidance_scale == 1:
        print("WARNING: --negative-prompt has no effect at --guidance-scale 1; set a scale, e.g. 7 (the "
              "official script's)", file=sys.stderr)
    elif opts.guidance_scale != 1 and not opts.negative_prompt:
        print("WARNING: --guidance-scale has no effect without --negative-prompt", file=sys.stderr)


def cmd_upscale(args) -> None:
    from ..pipeline import UpscaleOptions, official_size

    inputs = unique_inputs(args.inputs)
    sizes = {path: image_size(path) for path in inputs}  # headers only: fails fast, decodes nothing
    opts = UpscaleOptions(scale=args.scale, tile_batch=args.tile_batch, tile_weights=args.tile_weights,
                          prompt=args.prompt, vae_tile=args.vae_tile, official_resize=args.official_resize,
                          eta=args.eta, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
    warn_unused_guidance(opts)
    stablesr_paths, cfw_path, notice = choose_weights(args.weights, args.cfw)
    # the sampling options not given: the weights' own (the shipped tiny model's), else the official
    opts = dataclasses.replace(opts, **sampling_settings(stablesr_paths, given_values(args, SAMPLING_OPTIONS)))
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out_dir = Path(args.out)
    check_output_folder(out_dir, f"--out {out_dir}")
    jobs = pending(inputs, output_paths(inputs, out_dir), args.overwrite)

    free = free_memory_bytes(device)
    for path, _ in jobs:
        w, h = sizes[path]
        if opts.official_resize:
            try:
                h, w = official_size(h, w)
            except ValueError as e:
                raise UsageError(f"{path}: --official-resize: {e}") from None
        out_w, out_h = int(w * opts.scale), int(h * opts.scale)
        if out_w < 1 or out_h < 1:
            raise UsageError(f"{path}: {w}x{h} at --scale {opts.scale:g} would be {out_w}x{out_h} pixels; "
                             "use a larger --scale")
        need = canvas_bytes(h, w, opts.scale)
        if need > free:
            raise UsageError(f"{path}: {w}x{h} at --scale {opts.scale:g} needs about {need / 2**30:.1f} GB "
                             f"for the image canvas, but {device} has {free / 2**30:.1f} GB free; use a "
                             "smaller --scale, split the image, or another device")
    if not jobs:
        return

    cfg = checked_config(stablesr_paths, args.config, opts.steps, opts.tile)
    images = {}
    for path, _ in jobs:
        images[path] = load_image(path)  # fails fast, before the models load
        for note in images[path].warnings:
            print(f"WARNING: {path}: {note}", file=sys.stderr)

    pipeline = load_pipeline(stablesr_paths, cfw_path, cfg, args.config, notice, device, dtype)
    pipeline.speed_up(args.channels_last, args.compile)

    for path, out_path in jobs:
        image = images[path]
        progress = ProgressLine(path.name, opts.steps)
        generator = torch.Generator().manual_seed(args.seed)
        sr = pipeline(image.rgb, opts, generator=generator, progress=progress.tiles, on_step=progress.step_done)
        alpha = None
        if image.alpha is not None:
            # Alpha is not an image the model knows: it is upscaled on its own (bicubic) and put back.
            alpha = F.interpolate(image.alpha, size=sr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails earlier leaves nothing
            save_png_atomically(to_pil(sr.float().cpu(), alpha), out_path)
        except OSError as e:
            raise UsageError(f"{out_path}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {out_path} ({sr.shape[-1]}x{sr.shape[-2]})")


# ------------------------------------------------------------------------------------------------------


def tiny_sampling_defaults() -> dict:
    """The shipped tiny model's stored sampling settings, for the help; {} if its files are missing."""
    from ..tiny import sampling_defaults, tiny_stablesr_files

    files = tiny_stablesr_files()
    return sampling_defaults(files) if all(f.is_file() for f in files) else {}


def build_parser() -> argparse.ArgumentParser:
    from ..pipeline import SAMPLERS, UpscaleOptions
    parser = CommandLineParser(prog="python -m stablesr_min",
                               description="StableSR super-resolution, from the official weights.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="super-resolve images (default 4x)",
                        description="Super-resolve images with StableSR. Without --weights it uses the official "
                                    "files in $STABLESR_WEIGHTS, else the tiny model shipped with stablesr-min.")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    up.add_argument("--out", required=True, metavar="DIR", help="folder for DIR/<name>.png")
    up.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists (default: skip them)")
    up.add_argument("--weights", nargs="+", metavar="FILE", help="StableSR .safetensors (stablesr_000117)")
    up.add_argument("--cfw", metavar="FILE", help="CFW .safetensors (vqgan_cfw_00011)")
    up.add_argument("--config", metavar="JSON", help="model config (files written by this project carry it)")
    # The defaults said in the help are UpscaleOptions' (the paper's) and the shipped tiny model's stored ones
    d, tiny = UpscaleOptions, tiny_sampling_defaults()
    up.add_argument("--steps", type=int, help=f"sampling steps (default {d.steps}; the tiny model's: {tiny.get('steps', '?')}; "
                    "turbo weights: 4)")
    up.add_argument("--sampler", choices=SAMPLERS,
                    help=f"ddpm (the paper's) or ddim (the official DDIM script's, 20-50 steps); default {d.sampler}")
    up.add_argument("--eta", type=finite_float, default=d.eta,
                    help=f"DDIM noise in [0, 1]: 0 deterministic, 1 the DDPM posterior's (default {d.eta:g})")
    up.add_argument("--guidance-scale", type=finite_float, default=d.guidance_scale,
                    help=f"classifier-free guidance against --negative-prompt (default {d.guidance_scale:g}: none; "
                         "official 7)")
    up.add_argument("--negative-prompt", default=d.negative_prompt, help="what guidance steers away from (default none)")
    up.add_argument("--scale", type=finite_float, default=d.scale, help=f"upscaling factor (default {d.scale:g})")
    up.add_argument("--dec-w", type=finite_float, help=f"CFW weight w in [0, 1]: 0 realistic, 1 faithful (default "
                    f"{d.dec_w:g}; the tiny model's: {tiny.get('dec_w', '?')})")
    up.add_argument("--colorfix", choices=COLORFIX_METHODS,
                    help=f"colour correction (default {d.colorfix}; the tiny model's: {tiny.get('colorfix', '?')})")
    up.add_argument("--tile", type=int, help=f"latent tile of aggregation sampling (default {d.tile}; the tiny "
                    f"model's {tiny.get('tile', '?')})")
    up.add_argument("--overlap", type=int, help=f"latent overlap of tiles (default {d.overlap}; the tiny model's "
                    f"{tiny.get('overlap', '?')})")
    up.add_argument("--tile-batch", type=int, default=d.tile_batch,
                    help=f"tiles per network call (default {d.tile_batch})")
    up.add_argument("--tile-weights", choices=["paper", "official"], default=d.tile_weights,
                    help="Gaussian tile weights (std 0.1 tile, the official code's): centred on the tile, "
                         "or the official code's map, rows half a pixel low")
    up.add_argument("--official-resize", action="store_true",
                    help="first cut each input side down to a multiple of 8 with Lanczos, as the official script "
                         "does (37 px -> 32: the output is then not exactly --scale times the input)")
    up.add_argument("--vae-tile", type=int, default=d.vae_tile, help=f"VAE tile in pixels for large images (0: off; "
                    f"default {d.vae_tile})")
    up.add_argument("--prompt", default=d.prompt, help="text prompt (StableSR was trained with none)")
    up.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    up.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    up.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (GPU: float16/bfloat16)")
    up.add_argument("--channels-last", action="store_true", help="channels-last convolutions (for GPUs)")
    up.add_argument("--compile", action="store_true", help="torch.compile the UNet and encoder (for GPUs)")
    up.set_defaults(run=cmd_upscale)

    convert = sub.add_parser("convert", help="convert an official .ckpt to .safetensors, without running its code")
    convert.add_argument("input", help="the official .ckpt file")
    convert.add_argument("output", help="the .safetensors file to write")
    convert.set_defaults(run=cmd_convert)

    add_evaluate_parser(sub)

    train = sub.add_parser("train", help="train StableSR's parts (see `train sr --help`)")
    train_sub = train.add_subparsers(dest="what", required=True)
    add_train_sr_parser(train_sub)
    add_train_cfw_parsers(train_sub)
    add_train_prior_parsers(train_sub)
    return parser


def add_evaluate_parser(sub) -> None:
    """`evaluate` (app/evaluate.py)."""
    from ..pipeline import SAMPLERS
    from .evaluate import CROP_MULTIPLE, EvalDegradation, run_evaluate

    ev = sub.add_parser("evaluate", help="PSNR/SSIM/colour/realism of StableSR vs bicubic on degraded HR crops",
                        description="Crop HR photos on a grid, degrade the crops with a fixed, seeded degradation "
                                    f"({EvalDegradation().describe()}), upscale 4x with StableSR (once per seed) "
                                    "and with bicubic, and tabulate PSNR, SSIM, colour error and the spectrum "
                                    "distance (a realism axis) against the HR crops, with each measure's paired "
                                    "difference to bicubic and its verdict.")
    ev.add_argument("--hr", nargs="+", required=True, metavar="DIR", help="folders of HR photos (searched recursively)")
    ev.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, metrics.md (and images/)")
    ev.add_argument("--crop", type=int, default=256, help=f"HR crop side in pixels, a multiple of {CROP_MULTIPLE} (default 256)")
    ev.add_argument("--grid", type=int, default=1, help="G: G x G crops per photo, each centred in a cell of a G x G "
                    "grid over it (default 1: the centre crop)")
    ev.add_argument("--border", type=int, default=0, help="pixels left out at every edge by PSNR and SSIM (default 0)")
    ev.add_argument("--weights", nargs="+", metavar="FILE", help="StableSR .safetensors (default: as upscale)")
    ev.add_argument("--cfw", metavar="FILE", help="CFW .safetensors")
    ev.add_argument("--config", metavar="JSON", help="model config (files written by this project carry it)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: as upscale, the weights' own or 200)")
    ev.add_argument("--sampler", choices=SAMPLERS, help="ddpm or ddim (default: as upscale)")
    ev.add_argument("--dec-w", type=finite_float, nargs="+", metavar="W",
                    help="CFW weights w in [0, 1], each a column, all from one sampled latent (default: as upscale)")
    ev.add_argument("--colorfix", choices=COLORFIX_METHODS, help="colour correction (default: as upscale)")
    ev.add_argument("--tile", type=int, help="latent tile of aggregation sampling (default: as upscale)")
    ev.add_argument("--overlap", type=int, help="latent overlap of tiles (default: as upscale)")
    ev.add_argument("--seed", type=int, nargs="+", default=[42], metavar="SEED",
                    help="sampling seeds, each used for every crop (default 42); several give the sd over seeds")
    ev.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    ev.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (GPU: float16/bfloat16)")
    ev.add_argument("--save-images", action="store_true", help="also write DIR/images/<name>_{hr,lr,bicubic,sr_wW}.png")
    ev.set_defaults(run=run_evaluate)


def add_train_sr_parser(train_sub) -> None:
    # Options default to None here ("not given"): a resumed run takes them from its state, a new one from
    # train.sr.SROptions, whose defaults the help states.
    from ..train.sr import SROptions as d
    sr = train_sub.add_parser("sr", help="fine-tune the time-aware encoder and SFT layers (paper Sec. 3.1)",
                              description="Fine-tune StableSR's time-aware encoder and SFT layers on a frozen "
                                          "Stable Diffusion, on HR photos degraded on the fly (Real-ESRGAN).")
    sr.add_argument("--base", nargs="+", metavar="FILE", help="StableSR (continue) or SD 2.x safetensors to start from")
    sr.add_argument("--data", nargs="+", metavar="DIR", help="folders of HR training photos (searched recursively)")
    add_run_folder(sr)
    sr.add_argument("--config", metavar="JSON", help="model config (default: the one stored in --base)")
    sr.add_argument("--batch-size", type=int, help=f"images per micro-batch (default {d.batch_size}, the official per-GPU batch)")
    sr.add_argument("--gt-size", type=int, help=f"HR crop size in pixels (default {d.gt_size})")
    sr.add_argument("--lr", type=finite_float, help=f"AdamW learning rate (default {d.lr:g}, the official)")
    sr.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum}; "
                    "official 4)")
    sr.add_argument("--degradation", choices=list(ORDERS),
                    help=f"second-order: Real-ESRGAN's, as StableSR trains; first-order: Eq. 1 once (default "
                         f"{d.degradation})")
    sr.add_argument("--skip-small", choices=["auto", "on", "off"],
                    help=f"leave out photos under 384 x 384 px or 100 KiB, as the official dataset (default "
                         f"{d.skip_small}: on at --gt-size 512 or more)")
    sr.add_argument("--time-blind", action="store_true", default=None,
                    help="ablation: the encoder always sees t = 0 (stored in the config, so sampling does too)")
    add_run_options(sr, "validation losses")
    sr.add_argument("--checkpointing", action="store_true", default=None,
                    help="recompute the UNet's blocks in the backward pass (gradient checkpointing): less memory")
    add_torchrun_options(sr)
    sr.set_defaults(run=cmd_train_sr)


def add_run_folder(parser) -> None:
    """Where a training run writes, and how far it goes."""
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder: last.safetensors, state.safetensors, log.jsonl")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps in total (with --resume: up to this step)")


def add_run_options(parser, validation: str) -> None:
    """The options every training run has: seed, device, dtype, resuming, save and validation intervals."""
    from ..train.options import RunOptions as d

    parser.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help=f"autocast dtype on a GPU (default {d.dtype}; weights stay float32)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--restart", action="store_true", help="start a new run in --out though it holds one (its "
                        "files kept as *.old)")
    parser.add_argument("--save-every", type=int, help=f"steps between saves (default {d.save_every}; 0: only at the "
                        "end and on Ctrl-C or SIGTERM, as always)")
    parser.add_argument("--val-every", type=int, help=f"steps between {validation} (default {d.val_every}; 0: never)")


def add_torchrun_options(parser) -> None:
    """The options of a training command that runs under torchrun (train sr, train cfw)."""
    from ..train.processes import DIST_TIMEOUT

    parser.add_argument("--dist-timeout", type=float, metavar="SECONDS", default=DIST_TIMEOUT,
                        help=f"under torchrun: seconds a process waits for the others before giving up (default "
                             f"{DIST_TIMEOUT:g})")


def add_train_prior_parsers(train_sub) -> None:
    # `train vae` and `train unet`: the tiny diffusion prior (train/prior.py). Options default to None here
    # ("not given"): a resumed run takes them from its state, a new one from train/prior.py's option classes.
    vae = train_sub.add_parser("vae", help="train the prior's VAE (AutoencoderKL: L1 + KL) on clean crops",
                               description="Train a small AutoencoderKL (the first stage of a tiny Stable Diffusion) "
                                           "with L1 + a small KL term on random crops of photos.")
    unet = train_sub.add_parser("unet", help="train the prior's UNet (latent diffusion) on a trained VAE",
                                description="Train a small SD 2.x-like UNet (no SFT) as a latent diffusion model on a "
                                            "frozen VAE, with the empty prompt through a tiny frozen text encoder; "
                                            "writes a checkpoint that `train sr --base` takes.")
    unet.add_argument("--vae", metavar="FILE", help="the VAE: `train vae`'s last.safetensors (or an SD 2.x checkpoint)")
    from ..train.prior import UNetOptions, VAEOptions

    for p, d in ((vae, VAEOptions), (unet, UNetOptions)):
        p.add_argument("--data", nargs="+", metavar="DIR", help="folders of training photos (searched recursively)")
        add_run_folder(p)
        p.add_argument("--config", metavar="JSON", help="model sizes: a config JSON whose blocks update the tiny defaults")
        p.add_argument("--batch-size", type=int, help=f"crops per step (default {d.batch_size})")
        p.add_argument("--crop", type=int, help=f"crop size in pixels (default {d.crop})")
        p.add_argument("--lr", type=finite_float, help=f"AdamW learning rate (default {d.lr:g})")
        p.add_argument("--lr-decay", type=int, metavar="N", help="take the lr linearly down toward 0 over the last N "
                                                                 "steps before --steps (default 0: constant)")
        add_run_options(p, "validation losses")
    vae.add_argument("--kl-weight", type=finite_float, help=f"weight of the KL term (default {VAEOptions.kl_weight:g}, SD's)")
    vae.add_argument("--hue-rotation", type=finite_float, metavar="P",
                     help="probability of turning a crop's colours by a random angle about the grey axis, so that "
                          "the VAE learns hues its photos lack (default 0: the photos' own colours)")
    vae.set_defaults(run=cmd_train_prior)
    unet.set_defaults(run=cmd_train_prior)


def add_train_cfw_parsers(train_sub) -> None:
    # Options a data folder or a run keeps default to None here ("not given"): a resumed one takes them from
    # what it stored, a new one from train/cfw_data.GenerationOptions / train/cfw.CFWOptions.
    from ..train.cfw import CFWOptions as c
    from ..train.cfw_data import GenerationOptions as g

    data = train_sub.add_parser("cfw-data", help="sample the latents CFW trains on (paper Sec. 3.2)",
                                description="Degrade HR crops (Real-ESRGAN) and sample a latent from each LR with "
                                            "a fine-tuned StableSR, as upscale does; writes lr/, gt/, latent/. "
                                            "Run it again on the same --out to continue it.")
    data.add_argument("--weights", nargs="+", metavar="FILE", help="the fine-tuned StableSR .safetensors")
    data.add_argument("--data", nargs="+", metavar="DIR", help="folders of HR photos (searched recursively)")
    data.add_argument("--out", required=True, metavar="DATA", help="the data folder to write (or to continue)")
    data.add_argument("--count", type=int, required=True, help="samples the folder should hold in all")
    data.add_argument("--steps", type=int, help=f"respaced DDPM steps (default {g.steps}, as the official)")
    data.add_argument("--gt-size", type=int, help=f"HR crop size in pixels (default {g.gt_size})")
    data.add_argument("--batch-size", type=int, help=f"samples per network call (default {g.batch_size}, as the "
                      "official)")
    data.add_argument("--degradation", choices=list(ORDERS),
                      help=f"second-order or first-order: the one `train sr` used (its --degradation; default "
                           f"{g.degradation})")
    data.add_argument("--seed", type=int, help=f"random seed (default {g.seed}); sample i uses seeds derived from it "
                      "and i")
    data.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    data.add_argument("--dtype", choices=list(DTYPES), help=f"network dtype on a GPU (default {g.dtype})")
    data.set_defaults(run=cmd_train_cfw_data)

    cfw = train_sub.add_parser("cfw", help="train CFW's fusion layers (paper Sec. 3.2) on `train cfw-data` output",
                               description="Train the fusion layers of the CFW decoder (w = 1) with L1 + a PatchGAN "
                                           "hinge loss; the VAE stays frozen.")
    cfw.add_argument("--cfw-base", metavar="FILE", help="a CFW .safetensors (continue), or a VAE or SD 2.x one "
                                                        "(new fusion layers)")
    cfw.add_argument("--data", nargs="+", metavar="DATA", help="folders written by `train cfw-data`")
    add_run_folder(cfw)
    cfw.add_argument("--batch-size", type=int, help=f"samples per step (default {c.batch_size}: the official 1 x 8 "
                     "accumulated)")
    cfw.add_argument("--lr", type=finite_float, help=f"Adam learning rate, fusion layers and discriminator (default "
                     f"{c.lr:g})")
    cfw.add_argument("--disc-start", type=int, help=f"steps before the adversarial terms start (default {c.disc_start})")
    cfw.add_argument("--hue-rotation", type=finite_float, metavar="P",
                     help="probability of turning a sample's LR and GT, not its latent, by a random angle about the "
                          "grey axis, so that the fusion layers take colour from the LR (default 0, as the official)")
    add_run_options(cfw, "validation L1 losses (a fixed batch, w = 1)")
    add_torchrun_options(cfw)
    cfw.set_defaults(run=cmd_train_cfw)


# ------------------------------------------------------------------------------------------------------
# train: argparse's namespace -> a trainer's options


def given_options(args, options: type) -> dict:
    """{field of the `options` dataclass: value} for each option given (argparse's None: not given); the
    options naming files made absolute (a run may be continued from another folder)."""
    from ..train.options import fields_that

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if getattr(args, f.name) is not None}
    for name in set(fields_that(options, path=True)) & given.keys():
        value = given[name]
        given[name] = [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
    return given


def command_options(args, options: type, required: dict[str, str]):
    """A training command's options and, with --resume, its run's state (`run_folder.resume_options`: a resumed
    run takes its persisting options from its state); a new run needs the `required` options ({field: how
    --help shows it})."""
    from ..train.run_folder import resume_options

    given = given_options(args, options)
    if args.resume:
        return resume_options(options, given)
    if not required.keys() <= given.keys():
        raise UsageError(f"train {args.what} needs {' and '.join(required.values())} (or --resume to continue a run)")
    return options(**given), None


def cmd_train_sr(args) -> str:
    """`train sr`, in every process of a torchrun: each reads its own command line (train_sr checks that they
    agree)."""
    from ..train.processes import torchrun_processes
    from ..train.sr import SROptions, train_sr

    with torchrun_processes(args.device, args.dist_timeout, args.out) as procs:
        opts, state = command_options(args, SROptions, {"base": "--base FILE", "data": "--data DIR"})
        return train_sr(opts, procs, state)


def cmd_train_cfw(args) -> str:
    """`train cfw`, in every process of a torchrun, as `train sr`."""
    from ..train.cfw import CFWOptions, train_cfw
    from ..train.processes import torchrun_processes

    with torchrun_processes(args.device, args.dist_timeout, args.out) as procs:
        opts, state = command_options(args, CFWOptions, {"cfw_base": "--cfw-base FILE", "data": "--data DIR"})
        return train_cfw(opts, procs, state)


def cmd_train_prior(args) -> str:
    """`train vae` and `train unet`: one process."""
    from ..train.processes import one_process
    from ..train.prior import UNetOptions, VAEOptions, train_unet, train_vae

    with one_process(f"train {args.what}"):
        if args.what == "vae":
            return train_vae(*command_options(args, VAEOptions, {"data": "--data DIR"}))
        return train_unet(*command_options(args, UNetOptions, {"vae": "--vae FILE", "data": "--data DIR"}))


def cmd_train_cfw_data(args) -> None:
    """`train cfw-data`: one process; a folder that holds a generation continues it. A stop (Ctrl-C, SIGTERM) at
    any moment of the command says what the folder holds and that the same command continues it; a stop once it
    holds --count samples changes nothing (the work is done)."""
    from ..train.cfw_data import GenerationOptions, continued_generation, generate, stopped_generation
    from ..train.processes import one_process

    try:
        with one_process("train cfw-data"):
            generate(continued_generation(given_options(args, GenerationOptions)))
    except (KeyboardInterrupt, Terminated):
        if stopped_generation(args.out, args.count):
            raise


def main(argv: list[str] | None = None) -> int:
    from ..train.run_folder import STOPPED, TERMINATED  # how a training run may end (the parser loaded train/)

    parser = build_parser()
    args = parser.parse_args(argv)
    endings = {STOPPED: ("interrupted", 130), TERMINATED: ("terminated", 128 + signal.SIGTERM)}
    speak = os.environ.get("RANK", "0") == "0"  # a training run under torchrun: one process says how it ended
    running = outcome = object()  # until the command returns: a stop after that changes nothing
    try:
        with terminate_on_sigterm():
            outcome = args.run(args)  # the training commands say how they ended (saved); the others return None
    except USER_ERRORS as e:
        print(f"error: {in_flags(e, option_flags(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if outcome is running:
            outcome, speak = STOPPED, True
    except Terminated:
        if outcome is running:
            outcome, speak = TERMINATED, True
    if outcome not in endings:
        return 0
    word, code = endings[outcome]
    if speak:
        print(word, file=sys.stderr)
    return code
