"""Training CFW (paper Sec. 3.2): only the fusion layers learn, on latents that the fine-tuned model sampled.

    python -m stablesr_min train cfw-data --weights stablesr_000117.safetensors --data photos/ --out cfw_data --count N
    python -m stablesr_min train cfw --cfw-base v2-1_512-ema-pruned.safetensors --data cfw_data --out runs/cfw --steps M

CFW's decoder fuses the LR image's encoder features into the decoding of the sampled latent,

    F_m = F_d + C(F_e, F_d; theta) * w                                                    (paper Eq. 2)

and only C's parameters theta learn, at w = 1, so that w = 1 at inference is the most faithful setting. One
step, as the official `AutoencoderKLResi` (`freeze_dec: True`, `fusion_w: 1.0`) computes it:

    F_e   = the frozen encoder's features of bicubic-up(LR)            (no gradients)
    x_hat = the decoder of latent / scale_factor, fusing F_e with w = 1
    L_G(GT, x_hat) -> an Adam step on theta;  L_D(GT, x_hat) -> an Adam step on the discriminator (cfw_loss.py)

Trainable: every `decoder.fusion_layer_*` parameter. The encoder, the rest of the decoder, quant_conv and
post_quant_conv are frozen (no gradients, eval mode). Adam with betas (0.5, 0.9) and lr 5e-5 for the fusion
layers and the discriminator alike (official `configure_optimizers`; base_learning_rate 5e-5, run with
`--scale_lr False`). The official run used batch 1 with 8 accumulated batches; `--batch-size 8` averages
the same gradients in one batch.

The base (`--cfw-base`) is a CFW checkpoint (to continue), or a VAE or SD 2.x checkpoint: the CFW
autoencoder takes its VAE, and the fusion layers start as the official ones do. The official run starts
from SD 2.1's VAE, which is also StableSR's (frozen) VAE.

    torchrun --nproc_per_node 8 -m stablesr_min train cfw ... --batch-size 1

runs this file in 8 processes, as `train sr` runs (processes.py): each process its own order of the
samples, the fusion layers' gradients and the discriminator's averaged over the processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..cfw import CFWAutoencoder, FusionLayer, ResidualDenseBlock
from ..config import StableSRConfig
from ..devices import pick_dtype
from ..errors import WeightsError
from ..model import load_cfw, resolve_config
from ..pipeline import upsample
from ..vae import AutoencoderKL
from ..weights import CHECKPOINT_KINDS, WeightFiles, check_keys, config_metadata, guess_kind, load_module, mismatch_message
from .cfw_data import CFWSamples
from .cfw_loss import CFWLoss, CFWLossConfig
from .loop import Loop, autocast, loss_scaler, restore_run, snapshot
from .processes import Processes, check_same_options, derive_seeds, distribute, rank_seed, torchrun_processes
from .run_folder import RunFolder, TrainState, check_resumed_with_its_options
from .options import RunOptions, check_option_ranges, kept, persisting

FUSION_PREFIX = "decoder.fusion_layer_"
DISCRIMINATOR_PREFIX = "loss.discriminator."  # as the official checkpoint names it
W_TRAIN = 1.0  # the fusion weight w during training (official `fusion_w: 1.0`)

# ------------------------------------------------------------------------------------------------------
# What trains


def fusion_parameters(cfw: CFWAutoencoder) -> dict[str, nn.Parameter]:
    """Every `decoder.fusion_layer_*` parameter, by checkpoint key, sorted."""
    return {name: p for name, p in sorted(cfw.named_parameters()) if name.startswith(FUSION_PREFIX)}


def prepare_for_training(cfw: CFWAutoencoder) -> dict[str, nn.Parameter]:
    """Freeze everything but the fusion layers (which have no dropout or batch norm, so their mode
    changes nothing; they are put in train mode as the official run has them)."""
    cfw.requires_grad_(False).eval()
    trainable = fusion_parameters(cfw)
    for p in trainable.values():
        p.requires_grad_(True)
    for level in cfw.decoder.fusion_levels:
        getattr(cfw.decoder, f"fusion_layer_{level}").train()
    return trainable


def trained_tensors(trainable: dict[str, nn.Parameter], loss: CFWLoss) -> dict[str, torch.Tensor]:
    """What a run changes, by checkpoint key: the fusion layers' parameters and the discriminator's whole
    state (its BatchNorm statistics too), under `loss.discriminator.` as the official checkpoint has it.
    The tensors are the networks' own (state_dict shares their storage), so restoring copies into them."""
    discriminator = {DISCRIMINATOR_PREFIX + k: v for k, v in loss.discriminator.state_dict().items()}
    return dict(trainable) | discriminator


# ------------------------------------------------------------------------------------------------------
# The model to start from


