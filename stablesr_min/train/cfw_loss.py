"""The loss that trains CFW's fusion layers (paper Sec. 3.2): L1 to the GT plus a PatchGAN's hinge loss.

The fusion layers C of Eq. 2 (at w = 1) learn to turn the decoding of a latent that sampling produced into
the HR image. The official recipe is the LDM autoencoder's loss (`LPIPSWithDiscriminator`, after Esser et
al. 2021, "Taming Transformers") with `kl_weight 0`, `disc_start 501`, `disc_weight 0.025`:

    L_G = mean |x - x_hat|  +  L_perc(x, x_hat)  +  lambda * [s >= s_0] * ( -mean D(x_hat) )      (generator)
    L_D = [s >= s_0] * 1/2 ( mean relu(1 - D(x)) + mean relu(1 + D(x_hat)) )                      (hinge)

x is the GT in [-1, 1], x_hat the CFW decoder's output, D a 3-layer PatchGAN (Isola et al. 2017) that
scores overlapping patches, s the optimizer step, s_0 = disc_start and lambda = disc_weight.

The perceptual term L_perc is LPIPS (weight 1) in the official recipe. Its small trained linear heads ship
inside the `lpips` package, but they run on a VGG16 ImageNet backbone that is a separate download, which this
project never makes, so the term is left out: `CFWLoss` takes an optional `perceptual(x, x_hat)` callable to
put one back, weighted by `perceptual_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# perceptual(target, reconstruction) -> a loss (any shape; its mean is used), both images in [-1, 1]
Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CFWLossConfig:
    """`LPIPSWithDiscriminator` as `autoencoder_kl_64x64x4_resi.yaml` sets it (taming's defaults elsewhere)."""

    disc_start: int = 501  # optimizer steps s before the adversarial terms switch on (s >= disc_start)
    disc_weight: float = 0.025  # lambda: the generator's adversarial weight (constant, see generator_loss)
    perceptual_weight: float = 1.0  # weight of the perceptual term, when one is given (LPIPS: 1.0)
    disc_layers: int = 3  # PatchGAN: convolutions after the first that widen the features (n_layers)
    disc_channels: int = 64  # PatchGAN: width of the first convolution (ndf)


class PatchDiscriminator(nn.Module):
    """The PatchGAN of pix2pix as taming-transformers builds it (`NLayerDiscriminator`, BatchNorm):

        4x4 conv stride 2 (3 -> 64), LeakyReLU 0.2
        disc_layers x [4x4 conv (no bias), BatchNorm, LeakyReLU 0.2], widths 128, 256, 512 (at most 8 x 64);
            stride 2 except the last, stride 1
        4x4 conv stride 1 (512 -> 1): one logit per overlapping 70x70 patch

    Image (B, 3, H, W) -> logits (B, 1, H/8 - 2, W/8 - 2). Keys are `main.<index>.*`, as the official
    checkpoint's `loss.discriminator.main.*`.
    """

    def __init__(self, cfg: CFWLossConfig, in_channels: int = 3):
        super().__init__()
        width = cfg.disc_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, cfg.disc_layers + 1):
            out = cfg.disc_channels * min(2 ** n, 8)
            stride = 1 if n == cfg.disc_layers else 2
            # BatchNorm has its own shift, so these convolutions have no bias
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.init_like_taming()

    @torch.no_grad()
    def init_like_taming(self) -> None:
        """taming's `weights_init`: conv weights ~ N(0, 0.02) (the two conv biases keep PyTorch's default),
        BatchNorm scales ~ N(1, 0.02) and shifts 0. Draws come from the global generator: seed it."""
        for layer in self.main:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, 0.0, 0.02)
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.normal_(layer.weight, 1.0, 0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.main(image)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))): real patches pushed above +1, fake below -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


class CFWLoss(nn.Module):
    """L_G and L_D above, with the discriminator D as `self.discriminator` (trained alongside the fusion
    layers). D always runs in training mode, as in the official run: BatchNorm normalises with the
    statistics of the batch at hand (real and fake batches separately, as each is its own call)."""

    def __init__(self, cfg: CFWLossConfig | None = None, perceptual: Perceptual | None = None):
        super().__init__()
        self.cfg = cfg or CFWLossConfig()
        self.perceptual = perceptual
        self.discriminator = PatchDiscriminator(self.cfg)

    def adversarial(self, step: int) -> bool:
        """[s >= s_0]: the official `adopt_weight` zeroes the GAN terms while global_step < disc_start."""
        return step >= self.cfg.disc_start

    def generator_loss(self, target: torch.Tensor, reconstruction: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L_G and its terms (as floats, for the log). The L1 term is the mean over every element. The
        official divides that mean once more by the batch size; its batch is 1 (8 batches accumulated), so
        a plain mean over a batch of 8 gives the same balance between the terms as its run."""
        # mean |x - x_hat|
        l1 = (target - reconstruction).abs().mean()
        loss = l1
        terms = {"l1": l1.item()}
        if self.perceptual is not None:
            # L_perc(x, x_hat)
            perceptual = self.perceptual(target, reconstruction).mean()
            loss = loss + self.cfg.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.item()
        adversarial = torch.zeros((), device=reconstruction.device)
        if self.adversarial(step):
            # -mean D(x_hat)
            adversarial = -self.discriminator(reconstruction).mean()
            # lambda is the constant disc_weight. The official code asks for VQGAN's adaptive weight,
            # ||grad L_rec|| / ||grad L_G_adv|| at the decoder's last layer (decoder.conv_out.weight) times
            # disc_weight; that layer is frozen (requires_grad False), so torch.autograd.grad raises a
            # RuntimeError, which `LPIPSWithDiscriminator.forward` catches and answers with 1.0 * disc_weight.
            loss = loss + self.cfg.disc_weight * adversarial
        terms["g_adv"] = adversarial.item()
        return loss, terms

    def discriminator_loss(self, target: torch.Tensor, reconstruction: torch.Tensor, step: int,
                           discriminator: nn.Module | None = None) -> torch.Tensor | None:
        """L_D on the GT and the (detached) reconstruction, scored by `discriminator` (default: D itself; with
        several processes, D wrapped so that its gradients are averaged); None before disc_start, where D
        does not train."""
        if not self.adversarial(step):
            return None
        d = self.discriminator if discriminator is None else discriminator
        return hinge_discriminator_loss(d(target), d(reconstruction.detach()))
