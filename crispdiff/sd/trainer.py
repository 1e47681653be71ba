"""Plan D: LoRA and DreamBooth fine-tuning of Stable Diffusion 1.x / 2.x, and exporting the result as a pipeline.

Why crispdiff has its own rather than pointing at diffusers' ``train_dreambooth_lora.py`` and
``train_text_to_image_lora.py``: what their users keep asking for is a property of the loop and of the files, not of
the model, and crispdiff's loop already has it. This module plugs Stable Diffusion into that loop:

- the UNet (and with ``--train_text_encoder`` the CLIP text encoder) gets peft LoRA (or DoRA) adapters; the base
  weights are frozen in the training precision, the adapter weights stay fp32 so fp16 loss scaling never sees fp16
  gradients (diffusers #6086, #13124);
- the VAE is frozen, so every image is encoded once into the existing latent cache (``crispdiff.latent.cache``) and
  trained through ``crispdiff.latent.trainer.LatentSpace``; with a frozen text encoder every distinct prompt is encoded
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

``export_sd`` fuses a LoRA into its base model and writes a ``CrispDiffSDPipeline`` folder
(``pipelines/pipeline_crispdiff_sd.py``): DPM-Solver++ by default, an optional SR component, and ``output_size`` for
the "generate at 512, downsample to 64 with an antialiased Lanczos filter" path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from crispdiff.core.config import DataConfig, HubConfig, LoopConfig, flag
from crispdiff.core.errors import FlagError, one_line
from crispdiff.core.io import staging_folder, swap_folder_into_place, write_text_atomic
from crispdiff.diffusion.schedule import NoiseSchedule, sample_noise
from crispdiff.latent.cache import DTYPES
from crispdiff.latent.trainer import LatentSpace, load_latents
from crispdiff.train.loop import LoopTrainer, has_accelerator_device, refuse_to_overwrite, run_trainer, start_run
from crispdiff.train.lora import (
    SD_UNET_LORA_PRESETS,
    TEXT_ENCODER_LORA_TARGETS,
    adapter_config,
    expand_targets,
    inject_lora,
    lora_state,
)

logger = logging.getLogger("crispdiff")

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
SAMPLES_NAME = "samples.png"
CHECKPOINT_LORA_FILES = {"unet": "lora_unet.safetensors", "text_encoder": "lora_text_encoder.safetensors"}
CLASS_IMAGES_RECORD = ".crispdiff_class_images.json"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


class SDLoRAError(FlagError):
    """A flag, base model or file the LoRA trainer cannot use; the one-line message names it and what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SDLoRAConfig(DataConfig, HubConfig, LoopConfig):
    """The flags both LoRA scripts share (names as in diffusers' example scripts)."""

    pretrained_model_name_or_path: str | None = flag(
        None, "The Stable Diffusion 1.x / 2.x base: a local diffusers folder or a Hub id (required)."
    )
    revision: str | None = flag(None, "Revision (branch, tag or commit) of the base model on the Hub.")
    variant: str | None = flag(None, "Weights variant of the base model (e.g. fp16).")
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
    num_validation_images: int = flag(4, "Images per validation grid.")
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

    def validate(self) -> None:
        """Refuse flag combinations that would silently do something else than asked, one line each."""
        if not self.pretrained_model_name_or_path:
            raise SDLoRAError("--pretrained_model_name_or_path is required (a Stable Diffusion 1.x/2.x folder or id)")
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

    caption_column: str | None = flag("text", "Column holding each image's caption (metadata.jsonl or dataset).")

    def validate(self) -> None:
        super().validate()
        if not self.caption_column:
            raise SDLoRAError("--caption_column is required: text-to-image LoRA learns from per-image captions")


