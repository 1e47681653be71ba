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

from crispdiff.core.errors import FlagError
from crispdiff.core.images import make_grid, save_image_atomic
from crispdiff.core.io import staging_folder, swap_folder_into_place, write_atomic, write_json_atomic
from crispdiff.core.provenance import public_command, write_provenance
from crispdiff.evaluate.sharpness import sharpness_ratios
from crispdiff.pipelines.sr_model import WEIGHTS_NAME, SpandrelSRModel, SRModelError
from crispdiff.superres.config import SR_SUBFOLDER, SRTrainConfig
from crispdiff.superres.data import SRPairs, UnpairedInputs, downscale, vae_roundtrip
from crispdiff.superres.metrics import bicubic_upscale, compare_upscalers, lanczos_upscale
from crispdiff.superres.networks import (
    as_sr_component,
    build_sr_network,
    ema_network,
    load_initial_weights,
    network_settings,
)
from crispdiff.train.gan import PatchDiscriminator, adversarial_terms, discriminator_param_group, feature_matching_loss
from crispdiff.train.loop import LoopTrainer, check_output_dir, run_trainer
from crispdiff.train.process import start_run
from crispdiff.vae.evaluation import split_indices
from crispdiff.vae.losses import spectral_amplitude_loss

CHARBONNIER_EPS = 1e-3


