"""Runs never mix: every checkpoint names its run, a fresh run does not write among another run's checkpoints,
``latest`` continues only the same kind of run, pruning touches only the current run's checkpoints, and a run
resumes on another number of processes (not bit-exactly, and says so)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_training import image_folder, tiny_config  # noqa: F401  (image_folder is a fixture)

from crispdiff.core.errors import FlagError
from crispdiff.train.checkpoint import STATE_FILE, prune_checkpoints, save_checkpoint
from crispdiff.train.unet_trainer import train


def run_ids(output_dir: Path) -> dict[str, str | None]:
    """Each checkpoint's run id, by folder name (None: written before run ids)."""
    states = {p.name: json.loads((p / STATE_FILE).read_text()) for p in output_dir.glob("checkpoint-*")}
    return {name: states[name].get("run_id") for name in sorted(states, key=lambda n: int(n.split("-")[1]))}


def test_a_new_run_in_a_killed_runs_folder_is_refused_and_with_overwrite_replaces_its_checkpoints(
    image_folder,  # noqa: F811
    tmp_path,
):
    """The issue's case. A run killed after checkpoint-4 leaves it behind; a new run with other flags in the same
    folder used to write checkpoint-1 and -2 beside it, prune its own checkpoint-1 (by step number) while keeping
    the stale checkpoint-4, and ``latest`` then resumed the killed run. Now it is refused, unless
    --overwrite_output_dir, which removes the killed run's checkpoints first."""
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, max_train_steps=5, checkpointing_steps=4))
    shutil.rmtree(out / "pipeline")  # killed before its export: only its checkpoint is left
    killed = run_ids(out)
    assert list(killed) == ["checkpoint-4"]

    new_run = dict(seed=1, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    refused = r"checkpoints of an earlier run \(checkpoint-4\).*--overwrite_output_dir"
    with pytest.raises(FileExistsError, match=refused):
        train(tiny_config(image_folder, out, **new_run))
    assert run_ids(out) == killed and not (out / "pipeline").exists(), "a refused run writes nothing"

    train(tiny_config(image_folder, out, overwrite_output_dir="true", **new_run))
    ids = run_ids(out)
    assert list(ids) == ["checkpoint-1", "checkpoint-2"], ids
    assert len(set(ids.values())) == 1 and None not in ids.values() and killed["checkpoint-4"] not in ids.values()
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")], "nothing half-removed is left"

    # latest now continues the new run (extended by a step), under its own id
    train(tiny_config(image_folder, out, resume_from_checkpoint="latest", **{**new_run, "max_train_steps": 4}))
    assert set(run_ids(out).values()) == set(ids.values()) and "checkpoint-3" in run_ids(out)


@pytest.mark.parametrize(
    "change, part",
    [({"layers_per_block": 2}, "model"), ({"prediction_type": "epsilon"}, "schedule"), ({"resolution": 8}, "data")],
)
def test_resume_latest_refuses_a_checkpoint_of_another_kind_of_run(image_folder, tmp_path, change, part):  # noqa: F811
    """A checkpoint of another model shape, schedule or data is not continued (it used to fail deep inside
    accelerate's loader, or worse, train on); the refusal names what differs."""
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, max_train_steps=3, checkpointing_steps=2))
    with pytest.raises(FlagError, match=rf"checkpoint of another kind of run \(.*{part}: saved .*, now "):
        train(tiny_config(image_folder, out, resume_from_checkpoint="latest", max_train_steps=3, **change))


def test_a_checkpoint_from_before_run_ids_resumes_with_a_warning_and_is_pruned_as_this_runs(
    image_folder,  # noqa: F811
    tmp_path,
    caplog,
):
    """Users have checkpoints written before run ids: they resume (with a warning that nothing was checked), and
    the run that continues them counts them as its own when --checkpoints_total_limit prunes."""
    out = tmp_path / "run"
    flags = dict(max_train_steps=6, checkpointing_steps=2)
    train(tiny_config(image_folder, out, max_train_steps=3, checkpointing_steps=2))
    state_file = out / "checkpoint-2" / STATE_FILE
    state = json.loads(state_file.read_text())
    legacy = {k: v for k, v in state.items() if k not in ("run_id", "run_hash", "run_identity", "images_per_batch")}
    state_file.write_text(json.dumps(legacy))  # what an earlier crispdiff wrote
    with caplog.at_level(logging.WARNING, logger="crispdiff"):
        train(tiny_config(image_folder, out, resume_from_checkpoint="latest", checkpoints_total_limit=1, **flags))
    assert "did not record its run" in caplog.text
    ids = run_ids(out)
    assert list(ids) == ["checkpoint-4"] and ids["checkpoint-4"], ids


def test_pruning_deletes_only_the_current_runs_checkpoints(tmp_path):
    """--checkpoints_total_limit used to prune by step number across every checkpoint in the folder."""
    from accelerate import Accelerator
    from tiny_models import tiny_unet

    accelerator = Accelerator(cpu=True)
    unet = accelerator.prepare(tiny_unet())
    out = tmp_path / "run"
    for step, run in ((1, "ours"), (2, "other"), (3, "ours"), (4, "ours")):
        save_checkpoint(accelerator, out, step, {"epoch": 0, "batch_in_epoch": step, "run_id": run})
    assert unet is not None and list(run_ids(out)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    prune_checkpoints(out, keep=1, run_id="ours")
    assert run_ids(out) == {"checkpoint-2": "other", "checkpoint-4": "ours"}
    save_checkpoint(accelerator, out, 5, {"epoch": 0, "batch_in_epoch": 5, "run_id": "ours"}, total_limit=2)
    assert run_ids(out) == {"checkpoint-2": "other", "checkpoint-4": "ours", "checkpoint-5": "ours"}
