"""The training objective of StableSR's fine-tuning (Sec. 3.1), and of the diffusion prior it starts from.

Paper Sec. 3.1 trains the new layers with the latent diffusion objective, conditioned on the LR image through
the time-aware encoder; in the notation of LDM (Rombach et al. 2022, Eq. 3), with the encoder's features s
as one more condition:

    L = E_{z, z_lr, c, eps ~ N(0, I), t} [ || eps - eps_theta(z_t, t, c, s(z_lr, t)) ||_2^2 ],
    z_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps                               (DDPM, Ho et al. 2020, Eq. 4)

where z = E(GT) and z_lr = E(bicubic-up(LR)) are latents of the frozen VAE, c is the empty prompt's text
context, and eps_theta is the frozen SD UNet whose SFT layers (Eq. 1) apply s. A v-model (parameterization
"v") regresses v = sqrt(ab_t) eps - sqrt(1 - ab_t) z instead of eps. One draw, as the official trainer
computes it (`LatentDiffusionSRTextWT.get_input`, `forward`, `p_losses`):

    z_lr = scale_factor * sample of E(clamp(2 bicubic-up(LR) - 1))        posterior samples, not the mean
    z    = scale_factor * sample of E(2 GT - 1)
    t ~ U{0 .. T-1},  eps ~ N(0, I),  loss = mean of (eps_theta(...) - target)^2

Without z_lr it is the prior's own objective (`train unet`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import StableSR
from .pipeline import draw, upsample
from .schedule import Schedule
from .vae import DiagonalGaussian



def posterior_latent(model: StableSR, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Image in [-1, 1] -> scale_factor * a sample of the VAE posterior (the official trainer samples,
    `get_first_stage_encoding`, for the LR and the GT alike), in float32."""
    posterior = DiagonalGaussian(model.vae.moments(image).float())
    return model.cfg.diffusion.scale_factor * posterior.sample(draw(posterior.mean, generator))


class Denoiser(nn.Module):
    """eps_theta(z_t, t, c, s(z_lr, t)): the UNet conditioned by the time-aware encoder, the networks that
    a training step runs with gradients, as one module. With several processes, DistributedDataParallel
    wraps this module (train.processes.distribute): it holds every trainable parameter, and DDP leaves its
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
        return posterior_latent(model, lr_up, generator), posterior_latent(model, gt * 2 - 1, generator)


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
