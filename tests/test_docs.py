"""The documentation: README.md stays a front page, every docs/ page is linked from it, and every command block
marked runnable (an HTML comment `<!-- runnable -->` right above the fence, invisible on GitHub) runs as
written, so that no documented command can rot.

A runnable block runs in a fresh folder that holds the checkout's files (linked) and `.venv` (the
environment running the tests), one line at a time, as a user would paste it, with changes that keep the
suite short: the Quick start's install (what CI has just done) is left out, `--steps N` and `--count N`
become 2, an `upscale` or `evaluate` without `--steps` gets `--steps 2`, and in Python blocks the weights'
stored sampling settings (`sampling_defaults`) say 2 steps (tiny sizes: what is checked is that the code runs
and writes what the next line reads; `test_cli.py` checks the Quick start's image).
`python -m stablesr_min` lines run in this process (`main`), others in bash; Python blocks are executed.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stablesr_min.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\n *```(bash|python)\n(.*?)\n *```", re.S)
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
SHRINK = [(re.compile(r"--steps \d+"), "--steps 2"), (re.compile(r"--count \d+"), "--count 2")]
LINKED = ["stablesr_min", "data", "examples", "scripts", "requirements.txt"]


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


def run_line(line: str, cwd: Path) -> None:
    for pattern, tiny in SHRINK:
        line = pattern.sub(tiny, line)
    words = shlex.split(line)
    if {"upscale", "evaluate"} & set(words[3:4]) and "--steps" not in words:
        words += ["--steps", "2"]
    if words[:3] == [".venv/bin/python", "-m", "stablesr_min"]:
        assert main(words[3:]) == 0, line
    else:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, capture_output=True, text=True,
                                timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"


@pytest.mark.parametrize("language, body", blocks())
def test_a_runnable_block_runs_as_written(language, body, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace(tmp_path))
    if language == "python":
        from stablesr_min import tiny

        stored = tiny.sampling_defaults
        monkeypatch.setattr(tiny, "sampling_defaults", lambda paths: {**stored(paths), "steps": 2})
        exec(compile(body, "<docs>", "exec"), {"__name__": "__docs__"})
        return
    for line in body.splitlines():
        line = line.strip().removeprefix(INSTALL)
        if line and not line.startswith("#"):
            run_line(line, tmp_path)
