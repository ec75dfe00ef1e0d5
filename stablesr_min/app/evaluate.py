"""`python -m stablesr_min evaluate`: PSNR and SSIM of StableSR, beside bicubic, on degraded HR crops.

    python -m stablesr_min evaluate --hr photos/ --out eval/ --dec-w 0 0.5 1

For each HR photo: its centre crop (`--crop` pixels square), degraded by the fixed evaluation degradation
below into an LR image a quarter of the size, upscaled 4x by bicubic interpolation and by StableSR, and
both compared with the HR crop (`metrics.psnr`, `metrics.ssim`, on 8-bit RGB). The fusion weight w only
enters at the CFW decode, so all `--dec-w` values are finished from ONE sampled latent per image
(`StableSRPipeline.sample_latent`, then `finish` per w): the columns differ only by w, not by noise.
Writes DIR/metrics.json and DIR/metrics.md (and with `--save-images` the crops as PNGs).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write, check_output_folder
from ..colorfix import METHODS as COLORFIX_METHODS
from ..degradation import NoiseDraw, add_noise, filter2d, gaussian_kernel, jpeg, resize
from ..devices import DTYPES, pick_device, pick_dtype
from ..errors import UsageError
from ..image_io import load_image, save_png_atomically, to_pil
from ..progress import ProgressLine
from ..train.data import find_images
from . import metrics
from .settings import SAMPLING_OPTIONS, checked_config, choose_weights, sampling_settings

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
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top:top + size, left:left + size]


# ------------------------------------------------------------------------------------------------------
# Input checks, before any model is loaded


def check_crop(crop: int) -> None:
    if crop < CROP_MULTIPLE or crop % CROP_MULTIPLE:
        raise UsageError(f"--crop {crop}: must be a positive multiple of {CROP_MULTIPLE} (4x scale x 8 for the "
                         f"VAE), e.g. 256")


def read_hr_crops(folders: list[str], crop: int) -> dict[Path, torch.Tensor]:
    """Every image under the folders -> its centre crop, (1, 3, crop, crop) in [0, 1]."""
    crops, names = {}, {}
    for path in find_images(folders, what="HR"):
        if path.stem in names:
            raise UsageError(f"{path} and {names[path.stem]} have the same name; rename one of them "
                             "(rows and saved images are named by it)")
        names[path.stem] = path
        rgb = (load_image(path).rgb + 1) / 2
        h, w = rgb.shape[-2:]
        if min(h, w) < crop:
            raise UsageError(f"{path}: {w}x{h} is smaller than --crop {crop}; use a smaller --crop "
                             f"(a multiple of {CROP_MULTIPLE})")
        crops[path] = centre_crop(rgb, crop)
    return crops


def image_outputs(crops: dict[Path, torch.Tensor], out_dir: Path, labels: list[str]) -> dict[Path, dict[str, Path]]:
    """DIR/images/<name>_<label>.png for every image and label; refuses to overwrite an input."""
    outputs = {path: {label: out_dir / "images" / f"{path.stem}_{label}.png" for label in labels} for path in crops}
    inputs = {p.resolve() for p in crops}
    for files in outputs.values():
        for file in files.values():
            if file.resolve() in inputs:
                raise UsageError(f"{file}: writing it would overwrite an input; choose another --out folder")
    return outputs


# ------------------------------------------------------------------------------------------------------
# Results: one row per image, a mean row; written as JSON and as a Markdown table


def method_names(dec_ws: list[float]) -> list[str]:
    return ["bicubic"] + [f"StableSR w={w:g}" for w in dec_ws]


MEASURES = ("psnr", "ssim", "colour")


def score(result: torch.Tensor, hr: torch.Tensor, border: int) -> dict[str, float]:
    """PSNR and SSIM of a [0, 1] image against the HR crop (without `border` pixels at each edge), and the colour
    error (`metrics.lowpass_colour_error`, 16 px blocks of the whole crop), all on 8-bit levels."""
    a, b = metrics.to_levels(result), metrics.to_levels(hr)
    return {"psnr": metrics.psnr(a, b, border).item(), "ssim": metrics.ssim(a, b, border).item(),
            "colour": metrics.lowpass_colour_error(a, b).item()}


def mean_row(rows: list[dict], methods: list[str]) -> dict[str, dict[str, float]]:
    return {m: {k: metrics.mean([row["scores"][m][k] for row in rows]) for k in MEASURES} for m in methods}


def markdown_table(rows: list[dict], mean: dict, methods: list[str]) -> str:
    """PSNR in dB with 2 decimals, SSIM with 4, colour error in levels with 2; the last row is the mean over
    images."""
    header = ["image"] + [f"{m} {k}" for m in methods for k in ("PSNR", "SSIM", "colour")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(scores: dict) -> list[str]:
        return [f"{scores[m]['psnr']:.2f} | {scores[m]['ssim']:.4f} | {scores[m]['colour']:.2f}" for m in methods]

    for row in rows:
        lines.append("| " + " | ".join([row["name"], *cells(row["scores"])]) + " |")
    lines.append("| " + " | ".join([f"mean ({len(rows)} images)", *cells(mean)]) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------------
# The command


def load_pipeline(stablesr_paths, cfw_path, notice: str | None, args, device: torch.device, dtype: torch.dtype,
                  steps: int, tile: int):
    """The pipeline of the chosen weights (refusing more steps than their schedule has, or tiles too small
    for them), and the files' names for the report."""
    from ..model import load_cfw, load_stablesr
    from ..pipeline import StableSRPipeline

    cfg = checked_config(stablesr_paths, args.config, steps, tile)
    if notice:
        print(notice, file=sys.stderr)
    model = load_stablesr(stablesr_paths, cfg, dtype=dtype, device=device)
    cfw = load_cfw(cfw_path, args.config, dtype=dtype, device=device)
    files = {"weights": [str(p) for p in stablesr_paths], "cfw": str(cfw_path)}
    return StableSRPipeline(model, cfw), files


