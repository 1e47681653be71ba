"""Loading a Stable Diffusion base model (1.x / 2.x; others refused) and building an inference pipeline on it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from crispdiff.diffusion.schedule import NoiseSchedule
from crispdiff.sd.config import SUPPORTED_PIPELINES, SDLoRAError

logger = logging.getLogger("crispdiff")


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


def load_sd(
    name_or_path: str, revision: str | None = None, variant: str | None = None, tokenizer_name: str | None = None
) -> SDParts:
    """Load tokenizer, text encoder, VAE, UNet and scheduler of an SD 1.x / 2.x base in float32.

    ``tokenizer_name`` (``--tokenizer_name``): a tokenizer folder or id used instead of the base's ``tokenizer/``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    check_base_model(name_or_path, revision)
    common = {"revision": revision}
    if tokenizer_name:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_name, revision=revision)
        except (OSError, ValueError) as err:
            what = type(err).__name__
            raise SDLoRAError(f"--tokenizer_name {tokenizer_name!r}: no CLIP tokenizer there ({what})") from err
    else:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common)
    from transformers import CLIPTextModel

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
