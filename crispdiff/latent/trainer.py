"""Latent diffusion (the main job): the UNet trains on a frozen VAE's latents instead of pixels.

Why latents: a 64 px emoji is 3x64x64 = 12,288 numbers; the embedded f=4 VAE turns it into 8x16x16 = 2,048. The same
UNet then does ~16x less work per image, and the decoder — trained on the same images — draws the fine edges, so
samples are sharper for the same compute. The pieces:

- ``LatentTrainConfig``: the pixel trainer's flags plus the VAE's, with defaults for the main job (``accelerate
  launch train_scripts/train_latent.py`` with no arguments: embedded emoji, embedded VAE, a few minutes on a CPU);
- ``LatentSpace`` (:mod:`crispdiff.latent.space`): the latents the UNet trains on, drawn from the cached posterior
  (``crispdiff.latent.cache``) and scaled to unit variance;
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

from crispdiff.core.config import (
    AUTO_CLASS_COLUMN,
    NO_CLASS_COLUMN,
    SHIFTABLE_SCHEDULES,
    TrainConfig,
)
from crispdiff.core.flags import Condition, flag
from crispdiff.latent.cache import DTYPES
from crispdiff.latent.space import build_latent_space
from crispdiff.latent.vae import (
    EMBEDDED_VAE_SHARPEN_AMOUNT,
    EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED,
    embedded_vae_dir,
)
from crispdiff.train.time_budget import ModelRung

__all__ = ["LatentTrainConfig", "train_latent"]

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
#: budget affords at least its ``min_steps``: a bigger UNet pays off only when it gets enough steps, so the medium one
#: starts where it matched the small one at an equal budget, and the large one is meant for GPU budgets.
MAIN_JOB_LADDER = (
    ModelRung("small", {"base_channels": 32, "channel_mults": [1, 2, 4], "layers_per_block": 1, "attention_res": [4]}),
    ModelRung(
        "medium",
        {"base_channels": 48, "channel_mults": [1, 2, 4], "layers_per_block": 1, "attention_res": [4]},
        min_steps=3000,
    ),
    ModelRung(
        "large",
        {"base_channels": 64, "channel_mults": [1, 2, 4], "layers_per_block": 2, "attention_res": [8, 4]},
        min_steps=8000,
    ),
)


#: Why the latent trainer refuses --streaming.
STREAMING_NEEDS_THE_CACHE = (
    "train_latent.py encodes every image once into its latent cache and checks (or adapts) the VAE and measures the "
    "latent scaling on the images before training, which a stream cannot give; stream with train_unconditional.py "
    "--streaming (pixel space), or let the image and latent caches be built in parts by every process "
    "(accelerate launch)"
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
        **{name: why for name, why in TrainConfig.refused_flags.items() if name != "random_crop_positions"},
        "streaming": STREAMING_NEEDS_THE_CACHE,
        "shuffle_buffer_size": STREAMING_NEEDS_THE_CACHE,
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
        # --mixed_precision auto is already this machine's choice (resolve_given_flags runs first)
        given = getattr(self, "explicit_flags", frozenset())
        steps_given = bool(given & {"max_train_steps", "num_epochs"})
        if self.mixed_precision == "bf16" and self.max_train_steps == MAIN_JOB_STEPS and not steps_given:
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


def auto_classes_note(data: Any) -> str:
    """What ``--class_column auto`` made, and the metadata columns the user could condition on instead."""
    columns = sorted({key for row in data.metadata or [] for key in row} - {"file_name", "text"})
    hint = f"; to condition on your own labels instead pass --class_column with one of {columns}" if columns else ""
    return (
        f"crispdiff: {len(data.class_names)} auto classes: clusters of your {len(data)} images (--num_auto_classes), "
        f"sampled in their mix when the pipeline is called without labels{hint}"
    )


def train_latent(config: LatentTrainConfig) -> Path | None:
    """The latent trainer: images -> VAE (checked on them, adapted if asked) -> latent cache (every process encodes
    its share of the chunks, the main one records it) -> the training loop.

    Returns the pipeline folder on the main process (``None`` elsewhere). The run's one ``Accelerator`` is made
    first and handed to each stage (the VAE adaptation, the time-budget probe, the UNet); ``config`` is resolved once
    here, and what the stages decide before the loop (the adaptation's steps, a learning rate that follows the
    epochs' steps, the budget's steps and UNet) goes into the resolved config the UNet stage saves and reads.
    """
    from crispdiff.data.loading import load_images
    from crispdiff.train.loop import check_output_dir
    from crispdiff.train.optimization import epochs_to_steps
    from crispdiff.train.process import start_process
    from crispdiff.train.time_budget import TimeBudget
    from crispdiff.train.unet_trainer import train
    from crispdiff.vae.adapt import prepare_vae

    budget = TimeBudget(config.time_budget_minutes) if config.time_budget_minutes else None
    config = config.resolve()
    check_output_dir(config)  # fail before spending minutes on encoding
    accelerator = start_process(config)  # kernels set before CUDA is first used (the VAE check / adaptation use it)
    show_progress = accelerator.is_local_main_process
    # every process decodes its share of the image cache (or finds it whole); each makes the same auto classes
    data = load_images(config, for_latents=True, show_progress=show_progress, processes=accelerator)
    if config.class_column == AUTO_CLASS_COLUMN and data.class_names:  # too few images: unlabelled, with a warning
        accelerator.print(auto_classes_note(data))
    vae, adapt_vae_steps = prepare_vae(config, data, accelerator, budget)
    decided: dict[str, Any] = {} if adapt_vae_steps is None else {"adapt_vae_steps": adapt_vae_steps}
    vae = vae.to(accelerator.device)
    space = build_latent_space(config, vae, data=data, show_progress=show_progress, processes=accelerator)
    if not config.max_train_steps:  # --num_epochs: the default learning rate follows the steps they make
        batches = max(1, len(space) // (config.train_batch_size * accelerator.num_processes))
        decided.update(config.values_for_steps(epochs_to_steps(config, config.num_epochs, batches)))
    return train(config, space, budget, accelerator=accelerator, decided=decided)
