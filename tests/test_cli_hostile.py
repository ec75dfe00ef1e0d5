"""The command line under hostile input (issue 21): the real `python -m stablesr_min` in a subprocess.

Each case asserts the exit code, the exact stderr line, no traceback, no file left behind and the inputs
unchanged. Failing-fast paths only, except one shared real upscale (tiny random weights, one step).
Variants of a case that take the same code path run in-process through `main`.
"""

import contextlib
import ctypes
import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr_min.app.cli import main
from stablesr_min.atomic import atomic_write
from stablesr_min.errors import Terminated
from stablesr_min.image_io import image_size
from stablesr_min.model import resolve_config
from stablesr_min.pipeline import smallest_tile
from stablesr_min.tiny import find_weights
from stablesr_min.weights import WeightFiles

from photos import HELDOUT

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "1", "--scale", "1", "--tile", "16", "--overlap", "6"]


def cli(*args, env=None, preexec_fn=None, code=None):
    """`python -m stablesr_min ARGS` (or `python -c CODE ARGS`) from the repository root."""
    environ = {k: v for k, v in os.environ.items() if k != "STABLESR_WEIGHTS"}
    command = ["-c", code, *map(str, args)] if code else ["-m", "stablesr_min", *map(str, args)]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT,
                          env={**environ, **(env or {})}, preexec_fn=preexec_fn)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def assert_refused(result, line: str):
    assert (result.returncode, result.stderr) == (2, f"error: {line}\n"), result.stderr
    assert result.stdout == ""


def write_png(path: Path, width: int, height: int, depth: int, colour_type: int, raw: bytes) -> Path:
    """A PNG written by hand (Pillow writes neither 16-bit RGB nor a lying header): IHDR, IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def photo(tmp_path):
    """A 40x28 RGB crop of a real photo (data/heldout/coffee.png)."""
    path = tmp_path / "coffee.png"
    Image.open(HELDOUT / "coffee.png").crop((250, 150, 290, 178)).save(path)
    return path


@pytest.fixture
def small_ckpt(tmp_path):
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.ones(2, 3)}}, path)
    return path


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def as_plain_user():
    """preexec_fn: root writes into any folder (chmod 555 does not stop it) through two capabilities;
    dropped from the bounding set, they are gone after exec, and a read-only folder is read-only."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"],
                               capture_output=True, preexec_fn=as_plain_user)
    except subprocess.SubprocessError:
        probe = None
    if probe is None or probe.returncode == 0:
        folder.chmod(0o755)
        pytest.skip("this machine lets the test process write into a chmod 555 folder")
    yield folder
    folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------------
# 1. An output folder that cannot be made or written: refused before any model loads, nothing created


