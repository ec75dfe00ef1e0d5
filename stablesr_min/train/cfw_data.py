"""CFW's training data (paper Sec. 3.2): LR/GT pairs, each with the latent the fine-tuned model samples from its LR.

    python -m stablesr_min train cfw-data --weights stablesr_000117.safetensors --data photos/ --out cfw_data --count 5000

CFW learns to correct what sampling gets wrong, so it trains on what sampling really produces. As the
official `scripts/generate_vqgan_data.py` does: HR crops are degraded by the Real-ESRGAN pipeline StableSR
is fine-tuned with (`data.TrainingPairs`), and for each LR the fine-tuned model samples a latent exactly as
`upscale` does (`StableSRPipeline.sample_latent`): the empty prompt, x_T = the latent of the bicubic-
upsampled LR noised to t = 999, respaced DDPM steps. The whole crop is one sampling tile with weight 1, as
the official script samples it untiled. A sample whose latent is not finite (NaN or inf, e.g. a float16
overflow) is dropped and counted, as the official script drops NaN samples.

A data folder:

    DATA/lr/00000007.png              the degraded LR (GT size / 4), 8-bit: exactly what the sampler saw
    DATA/gt/00000007.png              the HR crop, the training target (USM-sharpened, as in `train sr`)
    DATA/latent/00000007.safetensors  "latent", (1, 4, GT/8, GT/8) float32: the sampled x_0 in diffusion space
                                      (scale_factor x the VAE's latent); scale_factor in the metadata
    DATA/generation.json              the options that made the folder, and the sample indices dropped

The latent is written last: a sample is complete when its latent exists. Where this differs from the
official script, on purpose:
- the LR is stored at its own size, not upsampled to the GT's (training upsamples it exactly as inference
  does), and LR and GT are rounded to 8 bits before sampling, so the files hold what the sampler saw;
- sample i comes from its own seeds (derived from --seed and i), so a stopped generation resumes where it
  stopped and writes the same files as one that never stopped. Each pair is therefore drawn alone, without
  the training pair pool (which, for pairs drawn one at a time, would only reorder them);
- no `samples/` folder of decoded latents: decode one with the VAE to look at it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import atomic_write, check_output_folder
from ..config import SCALE
from ..degradation import ORDERS, DegradationConfig
from ..devices import pick_device, pick_dtype
from ..errors import DataError, ImageError, UsageError
from ..image_io import image_size, save_png_atomically, to_pil
from ..progress import ProgressLine, format_seconds
from ..schedule import check_steps
from ..weights import WeightFiles, save_safetensors
from .data import TrainingPairs, check_hue_rotation, hue_rotate, read_rgb
from .processes import derive_seeds, one_process
from .run_folder import GENERATION, lock_folder, refuse_another_kind
from .options import KEPT, check_option_ranges, continued_options, fields_that, kept, persisting

LATENT_KEY = "latent"
SCALE_FACTOR_KEY = "stablesr_min.scale_factor"

# ------------------------------------------------------------------------------------------------------
# The folder


class DataFolder:
    """lr/, gt/ and latent/ of one data folder, named by sample index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def lr(self, index: int) -> Path:
        return self.path / "lr" / f"{index:08d}.png"

    def gt(self, index: int) -> Path:
        return self.path / "gt" / f"{index:08d}.png"

    def latent(self, index: int) -> Path:
        return self.path / "latent" / f"{index:08d}.safetensors"

    def complete(self, index: int) -> bool:
        return all(p.is_file() for p in (self.lr(index), self.gt(index), self.latent(index)))

    def indices(self) -> list[int]:
        """The indices of the latents present, sorted (a latent is written last)."""
        return sorted(int(p.stem) for p in (self.path / "latent").glob("*.safetensors") if p.stem.isdigit())

    def complete_count(self) -> int:
        """How many samples are complete (LR, GT and latent all written): a generation's progress."""
        return sum(self.complete(i) for i in self.indices())

    def write(self, index: int, lr: torch.Tensor, gt: torch.Tensor, latent: torch.Tensor,
              scale_factor: float) -> None:
        for sub in ("lr", "gt", "latent"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        save_png_atomically(to_pil(lr), self.lr(index))
        save_png_atomically(to_pil(gt), self.gt(index))
        save_safetensors({LATENT_KEY: latent}, self.latent(index), metadata={SCALE_FACTOR_KEY: repr(scale_factor)})

    @property
    def record_path(self) -> Path:
        return self.path / GENERATION

    def read_record(self) -> dict[str, Any] | None:
        if not self.record_path.is_file():
            return None
        try:
            return json.loads(self.record_path.read_text())
        except ValueError:
            raise UsageError(f"{self.record_path}: not readable JSON; remove it to start the folder anew") from None

    def write_record(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))


