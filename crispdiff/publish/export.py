"""Writing a crispdiff pipeline folder atomically, and loading one.

The folder layout is the contract in docs/ARCHITECTURE.md ("A saved pipeline folder"). A save is built in a hidden
sibling folder and swapped in only once complete, so a crash or an unsaveable component never leaves a half-written
pipeline where a good one used to be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import ModelMixin

from crispdiff.core.errors import FlagError, OutputExistsError, PathError
from crispdiff.core.images import save_image_atomic
from crispdiff.core.io import staging_folder, swap_folder_into_place, write_json_atomic
from crispdiff.core.provenance import PROVENANCE_NAME, write_provenance
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS, CrispDiffPipeline, make_scheduler

logger = logging.getLogger(__name__)

TRAINING_CONFIG_NAME = "crispdiff_training.json"
#: The final validation's figures (what was measured, on which samples, against which images), when the run took them.
QUALITY_NAME = "crispdiff_quality.json"
SAMPLES_NAME = "samples.png"
MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CLASS_NAME = "CrispDiffPipeline"
#: What an exported folder records about its export (``crispdiff export --plain`` writes its card from it).
EXPORT_RECORD_NAME = "crispdiff_export.json"
#: The record's ``kind`` in a plain export: a folder the stock diffusers classes load.
PLAIN_EXPORT_KIND = "plain"

# What save_pipeline writes at the top level. Anything else already in the destination (checkpoints, logs, a model
# card) is not ours to delete and is carried over into the new folder.
_PIPELINE_ENTRIES = frozenset(
    {
        MODEL_INDEX_NAME,
        "pipeline_crispdiff.py",
        "unet",
        "scheduler",
        "vae",
        "sr_model",
        TRAINING_CONFIG_NAME,
        SAMPLES_NAME,
        PROVENANCE_NAME,
        QUALITY_NAME,
    }
)


def _json_default(value: Any) -> Any:
    """Paths become strings; anything else that JSON cannot hold is an error (the file must reload as a config)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{TRAINING_CONFIG_NAME}: cannot store a {type(value).__name__} value ({value!r}) as JSON")


def build_pipeline(
    *,
    unet: ModelMixin,
    scheduler_base_config: dict[str, Any],
    beta_schedule: str,
    sampler: str = "dpmsolver++",
    thresholding: bool = False,
    vae: ModelMixin | None = None,
    latent_scaling_factor: float | None = None,
    latent_shift_factor: float | None = None,
    sr_model: ModelMixin | None = None,
    sr_strength: float = 0.5,
    upscale: bool | None = None,
    class_names: list[str] | None = None,
    sharpen_amount: float = 0.0,
    guidance_scale: float = 1.0,
    class_mix: list[float] | None = None,
    guidance_interval: list[float] | tuple[float, float] | None = None,
    guide_unet: ModelMixin | None = None,
    autoguidance_scale: float = 1.0,
    upscale_sharpen_amount: float | None = None,
) -> CrispDiffPipeline:
    """The in-memory pipeline that :func:`save_pipeline` writes (also handy for sampling during training).

    ``class_names`` (a class-conditional unet's classes, id order) go into the pipeline config, so
    ``pipe(class_labels="name")`` works after loading, and ``guidance_scale`` becomes the default of labelled calls;
    ``class_mix`` (auto classes) is what calls without labels sample, and ``guidance_interval`` (min, max sigma) where
    guidance applies; ``guide_unet`` (a weaker version of ``unet``) and ``autoguidance_scale`` are autoguidance's.
    ``upscale`` is whether calls upscale by default (None: whenever there is an ``sr_model``);
    ``upscale_sharpen_amount`` the unsharp amount after the SR step (None: ``sharpen_amount``).
    """
    if not isinstance(unet, ModelMixin):
        raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if thresholding and vae is not None:
        logger.warning("--thresholding applies to pixel models only; the latent pipeline is saved without it")
        thresholding = False
    scheduler = make_scheduler(sampler, scheduler_base_config, thresholding=thresholding, latent=vae is not None)
    return CrispDiffPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        sr_model=sr_model,
        sampler=sampler,
        beta_schedule=beta_schedule,
        thresholding=thresholding,
        latent_scaling_factor=latent_scaling_factor,
        latent_shift_factor=latent_shift_factor,
        sr_strength=sr_strength,
        upscale=upscale,
        class_names=class_names,
        sharpen_amount=sharpen_amount,
        guidance_scale=guidance_scale,
        class_mix=class_mix,
        guidance_min_sigma=None if guidance_interval is None else guidance_interval[0],
        guidance_max_sigma=None if guidance_interval is None else guidance_interval[1],
        guide_unet=guide_unet,
        autoguidance_scale=autoguidance_scale,
        upscale_sharpen_amount=upscale_sharpen_amount,
    )


