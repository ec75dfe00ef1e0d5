"""PSNR and SSIM against closed forms and a plain float64 reference written from the paper's equations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stablesr_min.app import metrics
from stablesr_min.image_io import to_pil


def levels(shape, seed):
    """Random 8-bit levels, float64."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 255).round().double()


def noisy(image, sigma, seed):
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (image + sigma * noise).clamp(0, 255).round()


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Eq. 13-17 of Wang et al. 2004 term by term, one (H, W) channel, every window position inside it."""
    offsets = np.arange(11) - 5
    w = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_identical_images():
    a = levels((2, 3, 20, 24), 0)
    assert torch.equal(metrics.psnr(a, a), torch.full((2,), math.inf, dtype=torch.float64))
    assert torch.equal(metrics.ssim(a, a), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("offset", [1, 3, 10])
def test_psnr_of_a_constant_offset(offset):
    a = levels((1, 3, 16, 16), 1).clamp(0, 200)
    # MSE = offset^2, so PSNR = 10 log10(255^2 / offset^2) = 20 log10(255 / offset)
    assert metrics.psnr(a, a + offset).item() == pytest.approx(20 * math.log10(255 / offset), abs=1e-12)


def test_ssim_of_two_flat_images():
    # no variance anywhere: Eq. 13 reduces to (2 p q + C1) / (p^2 + q^2 + C1)
    p, q, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    a, b = torch.full((1, 3, 12, 12), p), torch.full((1, 3, 12, 12), q)
    assert metrics.ssim(a, b).item() == pytest.approx((2 * p * q + c1) / (p**2 + q**2 + c1), abs=1e-12)


def test_ssim_matches_the_straightforward_reference():
    a = levels((1, 3, 19, 17), 2)
    b = noisy(a, 80, 3)
    expected = np.mean([reference_ssim(a[0, c].numpy(), b[0, c].numpy()) for c in range(3)])
    assert metrics.ssim(a, b).item() == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 0.95  # a real, intermediate value


def test_symmetric():
    a = levels((2, 3, 16, 20), 4)
    b = noisy(a, 15, 5)
    assert torch.equal(metrics.psnr(a, b), metrics.psnr(b, a))
    assert torch.allclose(metrics.ssim(a, b), metrics.ssim(b, a), rtol=0, atol=1e-14)


def test_batch_is_image_by_image():
    a = levels((3, 3, 16, 16), 6)
    b = torch.stack([noisy(a[i], sigma, 7 + i) for i, sigma in enumerate((2, 10, 40))])
    psnrs, ssims = metrics.psnr(a, b), metrics.ssim(a, b)
    assert psnrs.shape == ssims.shape == (3,)
    for i in range(3):
        assert metrics.psnr(a[i:i + 1], b[i:i + 1]).item() == psnrs[i].item()
        assert metrics.ssim(a[i:i + 1], b[i:i + 1]).item() == pytest.approx(ssims[i].item(), abs=1e-14)
    assert psnrs[0] > psnrs[1] > psnrs[2] and ssims[0] > ssims[1] > ssims[2]


def test_border_is_left_out():
    a = levels((1, 3, 24, 24), 8)
    b = a.clone()
    b[..., :4, :] = 0  # damage only the top 4 rows
    assert math.isfinite(metrics.psnr(a, b).item())
    assert metrics.psnr(a, b, border=4).item() == math.inf
    assert metrics.ssim(a, b, border=4).item() == 1.0
    c = noisy(a, 10, 9)
    assert metrics.ssim(a, c, border=3).item() == metrics.ssim(a[..., 3:-3, 3:-3], c[..., 3:-3, 3:-3]).item()


def test_levels_are_the_saved_png_values():
    image = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(10)) * 1.2 - 0.1
    saved = torch.from_numpy(np.asarray(to_pil(image), dtype=np.float64)).permute(2, 0, 1)[None]
    assert torch.equal(metrics.to_levels(image), saved)


def test_mean_over_images():
    assert metrics.mean([30.0, 20.0]) == 25.0


@pytest.mark.parametrize("a_shape,b_shape,border,message", [
    ((1, 3, 16, 16), (1, 3, 16, 15), 0, "need two (B, C, H, W) images of one shape, got (1, 3, 16, 16) and (1, 3, 16, 15)"),
    ((1, 3, 10, 16), (1, 3, 10, 16), 0, "SSIM needs images of at least 11x11 pixels (after the border), got 16x10"),
    ((1, 3, 16, 16), (1, 3, 16, 16), 8, "border 8 leaves nothing of a 16x16 image"),
])
def test_bad_input(a_shape, b_shape, border, message):
    with pytest.raises(ValueError) as e:
        metrics.ssim(torch.zeros(a_shape), torch.zeros(b_shape), border=border)
    assert str(e.value) == message


def test_radial_power_spectrum_finds_a_sine_at_its_frequency():
    x = torch.arange(64, dtype=torch.float64)
    wave = (100 + 50 * torch.sin(2 * math.pi * 0.25 * x))[None, None, None].expand(1, 3, 64, 64)  # 0.25 cycles/px
    freqs, power = metrics.radial_power_spectrum(wave)
    assert freqs[-1] == 0.5 and freqs[int(power[0].argmax())] == 0.25


def test_highfreq_spectrum_distance_on_known_cases():
    """HR against itself scores 0; blur scores worse, more blur worse still; noise scores worse too; bicubic
    upscaling of a downscaled image scores worse than the image."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 16, 16, generator=gen)
    hr = F.interpolate(base, size=64, mode="bicubic", align_corners=False).clamp(0, 1) * 0.7 + \
        0.3 * torch.rand(1, 3, 64, 64, generator=gen)  # structure plus fine texture
    levels = metrics.to_levels(hr)
    assert metrics.highfreq_spectrum_distance(levels, levels).item() == 0

    def blur(x, sigma):
        k = torch.exp(-torch.arange(-4, 5, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
        k = (k[:, None] * k[None]) / k.sum() ** 2
        return F.conv2d(F.pad(x.double(), (4, 4, 4, 4), mode="reflect"), k[None, None].expand(3, 1, 9, 9), groups=3)

    d1, d2 = (metrics.highfreq_spectrum_distance(blur(levels, s), levels).item() for s in (0.8, 1.6))
    assert 0 < d1 < d2
    noisy = levels + 40 * torch.randn(levels.shape, generator=gen, dtype=torch.float64)
    assert metrics.highfreq_spectrum_distance(noisy, levels).item() > 0.1
    bicubic = F.interpolate(F.interpolate(hr, scale_factor=0.25, mode="area"), scale_factor=4, mode="bicubic")
    assert metrics.highfreq_spectrum_distance(metrics.to_levels(bicubic), levels).item() > d1


def test_mean_hue_on_known_colours():
    rgb = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1], [0.5, 0.25, 0], [1, 0, 0.5]],
                       dtype=torch.float64)
    images = rgb[:, :, None, None].expand(-1, -1, 4, 4)
    assert metrics.mean_hue(images).tolist() == pytest.approx([0, 60, 120, 180, 240, 300, 30, 330])
    assert metrics.mean_hue(255 * images).tolist() == pytest.approx([0, 60, 120, 180, 240, 300, 30, 330])
    assert metrics.mean_hue(torch.full((1, 3, 2, 2), 0.4)).isnan().all()  # grey has no hue
    # the hue of the mean colour, not the mean of the hues: half red, half green averages to olive (60 degrees)
    half = torch.zeros(1, 3, 2, 2)
    half[0, 0, :, 0], half[0, 1, :, 1] = 1, 1
    assert metrics.mean_hue(half).item() == pytest.approx(60)