# ------------------------------------------------------------------------------------------------------
# Generating


@dataclass
class GenerationOptions:  # kept: a folder keeps it; continuing the folder, it must be the same (options.py)
    out: str  # the data folder
    count: int  # complete samples wanted in it (a continued generation goes on up to it)
    weights: list[str] = kept(path=True)  # the fine-tuned StableSR checkpoint (safetensors)
    data: list[str] = kept(path=True)  # folders of HR photos
    steps: int = kept(200)  # respaced DDPM steps (the official README generates with --ddpm_steps 200)
    gt_size: int = kept(512)  # HR crop size (official: 512)
    batch_size: int = kept(6)  # samples per network call (the official script's batch: 6)
    degradation: str = kept("second-order")  # as `train sr --degradation`: the one the model was fine-tuned with
    seed: int = kept(0)
    device: str | None = None
    dtype: str = "float32"  # the networks' dtype on a GPU (float16/bfloat16); latents stay float32


def continued_generation(given: dict[str, Any]) -> GenerationOptions:
    """The options to generate into `given["out"]` with ({field: value}, each one given): a folder that holds
    a generation keeps its kept options from its record, so `out` and `count` alone continue it."""
    record = DataFolder(given["out"]).read_record()
    if record is not None:
        given = continued_options(record["options"], given, fields_that(GenerationOptions, KEPT))
    elif "weights" not in given or "data" not in given:
        raise UsageError("train cfw-data needs --weights FILE and --data DIR (or an --out folder it already "
                         "generated into, to continue it)")
    return GenerationOptions(**given)


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the nearest of the 256 levels a PNG stores (as `to_pil` rounds)."""
    return (image.clamp(0, 1) * 255).round() / 255


def check_sizes(opts: GenerationOptions, cfg) -> None:
    from .networks import gt_size_multiple

    check_option_ranges(opts, at_least_one=("count", "steps", "batch_size"))
    check_steps(cfg.diffusion.timesteps, opts.steps)
    multiple = gt_size_multiple(cfg, SCALE)
    if opts.gt_size < multiple or opts.gt_size % multiple:
        raise UsageError(f"--gt-size {opts.gt_size}: must be a multiple of {multiple} (whole latents at every "
                         "level of the networks)")
    if opts.gt_size == multiple and opts.batch_size == 1:
        raise UsageError(f"--gt-size {opts.gt_size} with --batch-size 1: the networks' smallest feature map is "
                         f"1x1, which their GroupNorm cannot normalise for one image; use --batch-size 2 or more, "
                         f"or --gt-size {2 * multiple}")


def generate(opts: GenerationOptions) -> None:
    """Generate into `opts.out` until it holds `opts.count` samples, in this one process (stopped, the same call
    continues it: `stopped_generation`)."""
    with one_process("train cfw-data"):
        write_samples(opts)


def stopped_generation(out: str, count: int) -> bool:
    """A generation into `out` of `count` samples stopped (Ctrl-C, SIGTERM) at any moment: say in one line what
    the folder holds and that the same command continues it; or, if it holds `count` samples already (the stop
    came after the last one), that the work is done. Whether it was left unfinished."""
    done = DataFolder(out).complete_count()
    if done >= count:
        print(f"train cfw-data: {out} holds the {count} samples asked for: the stop came after the last one, and "
              "the work is done", file=sys.stderr, flush=True)
        return False
    print(f"\ntrain cfw-data: stopped with {done} of {count} samples in {out}; the same command continues it",
          file=sys.stderr, flush=True)
    return True


def write_samples(opts: GenerationOptions) -> None:
    from ..model import check_sampling_weights, load_stablesr, resolve_config  # the models load only for generating
    from ..pipeline import StableSRPipeline, UpscaleOptions

    folder = DataFolder(opts.out)
    check_output_folder(folder.path, f"--out {folder.path}")
    refuse_another_kind(folder.path, "a `train cfw-data` folder")
    for data in map(Path, opts.data):
        if folder.path.resolve().is_relative_to(data.resolve()):
            raise UsageError(f"--out {folder.path}: is inside --data {data}, so its images would become training "
                             "photos when it continues; choose a folder outside the data")
    lock_folder(folder.path)  # one generation per folder at a time (released by the command on its way out)
    record = folder.read_record()
    if record is None and folder.indices():
        raise UsageError(f"--out {folder.path}: holds samples but no {GENERATION}; choose another folder")
    folder_options = persisting(opts)
    if record is not None:
        continued_options(record["options"], folder_options, folder_options)  # the folder's options must not change
    dropped: list[int] = record["dropped"] if record else []

    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    files = WeightFiles(opts.weights)
    check_sampling_weights(files)
    check_sizes(opts, resolve_config(files, None))
    # Pairs are drawn one at a time from per-sample seeds: no pool (queue_size 0), see the module docstring
    degradation = DegradationConfig(queue_size=0, order=ORDERS[opts.degradation])
    pairs = TrainingPairs(opts.data, opts.gt_size, 1, cfg=degradation, scale=SCALE)
    model = load_stablesr(opts.weights, dtype=dtype, device=device)
    pipeline = StableSRPipeline(model, cfw=None)  # sampling only: no decoder
    # The whole crop as one tile (weight 1 everywhere), the VAE untiled: the official plain sampling
    f = model.vae.downscale
    sampling = UpscaleOptions(scale=SCALE, steps=opts.steps, tile=opts.gt_size // f, overlap=0, vae_tile=0,
                              prompt="", tile_batch=opts.batch_size)
    tile_weights = torch.ones(sampling.tile, sampling.tile, dtype=torch.float64)
    latent_shape = (1, model.cfg.vae.embed_dim, sampling.tile, sampling.tile)
    first_seed = derive_seeds(opts.seed, ["samples"])["samples"]
    folder.write_record({"options": folder_options, "dropped": dropped})

    done = folder.complete_count()
    progress = GenerationProgress(opts.count, done)
    present = f"{done} of {opts.count} samples present" if done <= opts.count else \
        f"{done} samples present, the {opts.count} asked for among them"
    print(f"train cfw-data: {len(pairs.files)} images; {present}; "
          f"{opts.steps} steps at {opts.gt_size} px, batch {opts.batch_size}; {device}, {opts.dtype}",
          file=sys.stderr)
    # Samples go in fixed groups of batch_size consecutive indices, so that a continued generation computes
    # every group exactly as an uninterrupted one does.
    group = 0
    while done < opts.count:
        indices = range(group * opts.batch_size, (group + 1) * opts.batch_size)
        group += 1
        if all(folder.complete(i) or i in dropped for i in indices):
            continue
        inputs = [draw_inputs(pairs, latent_shape, opts.steps, first_seed + i) for i in indices]
        latents = sample_latents(pipeline, sampling, tile_weights, inputs)
        for i, (lr, gt, _), latent in zip(indices, inputs, latents):
            if done == opts.count or folder.complete(i) or i in dropped:
                continue
            if torch.isfinite(latent).all():
                folder.write(i, lr, gt, latent, model.cfg.diffusion.scale_factor)
                done += 1
            else:
                dropped.append(i)
                folder.write_record({"options": folder_options, "dropped": dropped})
            progress.update(done, len(dropped))
    print(f"wrote {folder.path}: {done} samples ({len(dropped)} dropped for a non-finite latent)")


def draw_inputs(pairs: TrainingPairs, latent_shape: tuple[int, ...], steps: int, seed: int):
    """Sample i's pair (from its data seed) and its sampling noises (from its sampling seed): lr (1, 3, h, w)
    and gt (1, 3, H, W) in [0, 1], rounded to 8 bits, and the Noises of one image."""
    from ..pipeline import Noises

    seeds = derive_seeds(seed, ["data", "sampling"])
    pairs.reseed(seeds["data"])
    lr, gt = (to_8bit(image) for image in pairs.next_batch())
    generator = torch.Generator().manual_seed(seeds["sampling"])
    vae, x_T = (torch.randn(latent_shape, generator=generator) for _ in range(2))
    return lr, gt, Noises(vae, x_T, [torch.randn(latent_shape, generator=generator) for _ in range(steps)])


def sample_latents(pipeline, sampling, tile_weights: torch.Tensor, inputs) -> torch.Tensor:
    """One batch through `sample_latent`, each image with its own noises -> latents (B, 1, 4, h, w), float32."""
    from ..pipeline import Noises

    lr = torch.cat([lr for lr, _, _ in inputs])
    noises = [n for _, _, n in inputs]

    def stack(draws: list[torch.Tensor]) -> torch.Tensor:  # drawn on the CPU, used on the device
        return torch.cat(draws).to(pipeline.device)

    batch = Noises(stack([n.vae for n in noises]), stack([n.x_T for n in noises]),
                   [stack(list(step)) for step in zip(*(n.steps for n in noises))])
    x0 = pipeline.sample_latent(lr * 2 - 1, sampling, noises=batch, weights=tile_weights).x0
    return x0.float().cpu().unsqueeze(1)


class GenerationProgress(ProgressLine):
    """samples written, dropped, seconds per sample and the time left, on one line."""

    def __init__(self, count: int, first: int):
        super().__init__("train cfw-data", count)
        self.first = first

    def update(self, done: int, dropped: int) -> None:
        made = done - self.first
        per_sample = (time.monotonic() - self.start) / made if made else math.inf
        eta = (self.steps - done) * per_sample
        if self.tty or done == self.steps or done % max(1, self.steps // 20) == 0:
            text = (f"sample {done}/{self.steps}, {dropped} dropped, {per_sample:.1f} s/sample, "
                    f"ETA {format_seconds(eta)}")
            self._write(text, end="\r" if self.tty and done < self.steps else "\n")


# ------------------------------------------------------------------------------------------------------
# Reading, for training


@dataclass
class Sample:
    lr: Path
    gt: Path
    latent: Path


def find_samples(folders: list[str | Path]) -> list[Sample]:
    """Every complete sample (a latent with its LR and GT) of the folders, in folder and index order; a folder
    given twice adds nothing (a note says so), as with photo folders."""
    if not folders:
        raise DataError("no CFW data folders given")
    samples, seen = [], set()
    for path in map(Path, folders):
        if not path.is_dir():
            raise DataError(f"{path}: no such folder (make one with `train cfw-data`)")
        if path.resolve() in seen:
            print(f"note: {path} was given more than once; its samples are used once", file=sys.stderr)
            continue
        seen.add(path.resolve())
        folder = DataFolder(path)
        indices = folder.indices()
        if not indices:
            raise DataError(f"{path}: holds no CFW training samples (latent/*.safetensors); make them with "
                            "`python -m stablesr_min train cfw-data`")
        for index in indices:
            for image in (folder.lr(index), folder.gt(index)):
                if not image.is_file():
                    raise DataError(f"{folder.latent(index)}: its image {image} is missing; remove the latent "
                                    "or generate the sample again")
            samples.append(Sample(folder.lr(index), folder.gt(index), folder.latent(index)))
    return samples


def height_width(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header."""
    try:
        w, h = image_size(path)
    except ImageError:
        raise DataError(f"{path}: not an image that can be read; generate the sample again or remove it") from None
    return h, w


