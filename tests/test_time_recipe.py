"""scripts/time_recipe.py: the time per step it scales to the recipe leaves the warm-up out."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
spec = importlib.util.spec_from_file_location("time_recipe", ROOT / "scripts" / "time_recipe.py")
time_recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_recipe)


def test_seconds_per_step_leaves_the_warm_up_out(tmp_path):
    # ten steps: the first takes 5 s (warm-up), every later one 0.5 s
    seconds = [5.0 + 0.5 * i for i in range(10)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "seconds": s}) + "\n"
                                                for i, s in enumerate(seconds)))
    assert time_recipe.seconds_per_step(tmp_path, wall=99.0, count=10) == 0.5


def test_without_a_log_it_is_the_wall_clock_per_sample(tmp_path):
    assert time_recipe.seconds_per_step(tmp_path, wall=12.0, count=48) == 0.25


def test_it_times_every_shipped_stage():
    assert set(time_recipe.SHORT) == set(time_recipe.SHIPPED_STAGES)
