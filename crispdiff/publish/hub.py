"""Model cards and uploading a pipeline folder to the Hugging Face Hub.

Why the card is written into the folder on every push (and can be written without one): the folder is the artefact
users share, so it should explain itself — what it generates, a sample grid, how to load it without crispdiff, and
the exact training configuration — whether it travels via the Hub, a zip file or a network share.

No upload happens unless every precondition holds, and a failed upload (no token, offline, no network, no permission)
raises ``HubUploadError`` saying which; the local folder is never modified beyond its README.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crispdiff.core.config import without_secrets as public_training_config
from crispdiff.core.errors import UserError
from crispdiff.core.io import write_text_atomic
from crispdiff.core.provenance import PROVENANCE_NAME
from crispdiff.publish.export import (
    MODEL_INDEX_NAME,
    QUALITY_NAME,
    SAMPLES_NAME,
    TRAINING_CONFIG_NAME,
    read_model_index,
)

CARD_NAME = "README.md"
#: The card's licence when neither ``--license`` nor the training config names one: unspecified.
DEFAULT_LICENSE = "other"
BASE_TAGS = ["crispdiff", "diffusers", "unconditional-image-generation"]
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "checkpoints/**",
    "logs/**",
    ".*",
    ".*/**",
    "**/__pycache__/**",
    "*.tmp",
]
"""What ``push_to_hub`` leaves out: resumable training checkpoints, tensorboard logs, hidden staging folders."""


class HubUploadError(RuntimeError):
    """The upload did not happen or did not finish; the message says why and that the local folder is intact."""


class HubAccessError(UserError):
    """``--push_to_hub`` cannot work (no token, offline, no write access), found before training rather than after."""


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


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
    with the crispdiff version and command that made the folder (``crispdiff_provenance.json``).
    """
    folder = Path(pipeline_dir)
    text = render_model_card(folder, training_config, repo_id=repo_id, license=license, datasets=datasets, tags=tags)
    return write_text_atomic(folder / CARD_NAME, text)


# --------------------------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------------------------


def files_to_upload(pipeline_dir: str | os.PathLike, ignore: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Relative paths ``push_to_hub`` would upload (checkpoints, logs and hidden staging files left out, and the
    ``ignore`` patterns)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(pipeline_dir)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=[*UPLOAD_IGNORE_PATTERNS, *ignore]))


def upload_operations(pipeline_dir: str | os.PathLike, ignore: list[str] | tuple[str, ...] = ()) -> list[Any]:
    """One ``CommitOperationAdd`` per file to upload; the training configuration goes up with its secrets removed.

    Why not ``upload_folder``: ``crispdiff_training.json`` may hold ``hub_token`` (it is the config the run was given),
    and the local file must stay as it is; so the uploaded copy is a redacted one, in the same single commit.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(pipeline_dir)
    operations = []
    for relative in files_to_upload(folder, ignore):
        source: Path | bytes = folder / relative
        if relative == TRAINING_CONFIG_NAME:
            config = json.loads((folder / relative).read_text(encoding="utf-8"))
            source = (json.dumps(public_training_config(config), indent=2, sort_keys=True) + "\n").encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=source))
    return operations


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (the env var is checked now, the library reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _resolve_token(token: str | None) -> str | None:
    """The explicit token, else huggingface_hub's (HF_TOKEN or the cached ``hf auth login``)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push_to_hub(
    pipeline_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    *,
    commit_message: str = "Upload crispdiff pipeline",
    training_config: dict[str, Any] | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """Write the model card, then upload the pipeline folder (minus checkpoints/logs) to ``repo_id``; returns the URL.

    The upload is a single commit (see :func:`upload_operations`): all files or none, secrets stripped from the
    uploaded training configuration.

    Raises ``HubUploadError`` when there is no token, the Hub is switched off (``HF_HUB_OFFLINE=1``), or the
    ``create_repo`` / ``upload_folder`` call fails (network, permissions); the local folder stays intact.
    """
    folder = Path(pipeline_dir)
    read_model_index(folder)
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"--repo_id must be 'name' or 'owner/name', got {repo_id!r}")
    write_model_card(folder, training_config, repo_id=repo_id, license=license, datasets=datasets)
    return upload_folder(folder, repo_id, private, token, commit_message, "its model card README.md was written")


def hub_repo_id(config: Any) -> str:
    """The repo a training run uploads to: --hub_model_id, else the name of --output_dir."""
    return getattr(config, "hub_model_id", None) or Path(config.output_dir).resolve().name


