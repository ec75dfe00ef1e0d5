"""Training CFW (paper Sec. 3.2) on the golden-size weights: the data it samples, what trains, the loss's
schedule, resuming, and one clear line for each bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stablesr_min.app.cli import main
from stablesr_min.cfw import ResidualDenseBlock
from stablesr_min.config import StableSRConfig
from stablesr_min.errors import WeightsError
from stablesr_min.train.cfw import (FUSION_PREFIX, CFWOptions, Reconstruction, discriminator_from, load_cfw_base,
                                    new_loss, prepare_for_training, step_gradients, train_cfw)
from stablesr_min.train.cfw_data import CFWSamples, DataFolder
from stablesr_min.train.run_folder import FINISHED
from stablesr_min.train.data import hue_rotate
from stablesr_min.train.cfw_loss import CFWLossConfig, PatchDiscriminator
from stablesr_min.weights import WeightFiles

from run_files import assert_a_resume_kept_every_option, flags

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ["--count", "4", "--steps", "2", "--gt-size", "64"]  # the command (batch: the default 6)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two smooth random photos of different sizes, one smaller than the crop (so it is padded)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (90, 120), "b.jpg": (60, 100)}.items():
        coarse = rng.uniform(0, 255, (h // 10 + 1, w // 10 + 1, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def data(golden_weights, photos, tmp_path_factory):
    """`train cfw-data` exactly as the issue runs it: 4 samples, 2 steps, 64 px crops."""
    out = tmp_path_factory.mktemp("cfw") / "DATA"
    assert main(["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos),
                 "--out", str(out), *GENERATE]) == 0
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stablesr_min", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def tensors(path):
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------------
# The data


def test_generated_samples_decode_to_their_gt_size(data, stablesr):
    folder = DataFolder(data)
    assert folder.indices() == [0, 1, 2, 3]
    assert json.loads((data / "generation.json").read_text())["dropped"] == []
    for i in folder.indices():
        latent = tensors(folder.latent(i))["latent"]
        gt, lr = Image.open(folder.gt(i)), Image.open(folder.lr(i))
        assert gt.size == (64, 64) and lr.size == (16, 16)
        assert latent.shape == (1, 4, 8, 8) and latent.dtype == torch.float32 and torch.isfinite(latent).all()
        assert float(WeightFiles([folder.latent(i)]).metadata["stablesr_min.scale_factor"]) == 0.18215
        with torch.no_grad():
            decoded = stablesr.vae.decode(latent / 0.18215)  # the plain VAE decoder
        assert decoded.shape == (1, 3, gt.size[1], gt.size[0])


def test_a_continued_generation_writes_what_an_uninterrupted_one_does(data, tmp_path):
    out = tmp_path / "DATA"
    shutil.copytree(data, out)
    for name in ("latent/00000002.safetensors", "latent/00000003.safetensors", "lr/00000000.png"):
        (out / name).unlink()  # as if stopped after sample 1 (sample 0 incomplete: it is made again)
    assert main(["train", "cfw-data", "--out", str(out), "--count", "4"]) == 0  # options from generation.json
    for sub, ext in [("lr", "png"), ("gt", "png"), ("latent", "safetensors")]:
        for i in range(4):
            name = f"{sub}/{i:08d}.{ext}"
            assert (out / name).read_bytes() == (data / name).read_bytes(), name


def test_samples_come_in_a_seeded_order_that_resumes(data):
    a = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4)
    first = [a.next_batch() for _ in range(3)]  # crosses an epoch (4 samples)
    b = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4)
    b.next_batch()
    b.load_state_dict(a.state_dict() | {"used": torch.tensor(3)})
    for x, y in zip(first[1], b.next_batch()):
        assert torch.equal(x, y)
    lr, gt, latent, scale_factor = first[0]
    assert lr.shape == (3, 3, 16, 16) and gt.shape == (3, 3, 64, 64) and latent.shape == (3, 4, 8, 8)
    assert scale_factor.flatten().tolist() == pytest.approx([0.18215] * 3)


def test_a_data_folder_given_twice_counts_its_samples_once(data, capsys):
    once = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4).samples
    twice = CFWSamples([data, data.parent / ".." / data.parent.name / data.name], 3, seed=5, factor=8,
                       latent_channels=4).samples
    assert twice == once and len(once) == 4
    assert capsys.readouterr().err == (f"note: {data.parent / '..' / data.parent.name / data.name} was given more "
                                       "than once; its samples are used once\n")


def test_hue_rotation_turns_lr_and_gt_by_one_angle_and_leaves_the_latent(data):
    plain = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4).next_batch()
    unturned = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4, hue_rotation=0.0).next_batch()
    assert all(torch.equal(x, y) for x, y in zip(plain, unturned))  # p = 0: the batches as before
    turned = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4, hue_rotation=1.0)
    lr, gt, latent, scale_factor = turned.next_batch()
    assert torch.equal(latent, plain[2]) and torch.equal(scale_factor, plain[3])  # same samples, latents as sampled
    for b in range(3):
        angle = turned.position(b)[1]
        assert 0 < angle < 2 * math.pi
        assert torch.equal(lr[b], hue_rotate(plain[0][b], angle)) and torch.equal(gt[b], hue_rotate(plain[1][b], angle))
        assert not torch.allclose(gt[b], plain[1][b], atol=1e-2)  # the colours did turn
    assert len({turned.position(b)[1] for b in range(3)}) == 3  # an angle per sample
    resumed = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4, hue_rotation=1.0)
    resumed.load_state_dict(turned.state_dict())
    again = CFWSamples([data], 3, seed=5, factor=8, latent_channels=4, hue_rotation=1.0)
    again.next_batch()
    assert all(torch.equal(x, y) for x, y in zip(resumed.next_batch(), again.next_batch()))  # resumes exactly
    half = CFWSamples([data], 4, seed=5, factor=8, latent_channels=4, hue_rotation=0.5)
    angles = [half.position(i)[1] for i in range(400)]  # 100 epochs of 4 samples
    assert 0.35 < sum(a > 0 for a in angles) / 400 < 0.65


# ------------------------------------------------------------------------------------------------------
# The model and the loss


def test_a_vae_base_gives_its_vae_and_seeded_official_fusion_layers(golden_weights, stablesr, tmp_path):
    vae_only = tmp_path / "vae.safetensors"
    files = WeightFiles([golden_weights[0]])
    save_file({k: files.tensor(k) for k in files.keys() if k.startswith("first_stage_model.")}, vae_only,
              metadata=files.metadata)
    cfw, cfg = load_cfw_base(str(vae_only), seed=3)
    again, _ = load_cfw_base(str(vae_only), seed=3)
    other, _ = load_cfw_base(str(vae_only), seed=4)
    vae = stablesr.vae.state_dict()
    state, state_again, state_other = cfw.state_dict(), again.state_dict(), other.state_dict()
    assert sorted(k for k in state if not k.startswith(FUSION_PREFIX)) == sorted(vae)
    for k, v in vae.items():
        assert torch.equal(state[k], v), k
    fusion = [k for k in state if k.startswith(FUSION_PREFIX)]
    assert fusion and all(torch.equal(state[k], state_again[k]) for k in fusion)
    assert any(not torch.equal(state[k], state_other[k]) for k in fusion)
    for block in cfw.modules():
        if isinstance(block, ResidualDenseBlock):  # basicsr: Kaiming-normal x 0.1, zero bias
            for conv in block.children():
                assert not conv.bias.any()
                fan_in = conv.weight[0].numel()
                assert conv.weight.std().item() == pytest.approx(0.1 * (2 / fan_in) ** 0.5, rel=0.15)
    assert cfg.cfw.ch == StableSRConfig.from_json(files.config_json()).vae.ch


def test_patch_discriminator_is_taming_three_layer_patchgan():
    d = PatchDiscriminator(CFWLossConfig())
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in shapes
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.5.weight"] == (256, 128, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.9.running_var"] == (512,) and shapes["main.11.weight"] == (1, 512, 4, 4)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert not d.main[3].bias.any() and d.main[2].weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_the_discriminator_waits_for_disc_start(golden_weights, data):
    cfw, _ = load_cfw_base(str(golden_weights[1]), seed=0)
    trainable = prepare_for_training(cfw)
    loss = new_loss(CFWLossConfig(disc_start=2), seed=0)
    optimizer = torch.optim.Adam([{"params": list(trainable.values())},
                                  {"params": list(loss.discriminator.parameters())}], lr=1e-3, betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = CFWSamples([data], 2, seed=0, factor=8, latent_channels=4).next_batch()
    start = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}

    def train_step(step: int) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        g_loss, terms = step_gradients(Reconstruction(cfw), loss.discriminator, loss, optimizer, scaler, batch, step,
                                       torch.device("cpu"), torch.float32)
        optimizer.step()
        return {"loss": g_loss, **terms}

    for step in range(2):
        terms = train_step(step)
        assert terms["g_adv"] == 0.0 and "d_loss" not in terms and terms["loss"] == terms["l1"]
        for k, v in loss.discriminator.state_dict().items():  # weights and BatchNorm buffers alike
            assert torch.equal(v, start[k]), k
    terms = train_step(2)
    assert terms["g_adv"] != 0.0 and terms["d_loss"] > 0
    assert terms["loss"] == pytest.approx(terms["l1"] + 0.025 * terms["g_adv"], rel=1e-6)
    assert all(not torch.equal(p, start[k]) for k, p in loss.discriminator.named_parameters())


# ------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def runs(golden_weights, data, tmp_path_factory):
    """The issue's `train cfw` command (plus an adversarial start at step 1 and a validation at step 3), and
    the same run stopped at step 2 and resumed."""
    folder = tmp_path_factory.mktemp("runs")
    args = ["train", "cfw", "--cfw-base", str(golden_weights[1]), "--data", str(data), "--batch-size", "2",
            "--disc-start", "1", "--val-every", "3"]
    assert main([*args, "--out", str(folder / "A"), "--steps", "3"]) == 0
    assert main([*args, "--out", str(folder / "B"), "--steps", "2"]) == 0
    assert main(["train", "cfw", "--out", str(folder / "B"), "--steps", "3", "--resume"]) == 0
    return folder / "A", folder / "B"


def test_train_cfw_changes_only_the_fusion_layers_and_upscale_takes_the_result(golden_weights, data, runs, tmp_path):
    stablesr, base = golden_weights
    run = runs[0]
    before, after = tensors(base), tensors(run / "last.safetensors")
    assert sorted(k for k in after if not k.startswith("loss.discriminator.")) == sorted(before)
    assert any(k.startswith(FUSION_PREFIX) for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith(FUSION_PREFIX), k
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and [("val_l1" in r) for r in log] == [False, False, True]
    assert log[0]["g_adv"] == 0 and "d_loss" not in log[0] and all(r["g_adv"] != 0 and "d_loss" in r for r in log[1:])

    up = tmp_path / "up"
    assert main(["upscale", str(data / "lr" / "00000000.png"), "--out", str(up), "--cfw", str(run / "last.safetensors"),
                 "--weights", str(stablesr), "--steps", "2", "--tile", "16", "--overlap", "6"]) == 0
    assert Image.open(up / "00000000.png").size == (64, 64)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs):
    for name in ("last.safetensors", "state.safetensors"):
        a, b = (tensors(run / name) for run in runs)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
    state = tensors(runs[0] / "state.safetensors")
    # the checkpoint carries D as the official does; a new run from it (--cfw-base RUN/last) starts D there
    loss = new_loss(CFWLossConfig(), seed=9)
    discriminator_from(loss, str(runs[0] / "last.safetensors"))
    for k, v in loss.discriminator.state_dict().items():
        assert torch.equal(v, state["weights.loss.discriminator." + k]), k
    assert "weights.loss.discriminator.main.3.running_mean" in state
    # Adam moments for every fusion parameter and every discriminator parameter (it trained from step 1)
    n_fusion = sum(k.startswith("weights." + FUSION_PREFIX) for k in state)
    n_discriminator = len(list(PatchDiscriminator(CFWLossConfig()).parameters()))
    assert sum(k.endswith(".exp_avg") for k in state) == n_fusion + n_discriminator
    logs = [(run / "log.jsonl").read_text() for run in runs]
    assert [json.loads(line)["loss"] for line in logs[0].splitlines()] == \
        [json.loads(line)["loss"] for line in logs[1].splitlines()]


def test_a_resumed_run_keeps_every_option_it_was_started_with(golden_weights, data, tmp_path):
    """`--resume` alone continues with the options of the run's start: its dtype and intervals too (a resumed
    `train cfw` once went on in float32 with the default intervals)."""
    out = tmp_path / "run"
    started = {"cfw_base": str(golden_weights[1].resolve()), "data": [str(data.resolve())], "batch_size": 2,
               "seed": 3, "lr": 1e-4, "disc_start": 1, "hue_rotation": 0.5, "dtype": "bfloat16", "save_every": 7,
               "val_every": 0}
    assert main(["train", "cfw", "--out", str(out), "--steps", "1", *flags(started)]) == 0
    assert main(["train", "cfw", "--out", str(out), "--steps", "2", "--resume"]) == 0
    assert_a_resume_kept_every_option(out, CFWOptions, started)


def test_train_cfw_runs_from_python_with_its_options_alone(golden_weights, data, runs, tmp_path):
    """No parser: the options dataclass is the whole interface, and the run is the command line's."""
    out = tmp_path / "run"
    opts = CFWOptions(out=str(out), steps=3, cfw_base=str(golden_weights[1]), data=[str(data)], batch_size=2,
                      disc_start=1, val_every=3)
    assert train_cfw(opts) == FINISHED
    ours, theirs = tensors(out / "last.safetensors"), tensors(runs[0] / "last.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


def test_bad_input_ends_in_one_clear_line(golden_weights, data, tmp_path):
    stablesr, cfw = golden_weights
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    save_file({"latent": torch.zeros(1, 4, 4, 4)}, bad / "latent" / "00000001.safetensors",
              metadata={"stablesr_min.scale_factor": "0.18215"})
    cases = {
        f"{empty}: holds no CFW training samples (latent/*.safetensors); make them with `python -m stablesr_min "
        "train cfw-data`": ["train", "cfw", "--cfw-base", cfw, "--data", empty, "--out", tmp_path / "r1", "--steps", 1],
        f"{empty}: no images found (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, in it or its subfolders)":
            ["train", "cfw-data", "--weights", stablesr, "--data", empty, "--out", tmp_path / "d", *GENERATE],
        f"{bad / 'latent' / '00000001.safetensors'}: latent of shape [1, 4, 4, 4] does not match its GT "
        f"{bad / 'gt' / '00000001.png'} (64x64): the decoder needs (1, 4, H/8, W/8); generate the sample again "
        "with this model's weights, or remove it":
            ["train", "cfw", "--cfw-base", cfw, "--data", bad, "--out", tmp_path / "r2", "--steps", 1],
        f"{stablesr}: is a StableSR checkpoint, which goes to `train cfw-data --weights`; --cfw-base takes a CFW "
        "checkpoint (to continue) or a VAE or SD 2.x checkpoint":
            ["train", "cfw", "--cfw-base", stablesr, "--data", data, "--out", tmp_path / "r3", "--steps", 1],
        "--hue-rotation must be a probability in [0, 1], got -0.5":
            ["train", "cfw", "--cfw-base", cfw, "--data", data, "--out", tmp_path / "r4", "--steps", 1,
             "--hue-rotation", -0.5],
        "--degradation first-order: this run was started with --degradation second-order, and a resumed run keeps its options; "
        "leave --degradation out or start a new run":
            ["train", "cfw-data", "--out", bad, "--count", 5, "--degradation", "first-order"],
    }
    for message, args in cases.items():
        result = run_cli(*args)
        assert (result.returncode, result.stderr) == (2, f"error: {message}\n"), args
    assert not (tmp_path / "d").exists()


def test_a_stablesr_file_is_refused_as_cfw_base(golden_weights):
    with pytest.raises(WeightsError, match="is a StableSR checkpoint"):
        load_cfw_base(str(golden_weights[0]), seed=0)


def test_cfw_data_refuses_an_out_folder_inside_its_data_and_too_many_steps(golden_weights, photos, tmp_path, capsys):
    """Its output inside --data would be trained on when it continues; --steps beyond the schedule would crash
    after writing generation.json. Both are one line, and nothing is written."""
    inside = Path(photos) / "cfw_data"
    assert main(["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out", str(inside),
                 "--count", "2", "--gt-size", "64", "--batch-size", "2"]) == 2
    assert f"--out {inside}: is inside --data {photos}" in capsys.readouterr().err and not inside.exists()
    out = tmp_path / "data"
    assert main(["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out", str(out),
                 "--count", "2", "--steps", "1001", "--gt-size", "64", "--batch-size", "2"]) == 2
    assert "--steps 1001: the schedule has 1000 steps; use at most 1000" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------
# A data folder's lock, its kind, and a stopped generation (issue 44, items 13, 14, 18)


def test_a_second_generation_into_a_folder_in_use_is_refused(golden_weights, photos, tmp_path, capsys):
    from stablesr_min.train.run_folder import lock_folder, release_locks

    out = tmp_path / "DATA"
    lock_folder(out)  # as a generation running in another process holds it
    try:
        code = main(["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out",
                     str(out), *GENERATE])
    finally:
        release_locks()
    assert code == 2
    assert capsys.readouterr().err == (f"error: --out {out}: another training run is using this folder; wait for it "
                                       "to end, or choose another folder\n")
    assert not out.exists()


def test_a_folder_of_another_kind_is_refused_as_out(golden_weights, photos, data, runs, capsys):
    run, _ = runs
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out", str(run),
                 *GENERATE]) == 2
    assert capsys.readouterr().err == (f"error: --out {run}: holds the files of a training run (last.safetensors, "
                                       "state.safetensors, log.jsonl), which those of a `train cfw-data` folder would "
                                       "mix with; choose another folder\n")
    assert sorted(p.name for p in run.iterdir()) == before
    assert main(["train", "cfw", "--cfw-base", str(golden_weights[1]), "--data", str(data), "--out", str(data),
                 "--steps", "1"]) == 2
    assert capsys.readouterr().err == (f"error: --out {data}: holds the files of a `train cfw-data` folder "
                                       "(generation.json, latent), which those of a training run would mix with; "
                                       "choose another folder\n")
    assert not (data / "log.jsonl").exists()


