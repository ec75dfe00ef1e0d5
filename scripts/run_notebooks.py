"""Execute the notebooks in place, so that the committed files show the outputs of the current code.

    python scripts/run_notebooks.py                                  # every notebooks/*.ipynb
    python scripts/run_notebooks.py notebooks/03_cfw_tradeoff.ipynb  # some of them

Each runs headless on the CPU with the shipped tiny model ($STABLESR_WEIGHTS and $STABLESR_DEVICE are ignored
here, so the committed figures are always the tiny model's), from notebooks/ as Jupyter runs it. Cell metadata
(execution timings) is dropped, outputs and execution counts are kept; a notebook is written only once it has
run without an error, atomically. Run it before committing a change to a notebook or to what they call;
tests/test_notebooks.py checks that every code cell has outputs and that each file stays under 1.5 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablesr_min.app.notebooks import NOTEBOOKS, execute  # noqa: E402
from stablesr_min.atomic import atomic_write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    args = parser.parse_args()
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    os.environ.pop("STABLESR_WEIGHTS", None)
    os.environ["STABLESR_DEVICE"] = "cpu"
    for path in paths:
        start = time.monotonic()
        try:
            nb = execute(path)
        except CellExecutionError as e:
            sys.exit(f"{path}: a cell failed; the file is left as it was\n{e}")
        atomic_write(path, lambda tmp: nbformat.write(nb, tmp))
        print(f"{path}: ran in {time.monotonic() - start:.0f} s, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
