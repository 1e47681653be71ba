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

    Steps: give the staged files the usual permissions and fsync them (``finalise_tree``); move the entries named
    in ``carry`` (things in the old folder that are not ours, e.g. checkpoints beside a pipeline) into the staged
    folder; rename the old folder aside; rename the staged one in; fsync the parent; delete the old one. POSIX cannot
    exchange two non-empty folders atomically, so the window where ``target`` is missing is two renames long, and a
    crash in it leaves the old folder complete under its aside name.
    If the second rename fails, everything is moved back. ``commit`` is a last step that belongs to the same change
    (e.g. renaming the ``model_index.json`` that names a new component into place): if it raises, the old folder
    comes back too.
    """
    staging, target = Path(staging), Path(target)
    finalise_tree(staging)
    if not target.exists():
        _rename_and_commit(staging, target, commit)
        fsync_path(target.parent)
        remove_abandoned_staging(target)
        return target
    if not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; cannot save a folder there")
    carried = [name for name in carry if (target / name).exists() and not (staging / name).exists()]
    for name in carried:
        os.replace(target / name, staging / name)
    backup = staging_folder(target, "old")
    try:
        os.replace(target, backup)
    except BaseException:
        _move_back(staging, target, carried)
        raise
    try:
        _rename_and_commit(staging, target, commit)
    except BaseException:
        os.replace(backup, target)
        _move_back(staging, target, carried)
        raise
    fsync_path(target.parent)
    shutil.rmtree(backup, ignore_errors=True)
    remove_abandoned_staging(target)
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


def remove_abandoned_staging(target: str | os.PathLike) -> list[Path]:
    """Delete ``target``'s hidden staging siblings (``staging_folder`` names) whose writer is dead and which are
    older than :data:`ABANDONED_AFTER_S`: what a run killed while saving leaves behind. Backups of the old folder
    (``.NAME.old-*``) go only while ``target`` itself exists. Returns what was removed."""
    target = Path(target)
    removed = []
    for entry in target.parent.glob(f".{target.name}.*-*-*"):
        label, _, rest = entry.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if label not in ("tmp", "old") or not pid.isdigit() or (label == "old" and not target.exists()):
            continue
        if not _process_alive(int(pid)) and time.time() - entry.stat().st_mtime > ABANDONED_AFTER_S:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _rename_and_commit(staging: Path, target: Path, commit: Callable[[], object] | None) -> None:
    """Rename ``staging`` to ``target``, then run ``commit``; if it raises, the staged folder goes back."""
    os.replace(staging, target)
    try:
        if commit is not None:
            commit()
    except BaseException:
        os.replace(target, staging)
        raise


def _move_back(staging: Path, target: Path, names: list[str]) -> None:
    """Undo the carry-over of foreign entries after a failed swap."""
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, target / name)
