"""Training an ``AutoencoderKL`` on the user's images (from scratch, or fine-tuning a pretrained decoder).

Why crispdiff trains VAEs at all: latent diffusion on 64-128 px images wants a small, fast autoencoder with a mild
downsampling (f=4) that keeps hard edges, and Stable Diffusion's f=8 VAE blurs small images. diffusers has no VAE
training script, so this module provides one in the same shape as the diffusion trainer: accelerate for devices and
precision, the same deterministic data stream and exact checkpoints (:mod:`crispdiff.train.checkpoint`), EMA weights,
and a diffusers folder at the end that :func:`crispdiff.latent.vae.load_vae` and ``AutoencoderKL.from_pretrained`` both
read.

The objective follows Rombach et al. 2022 (LDM, appendix G): an L1 or L2 reconstruction term, a KL term with a tiny
weight (only enough to keep the latent space smooth), optional LPIPS, and an optional patch-GAN (Isola et al. 2017,
hinge loss, adaptive weight of Esser et al. 2021) switched on after ``--disc_start`` steps. Losses are means per
pixel value, and the KL is summed per image then divided by the number of pixel values, so ``--kl_weight`` means the
same as in LDM's configs (where both terms are sums).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import nn

from crispdiff.core.config import DataConfig, LoopConfig, flag
from crispdiff.core.images import uint8_to_model
from crispdiff.core.io import staging_folder, swap_folder_into_place
from crispdiff.diffusion.unets import group_norm_groups
from crispdiff.latent.vae import (
    load_vae,
    measure_scaling_factor,
    measure_shift_factor,
    read_scaling,
    sample_posterior,
    standardize_latent_channels,
)
from crispdiff.train.loop import LoopTrainer, ema_copy, refuse_to_overwrite, run_trainer, start_run

logger = logging.getLogger("crispdiff")

#: Architecture presets: block_out_channels and layers_per_block. f4 keeps 1/4 of each side (64 px -> 16x16 latents),
#: f8 matches Stable Diffusion's downsampling with narrower levels.
PRESETS: dict[str, tuple[tuple[int, ...], int]] = {
    "f4": ((64, 128, 256), 2),
    "f8": ((64, 128, 256, 256), 2),
}

VAE_SUBFOLDER = "vae"


@dataclass
class VAETrainConfig(DataConfig, LoopConfig):
    """Everything `train_scripts/train_vae.py` accepts."""

    output_dir: str = flag("crispdiff-vae", "Where checkpoints, logs, validation grids and the vae/ folder go.")
    overwrite_output_dir: bool = flag(False, "Allow replacing a finished vae/ folder in --output_dir.")
    pretrained_vae_name_or_path: str | None = flag(
        None, "Start from this AutoencoderKL (Hub id, local folder or pipeline folder) instead of from scratch."
    )
    train_decoder_only: bool = flag(
        False, "With --pretrained_vae_name_or_path: freeze the encoder (latents stay compatible), tune the decoder."
    )
    preset: str = flag("f4", "Architecture preset: f4 (H/4 latents, 3 levels) or f8 (H/8, 4 levels).", ["f4", "f8"])
    block_out_channels: list[int] | None = flag(None, "Channels per level, overriding the preset (one level each).")
    layers_per_block: int | None = flag(
        None,
        "ResNet layers per encoder level, overriding the preset (the decoder has one more). On a pretrained VAE a "
        "larger number deepens it without changing what it encodes or decodes at step 0.",
    )
    latent_channels: int | None = flag(
        None,
        "Latent channels (default 4 from scratch; a pretrained VAE keeps its own, and a larger number widens its "
        "latent without changing what it decodes at step 0).",
    )
    norm_num_groups: int | None = flag(
        None, "GroupNorm groups (default: the largest count <= 32 that divides every level's channels)."
    )
    mid_block_attention: bool = flag(True, "Self-attention in the middle blocks (off = faster, fine for small images).")
    recon_loss: str = flag("l1", "Reconstruction loss.", ["l1", "l2"])
    kl_weight: float = flag(1e-6, "Weight of the KL term (per pixel value, as in LDM).")
    lpips_weight: float = flag(0.0, "Weight of the LPIPS perceptual loss; needs the lpips package and cached weights.")
    lpips_net: str = flag("alex", "LPIPS backbone.", ["alex", "vgg", "squeeze"])
    spectral_weight: float = flag(
        0.0,
        "Weight of the spectral-amplitude L1 loss (0 = off). It penalises missing or extra energy per spatial "
        "frequency whatever its phase, so the decoder stops averaging edges away; a cheap alternative to a GAN.",
    )
    decoder_noise: float = flag(
        0.0,
        "Train the decoder on noisy latents: each image's latent gets Gaussian noise of a std drawn uniformly in "
        "[0, this] (latent units; the standardized embedded VAE's latents have std ~1). 0 = off. A latent diffusion "
        "model's samples are never exactly on the encoder's manifold, and a decoder that only ever saw clean latents "
        "turns their small errors into speckle ('confetti'); with --train_decoder_only the latents stay the same.",
    )
    scale_equivariance_weight: float = flag(
        0.0,
        "Weight of the scale-equivariance loss (0 = off): the latent average-pooled 2x must also decode to the image "
        "average-pooled 2x. It keeps the latent's fine structure tied to the image's instead of free high-frequency "
        "codes, which makes the latent easier for a diffusion model to learn (Skorokhodov et al. 2025, 'Improving "
        "the diffusability of autoencoders'). Costs one extra decode at a quarter of the pixels per step.",
    )
    disc_start: int | None = flag(None, "Optimizer step at which the patch-GAN loss starts (default: no GAN).")
    disc_weight: float = flag(0.5, "Weight of the generator's GAN loss (times the adaptive weight).")
    adaptive_disc_weight: bool = flag(True, "Balance GAN and reconstruction gradients at the decoder's last layer.")
    disc_learning_rate: float | None = flag(None, "Discriminator learning rate (default: --learning_rate).")
    disc_channels: int = flag(64, "Channels of the discriminator's first layer.")
    disc_layers: int = flag(3, "Strided layers of the PatchGAN discriminator.")
    seed: int = flag(0, "Seed for weights, split, data order and posterior samples.")
    train_batch_size: int = flag(16, "Images per process per micro-batch.")
    num_epochs: int = flag(20, "Epochs to train for when --max_train_steps is not given.")
    learning_rate: float = flag(4e-4, "Peak learning rate of the autoencoder.")
    lr_warmup_steps: int = flag(100, "Linear warmup steps.")
    adam_beta2: float = flag(0.99, "AdamW beta2.")
    ema_decay: float = flag(0.999, "Maximum EMA decay.")
    checkpoints_total_limit: int | None = flag(2, "Keep at most this many checkpoints.")
    validation_steps: int = flag(250, "Held-out PSNR/SSIM and a reconstruction grid every N steps.")
    validation_fraction: float = flag(0.05, "Fraction of the images held out for validation (fixed by --seed).")
    holdout_column: str | None = flag(
        None, "A metadata column (e.g. category) whose --holdout_values are held out whole and reported apart."
    )
    holdout_values: list[str] | None = flag(
        None, "Values of --holdout_column never trained on (e.g. 'Activities' 'Food & Drink')."
    )
    num_validation_images: int = flag(8, "Held-out images shown in the reconstruction grid.")
    scaling_samples: int = flag(1024, "Training images encoded to measure the latent scaling_factor / shift_factor.")
    standardize_latents: bool = flag(
        True,
        "Before saving, fold a per-channel standardisation into the quant convolutions (exact: images decode the "
        "same) so every latent channel has mean 0 and std 1, which latent diffusion learns more easily.",
    )

    def validate(self) -> None:
        """Reject flag combinations that would silently do something else than asked."""
        if self.decoder_noise < 0:
            raise ValueError(f"--decoder_noise must be >= 0, got {self.decoder_noise}")
        if self.scale_equivariance_weight < 0:
            raise ValueError(f"--scale_equivariance_weight must be >= 0, got {self.scale_equivariance_weight}")
        if self.scale_equivariance_weight > 0 and self.train_decoder_only:
            raise ValueError(
                "--scale_equivariance_weight shapes the encoder's latents; it does nothing useful with "
                "--train_decoder_only (drop one of them)."
            )
        if bool(self.holdout_column) != bool(self.holdout_values):
            raise ValueError("--holdout_column and --holdout_values go together (a column and the values to hold out).")
        if self.train_decoder_only and not self.pretrained_vae_name_or_path:
            raise ValueError("--train_decoder_only needs --pretrained_vae_name_or_path (there is no encoder to keep).")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.block_out_channels is not None and len(self.block_out_channels) < 2:
            raise ValueError("--block_out_channels needs at least two levels (one downsampling).")
        channels = self.block_out_channels or PRESETS[self.preset][0]
        if self.norm_num_groups and any(c % self.norm_num_groups for c in channels):
            raise ValueError(f"--norm_num_groups {self.norm_num_groups} must divide every level's channels {channels}.")


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_vae(config: VAETrainConfig) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` from the preset, with any explicit overrides, at the training resolution."""
    channels, layers = PRESETS[config.preset]
    channels = tuple(config.block_out_channels or channels)
    layers = config.layers_per_block or layers
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=config.latent_channels or 4,
        norm_num_groups=config.norm_num_groups or group_norm_groups(list(channels)),
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_block_attention,
    )


