"""The Real-ESRGAN degradation: kernels, filtering, noise, JPEG, the pipeline and the pair pool.

The frequency tests draw the pipeline's choices many times through the functions the pipeline itself
calls and accept a count within 5 standard deviations of its binomial expectation (a false alarm about
once in 1.7 million runs per count; the seeds are fixed, so each run is the same anyway).
"""

import math

import pytest
import torch

from stablesr_min.degradation import (KERNEL_KINDS, DegradationConfig, NoiseDraw, PairPool, add_noise,
                                      clean_lr, degrade, draw_blur_kind, draw_final_sinc, draw_image_kernels,
                                      draw_kernel_of_kind, draw_noise, draw_resize, filter2d, jpeg,
                                      opencv_gaussian_kernel, pulse_kernel, resize, sinc_kernel, stage)

SIGMAS = 5


def assert_frequency(count: int, n: int, p: float, what: str) -> None:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(count - mean) <= SIGMAS * sd, f"{what}: {count} of {n}, expected {mean:.0f} ± {SIGMAS * sd:.0f}"


def photo_batch(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images with some edges: (batch, 3, size, size) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


@pytest.mark.parametrize("n", [1, 2])
def test_blur_kinds_follow_their_probabilities(n):
    st = stage(DegradationConfig(), n)
    gen = torch.Generator().manual_seed(n)
    draws = 20000
    kinds = [draw_blur_kind(gen, st) for _ in range(draws)]
    assert_frequency(kinds.count("sinc"), draws, st.sinc_prob, "sinc")
    total = sum(st.kernel_prob)
    for kind, p in zip(st.kernel_list, st.kernel_prob):
        assert_frequency(kinds.count(kind), draws, (1 - st.sinc_prob) * p / total, kind)


def test_final_sinc_follows_its_probability():
    cfg = DegradationConfig()
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    pulse = pulse_kernel(max(cfg.kernel_sizes))
    sincs = sum(not torch.equal(draw_final_sinc(gen, cfg), pulse) for _ in range(draws))
    assert_frequency(sincs, draws, cfg.final_sinc_prob, "final sinc")


@pytest.mark.parametrize("n", [1, 2])
def test_noise_kinds_follow_their_probabilities(n):
    st = stage(DegradationConfig(), n)
    gen = torch.Generator().manual_seed(10 + n)
    draws, batch = 10000, 4
    noises = [draw_noise(gen, st, batch) for _ in range(draws)]
    gaussian = [d for d in noises if d.kind == "gaussian"]
    poisson = [d for d in noises if d.kind == "poisson"]
    assert_frequency(len(gaussian), draws, st.gaussian_noise_prob, "gaussian noise")
    for kind, chosen, amount_range in (("gaussian", gaussian, st.noise_range),
                                       ("poisson", poisson, st.poisson_scale_range)):
        gray = int(sum(d.gray.sum() for d in chosen))
        assert_frequency(gray, len(chosen) * batch, st.gray_noise_prob, f"grey {kind} noise")
        amounts = torch.cat([d.amount for d in chosen])
        assert amount_range[0] <= amounts.min() and amounts.max() <= amount_range[1]


@pytest.mark.parametrize("n", [1, 2])
def test_resize_directions_and_modes_follow_their_probabilities(n):
    st = stage(DegradationConfig(), n)
    gen = torch.Generator().manual_seed(20 + n)
    draws = 10000
    resizes = [draw_resize(gen, st) for _ in range(draws)]
    scales = torch.tensor([s for s, _ in resizes])
    up, down, keep = st.resize_prob
    assert_frequency(int((scales > 1).sum()), draws, up, "up")
    assert_frequency(int((scales < 1).sum()), draws, down, "down")
    assert_frequency(int((scales == 1).sum()), draws, keep, "keep")
    assert st.resize_range[0] <= scales.min() and scales.max() <= st.resize_range[1]
    for mode in ("area", "bilinear", "bicubic"):
        assert_frequency(sum(m == mode for _, m in resizes), draws, 1 / 3, mode)


def test_kernels_sum_to_one():
    cfg = DegradationConfig()
    gen = torch.Generator().manual_seed(0)
    for size in cfg.kernel_sizes:
        for kind in KERNEL_KINDS:
            kernel = draw_kernel_of_kind(gen, kind, size, stage(cfg, 1))
            assert kernel.shape == (size, size) and kernel.dtype == torch.float32
            assert kernel.double().sum().item() == pytest.approx(1, abs=1e-6), (kind, size)
        assert sinc_kernel(2.0, size, 21).double().sum().item() == pytest.approx(1, abs=1e-6)
    for _ in range(20):
        kernels = draw_image_kernels(gen, cfg)
        assert kernels.shape == (3, 21, 21)
        torch.testing.assert_close(kernels.double().sum((1, 2)), torch.ones(3, dtype=torch.float64))


def test_isotropic_kernels_are_symmetric_and_anisotropic_ones_are_not():
    st = stage(DegradationConfig(), 1)
    gen = torch.Generator().manual_seed(1)
    iso = draw_kernel_of_kind(gen, "iso", 21, st)
    torch.testing.assert_close(iso, iso.T)
    torch.testing.assert_close(iso, iso.flip(0))
    aniso = draw_kernel_of_kind(gen, "aniso", 21, st)
    assert not torch.allclose(aniso, aniso.T, atol=1e-4)


def test_filter2d_per_image_kernels_equal_filtering_each_image_alone():
    img = photo_batch(2)
    gen = torch.Generator().manual_seed(2)
    kernels = torch.stack([draw_image_kernels(gen, DegradationConfig())[0] for _ in range(2)])
    together = filter2d(img, kernels)
    alone = torch.cat([filter2d(img[i:i + 1], kernels[i]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], filter2d(img[:1], kernels[1])[0], atol=1e-4)


def test_filter2d_one_kernel_for_all_equals_the_kernel_repeated():
    img = photo_batch(3)
    kernel = sinc_kernel(1.3, 13, 21)
    shared = filter2d(img, kernel)
    torch.testing.assert_close(shared, filter2d(img, kernel[None]), rtol=0, atol=0)
    torch.testing.assert_close(shared, filter2d(img, kernel.expand(3, 21, 21)), rtol=0, atol=1e-6)


def test_filter2d_is_reflect_padded_correlation():
    img = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    kernel = torch.zeros(3, 3)
    kernel[0, 2] = 1  # correlation: out[y, x] = in[y - 1, x + 1], reflected at the border
    out = filter2d(img, kernel)
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1), mode="reflect")
    torch.testing.assert_close(out, padded[..., 0:5, 2:8], rtol=0, atol=0)
    img = photo_batch(2, 24)
    torch.testing.assert_close(filter2d(img, pulse_kernel(21)), img, rtol=0, atol=0)