@dataclass
class DreamBoothLoRAConfig(SDLoRAConfig):
    """Everything `train_scripts/train_dreambooth_lora.py` accepts: a few subject images and a prompt."""

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
    train_batch_size: int = flag(1, "Instance images per process per micro-batch (plus as many class images).")
    max_train_steps: int | None = flag(400, "Optimizer steps to train for.")

    def validate(self) -> None:
        super().validate()
        if not self.instance_data_dir:
            raise SDLoRAError("--instance_data_dir is required (a folder of the subject's images)")
        if not self.instance_prompt:
            raise SDLoRAError("--instance_prompt is required (e.g. 'a photo of sks dog')")
        if self.train_data_dir or self.dataset_name:
            raise SDLoRAError("DreamBooth reads --instance_data_dir; drop --train_data_dir / --dataset_name")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise SDLoRAError("--with_prior_preservation needs --class_data_dir and --class_prompt")
            if self.num_class_images < 1:
                raise SDLoRAError(f"--num_class_images must be >= 1, got {self.num_class_images}")


# ----------------------------------------------------------------------------------------------------------------------
# The base model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion 1.x / 2.x base model, loaded in float32 on the CPU."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    version: str  # "sd_v1" / "sd_v2", for the kohya metadata


def check_base_model(name_or_path: str, revision: str | None = None) -> str:
    """The base's pipeline class name, refusing anything but SD 1.x / 2.x with a one-line reason."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as err:  # noqa: BLE001 - offline, missing folder and missing file all mean the same here
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r}: no model_index.json ({type(err).__name__}); "
            "pass a diffusers Stable Diffusion folder"
        ) from err
    name = index.get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r} is a {name}; crispdiff's LoRA scripts support "
            "Stable Diffusion 1.x/2.x (StableDiffusionPipeline) only for now"
        )
    return str(name)


def load_sd(name_or_path: str, revision: str | None = None, variant: str | None = None) -> SDParts:
    """Load tokenizer, text encoder, VAE, UNet and scheduler of an SD 1.x / 2.x base in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_base_model(name_or_path, revision)
    common = {"revision": revision}
    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **common)
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **common)
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **common)
    scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **common)
    for model in (text_encoder, vae, unet):
        model.float().requires_grad_(False)
    version = "sd_v2" if text_encoder.config.hidden_size >= 1024 else "sd_v1"
    return SDParts(tokenizer, text_encoder, vae, unet, scheduler, version)


def base_schedule(scheduler: Any, prediction_type: str | None) -> NoiseSchedule:
    """The base model's forward process: its own betas and prediction type (a different one is refused)."""
    base = scheduler.config.prediction_type
    if prediction_type and prediction_type != base:
        raise SDLoRAError(
            f"--prediction_type {prediction_type} differs from the base scheduler's {base}; a LoRA cannot retrain "
            "the UNet for a new target, drop the flag"
        )
    betas = scheduler.betas.double()  # already rescaled by the scheduler when its config asks for zero terminal SNR
    if scheduler.config.get("rescale_betas_zero_snr") and base == "epsilon":
        raise SDLoRAError("the base scheduler has zero terminal SNR with epsilon prediction, which cannot be trained")
    return NoiseSchedule(betas, base)


