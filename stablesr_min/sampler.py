"""Aggregation sampling (paper Sec. 3.3): reverse diffusion on a latent larger than the UNet's tile.

Stable Diffusion 2.1-base, which StableSR keeps frozen, was trained at 512 x 512 (64 x 64 latents), and
StableSR's time-aware encoder and SFT layers were trained on 512 px crops. For a larger output, each reverse
step cuts the latent into overlapping tiles, runs the time-aware encoder and the UNet on every tile
(with the same tile of the LR latent as condition), blends the per-tile predictions with a Gaussian
weight map, which hides the seams, and then takes one ordinary DDPM step on the whole latent (or, with
`ddim_step`, one DDIM step, as the official DDIM script does). The paper describes the Gaussian weight
map but gives no sigma: the variance 0.01 (in tile lengths) is the official code's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .schedule import DDIMSchedule, Schedule

# denoise(x_tiles, lr_tiles, t) -> model output (eps or v) for a batch of tiles; t holds original
# timesteps. Tiles are stacked tile-major, so row i of a batch belongs to image i % B: a denoiser with
# per-image conditioning (the text context) repeats it with `context.repeat(len(x_tiles) // B, 1, 1)`.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# progress(tiles_done, tiles_total), called after each batch of tiles.
Progress = Callable[[int, int], None]

Region = tuple[slice, slice]  # (rows, columns) of one tile in the latent


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one axis: every `tile - overlap`, with the last tile moved back to end
    exactly at the border (so it overlaps its neighbour by more). A size <= tile gives one tile."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile = {tile})")
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Region]:
    """All tiles of a (height, width) latent, row by row; a side shorter than `tile` is one whole tile."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [(slice(top, top + tile_h), slice(left, left + tile_w))
            for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)]


def _gaussian(size: int, centre: float, var: float) -> torch.Tensor:
    # Distances are measured in tile lengths, so the bump has std sqrt(var) * size (0.1 tile by default).
    d = (torch.arange(size, dtype=torch.float64) - centre) / size
    return torch.exp(-d**2 / (2 * var)) / math.sqrt(2 * math.pi * var)


def gaussian_weights(tile_h: int, tile_w: int, var: float = 0.01, official: bool = False) -> torch.Tensor:
    """(tile_h, tile_w) float64 weight map: a separable Gaussian centred on the tile (the paper's Gaussian
    map; `var` = 0.01 is the official code's, the paper gives none).

    official=True gives the reference's map instead: its column centre is (tile_w - 1)/2, the true
    centre, but its row centre is tile_h/2, half a pixel low. Use it to reproduce the official outputs.
    """
    row_centre = tile_h / 2 if official else (tile_h - 1) / 2
    return torch.outer(_gaussian(tile_h, row_centre, var), _gaussian(tile_w, (tile_w - 1) / 2, var))


def aggregate(x: torch.Tensor, lr_latent: torch.Tensor, t: torch.Tensor, denoise: DenoiseFn,
              tiles: list[Region], weights: torch.Tensor, batch_size: int = 4,
              progress: Progress | None = None) -> torch.Tensor:
    """The model output for the whole latent, blended from overlapping tiles (paper Sec. 3.3):

        out = sum_n P_n(w * eps_theta(x[Omega_n], lr[Omega_n], t)) / sum_n P_n(w)

    where Omega_n is tile n, w the (tile_h, tile_w) weight map and P_n pastes a tile into a zero canvas
    at Omega_n. x, lr_latent: (B, C, H, W); t: (B,) original timesteps. Tiles go through `denoise`
    `batch_size` at a time. A tile smaller than `weights` uses its top-left part.
    """
    b = x.shape[0]
    weights = weights.to(device=x.device, dtype=x.dtype)
    weighted_sum = torch.zeros_like(x)
    weight_sum = x.new_zeros(x.shape[-2:])
    for first in range(0, len(tiles), batch_size):
        batch = tiles[first:first + batch_size]
        # n tiles of (B, C, h, w) -> (n*B, C, h, w)
        x_tiles = torch.cat([x[..., rows, cols] for rows, cols in batch])
        lr_tiles = torch.cat([lr_latent[..., rows, cols] for rows, cols in batch])
        outputs = denoise(x_tiles, lr_tiles, t.repeat(len(batch)))
        for (rows, cols), output in zip(batch, outputs.split(b)):
            w = weights[: rows.stop - rows.start, : cols.stop - cols.start]
            weighted_sum[..., rows, cols] += w * output
            weight_sum[rows, cols] += w
        if progress is not None:
            progress(first + len(batch), len(tiles))
    return weighted_sum / weight_sum


def tiled_output(x: torch.Tensor, lr_latent: torch.Tensor, t: torch.Tensor, denoise: DenoiseFn, *, tile: int,
                 overlap: int, weights: torch.Tensor | None = None, batch_size: int = 4,
                 progress: Progress | None = None) -> torch.Tensor:
    """`aggregate` over the `tile_grid` of x; `weights` defaults to the centred Gaussian of a `tile` x
    `tile` tile."""
    weights = gaussian_weights(tile, tile) if weights is None else weights
    tiles = tile_grid(x.shape[-2], x.shape[-1], tile, overlap)
    return aggregate(x, lr_latent, t, denoise, tiles, weights, batch_size, progress)


def aggregation_step(schedule: Schedule, x: torch.Tensor, lr_latent: torch.Tensor, k: int,
                     denoise: DenoiseFn, noise: torch.Tensor, **tiling) -> torch.Tensor:
    """One reverse step x_k -> x_{k-1} of the respaced `schedule` over overlapping tiles (`tiling`: the
    keyword arguments of `tiled_output`: tile, overlap, weights, batch_size, progress).

    The networks see the original timestep `schedule.timestep_map[k]`; x_0, the posterior and the noise
    scale use the respaced step k.
    """
    t = schedule.network_timestep(k, x.shape[0]).to(x.device)
    return schedule.p_sample(x, k, tiled_output(x, lr_latent, t, denoise, **tiling), noise)


def ddim_step(ddim: DDIMSchedule, x: torch.Tensor, lr_latent: torch.Tensor, index: int, denoise: DenoiseFn,
              noise: torch.Tensor, *, timestep: int | None = None,
              **tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step over overlapping tiles (the official `p_sample_ddim_sr_tcanvas`): the tiles' blended
    model output, then `DDIMSchedule.step` (Eq. 12) on the whole latent. Returns (x_prev, pred_x0).

    The networks see `timestep`, by default the official sampler's `ddim.network_timesteps[index]`.
    """
    timestep = int(ddim.network_timesteps[index]) if timestep is None else timestep
    t = torch.full((x.shape[0],), timestep, dtype=torch.int64, device=x.device)
    return ddim.step(x, index, tiled_output(x, lr_latent, t, denoise, **tiling), noise)
