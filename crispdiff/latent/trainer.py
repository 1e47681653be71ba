"""Latent diffusion (the main job): the UNet trains on a frozen VAE's latents instead of pixels.

Why latents: a 64 px emoji is 3x64x64 = 12,288 numbers; the embedded f=4 VAE turns it into 8x16x16 = 2,048. The same
UNet then does ~16x less work per image, and the decoder — trained on the same images — draws the fine edges, so
samples are sharper for the same compute. The pieces:

- ``LatentTrainConfig``: the pixel trainer's flags plus the VAE's, with defaults for the main job (``accelerate
  launch train_scripts/train_latent.py`` with no arguments: embedded emoji, embedded VAE, a few minutes on a CPU);
- ``LatentSpace``: the ``crispdiff.train.unet_trainer.TrainingSpace`` whose ``x0`` draws ``z = mean + std * eps`` from
  the cached posterior (``crispdiff.latent.cache``), picks the mirror image's latents half the time with
  ``--random_flip``, and scales them to unit variance;
- ``train_latent(config)``: loads the VAE, builds or reuses the cache (rank 0 first), then runs the one training loop.

The VAE is frozen: ``requires_grad_(False)``, eval mode, and its parameters never reach the optimizer. Decoder
fine-tuning is not done here — see ``LatentTrainConfig.fill_and_check`` for why, and ``train_scripts/train_vae.py
--train_decoder_only`` for where it lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from crispdiff.core.config import (
    AUTO_CLASS_COLUMN,
    NO_CLASS_COLUMN,
    SHIFTABLE_SCHEDULES,
    TrainConfig,
    resolve_mixed_precision,
)
from crispdiff.core.flags import Condition, flag
from crispdiff.data.loading import to_device
from crispdiff.latent.cache import DTYPES, LatentCache, load_or_build_latent_cache
from crispdiff.latent.vae import (
    EMBEDDED_VAE_SHARPEN_AMOUNT,
    EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED,
    AnyVAE,
    embedded_vae_dir,
    measure_scaling_factor,
    measure_shift_factor,
    read_scaling,
    sample_posterior,
    scale_latents,
)
from crispdiff.train.time_budget import ModelRung
from crispdiff.train.unet_trainer import ImageDataSpace

__all__ = ["LatentSpace", "LatentTrainConfig", "load_latents", "preprocessing_key", "resolve_scaling", "train_latent"]

#: Posterior samples used to measure the scaling factor when the VAE's config states none (evenly spaced images).
SCALING_SAMPLE_IMAGES = 4096


#: The embedded emoji's metadata column the main job conditions on: Unicode's 90 subcategories (``face-smiling``,
#: ``hand-fingers-open``, ``country-flag``, ...), finer than its 10 categories: at the same cost the finer label
#: brings the samples closer to the data than ``category`` does, and ``category`` closer than no label.
EMBEDDED_CLASS_COLUMN = "subcategory"

#: The latent trainer's default --snr_shift on a cosine / sigmoid schedule: -1 nat (noisier at every t). With AdaGN on
#: the main job it brings the samples a little closer to the data and makes them more often recognisable, at no cost;
#: -2 goes too far.
MAIN_JOB_SNR_SHIFT = -1.0


#: The main job's optimizer steps in fp32, and in bf16 (which costs less per step on machines that run it natively):
#: about the same training time on a CPU either way.
MAIN_JOB_STEPS = 700
MAIN_JOB_BF16_STEPS = 900

#: The default peak learning rate: MAIN_JOB_LR for runs of up to MAIN_JOB_LR_STEPS steps of a UNet of
#: MAIN_JOB_LR_CHANNELS base channels, scaled down by sqrt(steps) beyond that and by the width above it.
MAIN_JOB_LR = 3e-3
MAIN_JOB_LR_STEPS = 1000
MAIN_JOB_LR_CHANNELS = 32


def main_job_learning_rate(steps: int, base_channels: int) -> float:
    """The latent trainer's default peak learning rate for a run of ``steps`` on a UNet of ``base_channels``."""
    length = min(1.0, math.sqrt(MAIN_JOB_LR_STEPS / max(steps, 1)))
    return MAIN_JOB_LR * length * min(1.0, MAIN_JOB_LR_CHANNELS / base_channels)


