"""Loading super-resolution models into the pipeline's SR component, and attaching one to a saved pipeline folder.

The component itself (``SpandrelSRModel``) lives in ``pipelines/sr_model.py`` because saved folders carry a copy of it;
this module is the crispdiff-side front door: it resolves where the weights come from (a local ``.pth`` /
``.safetensors`` file, a saved component folder, or a Hub file reference), turns every failure into one
``SRModelError`` that names the file, and edits pipeline folders without ever leaving them half-changed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crispdiff.core.io import move_file_into_place, staging_folder, swap_folder_into_place, write_json_atomic
from crispdiff.pipelines.sr_model import (
    DEFAULT_TILE_OVERLAP,
    DEFAULT_TILE_SIZE,
    STATE_DICT_SUFFIXES,
    SpandrelSRModel,
    SRModelError,
    describe_config,
    supported_architectures,
)
from crispdiff.publish.export import MODEL_INDEX_NAME, read_model_index
from crispdiff.publish.hub import hub_offline

SR_FOLDER = "sr_model"
#: ``--sr_model_name_or_path embedded``: the emoji SR x2 shipped in the package (64 -> 128 px, trained on Noto emoji).
EMBEDDED_SR = "embedded"
EMBEDDED_SR_RESOLUTION = 64
#: The unsharp amount after the embedded SR x2 in the pipelines that carry it (``upscale_sharpen_amount``), when the
#: training images are too small to calibrate it (``--upscale_calibration_images``): the best of
#: ``crispdiff evaluate --upscale --sharpen_sweep`` on the main job's samples against its training emoji at 128 px.
EMBEDDED_SR_SHARPEN_AMOUNT = 0.4
SR_MODULE_NAME = "sr_model"
SR_CLASS_NAME = "SpandrelSRModel"
HUB_PREFIX = "hf://"

__all__ = [
    "DEFAULT_TILE_OVERLAP",
    "DEFAULT_TILE_SIZE",
    "SRModelError",
    "SpandrelSRModel",
    "HubFileRef",
    "parse_hub_ref",
    "EMBEDDED_SR",
    "EMBEDDED_SR_SHARPEN_AMOUNT",
    "embedded_sr_dir",
    "load_sr_model",
    "describe_sr_model",
    "attach_sr",
    "supported_architectures",
]


@dataclass(frozen=True)
class HubFileRef:
    """A file inside a Hub model repository: ``hf://owner/repo[@revision]/path/file.pth`` or ``owner/repo/file.pth``."""

    repo_id: str
    filename: str
    revision: str | None = None


def parse_hub_ref(ref: str) -> HubFileRef | None:
    """The Hub file a reference names, or None when it does not look like one.

    ``hf://`` makes the intent explicit; a bare ``owner/repo/file`` is accepted too (diffusers-style), but only
    when it names a weights file, so a mistyped local path is reported as a missing file, not as a failed download.
    """
    explicit = ref.startswith(HUB_PREFIX)
    parts = ref[len(HUB_PREFIX) :].strip("/").split("/") if explicit else ref.split("/")
    if len(parts) < 3 or any(not p for p in parts):
        return None
    if not explicit and (Path(ref).suffix.lower() not in STATE_DICT_SUFFIXES or ref.startswith((".", "~"))):
        return None
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return HubFileRef(repo_id=f"{owner}/{repo}", filename="/".join(parts[2:]), revision=revision)


