"""The command line: real runs on the tiny golden-size weights, and one clear line for each bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr_min.app import cli
from stablesr_min.app.cli import main
from stablesr_min.devices import pick_dtype

from photos import HELDOUT

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--tile", "16", "--overlap", "6", "--seed", "1"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 40x28 RGB crop of a real photo (data/heldout/coffee.png)."""
    path = tmp_path_factory.mktemp("in") / "coffee.png"
    Image.open(HELDOUT / "coffee.png").crop((250, 150, 290, 178)).save(path)
    return path


@pytest.fixture
def weights(golden_weights):
    stablesr, cfw = golden_weights
    return ["--weights", str(stablesr), "--cfw", str(cfw)]


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_upscale_writes_exactly_scale_times_the_input(photo, weights, tmp_path, capsys):
    code, out, err = run(["upscale", str(photo), "--scale", "2", "--out", str(tmp_path), *FAST, *weights], capsys)
    assert code == 0, err
    result = Image.open(tmp_path / "coffee.png")
    assert result.size == (80, 56) and result.mode == "RGB"
    assert "step 2/2" in err
    assert not list(tmp_path.glob("*.tmp")), "outputs are renamed into place"


def test_same_seed_same_image_other_seed_other_image(photo, weights, tmp_path, capsys):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        args = ["upscale", str(photo), "--out", str(tmp_path / name), *FAST, *weights]
        args[args.index("--seed") + 1] = seed
        assert run(args, capsys)[0] == 0
    a, b, c = (np.asarray(Image.open(tmp_path / n / "coffee.png"), dtype=np.int16) for n in "abc")
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.5


@pytest.mark.parametrize("mode,expect_mode", [("L", "RGB"), ("P", "RGB"), ("RGBA", "RGBA"), ("I;16", "RGB")])
def test_image_modes(photo, weights, tmp_path, capsys, mode, expect_mode):
    image = Image.open(photo)
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = np.zeros((28, 40), np.uint8)
        alpha[:, 20:] = 255
        image.putalpha(Image.fromarray(alpha))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    src = tmp_path / f"in_{mode.replace(';', '')}.png"
    image.save(src)
    code, _, err = run(["upscale", str(src), "--out", str(tmp_path / "out"), *FAST, *weights], capsys)
    assert code == 0, err
    result = Image.open(tmp_path / "out" / src.name)
    assert result.size == (160, 112) and result.mode == expect_mode
    if mode == "RGBA":  # alpha is upscaled on its own: transparent left half, opaque right half
        a = np.asarray(result.getchannel("A"))
        assert a[:, :70].max() == 0 and a[:, 90:].min() == 255


@pytest.mark.parametrize("flag,size", [([], (148, 116)), (["--official-resize"], (128, 96))])
def test_official_resize_flag(photo, weights, tmp_path, capsys, flag, size):
    """37x29 at x4: exactly 4x by default; the official script's 32x24 resize first with the flag."""
    src = tmp_path / "in.png"
    Image.open(photo).crop((0, 0, 37, 29)).save(src)
    code, _, err = run(["upscale", str(src), "--scale", "4", "--out", str(tmp_path / "out"), *FAST, *flag,
                        *weights], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "in.png").size == size


