"""Atomic, durable file and folder writes: readers never see half a file, and a crash never loses the old copy.

Two helpers, one per granularity:

- ``write_atomic`` / ``write_text_atomic`` / ``write_json_atomic``: one file through a temp file beside it, fsynced,
  then ``os.replace``; ``move_file_into_place`` for a file another library wrote into a staging folder.
- ``swap_folder_into_place``: a complete staged folder (a checkpoint, a pipeline, a VAE) replaces the target folder.
  Every file of the staged folder and the folder itself are fsynced first, so after a power cut the renamed folder
  holds data, not zero-length files (ext4 / xfs may commit a rename before the data it points to).

Files written here get the permissions a plain ``open()`` would give (``0666 & ~umask``), not mkstemp's 0600: a
pipeline on a shared machine must be readable by the people it is shared with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from crispdiff.core.errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data to disk (folders: their entries, i.e. renames and new names)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if os.path.isdir(path) else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows folders) cannot fsync a directory; the data files were synced
        pass
    finally:
        os.close(fd)


def finalise_tree(folder: str | os.PathLike) -> None:
    """Give every file below ``folder`` the usual permissions, then fsync files and folders bottom-up.

    Why the chmod: safetensors and ``mkstemp`` create 0600 files, so a pipeline saved on a shared machine could not
    be loaded by anyone else. Files get ``0666 & ~umask`` (keeping execute bits), folders ``0777 & ~umask``.
    """
    file_mode, umask = default_file_mode(), _umask()
    for current, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(current, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111 & ~umask
            os.chmod(path, file_mode | executable)
            fsync_path(path)
        os.chmod(current, 0o777 & ~umask)
        fsync_path(current)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], object], *, binary: bool = False) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    The file gets the permissions a plain ``open()`` would give. On any error the temp file is removed and ``path``
    is left as it was. Parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(target.parent)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``write_atomic`` for a UTF-8 text file."""
    return write_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``write_atomic`` for a JSON file (ending in a newline); ``default=str`` writes paths and such as text."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def move_file_into_place(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a finished file (e.g. one a library wrote into a staging folder) onto ``target`` durably: fsynced and
    given the usual permissions before the rename, the folder fsynced after it."""
    staged, target = Path(staged), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(staged, default_file_mode())
    fsync_path(staged)
    os.replace(staged, target)
    fsync_path(target.parent)
    return target


def staging_folder(target: str | os.PathLike, label: str = "tmp") -> Path:
    """A fresh hidden sibling path of ``target`` to build a folder in before ``swap_folder_into_place``."""
    target = Path(target)
    return target.parent / f".{target.name}.{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def swap_folder_into_place(
    staging: str | os.PathLike,
    target: str | os.PathLike,
    carry: Iterable[str] = (),
    commit: Callable[[], object] | None = None,
) -> Path:
    """Replace ``target`` by the complete folder ``staging``; the old ``target`` survives any crash until the end.

    Steps: give the staged files the usual permissions and fsync them (``finalise_tree``); write down which entries
    of the old folder are to be carried over (``carry``: things that are not ours, e.g. checkpoints beside a
    pipeline) in a small manifest beside it; rename the old folder aside; rename the staged one in; move the carried
    entries from the old folder into the new one; delete the old one and the manifest.

    Why this order: a carried entry is only ever in the old folder or in the new one, never in the staging folder,
    which a later cleanup deletes. A crash at any point leaves either the old folder whole (in place, or aside until
    :func:`recover_abandoned_swaps` puts it back) or the new folder in place with the carried entries still in the
    old one, which that recovery moves over (the manifest says which). POSIX cannot exchange two non-empty folders
    atomically, so ``target`` is missing for the two renames in between.
    If the second rename fails, the old folder is renamed back. ``commit`` is a last step that belongs to the same
    change (e.g. renaming the ``model_index.json`` that names a new component into place): if it raises, the old
    folder comes back too.
    """
    staging, target = Path(staging), Path(target)
    finalise_tree(staging)
    recover_abandoned_swaps(target)  # a dead writer's old folder goes back (or its carried entries over) first
    if not target.exists():
        _rename_and_commit(staging, target, commit)
        fsync_path(target.parent)
        return target
    if not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; cannot save a folder there")
    carried = [name for name in carry if (target / name).exists() and not (staging / name).exists()]
    backup = staging_folder(target, "old")
    manifest = _carry_manifest(target, backup)
    if carried:
        _write_durably(manifest, json.dumps(carried))
    try:
        os.replace(target, backup)
    except BaseException:
        manifest.unlink(missing_ok=True)
        raise
    try:
        _rename_and_commit(staging, target, commit)
    except BaseException:
        os.replace(backup, target)
        manifest.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    _carry_over(backup, target, carried)
    shutil.rmtree(backup, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    fsync_path(target.parent)
    return target


#: A staging folder left by a process that died is removed once it is this old (a slow writer elsewhere is not).
ABANDONED_AFTER_S = 600.0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _write_durably(path: Path, text: str) -> None:
    """A new file under a name nobody else uses, fsynced with its folder (no temp file: there is no old copy)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(path.parent)


