"""CrispDiffSDPipeline / CrispDiffSDXLPipeline: Stable Diffusion or SDXL (a LoRA fused in) that can finish small: SR
upscale or Lanczos downsample.

The approach: fine-tune SD on a small dataset, generate at its native 512 px where it is good, then bring the
result to the target size. Downsampling 512 -> 64 with an antialiased Lanczos filter keeps edges crisp where a plain
bilinear/bicubic resize aliases or blurs; an optional SR component (``sr_model``, crispdiff's ``SpandrelSRModel``)
goes the other way.

Self-contained on purpose: a copy is saved into every folder so ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` works with only torch, numpy, PIL and diffusers installed; it must never import crispdiff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import ModelMixin, StableDiffusionPipeline, StableDiffusionXLPipeline

PIPELINE_FILE_NAME = "pipeline_crispdiff_sd.py"
SR_MODULE_NAME = "sr_model"
OUTPUT_TYPES = ("pil", "np", "pt")


def lanczos_downsample(images01: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` images in [0, 1] with PIL's Lanczos filter in float ("F") mode, per channel.

    PIL widens the Lanczos kernel by the reduction factor, which is the antialiasing a 512 -> 64 downsample needs; float
    mode avoids quantising before the final output. Returns float32 on the input's device, clamped to [0, 1].
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images01.shape[-2:]) == (height, width):
        return images01.float().clamp(0.0, 1.0)
    array = images01.detach().float().cpu().numpy()
    out = np.empty((*array.shape[:2], height, width), dtype=np.float32)
    for b in range(array.shape[0]):
        for c in range(array.shape[1]):
            channel = PIL.Image.fromarray(array[b, c], mode="F")
            out[b, c] = np.asarray(channel.resize((width, height), PIL.Image.LANCZOS), dtype=np.float32)
    return torch.from_numpy(out).to(images01.device).clamp_(0.0, 1.0)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """A temp file, fsynced, given the permissions ``open()`` would give (mkstemp's are 0600), renamed into place,
    then the folder fsynced (the rename itself): a crash or power cut leaves the old index or the new one, whole.

    crispdiff's own ``core.io`` does this for everything else; this file must load without crispdiff installed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # some filesystems (and Windows) cannot open or fsync a folder; the file itself is synced
        folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


class _FinishSmall:
    """What both pipelines add after decoding: an optional ``sr_model`` upscale or an antialiased Lanczos resize to
    ``output_size``, and a ``save_pretrained`` that writes this file beside model_index.json (mixed into the SD and
    SDXL pipelines, before their diffusers base, so ``super()`` is that pipeline)."""

    def _register_finish(self, sr_model: ModelMixin | None, output_size: int | None, sr_strength: float) -> None:
        if output_size is not None and int(output_size) < 1:
            raise ValueError(f"output_size must be positive, got {output_size}")
        self.register_modules(sr_model=sr_model)
        self.register_to_config(
            output_size=None if output_size is None else int(output_size), sr_strength=float(sr_strength)
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save like diffusers, then copy this file beside model_index.json and point ``_class_name`` at it."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save the folder first, then upload it; push_to_hub here would upload a partial folder")
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        shutil.copyfile(Path(__file__).resolve(), folder / PIPELINE_FILE_NAME)
        index_path = folder / self.config_name
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_FILE_NAME[: -len(".py")], type(self).__name__]
        if self.sr_model is not None:
            index["sr_model"] = [SR_MODULE_NAME, type(self.sr_model).__name__]
        _write_json_atomic(index_path, index)

    @torch.no_grad()
    def __call__(
        self,
        *args: Any,
        output_size: int | tuple[int, int] | None = None,
        upscale: bool | None = None,
        sr_strength: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Generate like the diffusers pipeline (same arguments), then SR-upscale or downsample.

        ``output_size`` defaults to the config's; ``upscale`` defaults to whether an ``sr_model`` is present.
        ``output_type="latent"`` returns the latents untouched. The output is the diffusers pipeline's own
        (``StableDiffusionPipelineOutput`` / ``StableDiffusionXLPipelineOutput``) with the finished images.
        """
        if output_type == "latent":
            return super().__call__(*args, output_type="latent", return_dict=return_dict, **kwargs)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES} or 'latent', got {output_type!r}")
        result = super().__call__(*args, output_type="pt", return_dict=True, **kwargs)
        images01 = result.images.float()
        size = self.config.output_size if output_size is None else output_size
        do_upscale = self.sr_model is not None if upscale is None else bool(upscale)
        if do_upscale:
            if self.sr_model is None:
                raise ValueError("upscale=True but this pipeline has no sr_model component")
            strength = self.config.sr_strength if sr_strength is None else sr_strength
            images01 = self.sr_model.upscale(images01, sr_strength=strength, output_size=size).float()
        elif size is not None:
            images01 = lanczos_downsample(images01, size)
        if output_type == "pt":
            images: Any = images01
        else:
            array = images01.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            images = array if output_type == "np" else self.numpy_to_pil(array)
        finished = dataclasses.replace(result, images=images)
        if return_dict:
            return finished
        return tuple(getattr(finished, field.name) for field in dataclasses.fields(finished))  # as the base returns


class CrispDiffSDPipeline(_FinishSmall, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` plus an optional ``sr_model`` and an ``output_size`` applied after decoding.

    Args (beyond StableDiffusionPipeline's):
        sr_model: a ModelMixin with ``upscale(images01, sr_strength=..., output_size=...)``; used when present.
        output_size: final side in pixels (None = the generated size): a Lanczos downsample, or the SR target.
        sr_strength: default blend of SR output with a Lanczos upscale (0 = Lanczos only, 1 = SR only).
    """

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "sr_model"]
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae->sr_model"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = False,
        sr_model: ModelMixin | None = None,
        output_size: int | None = None,
        sr_strength: float = 0.5,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._register_finish(sr_model, output_size, sr_strength)


class CrispDiffSDXLPipeline(_FinishSmall, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` plus the same ``sr_model`` / ``output_size`` / ``sr_strength`` post-step as
    ``CrispDiffSDPipeline``. No invisible watermark unless asked for (``add_watermarker=True``), so the images are
    the model's."""

    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
        "sr_model",
    ]
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae->sr_model"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        unet: Any,
        scheduler: Any,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
        sr_model: ModelMixin | None = None,
        output_size: int | None = None,
        sr_strength: float = 0.5,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self._register_finish(sr_model, output_size, sr_strength)


__all__ = ["CrispDiffSDPipeline", "CrispDiffSDXLPipeline", "lanczos_downsample"]
