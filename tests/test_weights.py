"""The strict loader and the safe .ckpt converter."""

import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from stablesr_min.app.cli import main
from stablesr_min.app.convert import convert_ckpt
from stablesr_min.config import StableSRConfig, VAEConfig
from stablesr_min.errors import ConfigError, WeightsError
from stablesr_min.vae import AutoencoderKL
from stablesr_min.weights import WeightFiles, load_module

SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def vae_state(prefix="first_stage_model.", dtype=torch.float32):
    torch.manual_seed(0)
    return {prefix + k: v.to(dtype) for k, v in AutoencoderKL(SMALL).state_dict().items()}


def load_vae(*paths):
    return load_module(AutoencoderKL(SMALL), WeightFiles(paths), "first_stage_model.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loads_fp32_and_fp16_files_into_fp32(tmp_path, dtype):
    state = vae_state(dtype=dtype)
    save_file(state, tmp_path / "vae.safetensors")
    vae = load_vae(tmp_path / "vae.safetensors")
    for k, v in vae.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, state["first_stage_model." + k].float()), k


def test_weights_loaded_under_inference_mode_are_ordinary_tensors(tmp_path):
    # A model loaded for inference can still be fine-tuned: inference tensors could not take gradients.
    save_file(vae_state(), tmp_path / "vae.safetensors")
    with torch.inference_mode():
        vae = load_vae(tmp_path / "vae.safetensors")
    assert not any(t.is_inference() for t in vae.state_dict().values())


def test_loads_into_requested_dtype_and_meta_module(tmp_path):
    save_file(vae_state(), tmp_path / "vae.safetensors")
    with torch.device("meta"):
        vae = AutoencoderKL(SMALL)
    load_module(vae, WeightFiles([tmp_path / "vae.safetensors"]), "first_stage_model.", dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in vae.parameters()} == {"cpu"}


def test_missing_key_is_named(tmp_path):
    state = vae_state()
    del state["first_stage_model.decoder.conv_out.bias"]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "vae.safetensors")
    msg = str(e.value)
    assert "vae.safetensors" in msg and "1 missing (decoder.conv_out.bias)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key, tensor, message", [
    ("first_stage_model.decoder.extra.weight", torch.zeros(3),
     r"1 unexpected \(first_stage_model\.decoder\.extra\.weight\)"),
    ("first_stage_model.quant_conv.bias", torch.zeros(5),
     r"1 with the wrong shape \(quant_conv\.bias: file \[5\] vs model \[8\]\)"),
], ids=["unexpected", "wrong_shape"])
def test_unexpected_or_misshaped_key_is_named(tmp_path, key, tensor, message):
    state = vae_state()
    state[key] = tensor
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError, match=message):
        load_vae(tmp_path / "vae.safetensors")


