"""How long the shipped model's five stages take alone on this machine, from a short run of each recipe command.

    python scripts/time_recipe.py --runs runs/tiny      # after scripts/train_tiny.py (its runs feed the later stages)

Each of `train_tiny.SHIPPED_STAGES` runs its recipe command for a few steps (or samples) into a scratch folder,
one after the other, with the machine's threads; the time per step after the first fifth (the warm-up) is scaled
to the recipe's full count. Validations and saves are not in the few steps, so the full stages take a little
longer. A measurement, not a test: run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train_tiny import SHIPPED_STAGES, Recipe, stage_commands  # noqa: E402

SHORT = {"vae": 300, "unet": 200, "sr": 200, "cfw_data": 48, "cfw": 100}  # steps (samples for cfw_data) measured


def seconds_per_step(out: Path, wall: float, count: int) -> float:
    """From the run's log (warm-up fifth left out); cfw-data has no log: its wall clock over its samples."""
    log = out / "log.jsonl"
    if not log.is_file():
        return wall / count
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first, last = lines[len(lines) // 5], lines[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, type=Path, help="a finished recipe's run folders (train_tiny --runs)")
    args = parser.parse_args()
    recipe = Recipe()
    full = {"vae": recipe.vae_steps, "unet": recipe.unet_steps, "sr": recipe.sr_steps,
            "cfw_data": recipe.cfw_samples, "cfw": recipe.cfw_steps}
    commands = {stage[0]: stage[1] for stage in stage_commands(recipe, args.runs) if stage[0] in SHIPPED_STAGES}
    total = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for name, cmd in commands.items():
            cmd = list(cmd)
            out = Path(scratch) / name
            cmd[cmd.index("--out") + 1] = str(out)
            cmd[cmd.index("--count" if name == "cfw_data" else "--steps") + 1] = str(SHORT[name])
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "stablesr_min", *cmd], cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"time_recipe: stage {name} failed: {done.stderr.strip().splitlines()[-1]}")
            per = seconds_per_step(out, time.monotonic() - started, SHORT[name])
            minutes = per * full[name] / 60
            total += minutes
            print(f"{name}: {per:.3f} s per {'sample' if name == 'cfw_data' else 'step'} -> {minutes:.1f} min for "
                  f"{full[name]}", flush=True)
    print(f"the shipped model's stages alone, extrapolated: {total:.1f} min")


if __name__ == "__main__":
    main()
