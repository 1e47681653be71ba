"""The flags of the Stable Diffusion LoRA scripts (text-to-image and DreamBooth, on SD 1.x / 2.x and on SDXL) and
their checks."""

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


#: The base-model families the LoRA scripts train: pipeline classes (model_index.json's ``_class_name``), the name
#: users know them by, and the scripts that train them (DreamBooth, text-to-image).
SD_FAMILY = "sd"
SDXL_FAMILY = "sdxl"
FAMILY_PIPELINES = {SD_FAMILY: ("StableDiffusionPipeline",), SDXL_FAMILY: ("StableDiffusionXLPipeline",)}
FAMILY_NAMES = {SD_FAMILY: "Stable Diffusion 1.x/2.x", SDXL_FAMILY: "SDXL"}
SUPPORTED_PIPELINES = tuple(name for names in FAMILY_PIPELINES.values() for name in names)


class SDLoRAError(FlagError):
    """A flag, base model or file the LoRA trainer cannot use; the one-line message names it and what to do."""


@dataclass
class SDLoRAConfig(DataConfig, HubConfig, LoopConfig):
    """The flags both LoRA scripts share (names as in diffusers' example scripts)."""

    #: The base-model family the script trains (``FAMILY_PIPELINES``), and the script a base of the other family needs.
    family: ClassVar[str] = SD_FAMILY
    other_family_script: ClassVar[str] = ""

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
            raise SDLoRAError(
                f"--pretrained_model_name_or_path is required (the {FAMILY_NAMES[self.family]} base: folder or Hub id)"
            )
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

    def base_vae(self) -> str | None:
        """A VAE to use instead of the base's (``--pretrained_vae_model_name_or_path``, SDXL only)."""
        return None

    def text_encoder_optimizer(self) -> dict[str, float]:
        """The text encoders' own optimizer settings with ``--train_text_encoder`` (``lr``, ``weight_decay``); none:
        they train with the UNet's."""
        return {}

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
    other_family_script: ClassVar[str] = "train_text_to_image_lora_sdxl.py"
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
    other_family_script: ClassVar[str] = "train_dreambooth_lora_sdxl.py"
    #: whether --dataset_name may stand in for --instance_data_dir (diffusers' SDXL DreamBooth script takes one)
    takes_datasets: ClassVar[bool] = False
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
    repeats: int = flag(1, "How many times each instance image appears in an epoch (diffusers' SDXL --repeats).")
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
        if self.takes_datasets:
            if not self.instance_data_dir and not self.dataset_name:
                raise SDLoRAError("--instance_data_dir or --dataset_name is required (the subject's images)")
            if self.instance_data_dir and self.dataset_name:
                raise SDLoRAError("pass --instance_data_dir or --dataset_name, not both (the dataset would win)")
            if self.train_data_dir:
                raise SDLoRAError("DreamBooth reads --instance_data_dir or --dataset_name; drop --train_data_dir")
        else:
            if not self.instance_data_dir:
                raise SDLoRAError("--instance_data_dir is required (a folder of the subject's images)")
            if self.train_data_dir or self.dataset_name:
                raise SDLoRAError("DreamBooth reads --instance_data_dir; drop --train_data_dir / --dataset_name")
        if not self.instance_prompt:
            raise SDLoRAError("--instance_prompt is required (e.g. 'a photo of sks dog')")
        if self.pre_compute_text_embeddings and self.train_text_encoder:
            raise SDLoRAError("--pre_compute_text_embeddings cannot go with --train_text_encoder; drop one")
        if self.repeats < 1:
            raise SDLoRAError(f"--repeats must be >= 1, got {self.repeats}")
        if self.prior_generation_precision == "fp16" and not has_accelerator_device():
            raise SDLoRAError("--prior_generation_precision fp16 needs a GPU; on the CPU use fp32 or bf16")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise SDLoRAError("--with_prior_preservation needs --class_data_dir and --class_prompt")
            if self.num_class_images < 1:
                raise SDLoRAError(f"--num_class_images must be >= 1, got {self.num_class_images}")


# ----------------------------------------------------------------------------------------------------------------------
# SDXL: the same trainer on two text encoders, micro-conditioning and an optional fp16-safe VAE
# ----------------------------------------------------------------------------------------------------------------------

#: Flags of the SD 1.x/2.x scripts that have no SDXL meaning (SDXL's scripts have none of them).
SDXL_TOKENIZER = (
    "SDXL's two CLIP tokenizers each use their own model_max_length and its pipeline passes no attention mask, as "
    "in diffusers' SDXL scripts; drop it"
)
#: diffusers' SDXL flags crispdiff refuses, and why (one line each, naming what to use instead).
SDXL_EDM = (
    "crispdiff trains the base scheduler's DDPM objective (epsilon or v-prediction); EDM-style training and EDM bases "
    "(e.g. Playground v2.5) are not supported; drop it"
)
PRODIGY = "applies to --optimizer prodigy, which crispdiff does not offer (AdamW or --use_8bit_adam); drop it"
NPU_FLASH_ATTENTION = (
    "Ascend NPU kernels are not supported; attention uses PyTorch SDPA (or "
    "--enable_xformers_memory_efficient_attention); drop it"
)
DEBUG_LOSS = (
    "crispdiff logs the loss of each optimizer step, not of each file (images are read from its cache); drop it"
)