def latent_header(path: Path) -> tuple[list[int], float]:
    """(shape, scale_factor) of a latent file, from its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shape = list(f.get_slice(LATENT_KEY).get_shape())
            return shape, float((f.metadata() or {})[SCALE_FACTOR_KEY])
    except Exception:  # safetensors raises its own error types for a bad file; a missing key or metadata too
        raise DataError(f"{path}: not a latent written by `train cfw-data` (a safetensors file with "
                        f"'{LATENT_KEY}' and {SCALE_FACTOR_KEY}); generate the sample again or remove it") from None


class CFWSamples:
    """Batches of (lr, gt, latent, scale_factor) from CFW data folders.

    The order is an endless run of epochs, each a permutation of all samples drawn from (seed, epoch): the
    batch at any point of a run follows from the number of samples used so far, which is all its state.
    Every sample is checked when the folders are opened: its latent must decode (x `factor`) to its GT's
    size, its LR must be the GT's size over a whole factor, and all samples must share one size (a batch).

    With `hue_rotation` p > 0, each use of a sample turns its LR and GT (not its latent) by one random angle
    about the grey axis (`data.hue_rotate`) with probability p, drawn with the epoch's order: the latent then
    carries the sampled colours and the LR the true ones, so the fusion layers learn to take colour from the
    LR. (Not in the official trainer: a tiny autoencoder trained on few photos moves other hues towards
    theirs, MODEL_CARD.md, Colour.)
    """

    def __init__(self, folders: list[str | Path], batch_size: int, seed: int, factor: int, latent_channels: int,
                 hue_rotation: float = 0.0):
        check_hue_rotation(hue_rotation)
        self.samples = find_samples(folders)
        self.batch_size, self.seed, self.hue_rotation = batch_size, seed, hue_rotation
        self.used = 0
        self._epoch, self._order, self._angles = -1, torch.empty(0, dtype=torch.int64), None
        self.gt_size = height_width(self.samples[0].gt)
        for sample in self.samples:
            self.check(sample, factor, latent_channels)

    def check(self, sample: Sample, factor: int, latent_channels: int) -> None:
        (h, w), (lr_h, lr_w) = height_width(sample.gt), height_width(sample.lr)
        shape, _ = latent_header(sample.latent)
        if shape != [1, latent_channels, h / factor, w / factor]:
            raise DataError(f"{sample.latent}: latent of shape {shape} does not match its GT {sample.gt} ({w}x{h}): "
                            f"the decoder needs (1, {latent_channels}, H/{factor}, W/{factor}); generate the sample "
                            "again with this model's weights, or remove it")
        if h % lr_h or w % lr_w or h // lr_h != w // lr_w:
            raise DataError(f"{sample.lr}: LR of {lr_w}x{lr_h} is not its GT {sample.gt} ({w}x{h}) over a whole "
                            "factor; generate the sample again, or remove it")
        if (h, w) != self.gt_size:
            raise DataError(f"{sample.gt}: {w}x{h}, but {self.samples[0].gt} is {self.gt_size[1]}x{self.gt_size[0]}; "
                            "train on samples of one size (made with one --gt-size)")

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the samples; with hue rotation, the angle (radians, 0: unturned) of each
        position, drawn after it from the same generator (so p = 0 leaves the orders as they were)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.samples), generator=generator)
            if self.hue_rotation > 0:
                turned = torch.rand(len(self.samples), generator=generator, dtype=torch.float64) < self.hue_rotation
                angles = torch.rand(len(self.samples), generator=generator, dtype=torch.float64) * 2 * math.pi
                self._angles = torch.where(turned, angles, 0.0)
        return self._order

    def load(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """lr (B, 3, h, w) and gt (B, 3, H, W) in [0, 1]; latent (B, 4, H/8, W/8) as stored (diffusion space);
        scale_factor (B, 1, 1, 1)."""
        samples = [self.samples[i] for i in indices]
        lr = torch.stack([read_rgb(s.lr) for s in samples])
        gt = torch.stack([read_rgb(s.gt) for s in samples])
        latent = torch.cat([load_file(str(s.latent))[LATENT_KEY].float() for s in samples])
        scale_factor = torch.tensor([latent_header(s.latent)[1] for s in samples]).view(-1, 1, 1, 1)
        return lr, gt, latent, scale_factor

    def position(self, i: int) -> tuple[int, float]:
        """The sample at the i-th use of the run, and its hue angle."""
        n = len(self.samples)
        order = self.order(i // n)
        return int(order[i % n]), (float(self._angles[i % n]) if self.hue_rotation > 0 else 0.0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        indices, angles = zip(*(self.position(i) for i in range(self.used, self.used + self.batch_size)))
        self.used += self.batch_size
        lr, gt, latent, scale_factor = self.load(list(indices))
        for b, angle in enumerate(angles):
            if angle:
                lr[b], gt[b] = hue_rotate(lr[b], angle), hue_rotate(gt[b], angle)
        return lr, gt, latent, scale_factor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"used": torch.tensor(self.used), "sample_count": torch.tensor(len(self.samples))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["sample_count"]) != len(self.samples):
            raise DataError(f"the saved training state saw {int(state['sample_count'])} samples, these folders "
                            f"hold {len(self.samples)}; resume with the same data")
        self.used = int(state["used"])
