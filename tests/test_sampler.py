"""Aggregation sampling: tile placement, Gaussian weight maps, and the blended reverse step,
checked with a cheap fake denoiser (a fixed random conv) against an independent stitching."""

import math

import pytest
import torch
import torch.nn.functional as F

from stablesr_min.config import DiffusionConfig
from stablesr_min.sampler import aggregate, aggregation_step, gaussian_weights, tile_grid, tile_starts
from stablesr_min.schedule import Schedule

TILE, OVERLAP = 16, 6


class FakeDenoiser:
    """A fixed random 3x3 conv on [x, lr], plus a per-image bias (standing in for the text context) and a
    timestep-dependent bias. Records the timesteps it was called with."""

    def __init__(self, batch: int, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.kernel = torch.randn(channels, 2 * channels, 3, 3, generator=g) * 0.2
        self.context = torch.randn(batch, channels, 1, 1, generator=g)
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, lr, t):
        self.calls.append(t)
        context = self.context.repeat(len(x) // len(self.context), 1, 1, 1)
        return F.conv2d(torch.cat([x, lr], 1), self.kernel, padding=1) + context + 1e-3 * t.reshape(-1, 1, 1, 1)


def latents(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def stitched_by_hand(x, lr, t, denoise, tops, lefts, weights):
    """sum_n pad(w * pred_n) / sum_n pad(w), each tile run on its own and zero-padded to the canvas."""
    h, w = x.shape[-2:]
    numerator, denominator = torch.zeros_like(x), torch.zeros(h, w)
    for top in tops:
        for left in lefts:
            crop = (..., slice(top, top + TILE), slice(left, left + TILE))
            pad = (left, w - left - TILE, top, h - top - TILE)
            numerator += F.pad(weights * denoise(x[crop], lr[crop], t), pad)
            denominator += F.pad(weights, pad)
    return numerator / denominator


@pytest.mark.parametrize(
    "size, starts",
    [
        (36, [0, 10, 20]),  # lands on the stride
        (32, [0, 10, 16]),  # does not: the last tile moves back to end at 32
        (24, [0, 8]),
        (17, [0, 1]),
        (16, [0]),
        (10, [0]),
    ],
)
def test_tile_starts(size, starts):
    assert tile_starts(size, TILE, OVERLAP) == starts


def test_tile_starts_rejects_a_non_positive_stride():
    with pytest.raises(ValueError):
        tile_starts(64, 16, 16)


def test_tile_grid_covers_the_latent():
    tiles = tile_grid(24, 36, TILE, OVERLAP)
    assert len(tiles) == 6
    assert [(r.start, c.start) for r, c in tiles] == [(0, 0), (0, 10), (0, 20), (8, 0), (8, 10), (8, 20)]
    assert all(r.stop - r.start == TILE and c.stop - c.start == TILE for r, c in tiles)
    assert tile_grid(12, 40, TILE, OVERLAP)[-1] == (slice(0, 12), slice(24, 40))


def test_centred_gaussian_weights():
    w = gaussian_weights(TILE, TILE)
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))
    peak = math.exp(-((0.5 / TILE) ** 2) / 0.02) / math.sqrt(2 * math.pi * 0.01)
    assert w[7, 7].item() == pytest.approx(peak**2, rel=1e-12)


def test_official_gaussian_weights():
    w = gaussian_weights(TILE, TILE, official=True)
    # Columns: centred on (T-1)/2 = 7.5. Rows: centred on T/2 = 8, so row 8 holds the maximum and rows
    # 8 - d and 8 + d are equal.
    assert torch.equal(w, w.flip(1))
    assert torch.equal(w[1:8].flip(0), w[9:16])
    assert w.max(dim=0).values.equal(w[8])
    assert w[8, 7].item() == pytest.approx(15.1572, rel=1e-4)
    assert w[0, 0].item() == pytest.approx(1.0042e-09, rel=1e-4)
    assert w[0, 7].item() == pytest.approx(5.6485e-05, rel=1e-4)
    assert w[8, 0].item() == pytest.approx(2.6947e-04, rel=1e-4)
    # A rectangular tile: rows follow the height, columns the width.
    rect = gaussian_weights(8, 12, official=True)
    assert rect.shape == (8, 12) and rect[4].argmax().item() in (5, 6) and rect[:, 5].argmax().item() == 4