def check_hub_access(repo_id: str, private: bool, token: str | None) -> str:
    """Make sure the repo exists and can be written before any training, as diffusers' scripts create it before step
    1: a missing token, offline mode or a refused ``create_repo`` then costs seconds, not the run. Returns the URL."""
    resolved = _resolve_token(token)
    if not resolved:
        raise HubAccessError(
            "--push_to_hub needs a Hugging Face token: pass --hub_token, set HF_TOKEN or run `hf auth login` "
            "(checked before training; nothing was trained)"
        )
    if hub_offline():
        raise HubAccessError(
            "--push_to_hub cannot work with HF_HUB_OFFLINE=1: unset it, or drop --push_to_hub and upload later with "
            "`crispdiff push` (checked before training; nothing was trained)"
        )
    from huggingface_hub import HfApi

    try:
        return str(HfApi(token=resolved).create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except Exception as err:  # network, HTTP (401/403): the upload at the end would fail the same way
        raise HubAccessError(
            f"--push_to_hub: cannot create or reach the Hub repo {repo_id!r} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); check the network, the token's write permission and "
            "--hub_model_id (checked before training; nothing was trained)"
        ) from err


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool,
    token: str | None,
    commit_message: str,
    local_note: str = "",
    ignore: list[str] | tuple[str, ...] = (),
) -> str:
    """Upload ``folder`` (minus checkpoints/logs, secrets stripped) to ``repo_id`` in one commit; returns the URL.

    The one upload path of every crispdiff artifact (pipelines and LoRA folders): a missing token or offline mode is
    refused before any network call, and any failure is a ``HubUploadError`` that says the local folder is intact.
    """
    folder = Path(folder)
    intact = f"nothing was uploaded; the local folder {folder} is intact" + (f" ({local_note})" if local_note else "")
    resolved = _resolve_token(token)
    if not resolved:
        raise HubUploadError(
            f"cannot upload to {repo_id!r}: no Hugging Face token. Pass --token (or --hub_token when training), set "
            f"HF_TOKEN, or run `hf auth login`; {intact}"
        )
    if hub_offline():
        raise HubUploadError(
            f"cannot upload to {repo_id!r}: the Hub is switched off (HF_HUB_OFFLINE=1); unset it on "
            f"a machine with network access and upload again; {intact}"
        )
    return _upload(folder, repo_id, private, resolved, commit_message, ignore)


def _upload(
    folder: Path, repo_id: str, private: bool, token: str, commit_message: str, ignore: list[str] | tuple[str, ...]
) -> str:
    """create_repo + one commit of every file; any failure becomes a HubUploadError that says what happened."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        operations = upload_operations(folder, ignore)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(url.repo_id, operations, commit_message=commit_message, repo_type="model")
    except Exception as err:  # network, HTTP (401/403/404), offline mode: all mean "not uploaded"
        raise HubUploadError(
            f"upload of {folder} to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}). Check the network, "
            f"the token's write permission and the repo id; nothing was committed (the upload is one commit), and "
            f"the local folder {folder} is intact"
        ) from err
    return str(url)


def maybe_push_to_hub(pipeline_dir: str | os.PathLike, config: Any) -> str | None:
    """For training scripts: upload when ``config.push_to_hub`` (HubConfig flags), else just refresh the card.

    ``hub_model_id`` defaults to the folder's name; ``config.to_dict()`` (the training configuration) goes into the
    card.
    """
    training_config = config.to_dict() if hasattr(config, "to_dict") else None
    if not getattr(config, "push_to_hub", False):
        write_model_card(pipeline_dir, training_config)
        return None
    folder = Path(pipeline_dir).resolve()
    # training writes OUTPUT_DIR/pipeline: name the repo after the run, not after the subfolder
    default_name = folder.parent.name if folder.name == "pipeline" else folder.name
    repo_id = getattr(config, "hub_model_id", None) or default_name
    return push_to_hub(
        pipeline_dir,
        repo_id,
        private=bool(getattr(config, "hub_private_repo", False)),
        token=getattr(config, "hub_token", None),
        training_config=training_config,
    )


__all__ = [
    "BASE_TAGS",
    "CARD_NAME",
    "DEFAULT_LICENSE",
    "HubAccessError",
    "HubUploadError",
    "MODEL_INDEX_NAME",
    "UPLOAD_IGNORE_PATTERNS",
    "card_license",
    "check_hub_access",
    "files_to_upload",
    "hub_repo_id",
    "maybe_push_to_hub",
    "public_training_config",
    "push_to_hub",
    "render_model_card",
    "upload_folder",
    "upload_operations",
    "write_model_card",
]
