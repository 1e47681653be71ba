"""The diffusion trainer: a UNet on a ``TrainingSpace`` (:mod:`crispdiff.train.spaces`: pixels, or latents in
:mod:`crispdiff.latent.trainer`).

Pixel and latent training differ only in where x0 comes from and which extra components the saved pipeline needs;
both are a ``TrainingSpace``, and both run the one loop of :mod:`crispdiff.train.loop`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from crispdiff.core.config import AUTO_CLASS_COLUMN, TrainConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.images import make_grid, save_image_atomic
from crispdiff.core.io import write_json_atomic
from crispdiff.data.auto_classes import class_mix
from crispdiff.diffusion.schedule import NoiseSchedule, sample_noise, schedule_label, scheduler_base_config
from crispdiff.diffusion.unets import count_parameters, describe_parameters, unet_from_config
from crispdiff.publish.card import write_model_card
from crispdiff.publish.export import SAMPLES_NAME, build_pipeline, save_pipeline
from crispdiff.publish.hub import maybe_push_to_hub
from crispdiff.train.augment import (
    apply_transforms,
    augmented_labels,
    check_augment_prob,
    class_embed_count,
    draw_transforms,
    plain_class_embedding,
)
from crispdiff.train.checkpoint import find_checkpoint
from crispdiff.train.grids import TRAIN_PASSES_PER_IMAGE, GridPlan, plan_grid
from crispdiff.train.loop import LoopTrainer, check_output_dir, ema_copy, run_trainer, untouched_rng
from crispdiff.train.optimization import images_per_optimizer_step
from crispdiff.train.process import release_stage, start_process
from crispdiff.train.spaces import TrainingSpace, pixel_space, reference_indices, space_class_names
from crispdiff.train.time_budget import RungCost, agreed_seconds

logger = logging.getLogger("crispdiff")

#: The autoguidance guide model's weights inside a checkpoint folder.
GUIDE_FILE = "guide_unet.safetensors"

#: How many training images the end-of-training checks compare samples with (sharpening calibrations, copy check).
TRAINING_IMAGES_COMPARED = 2000


class UNetTrainer(LoopTrainer):
    """A diffusion UNet on a `TrainingSpace` (pixels or latents), saved as a crispdiff pipeline."""

    def __init__(
        self,
        config: TrainConfig,
        space: TrainingSpace,
        accelerator: Accelerator,
        unet: Any = None,
        trainable: list[torch.nn.Parameter] | None = None,
    ):
        """``unet``: a prebuilt denoiser (e.g. a pretrained one, crispdiff.transfer.trainer) instead of one built from
        the config; ``trainable``: the parameters the optimizer gets (default: all of them; frozen ones stay as
        given)."""
        super().__init__(config, accelerator, len(space))
        self.space = space
        device = accelerator.device
        self.class_names = space_class_names(space)
        if self.class_names and not 0.0 <= config.class_dropout_prob < 1.0:
            raise FlagError(f"--class_dropout_prob must be within [0, 1), got {config.class_dropout_prob}")
        num_classes = len(self.class_names or [])
        check_augment_prob(config.augment_prob, num_classes)
        # the classes + the null class (id N last), for every transform with --augment_prob (crispdiff.train.augment)
        num_class_embeds = class_embed_count(num_classes, config.augment_prob) if self.class_names else None
        if unet is None:
            unet = unet_from_config(
                config, resolution=space.sample_size, in_channels=space.channels, num_class_embeds=num_class_embeds
            )
        elif getattr(unet.config, "num_class_embeds", None) != num_class_embeds:
            raise FlagError(
                f"the given UNet has num_class_embeds={getattr(unet.config, 'num_class_embeds', None)} but the data "
                f"has {num_classes} classes (--class_column), which need "
                f"{num_class_embeds} (the classes + the null class"
                + (", for each of --augment_prob's transforms)" if config.augment_prob > 0 else ")")
            )
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        unet = unet.to(device)  # before the optimizer: fused AdamW must see its parameters on the device
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        self.num_parameters = count_parameters(unet)
        # .to() above kept the Parameter objects, so a `trainable` list made before it still names them
        self.setup_optimization(unet, list(unet.parameters()) if trainable is None else list(trainable))
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        if config.torch_compile:
            # in place (nn.Module.compile): state-dict keys, EMA, checkpoints and the saved pipeline are unchanged
            accelerator.unwrap_model(self.unet).compile(backend=config.torch_compile_backend)
        self.schedule = NoiseSchedule.from_config(config).to(device)
        self.guide_unet: UNet2DModel | None = None
        self.guide_step = autoguidance_guide_step(config, self.max_steps)
        if self.guide_step is not None:
            accelerator.register_save_state_pre_hook(self._save_guide)
            accelerator.register_load_state_pre_hook(self._load_guide)
        prepare = getattr(space, "prepare", None)
        if callable(prepare):  # e.g. keep the uint8 images on the GPU when they fit
            prepare(device)

    def describe(self) -> str:
        auto = " auto" if self.config.class_column == AUTO_CLASS_COLUMN else ""
        classes = f", {len(self.class_names)}{auto} classes" if self.class_names else ""
        items = getattr(self.space, "items_description", f"{len(self.space)} training items")
        return f"{items}{classes}, UNet with {describe_parameters(self.num_parameters)}"

    def class_labels(self, indices: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The micro-batch's class ids, each replaced by the null id N with probability --class_dropout_prob.

        The dropout coin comes from the noise generator (checkpointed), so a resumed run drops the same labels.
        None for an unconditional space.
        """
        if not self.class_names:
            return None
        labels = self.space.class_labels(indices, device)
        drop = torch.rand(batch_size, generator=self.noise_generator, device=self.noise_generator.device).to(device)
        return torch.where(drop < self.config.class_dropout_prob, len(self.class_names), labels)

    def ema_parameters(self) -> Any:
        return self.accelerator.unwrap_model(self.unet).parameters()

    def process_state(self) -> dict[str, Any]:
        """The space's own per-process state (a ``--streaming`` stream's position), if it has one."""
        own = getattr(self.space, "process_state", None)
        return own() if callable(own) else {}

    def restore_process_state(self, state: dict[str, Any]) -> None:
        restore = getattr(self.space, "restore_process_state", None)
        if callable(restore):
            restore(state)

    def training_batch(self) -> dict[str, Any]:
        """This process's micro-batch as the loss sees it: ``x0`` (transformed with ``--augment_prob``), ``noise``,
        timesteps ``t``, the noised ``x_t`` made from that ``x0``, and the UNet's class ``labels`` (or None)."""
        config, device = self.config, self.accelerator.device
        indices = self.batches.indices(self.position)
        x0 = self.space.x0(indices, self.data_generator, device)
        noise = sample_noise(tuple(x0.shape), self.noise_generator, device, config.noise_offset)
        t = self.schedule.sample_timesteps(
            x0.shape[0], self.noise_generator, device, config.weighting_scheme, config.logit_mean, config.logit_std
        )
        labels = self.class_labels(indices, x0.shape[0], device)
        if config.augment_prob > 0:  # drawn only when on, so runs without it keep their random streams
            transforms = draw_transforms(x0.shape[0], config.augment_prob, self.noise_generator)
            x0 = apply_transforms(x0, transforms)
            labels = augmented_labels(labels, transforms, len(self.class_names))
        x_t = self.schedule.add_noise(x0, noise, t)  # after the transform: input and target show the same image
        return {"x0": x0, "noise": noise, "t": t, "x_t": x_t, "labels": labels}

    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward on this process's micro-batch; returns the (unscaled) loss."""
        config = self.config
        batch = self.training_batch()
        x0, noise, t, x_t, labels = (batch[k] for k in ("x0", "noise", "t", "x_t", "labels"))
        if self.accelerator.device.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with self.accelerator.accumulate(self.unet):
            model_output = self.unet(x_t, t, class_labels=labels).sample
            loss = self.schedule.loss(model_output, x0, noise, t, config.snr_gamma)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {"loss": loss.detach()}

    def optimizer_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step; at ``--autoguidance_snapshot`` of the run, keep the EMA weights as the guide model
        (before any checkpoint of this step is written, so a resumed run has it)."""
        losses = super().optimizer_step()
        if self.step == self.guide_step:
            with untouched_rng():  # building the copy initialises weights from the global RNG (dropout's)
                self.guide_unet = self.sampling_unet()
        return losses

    def _save_guide(self, models: Any, weights: Any, folder: str) -> None:
        """accelerate's save-state hook: the guide model, once taken, goes into the checkpoint (safetensors)."""
        if self.guide_unet is not None and self.accelerator.is_main_process:
            save_file(self.guide_unet.state_dict(), str(Path(folder) / GUIDE_FILE))

    def _load_guide(self, models: Any, folder: str) -> None:
        """accelerate's load-state hook: restore the guide model of a checkpoint taken after the snapshot."""
        path = Path(folder) / GUIDE_FILE
        if path.is_file():
            with untouched_rng():
                guide = self.sampling_unet()
            guide.load_state_dict(load_file(str(path)))
            self.guide_unet = guide

    def sampling_unet(self) -> UNet2DModel:
        """A standalone copy of the UNet carrying the EMA weights (or the raw ones without EMA), in fp32; with
        ``--augment_prob``, only the untransformed class rows (a plain conditional UNet)."""
        copy = ema_copy(self.accelerator.unwrap_model(self.unet), self.ema)
        if self.config.augment_prob > 0:
            copy = plain_class_embedding(copy, len(self.class_names))
        return copy.to(self.accelerator.device)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What `crispdiff.publish.export` needs to build or save this run's pipeline (EMA weights, sampler,
        schedule)."""
        config = self.config
        return dict(
            unet=self.sampling_unet(),
            scheduler_base_config=scheduler_base_config(config),
            beta_schedule=schedule_label(config),
            sampler=config.sampler,
            thresholding=config.thresholding,
            sr_strength=config.sr_strength,
            sharpen_amount=config.sharpen_amount or 0.0,
            class_names=self.class_names,
            guidance_scale=self.config.guidance_scale if self.class_names else 1.0,
            class_mix=self.auto_class_mix(),
            guidance_interval=self.config.guidance_interval if self.class_names or self.guide_unet else None,
            guide_unet=self.guide_unet,
            autoguidance_scale=self.config.autoguidance_scale if self.guide_unet is not None else 1.0,
            **self.space.pipeline_components(),
        )

    def auto_class_mix(self) -> list[float] | None:
        """With ``--class_column auto``: the clusters' shares of the training images, stored in the pipeline so that
        calls without labels (the user never named a class) sample the data's mix; None otherwise."""
        if self.config.class_column != AUTO_CLASS_COLUMN or not self.class_names:
            return None
        return class_mix(self.space.data.class_ids, len(self.class_names))

    def grid_plan(self) -> GridPlan:
        """The run's sample grid (``crispdiff.train.grids``): ``--num_validation_images`` laid out by class, bounded
        by the training between two grids (the validation period, or the whole run), so grids stay comparable."""
        period = self.every(self.config.validation_steps, self.config.validation_epochs) or self.max_steps
        images_per_step = images_per_optimizer_step(self.config, self.accelerator.num_processes)
        span = min(period, self.max_steps) * images_per_step * TRAIN_PASSES_PER_IMAGE
        return plan_grid(self.config, self.class_names, span)

    def sample_grid(
        self, what: str, pipeline_kwargs: dict[str, Any] | None = None
    ) -> tuple[Any, torch.Tensor] | tuple[None, None]:
        """The sample grid (``what``: "validation grid at step N", "final sample grid"), said before it starts; always
        the same seed, so grids at different steps are comparable. The pipeline is built from ``pipeline_kwargs``
        (default: this run's) only when there is a grid to draw: ``(None, None)`` with ``--num_validation_images 0``.
        """
        plan = self.grid_plan()
        if not plan.count:
            return None, None
        pipeline = build_pipeline(**(pipeline_kwargs or self.pipeline_kwargs()))
        self.accelerator.print(
            f"crispdiff: {what}: {plan.describe()} (--num_validation_images, --validation_inference_steps; 0 images: "
            "no grids)"
        )
        pipeline.set_progress_bar_config(desc=what, leave=False, disable=not self.accelerator.is_local_main_process)
        images = pipeline(
            batch_size=plan.count,
            num_inference_steps=plan.steps,
            generator=torch.Generator().manual_seed(self.config.seed),
            upscale=False,
            output_type="pt",
            class_labels=plan.labels,
        ).images
        return make_grid(images, nrow=plan.nrow, value_range=(0, 1)), images

    def sampling_seconds(self) -> tuple[float, float]:
        """Estimated seconds to sample the sample grid, and per image of everything else sampled at the end (the
        sharpening calibration), with this machine's timings (``--time_budget_minutes``)."""
        from crispdiff.train.time_budget import sampling_seconds

        plan = self.grid_plan()
        count = plan.count or 1  # no grid: one image still times the calibration samples
        kwargs = self.pipeline_kwargs()
        if self.guide_step is not None:  # the guide does not exist yet; one of the same size costs the same
            kwargs.update(guide_unet=kwargs["unet"], autoguidance_scale=self.config.autoguidance_scale)
        seconds = sampling_seconds(build_pipeline(**kwargs), count, plan.steps, plan.labels)
        return (seconds if plan.count else 0.0), seconds / count

    def log_validation(self) -> None:
        """Sample a grid with the fast sampler (main process), save it and log it; optionally log metrics."""
        if not self.accelerator.is_main_process:
            return
        grid, images = self.sample_grid(f"validation grid at step {self.step}")
        if grid is None:
            return
        path = self.output_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(grid, path)
        logs: dict[str, float] = {}
        if self.config.validation_metrics:
            from crispdiff.evaluate.metrics import compute_validation_metrics

            reference = self.space.reference_images(max(256, len(images)), self.config.seed)
            logs.update({f"val/{k}": v for k, v in compute_validation_metrics(reference, images).items()})
        self.log_grid("validation", grid)
        if logs:
            self.accelerator.log(logs, step=self.step)

    def calibrated_sharpen_amount(self, pipeline: Any) -> float:
        """The unsharp amount that brings this model's samples to the training images' sharpness (and a log line):
        ``--sharpen_calibration_images`` samples against up to 2,000 training images, the table kept next to the
        pipeline in ``sharpen_calibration.json``."""
        reference = self.space.reference_images(TRAINING_IMAGES_COMPARED, self.config.seed)
        count = self.config.sharpen_calibration_images
        return self.swept_sharpen_amount(pipeline, reference, count, upscaled=False)

    def upscale_reference(self, count: int, scale: int) -> torch.Tensor | None:
        """Up to ``count`` training images decoded at ``scale`` times the training resolution (the SR step's output
        size), or None when the training files are smaller than that (or streamed)."""
        from crispdiff.data.loading import images_at_size

        data = getattr(self.space, "data", None)
        if data is None:
            return None
        indices = reference_indices(len(data), count, self.config.seed)
        return images_at_size(self.config, data, self.config.resolution * scale, indices)

    def calibrated_upscale_sharpen_amount(self, pipeline: Any) -> float | None:
        """The unsharp amount after the SR step that brings this model's upscaled samples to the training images'
        sharpness at that size: ``--upscale_calibration_images`` samples against up to 2,000 training files decoded
        at the SR output's size, the table kept in ``upscale_sharpen_calibration.json``. None (and a log line) when
        the files are smaller than that: the SR model's default amount stays."""
        reference = self.upscale_reference(TRAINING_IMAGES_COMPARED, sr_scale(pipeline.sr_model))
        if reference is None:
            self.accelerator.print(
                "The training images are smaller than the SR step's output, so the unsharp amount after it stays at "
                f"{pipeline.default_sharpen_amount(upscaled=True)} (--upscale_calibration_images)."
            )
            return None
        count = self.config.upscale_calibration_images
        return self.swept_sharpen_amount(pipeline, reference, count, upscaled=True)

    def swept_sharpen_amount(self, pipeline: Any, reference: torch.Tensor, count: int, upscaled: bool) -> float:
        """``count`` samples without the unsharp mask (classes taken in turn; ``upscaled``: through the SR step) go
        through ``crispdiff.evaluate.sharpen.sharpen_sweep`` against ``reference``; returns the best amount, keeps the
        table next to the pipeline and logs the choice."""
        from crispdiff.evaluate.sampling import NO_POSTPROCESS, generate_samples
        from crispdiff.evaluate.sharpen import sharpen_sweep

        where = f" after the SR step, against training images at {reference.shape[-1]} px" if upscaled else ""
        self.accelerator.print(f"Calibrating the unsharp amount{where} on {count} samples ...")
        labels = [k % len(self.class_names) for k in range(count)] if self.class_names else None
        samples = generate_samples(
            pipeline,
            count,
            steps=self.config.validation_inference_steps,
            seed=self.config.seed,
            upscale=upscaled,
            class_labels=labels,
            postprocess=NO_POSTPROCESS,
        )
        sweep = sharpen_sweep(pipeline, samples, reference, upscaled=upscaled)
        best = next(row for row in sweep["rows"] if row["amount"] == sweep["best_amount"])
        name = "upscale_sharpen_calibration.json" if upscaled else "sharpen_calibration.json"
        write_json_atomic(self.output_dir / name, sweep)
        self.accelerator.print(
            f"Unsharp amount{where} calibrated on {count} samples: {sweep['best_amount']} (high-frequency ratio "
            f"{best['hf_energy_ratio']:.2f}, Laplacian ratio {best['laplacian_var_ratio']:.2f}; it was "
            f"{sweep['pipeline_amount']})."
        )
        return float(sweep["best_amount"])

    def export(self, final: bool = False) -> Path:
        """Write the pipeline folder (EMA weights, DPM-Solver++ default, sample grid, training config).

        The ``final`` export (the end of the run) logs its grid to the trackers, measures it (:meth:`final_quality`,
        shown on the model card), and with ``--sharpen_calibration_images`` saves the calibrated unsharp amount, which
        the grid shows; with an SR step, ``--upscale_calibration_images`` calibrates the amount after it.
        """
        kwargs = self.pipeline_kwargs()
        if final and self.config.sharpen_calibration_images:
            kwargs["sharpen_amount"] = self.calibrated_sharpen_amount(build_pipeline(**kwargs))
        grid, images = self.sample_grid("final sample grid" if final else "sample grid", kwargs)
        if grid is not None and final:
            self.log_grid("final", grid)
        quality = self.final_quality(images) if final else None
        kwargs.update(self.sr_kwargs())
        if final and "sr_model" in kwargs and self.config.upscale_calibration_images:
            amount = self.calibrated_upscale_sharpen_amount(build_pipeline(**kwargs))
            if amount is not None:
                kwargs["upscale_sharpen_amount"] = amount
        folder = save_pipeline(
            self.output_dir / "pipeline",
            training_config=self.config.to_dict(),
            sample_grid=grid,
            quality=quality,
            **kwargs,
        )
        write_model_card(folder, self.config.to_dict())
        return folder

    def final_quality(self, images: torch.Tensor | None) -> dict[str, Any] | None:
        """The final sample grid measured against the training images, saved with the pipeline for its model card.

        With ``--validation_metrics`` the validation's figures (SWD included); without it the sharpness ratios and the
        colour-blob indicator alone, which are cheap (SWD costs much more on a CPU). Either way the grid's nearness to
        up to ``TRAINING_IMAGES_COMPARED`` training images (``copy_check``), with a warning when it copies them. None
        without a grid (``--num_validation_images 0``).
        """
        if images is None:
            return None
        from crispdiff.evaluate.memorisation import copy_check
        from crispdiff.evaluate.metrics import compute_sharpness_metrics, compute_validation_metrics

        reference = self.space.reference_images(max(256, len(images)), self.config.seed)
        measure = compute_validation_metrics if self.config.validation_metrics else compute_sharpness_metrics
        metrics = measure(reference, images)
        self.accelerator.print(
            f"crispdiff: the final sample grid against {len(reference)} training images: "
            + ", ".join(f"{name} {value:.3g}" for name, value in metrics.items())
        )
        train = self.space.reference_images(TRAINING_IMAGES_COMPARED, self.config.seed)
        copying, warning = copy_check(images, train)
        metrics.update(copying)
        self.accelerator.print(
            f"crispdiff: its nearest of {len(train)} training images: "
            + (f"warning: {warning}" if warning else f"{copying['nn_median_ratio']:.2f}x as far as they lie from "
               f"each other, {copying['near_copy_fraction']:.0%} near-copies")
        )  # fmt: skip
        plan = self.grid_plan()
        return {
            "samples": f"the final sample grid: {len(images)} samples, {plan.steps} {self.config.sampler} steps, "
            f"seed {self.config.seed}",
            "num_samples": len(images),
            "reference": f"{len(reference)} training images",
            "step": self.step,
            "metrics": metrics,
        }

    def sr_kwargs(self) -> dict[str, Any]:
        """The saved pipeline's SR component and defaults (``--sr_model_name_or_path``).

        A model the user names upscales every call by default. The embedded emoji SR x2 (the latent trainer's
        default) is carried only by 64 px models and upscales only when asked (``pipe(upscale=True)``,
        ``crispdiff sample --upscale``), at full strength unless ``--sr_strength`` is given: it was trained on flat
        art downscaled the way the training images were, so it needs no Lanczos blend to stay faithful.
        """
        from crispdiff.superres.load import (
            EMBEDDED_SR,
            EMBEDDED_SR_RESOLUTION,
            EMBEDDED_SR_SHARPEN_AMOUNT,
            load_sr_model,
        )

        config = self.config
        name = config.sr_model_name_or_path
        if not name or name.lower() == "none":
            return {}
        if name != EMBEDDED_SR:
            return {"sr_model": load_sr_model(name)}
        if config.resolution != EMBEDDED_SR_RESOLUTION:
            logger.info(f"the embedded SR x2 is for 64 px models; this {config.resolution} px pipeline has none")
            return {}
        given = "sr_strength" in getattr(config, "explicit_flags", ())
        return {
            "sr_model": load_sr_model(name),
            "upscale": False,
            "sr_strength": config.sr_strength if given else 1.0,
            "upscale_sharpen_amount": EMBEDDED_SR_SHARPEN_AMOUNT,
        }

    def periodic(self) -> None:
        every = self.every(self.config.save_model_steps, self.config.save_model_epochs)
        if self.due(every) and self.accelerator.is_main_process:
            self.export()

    def finish(self) -> Path:
        folder = self.export(final=True)
        grid = folder / SAMPLES_NAME
        self.accelerator.print(f"Pipeline saved to {folder}" + (f" (sample grid: {grid})." if grid.is_file() else "."))
        if self.config.push_to_hub:
            self.accelerator.print(f"Uploaded to {maybe_push_to_hub(folder, self.config)}")
        return folder