@torch.no_grad()
def upscale_in_batches(
    network: torch.nn.Module, low_uint8: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """uint8 low-resolution images -> float [0, 1] upscales on the CPU, ``batch_size`` at a time on ``device``."""
    chunks = [low_uint8[i : i + batch_size].to(device).float() / 255.0 for i in range(0, len(low_uint8), batch_size)]
    return torch.cat([network(chunk).float().cpu().clamp(0.0, 1.0) for chunk in chunks])


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

    def __init__(
        self,
        config: SRTrainConfig,
        pairs: SRPairs,
        held_out: SRPairs,
        accelerator: Accelerator,
        source: str,
        unpaired: UnpairedInputs | None = None,
        initial: SpandrelSRModel | None = None,
    ):
        super().__init__(config, accelerator, len(pairs))
        self.pairs, self.held_out, self.source, self.unpaired = pairs, held_out, source, unpaired
        network = build_sr_network(config.architecture, config.scale, config.num_feat, config.num_blocks)
        if initial is not None:
            load_initial_weights(network, initial, str(config.init_sr_model_name_or_path))
        # the starting weights, kept for --init_weight_blend (blended into the saved network at the end)
        self.initial_state = (
            {name: value.detach().clone() for name, value in network.state_dict().items()}
            if initial is not None and config.init_weight_blend != 1.0
            else None
        )
        network = network.to(accelerator.device)  # on its device before the optimizer and EMA are built over it
        self.num_parameters = sum(p.numel() for p in network.parameters())
        trainable: list[Any] = list(network.parameters())
        disc = None
        if config.gan_weight > 0:  # the discriminator: a parameter group of the one optimizer (crispdiff.train.gan)
            disc = PatchDiscriminator(config.disc_channels, config.disc_layers).to(accelerator.device)
            trainable = [{"params": trainable}, discriminator_param_group(disc, config, accelerator.num_processes)]
        self.setup_optimization(network, trainable)
        self.network, self.optimizer = accelerator.prepare(network, self.optimizer)
        self.disc = accelerator.prepare(disc) if disc is not None else None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_adversarial: dict[str, float] = {}
        self.started = time.perf_counter()

    def seed_generators(self, offset: int = 0) -> None:
        """The loop's generators, and the one that draws the unpaired crops (a stream of its own, so the paired
        crops are the same whether unpaired inputs are used or not)."""
        super().seed_generators(offset)
        rank_seed = self.config.seed + 1_000_003 * self.accelerator.process_index + offset
        self.unpaired_generator = torch.Generator().manual_seed(rank_seed + 2)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        extra = {"unpaired": self.unpaired_generator} if self.unpaired is not None else {}
        return {**super().generators, **extra}

    def describe(self) -> str:
        config = self.config
        words = (
            f"SR x{config.scale} {config.architecture} network with {self.num_parameters:,} parameters, "
            f"{len(self.pairs)} training / {len(self.held_out)} held-out images, {config.crop_size} px input crops"
        )
        if self.disc is not None:
            size = sum(p.numel() for p in self.disc.parameters())
            words += f", adversarial loss from step {config.gan_start_step} ({size:,}-parameter discriminator"
            words += f", {len(self.unpaired)} unpaired inputs)" if self.unpaired is not None else ")"
        return words

    def ema_parameters(self) -> Any:
        return self.accelerator.unwrap_model(self.network).parameters()

    def gan_active(self) -> bool:
        return self.disc is not None and self.step >= self.config.gan_start_step

    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward on this process's micro-batch of paired crops (and, with the adversarial loss on,
        of unpaired crops, upscaled in the same forward)."""
        config, accelerator = self.config, self.accelerator
        ids = self.batches.indices(self.position)
        inputs, targets = self.pairs.crops(ids, config.crop_size, self.data_generator, config.random_flip)
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        unpaired = None
        if self.unpaired is not None and self.gan_active():
            unpaired = self.unpaired.crops(
                config.train_batch_size, config.crop_size, self.unpaired_generator, config.random_flip
            ).to(accelerator.device)
        models = [self.network] + ([self.disc] if self.disc is not None else [])
        with accelerator.accumulate(*models):
            outputs = self.network(inputs if unpaired is None else torch.cat([inputs, unpaired]))
            output = outputs[: len(inputs)]
            terms = {"pixel": pixel_loss(output, targets, config.loss)}
            total = terms["pixel"]
            if config.fft_weight > 0:
                terms["fft"] = spectral_amplitude_loss(output, targets)
                total = total + config.fft_weight * terms["fft"]
            if self.gan_active():
                fakes = [output] if unpaired is None else [output, outputs[len(inputs) :]]
                total = total + self.adversarial_loss(terms, targets, fakes)
            accelerator.backward(total)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.network.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {k: v.detach() for k, v in terms.items()}

    def adversarial_loss(
        self, terms: dict[str, torch.Tensor], targets: torch.Tensor, fakes: list[torch.Tensor]
    ) -> torch.Tensor:
        """The generator's weighted adversarial terms (paired SR outputs, then unpaired ones) and feature matching,
        plus the discriminator's hinge loss: one backward pass trains both (``crispdiff.train.gan.adversarial_terms``).
        """
        config = self.config
        adversarial = adversarial_terms(
            self.accelerator, self.disc, targets, fakes, feature_matching=config.feature_matching_weight > 0
        )
        names = ["gan_g", "gan_unpaired"][: len(fakes)]
        loss = adversarial.discriminator
        for name, term in zip(names, adversarial.generator, strict=True):
            terms[name] = term.detach()
            loss = loss + config.gan_weight * term
        if adversarial.feature_matching is not None:
            terms["feature_matching"] = adversarial.feature_matching.detach()
            loss = loss + config.feature_matching_weight * adversarial.feature_matching
        terms["gan_d"] = adversarial.discriminator.detach()
        return loss

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
        if self.disc is not None:
            self.last_adversarial = self.adversarial_validation(network)
        return metrics

    @torch.no_grad()
    def adversarial_validation(self, network: torch.nn.Module) -> dict[str, float]:
        """What the adversarial terms see on held-out images: the discriminator's mean logit on the originals and on
        their SR outputs and feature matching between the two; with unpaired inputs, how sharp their SR outputs are
        beside the held-out originals."""
        config, device = self.config, self.accelerator.device
        disc = self.accelerator.unwrap_model(self.disc)
        real = self.held_out.high.float() / 255.0
        fake = upscale_in_batches(network, self.held_out.low, config.train_batch_size, device)
        sums = torch.zeros(3)
        for start in range(0, len(real), config.train_batch_size):  # batches: the features of all are large
            real_logits, real_features = disc(real[start : start + config.train_batch_size].to(device), True)
            fake_logits, fake_features = disc(fake[start : start + config.train_batch_size].to(device), True)
            matching = feature_matching_loss(fake_features, real_features)
            batch = torch.stack([real_logits.float().mean(), fake_logits.float().mean(), matching]).cpu()
            sums += batch * len(real_logits)
        means = (sums / len(real)).tolist()
        values = dict(zip(("real_logit", "sr_logit", "feature_matching"), means, strict=True))
        line = (
            f"step {self.step}: discriminator logit on held-out originals {values['real_logit']:.3f}, on their SR "
            f"{values['sr_logit']:.3f}; feature matching {values['feature_matching']:.4f}"
        )
        if self.unpaired is not None:
            sharpness = self.unpaired_sharpness(network, real)
            values.update({f"unpaired_{name}_{k}": v for name, ratios in sharpness.items() for k, v in ratios.items()})
            sr, lanczos = sharpness["sr"], sharpness["lanczos"]
            line += (
                f"; unpaired inputs upscaled: hf ratio {sr['hf_energy_ratio']:.3f} (Lanczos "
                f"{lanczos['hf_energy_ratio']:.3f}), Laplacian ratio {sr['laplacian_var_ratio']:.3f} "
                f"({lanczos['laplacian_var_ratio']:.3f})"
            )
        self.accelerator.log({f"val/adversarial/{k}": v for k, v in values.items()}, step=self.step)
        self.accelerator.print(line)
        return values

    def unpaired_sharpness(self, network: torch.nn.Module, originals: torch.Tensor) -> dict[str, dict[str, float]]:
        """hf and Laplacian ratios (1 = as sharp as ``originals``) of the unpaired inputs upscaled by ``network``
        and by Lanczos: what the unpaired adversarial term is for, measured on the inputs it has no originals of."""
        low = self.unpaired.images[: self.config.max_validation_images]
        upscaled = {
            "sr": upscale_in_batches(network, low, self.config.train_batch_size, self.accelerator.device),
            "lanczos": lanczos_upscale(low.float() / 255.0, originals.shape[-1]),
        }
        keys = ("hf_energy_ratio", "laplacian_var_ratio")
        ratios = {name: sharpness_ratios(originals, images) for name, images in upscaled.items()}
        return {name: {k: measured[k] for k in keys} for name, measured in ratios.items()}

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
        if self.initial_state is not None:
            network = blend_with_initial(network, self.initial_state, config.init_weight_blend)
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
            "held_out_adversarial": self.last_adversarial,
            "num_unpaired": len(self.unpaired) if self.unpaired is not None else 0,
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


def blend_with_initial(network: torch.nn.Module, initial: dict[str, torch.Tensor], weight: float) -> torch.nn.Module:
    """``network`` with its tensors set to ``(1 - weight) * initial + weight * trained`` (ESRGAN's network
    interpolation): one knob between the pixel-loss starting model and its GAN fine-tune."""
    state = network.state_dict()
    network.load_state_dict(
        {k: torch.lerp(initial[k].to(v), v, weight) if v.is_floating_point() else v for k, v in state.items()}
    )
    return network


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
    if config.vae_roundtrip_prob and config.vae_latent_noise:
        roundtrip += f" with latent noise of std up to {config.vae_latent_noise}"
    if config.input_blur_max:
        roundtrip += f", blurred by a Gaussian of std up to {config.input_blur_max} input pixels"
    initial = config.init_sr_model_name_or_path
    blend = (
        f" Saved as {1 - config.init_weight_blend:g} x its weights + {config.init_weight_blend:g} x the trained ones "
        "(network interpolation)."
        if config.init_weight_blend != 1.0
        else ""
    )
    initial = f"\n- Started from the SR model {initial}.{blend}" if initial else ""
    return f"""---
