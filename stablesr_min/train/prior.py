"""Training the diffusion prior: a tiny Stable Diffusion, trained the way SD was, with this project's networks.

StableSR fine-tunes on top of a pretrained Stable Diffusion. No pretrained SD is small enough to ship or
fetch here, so the prior is trained first, in two stages, as latent diffusion trains (Rombach et al. 2022):

    python -m stablesr_min train vae  --data photos/ --out runs/vae --steps N
    python -m stablesr_min train unet --vae runs/vae/last.safetensors --data photos/ --out runs/unet --steps N
    python -m stablesr_min train sr   --base runs/unet/last.safetensors --data photos/ --out runs/sr --steps N

Stage 1, the autoencoder (`vae.AutoencoderKL`). LDM's objective (Rombach et al. 2022, arXiv 2112.10752v2,
App. G, Eq. 25):

    L_Autoencoder = min_{E,D} max_psi ( L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x) + L_reg(x; E, D) )

with SD's `LPIPSWithDiscriminator`: L_rec = L1 + LPIPS, L_reg = kl_weight * KL(q(z|x) || N(0, I)) with
kl_weight 1e-6, and a PatchGAN that switches on late in training. Here: L1 + KL only, no LPIPS (its VGG16
backbone is a download this project never makes) and no GAN (it only starts after the reconstructions are good, which tens of
minutes on a CPU do not reach); so

    L_vae = mean |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W),   z ~ q(z|x),  x in [-1, 1]

which is LDM's L1 and KL sums divided by the pixel count (Adam does not see the common factor). LDM also
divides L1 by a learned scalar variance exp(logvar) and adds logvar; with that scalar at its start, 0, that
is plain L1, and we keep it there.

Stage 2, the latent diffusion UNet (`unet.UNet`, no SFT), on the frozen VAE's latents (LDM Eq. 3):

    L_LDM = E_{z = E(x), c, eps ~ N(0, I), t} [ || eps - eps_theta(z_t, t, tau(c)) ||_2^2 ]

the same objective and 1000-step schedule as SD (`objective.diffusion_loss`, `schedule.Schedule`). It is
unconditional in practice: c is always the empty prompt, and tau, the text encoder (`text.TextEncoder`, tiny),
keeps seeded random weights and is frozen, so tau("") is one fixed context tensor that the UNet learns to
take as given. StableSR encodes the same empty prompt with the same weights (they are in the checkpoint),
so sampling sees exactly that context. As in LDM (`scale_by_std`), the latents are multiplied by
scale_factor = 1 / std of a first batch's latents, so that the UNet sees latents of unit variance (SD's
0.18215 was found so for its VAE); it goes into the config.

Its checkpoint is the whole SD 2.x-like tree, the StableSR module tree with `use_sft=False`
(first_stage_model = the trained VAE, model.diffusion_model, cond_stage_model), so `train sr --base` takes it
as it takes an SD 2.x file; its config carries the time-aware encoder's widths to match the tiny UNet.

Not done as SD: no EMA of the UNet's weights, no learning-rate warm-up, one resolution.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import TINY_SIZES, StableSRConfig, matching_time_encoder
from ..devices import pick_device, pick_dtype
from ..errors import ConfigError, UsageError, WeightsError
from ..model import StableSR, check_networks, load_stablesr, load_vae, resolve_config
from ..objective import Denoiser, Validation, posterior_latent, random_timestep_loss
from ..pipeline import draw, text_context
from ..schedule import Schedule
from ..text import TextEncoder
from ..unet import UNet
from ..vae import AutoencoderKL, DiagonalGaussian
from ..weights import CHECKPOINT_KINDS, WeightFiles, config_metadata, guess_kind
from .loop import Loop, autocast, decayed_lr, loss_scaler, noise_generator, restore_run, set_lr, snapshot
from .processes import Processes, derive_seeds, one_process
from .run_folder import RunFolder, TrainState, check_resumed_with_its_options
from .options import RunOptions, check_option_ranges, kept, persisting, stored
from .networks import default_init, gt_size_multiple, warn_time_blind, zero_init_like_official

# ------------------------------------------------------------------------------------------------------
# The tiny sizes (`config.TINY_SIZES`), changed by --config

def prior_config(path: str | None) -> StableSRConfig:
    """The tiny sizes, each block updated by the `--config` JSON's (a StableSRConfig JSON: only the blocks
    and fields it gives change); the time-aware encoder matched to the UNet unless the JSON sizes it."""
    given: dict[str, Any] = {}
    if path is not None:
        try:
            given = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--config {path}: not a readable config JSON ({e})") from None
        if not isinstance(given, dict):
            raise UsageError(f"--config {path}: must hold a JSON object (a stablesr-min config)")
    blocks = {name: {**TINY_SIZES.get(name, {}), **block} if isinstance(block, dict) else block
              for name, block in ({name: {} for name in TINY_SIZES} | given).items()}
    try:
        cfg = StableSRConfig.from_dict(blocks)
        if "time_encoder" not in given:
            cfg = StableSRConfig.from_dict({**cfg.to_dict(), "time_encoder": matching_time_encoder(cfg.unet)})
    except ConfigError as e:
        raise ConfigError(e.field, e.problem, f"--config {path}") from None
    check_networks(sr_config(cfg), f"--config {path}")  # every network `train sr` will build on it, SFT included
    cfg.unet.use_sft = False
    return cfg


def sr_config(cfg: StableSRConfig) -> StableSRConfig:
    """The config `train sr` builds on this prior's: the same, with the SFT layers (and the encoder) on."""
    return StableSRConfig.from_dict({**cfg.to_dict(), "unet": {**cfg.to_dict()["unet"], "use_sft": True}})


