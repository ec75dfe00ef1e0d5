"""Training the tiny diffusion prior: `train vae`, then `train unet` on that VAE, then `train sr --base` on
the result. What trains, what stays bit-identical, resume, the checkpoint's module tree, and bad input.
Runs here are 32 px crops, batch 2, a few steps, at the default tiny sizes.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from stablesr_min.app.cli import main
from stablesr_min.config import StableSRConfig
from stablesr_min.config import TINY_SIZES
from stablesr_min.errors import OptionError
from stablesr_min.model import StableSR, load_stablesr, load_vae
from stablesr_min.text import TextEncoder
from stablesr_min.train import loop
from stablesr_min.train import run_folder as training
from stablesr_min.train.data import CleanCrops, hue_rotate
from stablesr_min.train.processes import derive_seeds
from stablesr_min.train.networks import default_init
from stablesr_min.train.prior import UNetOptions, VAEOptions, init_text_encoder, prior_config
from stablesr_min.vae import AutoencoderKL

from photos import PHOTOS
from run_files import (assert_a_resume_kept_every_option, assert_same_run, ctrl_c_after_step_1, flags, log, metadata,
                       tensors)

RUN_ARGS = ["--batch-size", "2", "--crop", "32", "--seed", "0"]


def train(what: str, *args) -> int:
    return main(["train", what, *map(str, args)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two photos of different sizes and modes, one smaller than the crop."""
    folder = tmp_path_factory.mktemp("photos")
    Image.open(PHOTOS / "rocket.jpg").crop((200, 100, 296, 172)).save(folder / "rocket_96x72.jpg")
    Image.open(PHOTOS / "camera.png").crop((200, 100, 230, 140)).save(folder / "camera_30x40_grey.png")
    return folder