tags: [super-resolution, spandrel, crispdiff]
pipeline_tag: image-to-image
---

# {Path(config.output_dir).name}: SR x{config.scale}

A {config.architecture} network ({summary["num_parameters"]:,} parameters, spandrel architecture) trained with
crispdiff's `train_scripts/train_sr.py` to upscale {low} px images to {config.resolution} px.

- Data: {source}, {summary["num_train"]} training images; inputs made by {config.interpolation} downscaling
  (crispdiff's data-pipeline resize){roundtrip}.
- Training: {summary["steps"]} steps of {config.train_batch_size} crops of {config.crop_size} px, EMA {config.use_ema};
  {summary["train_seconds"] / 60:.1f} minutes.{initial}
- Losses: {config.loss} pixel loss, FFT-amplitude weight {config.fft_weight}{adversarial_losses(config, summary)}.

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


def adversarial_losses(config: SRTrainConfig, summary: dict[str, Any]) -> str:
    """The model card's words for the adversarial terms ("" when they are off)."""
    if config.gan_weight <= 0:
        return ""
    words = (
        f";\n  adversarial (hinge) weight {config.gan_weight} from step {config.gan_start_step}, a patch discriminator "
        f"({config.disc_channels} channels, {config.disc_layers} layers)"
    )
    if config.feature_matching_weight > 0:
        words += f", feature-matching weight {config.feature_matching_weight}"
    if summary.get("num_unpaired"):
        words += f";\n  the adversarial term also on {summary['num_unpaired']} unpaired low-resolution inputs"
    return words


def load_initial_model(config: SRTrainConfig) -> tuple[SRTrainConfig, SpandrelSRModel]:
    """The --init_sr_model_name_or_path model, and the config with its architecture, scale and sizes."""
    from crispdiff.superres.load import load_sr_model

    where = str(config.init_sr_model_name_or_path)
    try:
        model = load_sr_model(where)
        return config.with_init_model(network_settings(model, where)), model
    except SRModelError as err:
        raise FlagError(f"--init_sr_model_name_or_path: {err}") from err


def train_sr(config: SRTrainConfig) -> Path | None:
    """Train an SR network as ``config`` says; returns the saved ``sr_model/`` folder on the main process."""
    config = config.resolve()
    initial = None
    if config.init_sr_model_name_or_path:
        config, initial = load_initial_model(config)
    check_output_dir(config, SR_SUBFOLDER, "config.json", "a trained SR model")
    accelerator = start_run(config)
    return run_trainer(build_sr_trainer(config, accelerator, initial))


def build_sr_trainer(
    config: SRTrainConfig, accelerator: Accelerator, initial: SpandrelSRModel | None = None
) -> SRTrainer:
    """The trainer of a resolved config (whose settings an ``initial`` model has set): the images and their pairs,
    VAE round trips, held-out pairs and unpaired inputs."""
    from crispdiff.data.loading import load_images, load_images_of_size

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
    pairs = SRPairs(high[train], low[train], roundtrip, config.vae_roundtrip_prob, config.input_blur_max)
    unpaired = None
    if config.unpaired_data_dir:
        size = config.resolution // config.scale
        images = load_images_of_size(config.unpaired_data_dir, size, config.background, "--unpaired_data_dir")
        unpaired = UnpairedInputs(images)
    held_out = SRPairs(high[held], low[held])
    return SRTrainer(config, pairs, held_out, accelerator, data.source, unpaired, initial)
