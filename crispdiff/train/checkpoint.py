"""Resumable checkpoints: accelerate's state plus crispdiff's own (EMA weights, generators, data position).

A checkpoint is written into ``checkpoint-<step>.tmp`` and swapped into place (``crispdiff.core.io``: fsynced first)
only when every process has finished writing, so a run killed while saving (or a power cut after it) never leaves a
half-written ``checkpoint-<step>`` for ``--resume_from_checkpoint latest`` to pick up. EMA weights go to safetensors;
the generator states (one per process) go to safetensors too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from crispdiff.core.errors import FlagError, PathError
from crispdiff.core.io import swap_folder_into_place

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "crispdiff_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most `keep` remain (None keeps all)."""
    if keep is None or keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
) -> Path:
    """Save everything needed to continue bit-for-bit from optimizer step `step`; call on every process."""
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
    if accelerator.is_main_process:
        if ema is not None:
            _save_ema(ema, tmp)
        full_state = {**state, "step": step, "num_processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # fsynced, then swapped in (an older run's checkpoint at the same step is replaced only once this one is whole)
        swap_folder_into_place(tmp, final)
        prune_checkpoints(output_dir, total_limit)  # only once the new one is complete
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
    """Restore a checkpoint written by `save_checkpoint`; returns crispdiff's state dict (step, epoch, ...)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    saved_processes = state.get("num_processes", accelerator.num_processes)
    if saved_processes != accelerator.num_processes:
        raise FlagError(
            f"{path} was written by {saved_processes} process(es) but this run has {accelerator.num_processes}: the "
            "data sharding and RNG streams would not continue where they stopped. Resume with the same "
            "--num_processes, or start a new --output_dir."
        )
    accelerator.load_state(str(path))
    if ema is not None:
        _load_ema(ema, path)
    if generators:
        gen_file = path / f"generators_{accelerator.process_index}.safetensors"
        if not gen_file.is_file():
            raise PathError(
                f"{gen_file} is missing: the checkpoint was written by a run with fewer processes than this one"
            )
        states = load_file(str(gen_file))
        for name, g in generators.items():
            g.set_state(states[name])
    return state
