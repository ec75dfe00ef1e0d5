"""Fine-tuning StableSR: the time-aware encoder and the SFT layers learn, Stable Diffusion stays frozen (Sec. 3.1).

    python -m stablesr_min train sr --base v2-1_512-ema-pruned.safetensors --data photos/ --out runs/sr --steps N

The objective. Paper Sec. 3.1 trains the new layers with the latent diffusion objective, conditioned on the
LR image through the time-aware encoder; in the notation of LDM (Rombach et al. 2022, Eq. 3), with the
encoder's features s as one more condition:

    L = E_{z, z_lr, c, eps ~ N(0, I), t} [ || eps - eps_theta(z_t, t, c, s(z_lr, t)) ||_2^2 ],
    z_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps                               (DDPM, Ho et al. 2020, Eq. 4)

where z = E(GT) and z_lr = E(bicubic-up(LR)) are latents of the frozen VAE, c is the empty prompt's text
context, and eps_theta is the frozen SD UNet whose SFT layers (Eq. 1) apply s. A v-model (parameterization
"v") regresses v = sqrt(ab_t) eps - sqrt(1 - ab_t) z instead of eps. One step, as the official trainer
computes it (`LatentDiffusionSRTextWT.get_input`, `forward`, `p_losses`):

    HR crop --Real-ESRGAN degradation (degradation.py, data.py)--> LR, 4x smaller, in [0, 1]
    z_lr = scale_factor * sample of E(clamp(2 bicubic-up(LR) - 1))        posterior samples, not the mean
    z    = scale_factor * sample of E(2 GT - 1)
    t ~ U{0 .. T-1},  eps ~ N(0, I),  loss = mean of (eps_theta(...) - target)^2

Trainable: every `.spade.` parameter of the UNet and the whole time-aware encoder; the VAE, the text
encoder and the rest of the UNet are frozen (no gradients, eval mode). AdamW with the official settings
(lr 5e-5, PyTorch's default betas (0.9, 0.999) and weight decay 0.01; constant lr). The official run
used batch 6 per GPU x 8 GPUs x 4 accumulated batches (`--grad-accum`):

    torchrun --nproc_per_node 8 -m stablesr_min train sr ... --batch-size 6 --grad-accum 4

runs this file in 8 processes; what they share (joining, seeds per rank, rank 0 writing, averaging the
gradients) is in training.py.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError, pick_dtype
from .config import StableSRConfig
from .model import StableSR, load_stablesr, resolve_config, time_blindness
from .pipeline import draw, smallest_tile, text_context, upsample
from .schedule import Schedule
from .time_encoder import AttentionBlock, TimeAwareEncoder
from .training import (Processes, RunFolder, RunOptions, TrainState, autocast, check_option_ranges,
                       check_world_size, command_options, derive_seeds, distribute, gather_ranks, gradient_sync,
                       of_rank, rank_seed, run_steps, torchrun_processes)
from .unet import SFT, ResBlock, SpatialTransformer
from .vae import DiagonalGaussian
from .weights import KIND_HINTS, WeightFiles, WeightsError, config_metadata, guess_kind

# ------------------------------------------------------------------------------------------------------
# What trains


def is_trainable(key: str) -> bool:
    """Every `.spade.` parameter of the UNet and the whole time-aware encoder train."""
    return key.startswith("structcond_stage_model.") or ".spade." in key


def trainable_parameters(model: StableSR) -> dict[str, nn.Parameter]:
    """The trainable parameters by checkpoint key, sorted."""
    return {name: p for name, p in sorted(model.named_parameters()) if is_trainable(name)}


def prepare_for_finetuning(model: StableSR) -> dict[str, nn.Parameter]:
    """Freeze everything but the trainable parameters; the official trainer keeps the frozen networks
    in eval mode and the time-aware encoder in train mode (neither has dropout, so it changes nothing)."""
    model.requires_grad_(False).eval()
    trainable = trainable_parameters(model)
    for p in trainable.values():
        p.requires_grad_(True)
    model.time_encoder.train()
    return trainable


# ------------------------------------------------------------------------------------------------------
# The model to start from


def base_config(paths: list[str], config: str | None, time_aware: bool) -> StableSRConfig:
    """The config of the model to train from a StableSR or SD 2.x base file; other files are refused."""
    files = WeightFiles(paths)
    kind = guess_kind(files.keys())
    if kind not in ("stablesr", "sd2"):
        raise WeightsError(f"{files.describe()}: --base needs a StableSR or Stable Diffusion 2.x checkpoint, "
                           f"but this is {KIND_HINTS[kind].split(':')[0]}")
    cfg = StableSRConfig.from_dict(resolve_config(files, config).to_dict())  # a copy we may change
    cfg.unet.use_sft = True
    cfg.time_encoder.time_aware = time_aware
    return cfg


def load_base(paths: list[str], cfg: StableSRConfig, seed: int) -> StableSR:
    """A StableSR checkpoint (continue fine-tuning) or a Stable Diffusion 2.x one (start the new layers)."""
    if guess_kind(WeightFiles(paths).keys()) == "stablesr":
        return load_stablesr(paths, cfg)
    return stablesr_from_sd2(paths, cfg, seed)


def stablesr_from_sd2(paths: list[str], cfg: StableSRConfig, seed: int) -> StableSR:
    """SD 2.x weights for the VAE, text encoder and UNet; the time-aware encoder and the SFT layers at
    PyTorch's default initialisation (seeded), as the official run starts them."""
    prior_cfg = StableSRConfig.from_dict(cfg.to_dict())
    prior_cfg.unet.use_sft = False
    prior = load_stablesr(paths, prior_cfg)  # strict: the whole SD 2.x tree
    with torch.device("meta"):
        model = StableSR(cfg)
    missing, unexpected = model.load_state_dict(prior.state_dict(), strict=False, assign=True)
    new_modules = [model.time_encoder] + [m for m in model.unet.modules() if isinstance(m, SFT)]
    new_keys = {k for k in model.state_dict() if is_trainable(k)}
    assert not unexpected and set(missing) == new_keys, "the SD 2.x tree and StableSR's differ beyond the new layers"
    for module in new_modules:
        module.to_empty(device="cpu")
    default_init(new_modules, seed)
    zero_init_like_official(model.time_encoder)
    return model.eval()


