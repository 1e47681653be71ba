"""Loading a Stable Diffusion base model (SD 1.x / 2.x or SDXL; others refused) and building an inference pipeline on
it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from crispdiff.diffusion.schedule import NoiseSchedule
from crispdiff.sd.config import (
    FAMILY_NAMES,
    FAMILY_PIPELINES,
    SD_FAMILY,
    SDXL_FAMILY,
    SUPPORTED_PIPELINES,
    SDLoRAError,
)

logger = logging.getLogger("crispdiff")

#: The components a base of each family must have (model_index.json), beyond the VAE, UNet and scheduler.
FAMILY_TEXT_PARTS = {
    SD_FAMILY: ("tokenizer", "text_encoder"),
    SDXL_FAMILY: ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
}

#: The VAE flag of the SDXL scripts (diffusers' name).
SDXL_VAE_FLAG = "--pretrained_vae_model_name_or_path"


@dataclass
class SDParts:
    """The pieces of a Stable Diffusion base model, loaded in float32 on the CPU (SDXL: two tokenizers and text
    encoders, the second with a projection whose pooled output conditions the UNet)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    version: str  # "sd_v1" / "sd_v2" / "sdxl_base_v1-0", for the kohya metadata
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def text_encoders(self) -> list[Any]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])


def base_family(name_or_path: str, revision: str | None = None) -> tuple[str, str]:
    """``(family, pipeline class name)`` of a base, refusing anything but SD 1.x / 2.x and SDXL in one line."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as err:  # noqa: BLE001 - offline, missing folder and missing file all mean the same here
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r}: no model_index.json ({type(err).__name__}); "
            "pass a diffusers Stable Diffusion or SDXL folder"
        ) from err
    name = index.get("_class_name")
    family = next((f for f, names in FAMILY_PIPELINES.items() if name in names), None)
    if family is None:
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r} is a {name}; crispdiff's LoRA scripts support "
            f"{', '.join(SUPPORTED_PIPELINES)} (Stable Diffusion 1.x/2.x and SDXL) only"
        )
    scheduler = (index.get("scheduler") or [None, None])[1] or ""
    if scheduler.startswith("EDM"):
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r} has an {scheduler} (an EDM model such as Playground "
            "v2.5); crispdiff trains the DDPM objective (epsilon or v-prediction) of SD and SDXL bases only"
        )
    return family, str(name)


def check_text_parts(name_or_path: str, revision: str | None, family: str) -> None:
    """Refuse a base whose model_index.json lacks a tokenizer or text encoder its family needs (SDXL: two of each)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    missing = [part for part in FAMILY_TEXT_PARTS[family] if not (index.get(part) or [None])[0]]
    if missing:
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r} is a {index.get('_class_name')} without "
            f"{', '.join(missing)}, which every {FAMILY_NAMES[family]} base has"
        )


def check_base_family(name_or_path: str, revision: str | None, family: str, script: str) -> None:
    """Refuse a base of the other family, naming the script that trains it (``script``)."""
    found, name = base_family(name_or_path, revision)
    if found != family:
        raise SDLoRAError(
            f"--pretrained_model_name_or_path {name_or_path!r} is a {name} ({FAMILY_NAMES[found]}); this script "
            f"trains {FAMILY_NAMES[family]}: use train_scripts/{script}"
        )


def load_vae_override(name_or_path: str) -> Any:
    """``--pretrained_vae_model_name_or_path``: an AutoencoderKL (folder, pipeline folder or Hub id) in float32."""
    from diffusers import AutoencoderKL

    from crispdiff.core.errors import UserError
    from crispdiff.latent.vae import load_vae

    try:
        vae = load_vae(name_or_path, flag=SDXL_VAE_FLAG)
    except ValueError as err:
        raise SDLoRAError(str(err)) from err
    except UserError:
        raise
    if not isinstance(vae, AutoencoderKL):
        raise SDLoRAError(f"{SDXL_VAE_FLAG} {name_or_path!r} is a {type(vae).__name__}; pass an AutoencoderKL")
    return vae.float()


def check_latent_statistics(vae: Any, where: str) -> None:
    """Refuse a VAE whose config states per-channel ``latents_mean`` / ``latents_std`` (Playground v2.5): its latents
    are standardised per channel, which crispdiff's latent space (one scale and shift) does not do."""
    if vae.config.get("latents_mean") is not None or vae.config.get("latents_std") is not None:
        raise SDLoRAError(
            f"{where}: the VAE states per-channel latents_mean / latents_std (a Playground v2.5-style model), which "
            "crispdiff's LoRA trainer does not support; use an SDXL or SD base"
        )


def load_sd(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    tokenizer_name: str | None = None,
    vae_name_or_path: str | None = None,
) -> SDParts:
    """Load tokenizer(s), text encoder(s), VAE, UNet and scheduler of an SD 1.x / 2.x or SDXL base in float32.

    ``tokenizer_name`` (``--tokenizer_name``, SD 1.x / 2.x): a tokenizer folder or id used instead of the base's
    ``tokenizer/``; ``vae_name_or_path`` (``--pretrained_vae_model_name_or_path``): a VAE used instead of ``vae/``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    family, _ = base_family(name_or_path, revision)
    check_text_parts(name_or_path, revision, family)
    common = {"revision": revision}
    if tokenizer_name:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_name, revision=revision)
        except (OSError, ValueError) as err:
            what = type(err).__name__
            raise SDLoRAError(f"--tokenizer_name {tokenizer_name!r}: no CLIP tokenizer there ({what})") from err
    else:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **common)
    tokenizer_2 = text_encoder_2 = None
    if family == SDXL_FAMILY:
        from transformers import CLIPTextModelWithProjection

        tokenizer_2 = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **common)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder="text_encoder_2", variant=variant, **common
        )
    if vae_name_or_path:
        vae = load_vae_override(vae_name_or_path)
    else:
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **common)
    where = f"{SDXL_VAE_FLAG} {vae_name_or_path}" if vae_name_or_path else f"the base {name_or_path}"
    check_latent_statistics(vae, where)
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **common)
    scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **common)
    for model in (text_encoder, text_encoder_2, vae, unet):
        if model is not None:
            model.float().requires_grad_(False)
    if family == SDXL_FAMILY:
        version = "sdxl_base_v1-0"
    else:
        version = "sd_v2" if text_encoder.config.hidden_size >= 1024 else "sd_v1"
    return SDParts(tokenizer, text_encoder, vae, unet, scheduler, version, tokenizer_2, text_encoder_2)


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


def inference_pipeline(parts: SDParts, unet: Any = None, text_encoders: list[Any] | None = None) -> Any:
    """A plain ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) over these parts with DPM-Solver++ (the
    sampler crispdiff defaults to); ``unet`` / ``text_encoders`` replace the base's (the in-training models)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(parts.scheduler.config, algorithm_type="dpmsolver++")
    encoders = text_encoders if text_encoders is not None else parts.text_encoders
    unet = unet if unet is not None else parts.unet
    if parts.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=encoders[0],
            tokenizer=parts.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
