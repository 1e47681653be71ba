"""Recipe: diffusers' example defaults vs crispdiff's recipe, at an equal number of steps on equal data.

    python benchmarks/bench_recipe.py --train_steps 400
    python benchmarks/bench_recipe.py --train_steps 400 --diffusers_loop   # also the actual diffusers-style loop

Both recipes are trained by crispdiff's own loop with only the recipe flags changed, so the comparison isolates the
recipe (same UNet, data, decoding, batch, learning rate schedule, EMA, seed and number of optimizer steps):

* diffusers' example defaults: linear betas, epsilon prediction, unweighted MSE (no min-SNR);
* crispdiff's recipe: cosine (or --schedule sigmoid) betas, v-prediction, min-SNR-5 weighting.

Both are sampled the same way (DPM-Solver++ 25 unless --sampler / --steps say otherwise) from the same seeded noise and
measured with crispdiff.evaluate.metrics (multi-scale SWD, sharpness ratios, colour-blob indicator) against half of the
reference data, beside the real-vs-real floor. --diffusers_loop adds a model trained for the same steps by
benchmarks/diffusers_baseline.py (a loop mirroring diffusers' train_unconditional.py, with its own data pipeline,
optimizer settings and LR warmup), sampled with diffusers' DDPMPipeline / DDIMPipeline as that script would.

Writes into --out_dir (default benchmarks/out/recipe): recipe.md, recipe.json, grids.png (sample grids side by side,
real images first), grids/*.png; appends the table to benchmarks/RESULTS.md unless --no_record.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_samplers import (
    QUALITY_HEADER,
    Reference,
    add_common_flags,
    data_dir_for,
    device,
    display_path,
    generate,
    json_ready,
    load_reference,
    measure,
    parse_sweep,
    pipeline_sampler,
    prepare_reference,
    quality_cells,
    save_grid,
    train_config,
    train_model,
)
from common import append_results, machine, markdown_table
from plots import labelled_side_by_side, sampler_label

from crispdiff.core.io import write_text_atomic


def recipes(schedule: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(folder name, label, TrainConfig overrides) of the two recipes; nothing else differs between them."""
    return [
        (
            "diffusers-defaults",
            "diffusers example defaults",
            {"beta_schedule": "linear", "prediction_type": "epsilon", "snr_gamma": 0.0},
        ),
        (
            "crispdiff-recipe",
            "crispdiff recipe",
            {"beta_schedule": schedule, "prediction_type": "v_prediction", "snr_gamma": 5.0},
        ),
    ]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "sigmoid"], help="crispdiff recipe's schedule")
    p.add_argument("--sampler", default="dpmsolver++", help="sampler for both recipes")
    p.add_argument("--steps", type=int, default=25, help="sampler steps for both recipes")
    p.add_argument(
        "--diffusers_loop",
        action="store_true",
        help="also train benchmarks/diffusers_baseline.py's loop (needs `datasets`) for the same steps",
    )
    p.add_argument(
        "--diffusers_loop_samplers",
        default="ddpm:1000,ddim:50",
        help="how to sample the diffusers-loop model: ddpm:N (the example script's DDPMPipeline) and/or ddim:N",
    )
    add_common_flags(p, out_dir="recipe")
    return p.parse_args()


# --------------------------------------------------------------------------------------------------------------------
# The optional diffusers-style loop
# --------------------------------------------------------------------------------------------------------------------