# ------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator,
             kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_vae on a batch x in [-1, 1]; also its two terms, for the log (the KL per image, in nats)."""
    posterior = DiagonalGaussian(vae.moments(x).float())
    # z ~ q(z|x)
    z = posterior.sample(draw(posterior.mean, generator))
    # mean |x - D(z)|
    l1 = (x - vae.decode(z).float()).abs().mean()
    # KL(q(z|x) || N(0, I)), per image
    kl = posterior.kl()
    loss = l1 + kl_weight * kl.sum() / x.numel()
    return loss, {"l1": l1.item(), "kl": kl.mean().item()}


class VAEValidation:
    """val_loss: mean |x - D(mean of q(z|x))| on a fixed batch of its own seeded crops (no sampling, so the
    same inputs at every measurement)."""

    def __init__(self, crops, device: torch.device):
        self.x = crops.next_batch().to(device) * 2 - 1

    @torch.no_grad()
    def loss(self, vae: AutoencoderKL) -> float:
        return (self.x - vae.decode(vae.encode(self.x).mode()).float()).abs().mean().item()


# ------------------------------------------------------------------------------------------------------
# Stage 2: the UNet


def vae_for_prior(path: str) -> AutoencoderKL:
    """The frozen VAE of `--vae`: a `train vae` file, or the VAE of an SD 2.x or StableSR checkpoint."""
    files = WeightFiles([path])
    kind = guess_kind(files.keys())
    if kind not in ("vae", "sd2", "stablesr"):
        raise WeightsError(f"{path}: --vae needs a VAE written by `train vae` (or an SD 2.x or StableSR checkpoint), "
                           f"but this is {CHECKPOINT_KINDS[kind]}")
    return load_vae(path)


@torch.no_grad()
def init_text_encoder(text: TextEncoder, seed: int) -> None:
    """Seeded random weights at OpenCLIP's initial scales (token 0.02, position 0.01, q/k/v and projection
    width^-1/2; the rest PyTorch's default). Frozen: only its output for the empty prompt is ever used."""
    default_init([text], seed)
    generator = torch.Generator().manual_seed(seed)
    width = text.cfg.width
    text.token_embedding.weight.normal_(0, 0.02, generator=generator)
    text.positional_embedding.normal_(0, 0.01, generator=generator)
    for block in text.transformer.resblocks:
        block.attn.in_proj_weight.normal_(0, width ** -0.5, generator=generator)
        block.attn.in_proj_bias.zero_()
    text.text_projection.normal_(0, width ** -0.5, generator=generator)
    text.logit_scale.fill_(math.log(1 / 0.07))  # CLIP's initial temperature (unused by SD)