def autoguidance_guide_step(config: TrainConfig, max_steps: int) -> int | None:
    """The step after which the EMA weights become the autoguidance guide (None: autoguidance off)."""
    if config.autoguidance_scale == 1:
        return None
    return max(1, round(config.autoguidance_snapshot * max_steps))


def train(
    config: TrainConfig,
    space: TrainingSpace | None = None,
    budget: Any = None,
    *,
    accelerator: Accelerator | None = None,
    decided: dict[str, Any] | None = None,
) -> Path | None:
    """Train a diffusion UNet as `config` says; `space` defaults to pixels of the configured image data.

    ``budget``: a ``crispdiff.train.time_budget.TimeBudget`` already running (the latent trainer starts it before
    encoding); by default one starts here when ``--time_budget_minutes`` is set. ``accelerator``: the process's, when
    an earlier stage made it (and checked the output folder); ``decided``: values earlier stages decided for the
    resolved config (the VAE adaptation's steps). The config the UNet stage reads and saves is made once, here,
    before the loop: ``config`` resolved, with ``decided`` and the time budget's steps and UNet.
    """
    from crispdiff.train.time_budget import TimeBudget

    config = config.resolve()
    if budget is None and config.time_budget_minutes:
        budget = TimeBudget(config.time_budget_minutes)
    if accelerator is None:
        check_output_dir(config)
        accelerator = start_process(config)
    set_seed(config.seed)
    if space is None:
        space = pixel_space(config, accelerator)
    decided = dict(decided or {})
    if budget is not None:
        decided.update(budgeted_values(config, space, accelerator, budget))
        set_seed(config.seed)  # the real run starts from the seed the probe started from
    return run_trainer(UNetTrainer(config.with_values(**decided), space, accelerator))


