"""`crispdiff sample DIR`: generate images from a saved pipeline folder into a grid (and optionally single PNGs).

Image i is drawn from its own CPU generator seeded ``seed + i``: its starting noise does not depend on
``--batch_size`` or the device, and it can be regenerated alone with
``pipe(generator=torch.Generator().manual_seed(seed + i))`` (identical up to float rounding across batch sizes).

A class-conditional pipeline (trained with ``--class_column``) samples one class with ``--class NAME`` (or an id),
optionally with classifier-free guidance ``--guidance_scale 3``; without ``--class`` it samples its stored class mix
(a model trained on ``--class_column auto`` clusters, with guidance) or unconditionally.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from crispdiff.core.errors import FlagError, run_entry_point
from crispdiff.core.images import make_grid, save_image_atomic, to_pil_list
from crispdiff.evaluate.sampling import generate_samples
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS
from crispdiff.publish.export import DTYPES, class_label_flag, load_pipeline


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
    parser.add_argument("--output_dir", default=".", help="Where grid.png (and with --save_images, each image) goes.")
    parser.add_argument(
        "--save_images", action="store_true", help="Also write each image as OUTPUT_DIR/images/00000.png, ..."
    )
    parser.add_argument("--nrow", type=int, default=None, help="Images per grid row (default: a square grid).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--upscale", dest="upscale", action="store_true", default=None, help="Upscale with the SR model."
    )
    group.add_argument("--no_upscale", dest="upscale", action="store_false", help="Do not upscale.")
    parser.add_argument("--sr_strength", type=float, default=None, help="SR/Lanczos blend (default: the pipeline's).")
    parser.add_argument(
        "--class",
        dest="class_label",
        default=None,
        metavar="NAME",
        help="A class-conditional model's class (a name, or an id); without it such a model samples its stored class "
        "mix (auto classes) or unconditionally.",
    )
    add_guidance_flags(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda when available).")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="Precision the networks run in (bf16/fp16 on GPUs)."
    )
    # Old names, kept working but not advertised: --out FILE (the grid's path), --out_dir DIR (single images there).
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)
    return parser


def _default_device() -> str:
    """The fastest device that is certainly present."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_args(args: argparse.Namespace) -> None:
    """Raise a FlagError naming the first invalid flag."""
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.nrow is not None and args.nrow < 1:
        raise FlagError(f"--nrow must be >= 1, got {args.nrow}")
    if args.sr_strength is not None and not 0.0 <= args.sr_strength <= 1.0:
        raise FlagError(f"--sr_strength must be in [0, 1], got {args.sr_strength}")
    check_guidance_flags(args)


def add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    """``--guidance_scale`` and ``--guidance_interval`` (``sample`` and ``evaluate``)."""
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance of a class-conditional model: 1 = the conditional model alone; 2-4 = more "
        "typical of the class (default: the scale the pipeline was saved with).",
    )
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN_SIGMA", "MAX_SIGMA"),
        help="Guide only at noise levels sigma in (MIN_SIGMA, MAX_SIGMA] (default: the pipeline's own; 0 inf = every "
        "step).",
    )
    parser.add_argument(
        "--autoguidance_scale",
        type=float,
        default=None,
        help="Autoguidance with the pipeline's guide_unet (a weaker version of the model): 1 = off (default: the "
        "scale the pipeline was saved with).",
    )


def check_guidance_flags(args: argparse.Namespace) -> None:
    """--guidance_scale must be >= 0 and --guidance_interval an interval."""
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise FlagError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] < args.guidance_interval[1]:
        raise FlagError(f"--guidance_interval needs 0 <= MIN_SIGMA < MAX_SIGMA, got {args.guidance_interval}")
    if args.autoguidance_scale is not None and args.autoguidance_scale < 1:
        raise FlagError(f"--autoguidance_scale must be >= 1 (1 = off), got {args.autoguidance_scale}")


def check_autoguidance_target(args: argparse.Namespace, pipeline: object, where: object) -> None:
    """Autoguidance above 1 needs the pipeline's guide model."""
    scale = args.autoguidance_scale
    if scale is not None and scale != 1.0 and getattr(pipeline, "guide_unet", None) is None:
        raise FlagError(f"--autoguidance_scale {scale:g} needs a guide model; {where} has no guide_unet (train with "
                        "--autoguidance_scale to save one)")  # fmt: skip


def check_guidance_target(args: argparse.Namespace, pipeline: object, label: object) -> None:
    """Guidance pushes samples towards a class: it needs --class, or a pipeline that draws classes from its mix."""
    guided = args.guidance_scale is not None and args.guidance_scale != 1.0
    if guided and label is None and getattr(pipeline, "class_mix", None) is None:
        raise FlagError("--guidance_scale needs --class NAME (guidance pushes samples towards a class)")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(grid file, folder for single images or None), from --output_dir / --save_images or the old --out / --out_dir."""
    output_dir = Path(args.output_dir)
    grid = Path(args.out) if args.out else output_dir / "grid.png"
    if args.out_dir:
        return grid, Path(args.out_dir)
    return grid, (output_dir / "images" if args.save_images else None)


def run(args: argparse.Namespace) -> int:
    """Sample ``--num_images`` images in batches, write the grid (and single images), print where they went."""
    return run_entry_point("crispdiff sample", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    pipeline = load_pipeline(
        args.pipeline_dir, sampler=args.sampler, device=args.device or _default_device(), dtype=args.dtype
    )
    if args.upscale and pipeline.sr_model is None:
        raise FlagError(f"--upscale given but {args.pipeline_dir} has no sr_model")
    label = class_label_flag(pipeline, args.class_label, args.pipeline_dir)
    check_guidance_target(args, pipeline, label)
    check_autoguidance_target(args, pipeline, args.pipeline_dir)

    def log(message: str) -> None:
        print(f"crispdiff sample: {message}", file=sys.stderr)

    batch = generate_samples(
        pipeline,
        args.num_images,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        upscale=args.upscale,
        sr_strength=args.sr_strength,
        log=log,
        class_labels=label,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        autoguidance_scale=args.autoguidance_scale,
    )
    images = to_pil_list(batch, value_range=(0.0, 1.0))
    grid_file, images_dir = output_paths(args)
    grid_path = save_image_atomic(make_grid(images, nrow=args.nrow), grid_file)
    print(f"Wrote a grid of {len(images)} images to {grid_path}")
    if images_dir is not None:
        for index, image in enumerate(images):
            save_image_atomic(image, images_dir / f"{index:05d}.png")
        print(f"Wrote {len(images)} images to {images_dir}")
    return 0