def test_a_stopped_generation_says_the_same_command_continues_it(golden_weights, photos, data, tmp_path, monkeypatch,
                                                                capsys):
    from stablesr_min.train import cfw_data

    out = tmp_path / "DATA"
    command = ["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out", str(out),
               *GENERATE]
    update = cfw_data.GenerationProgress.update

    def ctrl_c_after_the_first_sample(self, done, dropped):
        update(self, done, dropped)
        if done == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cfw_data.GenerationProgress, "update", ctrl_c_after_the_first_sample)
        assert main(command) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"train cfw-data: stopped with 1 of 4 samples in {out}; the same command continues it\n"
                        "interrupted\n") and "Traceback" not in err
    assert main(command) == 0
    for sub in ("lr", "gt", "latent"):
        for path in sorted((data / sub).iterdir()):
            assert (out / sub / path.name).read_bytes() == path.read_bytes(), path


# A stop at each moment of `train cfw-data` in a process of its own (`python -m stablesr_min`, SIGINT or SIGTERM sent
# to itself): what it says and its exit code. Before the command runs, nothing was done; while it generates, the same
# command continues it; once the folder holds --count samples, the work is done, whatever comes after.
STOP_CFW_DATA = """
import builtins, os, runpy, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background test runner ignores it)

def stop():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGNUM)

WHEN
sys.argv[0] = "stablesr_min"
runpy.run_module("stablesr_min", run_name="__main__", alter_sys=True)
"""
STOP_WHEN = {
    "importing torch": """
class StopWhenTorchIsImported:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            stop()
        return None

sys.meta_path.insert(0, StopWhenTorchIsImported())
""",
    "loading the model": """
from stablesr_min import model
load_stablesr = model.load_stablesr
model.load_stablesr = lambda *args, **kwargs: stop() or load_stablesr(*args, **kwargs)
""",
    "after the last sample": """
from stablesr_min.train.cfw_data import DataFolder
write = DataFolder.write

def write_then_stop(self, *args):
    write(self, *args)
    if self.complete_count() == 4:
        stop()

DataFolder.write = write_then_stop
""",
    "after 'wrote'": """
print_ = builtins.print
builtins.print = lambda *args, **kwargs: (print_(*args, **kwargs), str(args[0]).startswith("wrote ") and stop())
""",
}
DONE = "train cfw-data: {out} holds the 4 samples asked for: the stop came after the last one, and the work is done\n"
STOP_SAYS = {  # (when, signal): exit code, the end of stderr
    ("importing torch", "SIGTERM"): (143, "terminated while starting, before the command did anything: run the same "
                                         "command again\n"),
    ("loading the model", "SIGTERM"): (143, "train cfw-data: stopped with 0 of 4 samples in {out}; the same command "
                                           "continues it\nterminated\n"),
    ("after the last sample", "SIGINT"): (0, DONE),
    ("after the last sample", "SIGTERM"): (0, DONE),
    ("after 'wrote'", "SIGINT"): (0, DONE),
    ("after 'wrote'", "SIGTERM"): (0, DONE),
}