def save_pipeline(
    output_dir: str | os.PathLike,
    *,
    training_config: dict[str, Any] | None = None,
    sample_grid: PIL.Image.Image | None = None,
    quality: dict[str, Any] | None = None,
    **pipeline_kwargs: Any,
) -> Path:
    """Write a complete pipeline folder at ``output_dir`` and return its path.

    ``pipeline_kwargs`` are :func:`build_pipeline`'s: ``unet`` (saved as given: pass the EMA weights),
    ``scheduler_base_config`` (``num_train_timesteps``, ``trained_betas``, ``prediction_type`` and
    ``rescale_betas_zero_snr``, from ``crispdiff.diffusion.schedule.scheduler_base_config``), ``beta_schedule``, and the
    optional components and defaults. ``training_config`` goes to ``crispdiff_training.json`` and ``sample_grid`` to
    ``samples.png``, ``quality`` (the final validation's figures) to ``crispdiff_quality.json``;
    ``crispdiff_provenance.json`` records the crispdiff version and the command that saved it.

    An existing ``output_dir`` is replaced only after the new folder is complete; top-level entries that are not
    part of a pipeline (``checkpoint-*``, ``logs``, ``README.md`` ...) are moved into the new folder, so the training
    output folder can double as the pipeline folder.
    """
    target = Path(output_dir).resolve()
    pipeline = build_pipeline(**pipeline_kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        staging.mkdir()
        pipeline.save_pretrained(staging)
        write_provenance(staging)
        if training_config is not None:
            text = json.dumps(training_config, indent=2, sort_keys=True, default=_json_default)
            (staging / TRAINING_CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if sample_grid is not None:
            save_image_atomic(sample_grid, staging / SAMPLES_NAME)
        if quality is not None:
            write_json_atomic(staging / QUALITY_NAME, quality, sort_keys=True)
        if target.exists() and not target.is_dir():
            raise OutputExistsError(f"{target} exists and is not a folder; cannot save a pipeline there")
        swap_folder_into_place(staging, target, carry=_foreign_entries(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _foreign_entries(target: Path) -> list[str]:
    """Top-level entries of an existing ``target`` that a pipeline save does not write (carried over, not deleted)."""
    if not target.is_dir():
        return []
    return [entry.name for entry in target.iterdir() if entry.name not in _PIPELINE_ENTRIES]


def read_model_index(path: str | os.PathLike) -> dict[str, Any]:
    """The folder's model_index.json, with clear errors when the folder is missing or not a crispdiff pipeline."""
    folder = Path(path)
    if not folder.is_dir():
        raise PathError(f"pipeline folder {folder} does not exist")
    index_path = folder / MODEL_INDEX_NAME
    if not index_path.is_file():
        raise PathError(f"{folder} has no {MODEL_INDEX_NAME}; it is not a saved pipeline folder")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    class_name = index.get("_class_name")
    name = class_name[-1] if isinstance(class_name, (list, tuple)) and class_name else class_name
    if name != PIPELINE_CLASS_NAME:
        raise FlagError(
            f"{index_path} describes a {class_name!r} pipeline, not a crispdiff {PIPELINE_CLASS_NAME}; "
            "load it with diffusers' DiffusionPipeline.from_pretrained instead"
        )
    return index


def class_label_flag(pipeline: object, text: str | None, pipeline_dir: str) -> int | str | None:
    """--class as the pipeline takes it: a class name, else an id; a FlagError names the classes there are."""
    if text is None:
        return None
    names = getattr(pipeline, "classes", None)
    num_class_embeds = getattr(pipeline.unet.config, "num_class_embeds", None)  # type: ignore[attr-defined]
    if num_class_embeds is None:
        raise FlagError(f"--class {text!r} given but {pipeline_dir} holds an unconditional model (no classes)")
    if names and text in names:
        return text
    if text.isdigit() and int(text) < num_class_embeds - 1:
        return int(text)
    known = f"its classes are {names}" if names else f"it stores no class names; pass an id 0..{num_class_embeds - 2}"
    raise FlagError(f"--class {text!r} is not a class of {pipeline_dir}; {known}")


#: ``--dtype`` values of ``crispdiff sample`` / ``evaluate``: the precision the UNet (and VAE, SR model) run in.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"`` -> ``torch.float16`` (``None`` stays None: fp32, as saved); an unknown name is a flag error."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise FlagError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(
    path: str | os.PathLike,
    sampler: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> CrispDiffPipeline:
    """Load a saved folder as the installed :class:`CrispDiffPipeline` (not the folder's copy of the code).

    ``trust_remote_code=True`` is passed because diffusers will only import the SR component's module
    (``sr_model/sr_model.py``) with it. ``sampler`` switches the scheduler; ``device`` / ``dtype`` move the models
    (``dtype`` also takes ``"fp32"`` / ``"fp16"`` / ``"bf16"``). The sampler's own arithmetic stays fp32 whatever
    ``dtype`` is: only the networks run in it.
    """
    read_model_index(path)
    dtype = parse_dtype(dtype)
    if sampler is not None and sampler not in SAMPLERS:
        raise FlagError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    kwargs: dict[str, Any] = {"trust_remote_code": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    pipeline = CrispDiffPipeline.from_pretrained(os.fspath(path), **kwargs)
    if sampler is not None:
        pipeline.set_sampler(sampler)
    if device is not None:
        pipeline.to(device)
    return pipeline
