"""The flags of ``train_vae.py`` (``VAETrainConfig``), its size presets, and the output-folder check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from crispdiff.core.config import CROPS_DRAWN_ANEW, NO_CAPTIONS, DataConfig, LoopConfig
from crispdiff.core.flags import Condition, flag

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

    refused_flags: ClassVar[dict[str, str]] = {"caption_column": NO_CAPTIONS, "random_crop_positions": CROPS_DRAWN_ANEW}
    conditional_flags: ClassVar[dict[str, Condition]] = {
        **{
            name: (lambda c: c.disc_start is not None, "--disc_start")
            for name in ("disc_weight", "adaptive_disc_weight", "disc_learning_rate", "disc_channels", "disc_layers")
        },
        "lpips_net": (lambda c: c.lpips_weight > 0, "--lpips_weight"),
    }

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

    def fill_and_check(self) -> None:
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