def default_init(modules: list[nn.Module], seed: int) -> None:
    """PyTorch's default initialisation of every layer of the modules, drawn from a generator seeded with
    `seed` (the global one is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):  # what each layer's constructor calls
                    layer.reset_parameters()


@torch.no_grad()
def zero_init_like_official(network: nn.Module) -> None:
    """The official EncoderUNetModelWT (and SD's UNetModel) wrap the last conv of every residual branch and
    the output projection of every attention and spatial transformer in `zero_module`, so each block
    starts as its skip path. (The SPADE layers keep PyTorch's default initialisation.)"""
    for layer in network.modules():
        if isinstance(layer, ResBlock):
            out = layer.out_layers[-1]
        elif isinstance(layer, (AttentionBlock, SpatialTransformer)):
            out = layer.proj_out
        else:
            continue
        out.weight.zero_()
        out.bias.zero_()


def check_gt_size(gt_size: int, batch_size: int, cfg: StableSRConfig) -> None:
    """--gt-size must give whole latents at every level of the networks and a whole LR image; with one crop
    per process it must also keep their deepest feature map at 2 x 2 or more (`pipeline.smallest_tile`): at
    1 x 1 a GroupNorm of one channel per group has a single value to normalise, which PyTorch refuses."""
    multiple = gt_size_multiple(cfg, SCALE)
    smallest = multiple
    if batch_size == 1:
        smallest = math.ceil(smallest_tile(cfg) * vae_factor(cfg) / multiple) * multiple
    if gt_size < smallest or gt_size % multiple:
        why = " with --batch-size 1 (a deepest feature map of 2 x 2 or more)" if smallest > multiple else ""
        raise UsageError(f"--gt-size {gt_size}: these networks need a multiple of {multiple} (whole latents at "
                         f"every level, a whole LR image at x{SCALE}), at least {smallest}{why}; use --gt-size "
                         f"{max(smallest, math.ceil(gt_size / multiple) * multiple)}")


def warn_time_blind(cfg: StableSRConfig, speak: bool = True) -> None:
    """One warning line if some residual block of the networks cannot see t (`model.time_blindness`): training
    still runs (the golden test models are built so), but that block learns one function for every t."""
    note = time_blindness(cfg)
    if note and speak:
        print(f"WARNING: {note}", file=sys.stderr)


def vae_factor(cfg: StableSRConfig) -> int:
    """How many pixels one latent spans along a side: 2 per VAE level after the first (SD: 8)."""
    return 2 ** (len(cfg.vae.ch_mult) - 1)


def gt_size_multiple(cfg: StableSRConfig, scale: int) -> int:
    """GT crops must give whole latents that survive every downsampling of the UNet and the encoder,
    and a whole LR image: 8 x the VAE factor (8) = 64 px for the official networks."""
    network_factor = 2 ** (max(len(cfg.unet.channel_mult), len(cfg.time_encoder.channel_mult)) - 1)
    return math.lcm(vae_factor(cfg) * network_factor, scale)


# ------------------------------------------------------------------------------------------------------
# The objective


def encode(model: StableSR, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Image in [-1, 1] -> scale_factor * a sample of the VAE posterior (the official trainer samples,
    `get_first_stage_encoding`, for the LR and the GT alike), in float32."""
    posterior = DiagonalGaussian(model.vae.moments(image).float())
    return model.cfg.diffusion.scale_factor * posterior.sample(draw(posterior.mean, generator))


class Denoiser(nn.Module):
    """eps_theta(z_t, t, c, s(z_lr, t)): the UNet conditioned by the time-aware encoder, the networks that
    a training step runs with gradients, as one module. With several processes, DistributedDataParallel
    wraps this module (training.distribute): it holds every trainable parameter, and DDP leaves its
    frozen ones (requires_grad False) out of the gradient all-reduce."""

    def __init__(self, model: StableSR):
        super().__init__()
        self.unet, self.time_encoder = model.unet, model.time_encoder  # the model's own modules, shared

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                z_lr: torch.Tensor | None = None) -> torch.Tensor:
        # s: the time-aware encoder's features of the LR latent, one per UNet width (none for the prior alone)
        struct_cond = self.time_encoder(z_lr, t) if z_lr is not None else None
        # eps_theta(z_t, t, c, s)
        return self.unet(z_t, t, context, struct_cond)


def diffusion_loss(denoiser: nn.Module, schedule: Schedule, z_lr: torch.Tensor | None, z: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """|| eps_theta(z_t, t, c, s(z_lr, t)) - target ||^2, averaged over every element (so over the batch
    of per-sample means); `denoiser` is a Denoiser, or one wrapped for several processes. Without z_lr (the
    prior alone, `train unet`): || eps_theta(z_t, t, c) - target ||^2."""
    # z_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps
    z_t = schedule.q_sample(z, t, noise)
    # the target: eps, or v = sqrt(ab_t) eps - sqrt(1 - ab_t) z
    target = noise if schedule.parameterization == "eps" else schedule.velocity(z, t, noise)
    output = denoiser(z_t, t, context, z_lr)
    return F.mse_loss(output.float(), target)


def latents(model: StableSR, lr: torch.Tensor, gt: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_lr, z) of an LR/GT pair in [0, 1]. The official trainer upsamples in [0, 1] and then maps to
    [-1, 1]; bicubic weights sum to one, so upsampling in [-1, 1] (as inference does) differs by rounding."""
    with torch.no_grad():
        lr_up = upsample(lr * 2 - 1, gt.shape[-2] / lr.shape[-2])
        return encode(model, lr_up, generator), encode(model, gt * 2 - 1, generator)


def sample_loss(model: StableSR, denoiser: nn.Module, schedule: Schedule, context: torch.Tensor, lr: torch.Tensor,
                gt: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of the objective on a batch: posterior samples, t ~ U{0..T-1}, eps ~ N(0, I)."""
    z_lr, z = latents(model, lr, gt, generator)
    return random_timestep_loss(denoiser, schedule, context, z_lr, z, generator)


def random_timestep_loss(denoiser: nn.Module, schedule: Schedule, context: torch.Tensor, z_lr: torch.Tensor | None,
                         z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The objective at t ~ U{0..T-1} and eps ~ N(0, I), one of each per sample."""
    t = torch.randint(len(schedule), (z.shape[0],), generator=generator).to(z.device)
    noise = draw(z, generator)
    return diffusion_loss(denoiser, schedule, z_lr, z, t, noise, context)


VALIDATION_TIMESTEP_COUNT = 4  # val_loss: the mean over these many evenly spread timesteps


class Validation:
    """A fixed batch from its own seeded data pipeline, with fixed posterior samples and noise, scored at
    fixed timesteps: the same inputs at every measurement, so val_loss compares the steps of a run.
    z_lr is None for the prior alone."""

    def __init__(self, z_lr: torch.Tensor | None, z: torch.Tensor, generator: torch.Generator, timesteps: int):
        self.z_lr, self.z = z_lr, z
        self.noise = draw(self.z, generator)
        n = VALIDATION_TIMESTEP_COUNT
        self.timesteps = [(2 * i + 1) * timesteps // (2 * n) for i in range(n)]  # 125, 375, 625, 875

    @torch.no_grad()
    def loss(self, denoiser: Denoiser, schedule: Schedule, context: torch.Tensor) -> float:
        batch, device = len(self.z), self.z.device
        losses = [diffusion_loss(denoiser, schedule, self.z_lr, self.z, torch.full((batch,), t, device=device),
                                 self.noise, context) for t in self.timesteps]
        return torch.stack(losses).mean().item()


def sr_validation(model: StableSR, pairs, seed: int, timesteps: int, device: torch.device) -> Validation:
    """The validation of `train sr`: one batch of LR/GT pairs, and posterior samples of their latents."""
    generator = torch.Generator().manual_seed(seed)
    lr, gt = pairs.next_batch()
    z_lr, z = latents(model, lr.to(device), gt.to(device), generator)
    return Validation(z_lr, z, generator, timesteps)


# ------------------------------------------------------------------------------------------------------
# The command


@dataclass
class SROptions(RunOptions):
    base: list[str] | None = None  # StableSR or SD 2.x safetensors
    data: list[str] | None = None  # folders of HR photos
    config: str | None = None  # model config JSON (default: the one stored in --base)
    batch_size: int = 6  # per optimizer micro-step (official: 6 per GPU)
    gt_size: int = 512  # HR crop size (official: 512)
    lr: float = 5e-5  # AdamW learning rate (official: 5e-5, constant)
    grad_accum: int = 1  # micro-batches per optimizer step (official: 4)
    time_blind: bool = False  # the ablation: the encoder always sees t = 0
    degradation: str = "second-order"  # Real-ESRGAN's (official); "first-order": Eq. 1 once (degradation.py)
    checkpointing: bool = False  # recompute the UNet's blocks in the backward pass: less memory, ~1/3 slower
    skip_small: str = "auto"  # "on": leave out photos under 384 x 384 px or 100 KiB, as the official dataset;
    #                           "auto": on at the official crop size (gt_size >= 512), off below (small photos padded)


# Options a resumed run keeps from its start; it also keeps STORED_OPTIONS unless they are given again
# (the rest, --steps and --device, are given anew).
KEPT_OPTIONS = ("base", "data", "config", "batch_size", "gt_size", "lr", "grad_accum", "time_blind", "degradation",
                "skip_small", "seed")
STORED_OPTIONS = KEPT_OPTIONS + ("dtype", "save_every", "val_every", "checkpointing")
SCALE = 4  # LR = GT / 4, as StableSR trains


def run_train_sr(args) -> None:
    """`python -m stablesr_min train sr ...` (or `torchrun ... -m stablesr_min train sr ...`): argparse's
    namespace (None where an option was not given) -> SROptions -> train_sr, in every process of the run.
    A resumed run takes its kept options from its state."""
    required = {"base": "--base FILE", "data": "--data DIR"}
    with torchrun_processes(args.device, args.dist_timeout) as procs:
        opts, state = command_options(args, SROptions, ("base", "data", "config"), KEPT_OPTIONS, required)
        train_sr(opts, procs, state)


def check_options(opts: SROptions) -> None:
    check_option_ranges(opts, ("steps", "batch_size", "grad_accum"), ("save_every", "val_every"), ("lr",))


def train_sr(opts: SROptions, procs: Processes, state: TrainState | None = None) -> None:
    """Fine-tune for `opts.steps` steps in all, in this process of the run; with `state` (and
    `opts.resume`), continue that run."""
    from .data import TrainingPairs  # the data pipeline loads only for training
    from .degradation import ORDERS, DegradationConfig

    check_options(opts)
    run = RunFolder(opts.out, resume=opts.resume)
    device = procs.device
    dtype = pick_dtype(opts.dtype, device)
    seeds = derive_seeds(opts.seed, ["data", "noise", "init", "validation"])
    if opts.resume and state is None:
        state = run.load_state()

    # The model's config (the model itself loads once the data is found): the run's last checkpoint's, or
    # the base file's
    if state:
        cfg = resolve_config(WeightFiles([run.checkpoint_path]), None)
    else:
        cfg = base_config(opts.base, opts.config, time_aware=not opts.time_blind)
    check_gt_size(opts.gt_size, opts.batch_size, cfg)

    # The data (each rank its own stream of the same photos), the model (frozen but for the new layers),
    # the empty prompt's context
    degradation = DegradationConfig(order=ORDERS[opts.degradation])
    skip_small = opts.skip_small == "on" or (opts.skip_small == "auto" and opts.gt_size >= 512)
    pairs = TrainingPairs(opts.data, opts.gt_size, opts.batch_size, cfg=degradation,
                          seed=rank_seed(seeds["data"], procs.rank), scale=SCALE, skip_small=skip_small)
    if pairs.skipped and procs.is_main:
        print(f"train sr: left out {len(pairs.skipped)} of {len(pairs.skipped) + len(pairs.files)} photos under 384 x "
              "384 px or 100 KiB, as the official dataset does (--skip-small off keeps them)", file=sys.stderr)
    model = load_stablesr([run.checkpoint_path]) if state else load_base(opts.base, cfg, seeds["init"])
    trainable = prepare_for_finetuning(model)
    model.unet.checkpointing = opts.checkpointing
    with torch.no_grad():
        context = text_context(model, "", opts.batch_size).to(device)  # once, on the CPU
    move_step_networks(model, device)
    denoiser = Denoiser(model)
    network = distribute(denoiser, procs)
    schedule = Schedule.from_config(model.cfg.diffusion)

    # AdamW with PyTorch's defaults besides the lr, as the official trainer
    optimizer, scaler, generator, step, seconds = start_optimizer(trainable, opts.lr, dtype, seeds["noise"], run,
                                                                  state, pairs, procs)

    # A fixed batch for val_loss, from its own seeded pipeline (rank 0 measures it)
    validation = None
    if opts.val_every and procs.is_main:
        val_pairs = TrainingPairs(opts.data, opts.gt_size, opts.batch_size, cfg=degradation,
                                  seed=seeds["validation"], scale=SCALE, skip_small=skip_small)
        with autocast(device, dtype):
            validation = sr_validation(model, val_pairs, seeds["validation"], len(schedule), device)

    warn_time_blind(model.cfg, procs.is_main)
    n_trainable = sum(p.numel() for p in trainable.values())
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trainable
    if procs.is_main:
        print(f"train sr: {len(pairs.files)} images; {n_trainable / 1e6:.2f} M trainable parameters, "
              f"{n_frozen / 1e6:.2f} M frozen; global batch {opts.batch_size * procs.world_size * opts.grad_accum} "
              f"= {opts.batch_size} per process x {procs.world_size} process(es) x {opts.grad_accum} accumulated, "
              f"at {opts.gt_size} px; "
              f"{'time-aware' if model.cfg.time_encoder.time_aware else 'TIME-BLIND (t = 0)'} encoder; "
              f"{device}, {opts.dtype}; steps {step} -> {opts.steps}", file=sys.stderr)

    def save(step: int, seconds: float) -> None:
        state = snapshot(step, seconds, {k: getattr(opts, k) for k in STORED_OPTIONS}, trainable, optimizer, scaler,
                         generator, pairs, procs)
        if procs.is_main:
            run.save(model.state_dict(), config_metadata(model.cfg.to_json()), state)

    def backward() -> tuple[float, dict[str, float]]:
        """One optimizer step's gradients, over grad_accum micro-batches (all-reduced once, after the last);
        their mean loss."""
        loss_sum = 0.0
        for micro_batch in range(opts.grad_accum):
            lr, gt = pairs.next_batch()
            with gradient_sync(network, last_micro_batch=micro_batch == opts.grad_accum - 1):
                with autocast(device, dtype):
                    loss = sample_loss(model, network, schedule, context, lr.to(device), gt.to(device), generator)
                scaler.scale(loss / opts.grad_accum).backward()
            loss_sum += loss.item()
        return loss_sum / opts.grad_accum, {}

    val_loss = (lambda: validation.loss(denoiser, schedule, context)) if validation is not None else None
    hint = ("lower --batch-size or --gt-size (--grad-accum keeps the effective batch), use --checkpointing, "
            "or use --dtype bfloat16")
    run_steps("train sr", run, opts, step, seconds, optimizer, scaler, backward, val_loss, save, device, dtype, hint,
              procs)


def start_optimizer(trainable: dict[str, nn.Parameter], lr: float, dtype: torch.dtype, noise_seed: int,
                    run: RunFolder, state: TrainState | None, data, procs: Processes):
    """AdamW (PyTorch's defaults besides the lr), a loss scaler for float16 and this process's noise
    generator, at the start of a run or, with `state`, where it stopped (this rank's data stream too, and
    the log cut to its step). Returns (optimizer, scaler, generator, step, seconds trained)."""
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(rank_seed(noise_seed, procs.rank))
    step, seconds = restore(state, run, procs, trainable, optimizer, scaler, generator, data) if state else (0, 0.0)
    return optimizer, scaler, generator, step, seconds


def snapshot(step: int, seconds: float, options: dict, trainable: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator | None,
             data, procs: Processes) -> TrainState | None:
    """Everything a resume needs, as `restore` puts it back: every rank hands its random streams to
    rank 0, which gets the state (the other ranks get None: they write nothing). `trainable`: the tensors
    the state keeps, by key; `generator`: the noise stream (None: a run without one, `train cfw`)."""
    generators = gather_ranks(procs, {"noise": generator.get_state()} if generator is not None else {})
    data_state = gather_ranks(procs, data.state_dict())
    if not procs.is_main:
        return None
    return TrainState(step, options, {k: p.detach() for k, p in trainable.items()}, optimizer.state_dict(),
                      generators, data_state, {"seconds": seconds, "scaler": scaler.state_dict(),
                                               "world_size": procs.world_size})


def move_step_networks(model: StableSR, device: torch.device) -> None:
    """What a training step runs goes to the device: the UNet, the time-aware encoder and the VAE's
    encoder. The text encoder (its context is computed once) and the VAE's decoder (training never
    decodes) stay on the CPU."""
    for part in (model.unet, model.time_encoder, model.vae.encoder, model.vae.quant_conv):
        part.to(device)


def restore(state: TrainState, run: RunFolder, procs: Processes, trainable: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator | None,
            data) -> tuple[int, float]:
    """Put a saved state back in place (copied into the `trainable` tensors; this rank's generator and
    data), on as many processes as it was saved from, and cut the log to its step; returns (step, seconds
    trained)."""
    check_world_size(state, procs)
    if sorted(state.weights) != sorted(trainable):
        raise UsageError("the run's state does not match its checkpoint's trainable tensors; start a new run")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state.weights[name])
    optimizer.load_state_dict(state.optimizer)
    scaler.load_state_dict(state.extra["scaler"])
    if generator is not None:
        generator.set_state(of_rank(state.generators, procs.rank)["noise"])
    data.load_state_dict(of_rank(state.data, procs.rank))
    if procs.is_main:
        run.keep_log_until(state.step)
    return state.step, state.extra["seconds"]
