"""Training StableSR (Sec. 3.1) on the golden-size weights: what trains and what stays frozen, resume,
the time-blind ablation, Stable Diffusion 2.x bases, and the `train sr` command line.

The objective itself is checked number by number against the official trainer in test_golden.py
(`test_train_step`). Runs here are 64 px crops, batch 2, a few steps.
"""

import contextlib
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from stablesr_min.app.cli import main
from stablesr_min.config import StableSRConfig
from stablesr_min.errors import UsageError
from stablesr_min.model import load_stablesr
from stablesr_min.pipeline import StableSRPipeline, UpscaleOptions, text_context
from stablesr_min.time_encoder import AttentionBlock
from stablesr_min.train import run_folder as training
from stablesr_min.train.loop import StopRequest
from stablesr_min.train import sr as train_module
from stablesr_min.train.sr import base_config, is_trainable, load_base
from stablesr_min.unet import SFT, ResBlock, timestep_embedding
from stablesr_min.weights import config_metadata, save_safetensors

from photos import PHOTOS
from run_files import (assert_a_resume_kept_every_option, assert_same_run, ctrl_c_after_step_1, flags, log, metadata,
                       signals_after_step, tensors)

RUN_ARGS = ["--batch-size", "2", "--gt-size", "64", "--seed", "0"]


