"""Your images, not ours: the main job on unlabelled data of a design family crispdiff was never tuned on.

    python benchmarks/bench_own_data.py                        # every row, seeds 0 and 1 (about 2 hours on 2 cores)
    python benchmarks/bench_own_data.py --rows openmoji --seeds 0 --recipes new     # one run

Each row is README's command exactly as a user runs it, timed wall-clock from launch to the saved pipeline
(``accelerate launch train_scripts/train_latent.py --train_data_dir DIR`` and nothing else, or the embedded main job
with no argument), then ``crispdiff evaluate`` with 1,000 samples (DPM-Solver++ 25) against 1,000 held-out images
the model never trained on, beside the real-vs-real floor of 1,000 vs 1,000 other held-out images
(``benchmarks/own_data.py`` writes the splits):

* ``openmoji``: 1,000 random OpenMoji emoji (another design family: flat colours, black outlines), no labels;
* ``noto``: the 1,000 embedded Noto emoji copied without their metadata (a user's unlabelled folder);
* ``embedded``: the labelled main job (90 subcategories), sampled in the held-out images' class mix.

Recipes: ``before`` is the recipe before auto classes, VAE adaptation and the guidance interval (``--class_column
none --adapt_vae off --guidance_interval 0 inf``; for ``embedded`` only the interval), ``new`` is today's defaults.
Each run's ``samples.png`` is copied to ``OUT_DIR``; ``--grids_dir`` copies the first seed's to be committed.
OpenMoji images are CC-BY-SA-4.0: credit "OpenMoji" wherever its grids are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO_ROOT, append_results, markdown_table
from own_data import make_split

ROWS = ("openmoji", "noto", "embedded")
RECIPES: dict[str, dict[str, list[str]]] = {
    "before": {
        # unconditional rows: no guidance to set (a guidance flag without a class column is refused)
        "openmoji": ["--class_column", "none", "--adapt_vae", "off"],
        "noto": ["--class_column", "none", "--adapt_vae", "off"],
        "embedded": ["--guidance_interval", "0", "inf"],
    },
    "new": {"openmoji": [], "noto": [], "embedded": []},
}


def run(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; returns wall seconds (raises with the log's tail on failure)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=os.environ.copy())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return seconds


#: ``accelerate launch`` of one CPU process, as README's command runs it.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def fresh_run_folder(out: Path, rerun: bool = False) -> dict[str, Any] | None:
    """The figures of a finished run in ``out`` (its ``result.json``), or None after emptying ``out`` for a new one."""
    if (out / "result.json").is_file() and not rerun:
        return json.loads((out / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return None


def latent_job(
    out: Path, train_flags: list[str], heldout: Path, num_images: int, seed: int | None = None, prefix: list[str] = ()
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Train with ``train_latent.py`` (``prefix``: e.g. ``taskset``), then ``crispdiff evaluate`` against ``heldout``.

    Returns the training wall seconds, evaluate's ``metrics.json`` and the pipeline's training config.
    """
    wall = run([*prefix, *LAUNCH, "train_scripts/train_latent.py", *train_flags, "--output_dir", str(out / "run")],
               out / "train.log")  # fmt: skip
    pipeline = out / "run" / "pipeline"
    evaluate = [sys.executable, "-m", "crispdiff.cli", "evaluate", str(pipeline), "--reference", str(heldout),
                "--num_images", str(num_images), "--no_fid", "--no_memorisation", "--output_dir", str(out / "eval"),
                *([] if seed is None else ["--seed", str(seed)])]  # fmt: skip
    run(evaluate, out / "evaluate.log")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return wall, metrics, json.loads((pipeline / "crispdiff_training.json").read_text())


def train_and_evaluate(row: str, recipe: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run's figures; a run whose ``result.json`` exists is read back (an interrupted benchmark goes on)."""
    split = make_split("noto" if row == "embedded" else row, Path(args.splits_dir))
    out = Path(args.out_dir) / f"{row}-{recipe}-seed{seed}"
    if (done := fresh_run_folder(out, args.rerun)) is not None:
        return done
    data = [] if row == "embedded" else ["--train_data_dir", str(split["train"])]
    flags = [*data, "--seed", str(seed), *RECIPES[recipe][row], *args.extra]
    wall, metrics, training = latent_job(out, flags, split["heldout"], args.num_images, seed)
    generated, floor = metrics["generated"], metrics["real_vs_real_floor"]
    vae = out / "run" / "vae-adapted" / "vae_summary.json"
    shutil.copyfile(out / "run" / "pipeline" / "samples.png", out / "samples.png")
    result = {
        "row": row,
        "recipe": recipe,
        "seed": seed,
        "wall_s": wall,
        "swd": generated["swd_avg"],
        "floor": floor["swd_avg"],
        "ratio": generated["swd_avg"] / floor["swd_avg"],
        "hf": generated["hf_energy_ratio"],
        "laplacian": generated["laplacian_var_ratio"],
        "blob": generated["colour_blob"],
        "classes": training.get("class_column"),
        "vae_adapted_psnr": json.loads(vae.read_text())["held_out"]["psnr"] if vae.is_file() else None,
        "grid": str(out / "samples.png"),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def summary_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per (row, recipe): ranges over the seeds."""

    def span(values: list[float], fmt: str) -> str:
        low, high = min(values), max(values)
        return format(low, fmt) if low == high else f"{format(low, fmt)}-{format(high, fmt)}"

    table = []
    for row in ROWS:
        for recipe in RECIPES:
            runs = [r for r in results if r["row"] == row and r["recipe"] == recipe]
            if not runs:
                continue
            table.append([
                row, recipe, len(runs), span([r["swd"] for r in runs], ".1f"), span([r["floor"] for r in runs], ".2f"),
                span([r["ratio"] for r in runs], ".2f") + "x", span([r["hf"] for r in runs], ".2f"),
                span([r["laplacian"] for r in runs], ".2f"), span([r["blob"] for r in runs], ".2f"),
                span([r["wall_s"] / 60 for r in runs], ".1f"),
            ])  # fmt: skip
    return table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num_images", type=int, default=1000, help="samples per run (the floor uses as many)")
    p.add_argument("--splits_dir", default=str(BENCH_DIR / "out" / "own-data-splits"))
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "own-data"))
    p.add_argument("--grids_dir", default=None, help="copy the first seed's samples.png of each run here")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_latent.py flags (last)")
    p.add_argument("--rerun", action="store_true", help="train again runs that already have a result.json")
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    results = []
    for seed in args.seeds:
        for row in args.rows:
            for recipe in args.recipes:
                result = train_and_evaluate(row, recipe, seed, args)
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.grids_dir and seed == args.seeds[0]:
                    Path(args.grids_dir).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(result["grid"], Path(args.grids_dir) / f"own-data-{row}-{recipe}.png")
    Path(args.out_dir, "own_data.json").write_text(json.dumps(results, indent=2))
    header = ["data", "recipe", "seeds", "SWD x1e3", "floor", "SWD / floor", "hf", "Laplacian", "blob", "wall min"]
    table = markdown_table(header, summary_rows(results))
    print(table)
    if not args.no_record:
        append_results("Your images: unlabelled data of another design family (bench_own_data.py)", table)


if __name__ == "__main__":
    main()