def budgeted_values(
    config: TrainConfig, space: TrainingSpace, accelerator: Accelerator, budget: Any
) -> dict[str, Any]:
    """The UNet steps that end the run by ``budget``'s deadline, export included (``--time_budget_minutes``); with a
    model ladder (the config's ``model_ladder``, unless the user chose the UNet's size), also the UNet's size: the
    values for the run's resolved config (``max_train_steps``, the rung's builder flags, a learning rate that follows
    them).

    Throwaway trainers, built like the real one on the process's accelerator, time a few steps and the sample grid
    (see ``crispdiff.train.time_budget``). The rungs are tried from the smallest up: a rung is taken while the budget
    affords at least its ``min_steps`` of its own steps. A resumed run keeps the steps and UNet its first part chose
    (saved in the output folder).
    """
    from crispdiff.train.time_budget import climb_ladder, describe_rung_flags

    saved = Path(config.output_dir) / LoopTrainer.config_file
    if config.resume_from_checkpoint and saved.is_file() and find_checkpoint(config.output_dir, "latest"):
        first_part = json.loads(saved.read_text())
        rung_flags = rung_values({name: first_part[name] for rung in model_ladder(config) for name in rung.flags})
        steps = int(first_part["max_train_steps"])
        accelerator.print(f"crispdiff: resuming a budgeted run of {steps} steps")
        return {**rung_flags, **config.with_values(**rung_flags).values_for_steps(steps), "max_train_steps": steps}

    def cost_of(rung: Any) -> RungCost:
        probed = config if rung is None else config.with_values(**rung_values(rung.flags))
        return probe_costs(probed, space, accelerator)

    rung, steps, cost = climb_ladder(model_ladder(config), budget.remaining, cost_of)
    chosen = {} if rung is None else rung_values(rung.flags)
    decided = {**chosen, **config.with_values(**chosen).values_for_steps(steps), "max_train_steps": steps}
    model = ""
    if rung is not None:
        model = f"the {rung.name} UNet ({describe_parameters(cost.parameters)}; {describe_rung_flags(rung.flags)}), "
    repeat = (describe_rung_flags(rung.flags) + " " if rung is not None else "") + f"--max_train_steps {steps}"
    accelerator.print(
        f"crispdiff: time budget of {budget.minutes:g} min: {model}{1000 * cost.per_step:.0f} ms a step here and "
        f"about {cost.export:.0f} s to export, so {steps} steps (to repeat this run exactly: {repeat})"
    )
    return decided


