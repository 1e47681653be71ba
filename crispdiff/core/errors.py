"""User errors: problems the user can fix (data, flags, paths), reported as one line and exit status 2.

Why a family of exceptions instead of printing where the problem is found: the library stays usable from Python
(callers and tests get an exception they can catch), while every entry point — the three training scripts and each
``crispdiff`` subcommand — turns the same exceptions into the same one-line ``prog: error: ...`` and status 2. A
traceback then always means a real bug.

The classes also derive from the builtin a caller would naturally catch (``ValueError``, ``FileNotFoundError``,
``FileExistsError``, ``ImportError``), so code written against the old exceptions keeps working.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

#: Exit status for user errors, as argparse uses for bad flags.
USER_ERROR_STATUS = 2


class UserError(Exception):
    """A problem with the user's data, flags or paths; the message names the flag or file to change."""


class DataError(UserError, ValueError):
    """A problem with the user's data or data flags; the message names the file and the flag to change."""


class FlagError(UserError, ValueError):
    """A flag value or flag combination that cannot work."""


class PathError(UserError, FileNotFoundError):
    """A path that does not exist or is not what the flag needs (e.g. a folder that is not a pipeline)."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder already holds a finished result that the run would replace."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss stopped being a finite number: the run diverged (usually a learning rate too high for it)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a flag needs is not installed; the message names the extra to install."""


#: What an entry point reports as one line. Only crispdiff's own user errors: a builtin ``FileNotFoundError`` may
#: come from a bug as well as from a user's path, and a bug must keep its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def one_line(error: BaseException) -> str:
    """The error's message on one line (wrapped messages and multi-line reasons are joined)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename and not text:
        text = f"{error.strerror}: {error.filename}"
    return text or type(error).__name__


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit status to use."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_entry_point(prog: str, main: Callable[[], object]) -> int:
    """Run ``main``; a user error becomes one line on stderr and status 2, anything else propagates (a bug)."""
    try:
        result = main()
    except USER_ERRORS as error:
        return report_user_error(prog, error)
    return int(result) if isinstance(result, int) else 0


def install_user_error_hook(prog: str) -> None:
    """Make an uncaught user error end the process with one line and status 2 instead of a traceback.

    Used by ``parse_config`` when it parses the real command line, so every training script (including ones that
    only call ``main()``) gets the behaviour. ``os._exit`` is the only way to choose the status from an excepthook,
    and it skips the interpreter's shutdown: the atexit handlers (trackers, accelerate's process group) and the
    streams are run and flushed first.
    """
    previous = sys.excepthook
    if getattr(previous, "_crispdiff_prog", None) is not None:
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if issubclass(kind, USER_ERRORS):
            status = report_user_error(prog, error)
            atexit._run_exitfuncs()  # what a normal exit would run; os._exit below would skip it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        previous(kind, error, traceback)

    hook._crispdiff_prog = prog  # type: ignore[attr-defined]
    sys.excepthook = hook


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ... (see --help)``) and status 2, like every other user error,
    and no abbreviations: ``--num_epoch`` must not silently stand for ``--num_epochs`` (a typo of one flag could
    otherwise become another flag, and the set of flags the user gave would miss it). Subparsers inherit both."""

    def __init__(self, *args: Any, allow_abbrev: bool = False, **kwargs: Any):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)
