"""`evaluate` end to end on the golden-size weights, its numbers recomputed independently, and bad input."""

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stablesr_min.app import metrics
from stablesr_min.app.cli import main
from stablesr_min.app.evaluate import EvalDegradation, centre_crop, evaluation_lr, grid_crops
from stablesr_min.model import resolve_config
from stablesr_min.weights import WeightFiles

from photos import HELDOUT

# 2 steps; SR crops of 64 px are 8x8 latents, padded to one 16-latent tile (the golden-size UNet cannot
# take an 8-latent tile: its deepest map would be 1x1)
FAST = ["--steps", "2", "--crop", "64", "--tile", "16", "--overlap", "6"]


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    """Two small crops of real photos, of different shapes: 80x72 and 72x96."""
    folder = tmp_path_factory.mktemp("hr")
    Image.open(HELDOUT / "chelsea.png").convert("RGB").crop((100, 50, 180, 122)).save(folder / "chelsea.png")
    Image.open(HELDOUT / "coffee.png").convert("RGB").crop((200, 100, 272, 196)).save(folder / "coffee.png")
    return folder


def call(args):
    """main(args) -> (exit code, stdout, stderr), captured by hand (so that a module-scoped fixture can run it)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def weight_args(golden_weights):
    return ["--weights", str(golden_weights[0]), "--cfw", str(golden_weights[1])]


def read_png(path) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def evaluated(hr_folder, golden_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "results"
    args = ["evaluate", "--hr", str(hr_folder), "--out", str(out), *FAST, "--dec-w", "0", "1", "--save-images",
            *weight_args(golden_weights)]
    return (*call(args), out)


def test_writes_both_tables_with_the_right_rows(evaluated):
    code, stdout, stderr, out = evaluated
    assert code == 0, stderr
    report = json.loads((out / "metrics.json").read_text())
    methods = ["bicubic", "StableSR w=0", "StableSR w=1"]
    assert report["methods"] == methods
    assert [row["name"] for row in report["crops"]] == ["chelsea.png", "coffee.png"]
    assert report["degradation"]["description"] == ("Gaussian blur sigma 1.2 (13x13), bicubic /4, Gaussian noise "
                                                    "sigma 5/255 (seed 0), JPEG quality 75")
    assert report["settings"]["crop"] == 64 and report["settings"]["steps"] == 2 and report["settings"]["seeds"] == [42]
    assert report["rule"] == metrics.VERDICT_RULE
    for row in report["crops"]:
        assert sorted(row["scores"]) == sorted(methods)
        for s in row["scores"].values():
            (psnr,), (ssim,), (colour,) = s["psnr"], s["ssim"], s["colour"]  # one seed: one value each
            assert math.isfinite(psnr) and 0 < psnr < 60 and -1 <= ssim <= 1 and 0 <= colour < 255
    for m in methods:
        for k in ("psnr", "ssim", "colour"):
            values = [r["scores"][m][k][0] for r in report["crops"]]
            entry = report["summary"][m][k]
            assert entry["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert entry["seed_sd"] is None  # one seed (and bicubic draws no noise)
            if m != "bicubic":
                bicubic = [r["scores"]["bicubic"][k][0] for r in report["crops"]]
                diff = entry["vs_bicubic"]
                assert diff["mean"] == pytest.approx(np.mean(values) - np.mean(bicubic), abs=1e-12)
                # two photos of one crop each: the standard error of two paired differences
                assert diff["se"] == pytest.approx(abs(values[0] - bicubic[0] - values[1] + bicubic[1]) / 2, abs=1e-12)
    # w enters only at the decode, and changes it
    assert report["crops"][0]["scores"]["StableSR w=0"] != report["crops"][0]["scores"]["StableSR w=1"]

    table = (out / "metrics.md").read_text()
    heading, summary, _, per_photo = table.split("\n\n")
    assert heading.startswith("2 HR crops of 64x64 (1x1 per photo, 2 photos); LR: Gaussian blur sigma 1.2")
    assert heading.endswith(f"seeds 42.\nVerdict: {metrics.VERDICT_RULE}")
    rows = summary.splitlines()
    assert rows[0] == "| measure | method | mean | sd over seeds | difference to bicubic (+- 2 se over photos) | verdict |"
    psnr = report["summary"]["StableSR w=1"]["psnr"]
    assert rows[4] == (f"| PSNR (dB) | StableSR w=1 | {psnr['mean']:.2f} | - | {psnr['vs_bicubic']['mean']:+.2f} +- "
                       f"{2 * psnr['vs_bicubic']['se']:.2f} | {psnr['vs_bicubic']['verdict']} |")
    assert len(rows) == 2 + 4 * 3  # 4 measures x 3 methods
    bicubic = report["crops"][1]["scores"]["bicubic"]
    assert per_photo.splitlines()[3].startswith(
        f"| coffee.png | {bicubic['psnr'][0]:.2f} | {bicubic['ssim'][0]:.4f} | {bicubic['colour'][0]:.2f} |")
    assert stdout == summary + "\n"  # the summary table, printed
    assert "[1/2] chelsea.png: bicubic" in stderr and "[2/2] coffee.png: bicubic" in stderr
    assert not list(out.rglob("*.tmp"))


def test_bicubic_row_is_recomputable(evaluated, hr_folder):
    out = evaluated[-1]
    report = json.loads((out / "metrics.json").read_text())
    for row in report["crops"]:
        stem = Path(row["name"]).stem
        source = read_png(hr_folder / row["name"])
        h, w = source.shape[-2:]
        hr = source[..., (h - 64) // 2:(h - 64) // 2 + 64, (w - 64) // 2:(w - 64) // 2 + 64]
        assert torch.equal(read_png(out / "images" / f"{stem}_hr.png"), hr)
        lr = read_png(out / "images" / f"{stem}_lr.png")  # 8-bit values already (JPEG's output): lossless
        assert lr.shape[-2:] == (16, 16)
        # bicubic x4 in [-1, 1], as the pipeline upsamples, clamped
        bicubic = (F.interpolate(lr * 2 - 1, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1) + 1) / 2
        assert torch.equal(read_png(out / "images" / f"{stem}_bicubic.png"), metrics.to_levels(bicubic).float() / 255)
        a, b = metrics.to_levels(bicubic), metrics.to_levels(hr)
        assert row["scores"]["bicubic"]["psnr"] == [metrics.psnr(a, b).item()]
        assert row["scores"]["bicubic"]["ssim"] == [metrics.ssim(a, b).item()]
        assert row["scores"]["bicubic"]["colour"] == [metrics.lowpass_colour_error(a, b).item()]
        sr = metrics.to_levels(read_png(out / "images" / f"{stem}_sr_w1.png"))
        assert row["scores"]["StableSR w=1"]["psnr"] == [metrics.psnr(sr, b).item()]


@pytest.mark.commands
def test_several_seeds_and_a_grid(hr_folder, golden_weights, tmp_path):
    """--grid 2 crops each photo four times, --seed 1 2 samples each crop twice: one bicubic value per crop, two
    StableSR values, and the sd over seeds of the mean over crops."""
    out = tmp_path / "results"
    args = ["evaluate", "--hr", str(hr_folder), "--out", str(out), "--steps", "2", "--crop", "32", "--tile", "16",
            "--overlap", "6", "--grid", "2", "--seed", "1", "2", "--dec-w", "1", "--save-images",
            *weight_args(golden_weights)]
    code, _, stderr = call(args)
    assert code == 0, stderr
    report = json.loads((out / "metrics.json").read_text())
    assert [row["name"] for row in report["crops"]] == [f"{p}#{i}" for p in ("chelsea.png", "coffee.png") for i in range(4)]
    sr = np.array([row["scores"]["StableSR w=1"]["psnr"] for row in report["crops"]])  # (crops, seeds)
    assert sr.shape == (8, 2) and all(len(row["scores"]["bicubic"]["psnr"]) == 1 for row in report["crops"])
    assert not np.array_equal(sr[:, 0], sr[:, 1])  # another seed, another sample
    entry = report["summary"]["StableSR w=1"]["psnr"]
    assert entry["seed_sd"] == pytest.approx(np.std(sr.mean(axis=0), ddof=1), abs=1e-12)
    assert entry["mean"] == pytest.approx(sr.mean(), abs=1e-12)
    bicubic = np.array([row["scores"]["bicubic"]["psnr"][0] for row in report["crops"]])
    per_photo = (sr - bicubic[:, None]).reshape(2, 8).mean(axis=1)
    assert entry["vs_bicubic"]["se"] == pytest.approx(np.std(per_photo, ddof=1) / np.sqrt(2), abs=1e-12)
    source = read_png(hr_folder / "coffee.png")  # 72 wide, 96 high: cells of 36 x 48, each crop centred in one
    assert torch.equal(read_png(out / "images" / "coffee_3_hr.png"), source[..., 56:88, 38:70])
    assert torch.equal(read_png(out / "images" / "coffee_1_hr.png"), source[..., 8:40, 38:70])
    assert (out / "images" / "coffee_3_sr_w1_seed2.png").is_file()


def test_grid_crops_are_centred_in_their_cells():
    image = torch.arange(12 * 20).reshape(1, 1, 12, 20)
    crops = grid_crops(image, 4, 2)  # cells of 6 x 10: the crop's corner 1 and 3 pixels in
    assert [c.shape[-2:] for c in crops] == [(4, 4)] * 4
    assert torch.equal(crops[0], image[..., 1:5, 3:7]) and torch.equal(crops[3], image[..., 7:11, 13:17])
    assert torch.equal(crops[1], image[..., 1:5, 13:17]) and torch.equal(crops[2], image[..., 7:11, 3:7])
    assert torch.equal(grid_crops(image, 4, 1)[0], centre_crop(image, 4))
    # a cell smaller than the crop: clamped inside the image
    assert torch.equal(grid_crops(image, 10, 3)[0], image[..., 0:10, 0:10])
    assert torch.equal(grid_crops(image, 10, 3)[-1], image[..., 2:12, 10:20])


def test_sr_column_is_what_upscale_makes_of_the_lr(evaluated, golden_weights, tmp_path):
    """One sampled latent finished at w = 1 is exactly `upscale --dec-w 1` of the saved LR, same seed."""
    out = evaluated[-1]
    args = ["upscale", str(out / "images" / "chelsea_lr.png"), "--out", str(tmp_path), "--steps", "2",
            "--tile", "16", "--overlap", "6", "--dec-w", "1", "--seed", "42", *weight_args(golden_weights)]
    assert call(args)[0] == 0
    upscaled = np.asarray(Image.open(tmp_path / "chelsea_lr.png"))
    assert np.array_equal(upscaled, np.asarray(Image.open(out / "images" / "chelsea_sr_w1.png")))


def test_evaluation_degradation_is_fixed():
    hr = read_png(HELDOUT / "coffee.png")[..., :64, :96]
    lr = evaluation_lr(hr)
    assert lr.shape == (1, 3, 16, 24)
    assert torch.equal(lr, evaluation_lr(hr))  # seeded: the same LR every time
    assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit values
    other = evaluation_lr(hr, EvalDegradation(seed=1))
    assert 0 < (other - lr).abs().mean() < 0.05  # only the noise (and what JPEG makes of it) differs
    # the same image in a batch beside another degrades the same
    assert torch.equal(evaluation_lr(torch.cat([hr, hr.flip(-1)]))[:1], lr)


def test_centre_crop():
    image = torch.arange(7 * 9).reshape(1, 1, 7, 9)
    assert torch.equal(centre_crop(image, 4), image[..., 1:5, 2:6])


def bad_cases(tmp):
    """name -> (changes to the arguments, expected stderr line)."""
    (tmp / "empty").mkdir()
    (tmp / "broken").mkdir()
    (tmp / "broken" / "bad.png").write_text("not an image")
    (tmp / "a_file").write_text("x")
    (tmp / "tiny").mkdir()
    Image.new("RGB", (24, 16)).save(tmp / "tiny" / "a.png")
    (tmp / "twin").mkdir()
    Image.new("RGB", (64, 64)).save(tmp / "twin" / "chelsea.jpg")
    return {
        "no images": ({"--hr": [str(tmp / "empty")]},
                      f"error: {tmp / 'empty'}: no images found (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, in it or its subfolders)"),
        "unreadable": ({"--hr": [str(tmp / "broken")]},
                       f"error: {tmp / 'broken' / 'bad.png'}: not an image PIL can read (PNG, JPEG, WebP, TIFF, BMP, ...)"),
        "hr is a file": ({"--hr": [str(tmp / "a_file")]}, f"error: {tmp / 'a_file'}: not a folder (give folders of HR images)"),
        "crop too large": ({"--crop": ["96"]},
                           "error: {hr}/chelsea.png: 80x72 is smaller than --crop 96; use --crop 64 or less"),
        "photo below the smallest crop": ({"--hr": [str(tmp / "tiny")], "--crop": ["32"]},
                                          f"error: {tmp / 'tiny' / 'a.png'}: 24x16 is smaller than --crop 32; the "
                                          "smallest --crop is 32: take this photo out of --hr"),
        "crop not a multiple of 32": ({"--crop": ["48"]},
                                      "error: --crop 48: must be a positive multiple of 32 (4x scale x 8 for the VAE), e.g. 256"),
        "out under a file": ({"--out": [str(tmp / "a_file" / "results")]},
                             f"error: --out {tmp / 'a_file' / 'results'}: {tmp / 'a_file'} is a file, not a folder; choose another folder"),
        "same name twice": ({"--hr": ["{hr}", str(tmp / "twin")]},
                            f"error: {tmp / 'twin' / 'chelsea.jpg'} and {{hr}}/chelsea.png have the same name; rename one of "
                            "them (rows and saved images are named by it)"),
        "w out of range": ({"--dec-w": ["0.5", "2"]}, "error: --dec-w (the CFW weight w) must be in [0, 1], got 2"),
        "out inside hr": ({"--out": ["{hr}/results"]},
                          "error: --out {hr}/results: is inside --hr {hr}, so its saved images would be read as HR "
                          "photos by the next run; choose a folder outside the HR photos"),
        "grid of none": ({"--grid": ["0"]}, "error: --grid 0: must be >= 1 (crops per photo: its square)"),
        "border too wide": ({"--border": ["27"]},
                            "error: --border 27: must be >= 0 and leave at least 11 pixels of the --crop 64 for SSIM's window"),
    }


@pytest.mark.parametrize("case", ["no images", "unreadable", "hr is a file", "crop too large", "crop not a multiple of 32",
                                  "out under a file", "same name twice", "w out of range", "border too wide",
                                  "grid of none", "out inside hr", "photo below the smallest crop"])
def test_bad_input_is_one_line_and_exit_code_2(case, hr_folder, tmp_path):
    changes, expected = bad_cases(tmp_path)[case]
    out = tmp_path / "results"
    # weights that do not exist: each check must fire before any model is loaded
    options = {"--hr": [str(hr_folder)], "--out": [str(out)], "--crop": ["64"], "--weights": [str(tmp_path / "missing")],
               "--cfw": [str(tmp_path / "missing")], **changes}
    args = ["evaluate"] + [part.format(hr=hr_folder) for key, values in options.items() for part in [key, *values]]
    code, stdout, stderr = call(args)
    assert (code, stdout, stderr) == (2, "", expected.format(hr=hr_folder) + "\n")
    assert not out.exists() and not (hr_folder / "results").exists()


def test_more_steps_than_the_schedule_has(hr_folder, golden_weights, tmp_path):
    timesteps = resolve_config(WeightFiles([golden_weights[0]]), None).diffusion.timesteps
    args = ["evaluate", "--hr", str(hr_folder), "--out", str(tmp_path / "results"), *FAST, *weight_args(golden_weights),
            "--steps", str(timesteps + 1)]
    expected = f"error: --steps {timesteps + 1}: the schedule has {timesteps} steps; use at most {timesteps}\n"
    assert call(args) == (2, "", expected)
    assert not (tmp_path / "results").exists()


def test_weights_without_cfw(hr_folder, golden_weights, tmp_path):
    args = ["evaluate", "--hr", str(hr_folder), "--out", str(tmp_path / "results"), *FAST, *weight_args(golden_weights)]
    del args[args.index("--cfw"):args.index("--cfw") + 2]
    assert call(args) == (2, "", "error: --weights needs --cfw too (the CFW decoder, vqgan_cfw_00011.safetensors)\n")
    assert not (tmp_path / "results").exists()
