"""The README's before/after figure: the Quick start's input, bicubic x4 and the tiny model's x4, side by side.

    python -m stablesr_min upscale examples/chelsea_128x96.png --out outputs      # the Quick start
    python scripts/quickstart_figure.py outputs/chelsea_128x96.png examples/quickstart_before_after.png

Left: the input enlarged 4x with nearest-neighbour pixels (what it really holds); middle: bicubic x4 (as the
pipeline upsamples before encoding); right: the output. Composes images only; computes no super-resolution.
It prints the hue of the cat's iris in each (`metrics.mean_hue` of a box of the left iris): whether the model
keeps its green-yellow or turns it amber, as a number.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablesr_min.app.metrics import mean_hue  # noqa: E402
from stablesr_min.image_io import save_png_atomically  # noqa: E402

INPUT = ROOT / "examples" / "chelsea_128x96.png"
LABEL_H = 18
IRIS = (32, 24, 42, 38)  # the left eye's iris, left of its pupil, in the input's pixels (x0, y0, x1, y1)


def iris_hue(image: Image.Image, zoom: int) -> float:
    """The hue, in degrees, of the iris box's mean colour in an image `zoom` times the input's size."""
    box = image.crop(tuple(zoom * v for v in IRIS))
    return mean_hue(torch.from_numpy(np.asarray(box, dtype=np.float64)).permute(2, 0, 1)[None]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upscaled", type=Path, help="the Quick start's output (outputs/chelsea_128x96.png)")
    parser.add_argument("figure", type=Path, help="the PNG to write")
    args = parser.parse_args()
    lr = Image.open(INPUT).convert("RGB")
    sr = Image.open(args.upscaled).convert("RGB")
    size = (lr.width * 4, lr.height * 4)
    if sr.size != size:
        sys.exit(f"{args.upscaled}: {sr.width}x{sr.height}, expected the 4x output of {INPUT.name}, {size[0]}x{size[1]}")
    panels = [(lr.resize(size, Image.NEAREST), "input 128x96 (nearest x4)"),
              (lr.resize(size, Image.BICUBIC), "bicubic x4"), (sr, "tiny StableSR x4 (the Quick start)")]
    figure = Image.new("RGB", (3 * size[0] + 8, size[1] + LABEL_H), "white")
    draw = ImageDraw.Draw(figure)
    for i, (image, label) in enumerate(panels):
        x = i * (size[0] + 4)
        figure.paste(image, (x, LABEL_H))
        draw.text((x + 4, 3), label, fill="black")
    save_png_atomically(figure, args.figure)
    print(f"wrote {args.figure}")
    hues = [f"{label.split(' (')[0]} {iris_hue(image, 4):.1f}" for image, label in panels]
    print(f"iris hue (degrees; 60 yellow, 120 green): {', '.join(hues)}")


if __name__ == "__main__":
    main()
