"""Classifier-free guidance on the main job: per-class SWD and sharpness at guidance 1, 2 and 4.

    python benchmarks/bench_guidance.py --threads 1                      # the main job with --class_column category
    python benchmarks/bench_guidance.py --pipeline DIR --num_images 128  # measure an already trained model

One run of the main job (``train_scripts/train_latent.py``'s defaults: embedded emoji, embedded VAE, the same UNet,
batch, LR and seed) with ``--class_column category`` and the default ``--class_dropout_prob 0.1``; ``--train_steps``
shortens it. The trained pipeline then samples ``--num_images`` images of each of the ``--classes`` largest
categories at each guidance scale (DPM-Solver++ 25, image i from seed + i as ``crispdiff sample`` does, so the same
noise at every scale), plus the same count from the null class (no label: the unconditional model inside the
conditional one). Each set is measured against that class's real images:

- SWD x1e3 (multi-scale, lower is better) against the class's own images, beside the class's real-vs-real floor
  (up to ``--num_images`` of its images against the other half; noisy for classes of ~60 images, so read ratios
  between rows, not absolute values);
- "own / others": SWD to the class's images over the mean SWD to the other measured classes' images, < 1 when the
  samples look more like their class than like the others (the null-class row shows where no conditioning stands);
- sharpness ratios (generated / real high-frequency energy share and Laplacian variance; 1 = as sharp as the data).

Writes OUT_DIR/guidance.json, guidance.md and a grid per scale (one row per class); appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import BENCH_DIR, append_results, machine, markdown_table

from crispdiff.core.images import make_grid, save_image_atomic
from crispdiff.core.io import write_text_atomic
from crispdiff.data.loading import load_images
from crispdiff.evaluate.distribution import sliced_wasserstein_distance
from crispdiff.evaluate.sampling import generate_samples
from crispdiff.evaluate.sharpness import sharpness_ratios
from crispdiff.latent.trainer import LatentTrainConfig, train_latent
from crispdiff.publish.export import load_pipeline

CLASS_COLUMN = "category"
NULL = "(null class)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_steps", type=int, default=None, help="optimizer steps (default: the main job's)")
    p.add_argument("--pipeline", default=None, help="measure this trained class-conditional pipeline instead")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="guidance scales")
    p.add_argument("--classes", type=int, default=4, help="measure the N largest classes")
    p.add_argument("--num_images", type=int, default=64, help="samples per class and scale")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (DPM-Solver++)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "guidance"))
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main_job_config(args: argparse.Namespace, out_dir: Path) -> LatentTrainConfig:
    """The main job's defaults with the class column; only the step count (and the output folder) may differ."""
    base = LatentTrainConfig()
    return replace(
        base,
        class_column=CLASS_COLUMN,
        max_train_steps=args.train_steps or base.max_train_steps,
        output_dir=str(out_dir / "run"),
        overwrite_output_dir=True,
        checkpointing_steps=0,
        report_to="none",
        seed=args.seed,
        cpu_threads=args.threads,
    )


def class_swd(real: torch.Tensor, fake: torch.Tensor, seed: int) -> float:
    return sliced_wasserstein_distance(real, fake, seed=seed)["swd_avg"]


def real_floor(real: torch.Tensor, count: int, seed: int) -> float:
    """SWD of up to ``count`` real images of a class against the other half of its images.

    The same shape of comparison as the samples' (``count`` images against many): SWD of a small set reads higher
    than of a large one, so a half-vs-half floor of a big class would flatter it.
    """
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = len(real) // 2
    return class_swd(real[order[half:]], real[order[: min(count, half)]], seed)