def initial_vae(config: VAETrainConfig) -> AutoencoderKL:
    """The model to train: pretrained (decoder-only or widened if asked) or from scratch, trainable parts unfrozen."""
    if not config.pretrained_vae_name_or_path:
        return build_vae(config).train()
    vae = load_vae(config.pretrained_vae_name_or_path, torch_dtype=torch.float32)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"--pretrained_vae_name_or_path {config.pretrained_vae_name_or_path!r} is a {type(vae).__name__}; "
            "train_vae.py trains AutoencoderKL models only."
        )
    wanted = config.latent_channels or vae.config.latent_channels
    if wanted != vae.config.latent_channels:
        if config.train_decoder_only:
            raise ValueError("--latent_channels cannot change with --train_decoder_only (the encoder is frozen).")
        vae = widen_latent(vae, wanted)
    if config.layers_per_block and config.layers_per_block != vae.config.layers_per_block:
        vae = deepen(vae, config.layers_per_block)
    vae.train().requires_grad_(True)
    if config.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae


@torch.no_grad()
def widen_latent(vae: AutoencoderKL, latent_channels: int) -> AutoencoderKL:
    """A copy of ``vae`` with more latent channels that decodes exactly as ``vae`` did (function-preserving growth).

    Why: a 4-channel f=4 latent is what loses detail, and retraining from scratch throws away hours of CPU. The new
    channels start as extra encoder outputs (fresh init) that the decoder's first convolution ignores (zero columns),
    and the 1x1 quant convolutions pass them through (identity), so training starts from the old model's quality and
    the gradient teaches the decoder to use the new channels.
    """
    old = vae.config.latent_channels
    if latent_channels < old:
        raise ValueError(
            f"--latent_channels {latent_channels} is smaller than the pretrained VAE's {old}; it can only be widened."
        )
    wide = AutoencoderKL.from_config({**vae.config, "latent_channels": latent_channels})
    source, target = vae.state_dict(), wide.state_dict()
    for name, tensor in source.items():
        if target[name].shape == tensor.shape:
            target[name].copy_(tensor)
    # [mean, logvar] channels: old channel i lands at kept[i]; the others are new (fresh encoder rows)
    kept = torch.tensor([*range(old), *range(latent_channels, latent_channels + old)])
    target["encoder.conv_out.weight"][kept] = source["encoder.conv_out.weight"]
    target["encoder.conv_out.bias"][kept] = source["encoder.conv_out.bias"]
    if vae.quant_conv is not None:  # 1x1 conv over [mean, logvar]
        _grow_1x1(target, "quant_conv", source, kept)
    if vae.post_quant_conv is not None:
        _grow_1x1(target, "post_quant_conv", source, torch.arange(old))
    # the decoder's first convolution ignores the new channels at step 0
    target["decoder.conv_in.weight"].zero_()
    target["decoder.conv_in.weight"][:, :old] = source["decoder.conv_in.weight"]
    wide.load_state_dict(target)
    return wide


