"""Atomic and durable writes (crispdiff.core.io): the one folder-swap helper used by checkpoints, pipelines and VAE
folders keeps the old folder until the new one is in place, fsyncs what it swaps in, and leaves files readable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import base_config, tiny_unet, tiny_vae

from crispdiff.core.io import swap_folder_into_place, write_text_atomic
from crispdiff.publish.export import save_pipeline
from crispdiff.vae.trainer import save_vae_folder


@pytest.fixture
def umask_022():
    """A shared machine's usual umask, whatever the test runner's is."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


#: a one-level VAE with 2 latent channels: the smallest folder ``save_vae_folder`` writes
ONE_LEVEL_VAE = dict(sample_size=32, block_out_channels=(8,), latent_channels=2)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


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
    save_vae_folder(tiny_vae(**ONE_LEVEL_VAE), folder, "old card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = _fail_on_call(monkeypatch, 2)  # 1st rename: old folder aside; 2nd: the new one in -> crash
    with pytest.raises(OSError, match="simulated crash"):
        save_vae_folder(tiny_vae(**ONE_LEVEL_VAE), folder, "new card")
    assert len(calls) >= 2
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the old VAE must survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"], "no staging or backup folder may be left"
    save_vae_folder(tiny_vae(**ONE_LEVEL_VAE), folder, "new card")
    assert (folder / "README.md").read_text() == "new card"


def test_swap_keeps_carried_entries_when_it_fails(tmp_path, monkeypatch):
    target, staging = tmp_path / "target", tmp_path / "staging"
    target.mkdir()
    (target / "ours.txt").write_text("old")
    (target / "foreign").mkdir()
    (target / "foreign" / "keep.bin").write_bytes(b"x")
    staging.mkdir()
    (staging / "ours.txt").write_text("new")
    _fail_on_call(monkeypatch, 2)  # old aside, then the new one in fails
    with pytest.raises(OSError):
        swap_folder_into_place(staging, target, carry=["foreign"])
    monkeypatch.undo()
    assert (target / "ours.txt").read_text() == "old" and (target / "foreign" / "keep.bin").read_bytes() == b"x"
    swap_folder_into_place(staging, target, carry=["foreign"])
    assert (target / "ours.txt").read_text() == "new" and (target / "foreign" / "keep.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


_SWAP_KILLED_AT_STEP = """
import os, shutil, signal, sys
from pathlib import Path

import crispdiff.core.io as io

kill_at, target = int(sys.argv[1]), Path(sys.argv[2])
calls = 0


def counted(real):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return step


staging = io.staging_folder(target)  # named by this process: once it is killed, its writer is dead
staging.mkdir()
(staging / "ours.txt").write_text("new")
(staging / "unet").mkdir()
(staging / "unet" / "weights.bin").write_bytes(b"new weights")
for name in ("replace", "rename", "unlink", "rmdir", "fsync"):
    setattr(os, name, counted(getattr(os, name)))
shutil.rmtree = counted(shutil.rmtree)
io.swap_folder_into_place(staging, target, carry=["checkpoint-1", "logs"])
print("finished after", calls, "steps")
"""


def _make_old_folder(target: Path) -> None:
    (target / "unet").mkdir(parents=True)
    (target / "ours.txt").write_text("old")
    (target / "unet" / "weights.bin").write_bytes(b"old weights")
    (target / "checkpoint-1").mkdir()
    (target / "checkpoint-1" / "state.json").write_text("{}")
    (target / "logs").mkdir()
    (target / "logs" / "events").write_bytes(b"e")


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_swap_killed_at_any_step_keeps_the_old_folder_and_every_carried_file(tmp_path, monkeypatch):
    """SIGKILL (a real crash: no handler runs) before each rename, delete and fsync of a swap that carries two
    foreign entries. Once the dead writer's leftovers are old enough to be handled (the next save's cleanup), the
    target is the old folder or the new one, whole, and the carried files are in it: none was left only in the
    staging folder that the cleanup deletes (the old order moved them there first)."""
    from crispdiff.core import io

    monkeypatch.setattr(io, "ABANDONED_AFTER_S", -1.0)  # the dead writer's leftovers count as abandoned at once
    old_files = {"ours.txt": b"old", "unet/weights.bin": b"old weights"}
    new_files = {"ours.txt": b"new", "unet/weights.bin": b"new weights"}
    carried = {"checkpoint-1/state.json": b"{}", "logs/events": b"e"}
    env = dict(os.environ, PYTHONPATH=str(Path(io.__file__).parents[2]))
    outcomes = []
    for kill_at in range(1, 100):
        run = tmp_path / f"kill-{kill_at}"
        target = run / "pipeline"
        _make_old_folder(target)
        done = subprocess.run([sys.executable, "-c", _SWAP_KILLED_AT_STEP, str(kill_at), str(target)], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        finished = done.returncode == 0
        assert finished or done.returncode == -9, done.stderr[-2000:]
        io.recover_abandoned_swaps(target)  # what the next save of this folder does first
        files = _folder_files(target) if target.is_dir() else {}
        assert files in ({**old_files, **carried}, {**new_files, **carried}), (kill_at, files, list(run.iterdir()))
        assert [p.name for p in run.iterdir()] == ["pipeline"], (kill_at, list(run.iterdir()))
        outcomes.append(files["ours.txt"])
        if finished:
            break
    assert finished and outcomes[0] == b"old" and outcomes[-1] == b"new" and len(outcomes) > 5, outcomes


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The path of every file or folder ``os.fsync`` is called on, in order (the real fsync still runs)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_swap_fsyncs_files_and_folders_before_the_rename(tmp_path, synced):
    """Without an fsync a power cut after the rename can leave zero-length files in the new folder (ext4, xfs)."""
    staging, target = tmp_path / "staging", tmp_path / "target"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "weights.bin").write_bytes(b"w" * 10)
    (staging / "config.json").write_text("{}")
    swap_folder_into_place(staging, target)
    for path in ("sub/weights.bin", "config.json", "sub", ""):
        assert str((staging / path) if path else staging) in synced, (path, synced)
    assert str(tmp_path) in synced, "the parent folder (the rename itself) must be synced too"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_every_single_file_writer_fsyncs_the_file_before_the_rename_and_then_its_folder(tmp_path, synced):
    """write_atomic's family (text, JSON, and files another library wrote, e.g. LoRA weights): the data reaches the
    disk before the rename, the rename before the call returns."""
    from crispdiff.core.io import move_file_into_place, write_json_atomic

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


class DiskLog:
    """What reaches the disk, in order: every ``os.fsync`` (by the path behind the descriptor) and every rename.

    The real calls run; they are only recorded. Paths are compared resolved, as /proc reports them.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, str, str]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
            return real_fsync(fd)

        def rename_with(real):
            def rename(src, dst, **kwargs):
                self.events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
                return real(src, dst, **kwargs)

            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", rename_with(real_replace))
        monkeypatch.setattr(os, "rename", rename_with(real_rename))

    def clear(self) -> None:
        self.events.clear()

    def _last_rename_onto(self, target: Path) -> tuple[int, str]:
        target_path = os.path.realpath(target)
        hits = [(i, src) for i, (kind, src, dst) in enumerate(self.events) if kind == "rename" and dst == target_path]
        assert hits, f"{target} was never renamed into place: {self.events}"
        return hits[-1]

    def synced(self, start: int = 0, stop: int | None = None) -> set[str]:
        return {path for kind, path, _ in self.events[start:stop] if kind == "fsync"}

    def assert_durable_file(self, target: Path) -> None:
        """The data was fsynced before the rename that put it at ``target``, its folder after it."""
        at, source = self._last_rename_onto(target)
        assert source in self.synced(stop=at), f"{target}: {source} not fsynced before its rename; {self.events}"
        assert str(Path(target).resolve().parent) in self.synced(start=at), f"{target}: folder not fsynced after"

    def assert_durable_folder(self, target: Path) -> None:
        """Every file now in ``target`` and every folder of it were fsynced (under the staging name) before the
        rename that put the folder in place; the folder holding ``target`` after it."""
        at, staging = self._last_rename_onto(target)
        before = self.synced(stop=at)
        entries = [Path(target)] + sorted(Path(target).rglob("*"))
        for entry in entries:
            staged = os.path.join(staging, os.path.relpath(entry, target)) if entry != Path(target) else staging
            assert os.path.normpath(staged) in before, f"{entry} (staged as {staged}) not fsynced before the rename"
        assert len(entries) > 1, f"{target} is empty"
        assert str(Path(target).resolve().parent) in self.synced(start=at), f"{target}: parent not fsynced after"


@pytest.fixture
def disk_log(monkeypatch) -> DiskLog:
    if not sys.platform.startswith("linux"):
        pytest.skip("maps fds to paths through /proc")
    return DiskLog(monkeypatch)


def test_pipeline_vae_and_sr_folders_are_fsynced_whole_before_they_are_renamed_in(tmp_path, disk_log):
    """Without these fsyncs a power cut just after the rename can leave a pipeline of zero-length files (ext4, xfs
    commit a rename before the data it points to)."""
    from PIL import Image
    from spandrel.architectures.Compact import Compact

    from crispdiff.superres.load import attach_sr

    grid = Image.new("RGB", (4, 4))
    pipeline = save_pipeline(
        tmp_path / "pipe", unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine",
        training_config={"seed": 0}, sample_grid=grid,
    )  # fmt: skip
    disk_log.assert_durable_folder(pipeline)
    assert {"model_index.json", "samples.png", "unet"} <= {p.name for p in pipeline.iterdir()}

    disk_log.clear()
    vae = save_vae_folder(tiny_vae(**ONE_LEVEL_VAE), tmp_path / "vae", "card")
    disk_log.assert_durable_folder(vae)

    disk_log.clear()
    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
    torch.save({"params": dict(net.state_dict())}, tmp_path / "compact_x4.pth")
    attach_sr(pipeline, tmp_path / "compact_x4.pth")
    disk_log.assert_durable_folder(pipeline / "sr_model")
    disk_log.assert_durable_file(pipeline / "model_index.json")  # the index naming the new component


def test_a_plain_export_is_fsynced_whole_before_it_is_renamed_in(tmp_path, disk_log):
    """`crispdiff export --plain` writes through the same staging folder and swap as every other folder writer."""
    from crispdiff.publish.plain import export_plain

    source = save_pipeline(
        tmp_path / "pipe", unet=tiny_unet(seed=3, in_channels=4, sample_size=8), scheduler_base_config=base_config(),
        beta_schedule="cosine", vae=tiny_vae(block_out_channels=(8, 8)), latent_shift_factor=-0.2,
    )  # fmt: skip
    disk_log.clear()
    plain = export_plain(source, tmp_path / "plain")
    disk_log.assert_durable_folder(plain)
    assert {"model_index.json", "README.md", "unet", "vqvae", "crispdiff_provenance.json"} <= {
        p.name for p in plain.iterdir()
    }


def test_sd_pipeline_and_lora_files_are_fsynced_before_they_are_renamed_in(tmp_path, disk_log):
    from tiny_models import make_tiny_sd

    from crispdiff.pipelines.pipeline_crispdiff_sd import CrispDiffSDPipeline
    from crispdiff.sd.base import load_sd
    from crispdiff.sd.config import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, DreamBoothLoRAConfig
    from crispdiff.sd.export import export_sd
    from crispdiff.sd.lora_files import save_lora_weights

    base = make_tiny_sd(tmp_path / "base")
    disk_log.clear()
    disk_log.assert_durable_folder(export_sd(str(base), None, tmp_path / "exported"))

    disk_log.clear()  # saved directly (outside crispdiff): the model_index.json it rewrites is durable too
    CrispDiffSDPipeline.from_pretrained(str(base)).save_pretrained(tmp_path / "direct")
    disk_log.assert_durable_file(tmp_path / "direct" / "model_index.json")

    parts = load_sd(str(base))
    config = DreamBoothLoRAConfig(rank=2, lora_target_modules=["attention"])
    parts.unet.add_adapter(config.lora_config(config.unet_targets()))
    disk_log.clear()
    save_lora_weights(tmp_path / "lora", parts.unet, None, kohya=True)
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        disk_log.assert_durable_file(tmp_path / "lora" / name)


def test_a_crispdiff_pipeline_saved_directly_rewrites_its_model_index_durably(tmp_path, disk_log):
    from crispdiff.publish.export import build_pipeline

    pipe = build_pipeline(unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine")
    disk_log.clear()
    pipe.save_pretrained(tmp_path / "direct")
    disk_log.assert_durable_file(tmp_path / "direct" / "model_index.json")


def test_checkpoints_are_fsynced_whole_before_they_are_renamed_in(tmp_path, disk_log):
    """accelerate's files (weights, optimizer, RNG states) and crispdiff's (EMA, generators, state) alike."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import EMAModel

    from crispdiff.train.checkpoint import save_checkpoint

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    unet = tiny_unet()
    ema = EMAModel(unet.parameters())
    model, optimizer = accelerator.prepare(unet, torch.optim.AdamW(unet.parameters()))
    disk_log.clear()
    generators = {"data": torch.Generator().manual_seed(0)}
    folder = save_checkpoint(accelerator, tmp_path / "run", 3, {"epoch": 0}, ema=ema, generators=generators)
    names = {p.name for p in folder.iterdir()}
    assert {"crispdiff_state.json", "ema.safetensors", "generators_0.safetensors", "random_states_0.pkl"} <= names
    disk_log.assert_durable_folder(folder)
