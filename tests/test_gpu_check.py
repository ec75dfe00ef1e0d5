"""`scripts/gpu_check.py` (issue 31): the CPU --small run writes every section it is given, and bad options are
one line.

The report's numbers are not checked against any bound: timing is the script's job, never a test's. The training
section is left out: its commands are the tiny model's recipe (`stage_commands` of scripts/train_tiny.py), which
the suite runs once, in the `quick_recipe` fixture.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = ("numerics", "speed", "memory", "notebooks", "training")
UNTRAINED = SECTIONS[:-1]


def gpu_check(*args, timeout=300):
    # One OpenMP thread: on a CPU shared with other jobs two threads spin-wait on each other (seen beside a
    # training job: 47 s with one thread, 3.4 minutes with two); the report's content is under test, not its speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.commands
def test_small_cpu_run_reports_every_section_that_needs_no_training(tmp_path):
    out = tmp_path / "report"
    done = gpu_check("--device", "cpu", "--small", "--only", ",".join(UNTRAINED), "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in UNTRAINED:
        assert report[name], name
        assert "error" not in report[name], (name, report[name])
    assert report["training"] == {"skipped": "not in --only"}
    # numerics: float16 against float32 for every check, a finite difference or the error that stopped it
    half = {row["check"]: row for row in report["numerics"]["rows"] if row["dtype"] == "float16"}
    assert set(half) == {"unet_step", "vae_encode", "vae_decode", "cfw_decode"}
    for row in half.values():
        assert "error" in row or (not row["nonfinite"] and math.isfinite(row["rel_l2"])
                                  and math.isfinite(row["max_abs_diff"])), row
    assert any(row["seconds"] > 0 for row in report["speed"]["rows"])
    assert report["memory"]["peak_ratio"] > 0
    assert "skipped" in report["notebooks"]  # CUDA only
    markdown = (out / "report.md").read_text()
    for name in SECTIONS:
        assert f"\n## {name}\n" in markdown, name
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no temp file left


def test_unknown_section_is_one_line(tmp_path):
    done = gpu_check("--only", "numerics,speeed", "--out", tmp_path / "report", timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --only: unknown section 'speeed'"), done.stderr
    assert lines[0].endswith("(see `scripts/gpu_check.py --help`)")
    assert not (tmp_path / "report").exists()


def test_a_device_that_is_not_one_is_one_line(tmp_path):
    done = gpu_check("--device", "tpu", "--out", tmp_path / "report", timeout=120)
    assert (done.returncode, done.stderr) == (2, "error: --device 'tpu': not a device; use cpu, cuda or cuda:N (see "
                                                 "`scripts/gpu_check.py --help`)\n")
