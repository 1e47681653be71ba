"""`crispdiff export-sd --base SD_OR_SDXL --lora DIR [--sr_model FILE] [--output_size 64] --output_dir DIR`.

Writes a pipeline folder: the Stable Diffusion 1.x/2.x or SDXL base with the LoRA fused into its weights, DPM-Solver++
as the sampler, an optional SR component, and an output size the images are downsampled to with an antialiased
Lanczos filter (or upscaled to, with the SR component).
The folder loads with DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) where crispdiff is not installed.
"""

from __future__ import annotations

import argparse

from crispdiff.core.errors import FlagError, UserError, one_line, run_entry_point
from crispdiff.pipelines.sr_model import SRModelError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export-sd`` subcommand."""
    parser = subparsers.add_parser(
        "export-sd",
        help="Fuse a LoRA into Stable Diffusion or SDXL and save a pipeline folder (DPM-Solver++, optional SR, "
        "output size).",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--base", required=True, help="The Stable Diffusion 1.x/2.x or SDXL base (folder or Hub id)."
    )
    parser.add_argument(
        "--lora",
        default=None,
        help="A LoRA output folder or checkpoint-N (pytorch_lora_weights.safetensors), or a LoRA .safetensors file "
        "(diffusers' or kohya's keys; a kohya text-encoder part is fused too).",
    )
    parser.add_argument(
        "--output_dir",
        "--out",
        dest="out",
        required=True,
        help="Where to write the pipeline folder (replaced atomically); --out is the older name.",
    )
    parser.add_argument("--sr_model", default=None, help="SR weights (.pth/.safetensors, folder or hf:// file).")
    parser.add_argument("--sr_strength", type=float, default=0.5, help="Default SR blend with Lanczos, 0..1.")
    parser.add_argument("--output_size", type=int, default=None, help="Side the images are resized to (pixels).")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="Strength the LoRA is fused with.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub base.")
    parser.add_argument("--variant", default=None, help="Weights variant of the base (e.g. fp16).")
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE (folder or Hub id) saved in the pipeline instead of the base's: the one an SDXL LoRA was trained "
        "with (e.g. madebyollin/sdxl-vae-fp16-fix).",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export; a user error (bad flag, missing file, unsupported base) is one line on stderr and status 2."""
    return run_entry_point("crispdiff export-sd", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from crispdiff.sd.export import export_sd

    if args.output_size is not None and args.output_size < 1:
        raise FlagError(f"--output_size must be positive, got {args.output_size}")
    if not 0.0 <= args.sr_strength <= 1.0:
        raise FlagError(f"--sr_strength must be in [0, 1], got {args.sr_strength}")
    try:
        folder = export_sd(
            args.base,
            args.lora,
            args.out,
            sr_model=args.sr_model,
            sr_strength=args.sr_strength,
            output_size=args.output_size,
            lora_scale=args.lora_scale,
            revision=args.revision,
            variant=args.variant,
            vae=args.pretrained_vae_model_name_or_path,
        )
    except SRModelError as err:
        raise UserError(f"--sr_model: {one_line(err)} ({args.out} was not changed)") from err
    print(f"saved {folder} (load with DiffusionPipeline.from_pretrained(..., trust_remote_code=True))")
    return 0
