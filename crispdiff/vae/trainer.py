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

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from crispdiff.core.io import staging_folder, swap_folder_into_place, write_json_atomic
from crispdiff.core.provenance import public_command, write_provenance
from crispdiff.latent.vae import (
    read_scaling,
    standardize_latent_channels,
)
from crispdiff.train.gan import PatchDiscriminator, adaptive_gan_weight, adversarial_terms, discriminator_param_group
from crispdiff.train.loop import LoopTrainer, ema_copy, run_trainer
from crispdiff.train.loop import check_output_dir as check_output_folder
from crispdiff.train.process import start_run
from crispdiff.vae.config import VAE_SUBFOLDER, VAETrainConfig
from crispdiff.vae.evaluation import (
    holdout_split,
    measure_latent_scaling,
    reconstruction_metrics,
    sample_latents,
    save_reconstruction_grid,
)
from crispdiff.vae.losses import (
    AutoencoderStep,
    kl_per_value,
    reconstruction_loss,
    scale_equivariance_loss,
    spectral_amplitude_loss,
)
from crispdiff.vae.models import initial_vae, load_lpips

logger = logging.getLogger("crispdiff")


def save_vae_folder(vae: AutoencoderKL, folder: Path, model_card: str) -> Path:
    """Write config.json + safetensors + README.md into ``folder`` atomically and durably.

    The folder is built beside the target and swapped in by ``crispdiff.core.io.swap_folder_into_place`` (fsynced
    first); the previous VAE is deleted only after the new one is in place, so a crash never leaves neither.
    """
    folder = Path(folder)
    tmp = staging_folder(folder)
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        write_provenance(tmp)
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

        vae = initial_vae(config).to(device)  # on its device before the optimizer and EMA are built over it
        self.num_parameters = sum(p.numel() for p in vae.parameters())
        self.initial_scaling = read_scaling(vae) if config.pretrained_vae_name_or_path else (None, None)
        groups: list[dict[str, Any]] = [{"params": [p for p in vae.parameters() if p.requires_grad]}]
        disc = None
        if config.disc_start is not None:
            # One optimizer for both models (the discriminator as its own parameter group): with fp16, accelerate's
            # loss scaler is updated inside every optimizer's step(), so a second optimizer would see gradients
            # already divided by the scale, then divide them again.
            disc = PatchDiscriminator(config.disc_channels, config.disc_layers).to(device)
            groups.append(discriminator_param_group(disc, config, accelerator.num_processes))
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
        """Generator and discriminator hinge losses (:func:`crispdiff.train.gan.adversarial_terms`: one backward pass
        serves both), the generator's weighted by --disc_weight times the adaptive weight."""
        config = self.config
        adversarial = adversarial_terms(self.accelerator, self.disc, images, [reconstruction])
        generator_term = adversarial.generator[0]
        weight = torch.tensor(1.0, device=images.device)
        if config.adaptive_disc_weight:
            scaler = self.accelerator.scaler  # fp16 only
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            weight = adaptive_gan_weight(recon_term, generator_term, self.vae.decoder.conv_out.weight, loss_scale=scale)
        terms["gan_g"] = generator_term.detach()
        terms["gan_d"] = adversarial.discriminator
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

    def log_validation(self, vae: AutoencoderKL | None = None) -> dict[str, float]:
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
        metrics = self.log_validation(vae)
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
            "command": public_command(),
        }
        folder = save_vae_folder(
            vae.cpu(), self.output_dir / VAE_SUBFOLDER, model_card(config, vae, summary, self.data.source)
        )
        summary["weights_mb"] = weights_megabytes(folder)
        write_json_atomic(self.output_dir / "vae_summary.json", summary)
        self.accelerator.print(
            f"VAE saved to {folder} ({summary['weights_mb']:.1f} MB, scaling_factor {scale:.5f}, shift {shift:.5f})."
        )
        return folder


def train_vae(config: VAETrainConfig) -> Path | None:
    """Train (or fine-tune) an AutoencoderKL as ``config`` says; returns the saved vae/ folder on the main process."""
    from crispdiff.data.loading import load_images

    config = config.resolve()
    check_output_folder(config, VAE_SUBFOLDER, "config.json", "a trained VAE")
    accelerator = start_run(config)
    # every process decodes its share of the image cache (or finds it whole), the main one records it
    data = load_images(config, show_progress=accelerator.is_local_main_process, processes=accelerator)
    return run_trainer(VAETrainer(config, data, accelerator))
