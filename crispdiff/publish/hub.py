"""Uploading a pipeline folder to the Hugging Face Hub (its model card is :mod:`crispdiff.publish.card`, written into
the folder on every push).

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
from crispdiff.publish.card import plain_export_record, write_model_card
from crispdiff.publish.export import (
    TRAINING_CONFIG_NAME,
    read_model_index,
)

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
    if plain_export_record(folder) is None:  # a plain export names a stock class; anything else must be crispdiff's
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
    "UPLOAD_IGNORE_PATTERNS",
    "HubAccessError",
    "HubUploadError",
    "check_hub_access",
    "files_to_upload",
    "hub_offline",
    "hub_repo_id",
    "maybe_push_to_hub",
    "push_to_hub",
    "upload_folder",
    "upload_operations",
]
