"""Fine-tuning StableSR: the time-aware encoder and the SFT layers learn, Stable Diffusion stays frozen (Sec. 3.1).

    python -m stablesr_min train sr --base v2-1_512-ema-pruned.safetensors --data photos/ --out runs/sr --steps N

One step of the loop below (`train_sr`), as the official trainer takes it: an HR crop, degraded by the
Real-ESRGAN pipeline (degradation.py, data.py) into an LR image 4x smaller; the latent diffusion objective
of Sec. 3.1 on the pair (objective.py: || eps - eps_theta(z_t, t, c, s(z_lr, t)) ||^2 at a random t);
backward; one AdamW step.

Trainable: every `.spade.` parameter of the UNet and the whole time-aware encoder; the VAE, the text
encoder and the rest of the UNet are frozen (no gradients, eval mode). AdamW with the official settings
(lr 5e-5, PyTorch's default betas (0.9, 0.999) and weight decay 0.01; constant lr). The official run
used batch 6 per GPU x 8 GPUs x 4 accumulated batches (`--grad-accum`):

    torchrun --nproc_per_node 8 -m stablesr_min train sr ... --batch-size 6 --grad-accum 4

runs this file in 8 processes; what they share (joining, seeds per rank, rank 0 writing, averaging the
gradients), is in processes.py; saving, resuming and Ctrl-C in loop.py and run_folder.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SCALE, StableSRConfig
from ..devices import pick_dtype
from ..errors import WeightsError
from ..model import StableSR, load_stablesr, resolve_config
from ..objective import Denoiser, Validation, latents, sample_loss
from ..pipeline import text_context
from ..schedule import Schedule
from ..unet import SFT
from ..weights import CHECKPOINT_KINDS, WeightFiles, config_metadata, guess_kind
from .loop import Loop, autocast, loss_scaler, noise_generator, restore_run, snapshot
from .processes import (Processes, check_same_options, derive_seeds, distribute, gradient_sync, rank_seed,
                        torchrun_processes)
from .run_folder import RunFolder, TrainState, check_resumed_with_its_options
from .options import RunOptions, check_option_ranges, kept, persisting, stored
from .networks import check_gt_size, default_init, warn_time_blind, zero_init_like_official

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
                           f"but this is {CHECKPOINT_KINDS[kind]}")
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


# ------------------------------------------------------------------------------------------------------
# The command


@dataclass
class SROptions(RunOptions):  # kept / stored: what a resumed run keeps of them (options.py)
    command = "train sr"
    base: list[str] | None = kept(None, path=True)  # StableSR or SD 2.x safetensors
    data: list[str] | None = kept(None, path=True)  # folders of HR photos
    config: str | None = kept(None, path=True)  # model config JSON (default: the one stored in --base)
    batch_size: int = kept(6)  # per optimizer micro-step (official: 6 per GPU)
    gt_size: int = kept(512)  # HR crop size (official: 512)
    lr: float = kept(5e-5)  # AdamW learning rate (official: 5e-5, constant)
    grad_accum: int = kept(1)  # micro-batches per optimizer step (official: 4)
    time_blind: bool = kept(False)  # the ablation: the encoder always sees t = 0
    degradation: str = kept("second-order")  # Real-ESRGAN's (official); "first-order": Eq. 1 once (degradation.py)
    checkpointing: bool = stored(False)  # recompute the UNet's blocks in the backward pass: less memory, ~1/3 slower
    skip_small: str = kept("auto")  # "on": leave out photos under 384 x 384 px or 100 KiB, as the official dataset;
    #                                 "auto": on at the official crop size (gt_size >= 512), off below (small photos padded)


def check_options(opts: SROptions) -> None:
    check_option_ranges(opts, ("steps", "batch_size", "grad_accum"), ("save_every", "val_every"), ("lr",))


def train_sr(opts: SROptions, procs: Processes | None = None, state: TrainState | None = None) -> str:
    """Fine-tune for `opts.steps` steps in all, in this process of the run (None: this process, or every
    process of a torchrun); with `opts.resume`, continue the run in `opts.out` (`state`: its state, if read
    already; `run_folder.resume_options` gives the options to continue it with). Returns how it ended:
    run_folder.FINISHED, STOPPED or TERMINATED (stopped by a signal, and saved).

        train_sr(SROptions(out="runs/sr", steps=1000, base=["v2-1_512-ema-pruned.safetensors"], data=["photos/"]))
    """
    if procs is None:
        with torchrun_processes(opts.device, out=opts.out) as procs:
            return train_sr(opts, procs, state)
    from .data import TrainingPairs, smallest_gt_size  # the data pipeline loads only for training
    from ..degradation import ORDERS, DegradationConfig

    check_options(opts)
    check_same_options(procs, opts)
    run = RunFolder(opts.out, opts.command, resume=opts.resume, writer=procs.is_main, restart=opts.restart)
    device = procs.device
    dtype = pick_dtype(opts.dtype, device)
    seeds = derive_seeds(opts.seed, ["data", "noise", "init", "validation"])
    if opts.resume and state is None:
        state = run.load_state()
        check_resumed_with_its_options(opts, state)

    # The model's config (the model itself loads once the data is found): the run's last checkpoint's, or
    # the base file's
    if state:
        cfg = resolve_config(WeightFiles([run.checkpoint_path]), None)
    else:
        cfg = base_config(opts.base, opts.config, time_aware=not opts.time_blind)
    degradation = DegradationConfig(order=ORDERS[opts.degradation])
    check_gt_size(opts.gt_size, opts.batch_size, cfg, at_least=smallest_gt_size(degradation, SCALE))

    # The data (each rank its own stream of the same photos), the model (frozen but for the new layers),
    # the empty prompt's context
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

    # AdamW with PyTorch's defaults besides the lr, as the official trainer; the noise (t, eps) of this process;
    # a resumed run continues from its state
    optimizer = torch.optim.AdamW(trainable.values(), lr=opts.lr)
    scaler = loss_scaler(dtype)
    generator = noise_generator(seeds["noise"], procs)
    step, seconds = restore_run(state, run, procs, trainable, optimizer, scaler, generator, pairs) if state else (0, 0.)

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
        state = snapshot(step, seconds, persisting(opts), trainable, optimizer, scaler,
                         generator, pairs, procs)
        if procs.is_main:
            run.save(model.state_dict(), config_metadata(model.cfg.to_json()), state)

    # The loop (Sec. 3.1): degraded pairs, the objective at a random t, backward, one AdamW step
    hint = ("lower --batch-size or --gt-size (--grad-accum keeps the effective batch), use --checkpointing, "
            "or use --dtype bfloat16")
    with Loop(opts.command, run, opts, procs, step, seconds, hint) as loop:
        while loop.running():
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro_batch in range(opts.grad_accum):  # the gradients are all-reduced once, after the last
                lr, gt = pairs.next_batch()
                with gradient_sync(network, last_micro_batch=micro_batch == opts.grad_accum - 1):
                    with autocast(device, dtype):
                        loss = sample_loss(model, network, schedule, context, lr.to(device), gt.to(device), generator)
                    scaler.scale(loss / opts.grad_accum).backward()
                loss_sum += loss.item()
            mean_loss = loop.mean_finite_loss(loss_sum / opts.grad_accum)
            scaler.step(optimizer)
            scaler.update()
            record = loop.count_step(mean_loss)
            if loop.validation_due():
                with autocast(device, dtype):
                    record["val_loss"] = validation.loss(denoiser, schedule, context)
            loop.finish_step(record)
            loop.save_if_due(save)
    return loop.outcome


def move_step_networks(model: StableSR, device: torch.device) -> None:
    """What a training step runs goes to the device: the UNet, the time-aware encoder and the VAE's
    encoder. The text encoder (its context is computed once) and the VAE's decoder (training never
    decodes) stay on the CPU."""
    for part in (model.unet, model.time_encoder, model.vae.encoder, model.vae.quant_conv):
        part.to(device)


def sr_validation(model: StableSR, pairs, seed: int, timesteps: int, device: torch.device) -> Validation:
    """The validation of `train sr`: one batch of LR/GT pairs, and posterior samples of their latents."""
    generator = torch.Generator().manual_seed(seed)
    lr, gt = pairs.next_batch()
    z_lr, z = latents(model, lr.to(device), gt.to(device), generator)
    return Validation(z_lr, z, generator, timesteps)
