"""The flags of the two Stable Diffusion LoRA scripts (text-to-image and DreamBooth) and their checks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from crispdiff.core.config import DataConfig, HubConfig, LoopConfig
from crispdiff.core.diffusers_flags import CLASS_LABELS_CONDITIONING, VALIDATION_IMAGES
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import Condition, flag
from crispdiff.latent.cache import DTYPES
from crispdiff.train.lora import (
    SD_UNET_LORA_PRESETS,
    expand_targets,
)
from crispdiff.train.process import has_accelerator_device

logger = logging.getLogger("crispdiff")


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"


SAMPLES_NAME = "samples.png"


SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


class SDLoRAError(FlagError):
    """A flag, base model or file the LoRA trainer cannot use; the one-line message names it and what to do."""


@dataclass
class SDLoRAConfig(DataConfig, HubConfig, LoopConfig):
    """The flags both LoRA scripts share (names as in diffusers' example scripts)."""

    pretrained_model_name_or_path: str | None = flag(
        None, "The Stable Diffusion 1.x / 2.x base: a local diffusers folder or a Hub id (required)."
    )
    revision: str | None = flag(None, "Revision (branch, tag or commit) of the base model on the Hub.")
    variant: str | None = flag(None, "Weights variant of the base model (e.g. fp16).")
    tokenizer_name: str | None = flag(
        None, "A tokenizer (folder or Hub id) to use instead of the base model's tokenizer/ subfolder."
    )
    tokenizer_max_length: int | None = flag(
        None, "Tokens per prompt in training (default: the tokenizer's model_max_length; at most the text encoder's)."
    )
    text_encoder_use_attention_mask: bool = flag(
        False, "Pass the prompts' attention mask to the text encoder in training (SD's pipeline passes none)."
    )
    rank: int = flag(4, "LoRA rank.")
    lora_alpha: float | None = flag(None, "LoRA alpha (scale = alpha / rank; default: the rank, i.e. scale 1).")
    lora_dropout: float = flag(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = flag(
        ["attention"],
        "UNet modules that get LoRA: presets 'attention' (to_q/k/v/out), 'ff' (feed-forward), 'conv' (ResNet and "
        "projection convolutions), or module names (e.g. to_q to_v).",
    )
    use_dora: bool = flag(False, "Train DoRA (weight-decomposed LoRA) instead of plain LoRA.")
    train_text_encoder: bool = flag(False, "Also put LoRA on the CLIP text encoder's attention (no text caching then).")
    prediction_type: str | None = flag(
        None, "Must match the base scheduler's (a LoRA cannot retarget the UNet); default: the base model's."
    )
    snr_gamma: float | None = flag(None, "Min-SNR-gamma loss weighting (5 is usual; default off, as in diffusers).")
    noise_offset: float = flag(0.0, "Offset noise strength (0 = off).")
    gradient_checkpointing: bool = flag(False, "Trade compute for memory in the UNet (and a trained text encoder).")
    enable_xformers_memory_efficient_attention: bool = flag(False, "Use xformers attention (default: PyTorch SDPA).")
    validation_prompt: str | None = flag(None, "Sample this prompt every --validation_steps (DPM-Solver++).")
    num_validation_images: int = flag(
        4, "Images per validation grid and in the final samples.png (0: no grids at all, as in diffusers)."
    )
    validation_inference_steps: int = flag(25, "DPM-Solver++ steps for validation and the final samples.")
    export_kohya: bool = flag(False, f"Also write {KOHYA_WEIGHTS_NAME} (kohya / A1111 / ComfyUI keys).")
    save_pipeline: bool = flag(False, "Also write OUTPUT_DIR/pipeline: the base with the LoRA fused (export-sd).")
    output_size: int | None = flag(
        None, "With --save_pipeline: the saved pipeline downsamples its output to this size (antialiased Lanczos)."
    )
    sr_model_name_or_path: str | None = flag(None, "With --save_pipeline: an SR model saved into the pipeline.")
    latent_cache_dir: str | None = flag(None, "Where VAE latents are cached (default: <cache_dir>/latents).")
    latent_cache_dtype: str = flag("float16", "Storage precision of cached latents.", choices=sorted(DTYPES))
    vae_batch_size: int = flag(8, "Images per VAE batch while building the latent cache.")

    # LoRA defaults (diffusers' scripts use the same)
    output_dir: str = flag("crispdiff-lora", "Where the LoRA weights, checkpoints, logs and samples go.")
    resolution: int = flag(512, "Training resolution (512 for SD 1.x, 768 for SD 2.x v-models).")
    train_batch_size: int = flag(1, "Images per process per micro-batch.")
    max_train_steps: int | None = flag(500, "Optimizer steps to train for (overrides --num_epochs).")
    learning_rate: float = flag(1e-4, "Peak learning rate of the LoRA weights.")
    lr_scheduler: str = flag(
        "constant",
        "LR schedule after warmup.",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    lr_warmup_steps: int = flag(0, "Linear warmup steps.")
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay.")
    use_ema: bool = flag(False, "Not supported for LoRA (kept for flag compatibility; must stay off).")
    validation_steps: int = flag(100, "Validate (with --validation_prompt) every N optimizer steps.")
    checkpointing_steps: int = flag(500, "Save a resumable checkpoint every N optimizer steps.")

    def fill_and_check(self) -> None:
        """Refuse flag combinations that would silently do something else than asked, one line each."""
        if not self.pretrained_model_name_or_path:
            raise SDLoRAError("--pretrained_model_name_or_path is required (a Stable Diffusion 1.x/2.x folder or id)")
        if self.tokenizer_max_length is not None and self.tokenizer_max_length < 1:
            raise SDLoRAError(f"--tokenizer_max_length must be >= 1, got {self.tokenizer_max_length}")
        if self.num_validation_images < 0:
            raise SDLoRAError(f"--num_validation_images must be >= 0, got {self.num_validation_images}")
        if self.validation_epochs is not None and self.validation_epochs < 1:
            raise SDLoRAError(f"--validation_epochs must be >= 1, got {self.validation_epochs}")
        if self.rank < 1:
            raise SDLoRAError(f"--rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SDLoRAError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_ema:
            raise SDLoRAError("--use_ema is not supported for LoRA training; drop the flag")
        if self.use_dora and self.train_text_encoder:
            raise SDLoRAError("--use_dora applies to the UNet only; drop --train_text_encoder or --use_dora")
        if self.use_dora and self.export_kohya:
            raise SDLoRAError("--export_kohya writes plain LoRA keys only; drop it or --use_dora")
        if self.mixed_precision == "fp16" and not has_accelerator_device():
            raise SDLoRAError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
        if self.output_size is not None and self.output_size < 1:
            raise SDLoRAError(f"--output_size must be positive, got {self.output_size}")
        if (self.output_size or self.sr_model_name_or_path) and not self.save_pipeline:
            raise SDLoRAError("--output_size and --sr_model_name_or_path apply to --save_pipeline; add it")
        if augmentations := self.pixel_augmentations():
            raise SDLoRAError(f"{', '.join(augmentations)} cannot vary per epoch on cached latents; drop them")

    def lora_config(self, targets: list[str]) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else self.rank,
            lora_dropout=self.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=self.use_dora,
        )

    def unet_targets(self) -> list[str]:
        return expand_targets(self.lora_target_modules, SD_UNET_LORA_PRESETS)


@dataclass
class TextToImageLoRAConfig(SDLoRAConfig):
    """Everything `train_scripts/train_text_to_image_lora.py` accepts: a captioned folder or dataset."""

    diffusers_script: ClassVar[str | None] = "train_text_to_image_lora.py"
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        "train_batch_size": 16,
        "max_train_steps": None,  # diffusers: --num_train_epochs 100
        "lr_warmup_steps": 500,
    }

    caption_column: str | None = flag("text", "Column holding each image's caption (metadata.jsonl or dataset).")

    def fill_and_check(self) -> None:
        super().fill_and_check()
        if not self.caption_column:
            raise SDLoRAError("--caption_column is required: text-to-image LoRA learns from per-image captions")


@dataclass
class DreamBoothLoRAConfig(SDLoRAConfig):
    """Everything `train_scripts/train_dreambooth_lora.py` accepts: a few subject images and a prompt."""

    refused_flags: ClassVar[dict[str, str]] = {
        "class_labels_conditioning": CLASS_LABELS_CONDITIONING,
        "validation_images": VALIDATION_IMAGES,
    }
    # diffusers only warns about these without --with_prior_preservation; here they are refused, as every flag that
    # would have no effect is
    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.with_prior_preservation, "--with_prior_preservation")
        for name in (
            "class_data_dir",
            "class_prompt",
            "num_class_images",
            "prior_loss_weight",
            "sample_batch_size",
            "class_inference_steps",
            "prior_generation_precision",
        )
    }
    diffusers_script: ClassVar[str | None] = "train_dreambooth_lora.py"
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        "learning_rate": 5e-4,
        "train_batch_size": 4,
        "max_train_steps": None,  # diffusers: --num_train_epochs 1
        "lr_warmup_steps": 500,
    }

    instance_data_dir: str | None = flag(None, "Folder of the subject's images (required).")
    instance_prompt: str | None = flag(None, "Prompt naming the subject, e.g. 'a photo of sks dog' (required).")
    caption_column: str | None = flag(
        None, "Per-image captions from instance_data_dir/metadata.jsonl (empty ones fall back to --instance_prompt)."
    )
    with_prior_preservation: bool = flag(False, "Also train on class images to keep the class prior.")
    class_data_dir: str | None = flag(None, "Folder of class images; missing ones are generated once and reused.")
    class_prompt: str | None = flag(None, "Prompt of the class, e.g. 'a photo of dog'.")
    num_class_images: int = flag(100, "Class images wanted for prior preservation.")
    prior_loss_weight: float = flag(1.0, "Weight of the prior-preservation loss.")
    sample_batch_size: int = flag(4, "Batch size when generating class images.")
    class_inference_steps: int = flag(25, "DPM-Solver++ steps per generated class image.")
    prior_generation_precision: str | None = flag(
        None,
        "Precision of the base model generating class images (default: fp32; fp16 needs a GPU).",
        choices=["no", "fp32", "fp16", "bf16"],
    )
    pre_compute_text_embeddings: bool = flag(
        False,
        "Encode every prompt once before training. crispdiff always does so with a frozen text encoder; the flag "
        "is accepted for diffusers' command lines and, as there, refused with --train_text_encoder.",
    )
    train_batch_size: int = flag(1, "Instance images per process per micro-batch (plus as many class images).")
    max_train_steps: int | None = flag(400, "Optimizer steps to train for.")

    def fill_and_check(self) -> None:
        super().fill_and_check()
        if not self.instance_data_dir:
            raise SDLoRAError("--instance_data_dir is required (a folder of the subject's images)")
        if not self.instance_prompt:
            raise SDLoRAError("--instance_prompt is required (e.g. 'a photo of sks dog')")
        if self.train_data_dir or self.dataset_name:
            raise SDLoRAError("DreamBooth reads --instance_data_dir; drop --train_data_dir / --dataset_name")
        if self.pre_compute_text_embeddings and self.train_text_encoder:
            raise SDLoRAError("--pre_compute_text_embeddings cannot go with --train_text_encoder; drop one")
        if self.prior_generation_precision == "fp16" and not has_accelerator_device():
            raise SDLoRAError("--prior_generation_precision fp16 needs a GPU; on the CPU use fp32 or bf16")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise SDLoRAError("--with_prior_preservation needs --class_data_dir and --class_prompt")
            if self.num_class_images < 1:
                raise SDLoRAError(f"--num_class_images must be >= 1, got {self.num_class_images}")
