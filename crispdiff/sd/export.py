"""Fusing a Stable Diffusion LoRA into its base model and exporting the result as a pipeline.

``export_sd`` fuses a LoRA into its base model and writes a ``CrispDiffSDPipeline`` folder
(``pipelines/pipeline_crispdiff_sd.py``): DPM-Solver++ by default, an optional SR component, and ``output_size`` for
the "generate at 512, downsample to 64 with an antialiased Lanczos filter" path.
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


KOHYA_TEXT_PREFIX = "lora_te_"


def fuse_kohya_text_encoder_lora(text_encoder: Any, state: dict[str, torch.Tensor], scale: float) -> None:
    """Fuse the ``lora_te_...`` part of a kohya file (A1111 / ComfyUI layout: ``lora_down`` / ``lora_up`` and a
    per-module ``alpha``) into ``text_encoder``.

    kohya names a module by its path with dots as underscores, which cannot be undone by string replacement
    (``self_attn``, ``q_proj``); the text encoder's own module names give the mapping.
    """
    names = {KOHYA_TEXT_PREFIX + name.replace(".", "_"): name for name, _ in text_encoder.named_modules() if name}
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


def fuse_lora_file(pipeline: Any, folder: Path, scale: float = 1.0) -> None:
    """Fuse ``folder``'s LoRA into ``pipeline`` (a StableDiffusionPipeline) and drop the adapter layers.

    The UNet part goes through diffusers' own loader and ``fuse_lora`` (any target, DoRA included, diffusers' or
    kohya's keys); a text-encoder part is fused by :func:`fuse_text_encoder_lora` (diffusers' keys) or
    :func:`fuse_kohya_text_encoder_lora` (``lora_te_`` keys) after the UNet part is split off into a file of its own,
    with the adapter metadata kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / LORA_WEIGHTS_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise SDLoRAError(f"--lora {folder}: no {LORA_WEIGHTS_NAME} there")
    with safe_open(str(path), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no items()
        metadata = handle.metadata() or {}
    kohya_text = {k: v for k, v in state.items() if k.startswith(KOHYA_TEXT_PREFIX)}
    text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
    unet = {k: v for k, v in state.items() if not k.startswith(("text_encoder.", KOHYA_TEXT_PREFIX))}
    staging = path.parent / f".{path.stem}.fuse-{uuid.uuid4().hex[:8]}"
    try:
        if unet:
            source = path
            if text or kohya_text:
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
        if kohya_text:
            fuse_kohya_text_encoder_lora(pipeline.text_encoder, kohya_text, scale)
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
) -> Any:
    """The in-memory ``CrispDiffSDPipeline``: base + fused LoRA, DPM-Solver++, optional SR, output size
    (``tokenizer_name``: the training run's ``--tokenizer_name``, used instead of the base's tokenizer)."""
    from crispdiff.pipelines.pipeline_crispdiff_sd import CrispDiffSDPipeline

    parts = load_sd(base, revision, variant, tokenizer_name)
    pipeline = inference_pipeline(parts)
    if lora is not None:
        fuse_lora_file(pipeline, Path(lora), lora_scale)
    sr = None
    if sr_model:
        from crispdiff.superres.load import load_sr_model

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
        write_json_atomic(staging / "crispdiff_export.json", provenance)
        write_provenance(staging)
        swap_folder_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