def test_output_folder_under_a_regular_file(photo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", blocker / "results", *FAST)
    # One line: the RANDOM-weights warning, printed when the weights are chosen, never came.
    assert_refused(result, f"--out {blocker / 'results'}: {blocker} is a file, not a folder; choose another folder")
    assert files_under(tmp_path) == before


def test_read_only_output_folder(photo, read_only, tmp_path):
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", read_only / "results", *FAST, preexec_fn=as_plain_user)
    assert_refused(result, f"--out {read_only / 'results'}: cannot write in {read_only} (Permission denied); "
                           "choose another folder")
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------------------
# 2. An existing output is skipped with a note (a batch can be resumed); --overwrite redoes it (below,
#    in the shared real run)


def test_existing_output_is_skipped_without_loading_a_model(photo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (1, 1)).save(out / "coffee.png")
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", out, *FAST)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == f"skipped {photo}: {out / 'coffee.png'} exists (--overwrite redoes it)\n"
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------------------
# 3. Out-of-range steps, scale and device: refused up front, --out not created


@pytest.mark.parametrize("args,line", [
    (["--steps", "100000"], "--steps 100000: the schedule has {T} steps; use at most {T}"),
    (["--scale", "0.01"], "{photo}: 40x28 at --scale 0.01 would be 0x0 pixels; use a larger --scale"),
    (["--device", "meta"], "--device meta: the networks cannot run there; use cpu, cuda or cuda:N"),
], ids=["steps", "scale", "meta"])
def test_out_of_range_options(photo, tmp_path, args, line):
    schedule = resolve_config(WeightFiles(find_weights().stablesr), None).diffusion.timesteps  # the tiny weights'
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", tmp_path / "out", *args)
    assert_refused(result, line.format(photo=photo, T=schedule))
    assert files_under(tmp_path) == before


def test_a_tile_too_small_for_the_weights_is_refused_before_loading(photo, golden_weights, tmp_path):
    # The golden-size model is narrow (GroupNorm groups of one channel): one tile whose deepest map is 1x1 made
    # PyTorch raise mid-sampling with a bare traceback. Its smallest tile comes from its config.
    least = smallest_tile(resolve_config(WeightFiles([golden_weights[0]]), None))
    assert least - 1 >= 8, "the golden model must be deep enough for a tile above the general minimum of 8"
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", tmp_path / "out", "--weights", golden_weights[0], "--cfw",
                 golden_weights[1], "--steps", "1", "--tile", least - 1, "--overlap", "4")
    assert_refused(result, f"--tile {least - 1}: too small for these weights (their deepest level would be under "
                           f"2x2); use --tile {least} or more")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_scale(photo, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit:
        main(["upscale", str(photo), "--out", str(tmp_path / "out"), f"--scale={value}"])
    assert exit.value.code == 2 and capsys.readouterr().err == (
        f"error: argument --scale: not a finite number: '{value}' (see `python -m stablesr_min upscale --help`)\n")


# ------------------------------------------------------------------------------------------------------
# 4. convert: unusable output places and files that are not checkpoints, each named for what it is


def test_convert_into_a_read_only_folder(small_ckpt, read_only, tmp_path):
    before = files_under(tmp_path)
    dst = read_only / "x.safetensors"
    result = cli("convert", small_ckpt, dst, preexec_fn=as_plain_user)
    assert_refused(result, f"{dst}: cannot write in {read_only} (Permission denied); choose another folder")
    assert files_under(tmp_path) == before


def test_convert_a_text_file(tmp_path):
    src = tmp_path / "notes.ckpt"
    src.write_text("model weights: see the README\n")
    result = cli("convert", src, tmp_path / "x.safetensors")
    assert_refused(result, f"{src}: not a PyTorch checkpoint (a .ckpt is the zip archive or the pickle that "
                           "torch.save writes; this file is neither)")
    assert sorted(os.listdir(tmp_path)) == ["notes.ckpt"]


def test_convert_a_folder(tmp_path):
    result = cli("convert", tmp_path, tmp_path / "x.safetensors")
    assert_refused(result, f"{tmp_path}: is a folder, not a checkpoint file")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["missing folder", "onto a folder", "under a file", "png", "random bytes",
                                  "empty", "safetensors"])
