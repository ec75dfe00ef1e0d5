"""The time-awareness ablation of the tiny model, with its noise floor (MODEL_CARD.md, "Time-awareness").

    python scripts/ablation.py                      # after train_tiny.py (10 min at the earlier 2 crops; 40 untimed)
    python scripts/ablation.py --runs DIR --out DIR --sampling-seeds 0 1 2 3 4

Two arms, `train sr` time-aware and `--time-blind`, each trained at every training seed of the recipe
(`runs/tiny/sr`, `sr_seed1`, `sr_blind`, `sr_blind_seed1`: the same prior, data stream and initialisation
per seed, so the arms differ only in the t their encoder sees), each completed by its own arm's CFW (trained on
that arm's samples: `cfw`, `cfw_blind`). On the held-out crops of the headline evaluation (`evaluate`'s 2 x 2
grid of 128 px crops per photo, the fixed evaluation degradation) and at the shipped
sampling defaults, every model is sampled at every sampling seed; for each it records PSNR and SSIM at
w = 1 (the default) and w = 0 (the sampler's own output, where the encoder's guidance acts alone), the
colour error against HR (`metrics.lowpass_colour_error`) and the spectrum distance (`evaluate.score`'s fourth
measure), and the `train sr` loss per timestep band on the
same crops (`analysis.loss_by_timestep`). The paired aware-minus-blind difference (same training seed, same
sampling seed) is reported with its spread, beside the spread between training seeds of one arm: a
difference no larger than that is inside the noise. Writes OUT/ablation.json (read by notebook 06 through
`tiny.ablation()`) and OUT/ablation.md; with the default OUT, the model card's `<!-- ablation -->` block too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stablesr_min.app.analysis import loss_by_timestep  # noqa: E402
from stablesr_min.app.evaluate import MEASURES, EvalDegradation, evaluation_lr, read_hr_crops, score  # noqa: E402
from stablesr_min.model import load_cfw, load_stablesr  # noqa: E402
from stablesr_min.pipeline import StableSRPipeline, UpscaleOptions, upsample  # noqa: E402

HELDOUT = ROOT / "data" / "heldout"
BANDS = [(0, 199), (200, 399), (400, 599), (600, 799), (800, 999)]  # t bands of the loss (low t: little noise)
ARMS = {"time-aware": "sr", "time-blind": "sr_blind"}  # arm -> run folder name at training seed 0
CFWS = {"time-aware": "cfw", "time-blind": "cfw_blind"}  # arm -> its CFW's run folder, trained on its own samples


def run_name(arm: str, training_seed: int) -> str:
    return ARMS[arm] if training_seed == 0 else f"{ARMS[arm]}_seed{training_seed}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = math.fsum(values) / len(values)
    var = math.fsum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


@torch.no_grad()
def measure(pipe: StableSRPipeline, crops: dict, sampling: dict, seeds: list[int], per_band: int) -> dict:
    """Per sampling seed: mean over crops of PSNR/SSIM/colour error at w = 1 and w = 0; and the loss per band."""
    degradation = EvalDegradation()
    opts = {w: UpscaleOptions(scale=degradation.scale, **{**sampling, "dec_w": w}) for w in (1.0, 0.0)}
    per_seed = []
    for seed in seeds:
        rows = {f"w={w:g}": [] for w in opts}
        for hr in crops.values():
            lr = evaluation_lr(hr, degradation)
            sampled = pipe.sample_latent(lr * 2 - 1, opts[1.0], generator=torch.Generator().manual_seed(seed))
            for w, o in opts.items():
                rows[f"w={w:g}"].append(score(pipe.finish(sampled, o).float().cpu(), hr, 0))
        per_seed.append({name: {k: math.fsum(r[k] for r in rs) / len(rs) for k in MEASURES}
                         for name, rs in rows.items()})
    lrs = torch.cat([evaluation_lr(hr, degradation) for hr in crops.values()])
    hrs = torch.cat(list(crops.values()))
    losses = torch.stack([loss_by_timestep(pipe.model, lrs, hrs, BANDS, per_band=per_band, seed=s) for s in seeds])
    return {"per_sampling_seed": per_seed, "loss_by_band": losses.mean(0).tolist()}


@torch.no_grad()
def bicubic(crops: dict) -> dict:
    degradation = EvalDegradation()
    rows = []
    for hr in crops.values():
        rows.append(score((upsample(evaluation_lr(hr, degradation) * 2 - 1, degradation.scale) + 1) / 2, hr, 0))
    return {k: math.fsum(r[k] for r in rows) / len(rows) for k in MEASURES}


def summarise(results: dict, training_seeds: list[int]) -> dict:
    """Per arm, setting and measure: the mean over (training seed, sampling seed), the spread over sampling
    seeds (within a training seed), the spread between training seeds; the paired aware-minus-blind
    difference with its spread, and whether it is outside the noise."""
    summary = {}
    for setting in ("w=1", "w=0"):
        for key in MEASURES:
            cell = {}
            for arm in ARMS:
                by_training = [[s[setting][key] for s in results[run_name(arm, ts)]["per_sampling_seed"]]
                               for ts in training_seeds]
                cell[arm] = {"mean": mean_std(sum(by_training, []))[0],
                             "sampling_sd": mean_std([mean_std(v)[1] for v in by_training])[0],
                             "training_seed_means": [mean_std(v)[0] for v in by_training]}
            diffs = [a[setting][key] - b[setting][key] for ts in training_seeds
                     for a, b in zip(results[run_name("time-aware", ts)]["per_sampling_seed"],
                                     results[run_name("time-blind", ts)]["per_sampling_seed"])]
            d_mean, d_sd = mean_std(diffs)
            floor = max(max(c["training_seed_means"]) - min(c["training_seed_means"]) for c in cell.values())
            cell["aware_minus_blind"] = {"mean": d_mean, "sd": d_sd, "n": len(diffs),
                                         "training_seed_spread": floor,
                                         "outside_noise": abs(d_mean) > max(floor, 2 * d_sd / math.sqrt(len(diffs)))}
            summary[f"{setting} {key}"] = cell
    bands = {}
    for arm in ARMS:
        per = [results[run_name(arm, ts)]["loss_by_band"] for ts in training_seeds]
        bands[arm] = [mean_std([p[i] for p in per]) for i in range(len(BANDS))]
    diffs = [[results[run_name("time-aware", ts)]["loss_by_band"][i] - results[run_name("time-blind", ts)]["loss_by_band"][i]
              for ts in training_seeds] for i in range(len(BANDS))]
    bands["aware_minus_blind"] = [mean_std(d) for d in diffs]
    summary["loss_by_band"] = bands
    return summary


def markdown(summary: dict, bicubic_row: dict, training_seeds: list[int], seeds: list[int]) -> str:
    lines = [f"Held-out crops, {len(training_seeds)} training seeds x {len(seeds)} sampling seeds per arm; "
             "mean (sd over sampling seeds; the training seeds' means).", "",
             "| measure | time-aware | time-blind | aware - blind (sd over pairs) | training-seed spread | outside the noise |",
             "|---|---|---|---|---|---|"]
    for name, cell in summary.items():
        if name == "loss_by_band":
            continue
        fmt = "{:.4f}" if "ssim" in name else "{:.3f}"
        arms = [f"{fmt.format(cell[a]['mean'])} ({fmt.format(cell[a]['sampling_sd'])}; "
                f"{', '.join(fmt.format(m) for m in cell[a]['training_seed_means'])})" for a in ARMS]
        d = cell["aware_minus_blind"]
        lines.append(f"| {name} | {arms[0]} | {arms[1]} | {d['mean']:+.4f} ({d['sd']:.4f}) | "
                     f"{d['training_seed_spread']:.4f} | {'yes' if d['outside_noise'] else 'no'} |")
    lines += ["", f"Bicubic on the same crops: {bicubic_row['psnr']:.3f} dB, SSIM {bicubic_row['ssim']:.4f}, colour "
              f"error {bicubic_row['colour']:.3f} levels.", "",
              "| t band | time-aware loss | time-blind loss | aware - blind (sd over training seeds) |", "|---|---|---|---|"]
    bands = summary["loss_by_band"]
    for i, (first, last) in enumerate(BANDS):
        lines.append(f"| {first}-{last} | {bands['time-aware'][i][0]:.4f} | {bands['time-blind'][i][0]:.4f} | "
                     f"{bands['aware_minus_blind'][i][0]:+.4f} ({bands['aware_minus_blind'][i][1]:.4f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "tiny"), help="the recipe's run folders")
    parser.add_argument("--out", default=str(ROOT / "stablesr_min" / "tiny"),
                        help="where to write ablation.json and ablation.md (default: beside the shipped model)")
    parser.add_argument("--training-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sampling-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--crop", type=int, default=128, help="held-out crop size (the headline evaluation's)")
    parser.add_argument("--grid", type=int, default=2, help="crops per photo: its square (the headline's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the shipped model's)")
    parser.add_argument("--per-band", type=int, default=8, help="timesteps drawn per band and crop for the loss")
    args = parser.parse_args()
    if (args.steps is not None and not 1 <= args.steps <= 1000) or args.per_band < 1:
        sys.exit("ablation: --steps must be 1 to 1000 and --per-band at least 1")
    runs = Path(args.runs)
    out = Path(args.out)
    needed = [runs / run_name(a, s) / "last.safetensors" for a in ARMS for s in args.training_seeds]
    cfw_paths = {arm: runs / name / "last.safetensors" for arm, name in CFWS.items()}
    needed += cfw_paths.values()
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"ablation: {', '.join(missing)} missing; run scripts/train_tiny.py first")
    from heldout_eval import CARD, from_root, write_block
    from train_tiny import SAMPLING_DEFAULTS  # the shipped model's sampling settings

    sampling = {**SAMPLING_DEFAULTS, "steps": args.steps or SAMPLING_DEFAULTS["steps"]}

    crops = {c.name: c.hr for c in read_hr_crops([str(HELDOUT)], args.crop, args.grid)}
    results = {}
    for arm in ARMS:
        cfw = load_cfw(cfw_paths[arm])
        for ts in args.training_seeds:
            name = run_name(arm, ts)
            started = time.monotonic()
            pipe = StableSRPipeline(load_stablesr([runs / name / "last.safetensors"]), cfw)
            results[name] = measure(pipe, crops, sampling, args.sampling_seeds, args.per_band)
            print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    summary = summarise(results, args.training_seeds)
    bicubic_row = bicubic(crops)
    out.mkdir(parents=True, exist_ok=True)
    record = {"crops": list(crops), "cfw": {arm: from_root(p) for arm, p in cfw_paths.items()}, "sampling": sampling,
              "training_seeds": args.training_seeds,
              "sampling_seeds": args.sampling_seeds, "bands": BANDS, "per_band": args.per_band, "results": results,
              "bicubic": bicubic_row,
              "summary": summary}
    (out / "ablation.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(summary, bicubic_row, args.training_seeds, args.sampling_seeds)
    (out / "ablation.md").write_text(table)
    print(table)
    if out.resolve() == CARD.parent:  # the shipped model's: its card quotes the table
        write_block(CARD, "ablation", table)


if __name__ == "__main__":
    main()