def train_diffusers_loop(args: argparse.Namespace, data_dir: str) -> tuple[Any, Any, float]:
    """Train diffusers_baseline.DiffusersStyleLoop for --train_steps; returns (EMA UNet in fp32, its DDPMScheduler,
    seconds). The EMA weights are what diffusers' script saves into its pipeline."""
    from diffusers import UNet2DModel
    from diffusers_baseline import DiffusersStyleLoop

    from crispdiff.diffusion.unets import build_unet

    torch.manual_seed(args.seed)
    unet = build_unet(
        args.resolution,
        base_channels=args.base_channels,
        channel_mults=args.channel_mults,
        attention_res=args.attention_res,
        layers_per_block=args.layers_per_block,
        dropout=args.dropout,
    )
    start = time.perf_counter()
    loop = DiffusersStyleLoop(
        unet,
        data_dir,
        resolution=args.resolution,
        batch_size=args.train_batch_size,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )
    for _ in range(args.train_steps):
        loop.step()
    seconds = time.perf_counter() - start
    trained = loop.accelerator.unwrap_model(loop.model)
    sampling = UNet2DModel.from_config(trained.config)
    sampling.load_state_dict(trained.state_dict())
    if loop.ema is not None:
        loop.ema.copy_to(sampling.parameters())
    return sampling.to(device()).eval(), loop.noise_scheduler, seconds