def test_opencv_gaussian_kernel():
    torch.testing.assert_close(opencv_gaussian_kernel(5), torch.tensor([0.0625, 0.25, 0.375, 0.25, 0.0625],
                                                                        dtype=torch.float64))
    taps = opencv_gaussian_kernel(51)
    sigma = 0.3 * ((51 - 1) / 2 - 1) + 0.8
    assert taps.sum().item() == pytest.approx(1)
    assert (taps[25] / taps[24]).item() == pytest.approx(math.exp(1 / (2 * sigma**2)))


def test_grey_noise_is_the_same_in_every_channel_and_colour_noise_is_not():
    img = torch.full((2, 3, 16, 16), 0.5)
    gen = torch.Generator().manual_seed(3)
    for kind in ("gaussian", "poisson"):
        draw = NoiseDraw(kind, torch.tensor([10.0, 10.0]) if kind == "gaussian" else torch.tensor([1.0, 1.0]),
                         torch.tensor([True, False]))
        noisy = add_noise(img, draw, gen)
        assert torch.equal(noisy[0, 0], noisy[0, 1]) and torch.equal(noisy[0, 1], noisy[0, 2]), kind
        assert not torch.equal(noisy[1, 0], noisy[1, 1]), kind
        assert noisy.min() >= 0 and noisy.max() <= 1


def test_jpeg_is_a_real_codec():
    img = photo_batch(2, 48)
    out = jpeg(img, torch.tensor([100.0, 10.0]))
    assert out.shape == img.shape
    assert torch.equal(out * 255, (out * 255).round())  # decoded 8-bit values
    close, far = (out - img).abs().mean((1, 2, 3))
    assert close < 0.01 < far


