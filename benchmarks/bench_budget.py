"""What more compute buys: the main job's recipe vs diffusers' defaults after 2.5, 5, 10 and 20 CPU-minutes.

    python benchmarks/bench_budget.py                          # both recipes, budgets 2.5 5 10 20, 1000 samples each
    python benchmarks/bench_budget.py --budgets 1 2 --num_images 256 --recipes main   # a quick look

Each recipe is one run of the main job (``train_scripts/train_latent.py``'s defaults: embedded emoji, embedded VAE,
the same UNet, batch and seed) whose pipeline is saved whenever the run's CPU time crosses a budget. The LR schedule is
constant after warmup so that every point is a fair budget (a cosine schedule would be half-decayed at the middle
points of a run sized for the last one); the main job itself decays its LR over its own steps, which this table
does not show. The only difference between the recipes:

* ``main``: the main job's noise recipe (its schedule and its log-SNR shift, prediction type and min-SNR gamma);
* ``diffusers``: diffusers' example defaults — linear betas (unshifted), epsilon prediction, no min-SNR weighting.

Both are, like the main job, class-conditional on its default column (``EMBEDDED_CLASS_COLUMN``; sampled in the
reference's class mix with the pipeline's guidance scale, as ``crispdiff evaluate`` does) and saved with the embedded
VAE's unsharp mask.

Budgets are CPU time of the training process (``time.process_time``: every thread's user + system time), which, unlike
wall-clock time, does not depend on what else the machine runs; on 2 busy cores one wall minute is about two
CPU-minutes. Exports and sampling happen outside the measured time. Every saved pipeline is sampled (DPM-Solver++ 25
from seeded noise, as ``crispdiff evaluate`` does) and measured against the embedded emoji beside the real-vs-real
floor. Writes OUT_DIR/budget.json, budget.md, budget.png and a grid per point; appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import BENCH_DIR, append_results, machine, markdown_table

from crispdiff.core.images import make_grid, save_image_atomic
from crispdiff.core.io import write_text_atomic
from crispdiff.evaluate.evaluation import evaluate_samples, load_reference_data
from crispdiff.evaluate.sampling import generate_samples, reference_class_mix, reference_classes
from crispdiff.latent.space import build_latent_space
from crispdiff.latent.trainer import LatentTrainConfig
from crispdiff.latent.vae import load_vae
from crispdiff.publish.export import load_pipeline, save_pipeline
from crispdiff.train.loop import run_trainer
from crispdiff.train.process import start_run
from crispdiff.train.unet_trainer import UNetTrainer

#: TrainConfig overrides of each recipe; everything else is the main job's default.
RECIPES: dict[str, dict[str, Any]] = {
    "main": {},
    "diffusers": {"beta_schedule": "linear", "prediction_type": "epsilon", "snr_gamma": 0.0, "snr_shift": 0.0},
}


class BudgetTrainer(UNetTrainer):
    """The main job's trainer, saving a pipeline each time the process's CPU time crosses the next budget."""

    def __init__(self, *args: Any, budgets_s: list[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.budgets_s = sorted(budgets_s)
        self.saved: list[dict[str, Any]] = []
        self.cpu_spent = 0.0
        self.wall_spent = 0.0
        self.cpu_mark, self.wall_mark = time.process_time(), time.perf_counter()

    def periodic(self) -> None:
        self.cpu_spent += time.process_time() - self.cpu_mark
        self.wall_spent += time.perf_counter() - self.wall_mark
        if self.budgets_s and self.cpu_spent >= self.budgets_s[0]:
            budget = self.budgets_s.pop(0)
            folder = self.output_dir / f"budget_{budget / 60:g}min"
            kwargs = self.pipeline_kwargs()
            grid, _ = self.sample_grid(f"sample grid at {budget / 60:g} CPU-min", kwargs)
            save_pipeline(folder, training_config=self.config.to_dict(), sample_grid=grid, **kwargs)
            self.saved.append(
                {"budget_cpu_min": budget / 60, "steps": self.step, "wall_min": self.wall_spent / 60, "folder": folder}
            )
            print(f"budget {budget / 60:g} CPU-min reached at step {self.step} ({self.wall_spent / 60:.1f} wall-min)")
            if not self.budgets_s:
                self.max_steps = self.step  # ends the loop
        self.cpu_mark, self.wall_mark = time.process_time(), time.perf_counter()

    def finish(self) -> Path:
        return self.saved[-1]["folder"]


def main_job_config() -> LatentTrainConfig:
    """The main job's defaults, resolved: that fills in its data-dependent ones (class column, unsharp amount)."""
    return LatentTrainConfig().resolve()


def recipe_config(name: str, out_dir: Path, args: argparse.Namespace) -> LatentTrainConfig:
    """The main job's config with this recipe's noise settings, a constant LR and a step cap it never reaches."""
    return replace(
        main_job_config(),
        **RECIPES[name],
        output_dir=str(out_dir / name),
        overwrite_output_dir=True,
        lr_scheduler="constant_with_warmup",
        max_train_steps=1_000_000,
        checkpointing_steps=0,
        validation_steps=0,
        report_to="none",
        seed=args.seed,
        cpu_threads=args.threads,
    )


