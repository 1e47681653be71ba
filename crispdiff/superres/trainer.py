"""``train_sr.py``'s library: a small spandrel-native SR network trained on pairs cut from the user's images.

The same loop as every crispdiff trainer (:mod:`crispdiff.train.loop`): accelerate for devices, precision and
processes, EMA weights, exact checkpoints and resume. The result is ``OUTPUT_DIR/sr_model/``, the pipeline's SR
component folder (spandrel-keyed safetensors + config + a card), which ``crispdiff add-sr``, the trainers'
``--sr_model_name_or_path`` and spandrel's ``ModelLoader`` all read.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from crispdiff.core.images import make_grid, save_image_atomic
from crispdiff.core.io import staging_folder, swap_folder_into_place, write_atomic, write_json_atomic
from crispdiff.core.provenance import public_command, write_provenance
from crispdiff.pipelines.sr_model import WEIGHTS_NAME
from crispdiff.superres.config import SR_SUBFOLDER, SRTrainConfig
from crispdiff.superres.data import SRPairs, downscale, vae_roundtrip
from crispdiff.superres.metrics import bicubic_upscale, compare_upscalers, lanczos_upscale
from crispdiff.superres.networks import as_sr_component, build_sr_network, ema_network
from crispdiff.train.loop import LoopTrainer, check_output_dir, run_trainer
from crispdiff.train.process import start_run
from crispdiff.vae.evaluation import split_indices
from crispdiff.vae.losses import spectral_amplitude_loss

CHARBONNIER_EPS = 1e-3


def pixel_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Charbonnier (a smooth L1, Lai et al. 2017) or L1, per pixel value, in fp32."""
    diff = output.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    return (diff.square() + CHARBONNIER_EPS**2).sqrt().mean()