@torch.no_grad()
def init_unet(unet: UNet, seed: int) -> None:
    """As SD's UNetModel starts: PyTorch's default initialisation (seeded), with the last conv of every
    residual branch, every spatial transformer's output projection and the output conv at zero."""
    default_init([unet], seed)
    zero_init_like_official(unet)
    unet.out[-1].weight.zero_()
    unet.out[-1].bias.zero_()


def new_prior(cfg: StableSRConfig, vae: AutoencoderKL, seeds: dict[str, int]) -> StableSR:
    """The SD 2.x-like tree: the given (trained) VAE, a new UNet, a seeded random text encoder."""
    with torch.device("meta"):
        model = StableSR(cfg)
    model.first_stage_model = vae
    model.model.to_empty(device="cpu")
    model.cond_stage_model.to_empty(device="cpu")
    init_unet(model.unet, seeds["init"])
    init_text_encoder(model.text_encoder, seeds["text"])
    return model


@torch.no_grad()
def scale_by_std(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> float:
    """LDM's `scale_by_std`: 1 / std of the posterior samples of a batch of images in [0, 1]."""
    posterior = DiagonalGaussian(vae.moments(images * 2 - 1).float())
    return 1 / posterior.sample(draw(posterior.mean, generator)).std().item()


def prior_loss(model: StableSR, schedule: Schedule, context: torch.Tensor, images: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """One draw of L_LDM on a batch of images in [0, 1]: a posterior sample, t ~ U{0..T-1}, eps ~ N(0, I)."""
    with torch.no_grad():
        z = posterior_latent(model, images * 2 - 1, generator)
    return random_timestep_loss(Denoiser(model), schedule, context, None, z, generator)


# ------------------------------------------------------------------------------------------------------
# The commands


@dataclass
class PriorOptions(RunOptions):  # kept / stored: what a resumed run keeps of them (options.py)
    data: list[str] | None = kept(None, path=True)  # folders of photos
    config: str | None = kept(None, path=True)  # config JSON over the tiny sizes (config.TINY_SIZES)
    batch_size: int = kept(8)  # crops per step
    crop: int = kept(64)  # crop size in pixels
    lr: float = kept(2e-4)  # AdamW learning rate
    lr_decay: int = stored(0)  # the last N steps before --steps take the lr linearly down toward 0 (0: constant)


@dataclass
class VAEOptions(PriorOptions):
    command = "train vae"
    lr: float = kept(5e-4)  # higher than LDM's 4.5e-6 x batch: a tiny model, minutes of training (and AdamW with
    #                         PyTorch's betas, as every command here; LDM's Adam betas (0.5, 0.9) suit its GAN term)
    kl_weight: float = kept(1e-6)  # SD's VAE (kl-f8)
    hue_rotation: float = kept(0.0)  # probability of turning a crop's colours by a random angle (data.hue_rotate);
    #                                  SD's VAE saw billions of photos, a tiny one sees a few and their few hues


@dataclass
class UNetOptions(PriorOptions):
    command = "train unet"
    vae: str | None = kept(None, path=True)  # the VAE file (`train vae`'s last.safetensors, or an SD 2.x checkpoint)
    crop: int = kept(128)  # 32 x 32 latents with the tiny 4x VAE


def check_prior_options(opts: PriorOptions, multiple: int) -> None:
    check_option_ranges(opts, ("steps", "batch_size"), ("save_every", "val_every", "lr_decay"), ("lr",))
    if opts.crop < multiple or opts.crop % multiple:
        raise UsageError(f"--crop {opts.crop}: must be a multiple of {multiple}, so that every level of the "
                         "networks is whole")


class VAEStage:
    """Stage 1 for the loop (`train_prior`): the VAE, all of it trainable, with L_vae, its validation and its
    checkpoint (the VAE under `first_stage_model.`)."""

    command = VAEOptions.command
    streams = ["data", "noise", "init", "validation"]  # its random streams (derive_seeds)

    def __init__(self, opts: VAEOptions, run: RunFolder, state: TrainState | None, seeds: dict[str, int],
                 device: torch.device):
        from .data import CleanCrops  # the data pipeline loads only for training

        self.cfg = resolve_config(WeightFiles([run.checkpoint_path]), None) if state else prior_config(opts.config)
        check_prior_options(opts, self.cfg.vae.downscale)
        if not opts.kl_weight >= 0:
            raise UsageError(f"--kl-weight must be >= 0, got {opts.kl_weight}")
        self.crops = CleanCrops(opts.data, opts.crop, opts.batch_size, seed=seeds["data"],
                                hue_rotation=opts.hue_rotation)
        if state:
            self.vae = load_vae(run.checkpoint_path)
        else:
            self.vae = AutoencoderKL(self.cfg.vae)
            default_init([self.vae], seeds["init"])
        self.vae.to(device).train()
        self.trainable = {f"first_stage_model.{k}": p for k, p in sorted(self.vae.named_parameters())}
        self.validation = VAEValidation(CleanCrops(opts.data, opts.crop, opts.batch_size, seeds["validation"]), device)
        self.kl_weight = opts.kl_weight
        warn_time_blind(sr_config(self.cfg))  # the UNet and encoder that later stages will build on this config
        self.summary = (f"{len(self.crops.files)} images; {sum(p.numel() for p in self.trainable.values()) / 1e6:.2f} M "
                        f"parameters, {self.vae.downscale}x down to {self.cfg.vae.embed_dim} channels; batch "
                        f"{opts.batch_size} at {opts.crop} px"
                        + (f"; hue rotation p = {opts.hue_rotation:g}" if opts.hue_rotation else ""))

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return vae_loss(self.vae, images * 2 - 1, generator, self.kl_weight)

    def val_loss(self) -> float:
        return self.validation.loss(self.vae)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"first_stage_model.{k}": v for k, v in self.vae.state_dict().items()}
        return tensors, config_metadata(self.cfg.to_json())


class UNetStage:
    """Stage 2 for the loop (`train_prior`): the UNet on the frozen VAE, with L_LDM, its validation and its
    checkpoint (the whole SD 2.x-like tree)."""

    command = UNetOptions.command
    streams = ["data", "noise", "init", "text", "scale", "validation"]

    def __init__(self, opts: UNetOptions, run: RunFolder, state: TrainState | None, seeds: dict[str, int],
                 device: torch.device):
        from .data import CleanCrops  # the data pipeline loads only for training

        if state:
            self.model = load_stablesr([run.checkpoint_path])
            cfg = self.model.cfg
        else:
            vae = vae_for_prior(opts.vae)
            cfg = prior_config(opts.config)
            cfg.vae = vae.cfg  # the VAE's sizes are the file's, whatever --config says
        check_prior_options(opts, gt_size_multiple(cfg, 1))
        self.crops = CleanCrops(opts.data, opts.crop, opts.batch_size, seed=seeds["data"])
        if not state:
            generator = torch.Generator().manual_seed(seeds["scale"])
            batch = CleanCrops(opts.data, opts.crop, opts.batch_size, seed=seeds["scale"]).next_batch()
            cfg.diffusion.scale_factor = scale_by_std(vae, batch, generator)
            self.model = new_prior(cfg, vae, seeds)
        model = self.model
        model.to(device).requires_grad_(False).eval()
        model.unet.requires_grad_(True).train()
        self.trainable = {f"model.diffusion_model.{k}": p for k, p in sorted(model.unet.named_parameters())}
        self.schedule = Schedule.from_config(cfg.diffusion)
        with torch.no_grad():
            self.context = text_context(model, "", opts.batch_size)
            val_images = CleanCrops(opts.data, opts.crop, opts.batch_size, seed=seeds["validation"]).next_batch()
            val_generator = torch.Generator().manual_seed(seeds["validation"])
            self.validation = Validation(None, posterior_latent(model, val_images.to(device) * 2 - 1, val_generator),
                                         val_generator, len(self.schedule))
        warn_time_blind(sr_config(model.cfg))
        side = opts.crop // model.vae.downscale
        self.summary = (f"{len(self.crops.files)} images; {sum(p.numel() for p in self.trainable.values()) / 1e6:.2f} M "
                        f"trainable parameters; latents {side} x {side} x {cfg.vae.embed_dim}, scale_factor "
                        f"{cfg.diffusion.scale_factor:.4f}; batch {opts.batch_size}")

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return prior_loss(self.model, self.schedule, self.context, images, generator), {}

    def val_loss(self) -> float:
        return self.validation.loss(Denoiser(self.model), self.schedule, self.context)

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.model.state_dict(), config_metadata(self.model.cfg.to_json())


def train_vae(opts: VAEOptions, state: TrainState | None = None) -> str:
    """Train the VAE for `opts.steps` steps in all (`train_prior`)."""
    return train_prior(opts, VAEStage, state)


def train_unet(opts: UNetOptions, state: TrainState | None = None) -> str:
    """Train the UNet for `opts.steps` steps in all on the frozen VAE (`train_prior`)."""
    return train_prior(opts, UNetStage, state)


def train_prior(opts: PriorOptions, stage_of: type[VAEStage] | type[UNetStage], state: TrainState | None = None) -> str:
    """A stage of the prior in this one process (the tiny prior trains on one CPU or GPU): AdamW, its lr
    constant or decayed at the end (--lr-decay), on batches of crops. With `opts.resume`, continue the run in
    `opts.out` (`state`: its state, if read already). Returns how it ended: run_folder.FINISHED, STOPPED or
    TERMINATED (stopped by a signal, and saved).

        train_vae(VAEOptions(out="runs/vae", steps=3000, data=["photos/"]))
    """
    with one_process(stage_of.command):
        run = RunFolder(opts.out, stage_of.command, resume=opts.resume, restart=opts.restart)
        if opts.resume and state is None:
            state = run.load_state()
            check_resumed_with_its_options(opts, state)
        procs = Processes(pick_device(opts.device))
        device, dtype = procs.device, pick_dtype(opts.dtype, procs.device)
        seeds = derive_seeds(opts.seed, stage_of.streams)
        stage = stage_of(opts, run, state, seeds, device)
        crops, trainable = stage.crops, stage.trainable

        # AdamW with PyTorch's defaults besides the lr; the noise of this process; a resumed run continues from its
        # state
        optimizer = torch.optim.AdamW(trainable.values(), lr=opts.lr)
        scaler = loss_scaler(dtype)
        generator = noise_generator(seeds["noise"], procs)
        step, seconds = restore_run(state, run, procs, trainable, optimizer, scaler, generator, crops) if state else (0, 0.)
        print(f"{stage.command}: {stage.summary}; {device}, {opts.dtype}; steps {step} -> {opts.steps}", file=sys.stderr)

        def save(step: int, seconds: float) -> None:
            run.save(*stage.checkpoint(), snapshot(step, seconds, persisting(opts), trainable, optimizer, scaler,
                                                   generator, crops, procs))

        # The loop (LDM's two stages): a batch of crops, the stage's loss, one AdamW step at this step's lr
        hint = "lower --batch-size or --crop, or use --dtype bfloat16"
        with Loop(stage.command, run, opts, procs, step, seconds, hint) as loop:
            while loop.running():
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    loss, terms = stage.loss(crops.next_batch().to(device), generator)
                scaler.scale(loss).backward()
                mean_loss = loop.mean_finite_loss(loss.item())
                lr = decayed_lr(opts.lr, loop.step, opts.steps, opts.lr_decay)
                set_lr(optimizer, lr)
                scaler.step(optimizer)
                scaler.update()
                record = loop.count_step(mean_loss, lr, **terms)
                if loop.validation_due():
                    with autocast(device, dtype):
                        record["val_loss"] = stage.val_loss()
                loop.finish_step(record)
                loop.save_if_due(save)
        return loop.outcome