def train_recipe(name: str, out_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = recipe_config(name, out_dir, args)
    accelerator = start_run(config)
    vae = load_vae(config.pretrained_vae_name_or_path)
    space = build_latent_space(config, vae)
    trainer = BudgetTrainer(config, space, accelerator, budgets_s=[b * 60 for b in args.budgets])
    run_trainer(trainer)
    return trainer.saved


def measure_point(
    point: dict[str, Any], reference: torch.Tensor, classes: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    pipeline = load_pipeline(point["folder"])
    labels = reference_class_mix(classes, args.num_images, args.seed) if pipeline.classes else None
    samples = generate_samples(
        pipeline, args.num_images, steps=args.steps, seed=args.seed, batch_size=100, class_labels=labels
    )
    save_image_atomic(make_grid(samples[:64], value_range=(0, 1)), Path(point["folder"]) / "grid64.png")
    result = evaluate_samples(samples, reference, seed=args.seed, memorisation=False, fid=False)
    generated, floor = result["generated"], result["real_vs_real_floor"]
    return {
        **{k: v for k, v in point.items() if k != "folder"},
        "folder": str(point["folder"]),
        "swd": generated["swd_avg"],
        "swd_floor": floor["swd_avg"],
        "hf_energy_ratio": generated["hf_energy_ratio"],
        "laplacian_var_ratio": generated["laplacian_var_ratio"],
        "colour_blob": generated["colour_blob"],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'crispdiff[bench]'); the table has the numbers")
        return
    fig, (ax_swd, ax_sharp) = plt.subplots(1, 2, figsize=(11, 4))
    for index, recipe in enumerate(dict.fromkeys(r["recipe"] for r in rows)):
        mine = [r for r in rows if r["recipe"] == recipe]
        x = [r["budget_cpu_min"] for r in mine]
        color = f"C{index}"  # one colour per recipe in both panels
        ax_swd.plot(x, [r["swd"] for r in mine], marker="o", color=color, label=recipe)
        ax_sharp.plot(x, [r["hf_energy_ratio"] for r in mine], marker="o", color=color, label=f"{recipe}: hf energy")
        laplacian = [r["laplacian_var_ratio"] for r in mine]
        ax_sharp.plot(x, laplacian, marker="x", ls="--", color=color, label=f"{recipe}: Laplacian")
    ax_swd.axhline(rows[0]["swd_floor"], color="grey", ls=":", label="real vs real")
    ax_swd.axhline(2.5 * rows[0]["swd_floor"], color="grey", ls="--", label="2.5x floor (target)")
    ax_sharp.axhspan(0.85, 1.15, color="green", alpha=0.1, label="target band")
    for ax, title in ((ax_swd, "multi-scale SWD x1e3 (lower is better)"), (ax_sharp, "sharpness ratio (1 = data)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training CPU-minutes")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 5, 10, 20], help="CPU-minutes")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--num_images", type=int, default=1000, help="samples per point (DPM-Solver++)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "budget"))
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out_dir)
    points = {name: train_recipe(name, out_dir, args) for name in args.recipes}
    main_job = main_job_config()
    reference_data = load_reference_data(None, main_job.resolution, class_column=main_job.class_column)
    reference = reference_data.center_crops()
    classes = reference_classes(reference_data, main_job.class_column)
    rows = [
        {"recipe": name, **measure_point(point, reference, classes, args)}
        for name, saved in points.items()
        for point in saved
    ]
    header = ["recipe", "CPU-min", "wall-min", "steps", "SWD x1e3", "SWD / floor", "hf ratio", "Laplacian ratio"]
    table = markdown_table(
        header,
        [
            [
                r["recipe"],
                r["budget_cpu_min"],
                round(r["wall_min"], 1),
                r["steps"],
                r["swd"],
                r["swd"] / r["swd_floor"],
                r["hf_energy_ratio"],
                r["laplacian_var_ratio"],
            ]
            for r in rows
        ],
    )
    shown = out_dir.resolve()
    shown = shown.relative_to(BENCH_DIR.parent) if shown.is_relative_to(BENCH_DIR.parent) else shown  # repo-relative
    notes = (
        f"Real-vs-real floor: SWD {rows[0]['swd_floor']:.3g}. {args.num_images} samples per point, DPM-Solver++ "
        f"{args.steps}, against the {len(reference)} embedded emoji. Recipes: main = the main job's defaults; "
        "diffusers = the same with linear betas, epsilon prediction and no min-SNR. Constant LR after warmup; "
        f"budgets in training-process CPU time on {machine()}. Plot: {shown / 'budget.png'}; grids: "
        f"{shown}/<recipe>/budget_*/grid64.png."
    )
    write_text_atomic(out_dir / "budget.json", json.dumps(rows, indent=2))
    write_text_atomic(out_dir / "budget.md", table + "\n\n" + notes + "\n")
    plot(rows, out_dir / "budget.png")
    append_results("What more compute buys (bench_budget.py)", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