def measure(
    samples: dict[tuple[str, float], torch.Tensor], reals: dict[str, torch.Tensor], seed: int
) -> list[dict[str, Any]]:
    rows = []
    for (name, scale), fake in samples.items():
        targets = list(reals) if name == NULL else [name]
        for target in targets:
            own = class_swd(reals[target], fake, seed)
            others = [class_swd(reals[o], fake, seed) for o in reals if o != target]
            ratios = sharpness_ratios(reals[target], fake)
            rows.append(
                {
                    "class": target,
                    "sampled": name,
                    "guidance": scale,
                    "num_real": len(reals[target]),
                    "swd": own,
                    "swd_own_over_others": own / (sum(others) / len(others)),
                    "hf_energy_ratio": ratios["hf_energy_ratio"],
                    "laplacian_var_ratio": ratios["laplacian_var_ratio"],
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = main_job_config(args, out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    folder = Path(args.pipeline) if args.pipeline else train_latent(config)
    timings["train_min"] = (time.perf_counter() - start) / 60

    data = load_images(config, for_latents=True, show_progress=False)
    counts = Counter(data.class_ids.tolist())
    largest = [data.class_names[k] for k, _ in counts.most_common(args.classes)]
    crops = data.center_crops()
    reals = {name: crops[torch.from_numpy(data.class_ids == data.class_names.index(name))] for name in largest}

    pipeline = load_pipeline(folder, device="cpu")
    start = time.perf_counter()
    samples: dict[tuple[str, float], torch.Tensor] = {}
    for scale in args.scales:
        for name in largest:
            samples[(name, scale)] = generate_samples(
                pipeline, args.num_images, steps=args.steps, seed=args.seed, batch_size=64,
                class_labels=name, guidance_scale=scale,
            )  # fmt: skip
        grid = torch.cat([samples[(name, scale)][:8] for name in largest])
        save_image_atomic(make_grid(grid, nrow=8, value_range=(0, 1)), out_dir / f"grid_guidance_{scale:g}.png")
    samples[(NULL, 1.0)] = generate_samples(
        pipeline, args.num_images, steps=args.steps, seed=args.seed, batch_size=64
    )  # the conditional model without labels: its null class
    timings["sample_min"] = (time.perf_counter() - start) / 60

    start = time.perf_counter()
    rows = measure(samples, reals, args.seed)
    floors = {name: real_floor(real, args.num_images, args.seed) for name, real in reals.items()}
    timings["metrics_min"] = (time.perf_counter() - start) / 60
    for row in rows:
        row["swd_floor"] = floors[row["class"]]

    def order(row: dict[str, Any]) -> tuple:
        return (largest.index(row["class"]), row["sampled"] != NULL, row["guidance"])

    rows.sort(key=order)
    header = ["class (real images)", "sampled", "guidance", "SWD x1e3", "SWD / floor", "own / others", "hf ratio"]
    header.append("Laplacian ratio")
    table = markdown_table(
        header,
        [
            [
                f"{r['class']} ({r['num_real']})",
                "no label" if r["sampled"] == NULL else "class",
                "-" if r["sampled"] == NULL else r["guidance"],
                r["swd"],
                r["swd"] / r["swd_floor"],
                r["swd_own_over_others"],
                r["hf_energy_ratio"],
                r["laplacian_var_ratio"],
            ]
            for r in rows
        ],
    )
    steps = config.max_train_steps
    notes = (
        f"The main job (train_latent.py defaults, {steps} steps, --class_column {CLASS_COLUMN}, class dropout "
        f"{config.class_dropout_prob}) on {len(data)} embedded emoji in {len(data.class_names)} classes; "
        f"{args.num_images} samples per class and scale, DPM-Solver++ {args.steps}, the same seeds at every scale; "
        "'no label' = the same model sampled without a class (its null class), measured against each class. "
        f"SWD / floor: over the class's real-vs-real floor (up to {args.num_images} of its images against the other "
        "half). own / others: SWD to the "
        f"class over the mean SWD to the other {len(largest) - 1} classes (< 1 = looks like its class). "
        f"Wall time on {machine()}: training {timings['train_min']:.1f} min, sampling {timings['sample_min']:.1f} "
        f"min, metrics {timings['metrics_min']:.1f} min. Grids: {out_dir}/grid_guidance_*.png (a row per class)."
    )
    result = {
        "rows": rows,
        "floors": floors,
        "classes": largest,
        "train_steps": steps,
        "timings_min": timings,
        "machine": machine(),
        "pipeline": str(folder),
    }
    write_text_atomic(out_dir / "guidance.json", json.dumps(result, indent=2))
    write_text_atomic(out_dir / "guidance.md", table + "\n\n" + notes + "\n")
    append_results("Classifier-free guidance per class (bench_guidance.py)", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