def load_cfw_base(path: str, seed: int) -> tuple[CFWAutoencoder, StableSRConfig]:
    """A CFW checkpoint (continue), or a VAE or SD 2.x one (its VAE, new fusion layers); with its config."""
    files = WeightFiles([path])
    kind = guess_kind(files.keys())
    if kind == "stablesr":
        raise WeightsError(f"{path}: is a StableSR checkpoint, which goes to `train cfw-data --weights`; "
                           "--cfw-base takes a CFW checkpoint (to continue) or a VAE or SD 2.x checkpoint")
    if kind not in ("cfw", "vae", "sd2"):
        raise WeightsError(f"{path}: --cfw-base needs a CFW, VAE or SD 2.x checkpoint, but this is "
                           f"{CHECKPOINT_KINDS[kind]}")
    cfg = resolve_config(files, None)
    if kind == "cfw":
        return load_cfw(path), cfg
    return cfw_from_vae(files, cfg, seed), cfg


def cfw_from_vae(files: WeightFiles, cfg: StableSRConfig, seed: int) -> CFWAutoencoder:
    """The VAE (keys under `first_stage_model.`, or bare) for the encoder, decoder and quant convs; the fusion
    layers as the official constructor leaves them, drawn from `seed`."""
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in files.keys()) else ""
    with torch.device("meta"):
        vae = AutoencoderKL(cfg.cfw)
        cfw = CFWAutoencoder(cfg.cfw)
    load_module(vae, files, prefix, what="the VAE of the CFW autoencoder")
    missing, unexpected = cfw.load_state_dict(vae.state_dict(), strict=False, assign=True)
    assert not unexpected and all(k.startswith(FUSION_PREFIX) for k in missing), "CFW is the VAE plus fusion layers"
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for level in cfw.decoder.fusion_levels:
            fusion = getattr(cfw.decoder, f"fusion_layer_{level}")
            fusion.to_empty(device="cpu")
            init_fusion_like_official(fusion, generator)
    return cfw.eval()


@torch.no_grad()
def init_fusion_like_official(fusion: FusionLayer, generator: torch.Generator) -> None:
    """PyTorch's default initialisation (each layer's `reset_parameters`, from the global generator), except
    the convolutions of the RRDBs' dense blocks: basicsr's `ResidualDenseBlock` re-initialises them with
    `default_init_weights(..., 0.1)`, Kaiming-normal weights times 0.1 and zero biases, so that each
    residual block starts close to the identity."""
    for layer in fusion.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    for block in fusion.modules():
        if isinstance(block, ResidualDenseBlock):
            for conv in block.children():
                nn.init.kaiming_normal_(conv.weight, generator=generator)
                conv.weight.mul_(0.1)
                nn.init.zeros_(conv.bias)


