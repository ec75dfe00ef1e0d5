"""Speed of the full-size StableSR networks, with random weights (no checkpoint needed).

    python benchmarks/bench.py                       # CPU, float32, 32x32 and 64x64 latents
    python benchmarks/bench.py --quick --json out.json
    python benchmarks/bench.py --device cuda --dtype float16

One denoising step is the time-aware encoder plus the UNet at batch 1, as the sampler runs them (the
encoder sees the LR latent, the UNet the noisy latent, both at the same size). Each figure is the median of
`--steps` timed runs after one warm-up run. Keys that this script does not measure yet (VAE, end to end,
peak memory) are written as null so that the JSON layout stays fixed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stablesr_min.config import StableSRConfig  # noqa: E402
from stablesr_min.time_encoder import TimeAwareEncoder  # noqa: E402
from stablesr_min.unet import UNet  # noqa: E402

RESULT_KEYS = (
    "step_s_32", "step_s_64",
    "vae_encode_s_256", "vae_decode_s_256", "vae_encode_s_512", "vae_decode_s_512",
    "e2e_s_128to512", "peak_mem_gb",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device: torch.device, repeats: int) -> float:
    """One warm-up call, then the median wall time of `repeats` calls."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_denoiser(cfg: StableSRConfig, device: torch.device, dtype: torch.dtype):
    with torch.device(device):
        encoder = TimeAwareEncoder(cfg.time_encoder)
        unet = UNet(cfg.unet)
    return encoder.to(dtype).eval(), unet.to(dtype).eval()


def denoising_step(encoder, unet, cfg: StableSRConfig, size: int, device: torch.device, dtype: torch.dtype):
    """A closure running one step (encoder + UNet, batch 1) on a size x size latent."""
    gen = torch.Generator(device).manual_seed(0)
    lr_latent = torch.randn(1, cfg.unet.in_channels, size, size, generator=gen, device=device, dtype=dtype)
    x = torch.randn(1, cfg.unet.in_channels, size, size, generator=gen, device=device, dtype=dtype)
    context = torch.randn(1, cfg.text.context_length, cfg.unet.context_dim, generator=gen, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)

    def run():
        unet(x, t, context, encoder(lr_latent, t))

    return run


@torch.inference_mode()
def measure(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = StableSRConfig()
    results = dict.fromkeys(RESULT_KEYS)
    encoder, unet = build_denoiser(cfg, device, dtype)
    for size in (32,) if args.quick else (32, 64):
        step = denoising_step(encoder, unet, cfg, size, device, dtype)
        results[f"step_s_{size}"] = median_seconds(step, device, args.steps)
    return results


def print_table(args, results: dict) -> None:
    print(f"device {args.device}  dtype {args.dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for key in RESULT_KEYS:
        value = results[key]
        print(f"  {key:<18} {'-' if value is None else f'{value:.3f}'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="only the 32x32 denoising step")
    parser.add_argument("--steps", type=int, default=5, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = measure(args)
    print_table(args, results)
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({**meta, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
