"""Reading photos into [-1, 1] tensors and writing results atomically.

Every PIL mode a photo comes in is accepted: RGB; grayscale (L, and 16-bit I;16 / I, scaled by its full
range), palette (P, expanded through its palette), CMYK/YCbCr (converted), and images with alpha (RGBA,
LA, P with transparency). The diffusion model sees RGB only: the alpha channel is set aside, upscaled on
its own with bicubic interpolation, and put back on the output, so transparency survives the upscale.

What the file holds but the model will not see is said in `LoadedImage.warnings`: a 16-bit colour PNG
(Pillow decodes it at 8 bits per channel; only 16-bit grayscale keeps its full precision) and the frames
after the first of an animated or multi-page image.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .atomic import atomic_write
from .errors import ImageError


@dataclass
class LoadedImage:
    rgb: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    alpha: torch.Tensor | None  # (1, 1, H, W) in [0, 1], or None
    mode: str  # the file's PIL mode, for messages
    warnings: list[str] = field(default_factory=list)  # what of the file is not used, one line each


def _to_float(image: Image.Image) -> np.ndarray:
    """PIL image -> float32 array in [0, 1], (H, W, C)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return (array / top).clip(0, 1)[..., None]
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32).clip(0, 1)[..., None]
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if image.mode == "L" else array


@contextmanager
def _open(path: Path):
    """The image at `path`, opened (header only) with every failure turned into one `ImageError` line.

    Pillow's decompression-bomb guard (a warning above ~89 megapixels, an error above ~179) is turned
    off here: it is an arbitrary pixel count, while the command line compares what an image really
    needs with the memory that is free, from the header (`image_size`), before anything is decoded.
    """
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            yield image
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read (PNG, JPEG, WebP, TIFF, BMP, ...)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read it ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with _open(Path(path)) as image:
        return image.size


def _is_16_bit_colour_png(path: Path) -> bool:
    """A PNG whose IHDR says 16 bits per sample and a colour type other than plain grayscale (0): Pillow
    has no 16-bit RGB mode and decodes these to 8 bits."""
    with open(path, "rb") as f:
        head = f.read(26)  # signature (8), chunk length (4), b"IHDR" (4), width, height (4 each), depth, type
    return head[12:16] == b"IHDR" and head[24] == 16 and head[25] != 0


def _unused_parts(image: Image.Image, path: Path) -> list[str]:
    notes = []
    if image.format == "PNG" and _is_16_bit_colour_png(path):
        notes.append("a 16-bit PNG with colour or alpha: Pillow reads it at 8 bits per channel, so the "
                     "extra precision is lost (only plain 16-bit grayscale is read at full precision)")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"has {frames} frames (animated or multi-page); only the first is upscaled")
    return notes


def load_image(path: str | os.PathLike) -> LoadedImage:
    path = Path(path)
    with _open(path) as image:
        notes = _unused_parts(image, path)  # before load(): counting frames seeks through them
        image.load()
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    alpha = None
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = _to_float(image.getchannel("A"))
        image = image.convert("RGB" if image.mode.startswith("RGB") else "L")
    if image.mode not in ("RGB", "L", "I;16", "I;16B", "I;16L", "I", "F"):
        image = image.convert("RGB")
    array = _to_float(image)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    # (H, W, C) in [0, 1] -> (1, C, H, W) in [-1, 1]
    rgb = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * 2 - 1
    alpha_t = torch.from_numpy(np.ascontiguousarray(alpha)).permute(2, 0, 1)[None] if alpha is not None else None
    return LoadedImage(rgb=rgb, alpha=alpha_t, mode=mode, warnings=notes)


def to_pil(image: torch.Tensor, alpha: torch.Tensor | None = None) -> Image.Image:
    """(1, 3, H, W) in [0, 1] (and an optional (1, 1, H, W) alpha) -> 8-bit RGB or RGBA PIL image."""
    channels = image if alpha is None else torch.cat([image, alpha], dim=1)
    array = (channels[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB" if alpha is None else "RGBA")


def save_png_atomically(image: Image.Image, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
