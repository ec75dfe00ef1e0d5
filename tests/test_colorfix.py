"""Colour correction: AdaIN statistics, the wavelet split, and removal of a colour cast."""

import pytest
import torch
import torch.nn.functional as F

from stablesr_min.colorfix import adain, color_fix, wavelet, wavelet_low_frequency


def images(seed: int, shape=(2, 3, 40, 56)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def stats(x):
    flat = x.flatten(2)
    return flat.mean(2), flat.var(2)


def test_adain_takes_the_style_statistics():
    content, style = images(0), 0.3 * images(1) + 0.2
    out = adain(content, style)
    (out_mean, out_var), (_, c_var), (s_mean, s_var) = stats(out), stats(content), stats(style)
    assert torch.allclose(out_mean, s_mean, atol=1e-12)
    # sigma = sqrt(var + 1e-5) on both sides, so the variance lands at var_c / (var_c + eps) * (var_s + eps).
    assert torch.allclose(out_var, c_var / (c_var + 1e-5) * (s_var + 1e-5), rtol=1e-10)
    assert torch.allclose(out_var, s_var, rtol=1e-3)


def test_adain_uses_the_unbiased_variance():
    content = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    style = torch.tensor([10.0, 10.0, 14.0, 14.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    # content: mean 1.5, unbiased var 5/3; style: mean 12, unbiased var 16/3.
    scale = ((16 / 3 + 1e-5) / (5 / 3 + 1e-5)) ** 0.5
    expected = [12 + (v - 1.5) * scale for v in (0.0, 1.0, 2.0, 3.0)]
    assert adain(content, style).flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_wavelet_of_an_image_with_itself_is_the_image():
    x = images(2)
    assert torch.allclose(wavelet(x, x), x, atol=1e-12)


def shifted_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The [1,2,1] x [1,2,1] / 16 blur written as a sum of shifted copies of the replicate-padded image."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    taps = {-1: 0.25, 0: 0.5, 1: 0.25}
    return sum(taps[i] * taps[j] * padded[..., dilation * (1 + i): dilation * (1 + i) + h,
                                          dilation * (1 + j): dilation * (1 + j) + w]
               for i in taps for j in taps)


def test_wavelet_matches_the_band_sum():
    # The reference: high = sum over 5 levels of (x_i - blur_i(x_i)), x_{i+1} = blur_i(x_i); out = high(c) + low(s).
    content, style = images(3, (1, 3, 20, 36)), images(4, (1, 3, 20, 36))

    def bands(x):
        high = torch.zeros_like(x)
        for level in range(5):
            low = shifted_blur(x, 2**level)
            high, x = high + (x - low), low
        return high, x

    assert torch.allclose(wavelet_low_frequency(content), bands(content)[1], atol=1e-12)
    assert torch.allclose(wavelet(content, style), bands(content)[0] + bands(style)[1], atol=1e-12)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_a_constant_colour_cast_is_removed(method):
    clean = images(5)
    cast = clean + torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64).reshape(1, 3, 1, 1)
    assert torch.allclose(color_fix(cast, clean, method), clean, atol=1e-9)


def test_none_returns_the_input():
    x = images(6)
    assert color_fix(x, images(7), "none") is x


def test_unknown_method():
    with pytest.raises(ValueError):
        color_fix(images(0), images(1), "histogram")