@torch.no_grad()
def deepen(vae: AutoencoderKL, layers_per_block: int) -> AutoencoderKL:
    """A copy of ``vae`` with more ResNet layers per level that encodes and decodes exactly as ``vae`` did.

    Why: the f=4 decoder's full-resolution level is narrow, and with a frozen encoder (``--train_decoder_only``) more
    decoder depth is the capacity that can be added without changing a single latent. ``AutoencoderKL`` has one
    ``layers_per_block`` for both halves, so the encoder grows too; every new ResNet is appended after a level's
    existing ones with its last convolution zeroed, which makes it an exact identity (``x + 0``). Frozen, the encoder's
    new layers stay identities; trainable, the decoder's learn from step 0.
    """
    old = vae.config.layers_per_block
    if layers_per_block < old:
        raise ValueError(
            f"--layers_per_block {layers_per_block} is smaller than the pretrained VAE's {old}; "
            "it can only be deepened."
        )
    deep = AutoencoderKL.from_config({**vae.config, "layers_per_block": layers_per_block})
    kept = deep.state_dict()
    missing = set(kept)
    for name, tensor in vae.state_dict().items():
        kept[name].copy_(tensor)
        missing.discard(name)
    for name in missing:  # only the new ResNets' parameters
        if ".conv2." in name:
            kept[name].zero_()
    deep.load_state_dict(kept)
    return deep


