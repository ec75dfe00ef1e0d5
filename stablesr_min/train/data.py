"""Training data: HR crops from folders of photos, degraded on the fly into (LR, GT) batches (`TrainingPairs`),
or clean crops for training the diffusion prior (`CleanCrops`).

As basicsr's `RealESRGANDataset` (StableSR's training set) and StableSR's `get_input`:
  1. each image of a batch: a horizontal flip (and, with `use_rot`, a vertical flip and a transpose),
     reflect-padded at the bottom/right up to the crop size if smaller (OpenCV's BORDER_REFLECT_101),
     a random crop, and its three kernels (`degradation.draw_image_kernels`);
  2. the batch: USM-sharpened (the target), degraded (`degradation.degrade`), cropped to gt_size in pairs,
     with probability no_degradation_prob kept clean, then passed through the training pair pool.
Everything random comes from one seeded `torch.Generator`; `state_dict()` holds all there is to continue
bit-identically: the generator, the epoch's file order and position, and the pool's pairs.

The official dataset silently swaps an image of fewer than 384 x 384 pixels or under 100 KiB for a random
other one; here every image found is used (small ones padded) unless `skip_small` leaves them out
(`train sr --skip-small`), and an unreadable one is an error.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import torch

from ..degradation import (DegradationConfig, PairPool, chance, clean_lr, degrade, draw_image_kernels,
                           paired_random_crop, uniform, usm_sharpen)
from ..errors import DataError, ImageError, OptionError
from ..image_io import image_size, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def find_images(folders: list[str | os.PathLike], what: str = "training") -> list[Path]:
    """Every image file under the folders (recursively, by suffix), sorted within each folder, each file once
    (a folder given twice, or inside another one given, adds nothing: a note says so); `what` kind of
    images they are, for messages."""
    if not folders:
        raise DataError(f"no {what} folders given")
    files, seen, repeated = [], set(), 0
    for folder in map(Path, folders):
        if not folder.exists():
            raise DataError(f"{folder}: no such folder")
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder (give folders of {what} images)")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}, in it or its subfolders)")
        for path in found:
            if path.resolve() in seen:
                repeated += 1
            else:
                seen.add(path.resolve())
                files.append(path)
    if repeated:
        print(f"note: {repeated} image(s) found through more than one of the folders given; each is used once",
              file=sys.stderr)
    return files


# The official dataset's quality filter (StableSR's RealESRGANDataset: `h * w < 384*384 or size_kb < 100`)
SMALL_AREA = 384 * 384  # pixels
SMALL_KIB = 100  # file size in KiB


def is_small(path: Path) -> bool:
    """Whether the official dataset would skip this photo: fewer pixels than 384 x 384, or under 100 KiB."""
    w, h = image_size(path)
    return w * h < SMALL_AREA or path.stat().st_size / 1024 < SMALL_KIB


# A training photo is decoded whole before it is cropped: this bounds the memory one photo takes (about 0.8 GB as
# float32 RGB at the limit). DIV8K's largest photos (8192 x 5464) fit.
MAX_SIDE = 8192  # pixels: the largest crop, and the side of the largest square photo
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def check_readable(path: Path) -> None:
    """Open the file's header (cheap): a file that is no image, or one too large to decode (MAX_PIXELS), fails
    before training starts (`image_io` itself has no decompression-bomb limit)."""
    try:
        w, h = image_size(path)
    except ImageError:
        raise DataError(f"{path}: not an image that can be read; fix or remove it") from None
    if w * h > MAX_PIXELS:
        raise DataError(f"{path}: {w}x{h} is more pixels than a training photo may have ({MAX_SIDE}x{MAX_SIDE}: each "
                        "is decoded whole before it is cropped); downscale it or cut it into tiles")


def check_crop_size(size: int, flag: str) -> None:
    """A crop of 1 to MAX_SIDE pixels a side (larger ones are padding, and their batch alone would not fit)."""
    if not 1 <= size <= MAX_SIDE:
        raise DataError(f"{flag} {size}: must be 1 to {MAX_SIDE} pixels (the largest a training photo's side may be)")


def read_rgb(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: grey repeated to RGB, 16-bit scaled by its range, alpha dropped."""
    try:
        image = load_image(path)
    except ImageError as e:
        raise DataError(f"{e}; fix or remove it") from None
    return (image.rgb[0] + 1) / 2


def augment(img: torch.Tensor, gen: torch.Generator, hflip: bool, rot: bool) -> torch.Tensor:
    """basicsr's `augment`: a horizontal flip, then (rotations) a vertical flip and a transpose, each
    with probability 1/2."""
    if hflip and chance(gen, 0.5):
        img = img.flip(-1)
    if rot and chance(gen, 0.5):
        img = img.flip(-2)
    if rot and chance(gen, 0.5):
        img = img.transpose(-2, -1)
    return img