def run_evaluate(args) -> None:
    from ..pipeline import UpscaleOptions  # imported here so that `--help` stays fast

    check_crop(args.crop)
    if args.border < 0 or 2 * args.border >= args.crop - 10:
        raise UsageError(f"--border {args.border}: must be >= 0 and leave at least 11 pixels of the "
                         f"--crop {args.crop} for SSIM's window")
    degradation = EvalDegradation()
    crops = read_hr_crops(args.hr, args.crop)
    out_dir = Path(args.out)
    check_output_folder(out_dir)
    given = {name: getattr(args, name) for name in SAMPLING_OPTIONS
             if name != "dec_w" and getattr(args, name) is not None}
    try:  # the options given, checked before any weights file is opened
        for w in args.dec_w or []:
            UpscaleOptions(**given, dec_w=w)
    except ValueError as e:
        raise UsageError(str(e)) from None
    stablesr_paths, cfw_path, notice = choose_weights(args)
    sampling = sampling_settings(args, stablesr_paths)
    dec_ws = list(dict.fromkeys(args.dec_w or [sampling["dec_w"]]))  # each w once, in the order given
    methods = method_names(dec_ws)
    saved = image_outputs(crops, out_dir, ["hr", "lr", "bicubic"] + [f"sr_w{w:g}" for w in dec_ws])
    try:
        opts = [UpscaleOptions(scale=degradation.scale, **{**sampling, "dec_w": w}) for w in dec_ws]
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    steps = sampling["steps"]
    pipeline, weights = load_pipeline(stablesr_paths, cfw_path, notice, args, device, dtype, steps,
                                      sampling["tile"])

    rows = []
    for i, (path, hr) in enumerate(crops.items(), 1):
        name = f"[{i}/{len(crops)}] {path.name}"
        lr, results = upscale_both_ways(pipeline, hr, opts, methods, degradation, args.seed,
                                        ProgressLine(name, steps))
        scores = {m: score(image, hr, args.border) for m, image in results.items()}
        rows.append({"name": path.name, "path": str(path), "scores": scores})
        summary = ", ".join(f"{m} {s['psnr']:.2f} dB {s['ssim']:.4f} {s['colour']:.2f}" for m, s in scores.items())
        print(f"{name}: {summary}", file=sys.stderr, flush=True)
        if args.save_images:
            (out_dir / "images").mkdir(parents=True, exist_ok=True)
            for file, image in zip(saved[path].values(), [hr, lr, *results.values()]):
                save_png_atomically(to_pil(image), file)

    settings = {"crop": args.crop, "border": args.border, **sampling, "seed": args.seed, "dec_w": dec_ws,
                "device": str(device), "dtype": args.dtype, **weights}
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
    """DIR/metrics.json (everything, full precision) and DIR/metrics.md (the table), atomically; the
    table also on stdout."""
    mean = mean_row(rows, methods)
    table = markdown_table(rows, mean, methods)
    report = {"metric": "PSNR (dB), SSIM and colour error (levels: the mean |difference| of 16 px block means) "
                        "against the HR crop, on 8-bit RGB levels (metrics.py)",
              "degradation": {"description": degradation.describe(), **asdict(degradation)},
              "settings": settings, "methods": methods, "images": rows, "mean": mean}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
    heading = (f"PSNR (dB) / SSIM / colour error (levels) against {settings['crop']}x{settings['crop']} HR centre crops; LR: "
               f"{degradation.describe()}; {settings['steps']} {settings['sampler']} steps, colour fix "
               f"{settings['colorfix']}, seed {settings['seed']}.\n\n")
    write_text(out_dir / "metrics.md", heading + table)
    print(table, end="")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}", file=sys.stderr)


