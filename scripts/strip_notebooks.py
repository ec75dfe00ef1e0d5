"""Strip notebooks to the clean JSON the repository keeps: no outputs, no execution counts, no metadata noise.

    python scripts/strip_notebooks.py                  # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py --check          # exit 1, listing them, if any is not clean
    python scripts/strip_notebooks.py path/to/nb.ipynb

Run it before committing a notebook you ran in Jupyter. tests/test_notebooks.py checks the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with outputs, execution counts, cell metadata and all notebook metadata but the
    kernel (python3) removed. Cell ids are kept."""
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def clean_text(path: Path) -> str:
    """The file's text once stripped, as `nbformat.write` lays it out (ending in a newline)."""
    text = nbformat.writes(strip(nbformat.read(path, as_version=4)))
    return text if text.endswith("\n") else text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a notebook is not clean")
    args = parser.parse_args()
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = [path for path in paths if path.read_text() != clean_text(path)]
    if args.check:
        for path in dirty:
            print(f"{path}: not clean (run scripts/strip_notebooks.py)")
        sys.exit(1 if dirty else 0)
    for path in dirty:
        path.write_text(clean_text(path))
        print(f"stripped {path}")


if __name__ == "__main__":
    main()
