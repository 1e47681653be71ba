"""``crispdiff export --plain``: a copy of a saved pipeline that diffusers' stock classes load, no remote code.

Why: hosted inference, many UIs and cautious users will not run the ``pipeline_crispdiff.py`` a full folder carries
(``trust_remote_code=True``). A pixel model goes into ``DDPMPipeline`` (unet + scheduler), a latent one into
``LDMPipeline`` (vqvae + unet + scheduler; it decodes with any autoencoder whose ``decode(z).sample`` is an image in
[-1, 1]). Those classes only run the sampling loop and the decoder, so what ``CrispDiffPipeline`` does beyond that is
left out (SR, guidance and autoguidance, the guidance interval, sharpening, gamma, the class choice), and what the
stock loop cannot express is folded into the weights instead:

- a class-conditional UNet gets no labels from a stock class: the class embedding is a constant added to the time
  embedding (``UNet2DModel.forward``: ``emb = time_embedding(t) + class_embedding(label)``), so the null class's (or
  one chosen class's) row is added to ``time_embedding.linear_2.bias`` and the class embedding dropped;
- ``LDMPipeline`` decodes ``z / vqvae.config.scaling_factor`` with no shift: the scale goes into that config value
  and crispdiff's latent shift into the 1x1 ``post_quant_conv`` (``W (x + s) + b = W x + (b + s W 1)``, or an
  identity convolution with bias ``s`` when the VAE has none).

The samples are those of the full pipeline with its extras off at the same seed, steps and sampler: bit for bit
when nothing was folded, to float rounding otherwise (a bias added in another order); the export record and the card
say which.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMPipeline, DiffusionPipeline, LDMPipeline, UNet2DModel

from crispdiff.core.config import without_secrets
from crispdiff.core.errors import FlagError, OutputExistsError, UserError
from crispdiff.core.io import staging_folder, swap_folder_into_place, write_json_atomic, write_text_atomic
from crispdiff.core.provenance import write_provenance
from crispdiff.pipelines.pipeline_crispdiff import CrispDiffPipeline
from crispdiff.publish.card import CARD_NAME, plain_export_record, render_plain_card
from crispdiff.publish.export import (
    EXPORT_RECORD_NAME,
    PLAIN_EXPORT_KIND,
    TRAINING_CONFIG_NAME,
    class_label_flag,
    load_pipeline,
    read_model_index,
)

#: The samplers each stock class steps exactly as ``CrispDiffPipeline`` does, and why the others are refused.
PLAIN_SAMPLERS = {"DDPMPipeline": ("dpmsolver++", "ddpm"), "LDMPipeline": ("dpmsolver++", "ddim", "unipc", "pndm")}
_SAMPLER_PROBLEMS = {
    ("DDPMPipeline", "unipc"): "DDPMPipeline passes generator= to scheduler.step, which UniPC's step does not take",
    ("DDPMPipeline", "pndm"): "DDPMPipeline passes generator= to scheduler.step, which PNDM's step does not take",
    ("DDPMPipeline", "ddim"): (
        "DDPMPipeline steps DDIM without use_clipped_model_output, so its clipped pixel steps differ from crispdiff's"
    ),
    ("LDMPipeline", "ddpm"): "LDMPipeline passes no generator to scheduler.step, so DDPM's noise would ignore the seed",
}


_VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def _unet_entry_problem(index: dict[str, Any]) -> str | None:
    """Why the folder's unet cannot go into a stock class (None: it can): only diffusers' own ``UNet2DModel``."""
    entry = index.get("unet")
    if entry == ["diffusers", "UNet2DModel"]:
        return None
    if isinstance(entry, list) and entry and entry[0] == "timm_unet":
        return "its unet is a timm-encoder UNet (unet/timm_unet.py), which no stock diffusers class can load"
    return f"its unet is {entry!r}; the stock pipelines take a diffusers UNet2DModel"


def check_exportable(pipeline_dir: Path, index: dict[str, Any]) -> None:
    """Refuse, before loading anything, a folder whose denoiser or VAE no stock class can carry."""
    problem = _unet_entry_problem(index)
    vae = index.get("vae")
    if problem is None and isinstance(vae, list) and vae[0] is not None and vae[1] not in _VAE_CLASSES:
        problem = f"its vae is {vae!r}; LDMPipeline needs one of {', '.join(_VAE_CLASSES)}"
    if problem:
        raise UserError(
            f"{pipeline_dir} cannot be exported --plain: {problem}. Share the full folder instead "
            "(DiffusionPipeline.from_pretrained(..., trust_remote_code=True))"
        )


def stock_class_name(latent: bool) -> str:
    """``LDMPipeline`` for a latent model (one with a VAE), ``DDPMPipeline`` for a pixel one."""
    return "LDMPipeline" if latent else "DDPMPipeline"


def check_sampler(stock: str, sampler: str, pipeline_dir: Path, chosen: bool) -> None:
    """Refuse a sampler the stock class would step differently (see :data:`PLAIN_SAMPLERS`), naming one that works."""
    if sampler in PLAIN_SAMPLERS[stock]:
        return
    where = f"--sampler {sampler}" if chosen else f"{pipeline_dir}'s sampler {sampler!r}"
    raise FlagError(
        f"{where} cannot be exported --plain: {_SAMPLER_PROBLEMS[(stock, sampler)]}; "
        f"pass --sampler {' or '.join(PLAIN_SAMPLERS[stock])}"
    )


def null_class_trained(training_config: dict[str, Any] | None) -> bool:
    """Whether the null class was trained (label dropout above 0); a folder without a training config is trusted,
    as ``CrispDiffPipeline`` trusts it when it samples without labels."""
    return float((training_config or {}).get("class_dropout_prob", 1.0)) > 0.0


def fold_class(unet: UNet2DModel, class_id: int) -> UNet2DModel:
    """An unconditional ``UNet2DModel`` that computes what ``unet`` computes for ``class_id``.

    ``UNet2DModel.forward`` adds ``class_embedding(label)`` to the time embedding's output once, before any block uses
    it (AdaGN "scale_shift" included), so that row added to ``time_embedding.linear_2.bias`` is the same network up to
    float rounding (``(W h + b) + c`` against ``W h + (b + c)``). The sum is taken in float64 and rounded once.
    """
    embedding = unet.class_embedding
    if not isinstance(embedding, torch.nn.Embedding) or unet.config.get("class_embed_type") is not None:
        raise UserError(
            f"the unet's class embedding is {unet.config.get('class_embed_type')!r}, not the label table crispdiff "
            "trains (nn.Embedding); it cannot be folded into an unconditional UNet"
        )
    state = {name: value for name, value in unet.state_dict().items() if not name.startswith("class_embedding.")}
    bias_name = "time_embedding.linear_2.bias"
    bias = state[bias_name]
    state[bias_name] = (bias.double() + embedding.weight[class_id].detach().double()).to(bias.dtype)
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    plain = UNet2DModel.from_config({**config, "num_class_embeds": None})
    plain.load_state_dict(state, strict=True)  # copied into plain's float32 parameters, as load_pipeline loads
    return plain.eval()


def fold_latent_shift(vae: AutoencoderKL | AutoencoderTiny, shift: float) -> tuple[Any, str | None]:
    """``(vae', note)``: ``vae'.decode(z)`` = ``vae.decode(z + shift)``, and what was folded (None: nothing).

    Into ``post_quant_conv`` (its bias gains ``shift * W 1``: float rounding), or, for a VAE without one, a new identity
    ``post_quant_conv`` with bias ``shift`` (``1 * x + 0 * others + shift`` is exact in float32, but a GPU running
    convolutions in TF32 rounds the latents on the way in, so it too counts as a fold). ``AutoencoderTiny`` has no
    1x1 layer before its decoder's non-linearity: a shift is refused.
    """
    vae = copy.deepcopy(vae)
    if shift == 0.0:
        return vae, None
    if isinstance(vae, AutoencoderTiny):
        raise UserError(
            f"the latent shift {shift:g} cannot be folded into an AutoencoderTiny (no 1x1 convolution before its "
            "decoder); share the full folder instead"
        )
    with torch.no_grad():
        if vae.post_quant_conv is None:
            channels = int(vae.config.latent_channels)
            config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
            widened = AutoencoderKL.from_config({**config, "use_post_quant_conv": True})
            missing, unexpected = widened.load_state_dict(vae.state_dict(), strict=False)
            if unexpected or sorted(missing) != ["post_quant_conv.bias", "post_quant_conv.weight"]:
                raise RuntimeError(f"rebuilding the VAE with a post_quant_conv changed more: {missing}, {unexpected}")
            widened.post_quant_conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            widened.post_quant_conv.bias.fill_(shift)
            note = "an identity post_quant_conv added with the latent shift as its bias (exact in float32; a GPU's TF32"
            return widened.eval(), note + " convolutions round its input)"
        weight, bias = vae.post_quant_conv.weight, vae.post_quant_conv.bias
        folded = bias.double() + shift * weight.double()[:, :, 0, 0].sum(dim=1)
        bias.copy_(folded.to(bias.dtype))
    return vae, "the latent shift folded into post_quant_conv's bias"


def plain_vae(pipeline: CrispDiffPipeline) -> tuple[Any, str | None]:
    """The VAE ``LDMPipeline`` decodes with: ``scaling_factor`` = crispdiff's scale (LDMPipeline divides by it, as
    ``CrispDiffPipeline.decode`` does), the shift folded in and ``shift_factor`` cleared so no one applies it twice."""
    scale, shift = pipeline.latent_scaling()
    vae, note = fold_latent_shift(pipeline.vae, float(shift))
    vae.register_to_config(scaling_factor=scale, shift_factor=None)
    return vae, note


def class_choice(
    pipeline: CrispDiffPipeline, class_label: int | str | None, training_config: dict[str, Any] | None, where: Path
) -> tuple[int | None, str | None]:
    """``(class id to fold, its name)``: the chosen class, else the null class (None, None for an unconditional unet).

    A model trained without label dropout never learnt its null class (its row is the random initialisation), so it
    needs a class.
    """
    label = None if class_label is None else class_label_flag(pipeline, str(class_label), str(where))
    num_class_embeds = pipeline.unet.config.get("num_class_embeds")
    if num_class_embeds is None:
        return None, None
    if label is None:
        if not null_class_trained(training_config):
            raise FlagError(
                f"{where} was trained with --class_dropout_prob 0, so it has no trained null class to sample "
                f"unconditionally; pick one class with --class NAME (its classes: {pipeline.classes})"
            )
        return int(num_class_embeds) - 1, None
    class_id = int(pipeline.resolve_class_labels(label, 1, torch.device("cpu"))[0])
    names = pipeline.classes
    return class_id, (names[class_id] if names else str(class_id))


def left_out(pipeline: CrispDiffPipeline) -> dict[str, Any]:
    """What the full pipeline does beyond the stock loop, with the source's settings (None where it has none)."""
    config = pipeline.config
    conditional = pipeline.unet.config.get("num_class_embeds") is not None
    interval = pipeline.default_guidance_interval
    if interval is not None:  # JSON has no infinity: an open upper end is None
        interval = (interval[0], None if interval[1] == math.inf else interval[1])
    return {
        "sr_model": None
        if pipeline.sr_model is None
        else {"upscale_by_default": bool(config.upscale), "sr_strength": float(config.sr_strength)},
        "guidance_scale": float(config.guidance_scale) if conditional else None,
        "guidance_interval": None if interval is None else list(interval),
        "autoguidance_scale": float(config.autoguidance_scale) if pipeline.guide_unet is not None else None,
        "sharpen": {
            "amount": float(config.sharpen_amount),
            "radius": float(config.sharpen_radius),
            "threshold": float(config.sharpen_threshold),
        },
        "gamma": float(config.gamma),
        "class_names": pipeline.classes,
        "class_mix": pipeline.class_mix,
    }


def extras_off_call(pipeline: CrispDiffPipeline, class_id: int | None, sampler_chosen: bool) -> dict[str, Any]:
    """The full pipeline's call arguments (besides batch, seed and steps) that give the plain folder's samples."""
    call: dict[str, Any] = {}
    if sampler_chosen:
        call["sampler"] = pipeline.config.sampler
    if class_id is not None:
        call.update(class_labels=class_id, guidance_scale=1.0)
    if pipeline.guide_unet is not None:
        call["autoguidance_scale"] = 1.0
    if pipeline.sr_model is not None:
        call["upscale"] = False
    call.update(sharpen_amount=0.0, gamma=1.0)
    return call


def build_plain_pipeline(
    pipeline: CrispDiffPipeline,
    pipeline_dir: Path,
    *,
    class_label: int | str | None = None,
    sampler_chosen: bool = False,
    training_config: dict[str, Any] | None = None,
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The stock pipeline and the export record (what it is, what was folded, what was left out)."""
    if type(pipeline.unet) is not UNet2DModel:
        problem = f"its unet is a {type(pipeline.unet).__name__}; the stock pipelines take a diffusers UNet2DModel"
        raise UserError(f"{pipeline_dir} cannot be exported --plain: {problem}")
    stock = stock_class_name(pipeline.vae is not None)
    check_sampler(stock, pipeline.config.sampler, pipeline_dir, sampler_chosen)
    class_id, class_name = class_choice(pipeline, class_label, training_config, pipeline_dir)
    folds: list[str] = []
    unet = pipeline.unet
    if class_id is not None:
        unet = fold_class(unet, class_id)
        what = "the null class" if class_name is None else f"class {class_name!r}"
        folds.append(f"{what}'s embedding folded into time_embedding.linear_2.bias")
    scheduler = copy.deepcopy(pipeline.scheduler)
    if stock == "LDMPipeline":
        vae, note = plain_vae(pipeline)
        if note is not None:
            folds.append(note)
        plain: DiffusionPipeline = LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    else:
        plain = DDPMPipeline(unet=unet, scheduler=scheduler)
    record = {
        "kind": PLAIN_EXPORT_KIND,
        "source": str(Path(pipeline_dir).resolve()),
        "pipeline_class": stock,
        "scheduler_class": type(scheduler).__name__,
        "sampler": pipeline.config.sampler,
        "samples": "unconditionally" if class_name is None else f"class {class_name!r} only",
        "class_id": class_id,
        "folds": folds,
        "equal": "to float rounding" if folds else "bit for bit",
        "extras_off_call": extras_off_call(pipeline, class_id, sampler_chosen),
        "left_out": left_out(pipeline),
    }
    return plain, record


def _check_target(source: Path, target: Path) -> None:
    """Never write over the source, nor over a folder this command did not write."""
    if target == source.resolve():
        raise FlagError(f"--output_dir {target} is the pipeline folder itself; choose another folder")
    if not target.exists():
        return
    ours = plain_export_record(target) is not None
    if not target.is_dir() or (any(target.iterdir()) and not ours):
        raise OutputExistsError(
            f"--output_dir {target} exists and is not a plain export; choose a new folder or remove it"
        )


def export_plain(
    pipeline_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    class_label: int | str | None = None,
    sampler: str | None = None,
) -> Path:
    """Write the plain folder for ``pipeline_dir`` at ``output_dir`` (staged, swapped in whole) and return its path.

    ``class_label``: fold this class instead of the null class; ``sampler``: give the plain folder this sampler's
    scheduler instead of the saved one. The folder holds the stock ``model_index.json``, the components' configs and
    safetensors weights, the training config, ``crispdiff_export.json``, ``crispdiff_provenance.json`` and a card.
    """
    source = Path(pipeline_dir)
    index = read_model_index(source)
    check_exportable(source, index)
    stock = stock_class_name(isinstance(index.get("vae"), list) and index["vae"][0] is not None)
    check_sampler(stock, sampler or index.get("sampler", "dpmsolver++"), source, chosen=sampler is not None)
    target = Path(output_dir).resolve()
    _check_target(source, target)
    training_file = source / TRAINING_CONFIG_NAME
    training_config = json.loads(training_file.read_text(encoding="utf-8")) if training_file.is_file() else None
    pipeline = load_pipeline(source, sampler=sampler)
    plain, record = build_plain_pipeline(
        pipeline, source, class_label=class_label, sampler_chosen=sampler is not None, training_config=training_config
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        staging.mkdir()
        plain.save_pretrained(staging, safe_serialization=True)
        if training_config is not None:  # credentials left out: this folder is made to be shared
            write_json_atomic(staging / TRAINING_CONFIG_NAME, without_secrets(training_config), sort_keys=True)
        write_json_atomic(staging / EXPORT_RECORD_NAME, record, sort_keys=True)
        write_provenance(staging)
        card = render_plain_card(staging, record, training_config, location=str(target))
        write_text_atomic(staging / CARD_NAME, card)
        swap_folder_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = [
    "PLAIN_SAMPLERS",
    "build_plain_pipeline",
    "export_plain",
    "fold_class",
    "fold_latent_shift",
]
