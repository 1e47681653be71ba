"""Building one cache with every process of an ``accelerate launch``: the main process plans, each process builds its
share of the chunks (rank r takes chunks r, r + N, ...), and the main process records the result once all are done.

Only accelerate's own primitives carry it (``broadcast_object_list`` and ``wait_for_everyone``, on the run's
``Accelerator`` or ``PartialState``): a plan or a finishing step that fails on the main process is broadcast as its
error, so every process stops with the same message instead of waiting for ever at the next barrier. Two runs that
start together (two commands, not two ranks of one) build a cache once: the main process of each holds the cache's
file lock while its processes build (``build_lock``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Processes(Protocol):
    """What this module needs of an ``accelerate.Accelerator`` or ``accelerate.PartialState``."""

    num_processes: int
    process_index: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass
class BuildPlan:
    """What a build must do: the chunks to (re)build, and whether the record must be (re)written at all."""

    todo: list[int] = field(default_factory=list)
    record: bool = False  # False: the cache is whole as it is, nothing to build or record


def my_share(todo: Sequence[int], process_index: int, num_processes: int) -> list[int]:
    """This process's chunks of ``todo``: every ``num_processes``-th, starting at its rank."""
    return list(todo[process_index::num_processes])


def _broadcast_outcome(processes: Processes, work: Callable[[], Any]) -> Any:
    """``work()`` on the main process, its result (or the error it raised) handed to every process."""
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if processes.is_main_process:
        try:
            outcome = [("ok", work())]
        except Exception as error:  # noqa: BLE001 - re-raised on every process, this one included
            outcome = [("error", error)]
    kind, value = broadcast_object_list(outcome)[0]
    if kind == "error":
        raise value
    return value


def build_in_parts(
    processes: Processes | None,
    plan: Callable[[], BuildPlan],
    build: Callable[[BuildPlan, list[int]], None],
    record: Callable[[BuildPlan], None],
) -> BuildPlan:
    """Plan on the main process, ``build(plan, my_chunks)`` on every process, then ``record(plan)`` on the main one.

    ``processes`` None, or a single process: all three run here. Returns the plan (every process gets the same).
    """
    if processes is None or processes.num_processes == 1:
        planned = plan()
        if planned.record:
            build(planned, list(planned.todo))
            record(planned)
        return planned
    planned = _broadcast_outcome(processes, plan)
    if planned.record:
        build(planned, my_share(planned.todo, processes.process_index, processes.num_processes))
        processes.wait_for_everyone()  # every share is on disk before the main process records the whole
        _broadcast_outcome(processes, lambda: record(planned))
    return planned


@contextlib.contextmanager
def build_lock(processes: Processes | None, path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``) on ``path`` held by the main process (the only one, without
    ``processes``) while a cache is planned, built and recorded, so another run waits and then finds it whole; the
    other ranks of this run take no lock. A no-op where ``fcntl`` is missing (Windows)."""
    if processes is not None and not processes.is_main_process:
        yield
        return
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
