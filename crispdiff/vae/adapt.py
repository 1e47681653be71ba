"""Fitting the VAE to the user's images before the UNet learns its latents (``--adapt_vae``).

Why: a latent diffusion model can be no better than its VAE's reconstructions, and the embedded VAE was trained on
Noto emoji. On a design family it never saw (flat colours, black outlines) it reconstructs far less faithfully and
loses much of the images' high-frequency energy, so even a perfect UNet would sample soft, smeared images. A short
fine-tune on the user's own images with the embedded VAE's own recipe (L1 + spectral-amplitude loss, KL 1e-6,
decoder noise; its card has the whole recipe) recovers most of the gap in a short run, because the weights only need
to adapt, not learn.

The check comes first: a seeded held-out sample of the user's images is reconstructed, and ``auto`` adapts only
when that falls below :data:`MIN_PSNR` or :data:`MIN_HF_RATIO`. The fine-tune is a ``crispdiff.vae.trainer``
run of its own in ``OUTPUT_DIR/vae-adapted`` (checkpointed and resumable like every trainer); its ``vae/`` folder is
what the latent cache is encoded with and what the saved pipeline carries.

The adaptation is a fixed cost in front of the UNet, so it is sized to the run (:func:`adaptation_steps`): a short
run gets a short adaptation, and a smoke run of a few UNet steps stays a smoke run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from crispdiff.train.loop import EpochBatches, run_trainer
from crispdiff.train.optimization import images_per_optimizer_step, total_train_steps
from crispdiff.vae.config import VAE_SUBFOLDER, VAETrainConfig
from crispdiff.vae.evaluation import holdout_split, reconstruction_metrics
from crispdiff.vae.trainer import VAETrainer

#: ``--adapt_vae`` choices: never, when the VAE misses the bar on the user's images, or always.
ADAPT_VAE_CHOICES = ("off", "auto", "always")

#: The bar ``auto`` holds the VAE to on a held-out sample of the user's images: below either, it adapts. The embedded
#: VAE clears it on held-out Noto emoji, the design family it was trained on, and misses it on other families.
MIN_PSNR = 28.0
MIN_HF_RATIO = 0.85

#: With ``--time_budget_minutes``: the share of the remaining budget the adaptation gets, and its step cap as a
#: multiple of ``--adapt_vae_steps``.
BUDGET_SHARE = 0.3
BUDGET_MAX_STEPS_FACTOR = 4

#: Without a time budget and without an explicit ``--adapt_vae_steps``, the adaptation sees at most one image for every
#: this many the UNet trains on. The main job's 700 steps of 64 images allow 175 steps of 16, so the default 150 run
#: whole; a 6-step smoke run of 64 images gets one.
UNET_IMAGES_PER_ADAPTATION_IMAGE = 16

#: Where the adaptation run lives inside the latent trainer's output folder.
ADAPTED_VAE_DIR = "vae-adapted"

#: Share of the images held out to judge the VAE (before and after adapting), and the most it holds out.
HOLDOUT_FRACTION = 0.05
MAX_HOLDOUT_IMAGES = 256

#: The embedded VAE's fine-tuning recipe (crispdiff/assets/vae-noto-f4/README.md), shortened: same losses and
#: decoder noise, a constant learning rate after a short warm-up.
ADAPTATION_RECIPE: dict[str, Any] = {
    "recon_loss": "l1",
    "kl_weight": 1e-6,
    "spectral_weight": 40.0,
    "decoder_noise": 0.6,
    "train_batch_size": 16,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 20,
    "adam_beta2": 0.99,
    "ema_decay": 0.999,
}


def adapted_vae_dir(config: Any) -> Path:
    """``OUTPUT_DIR/vae-adapted/vae``: the adapted VAE once the adaptation run has finished."""
    return Path(config.output_dir) / ADAPTED_VAE_DIR / VAE_SUBFOLDER


def holdout_fraction(num_images: int) -> float:
    """The share of ``num_images`` held out: 5 %, at most :data:`MAX_HOLDOUT_IMAGES` images (a reconstruction pass
    over them runs before and after adapting)."""
    return min(HOLDOUT_FRACTION, MAX_HOLDOUT_IMAGES / max(1, num_images))


def adaptation_config(config: Any, steps: int, num_images: int) -> VAETrainConfig:
    """The ``train_vae.py`` run that adapts ``config``'s VAE to its ``num_images`` images (same data flags, seed)."""
    data_flags = (
        "dataset_name",
        "dataset_config_name",
        "train_data_dir",
        "image_column",
        "cache_dir",
        "resolution",
        "interpolation",
        "background",
        "min_image_size",
        "max_train_samples",
        "random_flip",
    )
    loop_flags = ("seed", "mixed_precision", "cpu_threads", "deterministic", "checkpointing_steps")
    return VAETrainConfig(
        **{name: getattr(config, name) for name in data_flags + loop_flags},
        **ADAPTATION_RECIPE,
        center_crop=True,  # the latent cache encodes centre crops: adapt on what it will encode
        output_dir=str(Path(config.output_dir) / ADAPTED_VAE_DIR),
        overwrite_output_dir=True,
        pretrained_vae_name_or_path=str(config.resolved_vae_path()),
        learning_rate=config.adapt_vae_learning_rate,
        max_train_steps=steps,
        validation_fraction=holdout_fraction(num_images),
        validation_steps=0,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest" if config.resume_from_checkpoint else None,
        report_to="none",
    )