@dataclass
class SDXLOptions:
    """What the SDXL scripts add to the SD LoRA flags (diffusers' SDXL scripts' names), and their checks."""

    pretrained_model_name_or_path: str | None = flag(
        None, "The SDXL base (StableDiffusionXLPipeline): a local diffusers folder or a Hub id (required)."
    )
    pretrained_vae_model_name_or_path: str | None = flag(
        None,
        "A VAE (folder or Hub id, e.g. madebyollin/sdxl-vae-fp16-fix) used instead of the base's vae/: to encode "
        "the training images, sample, and in the --save_pipeline export. SDXL's own VAE overflows in fp16.",
    )
    resolution: int = flag(1024, "Training resolution (1024 for SDXL).")
    train_text_encoder: bool = flag(
        False, "Also put LoRA on both CLIP text encoders' attention (no text caching then)."
    )

    def base_vae(self) -> str | None:
        return self.pretrained_vae_model_name_or_path


@dataclass
class SDXLTextToImageLoRAConfig(SDXLOptions, TextToImageLoRAConfig):
    """Everything `train_scripts/train_text_to_image_lora_sdxl.py` accepts: a captioned folder or dataset, SDXL."""

    family: ClassVar[str] = SDXL_FAMILY
    other_family_script: ClassVar[str] = "train_text_to_image_lora.py"
    refused_flags: ClassVar[dict[str, str]] = {
        "tokenizer_name": SDXL_TOKENIZER,
        "tokenizer_max_length": SDXL_TOKENIZER,
        "text_encoder_use_attention_mask": SDXL_TOKENIZER,
        "enable_npu_flash_attention": NPU_FLASH_ATTENTION,
        "debug_loss": DEBUG_LOSS,
    }
    diffusers_script: ClassVar[str | None] = "train_text_to_image_lora_sdxl.py"


@dataclass
class SDXLDreamBoothLoRAConfig(SDXLOptions, DreamBoothLoRAConfig):
    """Everything `train_scripts/train_dreambooth_lora_sdxl.py` accepts: a subject folder or dataset and a prompt."""

    family: ClassVar[str] = SDXL_FAMILY
    other_family_script: ClassVar[str] = "train_dreambooth_lora.py"
    takes_datasets: ClassVar[bool] = True
    refused_flags: ClassVar[dict[str, str]] = {
        "tokenizer_name": SDXL_TOKENIZER,
        "tokenizer_max_length": SDXL_TOKENIZER,
        "text_encoder_use_attention_mask": SDXL_TOKENIZER,
        "pre_compute_text_embeddings": (
            "SDXL's scripts have no such flag: with frozen text encoders every prompt is encoded once anyway; drop it"
        ),
        "do_edm_style_training": SDXL_EDM,
        **{name: PRODIGY for name in ("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
                                      "prodigy_safeguard_warmup")},
    }  # fmt: skip
    conditional_flags: ClassVar[dict[str, Condition]] = {
        **DreamBoothLoRAConfig.conditional_flags,
        "text_encoder_lr": (lambda c: c.train_text_encoder, "--train_text_encoder"),
        "adam_weight_decay_text_encoder": (lambda c: c.train_text_encoder, "--train_text_encoder"),
    }
    diffusers_script: ClassVar[str | None] = "train_dreambooth_lora_sdxl.py"
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        "train_batch_size": 4,
        "max_train_steps": None,  # diffusers: --num_train_epochs 1
        "lr_warmup_steps": 500,
    }

    caption_column: str | None = flag(
        None,
        "Per-image captions from the --dataset_name column or instance_data_dir/metadata.jsonl (empty ones fall back "
        "to --instance_prompt).",
    )
    text_encoder_lr: float = flag(
        5e-6, "Learning rate of both text encoders' LoRA with --train_text_encoder (diffusers' SDXL default)."
    )
    adam_weight_decay_text_encoder: float = flag(
        1e-3, "AdamW weight decay of the text encoders' LoRA with --train_text_encoder."
    )
    adam_weight_decay: float = flag(1e-4, "AdamW weight decay of the UNet's LoRA (diffusers' SDXL default).")
    optimizer: str = flag(
        "AdamW", "The optimizer: AdamW (with --use_8bit_adam, bitsandbytes' 8-bit AdamW). Prodigy is refused.",
        choices=["AdamW", "prodigy"],
    )

    def text_encoder_optimizer(self) -> dict[str, float]:
        return {"lr": self.text_encoder_lr, "weight_decay": self.adam_weight_decay_text_encoder}

    def fill_and_check(self) -> None:
        super().fill_and_check()
        if self.optimizer != "AdamW":
            raise SDLoRAError(f"--optimizer {self.optimizer} is not offered: crispdiff trains with AdamW; drop it")
        if self.text_encoder_lr <= 0:
            raise SDLoRAError(f"--text_encoder_lr must be positive, got {self.text_encoder_lr}")
