"""The notebooks: committed as clean JSON, and each one runs headless on the CPU with the tiny random weights,
says so first, and draws its figures within its time budget."""

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from stablesr_min.model import RANDOM_WEIGHTS_WARNING

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Each notebook and the number of figures (image/png outputs) it draws at least.
MIN_FIGURES = {
    "01_walkthrough.ipynb": 8,  # input, upscale/canvas, z0, x_T, previews, CFW, colour fix, samplers
    "02_time_aware_guidance.ipynb": 3,  # photos, SNR(t), similarity vs SNR
    "03_cfw_tradeoff.ipynb": 3,  # photos, w grid, PSNR/SSIM/sharpness vs w
    "04_aggregation_sampling.ipynb": 5,  # weight maps, tile layouts, outputs, zoom, jump profiles
    "05_color_correction.ipynb": 3,  # outputs, shift bars, low-frequency bands
}
BUDGET_S = 120  # per notebook, on the CI machine (2 slow cores)


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(MIN_FIGURES)


@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_notebook_is_committed_clean(name):
    """No outputs, no execution counts, no cell metadata, no notebook metadata but the kernel
    (scripts/strip_notebooks.py writes this form)."""
    text = (NOTEBOOKS / name).read_text()
    nbformat.validate(nbformat.reads(text, as_version=4))
    raw = json.loads(text)
    assert set(raw["metadata"]) <= {"kernelspec", "language_info"}
    assert raw["metadata"]["kernelspec"]["name"] == "python3"
    for cell in raw["cells"]:
        assert cell["metadata"] == {}, cell["id"]
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["id"]


def outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_notebook_runs_on_the_tiny_weights(name, monkeypatch):
    monkeypatch.delenv("STABLESR_WEIGHTS", raising=False)
    monkeypatch.setenv("STABLESR_DEVICE", "cpu")
    files_before = {p: p.read_bytes() for p in NOTEBOOKS.iterdir()}
    # Executed in memory (outputs never reach the repository), from notebooks/ as Jupyter would run it;
    # "python3" is ipykernel's kernel for the interpreter running the tests.
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    print(f"{name}: {elapsed:.1f} s")

    produced = outputs(nb)
    assert not [o for o in produced if o.output_type == "error"]
    first = produced[0]
    assert first.output_type == "display_data" and first.data["text/markdown"] == RANDOM_WEIGHTS_WARNING
    figures = sum("image/png" in o.get("data", {}) for o in produced)
    assert figures >= MIN_FIGURES[name], f"{name} drew {figures} figures, expected at least {MIN_FIGURES[name]}"
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f} s (budget {BUDGET_S} s)"
    assert {p: p.read_bytes() for p in NOTEBOOKS.iterdir()} == files_before