class SRTrainer(LoopTrainer):
    """An SR network on random paired crops; validates against Lanczos on held-out images, saves ``sr_model/``."""

    config_file = "crispdiff_sr_training.json"
    tracker_name = "crispdiff-sr"
    progress_label = "train sr"

    def __init__(self, config: SRTrainConfig, pairs: SRPairs, held_out: SRPairs, accelerator: Accelerator, source: str):
        super().__init__(config, accelerator, len(pairs))
        self.pairs, self.held_out, self.source = pairs, held_out, source
        network = build_sr_network(config.architecture, config.scale, config.num_feat, config.num_blocks)
        network = network.to(accelerator.device)  # on its device before the optimizer and EMA are built over it
        self.num_parameters = sum(p.numel() for p in network.parameters())
        self.setup_optimization(network, list(network.parameters()))
        self.network, self.optimizer = accelerator.prepare(network, self.optimizer)
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.started = time.perf_counter()

    def describe(self) -> str:
        config = self.config
        return (
            f"SR x{config.scale} {config.architecture} network with {self.num_parameters:,} parameters, "
            f"{len(self.pairs)} training / {len(self.held_out)} held-out images, {config.crop_size} px input crops"
        )

    def ema_parameters(self) -> Any:
        return self.accelerator.unwrap_model(self.network).parameters()

    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward on this process's micro-batch of paired crops."""
        config, accelerator = self.config, self.accelerator
        ids = self.batches.indices(self.position)
        inputs, targets = self.pairs.crops(ids, config.crop_size, self.data_generator, config.random_flip)
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.accumulate(self.network):
            output = self.network(inputs)
            terms = {"pixel": pixel_loss(output, targets, config.loss)}
            total = terms["pixel"]
            if config.fft_weight > 0:
                terms["fft"] = spectral_amplitude_loss(output, targets)
                total = total + config.fft_weight * terms["fft"]
            accelerator.backward(total)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.network.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {k: v.detach() for k, v in terms.items()}

    def eval_network(self) -> torch.nn.Module:
        """A standalone copy with the EMA weights (or the raw ones) for validation and saving."""
        return ema_network(self.accelerator.unwrap_model(self.network), self.ema)

    def log_validation(self, network: torch.nn.Module | None = None) -> dict[str, dict[str, float]]:
        """Held-out PSNR / SSIM / sharpness of SR, Lanczos and bicubic, and a comparison grid (main process)."""
        if not self.accelerator.is_main_process or len(self.held_out) == 0:
            return {}
        network = network or self.eval_network()
        device = self.accelerator.device
        metrics = compare_upscalers(
            lambda x: network(x.to(device)), self.held_out.low, self.held_out.high, self.config.train_batch_size
        )
        self.accelerator.log(
            {f"val/{name}/{k}": v for name, values in metrics.items() for k, v in values.items()}, step=self.step
        )
        grid = self.last_grid = self.save_comparison(
            network, self.output_dir / "validation" / f"step_{self.step:07d}.png"
        )
        sr, lanczos = metrics["sr"], metrics["lanczos"]
        self.accelerator.print(
            f"step {self.step}: held-out PSNR {sr['psnr']:.2f} dB (Lanczos {lanczos['psnr']:.2f}), SSIM "
            f"{sr['ssim']:.4f} ({lanczos['ssim']:.4f}), hf ratio {sr['hf_energy_ratio']:.3f} "
            f"({lanczos['hf_energy_ratio']:.3f}), Laplacian ratio {sr['laplacian_var_ratio']:.3f} "
            f"({lanczos['laplacian_var_ratio']:.3f}) ({grid})"
        )
        self.last_metrics = metrics
        return metrics

    @torch.no_grad()
    def save_comparison(self, network: torch.nn.Module, path: Path) -> Path:
        """Rows of held-out images: input (nearest), bicubic, Lanczos, SR, original."""
        count = min(self.config.num_validation_images, len(self.held_out))
        shown = torch.linspace(0, len(self.held_out) - 1, count).long()
        low01 = self.held_out.low[shown].float() / 255.0
        size = self.held_out.high.shape[-1]
        columns = [
            torch.nn.functional.interpolate(low01, size=(size, size), mode="nearest"),
            bicubic_upscale(low01, size),
            lanczos_upscale(low01, size),
            network(low01.to(self.accelerator.device)).float().cpu().clamp(0.0, 1.0),
            self.held_out.high[shown].float() / 255.0,
        ]
        rows = torch.stack(columns, dim=1).flatten(0, 1)
        return save_image_atomic(make_grid(rows, nrow=len(columns), value_range=(0.0, 1.0), padding=2), path)

    def finish(self) -> Path:
        """Validate the EMA network and save ``sr_model/`` with its card and ``sr_summary.json`` (main process)."""
        config = self.config
        network = self.eval_network()
        metrics = self.log_validation(network)
        if metrics:  # the final network's comparison grid, also kept where users look for it
            grid = self.last_grid.read_bytes()
            write_atomic(self.output_dir / "comparison.png", lambda handle: handle.write(grid), binary=True)
        component = as_sr_component(network.cpu(), source=f"crispdiff train_sr.py ({Path(config.output_dir).name})")
        summary = {
            "steps": self.step,
            "architecture": config.architecture,
            "scale": config.scale,
            "num_feat": config.num_feat,
            "num_blocks": config.num_blocks,
            "num_parameters": self.num_parameters,
            "num_train": len(self.pairs),
            "num_held_out": len(self.held_out),
            "held_out": metrics,
            "train_seconds": time.perf_counter() - self.started,
            "command": public_command(),
        }
        folder = self.output_dir / SR_SUBFOLDER
        tmp = staging_folder(folder)
        try:
            component.save_pretrained(tmp)
            write_provenance(tmp)
            (tmp / "README.md").write_text(model_card(config, summary, self.source))
            swap_folder_into_place(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        summary["weights_mb"] = (folder / WEIGHTS_NAME).stat().st_size / 1e6
        write_json_atomic(self.output_dir / "sr_summary.json", summary)
        self.accelerator.print(f"SR model saved to {folder} ({summary['weights_mb']:.2f} MB).")
        return folder


def model_card(config: SRTrainConfig, summary: dict[str, Any], source: str) -> str:
    """README for the saved SR folder: what it is, the data, the held-out comparison, the command, how to use it."""
    low = config.resolution // config.scale
    rows = "\n".join(
        f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['hf_energy_ratio']:.3f} | {m['laplacian_var_ratio']:.3f} |"
        for name, m in summary["held_out"].items()
    )
    table = (
        "| upscaler | PSNR dB | SSIM | hf ratio | Laplacian ratio |\n| --- | --- | --- | --- | --- |\n" + rows
        if rows
        else "No held-out set (--validation_fraction 0)."
    )
    roundtrip = (
        f", {config.vae_roundtrip_prob:.0%} of them through a VAE round trip" if config.vae_roundtrip_prob else ""
    )
    return f"""---
tags: [super-resolution, spandrel, crispdiff]
pipeline_tag: image-to-image
---

# {Path(config.output_dir).name}: SR x{config.scale}

A {config.architecture} network ({summary["num_parameters"]:,} parameters, spandrel architecture) trained with
crispdiff's `train_scripts/train_sr.py` to upscale {low} px images to {config.resolution} px.

- Data: {source}, {summary["num_train"]} training images; inputs made by {config.interpolation} downscaling
  (crispdiff's data-pipeline resize){roundtrip}.
- Training: {summary["steps"]} steps of {config.train_batch_size} crops of {config.crop_size} px, {config.loss} loss,
  FFT-amplitude weight {config.fft_weight}, EMA {config.use_ema}; {summary["train_seconds"] / 60:.1f} minutes.

Held-out images ({summary["num_held_out"]}), against the {config.resolution} px originals:

{table}

Command: `{" ".join(summary["command"])}`

```bash
crispdiff add-sr path/to/pipeline --sr_model path/to/this/folder   # then pipe(..., upscale=True)
```
```python
import spandrel
model = spandrel.ModelLoader().load_from_file("path/to/this/folder/{WEIGHTS_NAME}")  # scale {config.scale}
```
"""


def train_sr(config: SRTrainConfig) -> Path | None:
    """Train an SR network as ``config`` says; returns the saved ``sr_model/`` folder on the main process."""
    from crispdiff.data.loading import load_images

    config = config.resolve()
    check_output_dir(config, SR_SUBFOLDER, "config.json", "a trained SR model")
    accelerator = start_run(config)
    # every process decodes its share of the image cache (or finds it whole), the main one records it
    data = load_images(config, show_progress=accelerator.is_local_main_process, processes=accelerator)
    high = data.center_crops()
    low = downscale(high, config.scale, config.interpolation)
    train, held = split_indices(len(data), config.validation_fraction, config.seed)
    held = held[: config.max_validation_images]
    roundtrip = None
    if config.vae_roundtrip_prob > 0:
        from crispdiff.latent.vae import load_vae

        vae = load_vae(config.pretrained_vae_name_or_path).to(accelerator.device).eval()
        accelerator.print(f"VAE round trips of {len(train)} training inputs ...")
        roundtrip = vae_roundtrip(vae, low[train], config.vae_latent_noise, config.seed)
        del vae
    pairs = SRPairs(high[train], low[train], roundtrip, config.vae_roundtrip_prob)
    return run_trainer(SRTrainer(config, pairs, SRPairs(high[held], low[held]), accelerator, data.source))
