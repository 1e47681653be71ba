"""`crispdiff add-sr DIR --sr_model FILE`: add or replace the super-resolution component of a saved pipeline folder.

FILE is a Real-ESRGAN / SwinIR / HAT / ... state dict (.pth, .pt, .ckpt, .safetensors; any architecture spandrel
detects), a saved SR component folder, or a Hub file (hf://owner/repo/file.pth). The weights are stored in DIR/sr_model
as safetensors, so the folder keeps loading with DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True).
If anything fails the folder is left exactly as it was.
"""

from __future__ import annotations

import argparse

from crispdiff.core.errors import FlagError, UserError, one_line, run_entry_point
from crispdiff.core.flags import parse_bool
from crispdiff.superres.load import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE, SRModelError, attach_sr, describe_sr_model


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``add-sr`` subcommand."""
    parser = subparsers.add_parser(
        "add-sr",
        help="Add or replace the SR (super-resolution) model of a saved pipeline folder.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", metavar="DIR", help="A pipeline folder saved by crispdiff.")
    parser.add_argument("--sr_model", required=True, metavar="FILE", help="SR weights file, folder or hf:// file.")
    parser.add_argument(
        "--sr_strength",
        type=float,
        default=None,
        help="Default blend of SR output with a Lanczos upscale, 0..1; unset keeps the pipeline's.",
    )
    parser.add_argument("--tile_size", type=int, default=DEFAULT_TILE_SIZE, help="Tile side in input pixels (0 = off).")
    parser.add_argument("--tile_overlap", type=int, default=DEFAULT_TILE_OVERLAP, help="Tile overlap in input pixels.")
    parser.add_argument(
        "--default_upscale",
        type=parse_bool,
        default=True,
        metavar="BOOL",
        help="Whether pipe(...) upscales when the call does not say.",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Attach the SR model and print what was attached; a failure is a user error that says the folder is unchanged."""
    return run_entry_point("crispdiff add-sr", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.sr_strength is not None and not 0.0 <= args.sr_strength <= 1.0:
        raise FlagError(f"--sr_strength must be in [0, 1], got {args.sr_strength}")
    try:
        model = attach_sr(
            args.pipeline_dir,
            args.sr_model,
            sr_strength=args.sr_strength,
            tile_size=args.tile_size or None,
            tile_overlap=args.tile_overlap,
            default_upscale=args.default_upscale,
        )
    except (SRModelError, ValueError, OSError) as err:
        raise UserError(f"{one_line(err)} ({args.pipeline_dir} was not changed)") from err
    print(f"added SR model to {args.pipeline_dir}/sr_model: {describe_sr_model(model)}")
    return 0
