"""The documentation: README.md stays a front page, every docs/ page is linked from it, and every command block
marked runnable (an HTML comment `<!-- runnable -->` right above the fence, invisible on GitHub) runs as
written, so that no documented command can rot.

A runnable block runs in a fresh folder that holds the checkout's files (linked) and `.venv` (the
environment running the tests), one line at a time, as a user would paste it, with changes that keep the
suite short: the Quick start's install (what CI has just done) is left out, `--steps N` and `--count N`
become 2, an `upscale` or `evaluate` without `--steps` gets `--steps 2`, and in Python blocks the weights'
stored sampling settings (`sampling_defaults`) say 2 steps (tiny sizes: what is checked is that the code runs
and writes what the next line reads). The Quick start alone runs exactly as written, and its image is checked.
`python -m stablesr_min` lines run in this process (`main`), others in bash; Python blocks are executed.

A block with `train` lines does not train: each of them is checked against the tiny model's recipe
(scripts/train_tiny.py: the CLI takes it, and every option it gives other than its lengths is the recipe's),
and its other lines run on the files of the suite's one training run (`quick_recipe`), in the block's runs folder.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr_min.app.cli import build_parser, main
from stablesr_min.app.metrics import psnr
from stablesr_min.tiny import TINY_MODEL_NOTICE

from run_files import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\n *```(bash|python)\n(.*?)\n *```", re.S)
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
SHRINK = [(re.compile(r"--steps \d+"), "--steps 2"), (re.compile(r"--count \d+"), "--count 2")]
LINKED = ["stablesr_min", "data", "examples", "scripts", "requirements.txt"]
QUICK_START = "README.md#0"  # run exactly as written (its install left out), and its image checked
QUICK_START_MIN_PSNR = 30  # dB; the shipped model measured 33.4 (a noise output: about 10)
CLI = ".venv/bin/python -m stablesr_min "
TRAIN = CLI + "train "
LENGTHS = {"--steps", "--count"}  # a documented training line's own: every other option is the recipe's


def blocks() -> list:
    found = []
    for page in PAGES:
        for n, match in enumerate(RUNNABLE.finditer(page.read_text())):
            language, body = match.groups()
            found.append(pytest.param(language, body, id=f"{page.relative_to(ROOT)}#{n}"))
    return found


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []
    for page in PAGES[1:]:  # and each page links back
        assert "(../README.md)" in page.read_text(), page.name


def test_there_are_runnable_blocks_and_the_finder_sees_a_marked_one():
    assert len(blocks()) >= 4
    sample = "text\n<!-- runnable -->\n```bash\necho hi\n```\n"
    assert [m.groups() for m in RUNNABLE.finditer(sample)] == [("bash", "echo hi")]


def workspace(tmp_path: Path) -> Path:
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the running environment, unresolved
    return tmp_path


def run_line(line: str, cwd: Path, shrink: bool = True) -> None:
    if shrink:
        for pattern, tiny in SHRINK:
            line = pattern.sub(tiny, line)
    words = shlex.split(line)
    if shrink and {"upscale", "evaluate"} & set(words[3:4]) and "--steps" not in words:
        words += ["--steps", "2"]
    if words[:3] == [".venv/bin/python", "-m", "stablesr_min"]:
        assert main(words[3:]) == 0, line
    else:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, capture_output=True, text=True,
                                timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"


def lines(body: str) -> list[str]:
    stripped = [line.strip().removeprefix(INSTALL) for line in body.splitlines()]
    return [line for line in stripped if line and not line.startswith("#")]


def trains(body: str) -> bool:
    return any(line.startswith(TRAIN) for line in lines(body))


@pytest.mark.commands
@pytest.mark.parametrize("language, body", [b for b in blocks() if b.id != QUICK_START and not trains(b.values[1])])
def test_a_runnable_block_runs_as_written(language, body, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace(tmp_path))
    if language == "python":
        from stablesr_min import tiny

        stored = tiny.sampling_defaults
        monkeypatch.setattr(tiny, "sampling_defaults", lambda paths: {**stored(paths), "steps": 2})
        exec(compile(body, "<docs>", "exec"), {"__name__": "__docs__"})
        return
    for line in lines(body):
        run_line(line, tmp_path)


def options(words: list[str]) -> dict[str, str | None]:
    """{"--opt": value} of a command line's words after `train WHAT` (a flag's value: None)."""
    found = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            found[word] = None if following.startswith("--") else following
    return found


def check_against_the_recipe(line: str, runs: str) -> None:
    """A documented `train` line is a stage of scripts/train_tiny.py's recipe (its runs folder RUNS), shortened."""
    words = shlex.split(line.removeprefix(CLI))
    build_parser().parse_args(words)  # the command line takes it as written
    recipe, stages = load_recipe(), {}
    for _, cmd, *_ in recipe.stage_commands(recipe.Recipe(), Path(runs)):
        stages.setdefault(cmd[1], cmd)  # `train WHAT`'s first stage
    given = {k: v for k, v in options(words[2:]).items() if k not in LENGTHS}
    stage = options([w.replace(f"{ROOT}/", "") for w in stages[words[1]][2:]])  # data/photos as the docs name it
    assert given == {k: stage.get(k, "not in the recipe") for k in given}, line


