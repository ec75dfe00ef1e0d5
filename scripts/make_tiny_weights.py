"""Write the golden set's small, deterministic (random-looking) StableSR and CFW weights, for tests.

    python scripts/make_tiny_weights.py --golden tests/golden --out golden_weights

writes `golden_weights/stablesr.safetensors` and `golden_weights/cfw.safetensors`: the golden set's small
models filled by the FORMAT.md rule, with their config in the safetensors metadata (so `--config` is not
needed). The weights are NOT trained: outputs made with them show the computation, not super-resolution.
The trained tiny model the commands use by default is `stablesr_min/tiny/` (scripts/train_tiny.py).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the golden-set reader of the tests

from golden import GoldenSet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default="tests/golden", help="a golden set folder (cases.json, manifest.json)")
    parser.add_argument("--out", required=True, help="folder to write stablesr.safetensors and cfw.safetensors")
    args = parser.parse_args()
    try:
        golden = GoldenSet(args.golden)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    for path in golden.write_weights(args.out):
        print(f"wrote {path} (random weights, for demos and tests only)")


if __name__ == "__main__":
    main()
