"""`python -m stablesr_min evaluate`: PSNR, SSIM, colour error and a realism axis of StableSR beside bicubic, on
degraded HR crops, over several sampling seeds, with a verdict per measure.

    python -m stablesr_min evaluate --hr photos/ --out eval/ --crop 128 --grid 2 --seed 0 1 2 3 4

For each HR photo: `--grid` x `--grid` crops of `--crop` pixels, one centred in each cell of a grid over the
photo (`grid_crops`; grid 1 is the centre crop), each degraded by the fixed evaluation degradation below into
an LR image a quarter of the size, upscaled 4x by bicubic interpolation and by StableSR once per `--seed`, and
compared with the HR crop (`score`: `metrics.psnr`, `metrics.ssim`, `metrics.lowpass_colour_error`,
`metrics.highfreq_spectrum_distance`, on 8-bit RGB). The fusion weight w only enters at the CFW decode, so all `--dec-w` values are finished from ONE sampled
latent per crop and seed (`StableSRPipeline.sample_latent`, then `finish` per w): the columns differ only by w.

The summary gives, per method and measure, the mean over crops and seeds, the standard deviation over seeds
(of the mean over crops), and the paired difference to bicubic (same crop) with the verdict of
`metrics.paired_verdict`: its standard error is taken over photos, since crops of one photo are not
independent (docs/evaluation.md states the rule). Writes DIR/metrics.json and DIR/metrics.md (and with
`--save-images` the crops as PNGs).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write, check_output_folder
from ..degradation import NoiseDraw, add_noise, filter2d, gaussian_kernel, jpeg, resize
from ..devices import pick_device, pick_dtype
from ..errors import UsageError
from ..image_io import load_image, save_png_atomically, to_pil
from ..progress import ProgressLine
from ..train.data import find_images
from . import metrics
from .settings import (SAMPLING_OPTIONS, check_not_an_input, checked_config, choose_weights, given_values,
                       load_pipeline, sampling_settings)

CROP_MULTIPLE = 32  # HR crop sides: a multiple of 4 (the scale) x 8 (the VAE), so the LR and SR latents are whole


@dataclass(frozen=True)
class EvalDegradation:
    """The evaluation degradation: Real-ESRGAN's classical model (Eq. 1, `degradation.py`),
    x = [(y ⊛ k)↓4 + n]_JPEG, once, with fixed settings instead of random draws, so every run and every
    model sees the same LR images. Milder than the training degradation's middle, so bicubic is a fair
    baseline and the numbers move with the model rather than with the draw."""

    blur_sigma: float = 1.2  # k: an isotropic Gaussian of this sigma (HR pixels) ...
    kernel_size: int = 13  # ... on a 13 x 13 grid (beyond 5 sigma), reflect-padded as in training
    scale: int = 4  # ↓4: bicubic (PyTorch's, align_corners False, no antialiasing, as in training)
    noise_sigma: float = 5.0  # n: Gaussian, one noise per channel, sigma on the 0..255 scale, clipped to [0, 1]
    jpeg_quality: int = 75  # [·]_JPEG: Pillow's (libjpeg) encoder at this quality, 4:2:0, then decoded
    seed: int = 0  # the noise's generator is seeded with this for every image, so an image's LR never
    #                depends on which other images are evaluated

    def describe(self) -> str:
        return (f"Gaussian blur sigma {self.blur_sigma:g} ({self.kernel_size}x{self.kernel_size}), bicubic "
                f"/{self.scale}, Gaussian noise sigma {self.noise_sigma:g}/255 (seed {self.seed}), "
                f"JPEG quality {self.jpeg_quality}")


def evaluation_lr(hr: torch.Tensor, cfg: EvalDegradation = EvalDegradation()) -> torch.Tensor:
    """(B, 3, H, W) HR in [0, 1] -> (B, 3, H/scale, W/scale) LR in [0, 1] (8-bit values: JPEG's output)."""
    h, w = hr.shape[-2:]
    batch = hr.shape[0]
    # y ⊛ k
    out = filter2d(hr, gaussian_kernel(cfg.kernel_size, cfg.blur_sigma, cfg.blur_sigma, 0.0))
    # ↓4
    out = resize(out, "bicubic", size=(h // cfg.scale, w // cfg.scale))
    # + n
    noise = NoiseDraw("gaussian", torch.full((batch,), cfg.noise_sigma), torch.zeros(batch, dtype=torch.bool))
    out = add_noise(out, noise, torch.Generator().manual_seed(cfg.seed))
    # [·]_JPEG
    return jpeg(out, torch.full((batch,), float(cfg.jpeg_quality)))


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The size x size square in the middle of an image (the extra pixel, if any, goes to the bottom/right)."""
    return grid_crops(image, size, 1)[0]


def grid_crops(image: torch.Tensor, size: int, grid: int) -> list[torch.Tensor]:
    """grid x grid squares of size x size, row by row: the one of row r, column c centred in that cell of a grid
    of equal cells over the image (rounded down; clamped inside it when a cell is smaller than the square)."""
    h, w = image.shape[-2:]

    def start(i: int, length: int) -> int:
        return min(max(((2 * i + 1) * length - grid * size) // (2 * grid), 0), length - size)

    return [image[..., start(r, h):start(r, h) + size, start(c, w):start(c, w) + size]
            for r in range(grid) for c in range(grid)]


@dataclass
class HRCrop:
    name: str  # the photo's file name, and with --grid above 1 its cell: "kodim03.png#2"
    photo: str  # the photo's path
    hr: torch.Tensor  # (1, 3, crop, crop) in [0, 1]


# ------------------------------------------------------------------------------------------------------
# Input checks, before any model is loaded


def check_crop(crop: int) -> None:
    if crop < CROP_MULTIPLE or crop % CROP_MULTIPLE:
        raise UsageError(f"--crop {crop}: must be a positive multiple of {CROP_MULTIPLE} (4x scale x 8 for the "
                         f"VAE), e.g. 256")


def check_grid(grid: int) -> None:
    if grid < 1:
        raise UsageError(f"--grid {grid}: must be >= 1 (crops per photo: its square)")


def read_hr_crops(folders: list[str], crop: int, grid: int = 1) -> list[HRCrop]:
    """Every image under the folders -> its grid x grid crops (`grid_crops`), in file order."""
    crops, names = [], {}
    for path in find_images(folders, what="HR"):
        if path.stem in names:
            raise UsageError(f"{path} and {names[path.stem]} have the same name; rename one of them "
                             "(rows and saved images are named by it)")
        names[path.stem] = path
        rgb = (load_image(path).rgb + 1) / 2
        h, w = rgb.shape[-2:]
        if min(h, w) < crop:
            fits = min(h, w) // CROP_MULTIPLE * CROP_MULTIPLE
            advice = (f"use --crop {fits} or less" if fits else
                      f"the smallest --crop is {CROP_MULTIPLE}: take this photo out of --hr")
            raise UsageError(f"{path}: {w}x{h} is smaller than --crop {crop}; {advice}")
        for cell, hr in enumerate(grid_crops(rgb, crop, grid)):
            crops.append(HRCrop(path.name if grid == 1 else f"{path.name}#{cell}", str(path), hr))
    return crops


def image_outputs(crops: list[HRCrop], out_dir: Path, labels: list[str]) -> dict[str, dict[str, Path]]:
    """DIR/images/<crop>_<label>.png for every crop and label; refuses to overwrite an input."""
    outputs = {c.name: {label: out_dir / "images" / f"{file_stem(c.name)}_{label}.png" for label in labels}
               for c in crops}
    inputs = {Path(c.photo) for c in crops}
    for files in outputs.values():
        for file in files.values():
            check_not_an_input(file, inputs)
    return outputs


def file_stem(crop_name: str) -> str:
    """"kodim03.png#2" -> "kodim03_2"; "chelsea.png" -> "chelsea"."""
    photo, _, cell = crop_name.partition("#")
    return Path(photo).stem + (f"_{cell}" if cell else "")


# ------------------------------------------------------------------------------------------------------
# Results: one row per crop (a value per seed), a summary per method and measure; written as JSON and Markdown


def method_names(dec_ws: list[float]) -> list[str]:
    return ["bicubic"] + [f"StableSR w={w:g}" for w in dec_ws]


MEASURES = ("psnr", "ssim", "colour", "spectrum")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "colour": False, "spectrum": False}
UNITS = {"psnr": ("PSNR (dB)", 2), "ssim": ("SSIM", 4), "colour": ("colour error (levels)", 2),
         "spectrum": ("spectrum distance (log10)", 3)}  # name, decimals


def score(result: torch.Tensor, hr: torch.Tensor, border: int) -> dict[str, float]:
    """PSNR and SSIM of a [0, 1] image against the HR crop (without `border` pixels at each edge), the colour
    error (`metrics.lowpass_colour_error`, 16 px blocks of the whole crop) and the realism axis of notebook 03
    (`metrics.highfreq_spectrum_distance`: how far its high-frequency power is from the HR crop's, whole crop),
    all on 8-bit levels."""
    a, b = metrics.to_levels(result), metrics.to_levels(hr)
    return {"psnr": metrics.psnr(a, b, border).item(), "ssim": metrics.ssim(a, b, border).item(),
            "colour": metrics.lowpass_colour_error(a, b).item(),
            "spectrum": metrics.highfreq_spectrum_distance(a, b).item()}


def mean_row(rows: list[dict], methods: list[str]) -> dict[str, dict[str, float]]:
    """The mean over rows (crops) and their values (one per seed) of each method's measures."""
    return {m: {k: metrics.mean([x for row in rows for x in row["scores"][m][k]]) for k in MEASURES} for m in methods}


def photo_means(rows: list[dict], differences: list[list[float]]) -> list[float]:
    """Paired differences grouped by photo, the unit of `metrics.paired_verdict`: one mean per photo (in the rows'
    order) of the differences of its rows (row i's: `differences[i]`, one per seed)."""
    photos = list(dict.fromkeys(row["photo"] for row in rows))
    return [metrics.mean([d for row, ds in zip(rows, differences) if row["photo"] == p for d in ds]) for p in photos]


def summarise(rows: list[dict], methods: list[str], n_seeds: int) -> dict[str, dict[str, dict]]:
    """{method: {measure: {"mean", "seed_sd", and for StableSR "vs_bicubic": metrics.paired_verdict(...)}}}.
    Each row's StableSR scores hold one value per seed, bicubic's one value (it draws no noise)."""
    out = {}
    for m in methods:
        out[m] = {}
        for k in MEASURES:
            per_seed = [metrics.mean([row["scores"][m][k][min(s, len(row["scores"][m][k]) - 1)] for row in rows])
                        for s in range(n_seeds)]
            noisy = m != "bicubic" and n_seeds > 1
            entry = {"mean": metrics.mean(per_seed), "seed_sd": metrics.sample_sd(per_seed) if noisy else None}
            if m != "bicubic":
                # paired: each crop and seed against bicubic on the same crop
                differences = [[x - row["scores"]["bicubic"][k][0] for x in row["scores"][m][k]] for row in rows]
                entry["vs_bicubic"] = metrics.paired_verdict(photo_means(rows, differences), HIGHER_IS_BETTER[k])
            out[m][k] = entry
    return out


def summary_table(summary: dict, methods: list[str]) -> str:
    """One row per measure and method: mean, sd over seeds, difference to bicubic +- 2 standard errors, verdict."""
    lines = ["| measure | method | mean | sd over seeds | difference to bicubic (+- 2 se over photos) | verdict |",
             "|---|---|---|---|---|---|"]
    for k in MEASURES:
        name, digits = UNITS[k]
        for m in methods:
            e = summary[m][k]
            sd = "-" if e["seed_sd"] is None else f"{e['seed_sd']:.{digits}f}"
            v = e.get("vs_bicubic")
            diff = "-" if v is None else f"{v['mean']:+.{digits}f}" + (
                "" if v["se"] is None else f" +- {2 * v['se']:.{digits}f}")
            lines.append(f"| {name} | {m} | {e['mean']:.{digits}f} | {sd} | {diff} | {v['verdict'] if v else '-'} |")
    return "\n".join(lines) + "\n"


def photo_table(rows: list[dict], methods: list[str]) -> str:
    """Per photo, each method's measures: the mean over its crops and seeds."""
    header = ["photo"] + [f"{m} {UNITS[k][0].split(' (')[0]}" for m in methods for k in MEASURES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    photos = list(dict.fromkeys(row["photo"] for row in rows))
    for photo in photos:
        mean = mean_row([row for row in rows if row["photo"] == photo], methods)
        cells = [f"{mean[m][k]:.{UNITS[k][1]}f}" for m in methods for k in MEASURES]
        lines.append("| " + " | ".join([Path(photo).name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------------
# The command


def run_evaluate(args) -> None:
    from ..pipeline import UpscaleOptions  # imported here so that `--help` stays fast

    check_crop(args.crop)
    check_grid(args.grid)
    if args.border < 0 or 2 * args.border >= args.crop - 10:
        raise UsageError(f"--border {args.border}: must be >= 0 and leave at least 11 pixels of the "
                         f"--crop {args.crop} for SSIM's window")
    degradation = EvalDegradation()
    crops = read_hr_crops(args.hr, args.crop, args.grid)
    out_dir = Path(args.out)
    check_output_folder(out_dir, f"--out {out_dir}")
    for hr in map(Path, args.hr):
        if out_dir.resolve().is_relative_to(hr.resolve()):
            raise UsageError(f"--out {out_dir}: is inside --hr {hr}, so its saved images would be read as HR photos "
                             "by the next run; choose a folder outside the HR photos")
    given = given_values(args, SAMPLING_OPTIONS)
    for w in args.dec_w or []:  # the options given, checked before any weights file is opened
        UpscaleOptions(**{**given, "dec_w": w})
    stablesr_paths, cfw_path, notice = choose_weights(args.weights, args.cfw)
    sampling = sampling_settings(stablesr_paths, given)
    dec_ws = list(dict.fromkeys(args.dec_w or [sampling["dec_w"]]))  # each w once, in the order given
    seeds = list(dict.fromkeys(args.seed))
    methods = method_names(dec_ws)
    seed_labels = [""] if len(seeds) == 1 else [f"_seed{seed}" for seed in seeds]
    saved = image_outputs(crops, out_dir, ["hr", "lr", "bicubic"] +
                          [f"sr_w{w:g}{label}" for label in seed_labels for w in dec_ws])
    opts = [UpscaleOptions(scale=degradation.scale, **{**sampling, "dec_w": w}) for w in dec_ws]
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    steps = sampling["steps"]
    cfg = checked_config(stablesr_paths, args.config, steps, sampling["tile"])
    pipeline = load_pipeline(stablesr_paths, cfw_path, cfg, args.config, notice, device, dtype)
    weights = {"weights": [str(p) for p in stablesr_paths], "cfw": str(cfw_path)}

    rows = []
    for i, crop in enumerate(crops, 1):
        name = f"[{i}/{len(crops)}] {crop.name}"
        runs = []  # per seed: (lr, {method: image})
        for seed in seeds:
            label = name if len(seeds) == 1 else f"{name} seed {seed}"
            runs.append(upscale_both_ways(pipeline, crop.hr, opts, methods, degradation, seed,
                                          ProgressLine(label, steps)))
        per_seed = [{m: score(image, crop.hr, args.border) for m, image in results.items()} for _, results in runs]
        # bicubic draws no noise: one value; StableSR one per seed
        scores = {m: {k: [s[m][k] for s in (per_seed[:1] if m == "bicubic" else per_seed)] for k in MEASURES}
                  for m in methods}
        rows.append({"name": crop.name, "photo": crop.photo, "scores": scores})
        summary = ", ".join(f"{m} {metrics.mean(s['psnr']):.2f} dB {metrics.mean(s['ssim']):.4f} "
                            f"{metrics.mean(s['colour']):.2f}" for m, s in scores.items())
        print(f"{name}: {summary}", file=sys.stderr, flush=True)
        if args.save_images:
            (out_dir / "images").mkdir(parents=True, exist_ok=True)
            lr, first = runs[0]
            images = [crop.hr, lr, first["bicubic"]] + [results[m] for _, results in runs for m in methods[1:]]
            for file, image in zip(saved[crop.name].values(), images):
                save_png_atomically(to_pil(image), file)

    settings = {"crop": args.crop, "grid": args.grid, "border": args.border, **sampling, "seeds": seeds,
                "dec_w": dec_ws, "device": str(device), "dtype": args.dtype, **weights}
    write_report(out_dir, rows, methods, settings, degradation)


def upscale_both_ways(pipeline, hr: torch.Tensor, opts: list, methods: list[str], degradation: EvalDegradation,
                      seed: int, progress: ProgressLine | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The HR crop's LR, and from it bicubic and StableSR at every w (one sampled latent): each method's
    image, all in [0, 1]. `methods` names bicubic, then one method per entry of `opts`."""
    from ..pipeline import upsample

    lr = evaluation_lr(hr, degradation)
    results = {methods[0]: (upsample(lr * 2 - 1, degradation.scale) + 1) / 2}
    sampled = pipeline.sample_latent(lr * 2 - 1, opts[0], generator=torch.Generator().manual_seed(seed),
                                     progress=progress and progress.tiles, on_step=progress and progress.step_done)
    for method, o in zip(methods[1:], opts):
        results[method] = pipeline.finish(sampled, o).float().cpu()
    return lr, results


def write_report(out_dir: Path, rows: list[dict], methods: list[str], settings: dict,
                 degradation: EvalDegradation) -> None:
    """DIR/metrics.json (everything, full precision) and DIR/metrics.md (the tables), atomically; the
    summary table also on stdout."""
    summary = summarise(rows, methods, len(settings["seeds"]))
    table = summary_table(summary, methods)
    n_photos = len({row["photo"] for row in rows})
    report = {"metric": "PSNR (dB), SSIM and colour error (levels: the mean |difference| of 16 px block means) "
                        "against the HR crop, on 8-bit RGB levels (metrics.py)",
              "rule": metrics.VERDICT_RULE,
              "degradation": {"description": degradation.describe(), **asdict(degradation)},
              "settings": settings, "methods": methods, "crops": rows, "summary": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
    seeds = ", ".join(map(str, settings["seeds"]))
    heading = (f"{len(rows)} HR crops of {settings['crop']}x{settings['crop']} ({settings['grid']}x{settings['grid']} "
               f"per photo, {n_photos} photos); LR: {degradation.describe()}; {settings['steps']} "
               f"{settings['sampler']} steps, colour fix {settings['colorfix']}, seeds {seeds}.\n"
               f"Verdict: {metrics.VERDICT_RULE}\n\n")
    write_text(out_dir / "metrics.md", heading + table + "\nPer photo (mean over its crops and seeds):\n\n"
               + photo_table(rows, methods))
    print(table, end="")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}", file=sys.stderr)
