"""The flag machinery: a config dataclass's fields are its script's flags.

Why a dataclass instead of a hand-written argparse block per script: every default lives in exactly one place, the
library functions take a typed object rather than a ``Namespace``, and a later script (latent, VAE) extends the
pixel trainer's config by subclassing instead of copying forty ``add_argument`` lines. This module turns a config
class into its parser (``flag`` fields, no abbreviations, refused flags), reads which flags the user gave from
argparse's own result, refuses flags that act only with a setting the run lacks (``conditional_flags``), and parses a
command line into the resolved config (``parse_config``). The config classes themselves are in
:mod:`crispdiff.core.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any

from crispdiff.core.diffusers_flags import accepted_values, add_refused_flags, canonical_values, option_names
from crispdiff.core.errors import ArgumentParser, FlagError, install_user_error_hook


def flag(default: Any, help: str, choices: list[str] | None = None, **metadata: Any) -> Any:
    """A dataclass field that also describes its command-line flag."""
    meta = {"help": help, "choices": choices, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


#: A flag that acts only in some settings: a test of the resolved config, and what settles it (``--push_to_hub``).
Condition = tuple[Callable[[Any], bool], str]


def conditional_flags(config_cls: type) -> dict[str, Condition]:
    """The ``conditional_flags`` of a config class and its bases (a class's own entries win)."""
    merged: dict[str, Condition] = {}
    for cls in reversed(config_cls.__mro__):
        merged.update(vars(cls).get("conditional_flags", {}))
    return merged


def check_conditional_flags(config: Any) -> None:
    """Refuse flags given on the command line that would have no effect in this run's settings (``--hub_model_id``
    without ``--push_to_hub``): accepted, they would look as if they had changed something. Defaults are not refused."""
    given = getattr(config, "explicit_flags", frozenset())
    conditions = conditional_flags(type(config))
    unmet = [name for name, (met, _) in conditions.items() if name in given and not met(config)]
    if unmet:
        needed = conditions[unmet[0]][1]
        names = [name for name in unmet if conditions[name][1] == needed]
        it = "it" if len(names) == 1 else "them"
        raise FlagError(f"{flag_list(names)}: no effect without {needed}; add that or drop {it}")


def flag_list(names: list[str]) -> str:
    return ", ".join(f"--{name}" for name in names)


_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one ``--name`` flag per dataclass field, typed from the annotation.

    Booleans accept both ``--flag`` (sets True) and ``--flag false`` so that defaults that are on (``--use_ema``)
    can be turned off; lists take several values (``--channel_mults 1 2 4``).
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    refused = getattr(config_cls, "refused_flags", {})
    conditions = conditional_flags(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in refused:  # a field this script refuses as a flag: it keeps its default
            continue
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.name in conditions and conditions[f.name][1].split()[0] not in help_text:
            help_text = f"{help_text} Only with {conditions[f.name][1]}."
        # argparse %-formats help strings: a literal "%" in a help text or a default would crash --help
        kwargs: dict[str, Any] = {"default": default, "help": f"{help_text} (default: {default})".replace("%", "%%")}
        if f.metadata.get("choices"):
            kwargs["choices"] = accepted_values(f.name, f.metadata["choices"])
        if tp is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True)
        elif typing.get_origin(tp) is list:
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")
        else:
            kwargs["type"] = tp
        parser.add_argument(*option_names(f.name, names), dest=f.name, **kwargs)
    add_refused_flags(parser, refused, own_flags=names)


class _Unset:
    """The value every field starts with in the parse that finds the flags the user gave."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """The config fields the user set on the command line, as opposed to defaults: a trainer that takes settings from
    elsewhere (a pretrained model's schedule) must not override these, and a flag that does not apply is refused.

    Read from argparse's own result rather than from the tokens: the command line is parsed again with every field
    starting out unset (argparse fills in a default only where a field has no value yet), so whatever spelling set a
    field (an alias, ``--name=value``, a flag given twice) counts, and nothing the parser accepted can slip past.
    """
    fields = {a.dest for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS}
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(fields, UNSET)))
    return frozenset(name for name in fields if getattr(marked, name) is not UNSET)


@functools.cache
def build_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser of ``config_cls``: one flag per field (no abbreviations) plus its refused flags.

    Built once per class: it depends on the class alone, parsing leaves it unchanged, and building one costs far more
    than a parse (the tests parse thousands of command lines)."""
    parser = ArgumentParser(description=description or config_cls.__doc__)
    add_dataclass_flags(parser, config_cls)
    return parser


def parse_config(config_cls: type, argv: list[str] | None = None, description: str | None = None) -> Any:
    """Parse command-line flags into an instance of ``config_cls``.

    ``argv=None`` means this is the program's own command line: from then on a user error anywhere in the run (bad
    data, a missing path, an invalid flag combination) ends it with one ``error:`` line and status 2
    (``crispdiff.core.errors``). Returns the resolved config (``LoopConfig.resolve``): read-only, defaults filled in,
    flags checked.
    """
    parser = build_parser(config_cls, description)
    if argv is None:
        install_user_error_hook(parser.prog)
    args = parser.parse_args(argv)
    config = config_cls(**vars(args))
    config.explicit_flags = given_flags(parser, argv)
    canonical_values(config)
    return config.resolve()
