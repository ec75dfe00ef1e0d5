"""The measures notebooks 01-03 added for issue 42 (block_correlation, encoder_input_change, log_power_ratio),
each on cases whose answer is known."""

import math

import pytest
import torch

from stablesr_min.app import metrics
from stablesr_min.app.analysis import block_correlation, encoder_input_change, relative_change


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def checkerboard(size: int) -> torch.Tensor:
    """(1, 1, size, size) of +1 and -1 alternating pixel by pixel: every even block's mean is 0."""
    i = torch.arange(size)
    return (((i[:, None] + i[None, :]) % 2) * 2 - 1).double()[None, None]


def test_block_correlation_sees_the_low_frequencies_only():
    smooth = torch.nn.functional.interpolate(randn(1, 4, 4, 6), scale_factor=8, mode="nearest")  # (1, 4, 32, 48)
    assert block_correlation(smooth, smooth, 8) == pytest.approx(1, abs=1e-12)
    assert block_correlation(smooth, -smooth, 8) == pytest.approx(-1, abs=1e-12)
    # a pattern whose 8 x 8 means are 0 leaves the block means, so the correlation, exactly as they were
    busy = smooth + 5 * checkerboard(48)[..., :32, :]
    assert block_correlation(busy, smooth, 8) == pytest.approx(1, abs=1e-12)
    # 4 x 4 blocks: 96 independent pairs of means, so r of independent noise is about N(0, 1 / 96)
    assert abs(block_correlation(smooth, randn(1, 4, 32, 48, seed=1), 4)) < 4 / math.sqrt(96)


def test_encoder_input_change_is_zero_for_one_input_and_the_relative_change_of_the_features_otherwise(stablesr):
    a, b = randn(1, 4, 16, 16, seed=1).float(), randn(1, 4, 16, 16, seed=2).float()
    assert encoder_input_change(stablesr, [a, a, a], t=500) == 0
    with torch.no_grad():
        t = torch.tensor([500])
        flat = [torch.cat([f[k].flatten() for k in sorted(f)]) for f in (stablesr.time_encoder(z, t) for z in (a, b))]
    expected = ((flat[1].double() - flat[0].double()).norm() / flat[0].double().norm()).item()
    assert expected > 0 and encoder_input_change(stablesr, [a, b], t=500) == pytest.approx(expected, rel=1e-9)
    assert expected == relative_change(flat)


def test_log_power_ratio_on_known_cases():
    image = metrics.to_levels(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    freqs, same = metrics.log_power_ratio(image, image)
    assert freqs[-1] == 0.5 and same.shape == (2, len(freqs)) and bool((same == 0).all())
    # twice the contrast is four times the power at every frequency but 0 (the mean is removed there)
    _, doubled = metrics.log_power_ratio(2 * image, image)
    assert doubled[:, 1:].flatten().tolist() == pytest.approx([math.log10(4)] * 2 * (len(freqs) - 1), abs=1e-9)
    # a 2 x 2 box blur (gain cos(pi fx) cos(pi fy)) leaves the low rings (but the lowest, where the zero-padded
    # border shows) and takes power from the highest: negative there
    blurred = torch.nn.functional.avg_pool2d(image, 2, stride=1, padding=1)[..., :32, :32]
    _, ratio = metrics.log_power_ratio(blurred, image)
    assert bool((ratio[:, -4:] < -0.5).all()) and bool((ratio[:, 2:4].abs() < 0.2).all())
    # highfreq_spectrum_distance is its absolute value averaged over the band
    band = (freqs >= 0.125) & (freqs <= 0.5)
    assert metrics.highfreq_spectrum_distance(blurred, image).tolist() == \
        pytest.approx(ratio[:, band].abs().mean(1).tolist(), abs=1e-12)
