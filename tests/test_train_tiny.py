"""`scripts/train_tiny.py --quick` (the `quick_recipe` fixture): every stage of the shipped model's recipe runs (a
few steps each) and the files it writes load strictly, as the shipped ones do."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablesr_min.model import load_cfw, load_stablesr
from stablesr_min.tiny import SAMPLING_METADATA_KEY, TINY_FILES
from stablesr_min.train.sr import is_trainable
from stablesr_min.weights import WeightFiles

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.training  # the quick recipe (conftest.py), run once per session


def test_quick_recipe_writes_loadable_files(quick_recipe):
    ship = quick_recipe / "ship"
    for name in TINY_FILES.values():
        assert (ship / name).is_file(), name
    aware = load_stablesr([ship / TINY_FILES["prior"], ship / TINY_FILES["sr"]])
    blind = load_stablesr([ship / TINY_FILES["prior"], ship / TINY_FILES["sr_time_blind"]])
    assert aware.cfg.time_encoder.time_aware and not blind.cfg.time_encoder.time_aware
    cfw = load_cfw(ship / TINY_FILES["cfw"])
    assert any(name.startswith("decoder.fusion_layer_") for name, _ in cfw.named_parameters())
    # the SR files hold exactly the trained tensors (encoder + SFT), the prior file everything else
    sr_keys = set(WeightFiles([ship / TINY_FILES["sr"]]).keys())
    assert sr_keys == set(WeightFiles([ship / TINY_FILES["sr_time_blind"]]).keys())
    assert sr_keys and all(is_trainable(k) for k in sr_keys)
    assert not any(is_trainable(k) for k in WeightFiles([ship / TINY_FILES["prior"]]).keys())
    # fp16 on disk, float32 once loaded
    assert WeightFiles([ship / TINY_FILES["sr"]]).tensor(sorted(sr_keys)[0]).dtype == torch.float16
    assert next(aware.parameters()).dtype == torch.float32
    sampling = json.loads(WeightFiles([ship / TINY_FILES["sr"]]).metadata[SAMPLING_METADATA_KEY])
    assert set(sampling) == {"sampler", "steps", "tile", "overlap", "dec_w", "colorfix"}
    # the prior carries its own config (without SFT), so that `train sr --base` takes it alone
    prior = load_stablesr([ship / TINY_FILES["prior"]])
    assert not prior.cfg.unet.use_sft and prior.cfg.vae == aware.cfg.vae and prior.cfg.unet.model_channels == 32


def test_quick_recipe_records_every_stage(quick_recipe):
    record = json.loads((quick_recipe / "ship" / "recipe.json").read_text())
    assert set(record["stages"]) == {"vae", "unet", "sr", "cfw_data", "cfw", "sr_blind", "sr_seed1", "sr_blind_seed1",
                                     "cfw_data_blind", "cfw_blind"}
    assert record["recipe"]["vae_steps"] == 2
    shipped = ("vae", "unet", "sr", "cfw_data", "cfw")  # the shipped model's own stages, without the ablation's
    assert record["shipped_stages_minutes"] == pytest.approx(sum(record["stages"][s]["minutes"] for s in shipped), abs=0.06)
    logs = {p.stem for p in (quick_recipe / "ship" / "logs").glob("*.jsonl")}
    assert logs == {"vae", "unet", "sr", "sr_blind", "sr_seed1", "sr_blind_seed1", "cfw", "cfw_blind"}


def test_quick_recipe_run_again_skips_finished_stages(quick_recipe):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--quick", "--runs",
                           str(quick_recipe), "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("vae", "unet", "sr", "cfw_data", "cfw", "sr_blind + sr_seed1 + sr_blind_seed1", "cfw_data_blind",
                  "cfw_blind"):
        assert f"== {stage}: done already" in done.stdout, stage


def test_the_ablation_script_measures_both_arms_at_every_seed(quick_recipe, tmp_path):
    """scripts/ablation.py on the quick recipe's runs: 2 arms x 2 training seeds x 2 sampling seeds, small crops,
    few sampling steps and timesteps per band."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--runs", str(quick_recipe), "--out",
                           str(tmp_path), "--sampling-seeds", "0", "1", "--crop", "64", "--grid", "1", "--steps", "4",
                           "--per-band", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert sorted(record["results"]) == ["sr", "sr_blind", "sr_blind_seed1", "sr_seed1"]
    assert all(len(r["per_sampling_seed"]) == 2 and len(r["loss_by_band"]) == 5 for r in record["results"].values())
    assert record["sampling"]["steps"] == 4 and record["per_band"] == 2
    cell = record["summary"]["w=1 psnr"]
    assert len(cell["time-aware"]["training_seed_means"]) == 2 and cell["aware_minus_blind"]["n"] == 4
    # the paired difference is the mean of the per-pair differences
    pairs = [a["w=1"]["psnr"] - b["w=1"]["psnr"] for ts in ("", "_seed1") for a, b in
             zip(record["results"][f"sr{ts}"]["per_sampling_seed"], record["results"][f"sr_blind{ts}"]["per_sampling_seed"])]
    assert cell["aware_minus_blind"]["mean"] == pytest.approx(sum(pairs) / 4)
    assert "| w=1 psnr |" in (tmp_path / "ablation.md").read_text()
    assert record["cfw"] == {"time-aware": str(quick_recipe / "cfw" / "last.safetensors"),
                             "time-blind": str(quick_recipe / "cfw_blind" / "last.safetensors")}  # each arm its own