def new_loss(cfg: CFWLossConfig, seed: int) -> CFWLoss:
    """The loss with its discriminator, initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CFWLoss(cfg)


@torch.no_grad()
def discriminator_from(loss: CFWLoss, path: str) -> None:
    """A CFW file that carries its discriminator (`loss.discriminator.*`: the official checkpoint, and the
    checkpoints `train cfw` writes) continues with it; otherwise D keeps its fresh initialisation."""
    files = WeightFiles([path])
    found = {k[len(DISCRIMINATOR_PREFIX):]: k for k in files.keys() if k.startswith(DISCRIMINATOR_PREFIX)}
    if not found:
        return
    expected = {k: list(v.shape) for k, v in loss.discriminator.state_dict().items()}
    mismatch = check_keys(expected, {name: files.shape(key) for name, key in found.items()})
    if any(mismatch):
        raise WeightsError(mismatch_message(f"{path}: its {DISCRIMINATOR_PREFIX}* does not fit the PatchGAN", *mismatch))
    loss.discriminator.load_state_dict({name: files.tensor(key) for name, key in found.items()})


# ------------------------------------------------------------------------------------------------------
# One step


def reconstruct(cfw: CFWAutoencoder, lr: torch.Tensor, latent: torch.Tensor,
                scale_factor: torch.Tensor) -> torch.Tensor:
    """x_hat: the sampled latent decoded with the LR's encoder features fused in at w = 1 (Eq. 2).
    lr in [0, 1], (B, 3, h, w); latent in diffusion space, (B, 4, H/8, W/8) -> x_hat (B, 3, H, W)."""
    with torch.no_grad():
        # F_e: the frozen encoder on the LR, bicubic-upsampled (and clamped) as inference upsamples it
        lr_up = upsample(lr * 2 - 1, latent.shape[-2] * cfw.downscale / lr.shape[-2])
        enc_features = cfw.encode_with_features(lr_up)[1]
    # F_m = F_d + C(F_e, F_d; theta) * w, decoding the VAE latent latent / scale_factor
    return cfw.decode(latent / scale_factor, enc_features, W_TRAIN)


class Reconstruction(nn.Module):
    """`reconstruct` as a module: what a training step runs with gradients. With several processes,
    DistributedDataParallel wraps it (processes.distribute): it holds every fusion layer, and DDP leaves the
    frozen rest of the autoencoder (requires_grad False) out of the gradient all-reduce."""

    def __init__(self, cfw: CFWAutoencoder):
        super().__init__()
        self.cfw = cfw

    def forward(self, lr: torch.Tensor, latent: torch.Tensor, scale_factor: torch.Tensor) -> torch.Tensor:
        return reconstruct(self.cfw, lr, latent, scale_factor)


def step_gradients(reconstruction: nn.Module, discriminator: nn.Module, loss: CFWLoss,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch, step: int,
                   device: torch.device, dtype: torch.dtype) -> tuple[float, dict[str, float]]:
    """The gradients of L_G and (from disc_start) L_D on one batch, for one Adam step; `step` = steps taken
    before this one. `reconstruction` and `discriminator` are a Reconstruction and D, or each wrapped for
    several processes. Returns L_G and the other terms for the log.

    Adam keeps its state per parameter, so one Adam over two parameter groups (fusion layers,
    discriminator) is the official pair of Adams with the same settings; a parameter without a gradient
    (the discriminator before disc_start) is left alone. Each loss is sent back only into its own group.
    Two departures from the official Lightning loop, neither in what a step optimises: it runs the decoder
    a second time for the discriminator's pass, after the generator's update, where D here scores this
    step's x_hat (one decoder pass); and before disc_start it runs D and steps D's Adam with zero
    gradients (D's weights stay; its BatchNorm running statistics, never used in training mode, and its
    Adam step count move), where here D does not run, so its Adam bias correction starts at disc_start.

    L_G's adversarial term runs D itself (loss.discriminator), never its wrapper: its gradients go to the
    fusion layers alone, and a wrapped D would wait for gradients of its own that never come.
    """
    lr, gt, latent, scale_factor = (t.to(device) for t in batch)
    target = gt * 2 - 1
    fusion_params, discriminator_params = (group["params"] for group in optimizer.param_groups)
    with autocast(device, dtype):
        x_hat = reconstruction(lr, latent, scale_factor).float()
        g_loss, terms = loss.generator_loss(target, x_hat, step)
    scaler.scale(g_loss).backward(inputs=fusion_params)
    with autocast(device, dtype):
        d_loss = loss.discriminator_loss(target, x_hat, step, discriminator)
    if d_loss is not None:
        scaler.scale(d_loss).backward(inputs=discriminator_params)
        terms["d_loss"] = d_loss.item()
    return g_loss.item(), terms


# ------------------------------------------------------------------------------------------------------
# The command


@dataclass
class CFWOptions(RunOptions):  # val_every: validation L1 losses (w = 1); kept: a resumed run keeps it (options.py)
    command = "train cfw"
    cfw_base: str | None = kept(None, path=True)  # a CFW, VAE or SD 2.x safetensors file
    data: list[str] | None = kept(None, path=True)  # folders written by `train cfw-data`
    batch_size: int = kept(8)  # samples per step (official: 1 with 8 accumulated)
    lr: float = kept(5e-5)  # Adam learning rate of the fusion layers and the discriminator (official 5e-5)
    disc_start: int = kept(501)  # steps before the adversarial terms switch on (official 501)
    hue_rotation: float = kept(0.0)  # probability of turning a sample's LR and GT (not its latent) by a random
    #                                  hue (CFWSamples; not official: 0)


def check_options(opts: CFWOptions) -> None:
    check_option_ranges(opts, ("steps", "batch_size"), ("disc_start", "save_every", "val_every"), ("lr",))


def train_cfw(opts: CFWOptions, procs: Processes | None = None, state: TrainState | None = None) -> str:
    """Train the fusion layers for `opts.steps` steps in all, in this process of the run (None: this process,
    or every process of a torchrun); with `opts.resume`, continue the run in `opts.out` (`state`: its state, if
    read already; `run_folder.resume_options` gives the options to continue it with). Returns how it ended:
    run_folder.FINISHED, STOPPED or TERMINATED (stopped by a signal, and saved).

        train_cfw(CFWOptions(out="runs/cfw", steps=1000, cfw_base="v2-1_512-ema-pruned.safetensors", data=["cfw_data"]))
    """
    if procs is None:
        with torchrun_processes(opts.device, out=opts.out) as procs:
            return train_cfw(opts, procs, state)
    check_options(opts)
    check_same_options(procs, opts)
    run = RunFolder(opts.out, opts.command, resume=opts.resume, writer=procs.is_main, restart=opts.restart)
    device = procs.device
    dtype = pick_dtype(opts.dtype, device)
    seeds = derive_seeds(opts.seed, ["data", "init", "discriminator"])
    if opts.resume and state is None:
        state = run.load_state()
        check_resumed_with_its_options(opts, state)

    # The model: the run's last checkpoint, or the base file; the samples: each rank its own order
    if state:
        cfw, cfg = load_cfw(run.checkpoint_path), resolve_config(WeightFiles([run.checkpoint_path]), None)
    else:
        cfw, cfg = load_cfw_base(opts.cfw_base, seeds["init"])
    samples = CFWSamples(opts.data, opts.batch_size, rank_seed(seeds["data"], procs.rank), cfw.downscale,
                         cfg.cfw.embed_dim, opts.hue_rotation)
    cfw.to(device)
    trainable = prepare_for_training(cfw)
    loss = new_loss(CFWLossConfig(disc_start=opts.disc_start), seeds["discriminator"])
    if not state:
        discriminator_from(loss, opts.cfw_base)
    loss.to(device)

    # Adam as the official (betas 0.5, 0.9, no weight decay), one parameter group per network; no noise stream;
    # a resumed run continues from its state
    optimizer = torch.optim.Adam([{"params": list(trainable.values())},
                                  {"params": list(loss.discriminator.parameters())}], lr=opts.lr, betas=(0.5, 0.9))
    scaler = loss_scaler(dtype)
    trained = trained_tensors(trainable, loss)
    step, seconds = restore_run(state, run, procs, trained, optimizer, scaler, None, samples) if state else (0, 0.0)

    # Each network that learns wrapped alone, so that its gradients are averaged over the processes
    reconstruction = distribute(Reconstruction(cfw), procs)
    discriminator = distribute(loss.discriminator, procs)

    # A fixed batch for val_l1, the first samples (rank 0 measures it)
    validation = None
    if opts.val_every and procs.is_main:
        validation = samples.load(list(range(min(opts.batch_size, len(samples.samples)))))

    n_trainable = sum(p.numel() for p in trainable.values())
    n_frozen = sum(p.numel() for p in cfw.parameters()) - n_trainable
    if procs.is_main:
        print(f"train cfw: {len(samples.samples)} samples of {samples.gt_size[1]}x{samples.gt_size[0]}; "
              f"{n_trainable / 1e6:.2f} M trainable parameters, {n_frozen / 1e6:.2f} M frozen; global batch "
              f"{opts.batch_size * procs.world_size} = {opts.batch_size} per process x {procs.world_size} "
              f"process(es); adversarial from step {opts.disc_start + 1} of the log; {device}, {opts.dtype}; "
              f"steps {step} -> {opts.steps}" + (f"; hue rotation p = {opts.hue_rotation:g}" if opts.hue_rotation else ""),
              file=sys.stderr)

    def save(step: int, seconds: float) -> None:
        trained = trained_tensors(trainable, loss)
        state = snapshot(step, seconds, persisting(opts), trained, optimizer, scaler,
                         None, samples, procs)
        if procs.is_main:  # the checkpoint carries D as the official one does (`loss.` keys, which loading ignores)
            run.save(cfw.state_dict() | trained, config_metadata(cfg.to_json()), state)

    # The loop (Sec. 3.2): a batch of (LR, GT, sampled latent), L_G (and L_D from disc_start), one Adam step
    with Loop(opts.command, run, opts, procs, step, seconds, "lower --batch-size, or use --dtype bfloat16") as loop:
        while loop.running():
            optimizer.zero_grad(set_to_none=True)
            g_loss, terms = step_gradients(reconstruction, discriminator, loss, optimizer, scaler,
                                           samples.next_batch(), loop.step, device, dtype)
            g_loss = loop.mean_finite_loss(g_loss)
            scaler.step(optimizer)
            scaler.update()
            record = loop.count_step(g_loss, **terms)
            if loop.validation_due():
                with autocast(device, dtype):
                    record["val_l1"] = validation_l1(cfw, validation, device)
            loop.finish_step(record)
            loop.save_if_due(save)
    return loop.outcome


@torch.no_grad()
def validation_l1(cfw: CFWAutoencoder, batch, device: torch.device) -> float:
    """mean |GT - x_hat| on a fixed batch (the first samples): the same inputs at every measurement (run
    under the run's autocast)."""
    lr, gt, latent, scale_factor = (t.to(device) for t in batch)
    reconstruction = reconstruct(cfw, lr, latent, scale_factor).float()
    return (gt * 2 - 1 - reconstruction).abs().mean().item()
