"""The notebooks: committed with the outputs of the tiny model (scripts/run_notebooks.py writes them), and each
one runs headless on the CPU with the shipped tiny model, names its weights first, and draws its figures. Their
run times are printed (`pytest -s`), not asserted: a timed test fails on a busy machine, not on a slow notebook."""

import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Each notebook and the number of figures (image/png outputs) it draws at least.
MIN_FIGURES = {
    "01_walkthrough.ipynb": 10,  # input, canvas, z0, x_T and block means, previews, CFW, colour fix, prior, samplers, cost
    "02_time_aware_guidance.ipynb": 3,  # crops, SNR(t), similarity vs SNR (aware and blind)
    "03_cfw_tradeoff.ipynb": 5,  # crops, crops at w = 0/0.5/1, the measures vs w, the P-D plane, radial spectra
    "04_aggregation_sampling.ipynb": 5,  # weight maps, tile layouts, outputs, zoom, jump profiles
    "05_color_correction.ipynb": 3,  # outputs, shift bars, low-frequency bands
    "06_training_and_ablation.ipynb": 5,  # kernels, stages, loss curves, ablation images, loss by band
}
CELL_TIMEOUT_S = 600  # against a hung cell, far above any cell's run time
MAX_BYTES = 1_500_000
WEIGHTS_LINE = "**Weights:** the tiny StableSR shipped with stablesr-min (time-aware"


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(MIN_FIGURES)


def outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def names_the_tiny_weights_first(nb) -> bool:
    """The first displayed text (after the imports cell's one line) names the weights."""
    shown = [o for o in outputs(nb) if o.output_type == "display_data" and "text/markdown" in o.data]
    return bool(shown) and shown[0] is outputs(nb)[1] and shown[0].data["text/markdown"].startswith(WEIGHTS_LINE)


@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_notebook_is_committed_with_its_outputs(name):
    """Every code cell ran (it has outputs), the first output names the weights, no errors, no cell metadata,
    and the file stays small enough to read on GitHub."""
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_BYTES, f"{name}: {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3" and set(nb.metadata) <= {"kernelspec", "language_info"}
    for cell in nb.cells:
        assert cell.metadata == {}, cell.id
        if cell.cell_type == "code":
            assert cell.outputs and cell.execution_count is not None, f"{name}: cell {cell.id} has not run"
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert names_the_tiny_weights_first(nb)
    figures = sum("image/png" in o.get("data", {}) for o in outputs(nb))
    assert figures >= MIN_FIGURES[name]
    assert not [c for c in nb.cells if c.cell_type == "markdown" and "READING" in c.source]


@pytest.mark.notebooks
@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_notebook_runs_on_the_tiny_model(name, monkeypatch):
    monkeypatch.delenv("STABLESR_WEIGHTS", raising=False)
    monkeypatch.setenv("STABLESR_DEVICE", "cpu")
    files_before = {p: p.read_bytes() for p in NOTEBOOKS.iterdir()}
    # Executed in memory (the committed outputs stay as they are), from notebooks/ as Jupyter would run it;
    # "python3" is ipykernel's kernel for the interpreter running the tests.
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    print(f"{name}: {elapsed:.1f} s")

    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert names_the_tiny_weights_first(nb)
    figures = sum("image/png" in o.get("data", {}) for o in outputs(nb))
    assert figures >= MIN_FIGURES[name], f"{name} drew {figures} figures, expected at least {MIN_FIGURES[name]}"
    assert {p: p.read_bytes() for p in NOTEBOOKS.iterdir()} == files_before


NUMBER = re.compile(r"(?<![\w.])\d+\.\d{2,}(?!\d)")  # a number with 2+ decimals, as readings quote measurements (not "Sec. 3.1", "w = 0.5")


def output_text(nb) -> str:
    texts = []
    for output in outputs(nb):
        texts.append(output.get("text", ""))
        for kind in ("text/plain", "text/markdown"):
            texts.append(output.get("data", {}).get(kind, ""))
    return "\n".join(texts)


@pytest.mark.parametrize("name", sorted(MIN_FIGURES))
def test_readings_are_generated_not_typed(name):
    """No markdown cell quotes a number that an output computed: readings are f-strings into `Markdown`, so a
    re-run cannot leave them disagreeing with the outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    computed = set(NUMBER.findall(output_text(nb)))
    typed = {number for cell in nb.cells if cell.cell_type == "markdown" for number in NUMBER.findall(cell.source)}
    assert not typed & computed, f"{name}: markdown quotes computed numbers {sorted(typed & computed)}"
