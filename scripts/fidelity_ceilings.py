"""Where a model's fidelity is lost: PSNR and colour error of the held-out evaluation when the sampled latent is
swapped for the LR image's own latent or the HR crop's, each decoded by CFW at w = 0 and w = 1.

    python scripts/fidelity_ceilings.py                      # the shipped tiny model, data/heldout
    python scripts/fidelity_ceilings.py --weights A B --cfw C --hr DIR

Same crops, degradation, seed and sampling settings as `python -m stablesr_min evaluate` (the weights' own
defaults). Rows: `sampled` is what the model outputs; `LR latent` is z_0 (the posterior mean of the
upsampled LR image), no diffusion at all; `HR latent` is the HR crop's posterior mean, the best latent the
VAE allows. If `HR latent` at w = 1 is far below `HR latent` at w = 0, the CFW fusion layers, not the
sampled latent, limit fidelity at w = 1. Colour: `HR latent` at w = 0 is the autoencoder's own colour error (if it is
above bicubic's, the VAE makes the cast); at w = 1 it is the floor CFW's fusion leaves. MODEL_CARD.md quotes this for the
shipped model.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stablesr_min.app.evaluate import EvalDegradation, evaluation_lr, read_hr_crops, score  # noqa: E402
from stablesr_min.app.settings import sampling_settings  # noqa: E402
from stablesr_min.model import load_cfw, load_stablesr  # noqa: E402
from stablesr_min.pipeline import Sampled, StableSRPipeline, UpscaleOptions  # noqa: E402
from stablesr_min.tiny import find_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hr", default=str(ROOT / "data" / "heldout"), help="folder of HR photos")
    parser.add_argument("--weights", nargs="+", help="StableSR files (default: the shipped tiny model)")
    parser.add_argument("--cfw", help="CFW file (with --weights)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.weights and not args.cfw:
        parser.error("--weights needs --cfw")
    if args.weights:
        stablesr_paths, cfw_path = args.weights, args.cfw
    else:
        shipped = find_weights(shipped=True)
        stablesr_paths, cfw_path = shipped.stablesr, shipped.cfw
    degradation = EvalDegradation()
    # none given on a command line: the weights' own sampling settings, else the paper's (as `evaluate`)
    opts = UpscaleOptions(scale=degradation.scale,
                          **sampling_settings(stablesr_paths))
    pipe = StableSRPipeline(load_stablesr(stablesr_paths), load_cfw(cfw_path))
    rows: dict[str, list[dict[str, float]]] = {}
    with torch.inference_mode():
        for crop in read_hr_crops([args.hr], args.crop):
            hr = crop.hr
            lr = evaluation_lr(hr, degradation)
            sampled = pipe.sample_latent(lr * 2 - 1, opts, generator=torch.Generator().manual_seed(args.seed))
            latents = {"sampled": sampled.x0,  # and the posteriors' means:
                       "LR latent": pipe.encode(sampled.canvas, opts, mean=True),
                       # the HR crop has the canvas's size: --crop is a multiple of 32
                       "HR latent": pipe.encode(hr * 2 - 1, opts, mean=True)}
            rows.setdefault("bicubic", []).append(score((sampled.upsampled + 1) / 2, hr, 0))
            for name, latent in latents.items():
                for w in (0.0, 1.0):
                    image = pipe.finish(Sampled(sampled.upsampled, sampled.canvas, latent), dataclasses.replace(opts, dec_w=w))
                    rows.setdefault(f"{name}, w = {w:g}", []).append(score(image, hr, 0))
            print(f"{crop.name}: done", file=sys.stderr)
    print(f"mean over {len(rows['bicubic'])} crops (per crop in brackets); colour fix {opts.colorfix}, {opts.steps} "
          f"{opts.sampler} steps")
    for key, unit in (("psnr", "PSNR (dB)"), ("colour", "colour error (levels)")):
        print(unit)
        for name, scores in rows.items():
            values = [s[key] for s in scores]
            print(f"  {name:20s} {sum(values) / len(values):6.2f}   ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
