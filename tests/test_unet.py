"""The UNet without SFT is the plain SD 2.x UNet: an SD 2.1-base-style file loads into it, not into StableSR's.

The "SD 2.1-base" file here is the golden set's StableSR weights without the time-aware encoder and without
the SFT (`spade`) layers, which is exactly how the two official checkpoints differ (official_manifest.json).
"""

import dataclasses

import pytest
import torch
from torch import nn

from stablesr_min.errors import WeightsError
from stablesr_min.unet import SFT, UNet
from stablesr_min.weights import WeightFiles, load_module, save_safetensors

from golden import filled_state_dict, relative_error

PREFIX = "model.diffusion_model."


def is_sft_key(key: str) -> bool:
    return key.startswith(PREFIX) and ".spade." in key


@pytest.fixture(scope="module")
def sd2_files(golden, tmp_path_factory) -> WeightFiles:
    manifest = {k: v for k, v in golden.manifest["stablesr"].items()
                if not is_sft_key(k) and not k.startswith("structcond_stage_model.")}
    path = tmp_path_factory.mktemp("sd2") / "sd21_base_style.safetensors"
    save_safetensors(filled_state_dict(manifest), path)
    return WeightFiles([path])


def plain_config(golden):
    return dataclasses.replace(golden.config.unet, use_sft=False)


def golden_inputs(golden):
    return golden["unet.x"], golden["unet.t"], golden["unet.context"]


def golden_struct_cond(golden) -> dict[int, torch.Tensor]:
    names = [n for n in golden.names("time_encoder") if n.startswith("feature_")]
    return {int(n[len("feature_"):]): golden[f"time_encoder.{n}"] for n in names}


class SkipSFT(nn.Module):
    """Stands in for an SFT layer: returns the features unmodulated."""

    def forward(self, h, s):
        return h


@torch.inference_mode()
def test_sd2_file_loads_with_sft_off_and_matches_stablesr_without_sft(golden, sd2_files, stablesr_files):
    plain = load_module(UNet(plain_config(golden)), sd2_files, PREFIX)
    assert not any(isinstance(m, SFT) for m in plain.modules())
    out_plain = plain(*golden_inputs(golden))
    assert out_plain.shape == golden["unet.output"].shape

    # The StableSR UNet with every SFT layer bypassed is the same network with the same weights.
    stablesr = load_module(UNet(golden.config.unet), stablesr_files, PREFIX)
    n_sft = 0
    for block in stablesr.modules():
        if isinstance(getattr(block, "spade", None), SFT):
            block.spade = SkipSFT()
            n_sft += 1
    assert n_sft == len({k.rsplit(".spade.", 1)[0] for k in golden.manifest["stablesr"] if is_sft_key(k)})
    out_bypassed = stablesr(*golden_inputs(golden), golden_struct_cond(golden))
    assert relative_error(out_plain, out_bypassed) < 1e-6


@torch.inference_mode()
def test_sft_changes_the_output(golden, sd2_files, stablesr_files):
    plain = load_module(UNet(plain_config(golden)), sd2_files, PREFIX)
    stablesr = load_module(UNet(golden.config.unet), stablesr_files, PREFIX)
    out_plain = plain(*golden_inputs(golden))
    out_sft = stablesr(*golden_inputs(golden), golden_struct_cond(golden))
    assert relative_error(out_sft, golden["unet.output"]) <= 1e-4
    assert relative_error(out_plain, out_sft) > 0.1


def test_sd2_file_refused_with_sft_on(golden, sd2_files):
    n_sft_keys = sum(is_sft_key(k) for k in golden.manifest["stablesr"])
    with pytest.raises(WeightsError) as info:
        load_module(UNet(golden.config.unet), sd2_files, PREFIX)
    msg = str(info.value)
    assert f"{n_sft_keys} missing (input_blocks.1.0.spade." in msg
    assert "unexpected" not in msg and "wrong shape" not in msg
    assert "plain Stable Diffusion 2.x checkpoint" in msg
    assert "stablesr_000117" in msg


def test_stablesr_file_refused_with_sft_off(golden, stablesr_files):
    n_sft_keys = sum(is_sft_key(k) for k in golden.manifest["stablesr"])
    with pytest.raises(WeightsError, match=rf"{n_sft_keys} unexpected \({PREFIX}input_blocks\.1\.0\.spade\."):
        load_module(UNet(plain_config(golden)), stablesr_files, PREFIX)


@torch.inference_mode()
def test_struct_cond_required_with_sft_and_refused_without(golden):
    x, t, context = golden_inputs(golden)
    with pytest.raises(ValueError, match="pass struct_cond"):
        UNet(golden.config.unet)(x, t, context)
    with pytest.raises(ValueError, match="use_sft=False"):
        UNet(plain_config(golden))(x, t, context, golden_struct_cond(golden))