def _carry_manifest(target: Path, backup: Path) -> Path:
    """The file beside ``target`` naming the entries a swap carries from ``backup`` (same writer id as it)."""
    writer = backup.name[len(f".{target.name}.old-") :]
    return target.parent / f".{target.name}.carry-{writer}"


def _carry_over(backup: Path, target: Path, names: Iterable[str]) -> None:
    """Move the carried entries still in the old folder into the new one (a name the new one has is left)."""
    for name in names:
        if (backup / name).exists() and not (target / name).exists():
            os.replace(backup / name, target / name)
    fsync_path(target)
    fsync_path(backup)


def _abandoned(entry: Path, pid: str, moved_aside: bool) -> bool:
    """A hidden sibling whose writer is dead and which nobody has touched for :data:`ABANDONED_AFTER_S`. For a folder
    ``moved_aside`` the change time counts too: the rename that moved it updated it, while its modification time
    can be a month old, so a live writer elsewhere on a shared filesystem does not lose it mid-swap."""
    if _process_alive(int(pid)):
        return False
    info = entry.lstat()
    touched = max(info.st_mtime, info.st_ctime) if moved_aside else info.st_mtime
    return time.time() - touched > ABANDONED_AFTER_S


def recover_abandoned_swaps(target: str | os.PathLike) -> list[Path]:
    """Finish what writers of ``target`` that died left behind (hidden siblings named by ``staging_folder``, whose
    writer is dead and which are older than :data:`ABANDONED_AFTER_S`); returns what was handled.

    - a staging folder (``.NAME.tmp-*``) only ever holds new content, never carried entries: it is deleted;
    - an old folder moved aside (``.NAME.old-*``): with ``target`` missing, the swap died before the new folder was
      in, so the old one is renamed back; with ``target`` in place, the swap died after it, so the entries its
      manifest names are carried over into ``target`` before the old folder is deleted;
    - a manifest whose old folder is gone is deleted.
    """
    target = Path(target)
    handled = []
    for entry in sorted(target.parent.glob(f".{target.name}.*-*-*")):
        label, _, rest = entry.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if label not in ("tmp", "old", "carry") or not pid.isdigit() or not entry.exists():
            continue
        if not _abandoned(entry, pid, moved_aside=label == "old"):
            continue
        if label == "old":
            _finish_abandoned_swap(target, entry)
        elif label == "tmp":
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        elif not (target.parent / f".{target.name}.old-{rest}").exists():
            entry.unlink(missing_ok=True)
        handled.append(entry)
    return handled


def _finish_abandoned_swap(target: Path, backup: Path) -> None:
    """Roll a dead writer's swap back (``target`` missing: the old folder returns) or forward (carried entries
    move into the new ``target``, then the old folder goes)."""
    manifest = _carry_manifest(target, backup)
    if not target.exists():
        os.replace(backup, target)
    else:
        try:
            carried = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else []
        except (OSError, ValueError):
            carried = []  # a manifest is whole before its folder is moved aside; an unreadable one had none
        _carry_over(backup, target, carried)
        shutil.rmtree(backup, ignore_errors=True)
    fsync_path(target.parent)
    manifest.unlink(missing_ok=True)


def _rename_and_commit(staging: Path, target: Path, commit: Callable[[], object] | None) -> None:
    """Rename ``staging`` to ``target``, then run ``commit``; if it raises, the staged folder goes back."""
    os.replace(staging, target)
    try:
        if commit is not None:
            commit()
    except BaseException:
        os.replace(target, staging)
        raise