def train(*args) -> int:
    return main(["train", "sr", *map(str, args)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three photos of different sizes and modes, one in a subfolder, one smaller than the crop."""
    folder = tmp_path_factory.mktemp("photos")
    Image.open(PHOTOS / "rocket.jpg").crop((200, 100, 296, 172)).save(folder / "rocket_96x72.jpg")
    Image.open(PHOTOS / "camera.png").crop((200, 100, 250, 140)).save(folder / "camera_50x40_grey.png")
    (folder / "sub").mkdir()
    Image.open(PHOTOS / "astronaut.png").crop((150, 50, 230, 150)).save(folder / "sub" / "astronaut_80x100.png")
    return folder


@pytest.fixture(scope="module")
def base(golden_weights) -> Path:
    return golden_weights[0]


@pytest.fixture(scope="module")
def run_a(base, photos, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run, validation every 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "a"
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2) == 0
    return out


@pytest.fixture(scope="module")
def sd2_base(base, tmp_path_factory) -> Path:
    """The golden weights as a plain Stable Diffusion 2.x file: no time-aware encoder, no SFT layers."""
    cfg = StableSRConfig.from_json(metadata(base)["stablesr_min.config"])
    cfg.unet.use_sft = False
    path = tmp_path_factory.mktemp("sd2") / "sd2.safetensors"
    save_safetensors({k: v for k, v in tensors(base).items() if not is_trainable(k)}, path,
                     config_metadata(cfg.to_json()))
    return path


def test_frozen_tensors_stay_bit_identical_and_every_trainable_one_changes(run_a, base):
    before, after = tensors(base), tensors(run_a / "last.safetensors")
    assert sorted(before) == sorted(after)
    trainable = [k for k in before if is_trainable(k)]
    assert trainable and any(".spade." in k for k in trainable)
    for key in before:
        if is_trainable(key):
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"{key} is frozen but changed"


def test_a_run_writes_its_checkpoint_log_and_state(run_a):
    assert sorted(p.name for p in run_a.iterdir()) == ["last.safetensors", "log.jsonl", "state.safetensors"]
    records = log(run_a)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [sorted(r) for r in records] == [["loss", "lr", "seconds", "step"],
                                            ["loss", "lr", "seconds", "step", "val_loss"],
                                            ["loss", "lr", "seconds", "step"]]
    assert all(r["lr"] == 5e-5 and r["loss"] > 0 and r["seconds"] > 0 for r in records)
    checkpoint = metadata(run_a / "last.safetensors")
    assert checkpoint["stablesr_min.step"] == "3"
    assert StableSRConfig.from_json(checkpoint["stablesr_min.config"]).time_encoder.time_aware
    state = training.TrainState.from_file(run_a / "state.safetensors")
    assert state.step == 3 and state.options["batch_size"] == 2 and state.options["gt_size"] == 64
    assert sorted(state.weights) == sorted(k for k in tensors(run_a / "last.safetensors") if is_trainable(k))
    assert len(state.optimizer["state"]) == len(state.weights)  # Adam's moments for every trainable tensor
    assert sorted(state.generators) == ["noise"] and "generator" in state.data


@pytest.mark.training
def test_a_run_stopped_by_ctrl_c_and_resumed_equals_an_uninterrupted_one(run_a, base, photos, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "b"
    with ctrl_c_after_step_1(monkeypatch):
        code = train("--base", base, "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2)
    assert code == 130  # stopped, after saving step 1
    assert metadata(out / "last.safetensors")["stablesr_min.step"] == "1" and len(log(out)) == 1
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 3, "--resume") == 0

    assert_same_run(out, run_a)


@pytest.mark.training
def test_sigterm_stops_like_ctrl_c_saving_the_step_and_the_resume_is_bit_identical(run_a, base, photos, tmp_path,
                                                                                     monkeypatch, capsys):
    """A scheduler's stop (SIGTERM) finishes the step under way, saves it and exits 143 with the resume hint."""
    out = tmp_path / "b"
    with ctrl_c_after_step_1(monkeypatch, signal.SIGTERM):
        code = train("--base", base, "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2)
    err = capsys.readouterr().err
    assert code == 143 and "stopped at step 1 of 3; continue with --resume" in err and err.endswith("terminated\n")
    assert metadata(out / "last.safetensors")["stablesr_min.step"] == "1" and len(log(out)) == 1
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 3, "--resume") == 0
    assert_same_run(out, run_a)


def test_a_resumed_run_keeps_every_option_it_was_started_with(base, photos, tmp_path):
    """`--resume` alone continues with the options of the run's start, the stored ones (dtype, intervals,
    checkpointing) too."""
    out = tmp_path / "run"
    started = {"base": [str(base.resolve())], "data": [str(photos.resolve())], "batch_size": 2, "gt_size": 64,
               "seed": 3, "lr": 1e-4, "degradation": "first-order", "skip_small": "off", "dtype": "bfloat16",
               "save_every": 7, "val_every": 0, "checkpointing": True}
    assert train("--out", out, "--steps", 1, *flags(started)) == 0
    assert train("--out", out, "--steps", 2, "--resume") == 0
    assert_a_resume_kept_every_option(out, train_module.SROptions, started)


def test_train_sr_runs_from_python_with_its_options_alone(base, photos, tmp_path):
    """No parser: the options dataclass is the whole interface; `resume_options` gives a run's options back to
    continue it, and a resume whose kept options differ from the run's is refused."""
    out = tmp_path / "run"
    opts = train_module.SROptions(out=str(out), steps=1, base=[str(base)], data=[str(photos)], batch_size=2, gt_size=64,
                                  val_every=0)
    assert train_module.train_sr(opts) == training.FINISHED
    resumed, state = training.resume_options(train_module.SROptions, {"out": str(out), "steps": 2})
    assert (resumed.batch_size, resumed.gt_size, resumed.resume, state.step) == (2, 64, True, 1)
    assert train_module.train_sr(resumed, state=state) == training.FINISHED
    assert [r["step"] for r in log(out)] == [1, 2]
    with pytest.raises(UsageError, match=r"^--batch-size 6: this run was started with --batch-size 2"):
        train_module.train_sr(train_module.SROptions(out=str(out), steps=3, base=[str(base)], data=[str(photos)],
                                                     gt_size=64, resume=True))


def test_a_trained_checkpoint_upscales(run_a, golden_weights, tmp_path):
    image = tmp_path / "small.png"
    Image.open(PHOTOS / "astronaut.png").crop((200, 100, 224, 120)).save(image)
    code = main(["upscale", str(image), "--out", str(tmp_path / "out"), "--weights", str(run_a / "last.safetensors"),
                 "--cfw", str(golden_weights[1]), "--steps", "2", "--tile", "16", "--overlap", "6"])
    assert code == 0
    assert Image.open(tmp_path / "out" / "small.png").size == (96, 80)


def test_sd2_base_starts_the_new_layers_as_the_official_run(sd2_base):
    cfg = base_config([sd2_base], None, time_aware=True)
    model = load_base([sd2_base], cfg, seed=1)
    state = model.state_dict()
    prior = tensors(sd2_base)
    assert sorted(state) == sorted(list(prior) + [k for k in state if is_trainable(k)])
    assert all(torch.equal(state[k], v) for k, v in prior.items())
    # the official EncoderUNetModelWT zero-initialises every residual branch's last conv and every
    # attention's output projection; everything else new is at PyTorch's default initialisation
    zeroed = [m.out_layers[-1] if isinstance(m, ResBlock) else m.proj_out
              for m in model.time_encoder.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert zeroed and all(not conv.weight.any() and not conv.bias.any() for conv in zeroed)
    sft = next(m for m in model.unet.modules() if isinstance(m, SFT))
    assert torch.equal(sft.param_free_norm.weight, torch.ones_like(sft.param_free_norm.weight))
    assert sft.mlp_gamma.weight.abs().max() > 0
    # seeded: the same seed gives the same layers, another seed others
    again, other = load_base([sd2_base], cfg, seed=1).state_dict(), load_base([sd2_base], cfg, seed=2).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["structcond_stage_model.time_embed.0.weight"],
                           other["structcond_stage_model.time_embed.0.weight"])


@pytest.mark.training
def test_time_blind_run_from_sd2_samples_with_t_0(sd2_base, photos, tmp_path):
    out = tmp_path / "blind"
    assert train("--base", sd2_base, "--data", photos, "--out", out, "--steps", 1, *RUN_ARGS, "--time-blind",
                 "--val-every", 0) == 0
    model = load_stablesr([out / "last.safetensors"])
    assert model.cfg.time_encoder.time_aware is False  # the config round-trips through the checkpoint
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors(sd2_base).items())  # the prior stays frozen

    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = [model.time_encoder(latent, torch.tensor([t])) for t in (0, 500, 999)]
    for other in features[1:]:
        assert all(torch.equal(features[0][w], other[w]) for w in features[0])

    # sampling calls the encoder at every step's timestep, and a time-blind encoder embeds t = 0
    embedded = []
    model.time_encoder.time_embed.register_forward_hook(lambda module, args, out: embedded.append(args[0]))
    pipeline, generator = StableSRPipeline(model, cfw=None), torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipeline.sample(torch.randn(1, 4, 16, 16), latent, text_context(model, "", 1),
                        UpscaleOptions(steps=3, tile=16, overlap=6), generator=generator)
    zero = timestep_embedding(torch.zeros(1, dtype=torch.long), model.cfg.time_encoder.model_channels)
    assert len(embedded) == 3 and all(torch.equal(e, zero) for e in embedded)


def test_out_of_memory_is_one_line(base, photos, tmp_path, capsys, monkeypatch):
    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("stablesr_min.train.sr.sample_loss", no_memory)
    code = train("--base", base, "--data", photos, "--out", tmp_path / "r", "--steps", 1, *RUN_ARGS, "--val-every", 0)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("error: out of memory on cpu: lower --batch-size or --gt-size (--grad-accum "
                                    "keeps the effective batch), use --checkpointing, or use --dtype bfloat16")


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty")


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    (folder / "notes.png").write_text("not an image")
    return folder


# case: (options changed from a good command, extra flags, the error line (its start where it lists more))
BAD_INPUTS = {
    "no images": ({"--data": "{empty}"}, [], "error: {empty}: no images found"),
    "unreadable image": ({"--data": "{broken}"}, [], "error: {broken}/notes.png: not an image that can be read"),
    "base of the wrong kind": ({"--base": "{cfw}"}, [], "error: {cfw}: --base needs a StableSR or Stable Diffusion "
                                                        "2.x checkpoint, but this is the CFW checkpoint (vqgan_cfw_00011)"),
    "gt-size": ({"--gt-size": "96"}, [], "error: --gt-size 96: these networks need a multiple of 64 (whole latents "
                                         "at every level, a whole LR image at x4), at least 64; use --gt-size 128"),
    # the golden-size networks have GroupNorm groups of one channel: a 1 x 1 deepest map in a batch of one
    # crop was PyTorch's "Expected more than 1 value per channel" traceback
    "gt-size too small for one crop": ({"--gt-size": "64", "--batch-size": "1"}, [],
                                       "error: --gt-size 64: these networks need a multiple of 64 (whole latents at "
                                       "every level, a whole LR image at x4), at least 128 with --batch-size 1 (a "
                                       "deepest feature map of 2 x 2 or more); use --gt-size 128"),
    "every photo small": ({"--skip-small": "on"}, [], "error: every photo in {photos} has fewer pixels than 384 x 384 "
                                                     "or under 100 KiB, which --skip-small leaves out"),
    "steps": ({"--steps": "0"}, [], "error: --steps must be >= 1, got 0"),
    # a --config that cannot build the networks, or names what a config has not: one line naming the field
    "config of a width GroupNorm cannot split": ({"--config": "{config_7}"}, [], "error: {config_7}: "
                                                 "unet.model_channels 7 (x unet.channel_mult 1) must be a multiple of "
                                                 "unet.norm_groups (32), which normalise its width"),
    "config with an unknown block": ({"--config": "{config_nonsense}"}, [], "error: {config_nonsense}: nonsense is "
                                     "not a block of the config (the blocks: diffusion, unet, time_encoder, text, vae, "
                                     "cfw; or a diffusion field)"),
    "dist-timeout": ({"--dist-timeout": "0"}, [], "error: --dist-timeout must be > 0 seconds, got 0"),
    "a run is there": ({"--out": "{run_a}"}, [], "error: --out {run_a}: already holds a run; pass --resume to "
                                                 "continue it, --restart to start a new run there (its files kept "
                                                 "as *.old), or choose another folder"),
    "nothing to resume": ({}, ["--resume"], "error: --resume: {out} holds no run to resume (no state.safetensors); "
                                            "start it without --resume"),
    "resume to a step already taken": ({"--out": "{run_a}", "--steps": "3"}, ["--resume"],
                                       "error: --steps 3: the run in {run_a} is already at step 3; pass a larger "
                                       "--steps to continue it"),
    "resume with other options": ({"--out": "{run_a}", "--steps": "5", "--batch-size": "1"}, ["--resume"],
                                  "error: --batch-size 1: this run was started with --batch-size 2, and a resumed run "
                                  "keeps its options; leave --batch-size out or start a new run"),
    "resume with another degradation": ({"--out": "{run_a}", "--steps": "5", "--degradation": "first-order"},
                                        ["--resume"], "error: --degradation first-order: this run was started with "
                                        "--degradation second-order, and a resumed run keeps its options; leave "
                                        "--degradation out or start a new run"),
    # options as the user types them, not Python's values (issue 44, item 5)
    "resume with the ablation": ({"--out": "{run_a}", "--steps": "5"}, ["--resume", "--time-blind"],
                                 "error: --time-blind: this run was started without --time-blind, and a resumed run "
                                 "keeps its options; leave --time-blind out or start a new run"),
    "resume with other data": ({"--out": "{run_a}", "--steps": "5", "--data": "{empty}"}, ["--resume"],
                               "error: --data {empty}: this run was started with --data {photos}, and a resumed run "
                               "keeps its options; leave --data out or start a new run"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(case, base, photos, golden_weights, run_a, empty_folder,
                                               broken_folder, tmp_path, capsys):
    (tmp_path / "config_7.json").write_text('{"unet": {"model_channels": 7}}')
    (tmp_path / "config_nonsense.json").write_text('{"nonsense": {"a": 1}}')
    names = {"empty": empty_folder, "broken": broken_folder, "cfw": golden_weights[1], "run_a": run_a,
             "out": tmp_path / "new", "photos": photos, "config_7": tmp_path / "config_7.json",
             "config_nonsense": tmp_path / "config_nonsense.json"}
    changes, flags, expected = BAD_INPUTS[case]
    options = {"--base": base, "--data": photos, "--out": tmp_path / "new", "--steps": 2, "--gt-size": 64,
               "--batch-size": 2} | {k: v.format(**names) for k, v in changes.items()}
    code = train(*[x for option in options.items() for x in option], *flags)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected.format(**names)) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists(), "a refused run writes nothing"


@pytest.mark.training
def test_a_folder_a_run_left_without_a_state_starts_a_new_run_keeping_the_old_files(run_a, base, photos, tmp_path,
                                                                                   capsys):
    """A stop before the first save (or a deleted state) leaves a log and perhaps a checkpoint but no state:
    --resume is refused naming the way out, and that way (no --resume) starts anew, the old files kept."""
    out = tmp_path / "dead_end"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "last.safetensors").write_bytes((run_a / "last.safetensors").read_bytes())
    assert train("--out", out, "--steps", 3, "--resume") == 2
    assert "holds no run to resume (no state.safetensors); start it without --resume" in capsys.readouterr().err
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 1, *RUN_ARGS) == 0
    assert "kept as last.safetensors.old, log.jsonl.old, starting a new run" in capsys.readouterr().err
    assert (out / "log.jsonl.old").read_text() == '{"step": 1, "loss": 1.0}\n' and len(log(out)) == 1
    assert (out / "last.safetensors.old").read_bytes() == (run_a / "last.safetensors").read_bytes()
    # a second dead end there: the first one's files stay, the second's go beside them (item 6 of issue 44)
    (out / "state.safetensors").unlink()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 1, *RUN_ARGS) == 0
    assert "kept as last.safetensors.old.1, log.jsonl.old.1, starting a new run" in capsys.readouterr().err
    assert (out / "log.jsonl.old").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (out / "log.jsonl.old.1").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert (out / "last.safetensors.old").read_bytes() == (run_a / "last.safetensors").read_bytes()
    assert (out / "last.safetensors.old.1").is_file() and len(log(out)) == 1