def training_blocks(with_other_lines: bool = False) -> list:
    """The blocks with `train` lines (with_other_lines: and lines that are not, such as an upscale)."""
    found = []
    for block in blocks():
        body = block.values[1]
        others = [line for line in lines(body) if not line.startswith(TRAIN)]
        if trains(body) and (others or not with_other_lines):
            found.append(pytest.param(body, id=block.id))
    return found


def runs_folder(body: str) -> str:
    """Where a training block's runs go: runs/mine for `--out runs/mine/vae` on its first line."""
    first = next(line for line in lines(body) if line.startswith(TRAIN))
    return str(Path(options(shlex.split(first))["--out"]).parent)


@pytest.mark.parametrize("body", training_blocks())
def test_a_training_blocks_train_lines_are_the_recipes(body):
    for line in lines(body):
        if line.startswith(TRAIN):
            check_against_the_recipe(line, runs_folder(body))


@pytest.mark.training
@pytest.mark.parametrize("body", training_blocks(with_other_lines=True))
def test_a_training_blocks_other_lines_run_on_the_quick_recipes_files(body, quick_recipe, tmp_path, monkeypatch):
    """The lines that read what the `train` lines write (the README's upscale) run on the quick recipe's run
    folders, linked where the block puts its own."""
    monkeypatch.chdir(workspace(tmp_path))
    runs = tmp_path / runs_folder(body)
    runs.parent.mkdir(parents=True)
    runs.symlink_to(quick_recipe)
    for line in lines(body):
        if not line.startswith(TRAIN):
            run_line(line, tmp_path)


@pytest.mark.commands
def test_the_quick_start_is_a_real_upscale_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """The README's first command, as written: no weights named, so the shipped tiny model at its own sampling
    settings, announced in one line; its output, scaled back down, is the input (not noise)."""
    (block,) = [b for b in blocks() if b.id == QUICK_START]
    monkeypatch.chdir(workspace(tmp_path))
    monkeypatch.delenv("STABLESR_WEIGHTS", raising=False)
    run_line(block.values[1].strip().removeprefix(INSTALL), tmp_path, shrink=False)
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == TINY_MODEL_NOTICE and "random" not in (out + err).lower()
    sr = Image.open(tmp_path / "outputs" / "chelsea_128x96.png")
    assert sr.size == (512, 384)
    down = torch.from_numpy(np.asarray(sr.resize((128, 96), Image.BOX), dtype=np.float64)).permute(2, 0, 1)[None]
    example = ROOT / "examples" / "chelsea_128x96.png"
    given = torch.from_numpy(np.asarray(Image.open(example).convert("RGB"), dtype=np.float64)).permute(2, 0, 1)[None]
    assert psnr(down, given).item() > QUICK_START_MIN_PSNR
