import os

import pytest
import torch

from stablesr_min.model import load_cfw, load_stablesr
from stablesr_min.weights import WeightFiles

from golden import GoldenSet

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tiny demo weights (notebooks, CLI without --weights) go to a temp folder, not ~/.cache."""
    os.environ["STABLESR_CACHE"] = str(tmp_path_factory.mktemp("cache"))


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
