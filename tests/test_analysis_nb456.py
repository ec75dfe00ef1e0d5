"""The measurements notebooks 04-06 added (stablesr_min/app/analysis.py, its last block), on cases whose answer is
known."""

import dataclasses

import pytest
import torch

from stablesr_min.app.analysis import finish_each_fix, per_training_seed_difference, windowed_trend
from stablesr_min.pipeline import StableSRPipeline, UpscaleOptions


@pytest.fixture(scope="module")
def pipe(stablesr, cfw):
    return StableSRPipeline(stablesr, cfw)


def test_finish_each_fix_is_finish_for_every_fix(pipe):
    opts = UpscaleOptions(tile=16, overlap=6, steps=2)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        sampled = pipe.sample_latent(lr, opts, generator=torch.Generator().manual_seed(0))
        each = finish_each_fix(pipe, sampled, opts, ["none", "adain", "wavelet"])
        for method, image in each.items():
            torch.testing.assert_close(image, pipe.finish(sampled, dataclasses.replace(opts, colorfix=method)))
    assert not torch.equal(each["none"], each["wavelet"])


def test_windowed_trend_of_a_straight_line():
    steps = [250 * k for k in range(1, 11)]
    falling = [1.0 - 0.01 * k for k in range(10)]  # the window: steps 1500-2500, 5 points
    trend = windowed_trend(steps, falling)
    assert trend["points"] == 5
    assert trend["slope"] == pytest.approx(-0.01 / 250)
    assert trend["se"] == pytest.approx(0.0, abs=1e-12)
    assert trend["change"] == pytest.approx(-0.04 / 0.93)  # 1000 steps of the line over the window's mean 0.93
    assert trend["verdict"] == "falling"
    assert windowed_trend(steps, falling[::-1])["verdict"] == "rising"


def test_windowed_trend_is_not_fooled_by_one_outlier():
    """Issue 42's case: the last point below the one before, which is an outlier; the points before it lower still."""
    steps = [250 * k for k in range(1, 11)]
    values = [0.0628, 0.0549, 0.0556, 0.0497, 0.0525, 0.0495, 0.0507, 0.0449, 0.0576, 0.0463]
    trend = windowed_trend(steps, values)
    assert trend["points"] == 5 and trend["verdict"] == "flat"
    assert abs(trend["slope"]) < 2 * trend["se"]
    flat = windowed_trend(steps, [1.0, 1.1] * 5)  # alternating: slope small against its scatter
    assert flat["verdict"] == "flat"


def test_windowed_trend_keeps_min_points():
    steps = list(range(0, 1000, 10)) + [2000, 3000]  # the last 40 % of steps holds 2 points only
    trend = windowed_trend(steps, [float(s) for s in steps], window=0.4, min_points=4)
    assert trend["points"] == 4 and trend["slope"] == pytest.approx(1.0) and trend["verdict"] == "rising"


def test_per_training_seed_difference():
    cell = {"time-aware": {"training_seed_means": [25.0, 24.5]}, "time-blind": {"training_seed_means": [24.75, 24.75]}}
    assert per_training_seed_difference(cell) == pytest.approx([0.25, -0.25])