#: The latent trainer's default classifier-free guidance scale with labels.
MAIN_JOB_GUIDANCE_SCALE = 3.0

#: The latent trainer's default guidance interval (min, max sigma): guidance only at the middle noise levels.
MAIN_JOB_GUIDANCE_INTERVAL = (0.28, 5.42)

#: The UNets ``--time_budget_minutes`` chooses from on the main job's latents, smallest first: each is taken when the
#: budget affords at least its ``min_steps`` (a bigger UNet pays off only when it gets enough steps).
MAIN_JOB_LADDER = (
    ModelRung("small", {"base_channels": 32, "channel_mults": [1, 2, 4], "layers_per_block": 1, "attention_res": [4]}),
    ModelRung(
        "medium",
        {"base_channels": 48, "channel_mults": [1, 2, 4], "layers_per_block": 1, "attention_res": [4]},
        min_steps=1200,
    ),
    ModelRung(
        "large",
        {"base_channels": 64, "channel_mults": [1, 2, 4], "layers_per_block": 2, "attention_res": [8, 4]},
        min_steps=2000,
    ),
)


@dataclass
class LatentTrainConfig(TrainConfig):
    """Everything `train_scripts/train_latent.py` accepts.

    The defaults are the main job: the embedded Noto emoji at 64 px, the embedded f=4 VAE (8x16x16 latents), and a
    UNet and schedule sized to finish, latent encoding included, in a few minutes on a laptop CPU. On a GPU
    use a bigger model and a longer run; each flag's help says what.
    """

    diffusers_script: ClassVar[str | None] = None  # crispdiff's own script: no diffusers defaults to compare with
    model_ladder: ClassVar[tuple[ModelRung, ...]] = MAIN_JOB_LADDER  # what --time_budget_minutes can buy
    # the latent cache encodes crops at fixed positions: --random_crop_positions is this trainer's flag
    refused_flags: ClassVar[dict[str, str]] = {
        name: why for name, why in TrainConfig.refused_flags.items() if name != "random_crop_positions"
    }
    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.adapt_vae != "off", "--adapt_vae auto or always")
        for name in ("adapt_vae_steps", "adapt_vae_learning_rate")
    }

    pretrained_vae_name_or_path: str | None = flag(
        None,
        "The VAE whose latents the UNet learns: a Hub id (e.g. stabilityai/sd-vae-ft-mse), a local diffusers VAE "
        "folder, or a pipeline folder with vae/; AutoencoderKL or AutoencoderTiny. Default: the embedded f=4 VAE "
        "trained on Noto emoji (crispdiff/assets/vae-noto-f4).",
    )
    vae_trainable: str = flag(
        "none",
        "Which VAE parts train. Only 'none' is supported here: the diffusion loss never reaches the decoder. "
        "Fine-tune a decoder with train_scripts/train_vae.py --train_decoder_only and pass the result as "
        "--pretrained_vae_name_or_path.",
        choices=["none", "decoder"],
    )
    adapt_vae: str = flag(
        "auto",
        "Fit the VAE to your images before training the UNet on its latents: `auto` reconstructs a held-out sample of "
        "your images and fine-tunes the VAE on them (the embedded VAE's recipe, decoder noise included) when that "
        "falls below 28 dB PSNR or 0.85 of their high-frequency energy; `always`; `off`. The adapted VAE "
        "(OUTPUT_DIR/vae-adapted/vae) is the one the saved pipeline carries.",
        choices=["off", "auto", "always"],
    )
    adapt_vae_steps: int = flag(
        150,
        "Steps of 16 images for --adapt_vae (default 150: enough to bring the embedded VAE's reconstructions of emoji "
        "of another design family to about the `auto` bar, in a small share of the main job's time). Not given, it "
        "is capped to the run: at most one image for every 16 the UNet trains on (the log says what was chosen); "
        "given, it runs as given.",
    )
    adapt_vae_learning_rate: float = flag(2e-4, "Learning rate of --adapt_vae (the embedded VAE's own).")
    latent_cache_dir: str | None = flag(
        None, "Where encoded latents are cached (default: <--cache_dir or ~/.cache/crispdiff>/latents)."
    )
    latent_cache_dtype: str = flag(
        "float16",
        "Storage precision of cached latents; float16 rounding is far smaller than the posterior noise each "
        "sample carries anyway (see crispdiff/latent/cache.py).",
        choices=sorted(DTYPES),
    )
    vae_batch_size: int = flag(32, "Images per VAE encoder batch while building the latent cache (GPU: 128+).")
    scaling_factor: float | None = flag(
        None,
        "Latent scaling factor override. Default: the VAE config's scaling_factor, or 1/std of the training latents "
        "(plus their mean as shift) when the config states none; the value used is saved in the pipeline.",
    )

    # Defaults for the main job: 64 px emoji -> 8x16x16 latents and a 2.9M-parameter AdaGN UNet, sized so the whole run
    # (1000 images encoded, 700 steps of 64, export and sample grid) keeps README's first command, install included,
    # to a few minutes on a 2-core CPU. Batch 64 trains more images per second than batch 32 on a CPU, and attention
    # only at 4x4 makes a step cheaper; against the longer recipe (1,500 steps of 32, attention at 8 and 4) this gives
    # up a little SWD for a much shorter run. `accelerate launch` without a config gives a CPU process one thread;
    # crispdiff gives it its share of the cores (`--cpu_threads`).
    resolution: int = flag(64, "Training resolution in pixels (square); must be a multiple of the VAE's factor.")
    base_channels: int = flag(
        32, "Channels of the first UNet level (CPU default; on a GPU 128 with --channel_mults 1 2 3 4)."
    )
    channel_mults: list[int] = flag(
        [1, 2, 4], "Channel multiplier per level; 3 levels suit 16x16 latents (16 -> 8 -> 4)."
    )
    attention_res: list[int] = flag(
        [4],
        "LATENT resolutions with self-attention (16x16 latents: levels at 16, 8, 4; CPU default 4, GPU 8 4; "
        "32x32 latents: 16 8).",
    )
    layers_per_block: int = flag(1, "ResNet layers per UNet level (CPU default; 2 on a GPU).")
    resnet_time_scale_shift: str = flag(
        "scale_shift",
        "How the time + class embedding enters each ResNet block: as a scale and shift of its GroupNorm (scale_shift, "
        "AdaGN; the main job's default: stronger class conditioning, so samples closer to the data and far more "
        "often recognisable) or added to its features (default).",
        choices=["default", "scale_shift"],
    )
    dropout: float = flag(0.0, "Dropout inside the ResNet blocks (0.1 for long GPU runs on small datasets).")
    train_batch_size: int = flag(64, "Images per process per micro-batch (CPU default; 128-256 on a GPU).")
    snr_shift: float | None = flag(
        None,
        "Shift the cosine / sigmoid schedule's log-SNR by this many nats at every t (0 = off). Default: -1 (noisier) "
        "with those schedules, 0 with the others: on the 8x16x16 latents of the embedded VAE, -1 spends more of the "
        "training on the noisy steps that decide a sample's layout.",
    )
    max_train_steps: int | None = flag(
        MAIN_JOB_STEPS,
        f"Optimizer steps (CPU default: {MAIN_JOB_STEPS}, or {MAIN_JOB_BF16_STEPS} when the run is in bf16, sized "
        "for a run of a few minutes on a laptop CPU; a GPU run: tens of thousands).",
    )
    mixed_precision: str | None = flag(
        "auto",
        "Mixed precision: `auto` (default) trains in bf16 where this machine runs it natively (a GPU that supports "
        "it, a CPU with AVX512-BF16 or AMX: faster steps, so the default run takes more of them), else in fp32; "
        "or no / fp16 / bf16.",
        choices=["no", "fp16", "bf16", "auto"],
    )
    learning_rate: float | None = flag(
        None,
        f"Peak learning rate. Default: {MAIN_JOB_LR:g} for runs of up to {MAIN_JOB_LR_STEPS} steps of the "
        f"{MAIN_JOB_LR_CHANNELS}-channel UNet, lower for longer runs and wider UNets ({MAIN_JOB_LR:g} x min(1, "
        f"sqrt({MAIN_JOB_LR_STEPS} / steps)) x min(1, {MAIN_JOB_LR_CHANNELS} / base channels)): at a high rate the "
        "AdaGN UNet's gradients grow until they explode on long runs.",
    )
    lr_warmup_steps: int = flag(100, "Linear warmup steps.")
    adam_beta2: float = flag(
        0.99,
        "AdamW beta2. 0.99 (not 0.999): fewer loss spikes at high learning rates, to which the AdaGN UNet at the "
        "main job's learning rate is prone (with 0.999 a run whose LR stays high can jump to a higher loss for good "
        "and sample confetti); a second-moment estimate that follows the gradients' growth faster keeps Adam's steps "
        "from overshooting.",
    )
    ema_power: float = flag(2 / 3, "EMA warmup power (2/3 for runs of a few thousand steps, 3/4 for longer ones).")
    checkpointing_steps: int = flag(500, "Save a resumable checkpoint every N optimizer steps.")
    validation_steps: int = flag(
        1000,
        "Sample a validation grid every N steps (default 1000: the main job's 700 steps end with the pipeline's own "
        "grid only, as a grid of 90 guided classes is a noticeable share of so short a run).",
    )
    output_dir: str = flag("crispdiff-latent", "Where checkpoints, logs, samples and the pipeline folder go.")
    sr_model_name_or_path: str | None = flag(
        "embedded",
        "A super-resolution model saved into the pipeline: 'embedded' (default) is the package's emoji SR x2, carried "
        "by 64 px models and used when asked (pipe(upscale=True), crispdiff sample --upscale); a .pth / "
        ".safetensors file, train_sr.py folder or hub 'repo_id/file' upscales every call; 'none': no SR.",
    )
    class_column: str | None = flag(
        None,
        "Train a class-conditional model on this metadata.jsonl / dataset column; sample a class with classifier-free "
        "guidance (`crispdiff sample --class NAME`). Default: `subcategory` on the embedded emoji (the main job: 90 "
        "classes, one sample-grid tile each, guided); `auto` on your own data: clusters of your images as classes "
        "(--num_auto_classes), sampled in their mix when the pipeline is called without labels; `--class_column none` "
        "turns conditioning off.",
    )

    guidance_scale: float | None = flag(
        None,
        "With a class column: the classifier-free guidance scale saved as the pipeline's default and used for the "
        f"sample grids (1 = the conditional model alone). Default: {MAIN_JOB_GUIDANCE_SCALE:g} with labels; 1 with "
        "auto classes when autoguidance is on (clusters are no names to push samples towards, and autoguidance does "
        f"better alone there), else {MAIN_JOB_GUIDANCE_SCALE:g}.",
    )

    autoguidance_scale: float = flag(
        1.5,
        "Autoguidance (Karras et al. 2024) strength saved as the pipeline's default: every sampling step adds "
        "(w - 1) x (model - guide), where the guide is the same UNet earlier in training (--autoguidance_snapshot); "
        "it needs no labels, works with auto classes and with classifier-free guidance, and makes samples more like "
        "the data. 1 = off.",
    )
    guidance_interval: list[float] | None = flag(
        list(MAIN_JOB_GUIDANCE_INTERVAL),
        "With a class column: guide only at noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in (MIN, MAX] "
        "(Kynkaanniemi et al. 2024), saved as the pipeline's default; the noisiest and the cleanest sampling steps run "
        "the conditional model alone. `0 inf` guides every step.",
    )

    def fill_and_check(self) -> None:
        """Refuse flag combinations the latent trainer cannot honour, with the reason and the alternative."""
        # resolved first so the saved training config states the values used
        if self.sharpen_amount is None:
            autoguided = self.autoguidance_scale != 1
            embedded = EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED if autoguided else EMBEDDED_VAE_SHARPEN_AMOUNT
            self.sharpen_amount = 0.0 if self.pretrained_vae_name_or_path else embedded
        # "none" is kept (not turned into None), so that validating twice (parse_config, then train_latent) cannot
        # turn an explicit "off" into the default
        if self.class_column is None:
            self.class_column = AUTO_CLASS_COLUMN if self.train_data_dir or self.dataset_name else EMBEDDED_CLASS_COLUMN
        elif self.class_column == "":
            self.class_column = NO_CLASS_COLUMN
        if self.snr_shift is None:
            self.snr_shift = MAIN_JOB_SNR_SHIFT if self.beta_schedule in SHIFTABLE_SCHEDULES else 0.0
        if self.guidance_scale is None:
            auto_and_autoguided = self.class_column == AUTO_CLASS_COLUMN and self.autoguidance_scale != 1
            self.guidance_scale = 1.0 if auto_and_autoguided else MAIN_JOB_GUIDANCE_SCALE
        self.mixed_precision = resolve_mixed_precision(self.mixed_precision)
        given = getattr(self, "explicit_flags", frozenset())
        if (
            self.mixed_precision == "bf16"
            and self.max_train_steps == MAIN_JOB_STEPS
            and not given
            & {
                "max_train_steps",
                "num_epochs",
            }
        ):
            self.max_train_steps = MAIN_JOB_BF16_STEPS
        self._default_learning_rate = self.learning_rate is None  # then it follows the steps (values_for_steps)
        if self.max_train_steps:
            self.learning_rate = self.values_for_steps(self.max_train_steps).get("learning_rate", self.learning_rate)
        super().fill_and_check()
        if self.vae_trainable == "decoder":
            raise ValueError(
                "--vae_trainable decoder is not supported by train_latent.py: the UNet learns from cached latents, so "
                "the diffusion loss never reaches the VAE decoder and unfreezing it would change nothing but memory "
                "use. Fine-tune the decoder on your images with `train_scripts/train_vae.py "
                "--pretrained_vae_name_or_path <vae> --train_decoder_only` (the encoder stays frozen, so latents "
                "stay valid), then train here with --pretrained_vae_name_or_path <output>/vae."
            )
        if augmentations := self.pixel_augmentations():
            raise ValueError(
                f"{', '.join(augmentations)}: pixel augmentations; the latent cache encodes every image once, so they "
                "cannot vary per epoch. Drop them (or train in pixel space with train_unconditional.py)."
            )
        if self.adapt_vae_steps < 1:
            raise ValueError(f"--adapt_vae_steps must be >= 1, got {self.adapt_vae_steps}")
        if self.vae_batch_size < 1:
            raise ValueError(f"--vae_batch_size must be >= 1, got {self.vae_batch_size}")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            raise ValueError(f"--scaling_factor must be positive, got {self.scaling_factor}")

    def values_for_steps(self, steps: int) -> dict[str, Any]:
        """The default learning rate follows the run's length and width (``main_job_learning_rate``); a learning
        rate the user chose stays."""
        if not self.__dict__.get("_default_learning_rate", False):
            return {}
        return {"learning_rate": main_job_learning_rate(steps, self.base_channels)}

    def resolved_vae_path(self) -> Path | str:
        """The VAE this config loads: the flag's value, or the embedded default's folder."""
        return self.pretrained_vae_name_or_path or embedded_vae_dir()