def diffusers_sampler(unet: Any, noise_scheduler: Any, sampler: str, steps: int) -> Callable[[list[Any]], Any]:
    """A `generate` callable sampling like diffusers' example: DDPMPipeline (or DDIMPipeline, eta 0) built from the
    training scheduler's config, default (leading) timestep spacing; one CPU generator per image."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if sampler == "ddpm":
        pipe: Any = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config))
        extra: dict[str, Any] = {}
    elif sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
        extra = {"eta": 0.0}
    else:
        raise SystemExit(f"--diffusers_loop_samplers: diffusers' example samples with ddpm or ddim, not {sampler!r}")
    pipe.set_progress_bar_config(disable=True)

    def call(generators: list[torch.Generator]) -> torch.Tensor:
        images = pipe(
            batch_size=len(generators), generator=generators, num_inference_steps=steps, output_type="np", **extra
        )
        return torch.from_numpy(images.images).permute(0, 3, 1, 2)

    return call


# --------------------------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------------------------

HEADER = ["model", "schedule", "objective", "loss weight", "trained by", "sampled with", *QUALITY_HEADER, "train s"]


class Comparison:
    """Rows, grids and the output files of one run; files are rewritten after every row so a stopped run keeps its
    finished rows."""

    def __init__(self, args: argparse.Namespace, reference: Reference, data_dir: str, out_dir: Path):
        self.args, self.reference, self.data_dir, self.out_dir = args, reference, data_dir, out_dir
        self.rows: list[dict[str, Any]] = []
        self.panels = [
            ("real (reference half A)", save_grid(reference.real.float() / 255.0, out_dir / "grids" / "real.png"))
        ]

    def add(self, row: dict[str, Any], images: torch.Tensor, ms_per_image: float) -> None:
        metrics = measure(self.reference, images, self.args.seed)
        row = {**row, "ms_per_image": ms_per_image, **json_ready(metrics)}
        self.rows.append(row)
        slug = f"{row['key']}-{row['sampler']}-{row['steps']}"
        caption = f"{row['label']} / {sampler_label(row['sampler'], row['steps'])}"
        self.panels.append((caption, save_grid(images, self.out_dir / "grids" / f"{slug}.png")))
        print(
            f"{caption}: SWD {metrics['swd_avg']:.2f}  HF {metrics['hf_energy_ratio']:.3f}  "
            f"LapVar {metrics['laplacian_var_ratio']:.3f}  blob {metrics['colour_blob']:.3f}"
        )
        self.write()

    def table(self) -> str:
        body = [
            [
                r["label"],
                r["schedule"],
                r["objective"],
                r["loss_weight"],
                r["trained_by"],
                sampler_label(r["sampler"], r["steps"]),
                *quality_cells(r),
                r["train_seconds"],
            ]
            for r in self.rows
        ]
        body.append(["real vs real (floor)", "-", "-", "-", "-", "-", *quality_cells(self.reference.floor), "-"])
        return markdown_table(HEADER, body)

    def write(self) -> None:
        write_text_atomic(self.out_dir / "recipe.md", self.table() + "\n")
        result = {
            "machine": machine(),
            "data_dir": self.data_dir,
            "num_images": self.reference.num_images,
            "train_steps": self.args.train_steps,
            "train_batch_size": self.args.train_batch_size,
            "seed": self.args.seed,
            "floor": json_ready(self.reference.floor),
            "rows": self.rows,
        }
        write_text_atomic(self.out_dir / "recipe.json", json.dumps(result, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    loop_sweep = parse_sweep(args.diffusers_loop_samplers, "--diffusers_loop_samplers") if args.diffusers_loop else []
    parse_sweep(f"{args.sampler}:{args.steps}", "--sampler/--steps")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_device = device()
    data_dir = data_dir_for(args)
    reference = prepare_reference(load_reference(data_dir, args.resolution), args.num_images, args.seed)
    print(f"reference: {data_dir} at {args.resolution} px; {reference.num_images} samples per row")
    comparison = Comparison(args, reference, data_dir, out_dir)

    from crispdiff.publish.export import load_pipeline

    for key, label, recipe in recipes(args.schedule):
        print(f"training '{label}' ({recipe}) for {args.train_steps} steps ...")
        trained = train_model(train_config(args, data_dir, out_dir / key, **recipe))
        pipeline = load_pipeline(trained.pipeline_dir, device=run_device)
        pipeline.set_progress_bar_config(disable=True)
        call = pipeline_sampler(pipeline, args.sampler, args.steps)
        images, ms = generate(call, reference.num_images, args.sample_batch_size, args.seed)
        row = {
            "key": key,
            "label": label,
            "schedule": recipe["beta_schedule"],
            "objective": recipe["prediction_type"],
            "loss_weight": f"min-SNR {recipe['snr_gamma']:g}" if recipe["snr_gamma"] else "none",
            "trained_by": "crispdiff loop",
            "sampler": args.sampler,
            "steps": args.steps,
            "train_seconds": trained.seconds,
        }
        comparison.add(row, images, ms)

    if args.diffusers_loop:
        try:
            unet, noise_scheduler, seconds = train_diffusers_loop(args, data_dir)
        except ImportError as err:
            print(f"--diffusers_loop skipped: {err} (the diffusers-style loop reads images through `datasets`)")
        else:
            for sampler, steps in loop_sweep:
                call = diffusers_sampler(unet, noise_scheduler, sampler, steps)
                images, ms = generate(call, reference.num_images, args.sample_batch_size, args.seed)
                row = {
                    "key": "diffusers-loop",
                    "label": "diffusers-style loop",
                    "schedule": "linear",
                    "objective": "epsilon",
                    "loss_weight": "none",
                    "trained_by": "diffusers_baseline.py",
                    "sampler": sampler,
                    "steps": steps,
                    "train_seconds": seconds,
                }
                comparison.add(row, images, ms)

    labelled_side_by_side(comparison.panels, out_dir / "grids.png")
    notes = (
        f"{args.train_steps} optimizer steps of {args.train_batch_size} images at {args.resolution} px on {data_dir}, "
        f"UNet base {args.base_channels} x {args.channel_mults}, attention at {args.attention_res}, EMA (power 3/4, "
        f"max decay 0.9999) in every model, seed {args.seed}. crispdiff-loop rows differ only in schedule, objective "
        f"and loss weight; {reference.num_images} samples each from the same seeded noise vs {reference.num_images} "
        "real images; the floor compares two disjoint real halves of that size. SWD x1e3 (lower is better); "
        "sharpness ratios generated / real (1 = as sharp as the data); colour-blob 0 = like the data."
    )
    if args.diffusers_loop:
        notes += (
            " The diffusers-style loop differs in more than the recipe, as diffusers' example does: images through "
            "`datasets` + torchvision with `convert('RGB')` (transparent emoji pixels become their stored colour, "
            "mostly black, instead of white), LR 1e-4 with 500 warmup steps, AdamW betas (0.95, 0.999)."
        )
    notes += f" Sample grids side by side: {display_path(out_dir)}/grids.png."
    table = comparison.table()
    append_results("Recipe: diffusers example defaults vs crispdiff recipe", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