def check_hue_rotation(p: float) -> None:
    """The probability of turning a sample's hues (CleanCrops, CFWSamples; the option `hue_rotation`)."""
    if not 0 <= p <= 1:
        raise OptionError("hue_rotation", f"must be a probability in [0, 1], got {p:g}")


def hue_rotate(img: torch.Tensor, angle: float) -> torch.Tensor:
    """The colours of `img` (3, H, W) in [0, 1] turned by `angle` radians about the grey axis k = (1, 1, 1)/sqrt(3)
    of RGB, by Rodrigues' rotation R = cos(a) I + sin(a) [k]x + (1 - cos(a)) k k^T, then clipped to [0, 1]: greys
    stay grey, and 120 degrees sends red to green, green to blue, blue to red."""
    c, s = math.cos(angle), math.sin(angle)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)  # [k]x
    rotation = c * torch.eye(3) + s * cross + (1 - c) / 3 * torch.ones(3, 3)
    return torch.einsum("ij,jhw->ihw", rotation.to(img), img).clamp(0, 1)


def reflect_101_index(length: int, size: int) -> torch.Tensor:
    """Indices 0..size-1 folded back into 0..length-1 as OpenCV's BORDER_REFLECT_101 (…3 2 1 |0 1 2 3| 2 1…),
    repeating as often as needed."""
    if length == 1:
        return torch.zeros(size, dtype=torch.int64)
    period = 2 * (length - 1)
    i = torch.arange(size) % period
    return torch.where(i < length, i, period - i)