def test_degrade_is_reproducible_and_gives_lr_of_a_quarter_size_in_0_1():
    cfg = DegradationConfig()
    gt = photo_batch(2, 64)
    outputs = []
    for seed in (5, 5, 6):
        gen = torch.Generator().manual_seed(seed)
        kernels = torch.stack([draw_image_kernels(gen, cfg) for _ in range(2)])
        outputs.append(degrade(gt, kernels, cfg, gen, scale=4))
    assert outputs[0].shape == (2, 3, 16, 16) and outputs[0].dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    for out in outputs:
        assert out.min() >= 0 and out.max() <= 1


def test_first_order_is_eq_1_once_with_the_first_blur_straight_to_the_lr_size():
    cfg = DegradationConfig(order=1)
    gt = photo_batch(2, 64)
    gen = torch.Generator().manual_seed(3)
    kernels = torch.stack([draw_image_kernels(gen, cfg) for _ in range(2)])
    trace = []
    lr = degrade(gt, kernels, cfg, gen, scale=4, trace=trace)
    names = [name for name, _ in trace]
    assert names[0] == "blur" and names[1].startswith("resize to LR (") and names[2:] == ["noise", "JPEG"]
    # y ⊛ k with the first stage's kernel, then ↓ straight to 16 x 16 by the drawn mode
    blurred = filter2d(gt, kernels[:, 0])
    torch.testing.assert_close(trace[0][1], blurred.clamp(0, 1), rtol=0, atol=0)
    mode = names[1][len("resize to LR ("):-1]
    torch.testing.assert_close(trace[1][1], resize(blurred, mode, size=(16, 16)).clamp(0, 1), rtol=0, atol=0)
    assert lr.shape == (2, 3, 16, 16) and torch.equal(lr * 255, (lr * 255).round())  # JPEG's 8-bit output
    # the second order on the same draws is a different image
    gen = torch.Generator().manual_seed(3)
    kernels = torch.stack([draw_image_kernels(gen, cfg) for _ in range(2)])
    assert not torch.equal(degrade(gt, kernels, DegradationConfig(), gen, scale=4), lr)


def test_degrade_many_draws_stay_in_range():
    cfg = DegradationConfig()
    gen = torch.Generator().manual_seed(7)
    gt = photo_batch(1, 48)
    for _ in range(12):
        kernels = draw_image_kernels(gen, cfg)[None]
        lr = degrade(gt, kernels, cfg, gen, scale=4)
        assert lr.shape == (1, 3, 12, 12) and lr.min() >= 0 and lr.max() <= 1
        assert not torch.isnan(lr).any()


def test_clean_lr_is_the_block_average():
    gt = photo_batch(1, 8)
    torch.testing.assert_close(clean_lr(gt, 4)[0, :, 1, 0], gt[0, :, 4:8, 0:4].mean((1, 2)))


def test_pair_pool_returns_batches_unchanged_until_full_then_mixes():
    pool = PairPool(size=6, batch=2)
    gen = torch.Generator().manual_seed(0)

    def batch(first):  # pairs tagged by value: lr = gt = id
        ids = torch.arange(first, first + 2, dtype=torch.float32).view(2, 1, 1, 1)
        return ids.expand(2, 3, 2, 2).clone(), ids.expand(2, 3, 8, 8).clone()

    for first in (0, 2, 4):
        lr, gt = pool.exchange(*batch(first), gen)
        assert torch.equal(lr[:, 0, 0, 0], torch.tensor([first, first + 1.0]))
    seen = set()
    for first in range(6, 40, 2):
        lr, gt = pool.exchange(*batch(first), gen)
        ids = lr[:, 0, 0, 0].tolist()
        assert ids == gt[:, 0, 0, 0].tolist()  # pairs stay pairs
        assert all(i < first for i in ids)  # out of the pool, not the batch just made
        seen.update(ids)
        stored = sorted(pool.lr[:, 0, 0, 0].tolist())
        assert len(set(stored)) == 6 and {first, first + 1} <= set(stored)
    assert len(seen) > 15  # pairs from many batches come out


def test_pair_pool_off_passes_batches_through():
    pool = PairPool(size=0, batch=2)
    lr, gt = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 16, 16)
    out = pool.exchange(lr, gt, torch.Generator())
    assert out[0] is lr and out[1] is gt
