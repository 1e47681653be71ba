"""Adversarial training shared by the VAE and SR trainers: the patch discriminator, its hinge losses, the adaptive
weight, pix2pixHD's feature matching, and the arrangement that lets one backward pass train both players.

Why one backward pass: the discriminator is a parameter group of the trainer's one optimizer (under fp16,
accelerate's loss scaler updates inside every optimizer's ``step()``, so a second optimizer would see gradients
already divided by the scale and divide them again), and it is prepared by accelerate, so checkpoints hold its
weights and optimizer state and a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from crispdiff.diffusion.unets import group_norm_groups
from crispdiff.train.optimization import scaled_learning_rate

#: The discriminator's Adam betas (VQGAN's and LDM's), steadier than the generator's against a moving target.
DISCRIMINATOR_BETAS = (0.5, 0.9)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch.

    GroupNorm instead of BatchNorm so the discriminator behaves the same with any batch size and across processes.
    ``return_features`` also returns each layer's activations, which feature matching compares.
    """

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(group_norm_groups([out]), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(
        self, images: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if not return_features:
            return self.net(images)
        features, x = [], images
        for block in self.net:
            x = block(x)
            if isinstance(block, nn.LeakyReLU):
                features.append(x)
        return x, features

    @staticmethod
    def logits_side(size: int, layers: int) -> int:
        """Side of the logit map for ``size`` px inputs (below 1: the images are too small for this depth)."""
        size = size // 2
        for i in range(1, layers + 1):
            size = size // 2 if i < layers else size - 1
        return size - 1


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def feature_matching_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the discriminator's layers of the L1 distance between its features of the fakes and of their paired
    real images (pix2pixHD, Wang et al. 2018), in fp32; the real side is a target only.

    Why: a perceptual loss learned on the data itself, with no downloaded VGG; the discriminator's layers are tuned to
    what tells the two apart, so matching them pulls the output towards the real image's texture, not its average.
    """
    distances = [(f.float() - r.detach().float()).abs().mean() for f, r in zip(fake, real, strict=True)]
    return torch.stack(distances).mean()


def adaptive_gan_weight(
    recon_term: torch.Tensor,
    gan_term: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Scale the GAN loss so its gradient at the decoder's last layer matches the reconstruction gradient's norm.

    Esser et al. 2021 (VQGAN): without it the GAN term either does nothing or dominates, depending on the dataset.
    Under fp16 the two gradients are taken of the losses times ``loss_scale`` (the grad scaler's), as the training
    gradients are: unscaled, small gradients underflow to 0 in fp16 and the weight collapses to 0. The ratio does not
    depend on the scale.
    """
    recon_grad = torch.autograd.grad(recon_term * loss_scale, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_term * loss_scale, last_layer, retain_graph=True)[0]
    weight = recon_grad.float().norm() / (gan_grad.float().norm() + 1e-4 * loss_scale)
    return weight.clamp(0.0, max_weight).detach()


def discriminator_learning_rate(config: Any, num_processes: int) -> float:
    """--disc_learning_rate (default: --learning_rate), scaled by --scale_lr's rule as the generator's LR is: the
    two models see the same batches, so a larger batch scales both."""
    own = config.disc_learning_rate if config.disc_learning_rate is not None else config.learning_rate
    return scaled_learning_rate(dataclasses.replace(config, learning_rate=own), num_processes)


def discriminator_param_group(disc: nn.Module, config: Any, num_processes: int) -> dict[str, Any]:
    """The discriminator's parameter group in the trainer's one optimizer (its own LR and betas)."""
    return {
        "params": list(disc.parameters()),
        "lr": discriminator_learning_rate(config, num_processes),
        "betas": DISCRIMINATOR_BETAS,
    }


class AdversarialTerms(NamedTuple):
    """The losses of one step. ``generator`` (one ``-mean D(fake)`` per group of fakes) and ``feature_matching``
    move only the generator; ``discriminator`` (the hinge loss) moves only the discriminator."""

    generator: list[torch.Tensor]
    discriminator: torch.Tensor
    feature_matching: torch.Tensor | None


def adversarial_terms(
    accelerator: Accelerator,
    disc: nn.Module,
    real: torch.Tensor,
    fakes: list[torch.Tensor],
    feature_matching: bool = False,
) -> AdversarialTerms:
    """Both players' losses for ``real`` images and groups of ``fakes``, arranged so that one backward pass serves
    both.

    The generator's side runs the discriminator with detached weights (``functional_call``), so it moves only the
    generator; the discriminator's side sees detached fakes, so it moves only the discriminator. That second call
    goes through ``disc`` as accelerate prepared it, once per step with everything batched, so distributed wrappers
    see a single forward. With ``feature_matching`` the first group of fakes is paired with ``real`` image by image,
    and the real features come from that same call.
    """
    bare = accelerator.unwrap_model(disc)
    frozen = {name: p.detach() for name, p in bare.named_parameters()}
    sizes = [len(fake) for fake in fakes]
    with accelerator.autocast():
        logits, features = torch.func.functional_call(bare, frozen, (torch.cat(fakes),), {"return_features": True})
    generator = [-chunk.float().mean() for chunk in logits.split(sizes)]
    both, real_features = disc(torch.cat([real, *(fake.detach() for fake in fakes)]), return_features=True)
    discriminator = hinge_discriminator_loss(both[: len(real)], both[len(real) :])
    matching = None
    if feature_matching:
        paired = sizes[0]
        matching = feature_matching_loss([f[:paired] for f in features], [f[: len(real)] for f in real_features])
    return AdversarialTerms(generator, discriminator, matching)