class AutoencoderStep(nn.Module):
    """Encode, sample and decode in one ``forward`` so distributed wrappers see a single call.

    Calling ``vae.encode`` / ``vae.decode`` on a DDP-wrapped model would bypass DDP's gradient synchronisation;
    this wrapper is what gets passed to ``accelerator.prepare``. With a frozen encoder the encoding runs without
    building a graph. With ``scale_equivariance`` the same call also decodes the latent pooled 2x (training only).
    """

    def __init__(
        self, vae: AutoencoderKL, frozen_encoder: bool, decoder_noise: float = 0.0, scale_equivariance: bool = False
    ):
        super().__init__()
        self.vae = vae
        self.frozen_encoder = frozen_encoder
        self.decoder_noise = decoder_noise
        self.scale_equivariance = scale_equivariance

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutputs:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            posterior = self.vae.encode(images).latent_dist
        latents = sample_posterior(posterior.mean, posterior.logvar, generator)
        if self.decoder_noise > 0 and self.training:
            latents = add_decoder_noise(latents, self.decoder_noise, generator)
        pooled = None
        if self.scale_equivariance and self.training:
            pooled = self.vae.decode(F.avg_pool2d(latents, 2)).sample
        return AutoencoderOutputs(self.vae.decode(latents).sample, posterior.mean, posterior.logvar, pooled)


class AutoencoderOutputs(NamedTuple):
    """What one training forward returns; ``pooled_reconstruction`` decodes the 2x-pooled latent (or is None)."""

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    pooled_reconstruction: torch.Tensor | None = None