def inference_pipeline(parts: SDParts, unet: Any = None, text_encoder: Any = None) -> Any:
    """A plain ``StableDiffusionPipeline`` over these parts with DPM-Solver++ (the sampler crispdiff defaults to)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(parts.scheduler.config, algorithm_type="dpmsolver++")
    pipeline = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=text_encoder if text_encoder is not None else parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet if unet is not None else parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and images
# ----------------------------------------------------------------------------------------------------------------------


class PromptBank:
    """Every distinct prompt of a run, tokenized once and, with a frozen text encoder, encoded once.

    Why: the CLIP text encoder costs about as much as a small UNet step and its output for a given prompt never
    changes while it is frozen; DreamBooth has one or two prompts for the whole run.
    """

    def __init__(self, tokenizer: Any, prompts: list[str]):
        self.prompts = list(dict.fromkeys(prompts))
        self.position = {p: i for i, p in enumerate(self.prompts)}
        self.input_ids = tokenizer(
            self.prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.embeddings: torch.Tensor | None = None

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.position[p] for p in prompts], dtype=torch.long)

    @torch.no_grad()
    def precompute(self, text_encoder: Any, device: torch.device, batch_size: int = 64) -> None:
        """Encode every prompt once (as the pipeline does: last hidden state, no attention mask)."""
        outputs = [text_encoder(chunk.to(device))[0].float().cpu() for chunk in self.input_ids.split(batch_size)]
        self.embeddings = torch.cat(outputs)

    def encode(self, ids: torch.Tensor, text_encoder: Any | None, device: torch.device) -> torch.Tensor:
        """Hidden states for these prompt ids: cached, or through the (trained) text encoder."""
        if self.embeddings is not None and text_encoder is None:
            return self.embeddings[ids.cpu()].to(device)
        return text_encoder(self.input_ids[ids.cpu()].to(device))[0]


def image_view(config: SDLoRAConfig, **changes: Any) -> Any:
    """The data flags of ``config`` with some replaced (e.g. another folder), for ``load_images``."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(DataConfig)}
    values.update(changes)
    return types.SimpleNamespace(**values)


@dataclass
class TrainSet:
    """Images as cached latents, and the prompt id of each."""

    space: LatentSpace
    prompt_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.space)


def latent_space(view: Any, config: SDLoRAConfig, vae: Any, show_progress: bool) -> tuple[LatentSpace, Any]:
    """Load the images of ``view`` and their latents (encoded once, then reused from the cache).

    The scaling is the VAE config's (SD's 0.18215 when unstated), never measured: Stable Diffusion's own pipeline
    decodes with that value, so the LoRA must train in the same space.
    """
    from crispdiff.latent.vae import read_scaling

    data, cache = load_latents(view, config, vae, show_progress=show_progress)
    scale, shift = read_scaling(vae)
    scale = float(vae.config.scaling_factor) if scale is None else scale
    return LatentSpace(cache, vae, data, scaling_factor=scale, shift_factor=shift), data


def captions_for(data: Any, fallback: str | None) -> list[str]:
    """Each image's caption, empty ones replaced by ``fallback`` (DreamBooth's instance prompt)."""
    captions = data.captions or [""] * len(data)
    if fallback is None:
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            rows = getattr(data, "metadata", None) or []
            first = rows[empty[0]].get("file_name", empty[0]) if len(rows) > empty[0] else empty[0]
            raise SDLoRAError(
                f"{len(empty)} image(s) have an empty --caption_column caption (first: {first}); fill them"
            )
        return list(captions)
    return [c if c.strip() else fallback for c in captions]


def _list_images(folder: Path) -> list[Path]:
    from crispdiff.data.loading import IMAGE_EXTENSIONS

    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@torch.no_grad()
def generate_class_images(config: DreamBoothLoRAConfig, parts: SDParts, device: torch.device) -> int:
    """Top up ``--class_data_dir`` to ``--num_class_images`` with the base model (DPM-Solver++); returns how many.

    Existing images are kept, so the class set is generated once and reused by every later run. Image ``i`` is drawn
    with seed ``--seed + i`` and written atomically, so an interrupted generation resumes where it stopped and gives
    the same images as an uninterrupted one.
    """
    from crispdiff.core.images import save_image_atomic

    folder = Path(config.class_data_dir or "")
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / CLASS_IMAGES_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("class_prompt") != config.class_prompt:
            logger.warning(
                "%s holds images generated for %r, not --class_prompt %r; reusing them (empty the folder to redo)",
                folder,
                record.get("class_prompt"),
                config.class_prompt,
            )
    existing = len(_list_images(folder))
    missing = config.num_class_images - existing
    if missing <= 0:
        return 0
    pipeline = inference_pipeline(parts).to(device)
    made = 0
    index = 0
    while made < missing:
        batch = []
        while len(batch) < min(config.sample_batch_size, missing - made):
            path = folder / f"class_{index:05d}.png"
            if not path.exists():
                batch.append((index, path))
            index += 1
        generators = [torch.Generator().manual_seed(config.seed + i) for i, _ in batch]
        images = pipeline(
            [config.class_prompt] * len(batch),
            num_inference_steps=config.class_inference_steps,
            height=config.resolution,
            width=config.resolution,
            generator=generators,
        ).images
        for (_, path), image in zip(batch, images):
            save_image_atomic(image, path)
        made += len(batch)
    record = {"class_prompt": config.class_prompt, "base": str(config.pretrained_model_name_or_path)}
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return made


