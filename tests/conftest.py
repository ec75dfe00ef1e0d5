import os
import subprocess
import sys
from pathlib import Path

# The tests train in this process and resume in it: MKL's strict mode, as `python -m stablesr_min` sets it
# (stablesr_min/__main__.py says why), before torch is imported
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

from stablesr_min.model import load_cfw, load_stablesr  # noqa: E402
from stablesr_min.weights import WeightFiles  # noqa: E402

from golden import GoldenSet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The slow tier, each test marked with why it is slow: `pytest -q` leaves these out (pytest.ini: -m "not slow"),
# `pytest -q -m ""` runs every test, `-m slow` the slow tier alone, `-m notebooks` one kind of it.
SLOW_KINDS = {
    "training": "trains: the quick recipe, or several runs of a training command (stopped, resumed, compared)",
    "notebooks": "runs a notebook headless",
    "distributed": "starts several training processes (torchrun, torch.multiprocessing)",
    "commands": "runs a documented command or a script end to end (upscale, evaluate, gpu_check)",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: in the slow tier (set on every test with one of the marks below)")
    for name, why in SLOW_KINDS.items():
        config.addinivalue_line("markers", f"{name}: {why}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def golden() -> GoldenSet:
    """The golden set named by STABLESR_GOLDEN (default tests/golden)."""
    return GoldenSet()


@pytest.fixture(scope="session")
def golden_weights(golden, tmp_path_factory):
    """(stablesr.safetensors, cfw.safetensors) filled by the FORMAT.md rule, written once per session."""
    return golden.write_weights(tmp_path_factory.mktemp("golden_weights"))


@pytest.fixture(scope="session")
def stablesr_files(golden_weights) -> WeightFiles:
    return WeightFiles([golden_weights[0]])


@pytest.fixture(scope="session")
def cfw_files(golden_weights) -> WeightFiles:
    return WeightFiles([golden_weights[1]])


@pytest.fixture(scope="session")
def stablesr(golden_weights):
    """The golden-size StableSR model, loaded through the project's strict loader."""
    return load_stablesr([golden_weights[0]])


@pytest.fixture(scope="session")
def cfw(golden_weights):
    return load_cfw(golden_weights[1])


@pytest.fixture(scope="session")
def quick_recipe(tmp_path_factory) -> Path:
    """`scripts/train_tiny.py --quick` (every stage of the tiny model's recipe, 2 steps each): the suite's one
    training of the tiny model, shared by every test that needs its files."""
    runs = tmp_path_factory.mktemp("tiny_runs")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--quick", "--runs", str(runs),
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs
