"""The tiny model's headline: one evaluation on the held-out photos, and every page that quotes it written from it.

    python scripts/heldout_eval.py                  # evaluate the shipped model, then rewrite the pages
    python scripts/heldout_eval.py --pages-only     # rewrite the pages from the committed result
    python scripts/heldout_eval.py --weights PRIOR SR --cfw CFW --out DIR --against stablesr_min/tiny/heldout_eval.json
                                                    # a candidate, compared crop by crop with the shipped model

The evaluation is `python -m stablesr_min evaluate` with HEADLINE below: the ten photos of data/heldout (never
trained on, never used to choose a setting), 2 x 2 crops of 128 px each (the tiny model's tile), five sampling
seeds, the weights' own sampling settings, at w = 1 (the default), 0.5 and 0 (the diffusion output alone), all from
the same sampled latents. Its metrics.json is kept as stablesr_min/tiny/heldout_eval.json: the one home of the
headline numbers. README.md, docs/evaluation.md and stablesr_min/tiny/MODEL_CARD.md quote it between
`<!-- headline -->` and `<!-- /headline -->` (tests/test_heldout_eval.py checks that they agree with it).
The model card's `<!-- targets -->` block (the teaching model's targets, each met or not) is written from it too.
`--against` compares two results of this evaluation with the rule of `evaluate` (paired by crop and seed, one
mean per photo): how a candidate model is judged against the shipped one.

The rule for shipping a candidate, written on 2026-12-07 before the fifth version was evaluated: it replaces the
shipped model if, at w = 1 (the default), `--against` calls it ahead in PSNR or in SSIM and behind in neither;
otherwise the shipped model stays and the candidate's numbers are reported. The colour error and the spectrum
distance are reported, not used for the decision.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stablesr_min.app import metrics  # noqa: E402
from stablesr_min.app.cli import main as cli  # noqa: E402
from stablesr_min.app.evaluate import HIGHER_IS_BETTER, MEASURES, UNITS, photo_means  # noqa: E402
from stablesr_min.tiny import HELDOUT_EVAL, TINY_DIR  # noqa: E402

HEADLINE = ["--hr", "data/heldout", "--crop", "128", "--grid", "2", "--seed", "0", "1", "2", "3", "4",
            "--dec-w", "1", "0.5", "0"]
CARD = TINY_DIR / "MODEL_CARD.md"
PAGES = [ROOT / "README.md", ROOT / "docs" / "evaluation.md", CARD]
COLUMNS = {"StableSR w=1": "tiny StableSR, w = 1 (default)", "StableSR w=0.5": "w = 0.5",
           "StableSR w=0": "w = 0 (diffusion alone)"}


def headline_markdown(report: dict) -> str:
    """The headline block: what was measured, and per measure the model at each w beside bicubic."""
    s, summary = report["settings"], report["summary"]
    n_photos = len({row["photo"] for row in report["crops"]})
    header = ["measure", "bicubic"] + [c for name in COLUMNS.values() for c in (name, "vs bicubic")]
    lines = [f"Held out: {len(report['crops'])} crops of {s['crop']} px ({s['grid']} x {s['grid']} from each of "
             f"{n_photos} photos never trained on), sampling seeds {', '.join(map(str, s['seeds']))}, "
             f"{s['steps']} {s['sampler']} steps, colour fix {s['colorfix']} "
             f"(`scripts/heldout_eval.py`; mean, its sd over seeds, and the paired difference to bicubic "
             f"+- 2 standard errors over photos; verdict by the rule in docs/evaluation.md; lower is closer to HR "
             f"for the colour error and the spectrum distance, notebook 03's realism axis):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in MEASURES:
        name, d = UNITS[k]
        cells = [name, f"{summary['bicubic'][k]['mean']:.{d}f}"]
        for method in COLUMNS:
            e = summary[method][k]
            v = e["vs_bicubic"]
            cells += [f"{e['mean']:.{d}f} (sd {e['seed_sd']:.{d}f})",
                      f"{v['mean']:+.{d}f} +- {2 * v['se']:.{d}f}: **{v['verdict']}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_markdown(report: dict) -> str:
    """Issue 41's targets for the teaching model, each met or not, from the headline (the iris hue, the fifth
    target, is `scripts/quickstart_figure.py`'s)."""
    s = report["summary"]
    v = {(m, k): s[m][k]["vs_bicubic"] for m in COLUMNS for k in MEASURES}
    rows = [("PSNR and SSIM ahead of bicubic at w = 1 (by the rule)",
             all(v["StableSR w=1", k]["verdict"] == "ahead" for k in ("psnr", "ssim")),
             f"PSNR {v['StableSR w=1', 'psnr']['verdict']}, SSIM {v['StableSR w=1', 'ssim']['verdict']}"),
            ("PSNR within 1 dB of bicubic at w = 0 (the diffusion output alone)",
             v["StableSR w=0", "psnr"]["mean"] >= -1.0, f"{v['StableSR w=0', 'psnr']['mean']:+.2f} dB"),
            ("colour error within 0.1 levels of bicubic's at w = 1",
             v["StableSR w=1", "colour"]["mean"] <= 0.1, f"{v['StableSR w=1', 'colour']['mean']:+.2f} levels"),
            ("closer to HR than bicubic on the spectrum distance at some w (by the rule)",
             any(v[m, "spectrum"]["verdict"] == "ahead" for m in COLUMNS),
             ", ".join(f"{m.split()[-1]}: {v[m, 'spectrum']['verdict']}" for m in COLUMNS))]
    lines = ["| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if met else 'no'} | {measured} |" for name, met, measured in rows]
    return "\n".join(lines) + "\n"


def block_pattern(name: str) -> re.Pattern:
    """A generated block of a page: `<!-- name -->` ... `<!-- /name -->`."""
    return re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.S)


def write_block(page: Path, name: str, block: str) -> None:
    """Replace the page's generated block `name` with `block` (the page must have one)."""
    text = page.read_text()
    pattern = block_pattern(name)
    if not pattern.search(text):
        sys.exit(f"{page} has no <!-- {name} --> block")
    page.write_text(pattern.sub(lambda m: m.group(1) + block + m.group(2), text))
    print(f"wrote the {name} block of {from_root(page)}")


def write_pages(report: dict) -> None:
    block = headline_markdown(report)
    for page in PAGES:
        write_block(page, "headline", block)
    write_block(CARD, "targets", targets_markdown(report))


def compare(candidate: dict, shipped: dict) -> str:
    """The candidate against the shipped model, method by method and measure by measure, paired by crop and
    seed (one mean difference per photo), with `metrics.paired_verdict`."""
    if candidate["settings"]["seeds"] != shipped["settings"]["seeds"] or \
            [r["name"] for r in candidate["crops"]] != [r["name"] for r in shipped["crops"]]:
        sys.exit("heldout_eval: the two results are not of the same crops and seeds; run both with HEADLINE")
    lines = ["| method | measure | candidate - shipped (+- 2 se over photos) | verdict |", "|---|---|---|---|"]
    for method in candidate["methods"][1:]:
        for k in MEASURES:
            differences = [[a - b for a, b in zip(ra["scores"][method][k], rb["scores"][method][k])]
                           for ra, rb in zip(candidate["crops"], shipped["crops"])]
            v = metrics.paired_verdict(photo_means(candidate["crops"], differences), HIGHER_IS_BETTER[k])
            d = UNITS[k][1]
            lines.append(f"| {method} | {UNITS[k][0]} | {v['mean']:+.{d}f} +- {2 * v['se']:.{d}f} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def keep(report: dict) -> None:
    """HELDOUT_EVAL, with the weights' paths from the clone's root (the same on every machine)."""
    settings = report["settings"]
    settings["weights"] = [from_root(p) for p in settings["weights"]]
    settings["cfw"] = from_root(settings["cfw"])
    HELDOUT_EVAL.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {HELDOUT_EVAL.relative_to(ROOT)}")


def from_root(path) -> str:
    """A path as a record keeps it: from the clone's root when inside it (the same on every machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages-only", action="store_true", help="rewrite the pages from the committed result")
    parser.add_argument("--weights", nargs="+", help="a candidate's files (default: the shipped model)")
    parser.add_argument("--cfw", help="the candidate's CFW file")
    parser.add_argument("--out", default="runs/heldout_eval", help="evaluate's output folder (from the clone's root)")
    parser.add_argument("--against", type=Path, help="a result to compare with (the shipped model's)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the report names its photos and files from the clone's root
    if not args.pages_only:
        given = [*(["--weights", *args.weights] if args.weights else []), *(["--cfw", args.cfw] if args.cfw else [])]
        code = cli(["evaluate", *HEADLINE, "--out", args.out, *given])
        if code:
            sys.exit(code)
        result = Path(args.out) / "metrics.json"
        if args.against:
            print(compare(json.loads(result.read_text()), json.loads(args.against.read_text())))
            return
        if not args.weights:
            keep(json.loads(result.read_text()))
    if not args.weights:
        write_pages(json.loads(HELDOUT_EVAL.read_text()))


if __name__ == "__main__":
    main()