def test_official_resize_of_a_side_under_8_px(photo, tmp_path, capsys):
    src = tmp_path / "thin.png"
    Image.open(photo).crop((0, 0, 37, 5)).save(src)
    code, _, err = run(["upscale", str(src), "--official-resize", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == (f"error: {src}: --official-resize: the official resize cuts each side down to "
                                 "a multiple of 8, so it needs sides of at least 8 px, got 37x5; leave it off "
                                 "for this image\n")


def test_missing_input(tmp_path, capsys):
    code, _, err = run(["upscale", str(tmp_path / "nope.png"), "--out", str(tmp_path)], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'nope.png'}: no such file\n"


def test_not_an_image(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    code, _, err = run(["upscale", str(tmp_path / "notes.png"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not an image" in err and err.count("\n") == 1


def test_wrong_checkpoint_kind(photo, golden_weights, tmp_path, capsys):
    stablesr, cfw = golden_weights
    code, _, err = run(["upscale", str(photo), "--out", str(tmp_path), "--weights", str(cfw), "--cfw", str(cfw)],
                       capsys)
    assert code == 2 and "looks like the CFW checkpoint (vqgan_cfw_00011): pass it as --cfw\n" in err and err.count("\n") == 1
    code, _, err = run(["upscale", str(photo), "--out", str(tmp_path), "--weights", str(stablesr), "--cfw",
                        str(stablesr)], capsys)
    assert code == 2 and "CFW autoencoder" in err and "StableSR checkpoint" in err


def test_weights_without_cfw(photo, golden_weights, tmp_path, capsys):
    code, _, err = run(["upscale", str(photo), "--out", str(tmp_path), "--weights", str(golden_weights[0])], capsys)
    assert code == 2 and "--cfw" in err


def test_never_overwrites_an_input(photo, weights, capsys):
    before = photo.read_bytes()
    code, _, err = run(["upscale", str(photo), "--out", str(photo.parent), *FAST, *weights], capsys)
    assert code == 2 and "overwrite an input" in err
    assert photo.read_bytes() == before


def test_two_inputs_one_output_name(photo, tmp_path, capsys):
    other = tmp_path / "coffee.jpg"
    Image.open(photo).save(other)
    code, _, err = run(["upscale", str(photo), str(other), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "would both be written" in err


def test_image_too_large_for_the_device(photo, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "free_memory_bytes", lambda device: 10 * 2**20)
    code, _, err = run(["upscale", str(photo), "--scale", "40", "--out", str(tmp_path), *weights], capsys)
    assert code == 2 and "needs about" in err and "GB free" in err


@pytest.mark.parametrize("args,message", [
    (["--dec-w", "2"], "--dec-w"),
    (["--overlap", "64"], "overlap"),
    (["--steps", "0"], "steps"),
    (["--dtype", "float16", "--device", "cpu"], "float16 needs a GPU"),
    (["--device", "tpu"], "not a device"),
])
def test_bad_options(photo, tmp_path, capsys, args, message):
    code, _, err = run(["upscale", str(photo), "--out", str(tmp_path), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stablesr_min", "upscale", str(tmp_path / "x.png"),
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("x.png: no such file") and "Traceback" not in result.stderr


@pytest.mark.parametrize("fast_kernels", [True, False])
def test_bfloat16_on_a_cpu_without_fast_kernels_warns(fast_kernels, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if fast_kernels else "AVX2")
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert ("no fast bfloat16 kernels" in capsys.readouterr().err) is not fast_kernels


# ------------------------------------------------------------------------------------------------------
# Samplers and guidance (issue 15)

GUIDED_DDIM = ["--sampler", "ddim", "--steps", "3", "--guidance-scale", "5", "--negative-prompt", "blurry",
               "--tile", "16", "--overlap", "6", "--seed", "1"]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_guided_ddim_end_to_end(photo, weights, tmp_path, capsys, mode):
    image = Image.open(photo).convert(mode)
    if mode == "RGBA":
        image.putalpha(128)
    src = tmp_path / f"in_{mode}.png"
    image.save(src)
    code, out, err = run(["upscale", str(src), "--out", str(tmp_path / "out"), *GUIDED_DDIM, *weights], capsys)
    assert code == 0, err
    result = Image.open(tmp_path / "out" / src.name)
    assert result.size == (160, 112) and result.mode == ("RGBA" if mode == "RGBA" else "RGB")
    assert "step 3/3" in err and "WARNING: --" not in err
    if mode == "RGBA":
        assert set(np.asarray(result.getchannel("A")).ravel().tolist()) == {128}


@pytest.mark.parametrize("args,message", [
    (["--eta", "-1"], "--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got -1"),
    (["--sampler", "ddim", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--guidance-scale", "-3"], "--guidance-scale must be a number >= 0 (1: no guidance), got -3"),
    (["--dec-w", "2"], "--dec-w (the CFW weight w) must be in [0, 1], got 2"),
    (["--device", "tpu"], "--device 'tpu': not a device; use cpu, cuda or cuda:N"),
])
def test_bad_sampler_options(photo, tmp_path, capsys, args, message):
    code, out, err = run(["upscale", str(photo), "--out", str(tmp_path), *args], capsys)
    assert (code, out, err) == (2, "", f"error: {message}\n")


@pytest.mark.parametrize("args,warning", [
    (["--negative-prompt", "blurry"], "WARNING: --negative-prompt has no effect at --guidance-scale 1; set a "
                                      "scale, e.g. 7 (the official script's)\n"),
    (["--guidance-scale", "7"], "WARNING: --guidance-scale has no effect without --negative-prompt\n"),
])
def test_guidance_that_cannot_act_is_warned_about(photo, tmp_path, capsys, args, warning):
    """Warned once, before anything loads (here the run then stops at the missing --cfw)."""
    code, _, err = run(["upscale", str(photo), "--out", str(tmp_path), *args, "--weights", "x.safetensors"], capsys)
    assert code == 2 and err.startswith(warning) and err.count("WARNING") == 1