def preprocessing_key(config: Any) -> dict[str, Any]:
    """The preprocessing flags that decide a cached latent (with the image cache's own key, part of the cache key)."""
    return {
        "resolution": int(config.resolution),
        "interpolation": str(config.interpolation),
        "background": str(config.background),
        "min_image_size": int(config.min_image_size),
        "crop": "center" if config.center_crop else "random",
    }


def crop_positions(view: Any, data: Any) -> int:
    """Crop positions the latent cache encodes per image: 1 (the centre) with --center_crop or when no image is
    larger than its crop, else --random_crop_positions."""
    if view.center_crop or not data.has_crop_slack():
        return 1
    return int(view.random_crop_positions)


def latent_cache_dir(config: Any) -> Path:
    """``--latent_cache_dir``, else ``latents/`` under crispdiff's cache root."""
    if getattr(config, "latent_cache_dir", None):
        return Path(config.latent_cache_dir).expanduser()
    from crispdiff.data.loading import cache_root

    return cache_root(config) / "latents"


def _statistics_sample(cache: LatentCache, seed: int = 0) -> torch.Tensor:
    """Posterior samples of up to SCALING_SAMPLE_IMAGES evenly spaced images (every variant), with a fixed seed."""
    count = len(cache)
    take = min(count, SCALING_SAMPLE_IMAGES)
    indices = torch.linspace(0, count - 1, take).round().long().unique()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for variant in range(cache.num_variants):
        mean, logvar = cache.posterior(indices, torch.full_like(indices, variant))
        samples.append(sample_posterior(mean, logvar, generator))
    return torch.cat(samples)


