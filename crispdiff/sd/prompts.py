"""What the Stable Diffusion LoRA trainer trains on: the prompt bank (each prompt encoded once), captions, the
cached latents of the images (with SDXL's micro-conditioning), and DreamBooth's class images (generated once,
reused)."""

from __future__ import annotations

import dataclasses
import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from crispdiff.core.config import DataConfig
from crispdiff.core.io import write_json_atomic
from crispdiff.latent.space import LatentSpace, load_latents
from crispdiff.sd.base import SDParts, inference_pipeline, load_sd
from crispdiff.sd.config import DreamBoothLoRAConfig, SDLoRAConfig, SDLoRAError
from crispdiff.sd.micro_conditioning import MicroConditioning, micro_conditioning

logger = logging.getLogger("crispdiff")


CLASS_IMAGES_RECORD = ".crispdiff_class_images.json"


class PromptEmbeds(NamedTuple):
    """What the UNet is conditioned on for a batch of prompts: the text encoders' hidden states (SDXL: both
    encoders' penultimate layers, concatenated) and, for SDXL, the second encoder's pooled projection."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


class PromptBank:
    """Every distinct prompt of a run, tokenized once and, with frozen text encoders, encoded once.

    Why: a CLIP text encoder costs about as much as a small UNet step and its output for a given prompt never
    changes while it is frozen; DreamBooth has one or two prompts for the whole run. SD 1.x / 2.x has one tokenizer
    and text encoder (the last hidden state conditions the UNet), SDXL two (``tokenizer_2``), encoded as
    ``StableDiffusionXLPipeline.encode_prompt`` does: each encoder's penultimate hidden state, concatenated, and the
    second one's pooled projection.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: list[str],
        max_length: int | None = None,
        use_attention_mask: bool = False,
        tokenizer_2: Any = None,
    ):
        """``max_length``: tokens per prompt (--tokenizer_max_length; default the tokenizer's model_max_length);
        ``use_attention_mask``: give the text encoder the padding mask (--text_encoder_use_attention_mask);
        ``tokenizer_2``: SDXL's second tokenizer (its own model_max_length)."""
        self.prompts = list(dict.fromkeys(prompts))
        self.position = {p: i for i, p in enumerate(self.prompts)}
        tokens = tokenizer(
            self.prompts,
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        self.input_ids = tokens.input_ids
        self.attention_mask = tokens.attention_mask if use_attention_mask else None
        self.input_ids_2 = None
        if tokenizer_2 is not None:
            self.input_ids_2 = tokenizer_2(
                self.prompts,
                padding="max_length",
                max_length=tokenizer_2.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        self.embeddings: PromptEmbeds | None = None

    def _encode(self, text_encoders: list[Any], rows: torch.Tensor, device: torch.device) -> PromptEmbeds:
        if self.input_ids_2 is None:
            mask = None if self.attention_mask is None else self.attention_mask[rows].to(device)
            return PromptEmbeds(text_encoders[0](self.input_ids[rows].to(device), attention_mask=mask)[0])
        hidden = []
        for encoder, ids in zip(text_encoders, (self.input_ids, self.input_ids_2), strict=True):
            output = encoder(ids[rows].to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), output[0])  # the second encoder's projection is pooled

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.position[p] for p in prompts], dtype=torch.long)

    @torch.no_grad()
    def precompute(self, text_encoders: Any, device: torch.device, batch_size: int = 64) -> None:
        """Encode every prompt once (as the pipeline does: no attention mask). ``text_encoders``: the base's text
        encoder, or the list of them (SDXL: both)."""
        encoders = _as_list(text_encoders)
        parts = [self._encode(encoders, chunk, device) for chunk in torch.arange(len(self.prompts)).split(batch_size)]
        hidden = torch.cat([part.hidden.float().cpu() for part in parts])
        pooled = torch.cat([part.pooled.float().cpu() for part in parts]) if parts[0].pooled is not None else None
        self.embeddings = PromptEmbeds(hidden, pooled)

    def encode(self, ids: torch.Tensor, text_encoders: Any | None, device: torch.device) -> PromptEmbeds:
        """The conditioning for these prompt ids: cached (``text_encoders`` None), or through the (trained) text
        encoder(s)."""
        if self.embeddings is not None and text_encoders is None:
            rows = ids.cpu()
            pooled = self.embeddings.pooled
            return PromptEmbeds(
                self.embeddings.hidden[rows].to(device), None if pooled is None else pooled[rows].to(device)
            )
        return self._encode(_as_list(text_encoders), ids.cpu(), device)


def _as_list(text_encoders: Any) -> list[Any]:
    return list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]


def image_view(config: SDLoRAConfig, **changes: Any) -> Any:
    """The data flags of ``config`` with some replaced (e.g. another folder), for ``load_images``."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(DataConfig)}
    values.update(changes)
    return types.SimpleNamespace(**values)


@dataclass
class TrainSet:
    """Images as cached latents, the prompt id of each, and for SDXL their micro-conditioning."""

    space: LatentSpace
    prompt_ids: torch.Tensor
    micro: MicroConditioning | None = None

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


def train_set(view: Any, space: LatentSpace, data: Any, prompt_ids: torch.Tensor, parts: SDParts) -> TrainSet:
    """The images of ``view`` (loaded as ``data``, cached in ``space``) with their prompt ids; for an SDXL base also
    their micro-conditioning (original sizes read from the files, the cached crops' corners)."""
    micro = micro_conditioning(view, data, space.cache.spec) if parts.is_sdxl else None
    return TrainSet(space, prompt_ids, micro)


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
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.prior_generation_precision or "fp32")
    if dtype is not None:  # a copy in that precision: the training base keeps its fp32 weights
        parts = load_sd(
            str(config.pretrained_model_name_or_path),
            config.revision,
            config.variant,
            vae_name_or_path=config.base_vae(),
        )
        for model in (parts.unet, *parts.text_encoders, parts.vae):
            model.to(dtype=dtype)
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
    write_json_atomic(record_path, record)
    return made
