"""The compute ladder's curve (issue 34): SWD / floor and recognition against training CPU-minutes, today's recipe
beside the new one, from the runs `study_levers.py` trained and measured.

    python benchmarks/studies/ladder.py [--out benchmarks/ladder.png]

Each point is one run (`out/levers/RUN`): its training CPU time (`train_cpu.json`, one torch thread) and one row of
its `quality.jsonl` (500 samples against held-out emoji, top-1 at 4 per class), picked by the guidance it was
measured with. Points without their run or row are listed and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import BENCH_DIR  # noqa: E402

LEVERS = BENCH_DIR / "out" / "levers"

#: curve -> (run, the quality row's guide step (None: unguided), autoguidance scale, label)
CURVES: dict[str, list[tuple[str, int | None, float, str]]] = {
    "today (fp32, no autoguidance, base 32)": [
        ("base-s0", None, 1.0, "700 steps"),
        ("steps1400-s0", None, 1.0, "1400 steps"),
    ],
    "new (bf16, autoguidance 1.5), base 32": [
        ("bf16-s0", 225, 1.5, "900 steps"),
        ("l10-b32-s0", 420, 1.5, "1680 steps"),
        ("l30-b32-s0", 1250, 1.5, "5000 steps"),
    ],
    "new, base 48 (the ladder's medium rung)": [
        ("l30-b48-s0", 725, 1.5, "2900 steps"),
        ("l60-b48-s0", 1438, 1.5, "5750 steps"),
    ],
    "new, base 48, --augment_prob 0.4": [
        ("l30-b48-augfix-s0", 725, 1.5, "2900 steps"),
        ("l60-b48-augfix-s0", 1438, 1.5, "5750 steps"),
    ],
    "OpenMoji, unlabelled (auto classes), new": [
        ("om-bf16-s0", 225, 1.5, "900 steps"),
        ("om-l10-b32-s0", 420, 1.5, "1680 steps"),
        ("om-l30-b48-s0", 725, 1.5, "2900 steps (base 48)"),
    ],
}


#: Runs killed and resumed (a session ended): their train_cpu.json times the last part only, from this step on, so
#: the whole run's CPU time is that part's CPU time per step times all the steps.
RESUMED_AT = {"l30-b32-s0": 3500, "l30-b48-s0": 1500}

#: The real images' values (quality.py's floor rows): Noto's top-1 of the training images with every class weighted
#: alike, as the samples are drawn, and each family's recall of two sets of real images.
REAL_TOP1 = 0.338
REAL_RECALL = {"noto": 0.945, "openmoji": 0.90}


def family_of(curve: str) -> str:
    return "openmoji" if curve.startswith("OpenMoji") else "noto"


def training_cpu_minutes(run: str) -> float | None:
    path = LEVERS / run / "train_cpu.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    part = record["steps"] - RESUMED_AT.get(run, 0)
    return record["cpu_s"] / part * record["steps"] / 60


def quality_row(run: str, guide: int | None, ag: float) -> dict[str, Any] | None:
    """The run's screen row (500 samples) measured with this guide and scale; the last one if measured twice."""
    path = LEVERS / run / "quality.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in rows if r.get("num_images") == 500 and r.get("guide") == guide and r.get("ag") == ag]
    return found[-1] if found else None


def ladder_points() -> dict[str, list[dict[str, Any]]]:
    points: dict[str, list[dict[str, Any]]] = {}
    for curve, runs in CURVES.items():
        for run, guide, ag, label in runs:
            row, cpu_min = quality_row(run, guide, ag), training_cpu_minutes(run)
            if row is None or cpu_min is None:
                print(f"skipped {run} (guide {guide}, ag {ag}): not measured yet")
                continue
            points.setdefault(curve, []).append(row | {"cpu_min": cpu_min, "label": label})
    return points


def markdown(points: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| recipe | run | training CPU-min | SWD / floor | top-1 | top-1, A's mix | precision | recall | copy distance "
        "| near-copies | hf | Laplacian |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for curve, rows in points.items():
        for r in rows:
            lines.append(
                f"| {curve.split(' (')[0]} | {r['label']} | {r['cpu_min']:.1f} | {r['swd_ratio']:.2f} | "
                f"{_value(r, 'top1', '.3f')} | {_value(r, 'top1_mix', '.3f')} | {r['precision']:.2f} | "
                f"{r['recall']:.2f} | "
                f"{_value(r, 'copy_distance', '.2f')} | {_value(r, 'near_copies', '.2f')} | {r['hf']:.2f} | "
                f"{r['laplacian']:.2f} |"
            )
    return "\n".join(lines)


def _value(row: dict[str, Any], key: str, spec: str) -> str:
    """A column rows measured before it existed lack."""
    return format(row[key], spec) if key in row else "-"


def plot(points: dict[str, list[dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax_swd, ax_top1, ax_recall, ax_copy) = plt.subplots(1, 4, figsize=(20, 4))
    for curve, rows in points.items():
        rows = sorted(rows, key=lambda r: r["cpu_min"])
        cpu = [r["cpu_min"] for r in rows]
        ax_swd.plot(cpu, [r["swd_ratio"] for r in rows], "o-", label=curve)
        if "top1" in rows[0]:
            ax_top1.plot(cpu, [100 * r["top1"] for r in rows], "o-", label=curve)
        ax_recall.plot(cpu, [r["recall"] / REAL_RECALL[family_of(curve)] for r in rows], "o-", label=curve)
        copied = [r for r in rows if "copy_distance" in r]
        ax_copy.plot([r["cpu_min"] for r in copied], [r["copy_distance"] for r in copied], "o-", label=curve)
        for r in rows:
            ax_swd.annotate(r["label"], (r["cpu_min"], r["swd_ratio"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    ax_swd.axhline(1.0, color="grey", lw=0.8)
    ax_top1.axhline(REAL_TOP1 * 100, color="grey", lw=0.8, ls="--", label="real images, classes weighted alike")
    ax_recall.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_copy.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes = ((ax_swd, "held-out SWD / real-vs-real floor"), (ax_top1, "subcategory top-1, 4 per class (%)"),
            (ax_recall, "recall in the classifier's feature space / real's"),
            (ax_copy, "distance to nearest training image / real's"))  # fmt: skip
    for ax, ylabel in axes:
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 30, 60], labels=["5", "10", "20", "30", "60"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training CPU-minutes (one thread)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_top1.legend(fontsize=7)
    ax_recall.legend(fontsize=7)
    fig.suptitle("What compute buys: Noto (labelled) and OpenMoji (unlabelled), 500 samples, DPM-Solver++ 25, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "ladder.png")
    args = parser.parse_args()
    points = ladder_points()
    print(markdown(points))
    plot(points, args.out)


if __name__ == "__main__":
    main()