@pytest.mark.commands
@pytest.mark.parametrize("when, signum", list(STOP_SAYS), ids=[" ".join(case) for case in STOP_SAYS])
def test_a_stop_of_train_cfw_data_at_each_moment_says_what_is_true(golden_weights, photos, data, tmp_path, when,
                                                                    signum):
    out = tmp_path / "DATA"
    command = ["train", "cfw-data", "--weights", str(golden_weights[0]), "--data", str(photos), "--out", str(out),
               *GENERATE]
    code = STOP_CFW_DATA.replace("WHEN", STOP_WHEN[when]).replace("SIGNUM", signum)
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=ROOT)
    expected_code, says = STOP_SAYS[when, signum]
    assert result.returncode == expected_code, result.stderr
    assert result.stderr.endswith(says.format(out=out)) and "Traceback" not in result.stderr, result.stderr
    assert ("wrote " in result.stdout) == (when == "after 'wrote'")
    if expected_code == 0:
        assert DataFolder(out).complete_count() == 4
        return
    assert not (out / "latent").exists() or not any((out / "latent").iterdir())
    assert main(command) == 0  # the way out it names
    for sub in ("lr", "gt", "latent"):
        for path in sorted((data / sub).iterdir()):
            assert (out / sub / path.name).read_bytes() == path.read_bytes(), path
