"""Atomic and durable writes (crispdiff.core.io): the one folder-swap helper used by checkpoints, pipelines and VAE
folders keeps the old folder until the new one is in place, fsyncs what it swaps in, and leaves files readable."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from tiny_models import base_config, tiny_unet

from crispdiff.core.io import swap_folder_into_place, write_text_atomic
from crispdiff.latent.vae_trainer import save_vae_folder
from crispdiff.publish.export import save_pipeline


@pytest.fixture
def umask_022():
    """A shared machine's usual umask, whatever the test runner's is."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=2,
        norm_num_groups=4,
        layers_per_block=1,
    )


def _fail_on_call(monkeypatch, number: int) -> list[tuple[str, str]]:
    """Make the `number`-th os.replace raise, as a crash at that point would; returns the calls seen."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == number:
            raise OSError("simulated crash during the swap")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_saved_pipeline_is_readable_by_others(tmp_path, umask_022):
    """safetensors and mkstemp make 0600 files; a pipeline on a shared machine must be 0644 under umask 022."""
    folder = save_pipeline(
        tmp_path / "p", unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine"
    )
    modes = _modes(folder)
    assert modes["model_index.json"] == 0o644 and modes["unet/diffusion_pytorch_model.safetensors"] == 0o644
    assert {m for name, m in modes.items() if (folder / name).is_file()} == {0o644}, modes
    assert {m for name, m in modes.items() if (folder / name).is_dir()} == {0o755}, modes


def test_pipeline_save_pretrained_model_index_respects_umask(tmp_path, umask_022):
    """The pipeline's own atomic JSON rewrite (used by pipe.save_pretrained outside crispdiff) respects the umask."""
    from crispdiff.publish.export import build_pipeline

    pipe = build_pipeline(unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine")
    pipe.save_pretrained(tmp_path / "direct")
    assert stat.S_IMODE((tmp_path / "direct" / "model_index.json").stat().st_mode) == 0o644


def test_atomic_text_files_respect_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_text_atomic(tmp_path / "a" / "b.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "{}"


def test_vae_folder_survives_a_crash_during_the_swap(tmp_path, monkeypatch):
    """save_vae_folder used to delete the old VAE before renaming the new one in: a crash between lost both."""
    folder = tmp_path / "vae"
    save_vae_folder(_tiny_vae(), folder, "old card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = _fail_on_call(monkeypatch, 2)  # 1st rename: old folder aside; 2nd: the new one in -> crash
    with pytest.raises(OSError, match="simulated crash"):
        save_vae_folder(_tiny_vae(), folder, "new card")
    assert len(calls) >= 2
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the old VAE must survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"], "no staging or backup folder may be left"
    save_vae_folder(_tiny_vae(), folder, "new card")
    assert (folder / "README.md").read_text() == "new card"


def test_swap_keeps_carried_entries_when_it_fails(tmp_path, monkeypatch):
    target, staging = tmp_path / "target", tmp_path / "staging"
    target.mkdir()
    (target / "ours.txt").write_text("old")
    (target / "foreign").mkdir()
    (target / "foreign" / "keep.bin").write_bytes(b"x")
    staging.mkdir()
    (staging / "ours.txt").write_text("new")
    _fail_on_call(monkeypatch, 3)  # carry foreign -> staging, old aside, then the new one in fails
    with pytest.raises(OSError):
        swap_folder_into_place(staging, target, carry=["foreign"])
    monkeypatch.undo()
    assert (target / "ours.txt").read_text() == "old" and (target / "foreign" / "keep.bin").read_bytes() == b"x"
    swap_folder_into_place(staging, target, carry=["foreign"])
    assert (target / "ours.txt").read_text() == "new" and (target / "foreign" / "keep.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_swap_fsyncs_files_and_folders_before_the_rename(tmp_path, monkeypatch):
    """Without an fsync a power cut after the rename can leave zero-length files in the new folder (ext4, xfs)."""
    staging, target = tmp_path / "staging", tmp_path / "target"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "weights.bin").write_bytes(b"w" * 10)
    (staging / "config.json").write_text("{}")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    swap_folder_into_place(staging, target)
    for path in ("sub/weights.bin", "config.json", "sub", ""):
        assert str((staging / path) if path else staging) in synced, (path, synced)
    assert str(tmp_path) in synced, "the parent folder (the rename itself) must be synced too"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_every_single_file_writer_fsyncs_the_file_before_the_rename_and_then_its_folder(tmp_path, monkeypatch):
    """write_atomic's family (text, JSON, and files another library wrote, e.g. LoRA weights): the data reaches the
    disk before the rename, the rename before the call returns."""
    from crispdiff.core.io import move_file_into_place, write_json_atomic

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    staged = tmp_path / "staging" / "weights.safetensors"
    staged.parent.mkdir()
    staged.write_bytes(b"w" * 10)
    for write, target in (
        (lambda path: write_text_atomic(path, "text"), tmp_path / "a.txt"),
        (lambda path: write_json_atomic(path, {"x": 1}), tmp_path / "b.json"),
        (lambda path: move_file_into_place(staged, path), tmp_path / "out" / "weights.safetensors"),
    ):
        synced.clear()
        write(target)
        data_file = synced[0]  # the temp file beside the target, or the staged file that is moved
        assert target.is_file() and synced[-1] == str(target.parent) and len(synced) >= 2, (target, synced)
        assert data_file.endswith((".tmp", staged.name)) and not Path(data_file).is_dir(), synced