# ----------------------------------------------------------------------------------------------------------------------
# LoRA state
# ----------------------------------------------------------------------------------------------------------------------


def load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Put adapter weights saved by :func:`lora_state` back; refuses a file that does not match the adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    own = set(lora_state(model))
    if unexpected or own - set(state):
        raise SDLoRAError(
            "the checkpoint's LoRA weights do not match this run's adapter (different --rank / "
            "--lora_target_modules / --use_dora?); resume with the flags the run started with"
        )


def kohya_state_dict(
    unet_state: dict[str, torch.Tensor], text_state: dict[str, torch.Tensor] | None, alpha: float
) -> dict[str, torch.Tensor]:
    """peft LoRA weights -> kohya's sd-scripts layout (what A1111, ComfyUI and kohya load).

    kohya names a module by its diffusers path with dots as underscores, prefixed ``lora_unet_`` or ``lora_te_``;
    ``lora_A`` / ``lora_B`` are ``lora_down`` / ``lora_up``, and every module carries its ``alpha`` (the real one:
    diffusers' generic converter writes the rank instead, which rescales a LoRA trained with another alpha).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, state in (("lora_unet", unet_state), ("lora_te", text_state or {})):
        for key, tensor in state.items():
            module, _, rest = key.partition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                raise SDLoRAError(
                    f"cannot write {key!r} in kohya format (only plain LoRA weights); drop --export_kohya"
                )
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.{'lora_down' if rest[0] == 'A' else 'lora_up'}.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _replace_file(staged: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)


def save_lora_weights(
    output_dir: Path, unet: Any, text_encoder: Any | None, *, kohya: bool = False, version: str = "sd_v1"
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format + adapter metadata) atomically, and the kohya copy.

    diffusers' own ``save_lora_weights`` writes the file; it is written into a hidden folder and renamed into place,
    so a reader never sees half a file.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    staging = output_dir / f".lora-{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        unet_state = lora_state(unet)
        text_state = lora_state(text_encoder) if text_encoder is not None else None
        StableDiffusionPipeline.save_lora_weights(
            staging,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state) if text_state else None,
            unet_lora_adapter_metadata=adapter_config(unet),
            text_encoder_lora_adapter_metadata=adapter_config(text_encoder) if text_encoder is not None else None,
            safe_serialization=True,
        )
        _replace_file(staging / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        if kohya:
            config = unet.peft_config["default"]
            metadata = {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha),
                "ss_base_model_version": version,
            }
            save_file(
                kohya_state_dict(unet_state, text_state, config.lora_alpha), staging / KOHYA_WEIGHTS_NAME, metadata
            )
            _replace_file(staging / KOHYA_WEIGHTS_NAME, output_dir / KOHYA_WEIGHTS_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / LORA_WEIGHTS_NAME


def model_card(config: SDLoRAConfig, has_samples: bool, command: list[str]) -> str:
    """README.md for the LoRA folder: base model, prompt, tags, samples and how to load it with plain diffusers."""
    dreambooth = isinstance(config, DreamBoothLoRAConfig)
    tags = ["text-to-image", "stable-diffusion", "lora", "diffusers", "crispdiff"] + (
        ["dreambooth"] if dreambooth else []
    )
    prompt = config.instance_prompt if dreambooth else config.validation_prompt
    header = [
        "---",
        f"base_model: {config.pretrained_model_name_or_path}",
        "library_name: diffusers",
        "license: creativeml-openrail-m",
        "tags:",
        *[f"- {tag}" for tag in tags],
    ]
    if prompt:
        header.append(f"instance_prompt: {json.dumps(prompt)}")
    header.append("---")
    kind = "DreamBooth LoRA" if dreambooth else "text-to-image LoRA"
    alpha = config.lora_alpha if config.lora_alpha is not None else config.rank
    body = [
        "",
        f"# {Path(config.output_dir).name}",
        "",
        f"A {kind} ({'DoRA, ' if config.use_dora else ''}rank {config.rank}, alpha {alpha}) for "
        f"`{config.pretrained_model_name_or_path}`, trained with crispdiff for {config.max_train_steps} steps of "
        f"{config.train_batch_size} image(s) at {config.resolution} px"
        + (" with the text encoder" if config.train_text_encoder else "")
        + (f", prompt `{prompt}`" if prompt else "")
        + ".",
        "",
    ]
    if has_samples:
        body += [f"![samples]({SAMPLES_NAME})", ""]
    body += [
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{config.pretrained_model_name_or_path}")',
        'pipe.load_lora_weights("path/to/this/folder")',
        f"image = pipe({json.dumps(prompt or 'a prompt')}, num_inference_steps=25).images[0]",
        "```",
        "",
        f"Kohya / A1111 / ComfyUI: `{KOHYA_WEIGHTS_NAME}`." if config.export_kohya else "",
        "",
        f"Command: `{' '.join(command)}`",
        "",
    ]
    return "\n".join(header + body)


def push_lora_to_hub(folder: Path, config: SDLoRAConfig) -> str:
    """Upload the LoRA folder (checkpoints and logs left out) in one commit, with crispdiff's hub checks."""
    from crispdiff.publish.hub import HubUploadError, _resolve_token, _upload, hub_offline

    repo_id = config.hub_model_id or Path(config.output_dir).resolve().name
    token = _resolve_token(config.hub_token)
    if not token:
        raise HubUploadError(f"cannot upload to {repo_id!r}: no token (--hub_token, HF_TOKEN or `hf auth login`)")
    if hub_offline():
        raise HubUploadError(f"cannot upload to {repo_id!r}: HF_HUB_OFFLINE=1; unset it and upload {folder} again")
    return _upload(folder, repo_id, config.hub_private_repo, token, "Upload crispdiff LoRA")


