"""What made a saved folder: the crispdiff version and the command line, in ``crispdiff_provenance.json``.

Why: a pipeline, LoRA, SR, VAE or exported SD folder travels without the run that made it (the Hub, a zip file, a
colleague's disk). Its training config says what the flags resolved to, but not which crispdiff resolved them, nor
what was typed; with both, the folder can be remade, and a difference between two folders traced to a version or a
flag. Every writer calls :func:`write_provenance` into the folder it stages, and the cards quote
:func:`public_command`, so there is one definition of "the command" and secrets (``--hub_token``) never reach a file.
No timestamp on purpose: two runs of the same command on the same versions give the same file.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from crispdiff import __version__
from crispdiff.core.config import is_secret_name
from crispdiff.core.io import write_json_atomic

PROVENANCE_NAME = "crispdiff_provenance.json"

#: Libraries whose version decides what a saved folder holds or how it samples.
RECORDED_LIBRARIES = ("torch", "diffusers", "accelerate", "transformers", "peft")


def _is_secret_flag(token: str) -> bool:
    """Whether a ``--flag`` / ``--flag=value`` token names a credential (``--hub_token``, ``--token`` ...)."""
    if not token.startswith("-"):
        return False
    return is_secret_name(token.split("=", 1)[0])


def public_command(argv: list[str] | None = None) -> list[str]:
    """The command line (default ``sys.argv``) with every credential flag and its value left out.

    The flag goes with its value so that the command can be run again as it stands: the token then comes from the
    cached login or ``HF_TOKEN``, as the flag's help says.
    """
    argv = list(sys.argv if argv is None else argv)
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            if not token.startswith("--"):
                continue
        if _is_secret_flag(token):
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`RECORDED_LIBRARIES` (those that are installed) and of Python."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``{"crispdiff_version", "command", "versions"}`` for a folder made by this process (``argv``: its command)."""
    return {"crispdiff_version": __version__, "command": public_command(argv), "versions": library_versions()}


def write_provenance(folder: str | os.PathLike, argv: list[str] | None = None) -> Path:
    """Write ``crispdiff_provenance.json`` into ``folder`` (atomically) and return its path."""
    return write_json_atomic(Path(folder) / PROVENANCE_NAME, provenance(argv), sort_keys=True)