@pytest.fixture(scope="module")
def run_at_step_1(base, photos, tmp_path_factory) -> Path:
    """run_a's first step alone: resumed to --steps 3, it is run_a."""
    out = tmp_path_factory.mktemp("runs") / "one"
    assert train("--base", base, "--data", photos, "--out", out, "--steps", 1, *RUN_ARGS, "--val-every", 2) == 0
    return out


def torn_log_line(out: Path) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a crash while the line was written


def truncated_state(out: Path) -> None:
    (out / "state.safetensors").write_bytes((out / "state.safetensors").read_bytes()[:100])


def deleted_checkpoint(out: Path) -> None:
    (out / "last.safetensors").unlink()


# What a crash or a person can do to a run folder saved at step 1: (the damage, what --resume says, and the way out
# it names: "--resume" works anyway, "--restart" starts the run anew there)
DAMAGED_FOLDERS = {
    "torn last log line": (torn_log_line, "note: {out}/log.jsonl: dropped 1 line(s) that are not a whole step's "
                                          "record (a write cut short)", "--resume"),
    "truncated state": (truncated_state, "error: --resume: {out}/state.safetensors: not a readable safetensors file",
                        "--restart"),
    "deleted last.safetensors": (deleted_checkpoint, "error: --resume: {out} holds no last.safetensors (the model its "
                                 "state continues); put it back, or pass --restart instead of --resume to start a "
                                 "new run there (its files kept as *.old)", "--restart"),
}


