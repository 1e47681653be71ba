"""Resumable checkpoints: accelerate's state plus crispdiff's own (EMA weights, generators, data position).

A checkpoint is written into ``checkpoint-<step>.tmp`` and swapped into place (``crispdiff.core.io``: fsynced first)
only when every process has finished writing, so a run killed while saving (or a power cut after it) never leaves a
half-written ``checkpoint-<step>`` for ``--resume_from_checkpoint latest`` to pick up. EMA weights go to safetensors;
the generator states (one per process) go to safetensors too.

Every checkpoint also says which run wrote it: a run id (made when a run starts fresh, kept across resumes) and a
hash of what a run must share with it to continue it (:func:`run_identity`: the model's shape, the data, the noise
schedule). That is what keeps two runs in one ``--output_dir`` apart: a fresh run refuses a folder holding another
run's checkpoints (or with ``--overwrite_output_dir`` removes them first), ``latest`` resumes only a checkpoint of the
same kind of run, and ``--checkpoints_total_limit`` prunes only the current run's checkpoints. Checkpoints from
before run ids (no ``run_id`` in their state) still resume, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from crispdiff.core.errors import FlagError, OutputExistsError, PathError
from crispdiff.core.io import fsync_path, swap_folder_into_place

logger = logging.getLogger("crispdiff")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "crispdiff_state.json"

#: Config fields that say which data a run trains on (those a trainer's config has count).
DATA_FIELDS = (
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "instance_data_dir",
    "class_data_dir",
    "class_column",
    "max_train_samples",
    "resolution",
)
#: Config fields of the noise schedule a diffusion model learns (those a trainer's config has count).
SCHEDULE_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "sigmoid_start",
    "sigmoid_end",
    "sigmoid_tau",
    "snr_shift",
    "rescale_betas_zero_snr",
    "prediction_type",
)


def run_identity(config: Any, model: torch.nn.Module, trainable: list[Any], num_items: int) -> dict[str, str]:
    """What a checkpoint must share with a run for that run to continue it, one readable line per part.

    - model: every parameter's name and shape, which of them train (``trainable``: tensors or param groups) and
      whether an EMA is kept: what the saved weights, optimizer state and EMA must fit;
    - data: where the images come from (the config's :data:`DATA_FIELDS`) and how many items there are;
    - schedule: the noise schedule the model learns (the config's :data:`SCHEDULE_FIELDS`, once resolved).

    What may change on a resume is left out on purpose: the step count, learning rate, batch size and process
    count, logging, validation, precision. Model digests are of shapes, not values, so they are cheap.
    """
    named = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    tensors = [t for group in trainable for t in (group["params"] if isinstance(group, dict) else [group])]
    shapes = json.dumps({"named": named, "trainable": [tuple(t.shape) for t in tensors]})
    digest = hashlib.sha256(shapes.encode()).hexdigest()[:12]
    count = sum(p.numel() for p in model.parameters())
    ema = "EMA" if getattr(config, "use_ema", False) else "no EMA"
    model_line = f"{count:,} parameters, {sum(t.numel() for t in tensors):,} trained, {ema} (shapes {digest})"
    data = [f"{name}={getattr(config, name)}" for name in DATA_FIELDS if getattr(config, name, None) is not None]
    if getattr(config, "streaming", False):  # another buffer is another order of the stream
        data.append(f"streaming (shuffle buffer {config.shuffle_buffer_size})")
    schedule = [f"{name}={getattr(config, name)}" for name in SCHEDULE_FIELDS if hasattr(config, name)]
    return {
        "model": model_line,
        "data": ", ".join(data + [f"{num_items} items"]),
        "schedule": ", ".join(schedule) or "none",
    }


def identity_hash(identity: dict[str, str]) -> str:
    """The hash a checkpoint stores of :func:`run_identity` (equal hashes: the run may continue it)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def new_run_id() -> str:
    """An id for a run that starts fresh (kept by every resume of it)."""
    return uuid.uuid4().hex


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's crispdiff state (step, data position, run id ...)."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def checkpoint_run_id(checkpoint: str | Path) -> str | None:
    """The id of the run that wrote ``checkpoint``; None for one written before crispdiff recorded runs."""
    return read_state(checkpoint).get("run_id")


def runs_checkpoints(output_dir: str | Path, run_id: str | None) -> list[Path]:
    """The checkpoints of run ``run_id`` in ``output_dir``, oldest first, with any from before run ids: a folder a
    run writes into holds no other run's (:func:`foreign_checkpoints`), so those are the ones it resumed from."""
    return [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) in (run_id, None)]


def foreign_checkpoints(output_dir: str | Path, run_id: str | None, fresh: bool) -> list[Path]:
    """The checkpoints in ``output_dir`` that are not run ``run_id``'s: for a ``fresh`` run all of them; for a
    resumed one those with another run id (ones from before run ids belong to the run that resumed from them)."""
    found = list_checkpoints(output_dir)
    if fresh:
        return found
    return [p for p in found if checkpoint_run_id(p) not in (run_id, None)]


def remove_checkpoints(checkpoints: list[Path]) -> None:
    """Delete ``checkpoints`` safely: each is first renamed to a hidden name (atomic: ``latest`` can never see half
    a checkpoint), then deleted; what a crash leaves hidden is deleted by the next call."""
    doomed = []
    for checkpoint in checkpoints:
        hidden = checkpoint.parent / f".{checkpoint.name}.removed-{uuid.uuid4().hex[:8]}"
        checkpoint.rename(hidden)
        doomed.append(hidden)
    if checkpoints:
        fsync_path(checkpoints[0].parent)
    for folder in {c.parent for c in checkpoints}:
        doomed += [p for p in folder.glob(".checkpoint-*.removed-*") if p not in doomed]
    for hidden in doomed:
        shutil.rmtree(hidden, ignore_errors=True)


def checkpoints_to_replace(output_dir: str | Path, run_id: str | None, fresh: bool, overwrite: bool) -> list[Path]:
    """The other runs' checkpoints in ``output_dir`` that run ``run_id`` must remove before it writes its own (with
    ``overwrite``: --overwrite_output_dir); without it, a folder holding any is refused (every process raises)."""
    foreign = foreign_checkpoints(output_dir, run_id, fresh)
    if foreign and not overwrite:
        raise OutputExistsError(describe_foreign(output_dir, foreign, fresh))
    return foreign


def describe_foreign(output_dir: str | Path, foreign: list[Path], fresh: bool) -> str:
    """The refusal of an output folder holding another run's checkpoints, with the three ways on."""
    names = ", ".join(p.name for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    whose = "an earlier run" if fresh else "another run than the one resumed"
    resume = "--resume_from_checkpoint latest to continue it, " if fresh else ""
    return (
        f"{output_dir} holds checkpoints of {whose} ({names}); pass {resume}--overwrite_output_dir to remove them "
        "and start over, or choose another --output_dir"
    )


def check_same_run(checkpoint: Path, saved: dict[str, Any], identity: dict[str, str]) -> None:
    """Refuse to continue ``checkpoint`` (state ``saved``) with a run of another kind, naming what differs.

    A checkpoint from before run ids has no hash to compare: it resumes, with a warning.
    """
    if "run_hash" not in saved:
        logger.warning(
            "crispdiff: %s was written by an earlier crispdiff that did not record its run: resuming it without "
            "checking that it is a checkpoint of this kind of run (same model, data and schedule)",
            checkpoint,
        )
        return
    if saved["run_hash"] == identity_hash(identity):
        return
    before = saved.get("run_identity", {})
    differences = [f"{part}: saved {before.get(part)!r}, now {now!r}" for part, now in identity.items()
                   if before.get(part) != now]  # fmt: skip
    raise FlagError(
        f"--resume_from_checkpoint: {checkpoint} is a checkpoint of another kind of run ("
        + ("; ".join(differences) or "its run hash differs")
        + "); resume with the flags and data it was trained with, or start a new run (--overwrite_output_dir or "
        "another --output_dir)"
    )


def prune_checkpoints(output_dir: str | Path, keep: int | None, run_id: str | None = None) -> None:
    """Delete run ``run_id``'s oldest checkpoints so that at most ``keep`` of them remain (None keeps all); other
    runs' checkpoints are not this run's to delete."""
    if keep is None or keep <= 0:
        return
    remove_checkpoints(runs_checkpoints(output_dir, run_id)[:-keep])


def _save_ema(ema: Any, directory: Path) -> None:
    """EMA shadow weights as safetensors, its counters as JSON (no pickle)."""
    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}
    save_file(tensors, str(directory / "ema.safetensors"))
    counters = {"optimization_step": int(ema.optimization_step), "cur_decay_value": ema.cur_decay_value}
    (directory / "ema.json").write_text(json.dumps(counters))


def _load_ema(ema: Any, directory: Path) -> None:
    tensors = load_file(str(directory / "ema.safetensors"))
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(
            f"{directory}/ema.safetensors holds {len(tensors)} tensors, the model has {len(ema.shadow_params)}"
        )
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(tensors[f"shadow.{i}"].to(p.device, p.dtype))
    counters = json.loads((directory / "ema.json").read_text())
    ema.optimization_step = counters["optimization_step"]
    ema.cur_decay_value = counters["cur_decay_value"]


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    *,
    ema: Any | None = None,
    generators: dict[str, torch.Generator] | None = None,
    total_limit: int | None = None,
    process_state: dict[str, Any] | None = None,
) -> Path:
    """Save everything needed to continue bit-for-bit from optimizer step `step`; call on every process.
    ``process_state``: what this process alone must restore (e.g. its place in a ``--streaming`` stream)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if generators:
        gen_states = {name: g.get_state().cpu() for name, g in generators.items()}
        save_file(gen_states, str(tmp / f"generators_{accelerator.process_index}.safetensors"))
    if process_state:
        (tmp / f"process_state_{accelerator.process_index}.json").write_text(json.dumps(process_state))
    if accelerator.is_main_process:
        if ema is not None:
            _save_ema(ema, tmp)
        full_state = {**state, "step": step, "num_processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # fsynced, then swapped in (an older run's checkpoint at the same step is replaced only once this one is whole)
        swap_folder_into_place(tmp, final)
        prune_checkpoints(output_dir, total_limit, state.get("run_id"))  # only once the new one is complete
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """Resolve `--resume_from_checkpoint`: 'latest' (None when there is none yet) or a path / folder name."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(which)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / which
    if not (path / STATE_FILE).is_file():
        raise PathError(
            f"--resume_from_checkpoint {which!r}: {path} is not a complete crispdiff checkpoint (no {STATE_FILE})"
        )
    return path


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    *,
    ema: Any | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint`; returns crispdiff's state dict (step, epoch, ...), with
    this process's ``process_state`` (empty when written by another number of processes).

    Written by another number of processes, it still loads (weights, optimizer, LR schedule and EMA are the same on
    every process; accelerate restores the RNG states of the ranks that have one), but the per-process
    ``generators`` are left to the caller to reseed: there is no rank-for-rank mapping of their streams.
    """
    path = Path(path)
    state = read_state(path)
    accelerator.load_state(str(path))
    if ema is not None:
        _load_ema(ema, path)
    if generators and state.get("num_processes", accelerator.num_processes) == accelerator.num_processes:
        gen_file = path / f"generators_{accelerator.process_index}.safetensors"
        if not gen_file.is_file():
            raise PathError(f"{gen_file} is missing: {path} is not a complete crispdiff checkpoint")
        states = load_file(str(gen_file))
        for name, g in generators.items():
            g.set_state(states[name])
    own = path / f"process_state_{accelerator.process_index}.json"
    same_layout = state.get("num_processes", accelerator.num_processes) == accelerator.num_processes
    state["process_state"] = json.loads(own.read_text()) if same_layout and own.is_file() else {}
    return state
