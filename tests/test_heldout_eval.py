"""The headline evaluation has one home (stablesr_min/tiny/heldout_eval.json): every page that quotes it agrees
with it, and `scripts/heldout_eval.py --against` judges two models by the rule of `evaluate`."""

import importlib.util
import json
from pathlib import Path

import pytest

from stablesr_min.app import metrics

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("heldout_eval", ROOT / "scripts" / "heldout_eval.py")
heldout_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heldout_eval)


def test_every_page_quotes_the_one_evaluation():
    report = json.loads(heldout_eval.RESULT.read_text())
    block = heldout_eval.headline_markdown(report)
    for page in heldout_eval.PAGES:
        found = heldout_eval.BLOCK.findall(page.read_text())
        assert len(found) == 1, page
        assert page.read_text().count(block) == 1, f"{page}: run python scripts/heldout_eval.py --pages-only"


def test_the_headline_is_the_held_out_set_at_the_stated_settings():
    report = json.loads(heldout_eval.RESULT.read_text())
    photos = {Path(row["photo"]).name for row in report["crops"]}
    assert photos == {p.name for p in (ROOT / "data" / "heldout").iterdir()}
    assert report["settings"]["seeds"] == [0, 1, 2, 3, 4] and report["settings"]["grid"] == 2
    assert report["settings"]["crop"] == 128 and report["settings"]["dec_w"] == [1.0, 0.5, 0.0]
    assert len(report["crops"]) == 4 * len(photos) >= 30
    assert report["rule"] == metrics.VERDICT_RULE


def fake_report(sr_psnr: list[list[float]], seeds=(0, 1)) -> dict:
    """Two photos of two crops each; one StableSR method with the given PSNR per crop and seed."""
    crops = [{"name": f"p{i // 2}.png#{i % 2}", "photo": f"p{i // 2}.png",
              "scores": {"bicubic": {k: [20.0] for k in ("psnr", "ssim", "colour", "spectrum")},
                         "StableSR w=1": {"psnr": values, **{k: [0.5] * len(values) for k in ("ssim", "colour", "spectrum")}}}}
             for i, values in enumerate(sr_psnr)]
    return {"settings": {"seeds": list(seeds)}, "crops": crops, "methods": ["bicubic", "StableSR w=1"]}


def test_compare_pairs_crops_and_seeds():
    shipped = fake_report([[20.0, 20.2], [21.0, 21.2], [22.0, 22.2], [23.0, 23.2]])
    better = fake_report([[21.0, 21.3], [22.0, 22.1], [23.0, 23.4], [24.0, 24.0]])  # +1 on average, every photo
    table = heldout_eval.compare(better, shipped)
    # per photo: (1.0 + 1.1 + 1.0 + 0.9) / 4 = 1.0 and (1.0 + 1.2 + 1.0 + 0.8) / 4 = 1.0: se 0
    assert "| StableSR w=1 | PSNR (dB) | +1.00 +- 0.00 | ahead |" in table
    assert "| StableSR w=1 | SSIM | +0.0000 +- 0.0000 | level |" in table
    with pytest.raises(SystemExit, match="not of the same crops and seeds"):
        heldout_eval.compare(fake_report([[20.0]] * 4, seeds=(0,)), shipped)