def test_convert_refusals(small_ckpt, photo, tmp_path, capsys, case):
    src, dst = small_ckpt, tmp_path / "out.safetensors"
    if case == "missing folder":
        dst, line = tmp_path / "nope" / "x.safetensors", f"{tmp_path / 'nope' / 'x.safetensors'}: the folder " \
                                                          f"{tmp_path / 'nope'} does not exist; create it first"
    elif case == "onto a folder":
        dst.mkdir()
        line = f"{dst}: is a folder; name the file to write"
    elif case == "under a file":
        dst = photo / "x.safetensors"
        line = f"{dst}: {photo} is a file, not a folder; choose another folder"
    elif case == "safetensors":
        from safetensors.torch import save_file
        src = tmp_path / "already.safetensors"
        save_file({"a": torch.ones(1)}, src)
        line = f"{src}: is already safetensors; use it as it is (no conversion needed)"
    else:
        src = tmp_path / "bad.ckpt"
        src.write_bytes({"png": photo.read_bytes(), "empty": b"",
                         "random bytes": np.random.default_rng(0).bytes(4096).replace(b"\x80", b"\x00")}[case])
        line = f"{src}: is empty" if case == "empty" else \
            f"{src}: not a PyTorch checkpoint (a .ckpt is the zip archive or the pickle that torch.save writes; " \
            "this file is neither)"
    before = files_under(tmp_path)
    assert main(["convert", str(src), str(dst)]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------------------
# 5. SIGTERM leaves no temp file; atomic writes flush the file before the rename and the folder after

SIGTERM_AFTER_WRITE = """
import os, runpy, signal, sys
import stablesr_min.weights as weights
write = weights.save_file

def write_then_sigterm(tensors, filename, metadata=None):
    write(tensors, filename, metadata=metadata)  # the temp file is whole, the rename not yet done
    os.kill(os.getpid(), signal.SIGTERM)

weights.save_file = write_then_sigterm
sys.argv[0] = "stablesr_min"
runpy.run_module("stablesr_min", run_name="__main__", alter_sys=True)
"""


def test_sigterm_during_convert_leaves_no_temp_file(small_ckpt, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    before = files_under(tmp_path)
    result = cli("convert", small_ckpt, tmp_path / "x.safetensors", code=SIGTERM_AFTER_WRITE, env={"TMPDIR": str(temp)})
    assert (result.returncode, result.stderr, result.stdout) == (128 + signal.SIGTERM, "terminated\n", "")
    assert files_under(tmp_path) == before


def test_atomic_write_flushes_the_file_then_its_folder(tmp_path, monkeypatch):
    target, flushed = tmp_path / "out.bin", []
    fsync = os.fsync

    def record(fd):
        flushed.append((Path(os.readlink(f"/proc/self/fd/{fd}")), target.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"data"))
    (file, renamed_before), (folder, renamed_after) = flushed
    assert file.parent == tmp_path.resolve() and file.name.startswith(".out.bin.") and not renamed_before
    assert folder == tmp_path.resolve() and renamed_after
    assert target.read_bytes() == b"data"


# ------------------------------------------------------------------------------------------------------
# 6. A decompression-bomb-sized image: the memory message, not Pillow's error or warning


def test_decompression_bomb_gets_the_memory_message(tmp_path):
    bomb = write_png(tmp_path / "bomb.png", 100_000, 100_000, 8, 2, bytes(301))
    before = files_under(tmp_path)
    result = cli("upscale", bomb, "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {bomb}: 100000x100000 at --scale 4 needs about 14603.1 GB for "
                                    "the image canvas, but cpu has ")
    assert files_under(tmp_path) == before
    # Above Pillow's warning size (89 MP) but below its error size: no warning either.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(write_png(tmp_path / "big.png", 10_000, 10_000, 8, 2, bytes(301))) == (10_000, 10_000)


# ------------------------------------------------------------------------------------------------------
# 7-9 (and 2's --overwrite): one real upscale of a 16-bit RGB PNG, an animated GIF and the PNG named
# again twice, into a folder that already holds a stale output of the PNG


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_run")
    crop = np.asarray(Image.open(HELDOUT / "coffee.png").convert("RGB")
                      .crop((250, 150, 290, 178)), dtype=np.uint16)
    rows = (crop * 257).astype(">u2")  # (28, 40, 3) big-endian 16-bit samples
    png16 = write_png(folder / "deep.png", 40, 28, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rows))
    gif = folder / "moving.gif"
    frames = [Image.fromarray((crop // (i + 1)).astype(np.uint8)) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    (folder / "link.png").symlink_to(png16.name)
    out = folder / "out"
    out.mkdir()
    Image.new("RGB", (1, 1)).save(out / "deep.png")  # stale: --overwrite redoes it
    inputs = {p: p.read_bytes() for p in (png16, gif)}
    result = cli("upscale", png16, gif, png16, folder / "link.png", "--out", out, "--overwrite", *FAST)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert all(p.read_bytes() == data for p, data in inputs.items()), "inputs are never changed"
    return result, png16, gif, out


def test_16_bit_rgb_png_warns_that_it_is_read_at_8_bits(real_run):
    result, png16, _, out = real_run
    notes = [line for line in result.stderr.splitlines() if line.startswith(f"WARNING: {png16}")]
    assert notes == [f"WARNING: {png16}: a 16-bit PNG with colour or alpha: Pillow reads it at 8 bits per "
                     "channel, so the extra precision is lost (only plain 16-bit grayscale is read at full "
                     "precision)"]


def test_animated_image_warns_that_only_the_first_frame_is_used(real_run):
    result, _, gif, _ = real_run
    notes = [line for line in result.stderr.splitlines() if line.startswith(f"WARNING: {gif}")]
    assert notes == [f"WARNING: {gif}: has 3 frames (animated or multi-page); only the first is upscaled"]


def test_an_input_named_twice_is_upscaled_once(real_run):
    result, png16, gif, out = real_run
    assert result.stdout == f"wrote {out / 'deep.png'} (40x28)\nwrote {out / 'moving.png'} (40x28)\n"
    assert [line for line in result.stderr.splitlines() if line.startswith("deep.png: ")] == \
           [line for line in result.stderr.splitlines() if line.startswith("deep.png: step 1/1")]
    assert sorted(os.listdir(out)) == ["deep.png", "moving.png"]


def test_overwrite_redoes_an_existing_output(real_run):
    _, _, _, out = real_run
    assert Image.open(out / "deep.png").size == (40, 28)


# ------------------------------------------------------------------------------------------------------
# 10. Bad option values: one line with the error and where the help is, not argparse's usage block


def test_bad_option_value_is_one_line(photo, tmp_path):
    result = cli("upscale", photo, "--out", tmp_path / "out", "--steps", "many")
    assert_refused(result, "argument --steps: invalid int value: 'many' (see `python -m stablesr_min upscale --help`)")
    assert os.listdir(tmp_path) == ["coffee.png"]


@pytest.mark.parametrize("argv,problem", [
    (["upscale", "x.png", "--out", "o", "--colorfix", "pink"], "argument --colorfix: invalid choice: 'pink'"),
    (["upscale", "x.png", "--out", "o", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["evaluate", "--hr", "h", "--out", "o", "--dec-w", "nan"], "argument --dec-w: not a finite number: 'nan'"),
    (["upscale", "x.png"], "the following arguments are required: --out"),
    (["enlarge"], "argument command: invalid choice: 'enlarge'"),
])
def test_bad_options_in_process(capsys, argv, problem):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err  # argparse words its choices differently across Python versions
    prog = "python -m stablesr_min" + (f" {argv[0]}" if argv[0] in ("upscale", "evaluate") else "")
    assert exit.value.code == 2 and err.startswith(f"error: {problem}") and err.count("\n") == 1
    assert err.endswith(f" (see `{prog} --help`)\n")


# ------------------------------------------------------------------------------------------------------
# 11. Ctrl-C or SIGTERM while torch is still importing: exit code 130 or 143, as later on, saying that nothing was done
# yet and that the same command, run again, does it

SIGNAL_DURING_IMPORT = """
import os, runpy, signal, sys

# As in a terminal: a test runner started in the background (`cmd &` in a script) inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlCWhenTorchIsImported:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":  # first asked for by `from .cli import main`, in __main__.py
            os.kill(os.getpid(), signal.SIGNUM)
        return None

sys.meta_path.insert(0, CtrlCWhenTorchIsImported())
sys.argv[0] = "stablesr_min"
runpy.run_module("stablesr_min", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signum, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_sigterm_during_import(photo, tmp_path, signum, code, word):
    before = files_under(tmp_path)
    result = cli("upscale", photo, "--out", tmp_path / "out", code=SIGNAL_DURING_IMPORT.replace("SIGNUM", signum))
    said = f"{word} while starting, before the command did anything: run the same command again\n"
    assert (result.returncode, result.stderr, result.stdout) == (code, said, "")
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------------------
# 12. The parts of a StableSR checkpoint alone (issue 44, items 11 and 12): the diffusion prior would sample without
# the LR's guidance; the SR part alone is no checkpoint to load. Each is said in one line, before any model loads.

TINY = ROOT / "stablesr_min" / "tiny"
SR_PART = ("only the time-aware encoder and SFT layers of a StableSR checkpoint (as the tiny model's sr.safetensors), "
           "without the diffusion prior they go after (given together: prior.safetensors sr.safetensors)")
PRIOR_ALONE = ("is a plain Stable Diffusion 2.x checkpoint (no time-aware encoder / SFT), not StableSR's "
               "(stablesr_000117); sampling needs the time-aware encoder and SFT layers too (the tiny model's "
               "sr.safetensors goes after its prior.safetensors)")


@pytest.mark.parametrize("args, line", [
    (["upscale", "{photo}", "--out", "{out}", "--weights", "{prior}", "--cfw", "{cfw}"], "{prior}: " + PRIOR_ALONE),
    (["upscale", "{photo}", "--out", "{out}", "--weights", "{sr}", "--cfw", "{cfw}"], "{sr}: is " + SR_PART),
    (["train", "cfw-data", "--weights", "{prior}", "--data", "{data}", "--out", "{out}", "--count", "1"],
     "{prior}: " + PRIOR_ALONE),
    (["train", "sr", "--base", "{sr}", "--data", "{data}", "--out", "{out}", "--steps", "1", "--gt-size", "64"],
     "{sr}: --base needs a StableSR or Stable Diffusion 2.x checkpoint, but this is " + SR_PART),
    (["train", "unet", "--vae", "{sr}", "--data", "{data}", "--out", "{out}", "--steps", "1"],
     "{sr}: --vae needs a VAE written by `train vae` (or an SD 2.x or StableSR checkpoint), but this is " + SR_PART),
    (["train", "cfw", "--cfw-base", "{sr}", "--data", "{data}", "--out", "{out}", "--steps", "1"],
     "{sr}: --cfw-base needs a CFW, VAE or SD 2.x checkpoint, but this is " + SR_PART),
], ids=["upscale prior", "upscale sr part", "cfw-data prior", "train sr sr part", "train unet sr part",
        "train cfw sr part"])
def test_a_part_of_stablesr_alone_is_refused_naming_what_it_is(photo, tmp_path, capsys, args, line):
    data = tmp_path / "data"
    data.mkdir()
    photo.rename(data / photo.name)
    names = {"photo": data / photo.name, "out": tmp_path / "out", "prior": TINY / "prior.safetensors",
             "sr": TINY / "sr.safetensors", "cfw": TINY / "cfw.safetensors", "data": data}
    assert main([arg.format(**names) for arg in args]) == 2
    assert capsys.readouterr().err == f"error: {line.format(**names)}\n"
    assert not (tmp_path / "out").exists()


STOP_AFTER_THE_END = """
import atexit, os, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see SIGNAL_DURING_IMPORT)
from stablesr_min.app.signals import run_command_line

atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGTERM)))
run_command_line(lambda: print("wrote everything") or 0)
"""


def test_a_stop_after_the_command_ended_changes_nothing():
    """Ctrl-C or SIGTERM while Python shuts down, after the command said it is done: exit 0, nothing more said
    (it was exit 130 with no message)."""
    result = cli(code=STOP_AFTER_THE_END)
    assert (result.returncode, result.stdout, result.stderr) == (0, "wrote everything\n", "")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_a_stop_as_the_command_returns_changes_nothing(photo, tmp_path, monkeypatch, capsys, stop):
    """Ctrl-C or SIGTERM in the instant after a command returned, before `main` does: the command has ended and
    said so; exit 0, nothing more said (it was "interrupted", 130)."""
    from stablesr_min.app import cli as cli_module

    @contextlib.contextmanager
    def stop_once_the_command_returned():
        yield
        raise stop()

    monkeypatch.setattr(cli_module, "terminate_on_sigterm", stop_once_the_command_returned)
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (1, 1)).save(out / "coffee.png")
    assert main(["upscale", str(photo), "--out", str(out), *FAST]) == 0
    assert capsys.readouterr() == (f"skipped {photo}: {out / 'coffee.png'} exists (--overwrite redoes it)\n", "")