def test_sample_sd():
    assert metrics.sample_sd([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert metrics.sample_sd([2.0, 2.0, 2.0]) == 0.0


def test_paired_verdict_on_known_cases():
    # a clear win: every photo better by about 1, se 0.0408 (sd 0.0816 over 4 photos)
    win = metrics.paired_verdict([0.9, 1.0, 1.1, 1.0], higher_is_better=True)
    assert win["verdict"] == "ahead" and win["mean"] == pytest.approx(1.0)
    assert win["se"] == pytest.approx(math.sqrt(0.02 / 3) / 2)
    # the same differences for an error (lower is better) are a loss
    assert metrics.paired_verdict([0.9, 1.0, 1.1, 1.0], higher_is_better=False)["verdict"] == "behind"
    assert metrics.paired_verdict([-0.9, -1.0, -1.1, -1.0], higher_is_better=False)["verdict"] == "ahead"
    # a tie within the noise: mean 0.25, se 0.25 (differences of either sign)
    tie = metrics.paired_verdict([1.0, -0.5, 1.0, -0.5], higher_is_better=True)
    assert tie["verdict"] == "level" and tie["mean"] == pytest.approx(0.25) and tie["se"] == pytest.approx(0.4330127)
    # exactly two standard errors is not beyond them
    assert metrics.paired_verdict([1.0, 3.0], higher_is_better=True) == {"mean": 2.0, "se": 1.0, "verdict": "level"}
    assert metrics.paired_verdict([1.5], higher_is_better=True) == {"mean": 1.5, "se": None, "verdict": "n/a"}
