"""Speed and memory of the full-size StableSR networks, with random weights (no checkpoint needed).

    python benchmarks/bench.py --device cpu --quick            # step at 32x32, VAE at 256 px
    python benchmarks/bench.py --device cpu --steps 4 --json cpu.json
    python benchmarks/bench.py --device cuda --dtype float16 --steps 200
    python benchmarks/bench.py --device cpu --sampler ddim --steps 20 --json ddim20.json
    python benchmarks/bench.py --device cpu --sampler ddim --steps 20 --guidance-scale 7 --negative-prompt "3d, cartoon"
    python benchmarks/bench.py --device cpu --memory            # peak RSS, 128->512 vs 256->1024

Figures (seconds, median of `--repeats` runs after one warm-up):
  step_s_32, step_s_64   one denoising step: time-aware encoder + UNet, batch 1, on a 32/64 latent
  vae_encode_s_N         the SD VAE encoder on an N x N image (the pipeline's start)
  vae_decode_s_N         the CFW decode on N x N: CFW encoder features of the image + fused decoder, w 0.5
  e2e_s_128to512         the whole pipeline, 128 px -> 512 px, `--steps` steps of `--sampler` (one run, no
                         warm-up beyond the figures above); with guidance the UNet runs twice per tile
  peak_mem_gb            peak memory of the process: CPU resident set (weights included), or
                         torch.cuda.max_memory_allocated on a GPU
Null where not measured. Timing is a script's job, never a test's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stablesr_min.app.measure import median_seconds, peak_memory_gb, timed  # noqa: E402
from stablesr_min.cfw import CFWAutoencoder  # noqa: E402
from stablesr_min.config import StableSRConfig  # noqa: E402
from stablesr_min.devices import DTYPES  # noqa: E402
from stablesr_min.model import StableSR  # noqa: E402
from stablesr_min.pipeline import StableSRPipeline, UpscaleOptions  # noqa: E402

RESULT_KEYS = (
    "step_s_32", "step_s_64",
    "vae_encode_s_256", "vae_decode_s_256", "vae_encode_s_512", "vae_decode_s_512",
    "e2e_s_128to512", "peak_mem_gb",
)


@torch.inference_mode(False)
def random_models(device: torch.device, dtype: torch.dtype):
    """Full-size StableSR + CFW with small random weights, built without a slow initialisation.

    Ordinary tensors even when called under inference_mode, as a loaded checkpoint's are
    (`weights.load_module`).
    """
    cfg = StableSRConfig()
    with torch.device("meta"):
        model, cfw = StableSR(cfg), CFWAutoencoder(cfg.cfw)
    gen = torch.Generator().manual_seed(0)
    for module in (model, cfw):
        module.to_empty(device="cpu")
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.data.uniform_(-1, 1, generator=gen).mul_((3 / fan_in) ** 0.5 if p.dim() > 1 else 0.1)
        module.to(device=device, dtype=dtype).eval()
    return model, cfw


@torch.inference_mode()
def measure(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # built first, so that a bad option fails before minutes of timing
    opts = UpscaleOptions(steps=args.steps, sampler=args.sampler, eta=args.eta,
                          guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
    results = dict.fromkeys(RESULT_KEYS)
    model, cfw = random_models(device, dtype)
    pipe = StableSRPipeline(model, cfw).speed_up(args.channels_last, args.compile)
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    if not args.only_e2e:
        context = randn(1, 77, model.cfg.unet.context_dim)
        t = torch.tensor([500], device=device)
        for size in (32,) if args.quick else (32, 64):
            x, lr_latent = randn(1, 4, size, size), randn(1, 4, size, size)
            step = lambda: model.unet(x, t, context, model.time_encoder(lr_latent, t))  # noqa: E731
            results[f"step_s_{size}"] = median_seconds(step, device, args.repeats)
        for size in (256,) if args.quick else (256, 512):
            image, z = randn(1, 3, size, size).clamp(-1, 1), randn(1, 4, size // 8, size // 8)
            results[f"vae_encode_s_{size}"] = median_seconds(lambda: model.vae.moments(image), device, args.repeats)
            decode = lambda: cfw.decode(z, cfw.encode_with_features(image)[1], 0.5)  # noqa: E731
            results[f"vae_decode_s_{size}"] = median_seconds(decode, device, args.repeats)
    if not args.quick:
        lr = torch.rand(1, 3, args.e2e_lr, args.e2e_lr, generator=torch.Generator().manual_seed(0)) * 2 - 1
        key = "e2e_s_128to512" if args.e2e_lr == 128 else f"e2e_s_{args.e2e_lr}to{4 * args.e2e_lr}"
        results[key] = timed(device, lambda: pipe(lr, opts, generator=torch.Generator().manual_seed(0)))[1]
    results["peak_mem_gb"] = peak_memory_gb(device)
    return results


def memory_check(args) -> dict:
    """Peak RSS of a 4x upscale at 128 -> 512 and 256 -> 1024 (--steps 1), each in a fresh process.

    The difference should be the latent canvas and the image-sized buffers, not network activations:
    those are bounded by the sampling tiles and the VAE tiles.
    """
    peaks = {}
    for lr in (128, 256):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                            "--only-e2e", "--e2e-lr", str(lr), "--steps", "1", "--json", out.name], check=True,
                           stdout=subprocess.DEVNULL)
            peaks[f"peak_mem_gb_{lr}to{4 * lr}"] = json.loads(Path(out.name).read_text())["peak_mem_gb"]
    # latent canvas of the larger minus the smaller: (128^2 - 64^2) cells x 4 channels x 4 bytes
    peaks["latent_canvas_difference_gb"] = (128**2 - 64**2) * 4 * 4 / 2**30
    peaks["allowed_difference_gb"] = peaks["latent_canvas_difference_gb"] + 0.5
    peaks["measured_difference_gb"] = peaks["peak_mem_gb_256to1024"] - peaks["peak_mem_gb_128to512"]
    return peaks


def print_table(args, results: dict) -> None:
    steps = 1 if args.memory else args.steps
    print(f"device {args.device}  dtype {args.dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  steps {steps}  sampler {args.sampler}  guidance {args.guidance_scale:g}")
    for key, value in results.items():
        print(f"  {key:<30} {'-' if value is None else f'{value:.4f}'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="only step_s_32 and the 256 px VAE figures")
    parser.add_argument("--steps", type=int, default=4, help="steps of the end-to-end run (DDPM: 200 = official)")
    parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="sampler of the end-to-end run")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta of the end-to-end run")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="guidance scale (needs --negative-prompt)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt of the guided run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one warm-up")
    parser.add_argument("--memory", action="store_true", help="peak RSS of 128->512 vs 256->1024, --steps 1")
    parser.add_argument("--only-e2e", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--e2e-lr", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the encoder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = memory_check(args) if args.memory else measure(args)
    print_table(args, results)
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "steps": args.steps, "sampler": args.sampler,
                "eta": args.eta, "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt}
        args.json.write_text(json.dumps({**meta, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
