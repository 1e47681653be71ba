"""The files a Stable Diffusion LoRA run writes: diffusers-format weights with their adapter config, the kohya copy
(A1111 / ComfyUI), the model card, and the Hub upload."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from crispdiff.core.io import move_file_into_place
from crispdiff.sd.config import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    SAMPLES_NAME,
    SDXL_FAMILY,
    DreamBoothLoRAConfig,
    SDLoRAConfig,
    SDLoRAError,
)
from crispdiff.train.lora import (
    adapter_config,
    lora_state,
)

logger = logging.getLogger("crispdiff")


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


#: kohya's prefix for each text encoder's modules: SD 1.x / 2.x has one (``lora_te_``), SDXL two (``lora_te1_``,
#: ``lora_te2_``), as kohya's sd-scripts and diffusers' ``convert_state_dict_to_kohya`` write them.
KOHYA_TEXT_PREFIXES = {False: ("lora_te",), True: ("lora_te1", "lora_te2")}


def kohya_state_dict(
    unet_state: dict[str, torch.Tensor], text_states: list[dict[str, torch.Tensor]], alpha: float, sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """peft LoRA weights -> kohya's sd-scripts layout (what A1111, ComfyUI and kohya load).

    kohya names a module by its diffusers path with dots as underscores, prefixed ``lora_unet_`` or the text encoder's
    prefix (:data:`KOHYA_TEXT_PREFIXES`); ``lora_A`` / ``lora_B`` are ``lora_down`` / ``lora_up``, and every module
    carries its ``alpha`` (the real one: diffusers' generic converter writes the rank instead, which rescales a LoRA
    trained with another alpha). ``text_states``: one per trained text encoder, in order.
    """
    out: dict[str, torch.Tensor] = {}
    parts = [("lora_unet", unet_state), *zip(KOHYA_TEXT_PREFIXES[sdxl], text_states)]
    for prefix, state in parts:
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


def save_lora_weights(
    output_dir: Path,
    unet: Any,
    text_encoders: list[Any] | None = None,
    *,
    kohya: bool = False,
    version: str = "sd_v1",
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format + adapter metadata) atomically, and the kohya copy.

    ``text_encoders``: the trained text encoders (none, the one of SD 1.x / 2.x, or SDXL's two); ``version``: the
    base's (``sd_v1`` / ``sd_v2`` / ``sdxl_base_v1-0``, as kohya's metadata names them). diffusers' own
    ``save_lora_weights`` (the SDXL pipeline's for SDXL, with the ``text_encoder_2.`` part) writes the file; it is
    written into a hidden folder and renamed into place, so a reader never sees half a file.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    sdxl = version.startswith("sdxl")
    output_dir = Path(output_dir)
    staging = output_dir / f".lora-{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        unet_state = lora_state(unet)
        text_states = [lora_state(encoder) for encoder in text_encoders or []]
        parts: dict[str, Any] = {
            "unet_lora_layers": convert_state_dict_to_diffusers(unet_state),
            "unet_lora_adapter_metadata": adapter_config(unet),
        }
        for role, encoder, state in zip(("text_encoder", "text_encoder_2"), text_encoders or [], text_states):
            parts[f"{role}_lora_layers"] = convert_state_dict_to_diffusers(state)
            parts[f"{role}_lora_adapter_metadata"] = adapter_config(encoder)
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipeline_class.save_lora_weights(staging, safe_serialization=True, **parts)
        move_file_into_place(staging / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        if kohya:
            config = unet.peft_config["default"]
            metadata = {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha),
                "ss_base_model_version": version,
            }
            kohya_state = kohya_state_dict(unet_state, text_states, config.lora_alpha, sdxl)
            save_file(kohya_state, staging / KOHYA_WEIGHTS_NAME, metadata)
            move_file_into_place(staging / KOHYA_WEIGHTS_NAME, output_dir / KOHYA_WEIGHTS_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / LORA_WEIGHTS_NAME


def base_model_license(name_or_path: str | None, revision: str | None = None) -> str | None:
    """The base model's licence as its model card states it (a local folder's README.md, or the Hub's card); None
    when unknown. Why not a fixed one: SD 1.x is creativeml-openrail-m, SD 2.x openrail++, fine-tunes vary."""
    if not name_or_path:
        return None
    from huggingface_hub.repocard import metadata_load

    folder = Path(name_or_path)
    try:
        if folder.is_dir():
            card = folder / "README.md"
            return (metadata_load(card) or {}).get("license") if card.is_file() else None
        from huggingface_hub import ModelCard

        return ModelCard.load(name_or_path, revision=revision).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - offline, no card, unreadable front matter: the licence is unknown
        return None


def model_card(
    config: SDLoRAConfig,
    has_samples: bool,
    command: list[str],
    *,
    steps: int | None = None,
    samples_prompt: str | None = None,
) -> str:
    """README.md for the LoRA folder: base model and the licence (``--license``, else the base model's), prompt, tags,
    a widget with the sample grid (of ``samples_prompt``), and how to load it with plain diffusers. ``steps``: the
    steps trained (default --max_train_steps; a run sized by epochs has none)."""
    dreambooth = isinstance(config, DreamBoothLoRAConfig)
    sdxl = config.family == SDXL_FAMILY
    family_tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if sdxl else ["stable-diffusion"]
    tags = ["text-to-image", *family_tags, "lora", "diffusers", "crispdiff"] + (["dreambooth"] if dreambooth else [])
    instance_prompt = config.instance_prompt if dreambooth else None
    prompt = config.validation_prompt or instance_prompt
    license_name = config.license or base_model_license(config.pretrained_model_name_or_path, config.revision)
    header = [
        "---",
        f"base_model: {config.pretrained_model_name_or_path}",
        "library_name: diffusers",
        *([f"license: {license_name}"] if license_name else []),
        "tags:",
        *[f"- {tag}" for tag in tags],
    ]
    if instance_prompt:
        header.append(f"instance_prompt: {json.dumps(instance_prompt)}")
    shown = samples_prompt or prompt
    if has_samples and shown:
        header += ["widget:", f"- text: {json.dumps(shown)}", "  output:", f"    url: {SAMPLES_NAME}"]
    header.append("---")
    kind = "DreamBooth LoRA" if dreambooth else "text-to-image LoRA"
    alpha = config.lora_alpha if config.lora_alpha is not None else config.rank
    body = [
        "",
        f"# {Path(config.output_dir).name}",
        "",
        f"A {kind} ({'DoRA, ' if config.use_dora else ''}rank {config.rank}, alpha {alpha}) for "
        f"`{config.pretrained_model_name_or_path}`, trained with crispdiff for {steps or config.max_train_steps} "
        f"steps of {config.train_batch_size} image(s) at {config.resolution} px"
        + ((" with the text encoders" if sdxl else " with the text encoder") if config.train_text_encoder else "")
        + (f", prompt `{prompt}`" if prompt else "")
        + ".",
        "",
    ]
    if has_samples:
        body += [f"![samples]({SAMPLES_NAME})", ""]
    pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    vae = config.base_vae()
    if vae:
        body += [f"Trained with the VAE `{vae}` instead of the base's; load it as below.", ""]
    body += [
        "```python",
        "import torch",
        f"from diffusers import {'AutoencoderKL, ' if vae else ''}{pipeline_class}",
        "",
        *([f'vae = AutoencoderKL.from_pretrained("{vae}")'] if vae else []),
        f'pipe = {pipeline_class}.from_pretrained("{config.pretrained_model_name_or_path}"'
        + (", vae=vae)" if vae else ")"),
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


#: What a LoRA upload leaves out besides checkpoints and logs: the fused pipeline (``--save_pipeline``: a whole
#: Stable Diffusion, publish it with ``crispdiff push`` if that is meant) and the intermediate validation grids.
LORA_UPLOAD_IGNORE_PATTERNS = ["pipeline/**", "samples/**"]


def push_lora_to_hub(folder: Path, config: SDLoRAConfig) -> str:
    """Upload the LoRA folder in one commit: weights, card, final sample grid, the redacted training config."""
    from crispdiff.publish.hub import hub_repo_id, upload_folder

    return upload_folder(
        folder,
        hub_repo_id(config),
        config.hub_private_repo,
        config.hub_token,
        "Upload crispdiff LoRA",
        ignore=LORA_UPLOAD_IGNORE_PATTERNS,
    )
