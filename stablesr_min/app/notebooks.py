"""Running the notebooks in notebooks/ headless (nbclient + ipykernel, the pieces of Jupyter they need), in
memory: scripts/run_notebooks.py writes the result back, scripts/gpu_check.py times it on a GPU."""

from __future__ import annotations

from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent.parent / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
TIMEOUT_S = 600  # per cell


def execute(path: Path):
    """The notebook at `path`, run top to bottom (the file is only read): its cells' outputs, with the
    metadata that running leaves (cell timings, the kernel's versions) cleared."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata = {}
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb
