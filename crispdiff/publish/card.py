"""Model cards: the README.md written into a pipeline folder.

Why the card is written into the folder on every push (and can be written without one): the folder is the artefact
users share, so it should explain itself — what it generates, a sample grid, how to load it without crispdiff, and
the exact training configuration — whether it travels via the Hub, a zip file or a network share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crispdiff.core.config import without_secrets as public_training_config
from crispdiff.core.io import write_text_atomic
from crispdiff.core.provenance import PROVENANCE_NAME
from crispdiff.publish.export import (
    EXPORT_RECORD_NAME,
    PLAIN_EXPORT_KIND,
    QUALITY_NAME,
    SAMPLES_NAME,
    TRAINING_CONFIG_NAME,
    read_model_index,
)

CARD_NAME = "README.md"
#: The card's licence when neither ``--license`` nor the training config names one: unspecified.
DEFAULT_LICENSE = "other"
BASE_TAGS = ["crispdiff", "diffusers", "unconditional-image-generation"]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is absent (a card must not fail on an optional file)."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _card_tags(index: dict[str, Any], extra: list[str] | None) -> list[str]:
    """Base tags, plus what kind of model this is, plus the caller's; no duplicates, order kept."""
    tags = list(BASE_TAGS)
    tags.append("latent-diffusion" if _has_component(index, "vae") else "pixel-diffusion")
    if _has_component(index, "sr_model"):
        tags.append("super-resolution")
    for tag in extra or []:
        if tag not in tags:
            tags.append(tag)
    return tags


def _has_component(index: dict[str, Any], name: str) -> bool:
    """Whether model_index.json names a real (non-null) component."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _card_datasets(training_config: dict[str, Any] | None, datasets: list[str] | None) -> list[str] | None:
    """Hub dataset ids the model was trained on: the caller's, else ``dataset_name`` when it is not a local path."""
    if datasets is not None:
        return list(datasets) or None
    name = (training_config or {}).get("dataset_name")
    if isinstance(name, str) and name and not Path(name).expanduser().exists() and not name.startswith((".", "/")):
        return [name]
    return None


def _parameter_count(weights: Path) -> int | None:
    """Parameters in a safetensors file, read from its header only (no tensor is loaded)."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            count = 1
            for dim in handle.get_slice(key).get_shape():
                count *= int(dim)
            total += count
    return total


def _components_table(folder: Path, index: dict[str, Any]) -> str:
    """A markdown table of the folder's components and what each one is."""
    rows = []
    unet = _read_json(folder / "unet" / "config.json") or {}
    unet_params = _parameter_count(folder / "unet" / "diffusion_pytorch_model.safetensors")
    size = unet.get("sample_size")
    if unet.get("encoder"):  # TimmEncoderUNet (pipelines/timm_unet.py)
        detail = f"{size} px samples, timm encoder `{unet['encoder']}`"
    else:
        detail = f"{size} px samples, channels {unet.get('block_out_channels')}"
    if unet_params:
        detail += f", {unet_params / 1e6:.3g}M parameters"
    unet_entry = index.get("unet")
    rows.append(("unet", unet_entry[1] if isinstance(unet_entry, list) else "UNet2DModel", detail))
    scheduler = index.get("scheduler", [None, None])[1]
    rows.append(("scheduler", scheduler, f"default sampler `{index.get('sampler', '?')}`"))
    if _has_component(index, "vae"):
        rows.append(("vae", index["vae"][1], "latents are decoded to pixels"))
    if _has_component(index, "sr_model"):
        from crispdiff.pipelines.sr_model import describe_config

        sr = _read_json(folder / "sr_model" / "config.json") or {}
        rows.append(
            (
                "sr_model",
                index["sr_model"][1],
                describe_config(sr) + f"; default sr_strength "
                f"{index.get('sr_strength')}, upscale by default: {index.get('upscale')}",
            )
        )
    lines = ["| component | class | details |", "|---|---|---|"]
    lines += [f"| {name} | {cls} | {detail} |" for name, cls, detail in rows]
    return "\n".join(lines)


def _usage(repo_or_dir: str, has_sr: bool, has_timm: bool = False) -> str:
    """How to load and sample the pipeline on a machine without crispdiff."""
    needs = "torch, diffusers" + (", timm" if has_timm else "") + (" and spandrel" if has_sr else "")
    sr_line = (
        "\n# upscale=False skips the SR step; sr_strength blends SR with a Lanczos upscale (0 = Lanczos only)\n"
        "big = pipe(batch_size=4, upscale=True, sr_strength=0.5, generator=torch.Generator().manual_seed(0)).images\n"
        if has_sr
        else ""
    )
    return (
        f"Needs only {needs} (crispdiff itself is not required). `trust_remote_code=True` lets diffusers import the\n"
        "pipeline code saved with the model (`pipeline_crispdiff.py`"
        + (", `unet/timm_unet.py`" if has_timm else "")
        + (", `sr_model/sr_model.py`" if has_sr else "")
        + ").\n\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo_or_dir}", trust_remote_code=True)\n'
        "images = pipe(batch_size=16, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images\n"
        f"{sr_line}```\n"
    )


#: What each figure of ``crispdiff_quality.json`` means, for the card (``crispdiff.evaluate.metrics`` defines them).
METRIC_MEANINGS = {
    "swd_avg": "sliced Wasserstein distance of patch statistics, x1e3, averaged over scales: lower is closer",
    "swd_64": "SWD at the finest scale",
    "swd_32": "SWD at half resolution",
    "swd_16": "SWD at quarter resolution",
    "hf_energy_ratio": "high-frequency energy of the samples / of the training images: 1 is as sharp, below is softer",
    "laplacian_var_ratio": "Laplacian variance (focus) of the samples / of the training images: 1 is as crisp",
    "colour_blob": "flat, wrongly coloured regions: colour_hist_jsd + edge_density_deficit, 0 is like the data",
    "colour_hist_jsd": "Jensen-Shannon divergence of the colour histograms (bits): 0 is the same colours",
    "edge_density_deficit": "how much flatter (fewer edges) the samples are than the training images: 0 is none",
    "nn_median_ratio": "distance to the nearest training image / between neighbouring training images: below 0.5, "
    "copying",
    "near_copy_fraction": "share of samples that are near-copies of a training image",
}


def _quality(folder: Path) -> list[str]:
    """The card's quality section: the final validation's figures when the run measured them, else how to."""
    quality = _read_json(folder / QUALITY_NAME)
    if not quality or not quality.get("metrics"):
        return [
            "Not measured by the run that saved this folder. `crispdiff evaluate` measures a saved pipeline against "
            "reference images (SWD, sharpness, colour blobs, memorisation).\n"
        ]
    rows = [
        f"| {name} | {value:.4g} | {METRIC_MEANINGS.get(name, '')} |"
        for name, value in quality["metrics"].items()
        if isinstance(value, (int, float))
    ]
    return [
        f"Measured at the end of training (step {quality.get('step', '?')}) on {quality.get('samples', 'samples')}, "
        f"against {quality.get('reference', 'the training images')}. A few samples make these figures noisy; "
        "`crispdiff evaluate` measures more, against a real-vs-real floor.\n",
        "| metric | value | meaning |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _provenance(folder: Path) -> list[str]:
    """Which crispdiff and which command made the folder (``crispdiff_provenance.json``), when recorded."""
    record = _read_json(folder / PROVENANCE_NAME)
    if not record:
        return []
    command = " ".join(record.get("command", []))
    return [f"Made with crispdiff {record.get('crispdiff_version', '?')} by `{command}` (`{PROVENANCE_NAME}`).\n"]


def card_license(license: str | None, training_config: dict[str, Any] | None) -> str:
    """The card's licence: the one given (``crispdiff push --license``), else the run's ``--license``, else
    :data:`DEFAULT_LICENSE`."""
    return license or (training_config or {}).get("license") or DEFAULT_LICENSE


def _conditioning(index: dict[str, Any]) -> str:
    """The card's first words: what kind of model this is and how it is conditioned."""
    names = index.get("class_names")
    if not names:
        return "An unconditional image diffusion model"
    if index.get("class_mix"):
        return (
            f"An image diffusion model conditioned on {len(names)} auto classes (clusters of its training images; "
            "called without `class_labels` it samples their mix, with guidance)"
        )
    return f"A class-conditional image diffusion model ({len(names)} classes: `pipe(class_labels=name)`)"


def render_model_card(
    pipeline_dir: str | os.PathLike,
    training_config: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> str:
    """The model card text (YAML metadata + markdown) for a pipeline folder; see :func:`write_model_card`."""
    from huggingface_hub import ModelCardData

    folder = Path(pipeline_dir)
    index = read_model_index(folder)
    if training_config is None:
        training_config = _read_json(folder / TRAINING_CONFIG_NAME)
    license = card_license(license, training_config)
    has_sr = _has_component(index, "sr_model")
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=_card_tags(index, tags),
        datasets=_card_datasets(training_config, datasets),
    )
    title = (repo_id or folder.resolve().name).split("/")[-1]
    parts = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {title}\n",
        f"{_conditioning(index)} trained with crispdiff, "
        "saved as a self-contained diffusers pipeline" + (" with a super-resolution post-step." if has_sr else "."),
        "",
    ]
    if (folder / SAMPLES_NAME).is_file():
        parts += ["## Samples\n", f"![samples]({SAMPLES_NAME})\n"]
    has_timm = (folder / "unet" / "timm_unet.py").is_file()
    parts += ["## How to use\n", _usage(repo_id or str(folder), has_sr, has_timm=has_timm)]
    parts += ["## Quality\n", *_quality(folder)]
    parts += ["## Components\n", _components_table(folder, index), ""]
    if license == DEFAULT_LICENSE:
        parts += ["License: not specified by the author (`--license` when training, or `crispdiff push --license`).\n"]
    parts += ["## Training configuration\n", *_provenance(folder)]
    if training_config:
        body = json.dumps(public_training_config(training_config), indent=2, sort_keys=True, default=str)
        parts += [f"Saved as `{TRAINING_CONFIG_NAME}` in this repository.\n", f"```json\n{body}\n```\n"]
    else:
        parts += ["Not recorded with this pipeline.\n"]
    return "\n".join(parts)


def write_model_card(
    pipeline_dir: str | os.PathLike,
    training_config: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write ``README.md`` into the pipeline folder (atomically) and return its path.

    YAML metadata: ``library_name: diffusers``, ``pipeline_tag``, ``license`` (:func:`card_license`), ``tags``
    (crispdiff, diffusers, unconditional-image-generation, pixel-/latent-diffusion, super-resolution ...),
    ``datasets`` (the training Hub dataset, if any). Body: the sample grid (``samples.png``, if present), how to load
    it, the final validation's figures (``crispdiff_quality.json``, if the run measured them), the components, and
    the training configuration (``training_config``, else the folder's ``crispdiff_training.json``; secrets removed)
    with the crispdiff version and command that made the folder (``crispdiff_provenance.json``). A plain export
    (``crispdiff export --plain``) gets :func:`render_plain_card` instead.
    """
    folder = Path(pipeline_dir)
    record = plain_export_record(folder)
    if record is not None:  # `crispdiff export --plain`: the stock class's card
        if training_config is None:
            training_config = _read_json(folder / TRAINING_CONFIG_NAME)
        text = render_plain_card(folder, record, training_config, repo_id=repo_id, license=license, datasets=datasets)
    else:
        text = render_model_card(
            folder, training_config, repo_id=repo_id, license=license, datasets=datasets, tags=tags
        )
    return write_text_atomic(folder / CARD_NAME, text)


# ---- plain exports (`crispdiff export --plain`) ----------------------------------------------------------------------


def plain_export_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A plain export's record (``crispdiff_export.json`` of kind ``plain``), or None for any other folder."""
    record = _read_json(Path(folder) / EXPORT_RECORD_NAME)
    return record if isinstance(record, dict) and record.get("kind") == PLAIN_EXPORT_KIND else None


def _plain_usage(repo_or_dir: str, record: dict[str, Any]) -> str:
    """How to load a plain folder: the stock class, no ``trust_remote_code``."""
    latent = record["pipeline_class"] == "LDMPipeline"
    notes = [
        f"`DiffusionPipeline.from_pretrained` returns diffusers' own `{record['pipeline_class']}`: no code is loaded "
        "from the folder and crispdiff is not needed."
    ]
    if latent:
        notes.append(
            "`LDMPipeline` lives in diffusers' deprecated pipelines (still shipped); it logs `Expected types for "
            "vqvae: VQModel, got AutoencoderKL`, which is harmless: it only calls `vqvae.decode(latents).sample`. "
            "It returns PIL images or, with `output_type=\"np\"`, a NumPy array."
        )
    else:
        notes.append(
            "`DDPMPipeline` defaults to 1000 steps: pass `num_inference_steps`. It calls `scheduler.step(..., "
            "generator=...)`, so a replacement scheduler must take a generator (DPMSolverMultistepScheduler, "
            "DDPMScheduler)."
        )
    code = (
        "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo_or_dir}")\n'
        "images = pipe(batch_size=16, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images\n"
        "```\n"
    )
    return code + "\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def _class_summary(names: list[str] | None, mix: list[float] | None) -> str:
    """``3 classes (a, b, c)``, the first few of a long list, and whether unlabelled calls draw the class mix."""
    if not names:
        return "none"
    shown = ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "")
    return f"{len(names)} classes ({shown})" + ("; unlabelled calls draw the auto-class mix" if mix else "")


def _describe_left_out(record: dict[str, Any]) -> list[str]:
    """The card's table of what the full folder does and this one does not."""
    out = record["left_out"]
    sr, sharpen, names, mix = out["sr_model"], out["sharpen"], out["class_names"], out["class_mix"]
    interval = out["guidance_interval"]
    rows = [
        (
            "super-resolution post-step",
            "none"
            if sr is None
            else f"`sr_model`, sr_strength {sr['sr_strength']:g}, upscales by default: {sr['upscale_by_default']}",
        ),
        (
            "classifier-free guidance",
            "none (unconditional model)"
            if out["guidance_scale"] is None
            else f"scale {out['guidance_scale']:g} for labelled calls",
        ),
        (
            "guidance interval",
            "every step"
            if interval is None
            else f"noise levels sigma in ({interval[0]:g}, {'inf' if interval[1] is None else f'{interval[1]:g}'}]",
        ),
        (
            "autoguidance",
            "none" if out["autoguidance_scale"] is None else f"guide model, scale {out['autoguidance_scale']:g}",
        ),
        (
            "sharpening",
            "off"
            if sharpen["amount"] == 0
            else f"unsharp mask amount {sharpen['amount']:g}, radius {sharpen['radius']:g} px",
        ),
        ("gamma", "off" if out["gamma"] == 1 else f"{out['gamma']:g}"),
        ("classes", _class_summary(names, mix)),
    ]
    lines = ["| extra | in the full folder | here |", "|---|---|---|"]
    for name, full in rows:
        here = "left out"
        if name == "classes" and names:
            here = f"samples {record['samples']}: folded into the weights, no labels"
        lines.append(f"| {name} | {full} | {here} |")
    return lines


def render_plain_card(
    folder: str | os.PathLike,
    record: dict[str, Any],
    training_config: dict[str, Any] | None = None,
    *,
    location: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """The model card of a plain export: how to load it with the stock class, what it samples, what was left out of
    the full crispdiff pipeline and how to get it back, and how equal the two folders' samples are.

    ``folder`` is read (it may be the staging folder); ``location`` (the final folder) or ``repo_id`` is what the
    card calls it.
    """
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    latent = record["pipeline_class"] == "LDMPipeline"
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=card_license(license, training_config),
        tags=[*BASE_TAGS, "latent-diffusion" if latent else "pixel-diffusion"],
        datasets=_card_datasets(training_config, datasets),
    )
    where = repo_id or location or str(folder)
    title = where.rstrip("/").split("/")[-1]
    source = record["source"]
    call = ", ".join(f"{key}={value!r}" for key, value in record["extras_off_call"].items())
    if record["equal"] == "bit for bit":
        equal = "bit for bit"
    else:
        equal = (
            "to float rounding: " + "; ".join(record["folds"]) + ". A bias added in another order rounds differently, "
            "so pixels may differ in the last bits of float32"
        )
    unet = _read_json(folder / "unet" / "config.json") or {}
    params = _parameter_count(folder / "unet" / "diffusion_pytorch_model.safetensors")
    components = [
        "| component | class | details |",
        "|---|---|---|",
        f"| unet | UNet2DModel | {unet.get('sample_size')} px samples, channels {unet.get('block_out_channels')}"
        + (f", {params / 1e6:.3g}M parameters" if params else "")
        + " |",
        f"| scheduler | {record['scheduler_class']} | crispdiff's `{record['sampler']}` sampler, explicit betas |",
    ]
    if latent:
        vae = _read_json(folder / "vqvae" / "config.json") or {}
        components.append(
            f"| vqvae | {vae.get('_class_name')} | latents are divided by scaling_factor {vae.get('scaling_factor')} "
            "and decoded to pixels |"
        )
    parts = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {title}\n",
        f"A {'latent' if latent else 'pixel'} image diffusion model trained with crispdiff, exported as a plain "
        f"diffusers `{record['pipeline_class']}` from the crispdiff pipeline folder `{source}`. It samples "
        f"{record['samples']}.\n",
        "## How to use\n",
        _plain_usage(where, record),
        "## What was left out\n",
        "The stock class runs the sampling loop and the decoder only. What the full crispdiff pipeline adds:\n",
        *_describe_left_out(record),
        "",
        "## Getting the extras back\n",
        "Load the full folder (it carries its pipeline code, so it needs `trust_remote_code=True`):\n",
        "```python\n"
        f'pipe = DiffusionPipeline.from_pretrained("{source}", trust_remote_code=True)\n'
        "```\n",
        f"With its extras off, `pipe(batch_size=..., num_inference_steps=..., generator=..., {call})`, it gives this "
        f"folder's images at the same seed and steps, {equal}.\n",
        "## Components\n",
        "\n".join(components),
        "",
        "## Training configuration\n",
        *_provenance(folder),
    ]
    if training_config:
        parts.append(f"The run's configuration is in `{TRAINING_CONFIG_NAME}`.\n")
    return "\n".join(parts)
