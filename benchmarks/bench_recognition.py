"""Are the samples *something*? Recognition and precision / recall in a classifier's feature space, with or without
labels.

    python benchmarks/bench_recognition.py --family noto --pipeline main=crispdiff-latent/pipeline
    python benchmarks/bench_recognition.py --family openmoji --pipeline mine=runs/openmoji/pipeline --seeds 0 1
    python benchmarks/bench_recognition.py --family noto --sanity_only     # what the measures say of real images

SWD and the sharpness ratios do not see whether a sample is an emoji: a grid of sharp, well-coloured, shapeless
figures scores close to the data. This benchmark asks a small classifier of the data's own design family, trained on
images outside the generator's training set and the reference set (``recognition.py``), and reports per pipeline
(``quality.py``: 1,000 samples, DPM-Solver++ 25, each seed's images from that seed):

* SWD against 1,000 held-out images beside the floor of 1,000 other held-out ones, and the sharpness ratios;
* improved precision and recall (k = 3), density and coverage in the classifier's feature space, each beside its
  real-vs-real value (the generator's training images against the reference: two sets the classifier never saw);
* top-1 where the intended class is known (a model conditioned on the family's subcategories): 8 samples of each
  class, how often the classifier names it, beside the real images' top-1 with every class weighted alike; and
  "top-1, A's mix": the 1,000 samples drawn in A's class mix beside A's own top-1. Compare a top-1 only with the real
  value of the same class mix: the classifier names frequent classes far better than rare ones;
* copy distance: the samples' median pixel distance to their nearest training image over held-out real images'
  (1.0: as new as real images; well below 1: the model copies its training images).

The sanity rows show the measures on damaged real images: blurred, block-shuffled ("confetti") and two images
averaged. OpenMoji images are CC-BY-SA-4.0 ("OpenMoji"). Writes OUT_DIR/recognition.json and .md; appends the table
to RESULTS.md unless ``--no_record``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import BENCH_DIR, append_results, machine, markdown_table
from quality import floor_row, measure_pipeline, recognition_for

from crispdiff.core.io import write_text_atomic

COLUMNS = ["swd_ratio", "hf", "laplacian", "precision", "recall", "density", "coverage", "top1", "top1_mix",
           "copy_distance"]  # fmt: skip
HEADER = ["rows", "SWD / floor", "hf", "Laplacian", "precision", "recall", "density", "coverage", "top-1",
          "top-1, A's mix", "copy distance"]  # fmt: skip


def span(values: list[float]) -> str:
    """A range over seeds ("0.41-0.45"), or the single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="noto", choices=["noto", "openmoji"])
    p.add_argument("--pipeline", nargs="*", default=[], help="NAME=DIR of pipelines trained on the family")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds (one row range per pipeline)")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: each pipeline's own")
    p.add_argument("--sanity_only", action="store_true", help="only the real-vs-real and damaged-image rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "recognition"))
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    floor = floor_row(args.family)
    recognition = recognition_for(args.family)
    rows: list[list[Any]] = [["real vs real (T vs A; SWD: B vs A)", "1.00", "1.00", "1.00",
                              *(span([floor[c]]) for c in COLUMNS[3:])]]  # fmt: skip
    for name, values in recognition.sanity_rows().items():
        rows.append([f"real, {name}", "-", "-", "-", *(span([values[c]]) for c in COLUMNS[3:7]), "-", "-", "-"])
    results: dict[str, list[dict[str, Any]]] = {}
    for item in [] if args.sanity_only else args.pipeline:
        name, folder = item.split("=", 1)
        results[name] = []
        for seed in args.seeds:
            row = measure_pipeline(folder, args.family, seed=seed, guidance_scale=args.guidance_scale)
            print(name, seed, json.dumps(row), flush=True)
            results[name].append(row)
        rows.append([name, *(span([r.get(c) for r in results[name]]) for c in COLUMNS)])
    table = markdown_table(HEADER, rows)
    split = recognition.split
    notes = (
        f"Family {args.family}: T {len(split.train)} training images, A {len(split.reference)} held-out reference "
        f"images, B {len(split.floor)} others (SWD floor {floor['swd']:.3g}); the classifier ({len(split.classes)} "
        f"subcategories) trained on {len(split.classifier_rows)} images outside T and A. Precision / recall: k = 3, "
        f"samples against A. Top-1: 8 samples per class of a model conditioned on the family's subcategories; "
        f"real: T's top-1 with classes weighted alike (T in its own mix: {floor['top1_natural']:.3g}). "
        f"Ranges over sampling seeds {args.seeds}. {machine()}, {(time.time() - started) / 60:.1f} min in all."
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "recognition.json", json.dumps({"floor": floor, "pipelines": results}, indent=2))
    write_text_atomic(out_dir / "recognition.md", table + "\n\n" + notes + "\n")
    title = f"Recognisable samples on {args.family} (bench_recognition.py)"
    append_results(title, table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