def scale_equivariance_loss(pooled_reconstruction: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Reconstruction loss between the pooled latent's decoding and the images pooled by the same factor.

    A 2x average pool of an f-times-downsampled latent lines up with a 2x pool of the image, so a latent whose
    channels code the image's structure at each position (rather than arbitrary high-frequency codes) satisfies
    both. Latents like that are what a small diffusion model learns fastest.
    """
    factor = images.shape[-1] // pooled_reconstruction.shape[-1]
    return reconstruction_loss(pooled_reconstruction, F.avg_pool2d(images, factor), kind)


def add_decoder_noise(latents: torch.Tensor, max_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """``latents + std * eps`` with one std per image drawn uniformly in [0, max_std] (--decoder_noise).

    Uniform stds keep clean and near-clean latents in every batch, so reconstructions of exact latents stay sharp
    while the decoder learns to map slightly-off latents (a diffusion model's samples) back onto clean images.
    """
    shape = (latents.shape[0],) + (1,) * (latents.dim() - 1)
    std = max_std * torch.rand(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + std * eps


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch.

    GroupNorm instead of BatchNorm so the discriminator behaves the same with any batch size and across processes.
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def load_lpips(config: VAETrainConfig) -> nn.Module | None:
    """LPIPS from the ``lpips`` package when it and its backbone weights are already on this machine, else ``None``.

    Never downloads: the backbone (torchvision's AlexNet/VGG/SqueezeNet) must already sit in torch's hub cache. The
    printed message says why LPIPS is off and how to turn it on.
    """
    if config.lpips_weight <= 0:
        return None
    try:
        import lpips  # noqa: F401
    except ImportError:
        print("LPIPS is off: the lpips package is not installed (pip install lpips); --lpips_weight is ignored.")
        return None
    backbone = {"alex": "alexnet-owt-*.pth", "vgg": "vgg16-*.pth", "squeeze": "squeezenet1_1-*.pth"}[config.lpips_net]
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not list(hub_checkpoints.glob(backbone)):
        print(
            f"LPIPS is off: no cached {config.lpips_net} backbone ({backbone}) in {hub_checkpoints}, and crispdiff "
            "never downloads during training; place the torchvision weights there to enable --lpips_weight."
        )
        return None
    import lpips

    model = lpips.LPIPS(net=config.lpips_net, verbose=False).eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Losses and metrics
# ----------------------------------------------------------------------------------------------------------------------


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error per pixel value, in fp32."""
    diff = reconstruction.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def kl_per_value(mean: torch.Tensor, logvar: torch.Tensor, num_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over each latent, divided by the image's pixel values, averaged over the batch."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    return kl.mean() / num_values


def _grow_1x1(target: dict[str, torch.Tensor], name: str, source: dict[str, torch.Tensor], kept: torch.Tensor) -> None:
    """A widened 1x1 convolution: the old map between the ``kept`` channels, identity on the new ones."""
    weight, bias = target[f"{name}.weight"], target[f"{name}.bias"]
    weight.zero_(), bias.zero_()
    weight[:, :, 0, 0] = torch.eye(weight.shape[0])
    weight[kept[:, None], kept[None, :]] = source[f"{name}.weight"]
    bias[kept] = source[f"{name}.bias"]


def spectral_amplitude_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the images' Fourier amplitudes (orthonormal 2-D FFT per channel), in fp32.

    Why: an L1/L2 pixel loss under uncertainty about where an edge lies is minimised by averaging the candidates,
    which removes high-frequency energy: the blur this VAE exists to avoid. The amplitude spectrum ignores phase
    (position), so it charges the decoder for missing detail even where it cannot place it exactly, as the focal
    frequency loss of Jiang et al. 2021 does, without a discriminator's cost.
    """
    spectrum = torch.fft.rfft2(reconstruction.float(), norm="ortho")
    reference = torch.fft.rfft2(target.float(), norm="ortho")
    amplitude = (spectrum.real.square() + spectrum.imag.square() + 1e-12).sqrt()
    return (amplitude - reference.abs()).abs().mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_gan_weight(
    recon_term: torch.Tensor, gan_term: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """Scale the GAN loss so its gradient at the decoder's last layer matches the reconstruction gradient's norm.

    Esser et al. 2021 (VQGAN): without it the GAN term either does nothing or dominates, depending on the dataset.
    """
    recon_grad = torch.autograd.grad(recon_term, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_term, last_layer, retain_graph=True)[0]
    weight = recon_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (peak 1)."""
    mse = (reconstruction.float() - target.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) of images in [0, 1].

    Computed per channel over the valid region (no padding) and averaged, like scikit-image with
    ``gaussian_weights=True``.
    """
    x, y = reconstruction.double(), target.double()
    channels = x.shape[1]
    taps = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


# ----------------------------------------------------------------------------------------------------------------------
# Data split, reconstruction, grid
# ----------------------------------------------------------------------------------------------------------------------


def split_indices(num_images: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) image indices: a seeded shuffle, the held-out part at least one image when asked for."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    held = 0 if fraction <= 0 or num_images < 2 else min(num_images - 1, max(1, round(num_images * fraction)))
    return order[held:].sort().values, order[:held].sort().values


def holdout_split(
    data: Any, fraction: float, seed: int, column: str | None = None, values: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, held-out, held-out classes): whole classes of ``column`` first, then a seeded ``fraction`` of the rest.

    Holding out whole categories measures whether the VAE generalises to kinds of images it never saw, which a
    random split of near-duplicates (skin-tone variants of one emoji) cannot.
    """
    everything = torch.arange(len(data))
    if not column:
        train, held = split_indices(len(data), fraction, seed)
        return train, held, everything[:0]
    rows = data.metadata
    if rows is None or column not in rows[0]:
        available = sorted(rows[0]) if rows else []
        raise ValueError(f"--holdout_column {column!r} is not a metadata column of the data; available: {available}")
    present = {str(row.get(column)) for row in rows}
    missing = sorted(set(values or []) - present)
    if missing:
        raise ValueError(f"--holdout_values {missing} do not occur in column {column!r}; values: {sorted(present)}")
    in_class = torch.tensor([str(row.get(column)) in set(values or []) for row in rows])
    rest = everything[~in_class]
    train, held = split_indices(len(rest), fraction, seed)
    return rest[train], rest[held], everything[in_class]


uint8_to_m11 = uint8_to_model  # the old name, kept importable


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images_m11: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Deterministic reconstructions (posterior mean) in [-1, 1], in batches, on the VAE's device."""
    param = next(vae.parameters())
    outputs = []
    for chunk in images_m11.split(batch_size):
        latents = vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mean
        outputs.append(vae.decode(latents).sample.float().cpu())
    return torch.cat(outputs).clamp(-1.0, 1.0)


def reconstruction_metrics(vae: AutoencoderKL, images_uint8: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and the two sharpness ratios (reconstruction / original) on [0, 1] pixels.

    PSNR rewards a blurry average; the hf-energy and Laplacian-variance ratios (1 = as sharp as the input) say
    whether the decoder kept the detail, so both kinds are reported together.
    """
    from crispdiff.evaluate.metrics import sharpness_ratios

    target = images_uint8.float() / 255.0
    recon = (reconstruct(vae, uint8_to_m11(images_uint8)) + 1.0) / 2.0
    ratios = sharpness_ratios(target, recon)
    return {
        "psnr": float(psnr(recon, target).mean()),
        "ssim": float(ssim(recon, target).mean()),
        "hf_energy_ratio": ratios["hf_energy_ratio"],
        "laplacian_var_ratio": ratios["laplacian_var_ratio"],
    }


def save_reconstruction_grid(vae: AutoencoderKL, images_uint8: torch.Tensor, path: Path) -> None:
    """A PNG with originals on the top row and their reconstructions below, written atomically."""
    from crispdiff.core.images import make_grid, save_image_atomic

    originals = uint8_to_m11(images_uint8)
    grid = make_grid(torch.cat([originals, reconstruct(vae, originals)]), nrow=len(images_uint8))
    save_image_atomic(grid, path)


# ----------------------------------------------------------------------------------------------------------------------
# Scaling factor and saving
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@torch.no_grad()
def sample_latents(vae: AutoencoderKL, images_uint8: torch.Tensor, seed: int, batch_size: int = 64) -> torch.Tensor:
    """Posterior samples of these images (what a latent diffusion model sees), on the CPU."""
    param = next(vae.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    samples = []
    for chunk in uint8_to_m11(images_uint8).split(batch_size):
        posterior = vae.encode(chunk.to(param.device, param.dtype)).latent_dist
        samples.append(sample_posterior(posterior.mean.float(), posterior.logvar.float(), generator).cpu())
    return torch.cat(samples)


def measure_latent_scaling(
    vae: AutoencoderKL, images_uint8: torch.Tensor, seed: int, batch_size: int = 64
) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from posterior samples of these images (what the diffusion model sees).

    Sampling (not the mean) matches how latent trainers draw their latents; the shift centres them, since a VAE
    trained from scratch has no reason to have zero-mean latents.
    """
    latents = sample_latents(vae, images_uint8, seed, batch_size)
    return measure_scaling_factor(latents), measure_shift_factor(latents)


def save_vae_folder(vae: AutoencoderKL, folder: Path, model_card: str) -> Path:
    """Write config.json + safetensors + README.md into ``folder`` atomically and durably.

    The folder is built beside the target and swapped in by ``crispdiff.core.io.swap_folder_into_place`` (fsynced
    first); the previous VAE is deleted only after the new one is in place, so a crash never leaves neither.
    """
    folder = Path(folder)
    tmp = staging_folder(folder)
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card)
        swap_folder_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def weights_megabytes(folder: Path) -> float:
    """Size of the safetensors weights in a saved folder, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e6


def model_card(config: VAETrainConfig, vae: AutoencoderKL, summary: dict[str, Any], data_source: str) -> str:
    """A short README for the saved VAE: architecture, data, command, held-out metrics, latent scaling."""
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    res = config.resolution
    metrics = summary.get("held_out", {})
    metric_line = (
        f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on {summary['num_held_out']} held-out images "
        "(posterior mean, EMA weights)."
        if metrics
        else "No held-out set (--validation_fraction 0)."
    )
    command = " ".join(summary.get("command", []))
    return f"""---
library_name: diffusers
tags: [autoencoder, vae, crispdiff]
---

# {Path(config.output_dir).name} VAE

A diffusers `AutoencoderKL` trained with crispdiff's `train_scripts/train_vae.py`.

- Architecture: block_out_channels {list(cfg.block_out_channels)}, layers_per_block {cfg.layers_per_block},
  mid-block attention {cfg.get("mid_block_add_attention", True)}, {summary["num_parameters"]:,} parameters;
  downsampling f={factor}: {res}x{res} RGB -> {cfg.latent_channels}x{res // factor}x{res // factor} latents.
- Latent scaling: scaling_factor {cfg.scaling_factor:.6f}, shift_factor {cfg.shift_factor}; diffusion models see
  `(z - shift_factor) * scaling_factor`.
- Data: {data_source}, {res}px, {summary["num_train"]} training images.
- Training: {summary["steps"]} steps of {config.train_batch_size} images, {config.recon_loss} reconstruction,
  KL weight {config.kl_weight}, spectral weight {config.spectral_weight}, decoder noise {config.decoder_noise},
  scale-equivariance weight {config.scale_equivariance_weight}, LPIPS {"on" if summary.get("lpips") else "off"},
  GAN {"from step " + str(config.disc_start) if config.disc_start is not None else "off"}, EMA {config.use_ema};
  {summary["train_seconds"] / 60:.1f} minutes.
- Held-out reconstruction: {metric_line}

Command: `{command}`

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("path/to/this/folder")
```
"""


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(config: VAETrainConfig) -> None:
    refuse_to_overwrite(config, Path(config.output_dir) / VAE_SUBFOLDER, "config.json", "a trained VAE")


class VAETrainer(LoopTrainer):
    """An AutoencoderKL (and optionally a patch discriminator) on held-in images; saves a diffusers VAE folder."""

    config_file = "crispdiff_vae_training.json"
    tracker_name = "crispdiff-vae"
    progress_label = "train vae"

    def __init__(self, config: VAETrainConfig, data: Any, accelerator: Accelerator):
        train_indices, held_out, held_classes = holdout_split(
            data, config.validation_fraction, config.seed, config.holdout_column, config.holdout_values
        )
        super().__init__(config, accelerator, len(train_indices))
        self.data = data
        self.train_indices, self.held_out, self.held_classes = train_indices, held_out, held_classes
        device = accelerator.device

        vae = initial_vae(config)
        self.num_parameters = sum(p.numel() for p in vae.parameters())
        self.initial_scaling = read_scaling(vae) if config.pretrained_vae_name_or_path else (None, None)
        groups: list[dict[str, Any]] = [{"params": [p for p in vae.parameters() if p.requires_grad]}]
        disc = None
        if config.disc_start is not None:
            # One optimizer for both models (the discriminator as its own parameter group): with fp16, accelerate's
            # loss scaler is updated inside every optimizer's step(), so a second optimizer would see gradients
            # already divided by the scale, then divide them again.
            disc = PatchDiscriminator(config.disc_channels, config.disc_layers)
            groups.append(
                {
                    "params": list(disc.parameters()),
                    "lr": config.disc_learning_rate or config.learning_rate,
                    "betas": (0.5, 0.9),
                }
            )
        self.setup_optimization(vae, groups)
        self.model, self.optimizer = accelerator.prepare(
            AutoencoderStep(vae, config.train_decoder_only, config.decoder_noise, config.scale_equivariance_weight > 0),
            self.optimizer,
        )
        self.disc = accelerator.prepare(disc) if disc is not None else None
        self.lpips = load_lpips(config)
        if self.lpips is not None:
            self.lpips.to(device)
        self.last_metrics: dict[str, float] = {}
        self.started = time.perf_counter()

    @property
    def vae(self) -> AutoencoderKL:
        """The bare AutoencoderKL being trained (unwrapped from accelerate's wrappers)."""
        return self.accelerator.unwrap_model(self.model).vae

    def describe(self) -> str:
        return (
            f"VAE with {self.num_parameters:,} parameters, {len(self.train_indices)} training / "
            f"{len(self.held_out)} held-out images"
            + (f", {len(self.held_classes)} in held-out classes" if len(self.held_classes) else "")
        )

    def ema_parameters(self) -> Any:
        return self.vae.parameters()

    def gan_active(self) -> bool:
        return self.disc is not None and self.step >= (self.config.disc_start or 0)

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward pass and every loss term for one micro-batch; ``total`` is what gets back-propagated."""
        config = self.config
        reconstruction, mean, logvar, pooled = self.model(images, self.noise_generator)
        terms = {"rec": reconstruction_loss(reconstruction, images, config.recon_loss)}
        recon_term = terms["rec"]
        if pooled is not None:
            terms["scale_eq"] = scale_equivariance_loss(pooled, images, config.recon_loss)
            recon_term = recon_term + config.scale_equivariance_weight * terms["scale_eq"]
        if config.spectral_weight > 0:
            terms["spectral"] = spectral_amplitude_loss(reconstruction, images)
            recon_term = recon_term + config.spectral_weight * terms["spectral"]
        if not config.train_decoder_only:
            terms["kl"] = kl_per_value(mean, logvar, images[0].numel())
        if self.lpips is not None:
            terms["lpips"] = self.lpips(reconstruction.float(), images.float()).mean()
            recon_term = recon_term + config.lpips_weight * terms["lpips"]
        total = recon_term + config.kl_weight * terms.get("kl", 0.0)
        if self.gan_active():
            total = total + self.gan_terms(terms, recon_term, reconstruction, images)
        terms["total"] = total
        return terms

    def gan_terms(
        self,
        terms: dict[str, torch.Tensor],
        recon_term: torch.Tensor,
        reconstruction: torch.Tensor,
        images: torch.Tensor,
    ) -> torch.Tensor:
        """Generator and discriminator hinge losses, arranged so that one backward pass serves both.

        The generator term runs the discriminator with detached weights (``functional_call``), so it moves only the
        decoder; the discriminator term sees detached reconstructions, so it moves only the discriminator. One
        batched discriminator call keeps distributed wrappers to a single forward per step.
        """
        config = self.config
        disc = self.accelerator.unwrap_model(self.disc)
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        with self.accelerator.autocast():
            generator_term = -torch.func.functional_call(disc, frozen, (reconstruction,)).float().mean()
        weight = torch.tensor(1.0, device=images.device)
        if config.adaptive_disc_weight:
            weight = adaptive_gan_weight(recon_term, generator_term, self.vae.decoder.conv_out.weight)
        logits = self.disc(torch.cat([images, reconstruction.detach()]))
        real, fake = logits.chunk(2)
        terms["gan_g"] = generator_term.detach()
        terms["gan_d"] = hinge_discriminator_loss(real, fake)
        terms["gan_weight"] = weight
        return config.disc_weight * weight * generator_term + terms["gan_d"]

    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward on this process's micro-batch (optimizer step when accumulation is complete)."""
        config, accelerator = self.config, self.accelerator
        indices = self.train_indices[self.batches.indices(self.position)]
        images = self.data.batch(indices, self.data_generator, device=accelerator.device)
        models = [self.model] + ([self.disc] if self.disc is not None else [])
        with accelerator.accumulate(*models):
            terms = self.losses(images)
            accelerator.backward(terms["total"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)  # the autoencoder only
            self.optimizer.step()  # autoencoder and discriminator: one unscale, one scaler update
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {k: v.detach() for k, v in terms.items()}

    def eval_vae(self) -> AutoencoderKL:
        """A standalone fp32 copy with the EMA weights (or the raw ones), for validation and saving."""
        copy = ema_copy(self.vae, self.ema)
        return copy.to(self.accelerator.device).eval().requires_grad_(False)  # from_config builds it in fp32

    def validate(self, vae: AutoencoderKL | None = None) -> dict[str, float]:
        """Held-out PSNR/SSIM/sharpness and a reconstruction grid (main process); returns the metrics.

        Held-out classes (``--holdout_column``) are measured apart, under ``classes/`` keys.
        """
        if not self.accelerator.is_main_process or len(self.held_out) == 0:
            return {}
        vae = vae or self.eval_vae()
        images = self.data.center_crops(self.held_out)
        metrics = reconstruction_metrics(vae, images)
        if len(self.held_classes):
            classes = reconstruction_metrics(vae, self.data.center_crops(self.held_classes))
            metrics.update({f"classes/{k}": v for k, v in classes.items()})
        grid_path = self.output_dir / "validation" / f"step_{self.step:07d}.png"
        shown = torch.linspace(0, len(images) - 1, min(self.config.num_validation_images, len(images))).long()
        save_reconstruction_grid(vae, images[shown], grid_path)  # spread over the set, not its first few files
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
        line = (
            f"step {self.step}: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
            f"hf ratio {metrics['hf_energy_ratio']:.3f}, Laplacian-var ratio {metrics['laplacian_var_ratio']:.3f}"
        )
        if len(self.held_classes):
            line += (
                f"; held-out classes PSNR {metrics['classes/psnr']:.2f} dB, SSIM {metrics['classes/ssim']:.4f}, "
                f"hf ratio {metrics['classes/hf_energy_ratio']:.3f}"
            )
        self.accelerator.print(f"{line} ({grid_path})")
        self.last_metrics = metrics
        return metrics

    def finish(self) -> Path:
        """Measure the latent scaling, validate, and save the vae/ folder with its model card (main process)."""
        config = self.config
        vae = self.eval_vae()
        scale, shift = self.initial_scaling
        if config.train_decoder_only and scale is not None:
            self.accelerator.print("Encoder frozen: keeping the pretrained scaling_factor / shift_factor.")
        else:
            count = min(config.scaling_samples, len(self.train_indices))
            images = self.data.center_crops(self.train_indices[:count])
            if config.standardize_latents and not config.train_decoder_only:
                standardize_latent_channels(vae, sample_latents(vae, images, config.seed))
            scale, shift = measure_latent_scaling(vae, images, config.seed)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        metrics = self.validate(vae)
        summary = {
            "steps": self.step,
            "num_parameters": self.num_parameters,
            "num_train": len(self.train_indices),
            "num_held_out": len(self.held_out),
            "held_out": {k: v for k, v in metrics.items() if not k.startswith("classes/")},
            "held_out_classes": {k[len("classes/") :]: v for k, v in metrics.items() if k.startswith("classes/")},
            "num_held_out_classes": len(self.held_classes),
            "train_seconds": time.perf_counter() - self.started,
            "lpips": self.lpips is not None,
            "scaling_factor": scale,
            "shift_factor": shift,
            "command": [Path(sys.argv[0]).name if sys.argv else "train_vae.py", *sys.argv[1:]],
        }
        folder = save_vae_folder(
            vae.cpu(), self.output_dir / VAE_SUBFOLDER, model_card(config, vae, summary, self.data.source)
        )
        summary["weights_mb"] = weights_megabytes(folder)
        (self.output_dir / "vae_summary.json").write_text(json.dumps(summary, indent=2))
        self.accelerator.print(
            f"VAE saved to {folder} ({summary['weights_mb']:.1f} MB, scaling_factor {scale:.5f}, shift {shift:.5f})."
        )
        return folder


def train_vae(config: VAETrainConfig) -> Path | None:
    """Train (or fine-tune) an AutoencoderKL as ``config`` says; returns the saved vae/ folder on the main process."""
    from crispdiff.data.loading import load_images

    check_output_dir(config)
    accelerator = start_run(config)
    with accelerator.main_process_first():  # the first process builds the decode cache, the others reuse it
        data = load_images(config, show_progress=accelerator.is_local_main_process)
    return run_trainer(VAETrainer(config, data, accelerator))