def add_evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="PSNR/SSIM of StableSR vs bicubic on degraded HR crops",
                        description="Centre-crop HR photos, degrade them with a fixed, seeded degradation "
                                    f"({EvalDegradation().describe()}), upscale 4x with StableSR and with "
                                    "bicubic, and tabulate PSNR and SSIM against the HR crops.")
    ev.add_argument("--hr", nargs="+", required=True, metavar="DIR", help="folders of HR photos (searched recursively)")
    ev.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, metrics.md (and images/)")
    ev.add_argument("--crop", type=int, default=256, help=f"HR centre crop side in pixels, a multiple of {CROP_MULTIPLE} (default 256)")
    ev.add_argument("--border", type=int, default=0, help="pixels left out at every edge by PSNR and SSIM (default 0)")
    ev.add_argument("--weights", nargs="+", metavar="FILE", help="StableSR .safetensors (default: as upscale)")
    ev.add_argument("--cfw", metavar="FILE", help="CFW .safetensors")
    ev.add_argument("--config", metavar="JSON", help="model config (files written by this project carry it)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: as upscale, the weights' own or 200)")
    ev.add_argument("--sampler", choices=["ddpm", "ddim"], help="ddpm or ddim (default: as upscale)")
    ev.add_argument("--dec-w", type=float, nargs="+", metavar="W",
                    help="CFW weights w in [0, 1], each a column, all from one sampled latent (default: as upscale)")
    ev.add_argument("--colorfix", choices=COLORFIX_METHODS, help="colour correction (default: as upscale)")
    ev.add_argument("--tile", type=int, help="latent tile of aggregation sampling (default: as upscale)")
    ev.add_argument("--overlap", type=int, help="latent overlap of tiles (default: as upscale)")
    ev.add_argument("--seed", type=int, default=42, help="sampling seed, the same for every image (default 42)")
    ev.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    ev.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (GPU: float16/bfloat16)")
    ev.add_argument("--save-images", action="store_true", help="also write DIR/images/<name>_{hr,lr,bicubic,sr_wW}.png")
    ev.set_defaults(run=run_evaluate)
