"""`crispdiff sample DIR`: generate images from a saved pipeline folder into a grid (and optionally single PNGs).

Image i is drawn from its own CPU generator seeded ``seed + i``: its starting noise does not depend on
``--batch_size`` or the device, and it can be regenerated alone with
``pipe(generator=torch.Generator().manual_seed(seed + i))`` (identical up to float rounding across batch sizes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from crispdiff.export import load_pipeline
from crispdiff.images import make_grid, save_image_atomic, to_pil_list
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``sample`` subcommand."""
    parser = subparsers.add_parser(
        "sample",
        help="Generate a grid of images from a saved pipeline folder.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", metavar="DIR", help="A pipeline folder saved by crispdiff.")
    parser.add_argument("--num_images", type=int, default=64, help="How many images to generate.")
    parser.add_argument("--steps", type=int, default=25, help="Sampler steps.")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="Sampler (default: the pipeline's own).")
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass.")
    parser.add_argument("--out", default="grid.png", help="Where the grid image is written (atomically).")
    parser.add_argument("--nrow", type=int, default=None, help="Images per grid row (default: a square grid).")
    parser.add_argument("--out_dir", default=None, help="Also write each image as DIR/00000.png, 00001.png, ...")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--upscale", dest="upscale", action="store_true", default=None, help="Upscale with the SR model."
    )
    group.add_argument("--no_upscale", dest="upscale", action="store_false", help="Do not upscale.")
    parser.add_argument("--sr_strength", type=float, default=None, help="SR/Lanczos blend (default: the pipeline's).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda when available).")
    parser.set_defaults(func=run)
    return parser


def _default_device() -> str:
    """The fastest device that is certainly present."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_args(args: argparse.Namespace) -> str | None:
    """A message for the first invalid flag, or None."""
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.nrow is not None and args.nrow < 1:
        return f"--nrow must be >= 1, got {args.nrow}"
    if args.sr_strength is not None and not 0.0 <= args.sr_strength <= 1.0:
        return f"--sr_strength must be in [0, 1], got {args.sr_strength}"
    return None


def run(args: argparse.Namespace) -> int:
    """Sample ``--num_images`` images in batches, write the grid (and single images), print where they went."""
    problem = _check_args(args)
    if problem:
        print(f"crispdiff sample: error: {problem}", file=sys.stderr)
        return 2
    try:
        pipeline = load_pipeline(args.pipeline_dir, sampler=args.sampler, device=args.device or _default_device())
    except (FileNotFoundError, ValueError) as err:
        print(f"crispdiff sample: error: {err}", file=sys.stderr)
        return 2
    if args.upscale and pipeline.sr_model is None:
        print(f"crispdiff sample: error: --upscale given but {args.pipeline_dir} has no sr_model", file=sys.stderr)
        return 2
    pipeline.set_progress_bar_config(disable=True)

    images = []
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        generators = [torch.Generator("cpu").manual_seed(args.seed + start + i) for i in range(count)]
        batch = pipeline(
            batch_size=count,
            num_inference_steps=args.steps,
            generator=generators,
            upscale=args.upscale,
            sr_strength=args.sr_strength,
            output_type="pt",
        ).images
        images.extend(to_pil_list(batch.cpu(), value_range=(0.0, 1.0)))
        print(f"crispdiff sample: {start + count}/{args.num_images} images", file=sys.stderr)

    grid_path = save_image_atomic(make_grid(images, nrow=args.nrow), args.out)
    print(f"Wrote a grid of {len(images)} images to {grid_path}")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        for index, image in enumerate(images):
            save_image_atomic(image, out_dir / f"{index:05d}.png")
        print(f"Wrote {len(images)} images to {out_dir}")
    return 0