# ----------------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------------


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
    ):
        super().__init__(config, accelerator, max(len(instance), len(prior) if prior else 0))
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
        unet, text_encoder = parts.unet, parts.text_encoder
        try:
            unet.add_adapter(config.lora_config(config.unet_targets()))
        except ValueError as err:  # peft: none of the target modules exists in the UNet
            raise SDLoRAError(
                f"--lora_target_modules {' '.join(config.lora_target_modules)} matched no UNet module "
                f"({one_line(err)[:200]}); use the presets {sorted(SD_UNET_LORA_PRESETS)} or module names such as to_q"
            ) from err
        if config.train_text_encoder:
            inject_lora(text_encoder, config.lora_config(TEXT_ENCODER_LORA_TARGETS))
        else:
            prompts.precompute(text_encoder.to(device), device)
        # frozen base weights in the training precision, adapter weights in fp32 (the optimizer's master copy)
        unet.to(device, dtype=self.weight_dtype)
        text_encoder.to(device, dtype=self.weight_dtype)
        parts.vae.to(device)  # fp32: it only decodes validation samples once the latents are cached
        trainable = [p for p in unet.parameters() if p.requires_grad]
        if config.train_text_encoder:
            trainable += [p for p in text_encoder.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
        if not trainable:
            raise SDLoRAError(f"--lora_target_modules {config.lora_target_modules} matched no module of the UNet")
        self.num_trainable = sum(p.numel() for p in trainable)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                text_encoder.gradient_checkpointing_enable()
        if config.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        unet.train()
        text_encoder.train(config.train_text_encoder)

        self.setup_optimization(unet, trainable)
        if config.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer = accelerator.prepare(unet, text_encoder, self.optimizer)
        else:
            self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
            self.text_encoder = None
        accelerator.register_save_state_pre_hook(self._save_lora_checkpoint)
        accelerator.register_load_state_pre_hook(self._load_lora_checkpoint)
        self.last_grid: Any = None

    # -- checkpoints hold the adapters only (safetensors), not the frozen base ------------------------------------
    def _named_models(self) -> dict[str, Any]:
        named = {"unet": self.accelerator.unwrap_model(self.unet)}
        if self.text_encoder is not None:
            named["text_encoder"] = self.accelerator.unwrap_model(self.text_encoder)
        return named

    def _role(self, model: Any) -> str:
        bare = self.accelerator.unwrap_model(model)
        for role, candidate in self._named_models().items():
            if bare is candidate:
                return role
        raise SDLoRAError(f"unexpected model {type(bare).__name__} in the checkpoint")

    def _save_lora_checkpoint(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        """accelerate's save hook (called on every process): the main process writes the adapters, once."""
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            for model in models:
                path = Path(output_dir) / CHECKPOINT_LORA_FILES[self._role(model)]
                save_file(lora_state(self.accelerator.unwrap_model(model)), str(path))
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
        text = (
            "text encoder trained" if self.text_encoder is not None else f"{len(self.prompts.prompts)} prompt(s) cached"
        )
        return f"LoRA ({self.num_trainable:,} weights, {self.schedule.prediction_type}) on {what}, {text}"

    def ema_parameters(self) -> Any:
        return iter(())

    def micro_step(self) -> dict[str, torch.Tensor]:
        config, device = self.config, self.accelerator.device
        index = self.batches.indices(self.position)
        sets = [self.instance] + ([self.prior] if self.prior is not None else [])
        latents, prompt_ids, sizes = [], [], []
        for part in sets:
            rows = index % len(part)
            latents.append(part.space.x0(rows, self.data_generator, device))
            prompt_ids.append(part.prompt_ids[rows])
            sizes.append(len(rows))
        x0, ids = torch.cat(latents), torch.cat(prompt_ids)
        noise = sample_noise(tuple(x0.shape), self.noise_generator, device, config.noise_offset)
        t = self.schedule.sample_timesteps(x0.shape[0], self.noise_generator, device)
        x_t = self.schedule.add_noise(x0, noise, t)
        models = [self.unet] + ([self.text_encoder] if self.text_encoder is not None else [])
        with self.accelerator.accumulate(*models):
            hidden = self.prompts.encode(ids, self.text_encoder, device)
            prediction = self.unet(x_t.to(self.weight_dtype), t, hidden.to(self.weight_dtype)).sample
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
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            for model in models.values():
                model.eval()
            pipeline = inference_pipeline(self.parts, models["unet"], models.get("text_encoder"))
            generator = torch.Generator().manual_seed(self.config.seed)
            with self.accelerator.autocast():
                images = pipeline(
                    [prompt] * count,
                    num_inference_steps=self.config.validation_inference_steps,
                    height=self.config.resolution,
                    width=self.config.resolution,
                    generator=generator,
                    output_type="pt",
                ).images
        finally:
            for name, model in models.items():
                model.train(modes[name])
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        return images.float().cpu()

    def sample_prompt(self) -> str:
        return self.config.validation_prompt or self.prompts.prompts[int(self.instance.prompt_ids[0])]

    def validate(self) -> None:
        if not self.accelerator.is_main_process or not self.config.validation_prompt:
            return
        from crispdiff.core.images import make_grid, save_image_atomic

        grid = make_grid(
            self.sample(self.config.validation_prompt, self.config.num_validation_images), value_range=(0, 1)
        )
        save_image_atomic(grid, self.output_dir / "samples" / f"step_{self.step:07d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        self.last_grid = grid

    def finish(self) -> Path:
        """Save the LoRA (and kohya copy), a sample grid and the model card; optionally the fused pipeline; push."""
        from crispdiff.core.images import make_grid, save_image_atomic

        config = self.config
        models = self._named_models()
        path = save_lora_weights(
            self.output_dir,
            models["unet"],
            models.get("text_encoder"),
            kohya=config.export_kohya,
            version=self.parts.version,
        )
        images = self.sample(self.sample_prompt(), config.num_validation_images)
        save_image_atomic(make_grid(images, value_range=(0, 1)), self.output_dir / SAMPLES_NAME)
        command = [Path(sys.argv[0]).name if sys.argv else "train", *sys.argv[1:]]
        write_text_atomic(self.output_dir / "README.md", model_card(config, True, command))
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
            )
            self.accelerator.print(f"Pipeline with the LoRA fused saved to {folder}.")
        if config.push_to_hub:
            self.accelerator.print(f"Uploaded to {push_lora_to_hub(self.output_dir, config)}")
        return path


# ----------------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------------


def _prepare(config: SDLoRAConfig) -> tuple[Accelerator, SDParts]:
    config.validate()
    refuse_to_overwrite(config, Path(config.output_dir), LORA_WEIGHTS_NAME, "trained LoRA weights")
    parts = load_sd(config.pretrained_model_name_or_path or "", config.revision, config.variant)
    base_schedule(parts.scheduler, config.prediction_type)  # refuse a prediction-type switch before any work
    accelerator = start_run(config)
    parts.vae.to(accelerator.device)
    return accelerator, parts


def train_text_to_image_lora(config: TextToImageLoRAConfig) -> Path | None:
    """LoRA on a captioned folder or dataset; returns the LoRA file on the main process."""
    accelerator, parts = _prepare(config)
    show = accelerator.is_local_main_process
    with accelerator.main_process_first():
        space, data = latent_space(image_view(config), config, parts.vae, show)
    captions = captions_for(data, None)
    prompts = PromptBank(parts.tokenizer, captions + ([config.validation_prompt] if config.validation_prompt else []))
    instance = TrainSet(space, prompts.ids(captions))
    return run_trainer(SDLoRATrainer(config, accelerator, parts, prompts, instance))


def train_dreambooth_lora(config: DreamBoothLoRAConfig) -> Path | None:
    """DreamBooth LoRA on a subject folder, with optional prior preservation; returns the LoRA file (main process)."""
    accelerator, parts = _prepare(config)
    show = accelerator.is_local_main_process
    with accelerator.main_process_first():
        view = image_view(config, train_data_dir=config.instance_data_dir, dataset_name=None)
        space, data = latent_space(view, config, parts.vae, show)
        prior_space = None
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
            prior_space, _ = latent_space(class_view, config, parts.vae, show)
    captions = captions_for(data, config.instance_prompt)
    extra = [config.class_prompt] if prior_space is not None else []
    extra += [config.validation_prompt] if config.validation_prompt else []
    prompts = PromptBank(parts.tokenizer, captions + [p for p in extra if p])
    instance = TrainSet(space, prompts.ids(captions))
    prior = None
    if prior_space is not None:
        prior = TrainSet(prior_space, prompts.ids([config.class_prompt or ""] * len(prior_space)))
    return run_trainer(SDLoRATrainer(config, accelerator, parts, prompts, instance, prior))


# ----------------------------------------------------------------------------------------------------------------------
# Export: the base with the LoRA fused, as a CrispDiffSDPipeline folder
# ----------------------------------------------------------------------------------------------------------------------


def fuse_text_encoder_lora(text_encoder: Any, state: dict[str, torch.Tensor], alpha: float, scale: float) -> None:
    """Add ``scale * alpha / r * up @ down`` to each text-encoder Linear that the file's LoRA targets.

    The few lines diffusers would otherwise run through transformers' peft integration, which needs a newer peft
    (see :func:`crispdiff.train.lora.inject_lora`); plain LoRA only (DoRA on the text encoder is refused at training
    time).
    """
    suffix_down, suffix_up = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"
    modules = sorted({k[: -len(suffix_down)] for k in state if k.endswith(suffix_down)})
    if len(modules) * 2 != len(state):
        raise SDLoRAError("the LoRA file's text-encoder part is not plain LoRA (down/up pairs); cannot fuse it")
    with torch.no_grad():
        for name in modules:
            down, up = state[name + suffix_down].float(), state[name + suffix_up].float()
            layer = text_encoder.get_submodule(name)
            delta = (up @ down) * (scale * alpha / down.shape[0])
            layer.weight.add_(delta.to(layer.weight.dtype))


def fuse_lora_file(pipeline: Any, folder: Path, scale: float = 1.0) -> None:
    """Fuse ``folder``'s LoRA into ``pipeline`` (a StableDiffusionPipeline) and drop the adapter layers.

    The UNet part goes through diffusers' own loader and ``fuse_lora`` (any target, DoRA included); a text-encoder
    part is fused by :func:`fuse_text_encoder_lora` after the UNet part is split off into a file of its own, with the
    adapter metadata (alpha) kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / LORA_WEIGHTS_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise SDLoRAError(f"--lora {folder}: no {LORA_WEIGHTS_NAME} there")
    with safe_open(str(path), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no items()
        metadata = handle.metadata() or {}
    text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
    unet = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    staging = path.parent / f".{path.stem}.fuse-{uuid.uuid4().hex[:8]}"
    try:
        if unet:
            source = path
            if text:
                staging.mkdir()
                source = staging / LORA_WEIGHTS_NAME
                save_file(unet, str(source), metadata)
            pipeline.load_lora_weights(str(source.parent), weight_name=source.name)
            pipeline.fuse_lora(components=["unet"], lora_scale=scale)
            pipeline.unload_lora_weights()  # the fused weights stay; the adapter layers go
        if text:
            adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
            alpha = adapter.get("text_encoder.lora_alpha")
            if alpha is None:
                raise SDLoRAError(f"{path} has a text-encoder LoRA but no adapter metadata (lora_alpha); cannot fuse")
            fuse_text_encoder_lora(pipeline.text_encoder, text, float(alpha), scale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_sd_pipeline(
    base: str,
    lora: str | os.PathLike | None,
    *,
    sr_model: str | None = None,
    output_size: int | None = None,
    sr_strength: float = 0.5,
    lora_scale: float = 1.0,
    revision: str | None = None,
    variant: str | None = None,
) -> Any:
    """The in-memory ``CrispDiffSDPipeline``: base + fused LoRA, DPM-Solver++, optional SR, output size."""
    from crispdiff.pipelines.pipeline_crispdiff_sd import CrispDiffSDPipeline

    parts = load_sd(base, revision, variant)
    pipeline = inference_pipeline(parts)
    if lora is not None:
        fuse_lora_file(pipeline, Path(lora), lora_scale)
    sr = None
    if sr_model:
        from crispdiff.publish.sr import load_sr_model

        sr = load_sr_model(sr_model)
    return CrispDiffSDPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        sr_model=sr,
        output_size=output_size,
        sr_strength=sr_strength,
    )


def export_sd(
    base: str,
    lora: str | os.PathLike | None,
    out: str | os.PathLike,
    **options: Any,
) -> Path:
    """Write the pipeline folder atomically (staged beside ``out``, swapped in when complete); returns its path."""
    pipeline = build_sd_pipeline(base, lora, **options)
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target, "tmp")
    try:
        pipeline.save_pretrained(staging)
        provenance = {"base": str(base), "lora": None if lora is None else str(lora)}
        provenance.update({k: v for k, v in options.items() if v is not None})
        write_text_atomic(staging / "crispdiff_export.json", json.dumps(provenance, indent=2, default=str) + "\n")
        swap_folder_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
