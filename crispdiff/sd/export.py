"""Fusing a Stable Diffusion (SD 1.x / 2.x or SDXL) LoRA into its base model and exporting the result as a pipeline.

``export_sd`` fuses a LoRA into its base model and writes a ``CrispDiffSDPipeline`` (SDXL: ``CrispDiffSDXLPipeline``)
folder (``pipelines/pipeline_crispdiff_sd.py``): DPM-Solver++ by default, an optional SR component, and
``output_size`` for the "generate at 512, downsample to 64 with an antialiased Lanczos filter" path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from crispdiff.core.io import staging_folder, swap_folder_into_place, write_json_atomic
from crispdiff.core.provenance import write_provenance
from crispdiff.sd.base import inference_pipeline, load_sd
from crispdiff.sd.config import LORA_WEIGHTS_NAME, SDLoRAError

logger = logging.getLogger("crispdiff")


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
    _fuse_pairs(text_encoder, {m: (state[m + suffix_down], state[m + suffix_up], alpha) for m in modules}, scale)


def _fuse_pairs(model: Any, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]], scale: float) -> None:
    """``weight += scale * alpha / r * up @ down`` for each ``module name -> (down, up, alpha)``."""
    with torch.no_grad():
        for name, (down, up, alpha) in pairs.items():
            layer = model.get_submodule(name)
            delta = (up.float() @ down.float()) * (scale * alpha / down.shape[0])
            layer.weight.add_(delta.to(layer.weight.dtype))


#: Where each text-encoder part of a LoRA file goes: diffusers' key prefix or kohya's, and the pipeline's attribute.
DIFFUSERS_TEXT_PARTS = {"text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_TEXT_PARTS = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def fuse_kohya_text_encoder_lora(text_encoder: Any, state: dict[str, torch.Tensor], scale: float, prefix: str) -> None:
    """Fuse one text encoder's part of a kohya file (A1111 / ComfyUI layout: keys ``prefix<module>.lora_down`` /
    ``lora_up`` and a per-module ``alpha``; ``prefix`` is ``lora_te_``, or SDXL's ``lora_te1_`` / ``lora_te2_``)
    into ``text_encoder``.

    kohya names a module by its path with dots as underscores, which cannot be undone by string replacement
    (``self_attn``, ``q_proj``); the text encoder's own module names give the mapping.
    """
    names = {prefix + name.replace(".", "_"): name for name, _ in text_encoder.named_modules() if name}
    pairs = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        if stem not in names:
            raise SDLoRAError(f"the kohya file's {stem} names no module of this base's text encoder; wrong base?")
        down, up = state[key], state.get(f"{stem}.lora_up.weight")
        if up is None:
            raise SDLoRAError(f"the kohya file has {key} without its lora_up; cannot fuse it")
        alpha = state.get(f"{stem}.alpha")
        pairs[names[stem]] = (down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    _fuse_pairs(text_encoder, pairs, scale)


def _text_encoder(pipeline: Any, attribute: str, what: str) -> Any:
    encoder = getattr(pipeline, attribute, None)
    if encoder is None:
        raise SDLoRAError(f"the LoRA file has a {what} part but this base has no {attribute}; wrong base?")
    return encoder


def fuse_lora_file(pipeline: Any, folder: Path, scale: float = 1.0) -> None:
    """Fuse ``folder``'s LoRA into ``pipeline`` (a StableDiffusionPipeline or StableDiffusionXLPipeline) and drop
    the adapter layers.

    The UNet part goes through diffusers' own loader and ``fuse_lora`` (any target, DoRA included, diffusers' or
    kohya's keys); each text-encoder part (``text_encoder.`` / ``text_encoder_2.``, kohya's ``lora_te_`` /
    ``lora_te1_`` / ``lora_te2_``) is fused by :func:`fuse_text_encoder_lora` or
    :func:`fuse_kohya_text_encoder_lora` after the UNet part is split off into a file of its own, with the adapter
    metadata kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / LORA_WEIGHTS_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise SDLoRAError(f"--lora {folder}: no {LORA_WEIGHTS_NAME} there")
    with safe_open(str(path), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no items()
        metadata = handle.metadata() or {}
    text_prefixes = (*DIFFUSERS_TEXT_PARTS, *KOHYA_TEXT_PARTS)
    unet = {k: v for k, v in state.items() if not k.startswith(text_prefixes)}
    staging = path.parent / f".{path.stem}.fuse-{uuid.uuid4().hex[:8]}"
    try:
        if unet:
            source = path
            if len(unet) < len(state):
                staging.mkdir()
                source = staging / LORA_WEIGHTS_NAME
                save_file(unet, str(source), metadata)
            pipeline.load_lora_weights(str(source.parent), weight_name=source.name)
            pipeline.fuse_lora(components=["unet"], lora_scale=scale)
            pipeline.unload_lora_weights()  # the fused weights stay; the adapter layers go
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        for prefix, attribute in DIFFUSERS_TEXT_PARTS.items():
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                continue
            alpha = adapter.get(f"{attribute}.lora_alpha")
            if alpha is None:
                raise SDLoRAError(f"{path} has a {attribute} LoRA but no adapter metadata (lora_alpha); cannot fuse")
            fuse_text_encoder_lora(_text_encoder(pipeline, attribute, prefix), part, float(alpha), scale)
        for prefix, attribute in KOHYA_TEXT_PARTS.items():
            part = {k: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                fuse_kohya_text_encoder_lora(_text_encoder(pipeline, attribute, prefix), part, scale, prefix)
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
    tokenizer_name: str | None = None,
    vae: str | None = None,
) -> Any:
    """The in-memory ``CrispDiffSDPipeline`` (``CrispDiffSDXLPipeline`` for an SDXL base): base + fused LoRA,
    DPM-Solver++, optional SR, output size (``tokenizer_name`` / ``vae``: the training run's ``--tokenizer_name`` /
    ``--pretrained_vae_model_name_or_path``, used instead of the base's)."""
    from crispdiff.pipelines.pipeline_crispdiff_sd import CrispDiffSDPipeline, CrispDiffSDXLPipeline

    parts = load_sd(base, revision, variant, tokenizer_name, vae)
    pipeline = inference_pipeline(parts)
    if lora is not None:
        fuse_lora_file(pipeline, Path(lora), lora_scale)
    sr = None
    if sr_model:
        from crispdiff.superres.load import load_sr_model

        sr = load_sr_model(sr_model)
    finish = {"sr_model": sr, "output_size": output_size, "sr_strength": sr_strength}
    if parts.is_sdxl:
        return CrispDiffSDXLPipeline(**pipeline.components, **finish)
    return CrispDiffSDPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        **finish,
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
        write_json_atomic(staging / "crispdiff_export.json", provenance)
        write_provenance(staging)
        swap_folder_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