def holdout_images(data: Any, seed: int) -> Any:
    """The seeded held-out sample (uint8 centre crops) the VAE is judged on: the adaptation run never trains on it."""
    _, held, _ = holdout_split(data, holdout_fraction(len(data)), seed)
    return data.center_crops(held)


def misses_bar(metrics: dict[str, float]) -> bool:
    """Whether reconstructions this good call for adaptation under ``--adapt_vae auto``."""
    return metrics["psnr"] < MIN_PSNR or metrics["hf_energy_ratio"] < MIN_HF_RATIO


def describe_fit(metrics: dict[str, float]) -> str:
    return f"PSNR {metrics['psnr']:.1f} dB, high-frequency ratio {metrics['hf_energy_ratio']:.2f}"


def adaptation_steps(config: Any, num_images: int, num_processes: int) -> tuple[int, str]:
    """The adaptation's steps for this run, and why (for the log line).

    ``--adapt_vae_steps`` given on the command line is run as given. Otherwise its default is capped so the
    adaptation sees at most one image for every :data:`UNET_IMAGES_PER_ADAPTATION_IMAGE` the UNet will train on (at
    least one step): a fixed 150 steps would dwarf a short run.
    """
    if "adapt_vae_steps" in getattr(config, "explicit_flags", frozenset()):
        return config.adapt_vae_steps, "--adapt_vae_steps"
    batches = EpochBatches(num_images, config.train_batch_size, num_processes, 0, config.seed).batches_per_epoch
    unet_steps = total_train_steps(config, batches)
    unet_images = unet_steps * images_per_optimizer_step(config, num_processes)
    images_per_step = ADAPTATION_RECIPE["train_batch_size"] * num_processes
    allowed = max(1, unet_images // (UNET_IMAGES_PER_ADAPTATION_IMAGE * images_per_step))
    run = f"the UNet's {unet_steps} steps of {images_per_optimizer_step(config, num_processes)} images"
    if allowed >= config.adapt_vae_steps:
        return config.adapt_vae_steps, f"the default; {run} allow up to {allowed}"
    return allowed, (
        f"at most one image for every {UNET_IMAGES_PER_ADAPTATION_IMAGE} of {run}; --adapt_vae_steps runs a given count"
    )


def run_adaptation(
    vae_config: VAETrainConfig, data: Any, accelerator: Any, deadline: float | None = None
) -> tuple[Path, dict[str, float], int]:
    """Fine-tune as ``vae_config`` says on ``data``; returns the VAE folder, its held-out metrics and the steps run.

    Runs on every process (the VAE trainer is distributed like the others) as a stage on the process's
    ``Accelerator``, released when it ends (``crispdiff.train.process.release_stage``), so its model and optimizer never
    enter the UNet's checkpoints; its own checkpoints live in its own folder. ``deadline`` (a ``time.perf_counter()``
    value) stops it early: its learning rate is constant after warm-up, so stopping anywhere leaves a finished model.
    """
    vae_config = vae_config.resolve()
    trainer = VAETrainer(vae_config, data, accelerator)
    trainer.deadline = deadline
    folder = run_trainer(trainer, end_run=False)
    return Path(vae_config.output_dir) / VAE_SUBFOLDER, (trainer.last_metrics if folder else {}), trainer.step


def adapted_steps(folder: Path) -> int | None:
    """The steps a finished adaptation run took (its ``vae_summary.json``), or None."""
    summary = folder.parent / "vae_summary.json"
    return int(json.loads(summary.read_text())["steps"]) if summary.is_file() else None


def prepare_vae(config: Any, data: Any, accelerator: Any, budget: Any = None) -> tuple[Any, int | None]:
    """The VAE the latent trainer encodes with: ``config``'s, or its adaptation to ``data`` (``--adapt_vae``); and
    the steps the adaptation ran (None when there was none), for the run's resolved config (``adapt_vae_steps``,
    saved so the run can be repeated exactly).

    ``data`` are the training images (centre crops); ``accelerator`` is the process's ``Accelerator``, which runs the
    adaptation as a stage of its own. A resumed run (``--resume_from_checkpoint``) whose adaptation had finished
    reuses it instead of adapting again. With a ``budget`` (``--time_budget_minutes``) the adaptation gets
    :data:`BUDGET_SHARE` of what is left of it, at most ``--adapt_vae_steps`` x :data:`BUDGET_MAX_STEPS_FACTOR` steps;
    without one, :func:`adaptation_steps` sizes it to the UNet's run.
    """
    from crispdiff.latent.vae import load_vae

    if config.adapt_vae == "off":
        return load_vae(config.pretrained_vae_name_or_path), None
    adapted = adapted_vae_dir(config)
    if config.resume_from_checkpoint and (adapted / "config.json").is_file():
        accelerator.print(f"crispdiff: reusing the VAE adapted to your images in {adapted}")
        return load_vae(str(adapted)), adapted_steps(adapted)
    vae = load_vae(config.pretrained_vae_name_or_path)
    before = reconstruction_metrics(vae.to(accelerator.device), holdout_images(data, config.seed))
    if config.adapt_vae == "auto" and not misses_bar(before):
        accelerator.print(
            f"crispdiff: the VAE fits your images ({describe_fit(before)} on held-out images); not adapting it"
        )
        return vae, None
    source = config.resolved_vae_path()
    deadline = None
    if budget is not None:
        length = f"{BUDGET_SHARE:.0%} of the time budget"
        deadline = time.perf_counter() + BUDGET_SHARE * budget.remaining()
        steps = config.adapt_vae_steps * BUDGET_MAX_STEPS_FACTOR
    else:
        steps, why = adaptation_steps(config, len(data), accelerator.num_processes)
        length = f"{steps} step{'s' if steps != 1 else ''} of {ADAPTATION_RECIPE['train_batch_size']} images ({why})"
    accelerator.print(
        f"crispdiff: adapting the VAE ({source}) to your images for {length}: held-out {describe_fit(before)}"
        + (f", below the bar of {MIN_PSNR:g} dB / {MIN_HF_RATIO:g}" if config.adapt_vae == "auto" else "")
    )
    vae_config = adaptation_config(config, steps, len(data))
    folder, after, steps_run = run_adaptation(vae_config, data, accelerator, deadline)
    if after:
        accelerator.print(
            f"crispdiff: VAE adapted: held-out {describe_fit(before)} -> {describe_fit(after)} ({folder})"
        )
    return load_vae(str(folder)), steps_run