def test_cfw_file_passed_as_stablesr_says_so(tmp_path):
    state = {k.removeprefix("first_stage_model."): v for k, v in vae_state().items()}
    state["decoder.fusion_layer_1.encode_enc_1.conv1.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "cfw.safetensors")
    with pytest.raises(WeightsError, match=r"This looks like the CFW checkpoint \(vqgan_cfw_00011\)$") as error:
        load_vae(tmp_path / "cfw.safetensors")
    assert error.value.kind == "cfw"  # the command line adds the option that takes it (test_cli)


def test_a_key_in_two_files_is_refused(tmp_path):
    save_file(vae_state(), tmp_path / "a.safetensors")
    save_file(vae_state(), tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match="also in"):
        load_vae(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_weights_split_over_two_files_load(tmp_path):
    state = vae_state()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, tmp_path / "a.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, tmp_path / "b.safetensors")
    vae = load_vae(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert torch.equal(vae.decoder.conv_out.weight, state["first_stage_model.decoder.conv_out.weight"])


def test_files_loaded_together_carry_one_models_config_or_a_prior_and_its_sft_parts(tmp_path):
    from stablesr_min.train.prior import prior_config, sr_config
    from stablesr_min.weights import CONFIG_METADATA_KEY

    def file(name, cfg):
        save_file({name: torch.zeros(1)}, tmp_path / name, metadata={CONFIG_METADATA_KEY: cfg.to_json()})
        return tmp_path / name

    prior = prior_config(None)
    aware = sr_config(prior)
    blind = StableSRConfig.from_dict({**aware.to_dict(), "time_encoder": {**aware.to_dict()["time_encoder"],
                                                                          "time_aware": False}})
    for files in (["p", "sr"], ["sr", "p"]):  # either order: the pair is the model with SFT
        paths = [file(n, prior if n == "p" else aware) for n in files]
        assert StableSRConfig.from_json(WeightFiles(paths).config_json()) == aware
    assert StableSRConfig.from_json(WeightFiles([file("p", prior), file("b", blind)]).config_json()) == blind
    assert StableSRConfig.from_json(WeightFiles([file("p", prior)]).config_json()) == prior
    with pytest.raises(WeightsError, match="carry the configs of two different models; load the files of one model"):
        WeightFiles([file("sr", aware), file("b", blind)]).config_json()
    wider = StableSRConfig.from_dict({**prior.to_dict(), "vae": {**prior.to_dict()["vae"], "ch": 64}})
    with pytest.raises(WeightsError, match="two different models"):
        WeightFiles([file("w", wider), file("sr", aware)]).config_json()


def test_a_ckpt_passed_as_safetensors_says_convert(tmp_path):
    torch.save({"state_dict": vae_state()}, tmp_path / "model.ckpt")
    with pytest.raises(WeightsError, match="convert it first"):
        load_vae(tmp_path / "model.ckpt")


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_vae(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------
# The .ckpt converter


@pytest.fixture
def lightning_ckpt(tmp_path):
    """A Lightning-style checkpoint whose callbacks reference a class from a module that is then gone."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"
            self.best_model_score = torch.tensor(0.25)

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(modules)
    state = vae_state()
    state["first_stage_model.decoder.conv_in.weight"] = state["first_stage_model.decoder.conv_in.weight"].half()
    shared = torch.arange(6.0)
    state["tied.a"], state["tied.b"] = shared, shared.view(2, 3)  # two views of one storage
    try:
        torch.save({
            "epoch": 3, "global_step": 1500, "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_path": "x"}, "ckpt": ModelCheckpoint()},
        }, tmp_path / "model.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    return tmp_path / "model.ckpt", state


def test_ckpt_converts_bit_exactly(lightning_ckpt, tmp_path):
    ckpt, state = lightning_ckpt
    with pytest.raises(ModuleNotFoundError):
        torch.load(ckpt, weights_only=False)  # what a plain load would need: the foreign module
    convert_ckpt(ckpt, tmp_path / "model.safetensors")
    files = WeightFiles([tmp_path / "model.safetensors"])
    assert sorted(files.keys()) == sorted(state)
    for k, v in state.items():
        got = files.tensor(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert not list(tmp_path.glob("*.tmp")), "the temp file must be renamed away"


def test_convert_command_line(lightning_ckpt, tmp_path, capsys):
    ckpt, state = lightning_ckpt
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors")]) == 0
    assert sorted(WeightFiles([tmp_path / "out.safetensors"]).keys()) == sorted(state)
    assert main(["convert", str(ckpt), str(ckpt)]) == 2
    assert "overwrite the input" in capsys.readouterr().err


class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalEvil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("make_payload", [lambda m: Evil(f"touch {m}"), lambda m: EvalEvil(m)],
                         ids=["os.system", "builtins.eval"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, make_payload, legacy):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": vae_state(), "payload": make_payload(marker)}, ckpt,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match="refused to unpickle .* is not allowed"):
        convert_ckpt(ckpt, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"hello world")
    with pytest.raises(WeightsError, match="junk.ckpt"):
        convert_ckpt(tmp_path / "junk.ckpt", tmp_path / "out.safetensors")


def test_pickle_without_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(WeightsError, match="holds no state_dict"):
        convert_ckpt(tmp_path / "list.ckpt", tmp_path / "out.safetensors")


@pytest.mark.parametrize("config, field, problem", [
    ({"unet": {"model_channels": 7}}, "unet.model_channels",
     "7 (x unet.channel_mult 1) must be a multiple of unet.norm_groups (32), which normalise its width"),
    ({"vae": {"ch_mult": []}}, "vae.ch_mult", "must be a non-empty list of whole numbers >= 1, got []"),
    ({"vae": {"nope": 1}}, "vae.nope", "is not a field of the config (its vae fields: in_channels, out_ch, ch, "
                                       "ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim, "
                                       "norm_groups)"),
    ({"nonsense": {}}, "nonsense", "is not a block of the config (the blocks: diffusion, unet, time_encoder, text, "
                                   "vae, cfw; or a diffusion field)"),
    ({"text": {"layer": "first"}}, "text.layer", 'must be one of last, penultimate, got "first"'),
    ({"unet": {"use_sft": 1}}, "unet.use_sft", "must be true or false, got 1"),
    ({"timesteps": 1.5}, "diffusion.timesteps", "must be a whole number >= 1, got 1.5"),
])
def test_a_config_that_cannot_build_the_networks_is_refused_naming_the_field(config, field, problem):
    """Checked once, where a config is built (issue 44, item 9): not an IndexError or a warning later."""
    with pytest.raises(ConfigError) as refused:
        StableSRConfig.from_dict(config)
    assert (refused.value.field, refused.value.problem) == (field, problem)