@pytest.mark.parametrize("case", list(DAMAGED_FOLDERS))
def test_a_damaged_run_folder_says_a_way_out_that_works(case, run_at_step_1, run_a, base, photos, tmp_path, capsys):
    """No two messages that send the user to each other: --resume names its way out, and that way works (a
    resume bit-identical to the run that never stopped, or a new run, the old files kept)."""
    damage, says, way_out = DAMAGED_FOLDERS[case]
    out = tmp_path / "run"
    shutil.copytree(run_at_step_1, out)
    damage(out)
    command = ["--base", base, "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2]
    code = train("--out", out, "--steps", 3, "--resume")
    err = capsys.readouterr().err
    assert says.format(out=out) in err and "Traceback" not in err
    if way_out == "--resume":
        assert code == 0
        assert_same_run(out, run_a)
        return
    assert code == 2 and len(err.splitlines()) == 1 and "--restart" in err
    assert train(*command) == 2  # without --restart, a new run there is refused naming it
    assert "pass --resume to continue it, --restart to start a new run there" in capsys.readouterr().err
    assert train(*command, "--restart") == 0
    assert "kept as " in capsys.readouterr().err and (out / "state.safetensors.old").is_file()
    assert_same_run(out, run_a)


# How a run can stop: (signals after a step, or a non-finite loss at a step; --save-every), the exit code, and the way
# out its last line names: "--resume", "again" (the same command without --resume) or "--restart" (the same command
# with --restart, a new run in the folder)
STOPS = {  # (one SIGTERM or Ctrl-C: the two tests above)
    "double Ctrl-C after a save": ((signal.SIGINT, signal.SIGINT), 2, 1, 130,
                                   "quit without saving: {out}/last.safetensors keeps the last save; continue with "
                                   "--resume", "--resume"),
    "double SIGTERM before any save": ((signal.SIGTERM, signal.SIGTERM), 1, 500, 143,
                                       "quit without saving: no step was saved; run the command again without "
                                       "--resume", "again"),
    "NaN before any save": ("nan", 1, 500, 2, "no step had been saved yet; run the command again with a lower --lr",
                            "again"),
    "NaN after a save": ("nan", 2, 1, 2, "{out}/last.safetensors keeps step 1; start a new run with a lower --lr (or "
                                         "--dtype bfloat16 rather than float16): --restart to start it in this folder "
                                         "(its files kept as *.old), or another --out", "--restart"),
}


@pytest.mark.training
@pytest.mark.parametrize("case", list(STOPS))
def test_every_way_a_run_stops_leaves_a_folder_that_its_printed_way_out_continues(case, run_a, base, photos, tmp_path,
                                                                                   monkeypatch, capsys):
    """No dead ends: after each kind of stop, what the last lines say to do works; and a resume after a
    stop is bit-identical to the run that never stopped."""
    stop, at_step, save_every, code, says, way_out = STOPS[case]
    out = tmp_path / "run"
    command = ["--base", base, "--data", photos, "--out", out, "--steps", 3, *RUN_ARGS, "--val-every", 2]
    with monkeypatch.context() as m:
        if stop == "nan":
            real, calls = train_module.sample_loss, []

            def nan_at_step(*args):
                calls.append(1)
                return real(*args) * (float("nan") if len(calls) == at_step else 1.0)

            m.setattr(train_module, "sample_loss", nan_at_step)
            context = contextlib.nullcontext()
        else:
            context = signals_after_step(m, at_step, *stop)
        with context:
            assert train(*command, "--save-every", save_every) == code
    assert says.format(out=out) in capsys.readouterr().err
    if way_out == "--resume":
        assert train("--out", out, "--steps", 3, "--resume") == 0
        assert_same_run(out, run_a)
    elif way_out == "again":
        assert train("--out", out, "--steps", 3, "--resume") == 2  # nothing to resume, and it says the same way out
        assert "start it without --resume" in capsys.readouterr().err
        assert train(*command) == 0
        assert_same_run(out, run_a)
    else:  # the same command alone is refused (the folder holds a run); with --restart, a new run there
        assert train(*command) == 2 and "--restart to start a new run there" in capsys.readouterr().err
        assert train(*command, "--restart") == 0
        assert_same_run(out, run_a)
        assert metadata(out / "last.safetensors.old")["stablesr_min.step"] == "1"  # the last good save, kept


def test_a_second_signal_within_a_second_is_the_same_stop_and_a_later_one_quits():
    """torchrun forwards the stop that reached the whole job to its workers: that second signal must not make
    them quit without saving. A person's second Ctrl-C, later, does."""
    with StopRequest(announce=False) as stop:
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # forwarded at once: the same stop
        assert stop.requested == signal.SIGTERM
        stop.requested_at -= StopRequest.SAME_STOP_WITHIN_S
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    from stablesr_min.errors import UsageError

    training.RunFolder(tmp_path / "run", "train sr", resume=False)
    with pytest.raises(UsageError, match="another training run is using this folder"):
        training.RunFolder(tmp_path / "run", "train sr", resume=False)
    training.release_locks()  # as every training command does on its way out (a process that dies drops it too)
    training.RunFolder(tmp_path / "run", "train sr", resume=False)
    training.release_locks()
    assert not (tmp_path / "run").exists()  # made by the lock, never written to: gone again


def test_a_learning_rate_must_be_finite(base, photos, tmp_path, capsys):
    """On the command line (as upscale's numbers) and in the options a run is built from."""
    from stablesr_min.errors import UsageError
    from stablesr_min.train.options import check_option_ranges

    with pytest.raises(SystemExit) as e:
        train("--base", base, "--data", photos, "--out", tmp_path / "r", "--steps", 1, *RUN_ARGS, "--lr", "inf")
    assert e.value.code == 2 and "argument --lr: not a finite number: 'inf'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="^lr must be > 0 and finite, got inf$"):
        check_option_ranges(train_module.SROptions(out="r", steps=1, lr=float("inf")), positive=("lr",))


@pytest.mark.parametrize("checkpoint_key, writer", [("first_stage_model.encoder.conv_in.weight", "train vae"),
                                                    ("model.diffusion_model.out.2.weight", "train unet")])
def test_resuming_another_commands_run_names_it(tmp_path, capsys, checkpoint_key, writer):
    """A `train vae` or `train unet` run resumed with `train sr`: one line naming the command that wrote it, not a
    TypeError (nor the options' Python names). Each command's checkpoint is of its own kind. A resume from Python
    (the trainer given resume=True) is checked alike."""
    from stablesr_min.train.run_folder import TrainState

    out = tmp_path / "run"
    out.mkdir()
    state = TrainState(1, {"data": ["x"], "kl_weight": 1e-6, "crop": 64, "batch_size": 8, "lr": 5e-4, "seed": 0},
                       {}, {"state": {}, "param_groups": []}, {}, {}, {"seconds": 1.0})
    training.RunFolder(out, "train sr", resume=False).save({checkpoint_key: torch.zeros(1)}, {}, state)
    training.release_locks()
    assert train("--out", out, "--steps", 3, "--resume") == 2
    assert capsys.readouterr().err == (f"error: --resume: {out} holds a run of `{writer}`, not `train sr`; resume it "
                                       f"with `{writer} --out {out} --steps N --resume`, or choose another --out\n")
    with pytest.raises(UsageError) as refused:
        train_module.train_sr(train_module.SROptions(out=str(out), steps=3, resume=True))
    assert str(refused.value) == (f"--resume: {out} holds a run of `{writer}`, not `train sr`; resume it with "
                                  f"`{writer} --out {out} --steps N --resume`, or choose another --out")
