import os

# The tests train in this process and resume in it: MKL's strict mode, as `python -m stablesr_min` sets it
# (stablesr_min/__main__.py says why), before torch is imported
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

from stablesr_min.model import load_cfw, load_stablesr  # noqa: E402
from stablesr_min.weights import WeightFiles  # noqa: E402

from golden import GoldenSet  # noqa: E402


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