@pytest.fixture(scope="module")
def vae_run(photos, tmp_path_factory) -> Path:
    """An uninterrupted 3-step VAE run, validation every 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert train("vae", "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2) == 0
    return out


@pytest.fixture(scope="module")
def unet_run(vae_run, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "unet"
    assert train("unet", "--vae", vae_run / "last.safetensors", "--data", photos, "--out", out, "--steps", 3,
                 *RUN_ARGS, "--val-every", 2) == 0
    return out


def test_clean_crops_are_flipped_crops_in_0_1(photos):
    crops = CleanCrops([photos], 32, 3, seed=1)
    batch = crops.next_batch()
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1


def test_hue_rotate_turns_colours_about_the_grey_axis():
    pixels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.3, 0.4]]).T.reshape(3, 2, 2)
    turned = hue_rotate(pixels, 2 * math.pi / 3).reshape(3, 4).T
    expected = torch.tensor([[0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0.4, 0.2, 0.3]])  # (r, g, b) -> (b, r, g)
    assert torch.allclose(turned, expected, atol=1e-6)
    assert torch.allclose(hue_rotate(pixels, 2 * math.pi), pixels, atol=1e-6)
    muted = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    quarter = hue_rotate(muted, math.pi / 2)  # nothing clipped: the grey component (the channels' sum) stays
    assert torch.allclose(quarter.sum(0), muted.sum(0), atol=1e-6) and not torch.allclose(quarter, muted, atol=0.05)


def test_clean_crops_turn_hues_with_the_given_probability_only(photos, tmp_path):
    (tmp_path / "rocket.jpg").write_bytes((photos / "rocket_96x72.jpg").read_bytes())  # the colour photo alone
    plain = CleanCrops([tmp_path], 32, 2, seed=3).next_batch()
    assert torch.equal(CleanCrops([tmp_path], 32, 2, seed=3, hue_rotation=0.0).next_batch(), plain)  # no draw at 0
    turned = CleanCrops([tmp_path], 32, 2, seed=3, hue_rotation=1.0).next_batch()
    # the first crop is cut from the same place (the hue draws come after it), in other colours
    assert not torch.allclose(turned[0], plain[0], atol=0.02)
    unclipped = (turned[0] > 0.01).all(0) & (turned[0] < 0.99).all(0)
    assert unclipped.float().mean() > 0.5
    assert torch.allclose(turned[0].sum(0)[unclipped], plain[0].sum(0)[unclipped], atol=1e-5)
    with pytest.raises(OptionError, match=r"^hue_rotation must be a probability in \[0, 1\], got 1.5$"):
        CleanCrops([photos], 32, 2, hue_rotation=1.5)


def test_train_vae_writes_a_loadable_vae_and_every_parameter_trains(vae_run):
    assert sorted(p.name for p in vae_run.iterdir()) == ["last.safetensors", "log.jsonl", "state.safetensors"]
    records = log(vae_run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(records[1]) == ["kl", "l1", "loss", "lr", "seconds", "step", "val_loss"]
    assert all(r["loss"] > 0 and r["kl"] > 0 and r["lr"] == 5e-4 for r in records)

    vae = load_vae(vae_run / "last.safetensors")  # the strict loader
    cfg = StableSRConfig.from_json(metadata(vae_run / "last.safetensors")["stablesr_min.config"])
    assert cfg.vae.ch == 32 and cfg.vae.ch_mult == (1, 2, 2) and vae.downscale == 4
    start = AutoencoderKL(cfg.vae)
    default_init([start], derive_seeds(0, ["data", "noise", "init", "validation"])["init"])
    trained = vae.state_dict()
    for key, value in start.state_dict().items():
        assert not torch.equal(value, trained[key]), f"{key} did not train"

    state = training.TrainState.from_file(vae_run / "state.safetensors")
    assert sorted(state.weights) == sorted(tensors(vae_run / "last.safetensors"))
    assert state.options["crop"] == 32 and state.options["kl_weight"] == 1e-6 and state.options["hue_rotation"] == 0


def test_a_vae_run_stopped_by_ctrl_c_and_resumed_equals_an_uninterrupted_one(vae_run, photos, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "b"
    with ctrl_c_after_step_1(monkeypatch):
        code = train("vae", "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2)
    assert code == 130 and metadata(out / "last.safetensors")["stablesr_min.step"] == "1"
    assert train("vae", "--out", out, "--steps", 3, "--resume") == 0

    assert_same_run(out, vae_run)


def test_decayed_lr_is_constant_then_falls_linearly_over_the_last_steps():
    assert [loop.decayed_lr(1.0, s, 10, 4) for s in range(10)] == [1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [loop.decayed_lr(1.0, s, 3, 0) for s in range(3)] == [1, 1, 1]  # 0: constant
    assert loop.decayed_lr(1.0, 0, 3, 6) == 0.5  # longer than the run: it starts lower


def test_lr_decay_takes_the_last_steps_down_and_a_resumed_run_keeps_it(vae_run, photos, tmp_path, monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train("vae", "--data", photos, "--out", whole, "--steps", 3, *RUN_ARGS, "--val-every", 2,
                 "--lr-decay", 2) == 0
    assert [r["lr"] for r in log(whole)] == [5e-4, 5e-4, 2.5e-4]
    assert training.TrainState.from_file(whole / "state.safetensors").options["lr_decay"] == 2
    ours, constant = tensors(whole / "last.safetensors"), tensors(vae_run / "last.safetensors")
    assert any(not torch.equal(ours[k], constant[k]) for k in ours)  # the last step's smaller lr mattered

    with ctrl_c_after_step_1(monkeypatch):
        assert train("vae", "--data", photos, "--out", stopped, "--steps", 3, *RUN_ARGS, "--val-every", 2,
                     "--lr-decay", 2) == 130
    assert train("vae", "--out", stopped, "--steps", 3, "--resume") == 0  # the stored --lr-decay
    assert_same_run(stopped, whole)


@pytest.mark.parametrize("what", ["vae", "unet"])
def test_a_resumed_run_keeps_every_option_it_was_started_with(what, vae_run, photos, tmp_path):
    """`--resume` alone continues with the options of the run's start, the stored ones (dtype, intervals,
    lr decay) too."""
    out = tmp_path / "run"
    started = {"data": [str(photos.resolve())], "batch_size": 2, "crop": 32, "seed": 3, "lr": 1e-4, "dtype": "bfloat16",
               "save_every": 7, "val_every": 0, "lr_decay": 5}
    started |= {"kl_weight": 1e-5, "hue_rotation": 0.5} if what == "vae" else \
        {"vae": str((vae_run / "last.safetensors").resolve())}
    assert train(what, "--out", out, "--steps", 1, *flags(started)) == 0
    assert train(what, "--out", out, "--steps", 2, "--resume") == 0
    assert_a_resume_kept_every_option(out, VAEOptions if what == "vae" else UNetOptions, started)


def test_train_unet_writes_the_sd2_tree_with_the_vae_and_text_encoder_untouched(unet_run, vae_run):
    checkpoint = tensors(unet_run / "last.safetensors")
    cfg = StableSRConfig.from_json(metadata(unet_run / "last.safetensors")["stablesr_min.config"])
    assert cfg.unet.use_sft is False and cfg.unet.model_channels == 32 and cfg.text.width == 32
    assert cfg.vae == load_vae(vae_run / "last.safetensors").cfg
    assert 0 < cfg.diffusion.scale_factor != 0.18215  # measured on the data (scale_by_std)
    with torch.device("meta"):
        assert sorted(checkpoint) == sorted(StableSR(cfg).state_dict())

    vae = tensors(vae_run / "last.safetensors")
    assert all(torch.equal(checkpoint[k], v) for k, v in vae.items())
    text = TextEncoder(cfg.text)
    init_text_encoder(text, derive_seeds(0, ["data", "noise", "init", "text", "scale", "validation"])["text"])
    for key, value in text.state_dict().items():
        assert torch.equal(checkpoint[f"cond_stage_model.model.{key}"], value), f"{key} is frozen but changed"
    assert text.token_embedding.weight.std() > 0.01  # random, not zeros

    state = training.TrainState.from_file(unet_run / "state.safetensors")
    assert sorted(state.weights) == sorted(k for k in checkpoint if k.startswith("model.diffusion_model."))
    assert [r["step"] for r in log(unet_run)] == [1, 2, 3] and "val_loss" in log(unet_run)[1]
    load_stablesr([unet_run / "last.safetensors"])  # loads strictly


def test_the_time_aware_encoder_is_sized_to_the_tiny_unet(tmp_path):
    cfg = prior_config(None)
    assert cfg.time_encoder.out_channels == cfg.unet.semb_channels == 32
    assert len(cfg.time_encoder.channel_mult) == len(cfg.unet.channel_mult)
    path = tmp_path / "wider.json"
    path.write_text(json.dumps({"unet": {"model_channels": 64, "semb_channels": 64}}))
    wider = prior_config(str(path))
    assert wider.unet.model_channels == 64 and wider.unet.channel_mult == tuple(TINY_SIZES["unet"]["channel_mult"])
    assert wider.time_encoder.model_channels == wider.time_encoder.out_channels == 64


def test_train_sr_fine_tunes_on_the_prior(unet_run, photos, tmp_path):
    out = tmp_path / "sr"
    assert train("sr", "--base", unet_run / "last.safetensors", "--data", photos, "--out", out, "--steps", 1,
                 "--batch-size", 2, "--gt-size", 64, "--val-every", 1) == 0
    model = load_stablesr([out / "last.safetensors"])
    assert model.cfg.unet.use_sft and model.time_encoder is not None
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors(unet_run / "last.safetensors").items())


def test_train_sr_and_cfw_take_the_shipped_prior_as_their_base(tmp_path, capsys):
    """The shipped prior.safetensors carries its config (without SFT), as `train unet`'s checkpoint does."""
    from stablesr_min.tiny import TINY_DIR, TINY_FILES

    prior = TINY_DIR / TINY_FILES["prior"]
    assert train("sr", "--base", prior, "--data", PHOTOS, "--out", tmp_path / "sr", "--steps", 1,
                 "--batch-size", 1, "--gt-size", 64) == 0
    model = load_stablesr([tmp_path / "sr" / "last.safetensors"])
    assert model.cfg.unet.use_sft and model.cfg.unet.norm_groups == 8  # the shipped sizes, not the official
    assert main(["train", "cfw", "--cfw-base", str(prior), "--data", str(tmp_path / "no_samples"), "--out",
                 str(tmp_path / "cfw"), "--steps", "1"]) == 2
    # the base is read first and taken (it was refused: "does not fit the VAE"); what is missing is the data
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'no_samples'}: no such folder (make one with "
                                            "`train cfw-data`)\n")


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty")


