"""One test per golden case: the official code's numbers, reproduced (FORMAT.md, relative L2 <= 1e-4).

The set is read from STABLESR_GOLDEN (default tests/golden); every size and setting comes from its files.
A case that the set does not contain is skipped with that reason (the public set has no `schedule` or
`colorfix` case; their unit tests live in test_schedule.py and test_colorfix.py).
"""

import pytest
import torch

from stablesr_min.cfw import CFWAutoencoder
from stablesr_min.golden import relative_error
from stablesr_min.vae import AutoencoderKL
from stablesr_min.weights import load_module

TOL = 1e-4


def needs_case(golden, case):
    if case not in golden.cases:
        pytest.skip(f"golden set {golden.path} has no {case!r} case")


def assert_close(ours, ref, what):
    err = relative_error(ours, ref)
    assert err <= TOL, f"{what}: relative L2 error {err:.3g} > {TOL}"


@torch.inference_mode()
def test_vae(golden, stablesr_files):
    needs_case(golden, "vae")
    vae = load_module(AutoencoderKL(golden.config.vae), stablesr_files, "first_stage_model.")
    assert_close(vae.moments(golden["vae.image"]), golden["vae.moments"], "moments")
    assert_close(vae.decode(golden["vae.latent"]), golden["vae.decoded"], "decoded")


@torch.inference_mode()
def test_cfw(golden, cfw_files):
    needs_case(golden, "cfw")
    cfw = load_module(CFWAutoencoder(golden.config.cfw), cfw_files, "")
    moments, features = cfw.encode_with_features(golden["cfw.image"])
    assert_close(moments, golden["cfw.moments"], "moments")
    stored = [n for n in golden.names("cfw") if n.startswith("enc_fea_")]
    assert len(features) == len(stored)
    for i, feature in enumerate(features):
        assert_close(feature, golden[f"cfw.enc_fea_{i}"], f"enc_fea_{i}")
    for name in (n for n in golden.names("cfw") if n.startswith("decoded_w")):
        w = float(name.removeprefix("decoded_w").replace("p", "."))
        assert_close(cfw.decode(golden["cfw.latent"], features, w), golden[f"cfw.{name}"], name)


@pytest.mark.xfail(strict=True, reason="text encoder: issue #3")
@torch.inference_mode()
def test_text(golden, stablesr_files):
    needs_case(golden, "text")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="time-aware encoder: issue #3")
@torch.inference_mode()
def test_time_encoder(golden, stablesr_files):
    needs_case(golden, "time_encoder")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="UNet with SFT: issue #3")
@torch.inference_mode()
def test_unet(golden, stablesr_files):
    needs_case(golden, "unet")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="schedule: issue #4")
def test_schedule(golden):
    needs_case(golden, "schedule")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="colour correction: issue #4")
def test_colorfix(golden):
    needs_case(golden, "colorfix")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="aggregation sampler: issue #4")
@torch.inference_mode()
def test_canvas_step(golden, stablesr_files):
    needs_case(golden, "canvas_step")
    raise NotImplementedError


@pytest.mark.xfail(strict=True, reason="pipeline: issue #4")
@torch.inference_mode()
def test_pipeline(golden, stablesr_files, cfw_files):
    needs_case(golden, "pipeline")
    raise NotImplementedError
