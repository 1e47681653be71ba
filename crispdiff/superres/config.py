"""The flags of ``train_sr.py`` (``SRTrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from crispdiff.core.config import CROPS_DRAWN_ANEW, NO_CAPTIONS, DataConfig, LoopConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import Condition, flag
from crispdiff.train.gan import PatchDiscriminator

#: Networks spandrel ships and detects from their weights alone; ``num_feat`` / ``num_blocks`` size each.
ARCHITECTURES = ("compact", "safmn", "span")
SR_SUBFOLDER = "sr_model"
#: Flags that act only with the adversarial loss on (--gan_weight > 0).
GAN_FLAGS = (
    "gan_start_step",
    "feature_matching_weight",
    "disc_channels",
    "disc_layers",
    "disc_learning_rate",
    "unpaired_data_dir",
)


@dataclass
class SRTrainConfig(DataConfig, LoopConfig):
    """Everything `train_scripts/train_sr.py` accepts."""

    refused_flags: ClassVar[dict[str, str]] = {"caption_column": NO_CAPTIONS, "random_crop_positions": CROPS_DRAWN_ANEW}
    conditional_flags: ClassVar[dict[str, Condition]] = {
        **{
            name: (lambda c: c.vae_roundtrip_prob > 0, "--vae_roundtrip_prob")
            for name in ("pretrained_vae_name_or_path", "vae_latent_noise")
        },
        **{
            name: (lambda c: c.gan_weight > 0, "--gan_weight")
            for name in GAN_FLAGS
        },
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
    input_blur_max: float = flag(
        0.0,
        "Blur each training input with a Gaussian of std drawn uniformly in [0, this] input pixels (0 = off): a "
        "diffusion model's samples are softer than a clean downscale, and the network learns to sharpen them.",
    )
    init_sr_model_name_or_path: str | None = flag(
        None,
        "Start the network from this SR model (an sr_model/ folder, a pipeline folder holding one, a weights file, "
        "or 'embedded') instead of from scratch; --architecture, --scale, --num_feat and --num_blocks are read from "
        "it. Fine-tuning a pixel-loss model with --gan_weight is Real-ESRGAN's recipe.",
    )
    init_weight_blend: float = flag(
        1.0,
        "Save (1 - this) x the --init_sr_model_name_or_path weights + this x the trained ones (ESRGAN's network "
        "interpolation; 1 = the trained network alone). Between a pixel-loss model and its GAN fine-tune it trades "
        "restored detail against fidelity on clean inputs without another run.",
    )
    gan_weight: float = flag(
        0.0,
        "Weight of the adversarial loss (hinge, a patch discriminator judging the SR output against the real "
        "high-resolution crops), added to the pixel and FFT losses (0 = off). A pixel loss returns the average of "
        "the sharp images that fit the input, which is blur; the adversarial term asks for one of them.",
    )
    gan_start_step: int = flag(
        0,
        "Optimizer step at which the adversarial terms start; before it the network learns from the pixel and FFT "
        "losses alone (a pixel-loss warm-up, as Real-ESRGAN trains its PSNR model first).",
    )
    feature_matching_weight: float = flag(
        0.0,
        "Weight of feature matching (0 = off): L1 between the discriminator's features of the SR output and of the "
        "real crop (pix2pixHD). A perceptual loss learned on your images that needs no downloaded network.",
    )
    disc_channels: int = flag(
        32,
        "Channels of the discriminator's first layer (each strided layer doubles them). Lighter than train_vae.py's "
        "default: it judges a small network's crops, and its cost adds to every step.",
    )
    disc_layers: int = flag(
        2,
        "Strided layers of the PatchGAN discriminator: 2 judges patches of 34 px of the output (local texture, which "
        "is what SR adds), 3 patches of 70 px.",
    )
    disc_learning_rate: float | None = flag(None, "Discriminator learning rate (default: --learning_rate).")
    unpaired_data_dir: str | None = flag(
        None,
        "A folder of low-resolution images, --resolution / --scale px square, with no originals: e.g. a diffusion "
        "model's own samples. Each step the network also upscales as many random crops of them as "
        "--train_batch_size, and only the adversarial term judges those, so it learns to sharpen the inputs it "
        "will really get.",
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

    NON_NEGATIVE: ClassVar[tuple[str, ...]] = (
        "input_blur_max",
        "gan_weight",
        "gan_start_step",
        "feature_matching_weight",
    )

    def fill_and_check(self) -> None:
        """Reject flag combinations that would fail later or silently train something else."""
        if not 0.0 <= self.vae_roundtrip_prob <= 1.0:
            raise ValueError(f"--vae_roundtrip_prob must be in [0, 1], got {self.vae_roundtrip_prob}")
        if self.vae_latent_noise < 0 or self.fft_weight < 0:
            raise ValueError("--vae_latent_noise and --fft_weight must be >= 0")
        negative = [name for name in self.NON_NEGATIVE if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"{', '.join('--' + name for name in negative)} must be >= 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.num_feat < 1 or self.num_blocks < 1:
            raise ValueError("--num_feat and --num_blocks must be >= 1")
        if not 0.0 <= self.init_weight_blend <= 1.0:
            raise ValueError(f"--init_weight_blend must be in [0, 1], got {self.init_weight_blend}")
        if self.init_weight_blend != 1.0 and not self.init_sr_model_name_or_path:
            raise ValueError("--init_weight_blend blends with the starting model: pass --init_sr_model_name_or_path")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError("--disc_channels and --disc_layers must be >= 1")
        self.check_geometry()
        augmentations = self.pixel_augmentations()
        if augmentations:
            raise ValueError(f"{', '.join(augmentations)} would change the targets the SR model learns; drop them")

    def check_geometry(self) -> None:
        """Scale, resolution, crops and the discriminator's depth fit together (again once an --init_sr model has
        set the scale)."""
        if self.scale not in (2, 3, 4):
            raise ValueError(f"--scale must be 2, 3 or 4, got {self.scale}")
        if self.resolution % self.scale:
            raise ValueError(f"--resolution {self.resolution} must be a multiple of --scale {self.scale}")
        if not 4 <= self.crop_size <= self.resolution // self.scale:
            raise ValueError(
                f"--crop_size {self.crop_size} must be between 4 and --resolution / --scale = "
                f"{self.resolution // self.scale} (the input size)"
            )
        target = self.crop_size * self.scale
        if self.gan_weight > 0 and PatchDiscriminator.logits_side(target, self.disc_layers) < 1:
            raise ValueError(
                f"--disc_layers {self.disc_layers} is too deep for the {target} px target crops (--crop_size x "
                "--scale): use fewer layers or larger crops"
            )

    def with_init_model(self, settings: dict[str, Any]) -> SRTrainConfig:
        """This config with the network settings an --init_sr_model_name_or_path model has; a flag the user gave
        that disagrees with the model is refused by name."""
        for name, value in settings.items():
            if name in getattr(self, "explicit_flags", frozenset()) and getattr(self, name) != value:
                raise FlagError(
                    f"--{name} {getattr(self, name)} disagrees with --init_sr_model_name_or_path "
                    f"{self.init_sr_model_name_or_path}, whose {name} is {value}; drop --{name} (it is read from the "
                    "model)"
                )
        adopted = self.with_values(**settings)
        try:
            adopted.check_geometry()
        except ValueError as error:
            raise FlagError(f"with --init_sr_model_name_or_path {self.init_sr_model_name_or_path}: {error}") from error
        return adopted