# case: (command, options changed from a good command, the error line)
BAD_INPUTS = {
    "vae: no images": ("vae", {"--data": "{empty}"}, "error: {empty}: no images found"),
    "vae: no data": ("vae", {"--data": None}, "error: train vae needs --data DIR (or --resume to continue a run)"),
    "vae: crop": ("vae", {"--crop": "30"}, "error: --crop 30: must be a multiple of 4, so that every level of "
                                           "the networks is whole"),
    "vae: lr decay": ("vae", {"--lr-decay": "-1"}, "error: --lr-decay must be >= 0, got -1"),
    "vae: hue rotation": ("vae", {"--hue-rotation": "2"}, "error: --hue-rotation must be a probability in [0, 1], "
                                                          "got 2"),
    "unet: no images": ("unet", {"--data": "{empty}"}, "error: {empty}: no images found"),
    "unet: a CFW file as --vae": ("unet", {"--vae": "{cfw}"}, "error: {cfw}: --vae needs a VAE written by `train vae` "
                                                             "(or an SD 2.x or StableSR checkpoint), but this is the "
                                                             "CFW checkpoint (vqgan_cfw_00011)"),
    "unet: not safetensors": ("unet", {"--vae": "{log}"}, "error: {log}: not a readable safetensors file"),
    "unet: bad sizes": ("unet", {"--config": "{bad_config}"}, "error: --config {bad_config}: unet.model_channels 44 (x "
                                                               "unet.channel_mult 1) must be a multiple of "
                                                               "unet.norm_groups (8), which normalise its width"),
    # a config that cannot build a network, or that names what a config has not: one line naming the field
    "vae: no levels": ("vae", {"--config": "{no_levels}"}, "error: --config {no_levels}: vae.ch_mult must be a "
                                                           "non-empty list of whole numbers >= 1, got []"),
    "vae: unknown block": ("vae", {"--config": "{unknown_block}"}, "error: --config {unknown_block}: nonsense is not a "
                                                                   "block of the config (the blocks: diffusion, unet, "
                                                                   "time_encoder, text, vae, cfw; or a diffusion field)"),
    "vae: unknown field": ("vae", {"--config": "{unknown_field}"}, "error: --config {unknown_field}: vae.nope is not a "
                                                                   "field of the config (its vae fields: in_channels, "),
    "vae: a block that is not one": ("vae", {"--config": "{not_a_block}"}, "error: --config {not_a_block}: vae must be "
                                                                           "an object of fields, got 3"),
    "unet: crop": ("unet", {"--crop": "40"}, "error: --crop 40: must be a multiple of 16, so that every level of "
                                             "the networks is whole"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(case, photos, vae_run, golden_weights, empty_folder, tmp_path,
                                               capsys):
    configs = {"bad_config": {"unet": {"model_channels": 44}},  # GroupNorm has 8 groups
               "no_levels": {"vae": {"ch_mult": []}}, "unknown_block": {"nonsense": {"a": 1}},
               "unknown_field": {"vae": {"nope": 1}}, "not_a_block": {"vae": 3}}
    for name, config in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    names = {"empty": empty_folder, "cfw": golden_weights[1], "log": vae_run / "log.jsonl",
             **{name: tmp_path / f"{name}.json" for name in configs}}
    what, changes, expected = BAD_INPUTS[case]
    options = {"--data": photos, "--out": tmp_path / "new", "--steps": 2, "--crop": 32}
    if what == "unet":
        options["--vae"] = vae_run / "last.safetensors"
    options |= {k: v.format(**names) if v else v for k, v in changes.items()}
    code = train(what, *[x for option, value in options.items() if value is not None for x in (option, value)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected.format(**names)) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists(), "a refused run writes nothing"


@pytest.mark.parametrize("command", ["vae", "unet", "cfw-data"])
def test_the_one_process_commands_are_refused_under_torchrun(command, monkeypatch, capsys, tmp_path):
    """Under torchrun with several processes, refused before any work: one line, from each machine's first process
    (LOCAL_RANK 0), and exit code 2 from every process (what torchrun then prints: tests/test_distributed.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", command, "--out", str(tmp_path / "out"), *(["--count", "1"] if command == "cfw-data" else
                                                                 ["--steps", "1"])]
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as end:
        main(argv)
    assert end.value.code == 2 and capsys.readouterr() == ("", "")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: train {command} runs as one process, not under torchrun: start it with "
                                       f"`python -m stablesr_min train {command} ...` (only `train sr` and `train cfw` "
                                       "run under torchrun)\n")
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(photos, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", "vae", "--data", str(photos), "--out", str(blocker / "run"), "--steps", "1"]) == 2
    assert capsys.readouterr().err == f"error: --out {blocker / 'run'}: {blocker} is a file, not a folder; choose another folder\n"
    for command in (["vae", "--data", str(photos), "--steps", "1"], ["cfw-data", "--weights", "w.safetensors", "--data",
                                                                      str(photos), "--count", "1"]):
        assert main(["train", *command, "--out", str(blocker)]) == 2  # --out itself a file
        assert capsys.readouterr().err == f"error: --out {blocker}: {blocker} is a file, not a folder; choose another folder\n"
