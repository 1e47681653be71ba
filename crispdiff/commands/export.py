"""`crispdiff export --plain DIR --output_dir OUT`: a copy of a crispdiff pipeline folder that diffusers' stock
classes load without trust_remote_code (DDPMPipeline for pixel models, LDMPipeline for latent ones).

It samples what the full pipeline samples with its extras off (no SR, sharpening, gamma, guidance or autoguidance) at
the same seed and steps; a class-conditional model gives its unconditional samples (or one class, --class). The
folder's README.md says what was left out and how to get it back. Stable Diffusion LoRAs: crispdiff export-sd.
"""

from __future__ import annotations

import argparse

from crispdiff.core.errors import FlagError, run_entry_point
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="Export a pipeline folder as a plain diffusers pipeline (no trust_remote_code, no extras).",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", metavar="DIR", help="A pipeline folder saved by crispdiff.")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="Write a folder that the stock diffusers classes load (the one kind of export this command makes).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where to write the plain folder (a new folder, or an earlier export)."
    )
    parser.add_argument(
        "--class",
        dest="class_label",
        default=None,
        metavar="NAME",
        help="A class-conditional model's class (a name, or an id) to fold in; default: its null class "
        "(unconditional samples).",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="The plain folder's sampler (default: the pipeline's own; DDPMPipeline takes dpmsolver++ or ddpm, "
        "LDMPipeline any but ddpm).",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export; a user error (no --plain, a folder a stock class cannot carry) is one line and status 2."""
    return run_entry_point("crispdiff export", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from crispdiff.publish.plain import export_plain

    if not args.plain:
        raise FlagError(
            "say what to export: --plain (a folder the stock diffusers classes load); for a Stable Diffusion LoRA "
            "use crispdiff export-sd"
        )
    folder = export_plain(args.pipeline_dir, args.output_dir, class_label=args.class_label, sampler=args.sampler)
    print(f"saved {folder} (load with DiffusionPipeline.from_pretrained(...), no trust_remote_code)")
    return 0
