"""Does ``--time_budget_minutes`` end on time on a fast and a slow machine, and what does the slow one get?

    python benchmarks/bench_time_budget.py --splits_dir DIR              # ~35 minutes on 2 cores

README's command on 1,000 unlabelled OpenMoji emoji (``--train_data_dir``), timed from launch to the saved
pipeline, then ``crispdiff evaluate`` with 1,000 samples against 1,000 held-out images (the splits of
``bench_own_data.py``). Runs: the budget on both cores, the same budget pinned to one core (``taskset -c 0``, a
machine about half as fast), and the fixed default (700 steps) pinned to one core, which is what that machine gets
without a budget. Evaluation always runs on every core, so only training is slowed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_own_data import fresh_run_folder, latent_job
from common import BENCH_DIR, append_results, markdown_table
from own_data import make_split


def train_and_evaluate(name: str, cpus: str | None, flags: list[str], args: argparse.Namespace) -> dict:
    split = make_split("openmoji", Path(args.splits_dir))
    out = Path(args.out_dir) / name
    if (done := fresh_run_folder(out)) is not None:
        return done
    pin = ["taskset", "-c", cpus] if cpus else []
    train_flags = ["--train_data_dir", str(split["train"]), *flags]
    wall, metrics, training = latent_job(out, train_flags, split["heldout"], args.num_images, prefix=pin)
    result = {
        "run": name,
        "wall_s": wall,
        "steps": training["max_train_steps"],
        "vae_steps": training.get("adapt_vae_steps"),
        "ratio": metrics["generated"]["swd_avg"] / metrics["real_vs_real_floor"]["swd_avg"],
        "hf": metrics["generated"]["hf_energy_ratio"],
        "laplacian": metrics["generated"]["laplacian_var_ratio"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits_dir", default=str(BENCH_DIR / "out" / "own-data-splits"))
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "time-budget"))
    p.add_argument("--minutes", type=float, default=4.5, help="the budget")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    budget = ["--time_budget_minutes", str(args.minutes)]
    runs = [
        (f"budget {args.minutes:g} min, 2 cores", "budget-2cores", None, budget),
        (f"budget {args.minutes:g} min, 1 core", "budget-1core", "0", budget),
        ("no budget (700 steps), 1 core", "fixed-1core", "0", []),
    ]
    rows = []
    for label, name, cpus, flags in runs:
        result = train_and_evaluate(name, cpus, flags, args)
        print(json.dumps(result), flush=True)
        rows.append([
            label, f"{result['wall_s'] / 60:.2f}", result["steps"], result["vae_steps"], f"{result['ratio']:.2f}x",
            f"{result['hf']:.2f}", f"{result['laplacian']:.2f}",
        ])  # fmt: skip
    header = ["run", "wall min (launch to pipeline)", "UNet steps", "VAE steps", "SWD / floor", "hf", "Laplacian"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        append_results("Time budget on a fast and a slow machine (bench_time_budget.py)", table)


if __name__ == "__main__":
    main()