def model_ladder(config: TrainConfig) -> list[Any]:
    """The config's model ladder (``model_ladder``, smallest first), or none when the user set the UNet's size or
    architecture themselves (then the budget sizes the steps only)."""
    rungs = list(getattr(config, "model_ladder", ()))
    given = getattr(config, "explicit_flags", frozenset())
    fixed = {name for rung in rungs for name in rung.flags} | {"model_config_name_or_path", "encoder"}
    return [] if given & fixed else rungs


def rung_values(flags: dict[str, Any]) -> dict[str, Any]:
    """A rung's builder flags as config values (lists as lists, as the command line gives them)."""
    return {name: list(value) if isinstance(value, (list, tuple)) else value for name, value in flags.items()}


def sr_scale(sr_model: Any) -> int:
    """How many times larger an SR model's output is than its input (2 for a model without the setting)."""
    return int(getattr(sr_model.config, "scale", 2))


def probe_costs(config: TrainConfig, space: TrainingSpace, accelerator: Accelerator) -> RungCost:
    """What the UNet ``config`` builds costs here: seconds per step (validation grids included), to export. The
    probe is a stage on the process's ``accelerator``, released once timed."""
    from crispdiff.train.time_budget import EXPORT_MARGIN, seconds_per_step

    probe = UNetTrainer(config, space, accelerator)
    per_step = seconds_per_step(probe)
    grid, per_image = (agreed_seconds(probe.accelerator, seconds) for seconds in probe.sampling_seconds())
    validation_every = probe.every(config.validation_steps, config.validation_epochs)
    params = probe.num_parameters
    upscaled = 0  # the SR step's calibration samples, when the training files are large enough for it
    sr_model = probe.sr_kwargs().get("sr_model") if config.upscale_calibration_images else None
    if sr_model is not None and probe.upscale_reference(8, sr_scale(sr_model)) is not None:
        upscaled = config.upscale_calibration_images
    del probe
    release_stage(accelerator)
    export = EXPORT_MARGIN * (grid + per_image * (config.sharpen_calibration_images + upscaled))
    # validation grids along the way cost a grid every --validation_steps (or --validation_epochs) steps
    return RungCost(per_step + (grid / validation_every if validation_every else 0.0), export, params)