@pytest.mark.parametrize("batch, batch_size", [(1, 1), (1, 4), (2, 2)])
def test_three_tiles_wide_equals_hand_stitching(batch, batch_size):
    x, lr = latents((batch, 4, 16, 36))
    t = torch.full((batch,), 321)
    denoise = FakeDenoiser(batch)
    weights = gaussian_weights(TILE, TILE, official=True)
    tiles = tile_grid(16, 36, TILE, OVERLAP)
    ours = aggregate(x, lr, t, denoise, tiles, weights, batch_size=batch_size)
    expected = stitched_by_hand(x, lr, t, denoise, [0], [0, 10, 20], weights.float())
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # Outside the overlaps only one tile contributes: its prediction is taken as is.
    alone = denoise(x[..., 0:16], lr[..., 0:16], t)
    assert torch.allclose(ours[..., :10], alone[..., :10], rtol=1e-5, atol=1e-6)


def test_grid_off_the_stride_equals_hand_stitching():
    x, lr = latents((1, 4, 24, 32), seed=3)
    t = torch.tensor([666])
    denoise = FakeDenoiser(1)
    weights = gaussian_weights(TILE, TILE)
    ours = aggregate(x, lr, t, denoise, tile_grid(24, 32, TILE, OVERLAP), weights, batch_size=3)
    expected = stitched_by_hand(x, lr, t, denoise, [0, 8], [0, 10, 16], weights.float())
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_batch_of_images_equals_one_image_at_a_time():
    x, lr = latents((2, 4, 24, 32), seed=4)
    t = torch.tensor([500, 500])
    both = FakeDenoiser(2)
    tiles, weights = tile_grid(24, 32, TILE, OVERLAP), gaussian_weights(TILE, TILE)
    together = aggregate(x, lr, t, both, tiles, weights, batch_size=4)
    for i in range(2):
        single = FakeDenoiser(1)
        single.kernel, single.context = both.kernel, both.context[i:i + 1]
        alone = aggregate(x[i:i + 1], lr[i:i + 1], t[i:i + 1], single, tiles, weights, batch_size=1)
        assert torch.allclose(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [16, 12])
def test_one_tile_equals_no_tiling(size):
    x, lr = latents((2, 4, size, size), seed=5)
    t = torch.tensor([10, 10])
    denoise = FakeDenoiser(2)
    tiles = tile_grid(size, size, TILE, OVERLAP)
    assert len(tiles) == 1
    ours = aggregate(x, lr, t, denoise, tiles, gaussian_weights(TILE, TILE, official=True))
    assert torch.allclose(ours, denoise(x, lr, t), rtol=1e-6, atol=1e-6)


def test_progress_hook_counts_tiles():
    x, lr = latents((1, 4, 16, 36))
    seen = []
    aggregate(x, lr, torch.tensor([1]), FakeDenoiser(1), tile_grid(16, 36, TILE, OVERLAP),
              gaussian_weights(TILE, TILE), batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 3), (3, 3)]


@pytest.mark.parametrize("k", [2, 0])
def test_aggregation_step(k):
    schedule = Schedule.from_config(DiffusionConfig()).respace(4)
    x, lr = latents((1, 4, 24, 32), seed=6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    denoise = FakeDenoiser(1)
    weights = gaussian_weights(TILE, TILE, official=True)
    x_prev = aggregation_step(schedule, x, lr, k, denoise, noise, tile=TILE, overlap=OVERLAP,
                              weights=weights, batch_size=4)
    # The networks see the original timestep; the DDPM step uses the respaced index.
    t = torch.tensor([[0, 333, 666, 999][k]])
    assert all(torch.equal(c, t.repeat(len(c))) for c in denoise.calls)
    eps = stitched_by_hand(x, lr, t, denoise, [0, 8], [0, 10, 16], weights.float()).double()
    ab, ab_prev = schedule.alphas_cumprod[k], schedule.alphas_cumprod_prev[k]
    beta = schedule.betas[k]
    x0 = (x.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x.double()) / (1 - ab)
    sigma = ((1 - ab_prev) / (1 - ab) * beta).sqrt()
    expected = mean + (sigma * noise if k > 0 else 0)
    assert x_prev.dtype == torch.float32
    assert torch.allclose(x_prev.double(), expected, rtol=1e-4, atol=1e-5)
