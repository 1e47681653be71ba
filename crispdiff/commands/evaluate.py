"""`crispdiff evaluate DIR --reference DATA`: measure a pipeline's samples (or a file of images) against real images.

Writes OUTPUT_DIR/metrics.json, OUTPUT_DIR/samples.png and OUTPUT_DIR/report.md. Every metric is shown beside its
real-vs-real floor (the same metric between two disjoint halves of the reference), which is what "perfect" reads as
for this number of images. SWD, the sharpness ratios, the colour-blob indicator and the memorisation check need no
downloaded network; FID/KID are added when Inception weights exist locally (--inception_weights or torch's cache).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from crispdiff.commands.sample import add_guidance_flags, check_guidance_flags
from crispdiff.core.errors import ArgumentParser, FlagError, run_entry_point
from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS
from crispdiff.publish.export import DTYPES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Measure sharpness and quality of a pipeline's samples against reference images.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", metavar="DIR", nargs="?", default=None, help="A saved pipeline folder.")
    parser.add_argument(
        "--samples_npz", default=None, help="Evaluate the images of this .npz file ('images' / 'arr_0') instead of DIR."
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="Real images: a folder, a datasets save_to_disk folder, a Hub dataset id, or 'default' (embedded emoji).",
    )
    parser.add_argument("--num_images", type=int, default=1000, help="How many samples to generate.")
    parser.add_argument("--steps", type=int, default=25, help="Sampler steps.")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="Sampler (default: the pipeline's own).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--upscale", dest="upscale", action="store_true", default=None, help="Upscale with the SR model."
    )
    group.add_argument("--no_upscale", dest="upscale", action="store_false", help="Do not upscale.")
    parser.add_argument("--seed", type=int, default=0, help="Sample i uses seed + i; also seeds the metrics.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per sampling forward pass.")
    parser.add_argument("--output_dir", default="crispdiff-eval", help="Where metrics.json, samples.png, report.md go.")
    parser.add_argument("--out_dir", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Compare at this size (default: the training resolution in DIR, else the samples' size).",
    )
    parser.add_argument(
        "--max_reference_images",
        type=int,
        default=None,
        help="Use at most N reference images: a fixed random subset (seed 0, drawn as --max_train_samples draws it).",
    )
    parser.add_argument("--cache_dir", default=None, help="Cache folder for decoded reference images.")
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, for FID/KID (never downloaded).",
    )
    parser.add_argument("--no_fid", action="store_true", help="Skip FID/KID even when Inception weights exist.")
    parser.add_argument("--no_memorisation", action="store_true", help="Skip the nearest-training-image check.")
    parser.add_argument("--save_samples", action="store_true", help="Also write the samples to OUTPUT_DIR/samples.npz.")
    parser.add_argument(
        "--class",
        dest="class_label",
        default=None,
        metavar="NAME",
        help="A class-conditional model: sample only this class (a name or an id), measured against the reference's "
        "images of it. Default: the classes in the reference's own mix (of the model's --class_column).",
    )
    add_guidance_flags(parser)
    parser.add_argument(
        "--sharpen_sweep",
        action="store_true",
        help="Also measure both sharpness ratios under unsharp-mask amounts 0-1.5 in steps of 0.05 (one sampling "
        "pass) and report the amount nearest the data's sharpness; the right amount falls as a model trains longer. "
        "Upscaled samples (--upscale) are measured at their own size: pass --resolution with it.",
    )
    parser.add_argument(
        "--save_sharpen_amount",
        action="store_true",
        help="With --sharpen_sweep: write the best amount into DIR as the pipeline's default sharpen_amount (with "
        "--upscale and --resolution at the SR output size: its upscale_sharpen_amount, used after the SR step).",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda when available).")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="Precision the networks sample in (bf16/fp16 on GPUs)."
    )
    parser.set_defaults(func=run)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Raise a FlagError for the first invalid flag combination."""
    if (args.pipeline_dir is None) == (args.samples_npz is None):
        raise FlagError("give a pipeline folder DIR or --samples_npz FILE (exactly one)")
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 16:
        raise FlagError(f"--resolution must be >= 16 (the coarsest SWD level), got {args.resolution}")
    if args.max_reference_images is not None and args.max_reference_images < 4:
        raise FlagError(f"--max_reference_images must be >= 4, got {args.max_reference_images}")
    if args.samples_npz is not None and (
        args.class_label is not None
        or args.guidance_scale is not None
        or args.guidance_interval is not None
        or args.autoguidance_scale is not None
    ):
        raise FlagError(
            "--class, --guidance_scale, --guidance_interval and --autoguidance_scale choose how a pipeline samples; "
            "--samples_npz has none"
        )
    if args.samples_npz is not None and args.sharpen_sweep:
        raise FlagError("--sharpen_sweep re-runs a pipeline's post-processing; --samples_npz has no pipeline")
    if args.save_sharpen_amount and not args.sharpen_sweep:
        raise FlagError("--save_sharpen_amount writes what --sharpen_sweep finds; pass both")
    check_guidance_flags(args)


def _command_line(args: argparse.Namespace) -> str:
    """The command as it can be re-run, with the flags that differ from their defaults, for the report."""
    defaults = vars(add_parser(ArgumentParser().add_subparsers()).parse_args(["x"]))
    parts = ["crispdiff", "evaluate"] + ([args.pipeline_dir] if args.pipeline_dir else [])
    for key, value in vars(args).items():
        if key in ("pipeline_dir", "func", "command") or value == defaults.get(key, value):
            continue
        if key == "upscale":
            parts.append("--upscale" if value else "--no_upscale")
        else:
            parts += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, print the report's table and where the files went."""
    return run_entry_point("crispdiff evaluate", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from crispdiff.evaluate.evaluation import run_evaluation

    _check_args(args)

    def log(message: str) -> None:
        print(f"crispdiff evaluate: {message}", file=sys.stderr)

    result = run_evaluation(
        out_dir=args.output_dir,
        pipeline_dir=args.pipeline_dir,
        samples_npz=args.samples_npz,
        reference=args.reference,
        num_images=args.num_images,
        steps=args.steps,
        sampler=args.sampler,
        upscale=args.upscale,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        cache_dir=args.cache_dir,
        max_reference_images=args.max_reference_images,
        inception_weights=args.inception_weights,
        fid=not args.no_fid,
        memorisation=not args.no_memorisation,
        save_samples=args.save_samples,
        device=args.device,
        dtype=args.dtype,
        command=_command_line(args),
        log=log,
        class_label=args.class_label,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        autoguidance_scale=args.autoguidance_scale,
        sweep_sharpen=args.sharpen_sweep,
        save_best_sharpen=args.save_sharpen_amount,
    )
    paths = result["paths"]
    print(Path(paths["report"]).read_text(encoding="utf-8"))
    print(f"Wrote {paths['metrics']}, {paths['grid']} and {paths['report']}")
    return 0