def resolve_scaling(vae: AnyVAE, cache: LatentCache, override: float | None = None) -> tuple[float, float | None, str]:
    """``(scaling_factor, shift_factor, where_from)`` for the diffusion space ``(z - shift) * scale``.

    An explicit ``--scaling_factor`` wins (with the config's shift, if any); then the VAE config's stated values;
    otherwise both are measured on the training latents so they have zero mean and unit variance — the LDM recipe,
    without which the noise schedule's signal-to-noise ratios would be off by the latents' scale.
    """
    stated_scale, stated_shift = read_scaling(vae)
    if override is not None:
        return float(override), stated_shift, "--scaling_factor"
    if stated_scale is not None:
        return stated_scale, stated_shift, "the VAE config"
    sample = _statistics_sample(cache)
    shift = stated_shift if stated_shift is not None else measure_shift_factor(sample)
    return measure_scaling_factor(sample), shift, "measured on the training latents"


class LatentSpace(ImageDataSpace):
    """Diffusion on a frozen VAE's scaled latents, sampled from the cached posterior of each image."""

    def __init__(
        self,
        cache: LatentCache,
        vae: AnyVAE,
        data: Any,
        *,
        scaling_factor: float,
        shift_factor: float | None = None,
    ):
        channels, height, width = cache.latent_shape
        if height != width:
            raise ValueError(f"latents of {height}x{width} are not square; crispdiff trains square images only")
        if len(cache) != len(data):
            raise ValueError(f"the latent cache holds {len(cache)} images but the data has {len(data)}")
        super().__init__(data)
        self.cache = cache
        self.vae = vae.eval().requires_grad_(False)  # frozen: no gradients, no optimizer state, no dropout
        self.channels = channels
        self.sample_size = height
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)

    def __len__(self) -> int:
        return len(self.cache)

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]``: variant (flip) and posterior noise drawn from ``generator``.

        One flip draw per image is taken even without flips, so the stream of random numbers does not depend on
        ``--random_flip`` and a resumed run (generator restored) reproduces the same samples bit for bit; with random
        crops (several cached crop positions) one more draw per image picks the crop.
        """
        indices = torch.as_tensor(indices).reshape(-1).cpu()
        coin = torch.rand(indices.numel(), generator=generator, device=generator.device).cpu()
        spec = self.cache.spec
        variants = (coin < 0.5).long() if spec.num_flips == 2 else torch.zeros_like(indices)
        if spec.crop_positions > 1:  # random crops: one of the cached crop positions per image
            pick = torch.rand(indices.numel(), generator=generator, device=generator.device).cpu()
            crops = (pick * spec.crop_positions).long().clamp_(max=spec.crop_positions - 1)
            variants = crops * spec.num_flips + variants
        mean, logvar = self.cache.posterior(indices, variants)
        if mean.device != generator.device:  # latents kept on the GPU (prepare): only the drawn noise travels
            eps = torch.randn(mean.shape, generator=generator, device=generator.device)
            z = mean + torch.exp(0.5 * logvar) * to_device(eps, mean.device)  # = sample_posterior with that noise
        else:
            z = sample_posterior(mean, logvar, generator)
        return scale_latents(z, self.scaling_factor, self.shift_factor).to(device)

    def prepare(self, device: torch.device) -> None:
        """On a GPU, keep the cached posteriors there when they fit (the trainer calls this once)."""
        if device.type != "cpu":
            self.cache.keep_on_device(device)

    def pipeline_components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "latent_scaling_factor": self.scaling_factor,
            "latent_shift_factor": self.shift_factor,
        }


def load_latents(
    view: Any, config: Any, vae: AnyVAE, *, data: Any = None, show_progress: bool = True
) -> tuple[Any, LatentCache]:
    """The images ``view`` describes (centre crops) and their latent cache, encoded once and then reused.

    ``view`` holds the data flags (folder, resolution, flips...) and ``config`` the cache flags; they differ when one
    run trains on several image sets (DreamBooth's instance and class images). ``data``: those images, when the
    caller has already loaded them with ``load_images(view, for_latents=True)``.
    """
    from crispdiff.data.loading import load_images

    if data is None:
        data = load_images(view, for_latents=True, show_progress=show_progress)
    cache = load_or_build_latent_cache(
        data,
        vae,
        latent_cache_dir(config),
        preprocessing=preprocessing_key(view),
        random_flip=bool(view.random_flip),
        dtype=config.latent_cache_dtype,
        batch_size=config.vae_batch_size,
        show_progress=show_progress,
        crop_positions=crop_positions(view, data),
    )
    return data, cache


def build_latent_space(
    config: LatentTrainConfig, vae: AnyVAE, *, data: Any = None, show_progress: bool = True
) -> LatentSpace:
    """Load the images (centre crops; or take ``data``), encode or reuse their latent cache, resolve the scaling."""
    data, cache = load_latents(config, config, vae, data=data, show_progress=show_progress)
    scale, shift, source = resolve_scaling(vae, cache, config.scaling_factor)
    if show_progress:
        state = "reused" if cache.encoded_images == 0 else f"encoded {cache.encoded_images} image(s)"
        shift_text = "" if shift is None else f", shift {shift:.4g}"
        print(  # before train() sets up logging, so print like accelerator.print does
            f"crispdiff: latent cache {cache.folder} ({state}): {len(cache)} x "
            f"{'x'.join(map(str, cache.latent_shape))} latents; scaling factor {scale:.4g}{shift_text} ({source})"
        )
    return LatentSpace(cache, vae, data, scaling_factor=scale, shift_factor=shift)


def auto_classes_note(data: Any) -> str:
    """What ``--class_column auto`` made, and the metadata columns the user could condition on instead."""
    columns = sorted({key for row in data.metadata or [] for key in row} - {"file_name", "text"})
    hint = f"; to condition on your own labels instead pass --class_column with one of {columns}" if columns else ""
    return (
        f"crispdiff: {len(data.class_names)} auto classes: clusters of your {len(data)} images (--num_auto_classes), "
        f"sampled in their mix when the pipeline is called without labels{hint}"
    )


def train_latent(config: LatentTrainConfig) -> Path | None:
    """The latent trainer: images -> VAE (checked on them, adapted if asked) -> latent cache (rank 0 builds it, the
    others wait and reuse it) -> the training loop.

    Returns the pipeline folder on the main process (``None`` elsewhere). The run's one ``Accelerator`` is made
    first and handed to each stage (the VAE adaptation, the time-budget probe, the UNet); ``config`` is resolved once
    here, and what the stages decide before the loop (the adaptation's steps, a learning rate that follows the
    epochs' steps, the budget's steps and UNet) goes into the resolved config the UNet stage saves and reads.
    """
    from crispdiff.data.loading import load_images
    from crispdiff.train.loop import check_output_dir, epochs_to_steps, start_process
    from crispdiff.train.time_budget import TimeBudget
    from crispdiff.train.unet_trainer import train
    from crispdiff.vae.adapt import prepare_vae

    budget = TimeBudget(config.time_budget_minutes) if config.time_budget_minutes else None
    config = config.resolve()
    check_output_dir(config)  # fail before spending minutes on encoding
    accelerator = start_process(config)  # kernels set before CUDA is first used (the VAE check / adaptation use it)
    show_progress = accelerator.is_local_main_process
    with accelerator.main_process_first():  # rank 0 decodes the images (and makes any auto classes) first
        data = load_images(config, for_latents=True, show_progress=show_progress)
    if config.class_column == AUTO_CLASS_COLUMN and data.class_names:  # too few images: unlabelled, with a warning
        accelerator.print(auto_classes_note(data))
    vae, adapt_vae_steps = prepare_vae(config, data, accelerator, budget)
    decided: dict[str, Any] = {} if adapt_vae_steps is None else {"adapt_vae_steps": adapt_vae_steps}
    vae = vae.to(accelerator.device)
    with accelerator.main_process_first():
        space = build_latent_space(config, vae, data=data, show_progress=show_progress)
    if not config.max_train_steps:  # --num_epochs: the default learning rate follows the steps they make
        batches = max(1, len(space) // (config.train_batch_size * accelerator.num_processes))
        decided.update(config.values_for_steps(epochs_to_steps(config, config.num_epochs, batches)))
    return train(config, space, budget, accelerator=accelerator, decided=decided)
