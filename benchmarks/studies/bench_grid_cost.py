"""What the final sample grid costs after a short fine-tune, with the bounded default and with the old fixed size.

The case: a 2-step ``train_scripts/train_transfer.py`` run on google/ddpm-cifar10-32's layout (35.7M parameters) at
64 px on a 2-core CPU ended in an 11-minute sample grid. This builds that UNet from its config in
``../shared/reference/ddpm-cifar10-32`` (random weights: the cost does not depend on them), saves it as a
DDPMPipeline folder and runs the script on the embedded emoji, alternating per round:

- ``default``: the grid left to crispdiff (``crispdiff.train.grids``: at most a tenth of the training compute it
  follows, no smaller than 4 images x 10 steps);
- ``fixed``: ``--num_validation_images 16 --validation_inference_steps 25``, the old default size (a typed size is
  never shrunk).

Times come from the log lines as they arrive: training (the run's "N steps of" line to the grid line) and the grid (the
grid line to "Pipeline saved").

    python benchmarks/studies/bench_grid_cost.py [--rounds 2] [--max_train_steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import REPO_ROOT, append_results, markdown_table, shared_dir  # noqa: E402

SIZES = {"default": [], "fixed": ["--num_validation_images", "16", "--validation_inference_steps", "25"]}


def cifar10_layout_folder(folder: Path) -> Path:
    """A DDPMPipeline folder with ddpm-cifar10-32's UNet and scheduler configs and random weights."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    reference = shared_dir() / "reference" / "ddpm-cifar10-32"
    if not reference.is_dir():
        sys.exit(f"needs {reference} (../shared)")
    unet = UNet2DModel.from_config(UNet2DModel.load_config(reference / "unet"))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(reference / "scheduler"))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def run(pretrained: Path, out: Path, size: str, args: argparse.Namespace) -> dict[str, float | str]:
    """One train_transfer.py run; seconds of training and of the final grid, read off its log as lines arrive."""
    command = [
        sys.executable, "-u", str(REPO_ROOT / "train_scripts" / "train_transfer.py"),
        "--pretrained_model_name_or_path", str(pretrained), "--output_dir", str(out), "--resolution", "64",
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--checkpointing_steps", "0", "--report_to", "none",
        "--cpu_threads", str(args.threads), *SIZES[size],
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    marks: dict[str, float] = {}
    grid_line = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            now = time.perf_counter()
            if " steps of " in line and "train" not in marks:
                marks["train"] = now
            elif "crispdiff: final sample grid:" in line and "grid" not in marks:  # not the grid's progress bar
                marks["grid"], grid_line = now, line.strip()
            elif "Pipeline saved" in line:
                marks["saved"] = now
    if proc.returncode or len(marks) != 3:
        raise SystemExit(f"{size}: the run failed or its log changed (marks {sorted(marks)})")
    return {
        "train_s": marks["grid"] - marks["train"],
        "grid_s": marks["saved"] - marks["grid"],
        "grid": grid_line.split("crispdiff: final sample grid: ", 1)[1].split(" (--num", 1)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_train_steps", type=int, default=2)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_record", action="store_true", help="print the table without appending to RESULTS.md")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float | str]]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = cifar10_layout_folder(Path(tmp) / "ddpm-cifar10-layout")
        for round_index in range(args.rounds):
            for size in SIZES:
                row = run(pretrained, Path(tmp) / f"{size}-{round_index}", size, args)
                results[size].append(row)
                print(json.dumps({"round": round_index, "size": size, **row}), flush=True)

    rows = []
    for size, runs in results.items():
        grid_s = [float(r["grid_s"]) for r in runs]
        train_s = [float(r["train_s"]) for r in runs]
        rows.append(
            [
                size,
                runs[0]["grid"],
                f"{min(train_s):.0f}-{max(train_s):.0f}",
                f"{min(grid_s):.0f}-{max(grid_s):.0f}",
                f"{min(g / t for g, t in zip(grid_s, train_s)):.2f}-{max(g / t for g, t in zip(grid_s, train_s)):.2f}",
            ]
        )
    fixed, default = ([float(r["grid_s"]) for r in results[k]] for k in ("fixed", "default"))
    ratios = [f / d for f, d in zip(fixed, default)]
    table = markdown_table(
        ["grid", "what the log said", "training s (range)", "final grid s (range)", "grid / training"], rows
    )
    notes = (
        f"{args.rounds} rounds, alternating; {args.max_train_steps} steps of {args.train_batch_size} images at 64 px "
        "on the embedded emoji, "
        f"{args.threads} threads. The bounded default grid is {min(ratios):.1f}-{max(ratios):.1f}x faster than the "
        f"fixed 16 x 25 (median {statistics.median(ratios):.1f}x)."
    )
    print(table + "\n\n" + notes)
    append_results(
        "Final sample grid after a 2-step fine-tune (bench_grid_cost.py)", table, notes, record=not args.no_record
    )


if __name__ == "__main__":
    main()