def download_hub_file(ref: HubFileRef, original: str) -> Path:
    """Fetch (or find in the local cache) the referenced file; any failure becomes an SRModelError that says why."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=ref.repo_id, filename=ref.filename, revision=ref.revision))
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found, OSError)
        reason = (
            "the Hub is switched off on this machine (HF_HUB_OFFLINE=1) and the file is not in the local cache"
            if hub_offline()
            else f"the download failed ({type(err).__name__}: {err})"
        )
        raise SRModelError(
            f"{original}: cannot get {ref.filename!r} from Hub repo {ref.repo_id!r}: {reason}. Download it on a "
            "connected machine and pass the local file path instead"
        ) from err


def embedded_sr_dir() -> Path:
    """The folder of the SR x2 model shipped inside the package (``crispdiff/assets/sr-noto-x2``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "sr-noto-x2"


def load_sr_model(
    path_or_hub_ref: str | os.PathLike,
    *,
    tile_size: int | None = DEFAULT_TILE_SIZE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
) -> SpandrelSRModel:
    """Load an SR model as the pipeline's SR component.

    Accepts a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.safetensors`` state dict (original project key names such as
    Real-ESRGAN's ``params_ema`` / ``conv_first`` / ``body.N.rdb1``, or spandrel's), a folder written by
    ``SpandrelSRModel.save_pretrained`` (or a pipeline folder holding one in ``sr_model/``), or a Hub file
    ``hf://owner/repo/file.pth`` / ``owner/repo/file.pth``, or ``"embedded"`` (the package's emoji SR x2).
    Raises ``SRModelError`` naming the file otherwise.
    """
    ref = os.fspath(path_or_hub_ref)
    if ref == EMBEDDED_SR:
        ref = os.fspath(embedded_sr_dir())
    local = Path(ref).expanduser()
    if local.is_dir():
        model = _load_folder(local, tile_size, tile_overlap)
    elif local.is_file():
        model = SpandrelSRModel.from_single_file(local, tile_size=tile_size, tile_overlap=tile_overlap)
    else:
        hub_ref = parse_hub_ref(ref)
        if hub_ref is None:
            raise SRModelError(
                f"{ref}: SR model file not found. Pass a local {' / '.join(STATE_DICT_SUFFIXES)} file, a saved SR "
                "component folder, or a Hub file as hf://owner/repo/file.pth"
            )
        path = download_hub_file(hub_ref, ref)
        model = SpandrelSRModel.from_single_file(path, tile_size=tile_size, tile_overlap=tile_overlap)
        model.register_to_config(source=f"{HUB_PREFIX}{hub_ref.repo_id}/{hub_ref.filename}")
    if torch_dtype is not None:
        model._cast_if_supported(torch_dtype)
    if device is not None:
        model.to(device)
    return model


def _load_folder(folder: Path, tile_size: int | None, tile_overlap: int) -> SpandrelSRModel:
    """A saved component folder, or a pipeline folder whose ``sr_model/`` holds one."""
    if (folder / SpandrelSRModel.config_name).is_file():
        component = folder
    elif (folder / SR_FOLDER / SpandrelSRModel.config_name).is_file():
        component = folder / SR_FOLDER
    else:
        raise SRModelError(
            f"{folder}: is a folder but holds no saved SR component ({SpandrelSRModel.config_name}); pass the "
            f"{' / '.join(STATE_DICT_SUFFIXES)} weights file instead"
        )
    return SpandrelSRModel.from_pretrained(component, tile_size=tile_size, tile_overlap=tile_overlap)


def describe_sr_model(model: Any) -> str:
    """One line: architecture, scale, tags, fp16/bf16 support, tiling and size, e.g. for logs and ``add-sr``."""
    params = sum(p.numel() for p in model.parameters())
    source = model.config.get("source")
    return describe_config(model.config) + f"; {params / 1e6:.3g}M parameters" + (f"; from {source}" if source else "")


# --------------------------------------------------------------------------------------------------------------------
# Attaching an SR model to a saved pipeline folder
# --------------------------------------------------------------------------------------------------------------------


def _updated_index(index: dict[str, Any], sr_strength: float | None, default_upscale: bool) -> dict[str, Any]:
    """model_index.json naming the SR component, with the pipeline's SR defaults updated."""
    updated = dict(index)
    updated[SR_FOLDER] = [SR_MODULE_NAME, SR_CLASS_NAME]
    updated["upscale"] = bool(default_upscale)
    # an amount calibrated after another SR model does not fit this one: back to the pipeline's sharpen_amount
    updated.pop("upscale_sharpen_amount", None)
    if sr_strength is not None:
        if not 0.0 <= float(sr_strength) <= 1.0:
            raise ValueError(f"--sr_strength must be in [0, 1], got {sr_strength}")
        updated["sr_strength"] = float(sr_strength)
    return updated


def _verify_saved(model: SpandrelSRModel, folder: Path) -> None:
    """Reload the staged component and compare weights bit for bit before it replaces anything."""
    reloaded = SpandrelSRModel.from_pretrained(folder)
    saved, original = reloaded.net.state_dict(), model.net.state_dict()
    same = saved.keys() == original.keys() and all(torch.equal(saved[k], original[k].cpu()) for k in saved)
    if not same or reloaded.config.architecture != model.config.architecture:
        raise SRModelError(f"the SR component staged in {folder} does not reload to the same weights; nothing changed")


def attach_sr(
    pipeline_dir: str | os.PathLike,
    sr_model_path: str | os.PathLike,
    *,
    sr_strength: float | None = None,
    tile_size: int | None = DEFAULT_TILE_SIZE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    default_upscale: bool = True,
) -> SpandrelSRModel:
    """Add or replace the SR component of a saved pipeline folder; on any error the folder is left unchanged.

    The new ``sr_model/`` and ``model_index.json`` are written and verified in hidden staging paths first, then
    swapped in together (``swap_folder_into_place``: fsynced, the old component restored if a step fails).
    ``model_index.json`` gets
    ``sr_model = ["sr_model", "SpandrelSRModel"]``, ``upscale = default_upscale`` and, if given, ``sr_strength``; an
    ``upscale_sharpen_amount`` (calibrated after the SR model it replaces) is dropped.
    """
    folder = Path(pipeline_dir).resolve()
    index = read_model_index(folder)
    new_index = _updated_index(index, sr_strength, default_upscale)
    model = load_sr_model(sr_model_path, tile_size=tile_size, tile_overlap=tile_overlap)
    staging = staging_folder(folder / SR_FOLDER)
    index_tmp = staging_folder(folder / MODEL_INDEX_NAME)
    try:
        model.save_pretrained(staging)
        _verify_saved(model, staging)
        write_json_atomic(index_tmp, new_index, sort_keys=True)
        swap_folder_into_place(
            staging, folder / SR_FOLDER, commit=lambda: move_file_into_place(index_tmp, folder / MODEL_INDEX_NAME)
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        index_tmp.unlink(missing_ok=True)
    return model
