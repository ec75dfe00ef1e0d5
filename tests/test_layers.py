"""The CPU paths of the 3x3 convolution (unfold + GEMM, Winograd F(2x2, 3x3) and F(4x4, 3x3), NNPACK, oneDNN) all
compute F.conv2d; the few-token product of `linear` computes F.linear."""

import pytest
import torch
import torch.nn.functional as F

from stablesr_min import layers
from stablesr_min.golden import relative_error
from stablesr_min.layers import F2X3, F4X3, Conv3x3, Linear, linear, winograd_conv3x3, winograd_filters

TOL = 1e-5  # float32 rounding, against a float64 reference


def reference(conv: Conv3x3, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=conv.stride, padding=1)


def path_taken(conv: Conv3x3, x: torch.Tensor, monkeypatch) -> str:
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or nnpack(*a))
    conv._winograd = None
    conv(x)
    if calls:
        return "nnpack"
    return "other" if conv._winograd is None else f"winograd F({conv._winograd[0][-1]}x{conv._winograd[0][-1]})"


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (3, 5), (16, 16), (17, 13), (32, 32), (33, 35), (64, 64), (65, 70)])
def test_conv3x3_matches_conv2d(size, stride, monkeypatch):
    torch.manual_seed(0)
    conv = Conv3x3(24, 40, stride)  # made outside inference_mode, like loaded weights
    x = torch.randn(2, 24, *size)
    with torch.inference_mode():
        out = conv(x)
        assert out.shape == reference(conv, x).shape
        assert relative_error(out, reference(conv, x)) < TOL
        pixels = ((size[0] - 1) // stride + 1) * ((size[1] - 1) // stride + 1)
        if stride == 1 and Conv3x3.GEMM_MAX_PIXELS < pixels < Conv3x3.WINOGRAD_F4_MIN_PIXELS:
            assert path_taken(conv, x, monkeypatch) == "winograd F(2x2)"
        if stride == 1 and Conv3x3.WINOGRAD_F4_MIN_PIXELS <= pixels < Conv3x3.NNPACK_MIN_PIXELS:
            assert path_taken(conv, x, monkeypatch) == "winograd F(4x4)"
        if stride == 1 and pixels >= Conv3x3.NNPACK_MIN_PIXELS and layers.NNPACK:
            assert path_taken(conv, x, monkeypatch) == "nnpack"


def test_large_maps_nnpack_cannot_take_go_to_pytorch_not_winograd(monkeypatch):
    # Winograd's tile buffers are 4x the input: it is kept to maps below NNPACK_MIN_PIXELS.
    torch.manual_seed(0)
    conv = Conv3x3(8, 6)
    x = torch.randn(1, 8, 64, 64).contiguous(memory_format=torch.channels_last)  # NNPACK needs contiguous
    with torch.inference_mode():
        assert relative_error(conv(x), reference(conv, x)) < TOL
        assert path_taken(conv, x, monkeypatch) == "other"


@pytest.mark.parametrize("f", [F2X3, F4X3], ids=["F(2x2,3x3)", "F(4x4,3x3)"])
def test_winograd_is_exact_in_float64(f):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 9, 6).double(), torch.randn(7, 5, 3, 3).double(), torch.randn(7).double()
    out = winograd_conv3x3(x, winograd_filters(weight, f), bias, f)
    assert relative_error(out, F.conv2d(x, weight, bias, padding=1)) < 1e-14


def test_winograd_filters_follow_weight_changes():
    torch.manual_seed(0)
    conv, x = Conv3x3(8, 6), torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        conv(x)
        kept = conv._winograd[1]
        conv.weight.mul_(-2)  # an in-place edit bumps the version counter
        assert relative_error(conv(x), reference(conv, x)) < TOL
        assert conv._winograd[1] is not kept
        conv.load_state_dict({"weight": torch.randn(6, 8, 3, 3), "bias": torch.randn(6)}, assign=True)
        assert relative_error(conv(x), reference(conv, x)) < TOL
        larger = torch.randn(1, 8, 32, 32)  # needs F(4x4, 3x3): its filters replace the F(2x2, 3x3) ones
        assert relative_error(conv(larger), reference(conv, larger)) < TOL
        assert conv._winograd[0][-1] == 4 and conv._winograd[1].shape == (36, 6, 8)
    torch.nn.Sequential(conv).to(torch.float64)  # moving the weights drops the kept filters with them
    assert conv._winograd is None


def test_kept_filters_are_freed_when_a_map_takes_another_path():
    # A layer keeps filters for the one map size it sees in an upscale; a map that takes the GEMM path,
    # NNPACK or PyTorch's convolution frees them (an upscale of a larger image would otherwise hold both).
    torch.manual_seed(0)
    conv = Conv3x3(8, 6)
    with torch.no_grad():
        for size, kept in [(16, True), (64, False), (32, True), (8, False)]:
            x = torch.randn(1, 8, size, size)
            assert relative_error(conv(x), reference(conv, x)) < TOL
            assert (conv._winograd is not None) == kept, size


def test_winograd_is_skipped_where_it_could_be_stale_or_cut_gradients(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 16)
    conv = Conv3x3(8, 6)
    out = conv(x)  # autograd on: PyTorch's convolution, gradients reach the weights
    out.sum().backward()
    assert conv.weight.grad is not None and conv._winograd is None
    with torch.inference_mode():
        made_in_inference_mode = Conv3x3(8, 6)  # no version counter: an in-place edit could not be seen
        assert relative_error(made_in_inference_mode(x), reference(made_in_inference_mode, x)) < TOL
        assert made_in_inference_mode._winograd is None
    monkeypatch.setattr(Conv3x3, "KEEP_WINOGRAD_FILTERS", False)
    with torch.no_grad():
        assert relative_error(conv(x), reference(conv, x)) < TOL
        assert conv._winograd is None


def test_torch_compile_gets_pytorchs_convolution(monkeypatch):
    # The CPU paths check weight versions and keep filters, which a compiler cannot trace: under
    # torch.compile every map takes PyTorch's convolution (compiling the golden UNet failed without this).
    torch.manual_seed(0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    conv = Conv3x3(8, 6)
    with torch.inference_mode():
        for size in (16, 32, 64):
            x = torch.randn(1, 8, size, size)
            assert relative_error(conv(x), reference(conv, x)) < TOL
            assert path_taken(conv, x, monkeypatch) == "other"


@pytest.mark.parametrize("shape", [(5,), (1, 64, 5), (2, 3, 5), (1, 65, 5), (0, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_for_few_and_many_rows(shape, bias):
    torch.manual_seed(0)
    layer = Linear(5, 7, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
        assert out.shape == (*shape[:-1], 7)
        assert torch.allclose(out, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        assert torch.allclose(linear(x, layer.weight, layer.bias), out)
        rows = x.numel() // 5
        assert out.is_contiguous() == (not 1 < rows <= Linear.TRANSPOSED_MAX_ROWS)  # (W x^T)^T is a transposed view