def pad_and_crop(img: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Pad at the bottom/right up to `size` (reflect-101), then a random size x size window."""
    h, w = img.shape[-2:]
    if h < size:
        img = img[:, reflect_101_index(h, size)]
    if w < size:
        img = img[:, :, reflect_101_index(w, size)]
    h, w = img.shape[-2:]
    top = int(torch.randint(h - size + 1, (), generator=gen))
    left = int(torch.randint(w - size + 1, (), generator=gen))
    return img[:, top:top + size, left:left + size]


def smallest_gt_size(cfg: DegradationConfig, scale: int) -> int:
    """The smallest multiple of `scale` whose LR, and whose first-stage downsizing, still exceed the
    reflect padding of the largest kernel (and whose GT exceeds the USM kernel's)."""
    pad = max(cfg.kernel_sizes) // 2
    usm_pad = (cfg.usm_radius | 1) // 2 if cfg.use_usm else 0
    size = scale
    while (size // scale <= pad or int(size * cfg.resize_range[0]) <= pad or size <= usm_pad):
        size += scale
    return size


class ShuffledImages:
    """The image files under folders, `batch_size` at a time in a seeded shuffled order, reshuffled at the
    end of every epoch. The generator also draws everything random that a subclass adds (crops, flips, ...),
    so `state_dict()` (the generator, the epoch's order and position) continues the stream bit-identically."""

    def __init__(self, folders: list[str | os.PathLike], batch_size: int, seed: int, skip_small: bool = False):
        self.batch_size = batch_size
        self.files = find_images(folders)
        for path in self.files:
            check_readable(path)
        self.skipped = [p for p in self.files if is_small(p)] if skip_small else []  # the official filter
        if self.skipped and len(self.skipped) == len(self.files):
            raise DataError(f"every photo in {', '.join(map(str, folders))} has fewer pixels than 384 x 384 or under "
                            f"{SMALL_KIB} KiB, which --skip-small leaves out; add larger photos or pass --skip-small off")
        self.files = [p for p in self.files if p not in self.skipped]
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the file order anew from `seed`."""
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(self.files), generator=self.gen)
        self.position = 0

    def next_files(self) -> list[Path]:
        """The next batch_size files of a shuffled order, reshuffled at the end of every epoch."""
        files = []
        for _ in range(self.batch_size):
            if self.position == len(self.files):
                self.order = torch.randperm(len(self.files), generator=self.gen)
                self.position = 0
            files.append(self.files[self.order[self.position]])
            self.position += 1
        return files

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "generator": self.gen.get_state(),
            "order": self.order.clone(),
            "position": torch.tensor(self.position),
            "file_count": torch.tensor(len(self.files)),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["file_count"]) != len(self.files):
            raise DataError(f"the saved training state saw {int(state['file_count'])} images, these folders "
                            f"hold {len(self.files)}; resume with the same data")
        self.gen.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])


class CleanCrops(ShuffledImages):
    """Clean batches for training the prior (the VAE, the latent diffusion UNet): each image a horizontal
    flip with probability 1/2, reflect-padded if smaller, and a random crop; nothing degraded. With
    `hue_rotation` p > 0, each crop's colours are turned by a uniform random angle (`hue_rotate`) with
    probability p: an autoencoder that has seen every hue can encode colours its few photos lack.

    `next_batch()` -> (B, 3, crop_size, crop_size), float32 in [0, 1]. Decoded photos are kept in memory
    (the `cache` most recently used ones): the prior trains on a handful of photos, thousands of times each.
    """

    def __init__(self, folders: list[str | os.PathLike], crop_size: int, batch_size: int, seed: int = 0,
                 cache: int = 64, hue_rotation: float = 0.0):
        if batch_size < 1:
            raise DataError(f"batch size {batch_size}: must be at least 1")
        check_crop_size(crop_size, "--crop")
        check_hue_rotation(hue_rotation)
        super().__init__(folders, batch_size, seed)
        self.crop_size = crop_size
        self.hue_rotation = hue_rotation
        self.read = functools.lru_cache(maxsize=cache)(read_rgb)

    def next_batch(self) -> torch.Tensor:
        return torch.stack([self.crop(path) for path in self.next_files()])

    def crop(self, path: Path) -> torch.Tensor:
        crop = pad_and_crop(augment(self.read(path), self.gen, hflip=True, rot=False), self.crop_size, self.gen)
        if self.hue_rotation > 0 and chance(self.gen, self.hue_rotation):  # (p = 0 draws nothing)
            crop = hue_rotate(crop, uniform(self.gen, 0.0, 2 * math.pi))
        return crop

    def state_dict(self) -> dict[str, torch.Tensor]:
        return super().state_dict() | {"sizes": torch.tensor([self.crop_size, self.batch_size])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        saved = state["sizes"].tolist()
        if saved != [self.crop_size, self.batch_size]:
            raise DataError(f"the saved training state used crop size {saved[0]}, batch size {saved[1]}; "
                            "resume with the same settings")


class TrainingPairs(ShuffledImages):
    """Batches of (LR, GT) pairs from folders of photos, degraded as StableSR trains.

    `next_batch()` -> lr (B, 3, gt_size/scale, gt_size/scale), gt (B, 3, gt_size, gt_size), float32 in
    [0, 1]; gt is USM-sharpened when cfg.use_usm.
    """

    def __init__(self, folders: list[str | os.PathLike], gt_size: int, batch_size: int,
                 cfg: DegradationConfig = DegradationConfig(), seed: int = 0, scale: int = 4, skip_small: bool = False):
        self.gt_size, self.batch_size, self.cfg, self.scale = gt_size, batch_size, cfg, scale
        self.crop_size = cfg.crop_size or gt_size
        self.check_sizes()
        super().__init__(folders, batch_size, seed, skip_small)
        self.pool = PairPool(cfg.queue_size, batch_size)

    def reseed(self, seed: int) -> None:
        """Start the stream anew from `seed` (a new file order, an empty pool): what a new TrainingPairs
        of this seed would draw, without searching the folders again."""
        super().reseed(seed)
        self.pool = PairPool(self.cfg.queue_size, self.batch_size)

    def check_sizes(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch size {self.batch_size}: must be at least 1")
        check_crop_size(self.gt_size, "--gt-size")
        if self.gt_size % self.scale:
            raise DataError(f"--gt-size {self.gt_size} is not a multiple of the scale {self.scale}")
        smallest = smallest_gt_size(self.cfg, self.scale)
        if self.gt_size < smallest:
            raise DataError(f"--gt-size {self.gt_size} is too small for the {max(self.cfg.kernel_sizes)}x"
                            f"{max(self.cfg.kernel_sizes)} blur kernels; use at least {smallest}")
        if self.crop_size < self.gt_size or self.crop_size % self.scale:
            raise DataError(f"crop_size {self.crop_size} must be a multiple of {self.scale} and at least "
                            f"--gt-size {self.gt_size}")
        if self.cfg.queue_size % self.batch_size:
            raise DataError(f"the pair pool's queue_size {self.cfg.queue_size} is not a multiple of the batch "
                            f"size {self.batch_size}; choose a batch size that divides it")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        crops, kernels = [], []
        for path in self.next_files():
            img = augment(read_rgb(path), self.gen, cfg.use_hflip, cfg.use_rot)
            crops.append(pad_and_crop(img, self.crop_size, self.gen))
            kernels.append(draw_image_kernels(self.gen, cfg))
        gt = torch.stack(crops)
        if cfg.use_usm:
            gt = usm_sharpen(gt, cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold)
        lr = degrade(gt, torch.stack(kernels), cfg, self.gen, self.scale)
        lr, gt = paired_random_crop(lr, gt, self.gt_size, self.scale, self.gen)
        if chance(self.gen, cfg.no_degradation_prob):
            lr = clean_lr(gt, self.scale)
        lr, gt = self.pool.exchange(lr.contiguous(), gt.contiguous(), self.gen)
        return lr, gt

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **super().state_dict(),
            "sizes": torch.tensor([self.gt_size, self.batch_size, self.scale, self.crop_size]),
            **self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        saved = state["sizes"].tolist()
        if saved != [self.gt_size, self.batch_size, self.scale, self.crop_size]:
            raise DataError(f"the saved training state used --gt-size {saved[0]}, batch size {saved[1]}, "
                            f"scale {saved[2]}, crop size {saved[3]}; resume with the same settings")
        self.pool.load_state_dict(state)
