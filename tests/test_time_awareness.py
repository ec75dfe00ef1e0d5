"""The time embedding reaches what it should: the networks' outputs change with t.

A ResBlock adds its time embedding per channel just before a GroupNorm; with one channel per group that
norm subtracts the embedding again, and the block computes the same thing at every t. The first tiny model
was built so (widths 32 with 32 groups): its "time-aware" encoder was time-blind by construction. These
tests catch the class: the check that names such blocks, the sizes the project ships, the shipped weights,
and the recipe and training commands that refuse or warn.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stablesr_min.app.analysis import relative_change, t_sensitivity
from stablesr_min.app.cli import main
from stablesr_min.app.metrics import lowpass_colour_error
from stablesr_min.config import StableSRConfig
from stablesr_min.model import StableSR, load_stablesr, time_blind_layers, time_blindness
from stablesr_min.tiny import TINY_DIR, TINY_FILES, tiny_stablesr_files
from stablesr_min.train.networks import default_init
from stablesr_min.train.prior import prior_config, sr_config

from photos import PHOTOS
from run_files import load_recipe

ROOT = Path(__file__).resolve().parent.parent
# Relative change of an output across t = 0, 100, 500, 999 that counts as "responds to t". The time-blind
# encoder of the first tiny model moved by about 1e-7 (rounding); one that sees t moves by 1e-2 or more.
RESPONDS = 1e-2


def tiny_config(norm_groups: int | None = None) -> StableSRConfig:
    """The tiny StableSR as `train sr` builds it; with `norm_groups`, the UNet's and encoder's groups changed
    (32: the first tiny model's, one channel per group at width 32)."""
    cfg = sr_config(prior_config(None)).to_dict()
    if norm_groups is not None:
        cfg["unet"]["norm_groups"] = cfg["time_encoder"]["norm_groups"] = norm_groups
    return StableSRConfig.from_dict(cfg)


def random_model(cfg: StableSRConfig) -> StableSR:
    """Every layer at PyTorch's default initialisation (not the official zero-init of the residual branches'
    last convs, which makes every block its skip path at the start, whatever t)."""
    model = StableSR(cfg)
    default_init([model], 0)
    return model.eval()


def lr_latent(cfg: StableSRConfig) -> torch.Tensor:
    return torch.randn(1, cfg.unet.in_channels, 32, 32, generator=torch.Generator().manual_seed(1))


def test_relative_change_on_known_cases():
    a = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert relative_change([a, a.clone(), a.clone()]) == 0
    assert relative_change([a, 2 * a, a]) == pytest.approx(1.0)
    assert relative_change([a, a, 0.5 * a]) == pytest.approx(0.5)


def test_lowpass_colour_error_on_known_cases():
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 200
    assert lowpass_colour_error(img, img).item() == 0
    assert lowpass_colour_error(img + 6, img).item() == pytest.approx(6)
    shifted = img.clone()
    shifted[:, 1] += 9  # a green cast on one channel of three
    assert lowpass_colour_error(shifted, img).item() == pytest.approx(3)
    # texture with the same block means is not a colour error
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 20.0 - 10
    assert lowpass_colour_error(img + checker, img).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="multiples of 16"):
        lowpass_colour_error(img[..., :30], img[..., :30])


def test_the_check_names_blocks_with_one_channel_groups():
    assert time_blind_layers(tiny_config()) == []
    assert time_blind_layers(StableSRConfig()) == []  # the official networks: widths >= 128 with 32 groups
    old = time_blind_layers(tiny_config(norm_groups=32))
    # every encoder block at width 32, the UNet's top level and its output heads
    assert "structcond_stage_model.input_blocks.1.0" in old and "structcond_stage_model.fea_tran.0" in old
    assert "model.diffusion_model.input_blocks.1.0" in old
    assert all(name.startswith(("model.diffusion_model.", "structcond_stage_model.")) for name in old)
    golden = StableSRConfig.from_dict(json.loads((ROOT / "tests" / "golden" / "cases.json").read_text())["config"])
    assert time_blind_layers(golden), "the golden test models mirror the reference's tiny widths"
    assert time_blindness(tiny_config()) is None
    assert time_blindness(tiny_config(norm_groups=32)).startswith(
        "model.diffusion_model.input_blocks.1.0 and 10 more residual blocks add the time embedding right before a "
        "GroupNorm of one channel per group")


def test_the_tiny_networks_respond_to_t_and_the_first_ones_did_not():
    cfg = tiny_config()
    now = t_sensitivity(random_model(cfg), lr_latent(cfg))
    assert now["encoder"] > RESPONDS and now["unet"] > RESPONDS
    before = t_sensitivity(random_model(tiny_config(norm_groups=32)), lr_latent(cfg))
    assert before["encoder"] < 1e-5  # the defect: exactly cancelled, up to rounding


def test_the_shipped_encoder_responds_to_t():
    model = load_stablesr(tiny_stablesr_files("time_aware"), dtype=torch.float32)
    assert time_blind_layers(model.cfg) == []
    sensitivity = t_sensitivity(model, lr_latent(model.cfg))
    assert sensitivity["encoder"] > RESPONDS and sensitivity["unet"] > RESPONDS, sensitivity


def test_both_shipped_variants_trained_their_time_embeddings():
    """The time-embedding tensors of the time-aware and time-blind encoders (trained from the same seed) differ
    as their other tensors do: both received gradients (the first model's differed by 0.03 %, the rest by 4-13 %)."""
    from safetensors.torch import load_file

    aware, blind = (load_file(TINY_DIR / TINY_FILES[name]) for name in ("sr", "sr_time_blind"))

    def change(key: str) -> float:
        return ((aware[key].float() - blind[key].float()).norm() / blind[key].float().norm()).item()

    encoder = [k for k in aware if k.startswith("structcond_stage_model.") and k.endswith(".weight")]
    time_embed = [change(k) for k in encoder if ".time_embed." in k or ".emb_layers." in k]
    others = sorted(change(k) for k in encoder if ".time_embed." not in k and ".emb_layers." not in k)
    assert time_embed and min(time_embed) > 0.25 * others[len(others) // 2], (time_embed, others[len(others) // 2])


# ------------------------------------------------------------------------------------------------------
# The recipe refuses, the training commands warn


def test_the_recipe_refuses_networks_that_cannot_see_t():
    recipe = load_recipe()
    recipe.refuse_time_blind(tiny_config(), "train")  # the shipped sizes pass
    with pytest.raises(SystemExit) as stop:
        recipe.refuse_time_blind(tiny_config(norm_groups=32), "ship")
    assert str(stop.value).startswith("train_tiny: will not ship this model: model.diffusion_model.input_blocks.1.0 "
                                      "and 10 more residual blocks add the time embedding")


def test_train_vae_warns_in_one_line_about_sizes_that_cannot_see_t(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(PHOTOS / "rocket.jpg").crop((0, 0, 64, 64)).save(photos / "rocket.png")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"unet": {"norm_groups": 32}}))
    code = main(["train", "vae", "--data", str(photos), "--out", str(tmp_path / "vae"), "--steps", "1",
                 "--batch-size", "1", "--crop", "32", "--config", str(config), "--val-every", "0"])
    assert code == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert warnings == [f"WARNING: {time_blindness(tiny_config(norm_groups=32))}"]
