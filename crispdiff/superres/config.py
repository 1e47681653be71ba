"""The flags of ``train_sr.py`` (``SRTrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crispdiff.core.config import CROPS_DRAWN_ANEW, NO_CAPTIONS, DataConfig, LoopConfig
from crispdiff.core.flags import Condition, flag

#: Networks spandrel ships and detects from their weights alone; ``num_feat`` / ``num_blocks`` size each.
ARCHITECTURES = ("compact", "safmn", "span")
SR_SUBFOLDER = "sr_model"


@dataclass
class SRTrainConfig(DataConfig, LoopConfig):
    """Everything `train_scripts/train_sr.py` accepts."""

    refused_flags: ClassVar[dict[str, str]] = {"caption_column": NO_CAPTIONS, "random_crop_positions": CROPS_DRAWN_ANEW}
    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.vae_roundtrip_prob > 0, "--vae_roundtrip_prob")
        for name in ("pretrained_vae_name_or_path", "vae_latent_noise")
    }

    output_dir: str = flag("crispdiff-sr", "Where checkpoints, logs, the comparison grid and the sr_model/ folder go.")
    overwrite_output_dir: bool = flag(False, "Allow replacing a finished sr_model/ folder in --output_dir.")
    resolution: int = flag(
        128, "Side of the high-resolution images (centre crops): the SR output size; inputs are this / --scale."
    )
    center_crop: bool = flag(True, "Store centre squares of the images (SR pairs are cut from them at random).")
    random_flip: bool = flag(True, "Random horizontal flips and 90-degree turns of each training pair.")
    scale: int = flag(2, "Upscaling factor (2: 64 -> 128 px, 4: 64 -> 256 px).")
    architecture: str = flag(
        "compact",
        "Network: compact (Real-ESRGAN's SRVGGNetCompact: convolutions at the input size, fastest on a CPU), safmn "
        "or span. All three are spandrel architectures, so the saved weights load in spandrel, chaiNNer, ComfyUI.",
        list(ARCHITECTURES),
    )
    num_feat: int = flag(48, "Feature channels of the network.")
    num_blocks: int = flag(8, "Body depth: convolutions (compact) or blocks (safmn; span has a fixed depth).")
    crop_size: int = flag(32, "Side of the low-resolution training crops, in input pixels (the targets are x --scale).")
    loss: str = flag("charbonnier", "Pixel loss.", ["charbonnier", "l1"])
    fft_weight: float = flag(
        0.2,
        "Weight of the Fourier-amplitude L1 term (0 = off): it charges missing high-frequency energy even where the "
        "network cannot place an edge exactly, which a pixel loss alone averages into blur.",
    )
    vae_roundtrip_prob: float = flag(
        0.0,
        "Probability that a training input is the VAE's reconstruction of the low-resolution image instead of the "
        "image itself (0 = off): the SR model then also cleans the artefacts a latent model's decoder leaves.",
    )
    pretrained_vae_name_or_path: str | None = flag(
        None, "The VAE for --vae_roundtrip_prob (default: crispdiff's embedded emoji VAE)."
    )
    vae_latent_noise: float = flag(
        0.0, "Gaussian noise of std up to this (latent units) added before decoding the round-trip inputs."
    )
    validation_fraction: float = flag(0.05, "Fraction of the images held out for validation (fixed by --seed).")
    max_validation_images: int = flag(256, "At most this many held-out images.")
    num_validation_images: int = flag(8, "Held-out images shown in the comparison grid (input, Lanczos, SR, original).")
    train_batch_size: int = flag(32, "Image pairs per process per micro-batch.")
    max_train_steps: int | None = flag(2500, "Optimizer steps to train for (overrides --num_epochs).")
    learning_rate: float = flag(2e-3, "Peak learning rate.")
    lr_warmup_steps: int = flag(100, "Linear warmup steps.")
    ema_decay: float = flag(0.999, "Maximum EMA decay.")
    max_grad_norm: float = flag(0.0, "Gradient clipping norm (0 = off).")
    checkpointing_steps: int = flag(500, "Save a resumable checkpoint every N optimizer steps.")
    validation_steps: int = flag(500, "Held-out PSNR against Lanczos every N steps.")

    def fill_and_check(self) -> None:
        """Reject flag combinations that would fail later or silently train something else."""
        if self.scale not in (2, 3, 4):
            raise ValueError(f"--scale must be 2, 3 or 4, got {self.scale}")
        if self.resolution % self.scale:
            raise ValueError(f"--resolution {self.resolution} must be a multiple of --scale {self.scale}")
        if not 4 <= self.crop_size <= self.resolution // self.scale:
            raise ValueError(
                f"--crop_size {self.crop_size} must be between 4 and --resolution / --scale = "
                f"{self.resolution // self.scale} (the input size)"
            )
        if not 0.0 <= self.vae_roundtrip_prob <= 1.0:
            raise ValueError(f"--vae_roundtrip_prob must be in [0, 1], got {self.vae_roundtrip_prob}")
        if self.vae_latent_noise < 0 or self.fft_weight < 0:
            raise ValueError("--vae_latent_noise and --fft_weight must be >= 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.num_feat < 1 or self.num_blocks < 1:
            raise ValueError("--num_feat and --num_blocks must be >= 1")
        augmentations = self.pixel_augmentations()
        if augmentations:
            raise ValueError(f"{', '.join(augmentations)} would change the targets the SR model learns; drop them")
