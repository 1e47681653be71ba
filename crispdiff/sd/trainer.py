"""LoRA and DreamBooth fine-tuning of Stable Diffusion 1.x / 2.x and SDXL: the trainer.

Why crispdiff has its own rather than pointing at diffusers' ``train_dreambooth_lora.py`` and
``train_text_to_image_lora.py``: what their users keep asking for is a property of the loop and of the files, not of
the model, and crispdiff's loop already has it. This module plugs Stable Diffusion into that loop:

- the UNet (and with ``--train_text_encoder`` the CLIP text encoder, SDXL's two) gets peft LoRA (or DoRA) adapters;
  the base weights are frozen in the training precision, the adapter weights stay fp32 so fp16 loss scaling never
  sees fp16 gradients (diffusers #6086, #13124);
- the VAE is frozen, so every image is encoded once into the existing latent cache (``crispdiff.latent.cache``) and
  trained through ``crispdiff.latent.space.LatentSpace``; with a frozen text encoder every distinct prompt is encoded
  once too. Together they are the speed-up over the reference scripts, which run both encoders every step;
- the noise schedule and prediction type are the base model's (``crispdiff.diffusion.schedule.NoiseSchedule`` over its
  betas); min-SNR weights come from ``crispdiff.diffusion.schedule.min_snr_weight`` in the form for that prediction
  type, on the prior (class) half of a DreamBooth batch as well (diffusers #3084, #3459);
- checkpoints are crispdiff's (``crispdiff.train.checkpoint``: optimizer, LR schedule, RNG, data position) with the LoRA
  weights alone in safetensors instead of the whole UNet, so resuming resumes the adapter (#3279, #5412, #5840);
- captions come per image from ``metadata.jsonl`` (``--caption_column``), for DreamBooth too (#1670, #5605);
- the output is ``pytorch_lora_weights.safetensors`` in diffusers' format with its adapter config (alpha, DoRA) in
  the file's metadata, so ``StableDiffusionPipeline.load_lora_weights(output_dir)`` reproduces the trained model, plus
  an optional kohya copy (``lora_unet_...`` / ``lora_te_...`` keys, with the real alpha) for A1111 / ComfyUI (#6399).

SDXL runs the same loop with what its UNet needs besides the text: the second text encoder's pooled embedding and
the micro-conditioning of each latent (``crispdiff.sd.micro_conditioning``), as diffusers' SDXL scripts give it.

The configs are in :mod:`crispdiff.sd.config`, the LoRA files in :mod:`crispdiff.sd.lora_files`, the fused export
in :mod:`crispdiff.sd.export`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params

from crispdiff.core.errors import one_line
from crispdiff.core.io import write_text_atomic
from crispdiff.core.provenance import public_command, write_provenance
from crispdiff.diffusion.schedule import sample_noise
from crispdiff.sd.base import SDParts, base_schedule, check_base_family, inference_pipeline, load_sd
from crispdiff.sd.config import (
    LORA_WEIGHTS_NAME,
    SAMPLES_NAME,
    DreamBoothLoRAConfig,
    SDLoRAConfig,
    SDLoRAError,
    TextToImageLoRAConfig,
)
from crispdiff.sd.export import export_sd
from crispdiff.sd.lora_files import load_lora_state, model_card, push_lora_to_hub, save_lora_weights
from crispdiff.sd.prompts import (
    PromptBank,
    TrainSet,
    captions_for,
    generate_class_images,
    image_view,
    latent_space,
    train_set,
)
from crispdiff.train.loop import LoopTrainer, check_output_dir, run_trainer, untouched_rng
from crispdiff.train.lora import (
    SD_UNET_LORA_PRESETS,
    TEXT_ENCODER_LORA_TARGETS,
    inject_lora,
    lora_state,
)
from crispdiff.train.process import start_run

logger = logging.getLogger("crispdiff")


CHECKPOINT_LORA_FILES = {
    "unet": "lora_unet.safetensors",
    "text_encoder": "lora_text_encoder.safetensors",
    "text_encoder_2": "lora_text_encoder_2.safetensors",
}
TEXT_ENCODER_ROLES = ("text_encoder", "text_encoder_2")


class SDLoRATrainer(LoopTrainer):
    """LoRA on a Stable Diffusion UNet (and text encoder), trained on cached latents in crispdiff's loop."""

    config_file = "crispdiff_lora_training.json"
    tracker_name = "crispdiff-lora"
    progress_label = "train lora"

    def __init__(
        self,
        config: SDLoRAConfig,
        accelerator: Accelerator,
        parts: SDParts,
        prompts: PromptBank,
        instance: TrainSet,
        prior: TrainSet | None = None,
        repeats: int = 1,
    ):
        """``repeats``: how many times each instance image appears in an epoch (DreamBooth's ``--repeats``)."""
        super().__init__(config, accelerator, max(len(instance) * repeats, len(prior) if prior else 0))
        self.parts, self.prompts, self.instance, self.prior = parts, prompts, instance, prior
        device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        self.schedule = base_schedule(parts.scheduler, config.prediction_type).to(device)

        for part in [instance] + ([prior] if prior is not None else []):
            prepare = getattr(part.space, "prepare", None)  # keeps cached latents on a GPU when they fit
            if prepare is not None:
                prepare(device)
        unet, encoders = parts.unet, parts.text_encoders
        try:
            unet.add_adapter(config.lora_config(config.unet_targets()))
        except ValueError as err:  # peft: none of the target modules exists in the UNet
            raise SDLoRAError(
                f"--lora_target_modules {' '.join(config.lora_target_modules)} matched no UNet module "
                f"({one_line(err)[:200]}); use the presets {sorted(SD_UNET_LORA_PRESETS)} or module names such as to_q"
            ) from err
        if config.train_text_encoder:
            for encoder in encoders:
                inject_lora(encoder, config.lora_config(TEXT_ENCODER_LORA_TARGETS))
        else:
            prompts.precompute([encoder.to(device) for encoder in encoders], device)
        # frozen base weights in the training precision, adapter weights in fp32 (the optimizer's master copy)
        unet.to(device, dtype=self.weight_dtype)
        for encoder in encoders:
            encoder.to(device, dtype=self.weight_dtype)
        parts.vae.to(device)  # fp32: it only decodes validation samples once the latents are cached
        trained_encoders = encoders if config.train_text_encoder else []
        cast_training_params([unet, *trained_encoders], dtype=torch.float32)
        unet_weights = [p for p in unet.parameters() if p.requires_grad]
        text_weights = [p for encoder in trained_encoders for p in encoder.parameters() if p.requires_grad]
        if not unet_weights:
            raise SDLoRAError(f"--lora_target_modules {config.lora_target_modules} matched no module of the UNet")
        self.num_trainable = sum(p.numel() for p in unet_weights + text_weights)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for encoder in trained_encoders:
                encoder.gradient_checkpointing_enable()
        if config.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        unet.train()
        for encoder in encoders:
            encoder.train(config.train_text_encoder)

        text_settings = config.text_encoder_optimizer()
        if text_weights and text_settings:  # the text encoders' own learning rate and weight decay (SDXL DreamBooth)
            trainable: list[Any] = [{"params": unet_weights}, {"params": text_weights, **text_settings}]
        else:
            trainable = unet_weights + text_weights
        self.setup_optimization(unet, trainable)
        self.unet, *prepared, self.optimizer = accelerator.prepare(unet, *trained_encoders, self.optimizer)
        self.text_encoders: list[Any] | None = prepared or None
        accelerator.register_save_state_pre_hook(self._save_lora_checkpoint)
        accelerator.register_load_state_pre_hook(self._load_lora_checkpoint)
        self.last_grid: Any = None

    # -- checkpoints hold the adapters only (safetensors), not the frozen base ------------------------------------
    def _named_models(self) -> dict[str, Any]:
        """The models with adapters, by role: ``unet`` and, with ``--train_text_encoder``, ``text_encoder`` (and
        SDXL's ``text_encoder_2``)."""
        named = {"unet": self.accelerator.unwrap_model(self.unet)}
        for role, encoder in zip(TEXT_ENCODER_ROLES, self.text_encoders or []):
            named[role] = self.accelerator.unwrap_model(encoder)
        return named

    def _trained_text_encoders(self) -> list[Any]:
        named = self._named_models()
        return [named[role] for role in TEXT_ENCODER_ROLES if role in named]

    def _role(self, model: Any) -> str:
        bare = self.accelerator.unwrap_model(model)
        for role, candidate in self._named_models().items():
            if bare is candidate:
                return role
        raise SDLoRAError(f"unexpected model {type(bare).__name__} in the checkpoint")

    def _save_lora_checkpoint(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        """accelerate's save hook (called on every process): the main process writes the adapters, once.

        Twice, as they are small: peft's keys for an exact resume, and diffusers' ``pytorch_lora_weights.safetensors``
        (``unet.`` / ``text_encoder.`` keys, alpha in the metadata) so that ``load_lora_weights(checkpoint-N)`` works
        as it does on diffusers' own checkpoints.
        """
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            for model in models:
                path = Path(output_dir) / CHECKPOINT_LORA_FILES[self._role(model)]
                save_file(lora_state(self.accelerator.unwrap_model(model)), str(path))
            unet = self._named_models()["unet"]
            save_lora_weights(Path(output_dir), unet, self._trained_text_encoders(), version=self.parts.version)
        weights.clear()  # accelerate would otherwise save every frozen base weight too

    def _load_lora_checkpoint(self, models: list[Any], input_dir: str) -> None:
        from safetensors.torch import load_file

        while models:
            model = models.pop()
            path = Path(input_dir) / CHECKPOINT_LORA_FILES[self._role(model)]
            if not path.is_file():
                raise SDLoRAError(f"{path} is missing: this checkpoint was not written by a LoRA run with these flags")
            load_lora_state(self.accelerator.unwrap_model(model), load_file(str(path)))

    # -- the loop ------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        what = f"{len(self.instance)} images"
        if self.prior is not None:
            what += f" + {len(self.prior)} class images"
        encoders = "text encoders" if self.parts.is_sdxl else "text encoder"
        text = f"{encoders} trained" if self.text_encoders else f"{len(self.prompts.prompts)} prompt(s) cached"
        if self.parts.is_sdxl:
            text += ", SDXL micro-conditioning"
        return f"LoRA ({self.num_trainable:,} weights, {self.schedule.prediction_type}) on {what}, {text}"

    def ema_parameters(self) -> Any:
        return iter(())

    def micro_step(self) -> dict[str, torch.Tensor]:
        config, device = self.config, self.accelerator.device
        index = self.batches.indices(self.position)
        sets = [self.instance] + ([self.prior] if self.prior is not None else [])
        latents, prompt_ids, time_ids, sizes = [], [], [], []
        for part in sets:
            rows = index % len(part)
            variants = part.space.draw_variants(rows, self.data_generator)
            latents.append(part.space.latents(rows, variants, self.data_generator, device))
            prompt_ids.append(part.prompt_ids[rows])
            if part.micro is not None:
                time_ids.append(part.micro.time_ids(rows, variants))
            sizes.append(len(rows))
        x0, ids = torch.cat(latents), torch.cat(prompt_ids)
        noise = sample_noise(tuple(x0.shape), self.noise_generator, device, config.noise_offset)
        t = self.schedule.sample_timesteps(x0.shape[0], self.noise_generator, device)
        x_t = self.schedule.add_noise(x0, noise, t)
        models = [self.unet, *(self.text_encoders or [])]
        with self.accelerator.accumulate(*models):
            embeds = self.prompts.encode(ids, self.text_encoders, device)
            added = None
            if embeds.pooled is not None:  # SDXL: the pooled text embedding and the micro-conditioning
                added = {
                    "text_embeds": embeds.pooled.to(self.weight_dtype),
                    "time_ids": torch.cat(time_ids).to(device, self.weight_dtype),
                }
            prediction = self.unet(
                x_t.to(self.weight_dtype), t, embeds.hidden.to(self.weight_dtype), added_cond_kwargs=added
            ).sample
            target = self.schedule.target(x0, noise, t)
            per_sample = (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
            per_sample = per_sample * self.schedule.loss_weights(t, config.snr_gamma)
            terms = {"loss": per_sample[: sizes[0]].mean()}
            if self.prior is not None:
                terms["prior"] = per_sample[sizes[0] :].mean()
                terms["loss"] = terms["loss"] + config.prior_loss_weight * terms["prior"]
            self.accelerator.backward(terms["loss"])
            if self.accelerator.sync_gradients and config.max_grad_norm > 0:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                self.accelerator.clip_grad_norm_(params, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {k: v.detach() for k, v in terms.items()}

    # -- validation: the in-training model, sampled without touching the training state ---------------------------
    @torch.no_grad()
    def sample(self, prompt: str, count: int) -> torch.Tensor:
        """``count`` images of ``prompt`` from the model as it is now (DPM-Solver++, fixed seed), NCHW in [0, 1].

        Nothing the loop depends on changes: the adapters stay fp32 and in place, train/eval modes and the global
        RNG states (dropout draws from them) are restored afterwards.
        """
        models = self._named_models()
        modes = {name: m.training for name, m in models.items()}
        try:
            for model in models.values():
                model.eval()
            trained = self._trained_text_encoders()
            pipeline = inference_pipeline(self.parts, models["unet"], trained or None)
            with untouched_rng():
                return self.run_pipeline(pipeline, prompt, count)
        finally:
            for name, model in models.items():
                model.train(modes[name])

    @torch.no_grad()
    def run_pipeline(self, pipeline: Any, prompt: str, count: int) -> torch.Tensor:
        """``count`` images of ``prompt`` with the validation settings (seed, steps, resolution), NCHW in [0, 1]."""
        with self.accelerator.autocast():
            images = pipeline(
                [prompt] * count,
                num_inference_steps=self.config.validation_inference_steps,
                height=self.config.resolution,
                width=self.config.resolution,
                generator=torch.Generator().manual_seed(self.config.seed),
                output_type="pt",
            ).images
        return images.float().cpu()

    def final_samples(self, lora_path: Path) -> torch.Tensor:
        """The final validation, as diffusers' scripts end: the saved LoRA file loaded into a fresh copy of the base
        model and sampled, so the grid shows what users of the file get rather than the adapters still in memory."""
        from crispdiff.sd.export import build_sd_pipeline

        config = self.config
        pipeline = build_sd_pipeline(
            config.pretrained_model_name_or_path or "",
            lora_path,
            revision=config.revision,
            variant=config.variant,
            tokenizer_name=config.tokenizer_name,
            vae=config.base_vae(),
        ).to(self.accelerator.device)
        pipeline.set_progress_bar_config(desc="final samples", disable=not self.accelerator.is_local_main_process)
        try:
            return self.run_pipeline(pipeline, self.sample_prompt(), config.num_validation_images)
        finally:
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def sample_prompt(self) -> str:
        return self.config.validation_prompt or self.prompts.prompts[int(self.instance.prompt_ids[0])]

    def log_validation(self) -> None:
        config = self.config
        if not self.accelerator.is_main_process or not config.validation_prompt or not config.num_validation_images:
            return
        from crispdiff.core.images import make_grid, save_image_atomic

        self.accelerator.print(
            f"crispdiff: validation at step {self.step}: {config.num_validation_images} image(s) of "
            f"{config.validation_prompt!r}, {config.validation_inference_steps} steps"
        )
        grid = make_grid(self.sample(config.validation_prompt, config.num_validation_images), value_range=(0, 1))
        save_image_atomic(grid, self.output_dir / "samples" / f"step_{self.step:07d}.png")
        self.log_grid("validation", grid)
        self.last_grid = grid

    def finish(self) -> Path:
        """Save the LoRA (and kohya copy), a sample grid and the model card; optionally the fused pipeline; push."""
        from crispdiff.core.images import make_grid, save_image_atomic

        config = self.config
        models = self._named_models()
        path = save_lora_weights(
            self.output_dir,
            models["unet"],
            self._trained_text_encoders(),
            kohya=config.export_kohya,
            version=self.parts.version,
        )
        has_samples = config.num_validation_images > 0  # --num_validation_images 0: no grids at all, as in diffusers
        if has_samples:
            self.accelerator.print(
                f"crispdiff: final samples from the saved LoRA ({path.name} loaded into the base model): "
                f"{config.num_validation_images} image(s) of {self.sample_prompt()!r}, "
                f"{config.validation_inference_steps} steps (--num_validation_images, --validation_inference_steps; "
                "0 images skips this)"
            )
            grid = make_grid(self.final_samples(path), value_range=(0, 1))
            save_image_atomic(grid, self.output_dir / SAMPLES_NAME)
            self.log_grid("final", grid)
        card = model_card(
            config, has_samples, public_command(), steps=self.max_steps, samples_prompt=self.sample_prompt()
        )
        write_text_atomic(self.output_dir / "README.md", card)
        write_provenance(self.output_dir)
        self.accelerator.print(f"LoRA saved to {path}.")
        if config.save_pipeline:
            folder = export_sd(
                config.pretrained_model_name_or_path or "",
                self.output_dir,
                self.output_dir / "pipeline",
                sr_model=config.sr_model_name_or_path,
                output_size=config.output_size,
                revision=config.revision,
                variant=config.variant,
                tokenizer_name=config.tokenizer_name,
                vae=config.base_vae(),
            )
            self.accelerator.print(f"Pipeline with the LoRA fused saved to {folder}.")
        if config.push_to_hub:
            self.accelerator.print(f"Uploaded to {push_lora_to_hub(self.output_dir, config)}")
        return path


def _prepare(config: SDLoRAConfig) -> tuple[Accelerator, SDParts]:
    """The output folder checked, the base model loaded, the process's Accelerator (``config`` is resolved)."""
    check_output_dir(config, "", LORA_WEIGHTS_NAME, "trained LoRA weights")
    name = config.pretrained_model_name_or_path or ""
    check_base_family(name, config.revision, config.family, config.other_family_script)
    parts = load_sd(name, config.revision, config.variant, config.tokenizer_name, config.base_vae())
    base_schedule(parts.scheduler, config.prediction_type)  # refuse a prediction-type switch before any work
    accelerator = start_run(config)
    parts.vae.to(accelerator.device)
    return accelerator, parts


def prompt_bank(config: SDLoRAConfig, parts: SDParts, prompts: list[str]) -> PromptBank:
    """The run's prompts, tokenized with --tokenizer_max_length and --text_encoder_use_attention_mask (SDXL: both
    tokenizers at their own length)."""
    limit = parts.text_encoder.config.max_position_embeddings
    if config.tokenizer_max_length is not None and config.tokenizer_max_length > limit:
        raise SDLoRAError(f"--tokenizer_max_length {config.tokenizer_max_length} exceeds the text encoder's {limit}")
    return PromptBank(
        parts.tokenizer,
        prompts,
        config.tokenizer_max_length,
        config.text_encoder_use_attention_mask,
        tokenizer_2=parts.tokenizer_2,
    )


def train_text_to_image_lora(config: TextToImageLoRAConfig) -> Path | None:
    """LoRA on a captioned folder or dataset (SD 1.x / 2.x or SDXL); returns the LoRA file on the main process."""
    config = config.resolve()
    accelerator, parts = _prepare(config)
    show = accelerator.is_local_main_process
    view = image_view(config)
    with accelerator.main_process_first():
        space, data = latent_space(view, config, parts.vae, show)
    captions = captions_for(data, None)
    prompts = prompt_bank(config, parts, captions + ([config.validation_prompt] if config.validation_prompt else []))
    instance = train_set(view, space, data, prompts.ids(captions), parts)
    return run_trainer(SDLoRATrainer(config, accelerator, parts, prompts, instance))


def train_dreambooth_lora(config: DreamBoothLoRAConfig) -> Path | None:
    """DreamBooth LoRA on a subject folder (SDXL: or dataset), with optional prior preservation; returns the LoRA
    file (main process)."""
    config = config.resolve()
    accelerator, parts = _prepare(config)
    show = accelerator.is_local_main_process
    with accelerator.main_process_first():
        subject = {"train_data_dir": None} if config.dataset_name else {"train_data_dir": config.instance_data_dir}
        view = image_view(config, dataset_name=config.dataset_name, **subject)
        space, data = latent_space(view, config, parts.vae, show)
        prior_space = class_view = prior_data = None
        if config.with_prior_preservation:
            if accelerator.is_main_process:
                made = generate_class_images(config, parts, accelerator.device)
                accelerator.print(f"crispdiff: class images in {config.class_data_dir}: {made} generated.")
            class_view = image_view(
                config,
                train_data_dir=config.class_data_dir,
                dataset_name=None,
                caption_column=None,
                max_train_samples=config.num_class_images,
            )
            prior_space, prior_data = latent_space(class_view, config, parts.vae, show)
    captions = captions_for(data, config.instance_prompt)
    extra = [config.class_prompt] if prior_space is not None else []
    extra += [config.validation_prompt] if config.validation_prompt else []
    prompts = prompt_bank(config, parts, captions + [p for p in extra if p])
    instance = train_set(view, space, data, prompts.ids(captions), parts)
    prior = None
    if prior_space is not None:
        class_ids = prompts.ids([config.class_prompt or ""] * len(prior_space))
        prior = train_set(class_view, prior_space, prior_data, class_ids, parts)
    trainer = SDLoRATrainer(config, accelerator, parts, prompts, instance, prior, repeats=config.repeats)
    return run_trainer(trainer)
