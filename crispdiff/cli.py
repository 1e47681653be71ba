"""The `crispdiff` console command: one subcommand module per job in `crispdiff.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from crispdiff.core.errors import ArgumentParser, run_entry_point

# subcommand name -> module in crispdiff.commands exposing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "sample": "sample",
    "add-sr": "add_sr",
    "push": "push",
    "evaluate": "evaluate",
    "export-sd": "export_sd",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``crispdiff`` parser with one subparser per command (one-line flag errors, status 2)."""
    parser = ArgumentParser(
        prog="crispdiff", description="Train, sample, evaluate and share sharp small diffusion models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        module = importlib.import_module(f"crispdiff.commands.{module_name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors (bad flags, paths, data, a folder that is not a pipeline) print one
    ``crispdiff COMMAND: error: ...`` line and return 2, real bugs keep their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"crispdiff.commands.{COMMANDS[args.command]}")
    return run_entry_point(f"crispdiff {args.command}", lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
