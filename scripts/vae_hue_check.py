"""How well VAEs keep colours their training photos lack: `analysis.hue_round_trip_error` of each VAE on 15 crops
(128 px, full resolution, three fixed places in each) of the five colour *training* photos, hues turned 0-300
degrees. 0 degrees (the photos' own colours) is the control; the held-out photos are not used, so a VAE recipe
can be chosen on this before anything is evaluated on them.

    python scripts/vae_hue_check.py runs/tiny/vae/last.safetensors runs/tiny4/vae/last.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stablesr_min.app.analysis import TRAINING, hue_round_trip_error  # noqa: E402
from stablesr_min.image_io import load_image  # noqa: E402
from stablesr_min.model import load_vae  # noqa: E402

COLOUR_PHOTOS = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "rocket.jpg"]  # 4 of 9 are grey
ANGLES = (0, 60, 120, 180, 240, 300)


def training_crops(size: int = 128) -> torch.Tensor:
    """(15, 3, size, size) in [0, 1]: crops of the colour training photos at a quarter, a half, and a third
    down / two thirds across."""
    crops = []
    for name in COLOUR_PHOTOS:
        image = (load_image(TRAINING / name).rgb + 1) / 2
        h, w = image.shape[-2:]
        for top, left in ((h // 4, w // 4), (h // 2, w // 2), (h // 3, 2 * w // 3)):
            crops.append(image[..., top:top + size, left:left + size])
    return torch.cat(crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vaes", nargs="+", help="VAE files (`train vae`'s last.safetensors)")
    args = parser.parse_args()
    crops = training_crops()
    print("| VAE | " + " | ".join(f"{a} deg" for a in ANGLES) + " | mean of the turned |")
    print("|---|" + "---|" * (len(ANGLES) + 1))
    for path in args.vaes:
        errors = hue_round_trip_error(load_vae(path).float().eval(), crops, ANGLES)
        turned = [errors[a] for a in ANGLES[1:]]
        print(f"| {path} | " + " | ".join(f"{errors[a]:.2f}" for a in ANGLES) + f" | {sum(turned) / len(turned):.2f} |")


if __name__ == "__main__":
    main()
