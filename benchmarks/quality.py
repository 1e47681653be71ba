"""One quality row for a saved pipeline: held-out SWD beside its floor, sharpness, recognition, precision / recall.

    python benchmarks/quality.py PIPELINE_DIR --family noto [--seed 1]

Used by the lever and ladder benchmarks so that every quality table has the same columns, measured the same way:
1,000 samples (DPM-Solver++ 25, image i from seed + i) against the 1,000 held-out images A of
``recognition.family_split`` (SWD, sharpness, colour blobs; the floor is the 1,000 other held-out images B against
A, seeded once per family, so every row of a family shares it), then in the family classifier's feature space
(precision, recall, density, coverage against A, beside T-vs-A). A model conditioned on the family's subcategories
samples in A's class mix, and ``per_class`` more images of each class give top-1 (the intended class named); a model
on auto classes or none samples as a user's plain call does.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch
from recognition import DEFAULT_CACHE, Recognition, family_split, images01

from crispdiff.evaluate.memorisation import nearest_neighbours
from crispdiff.evaluate.metrics import compute_all
from crispdiff.evaluate.sampling import generate_samples, reference_class_mix
from crispdiff.publish.export import load_pipeline

NUM_IMAGES = 1000
PER_CLASS = 8


@cache
def recognition_for(family: str, cache_dir: str = str(DEFAULT_CACHE)) -> Recognition:
    return Recognition(family_split(family), Path(cache_dir))


@cache
def floor_row(family: str) -> dict[str, Any]:
    """The real-vs-real values of a family: SWD and sharpness of B against A, recognition of T against A."""
    recognition = recognition_for(family)
    split = recognition.split
    floor = compute_all(images01(split.reference), images01(split.floor), seed=0)
    return {"swd": floor["swd_avg"], **recognition.real_row(), **copying(images01(split.reference), family)}


def copying(images: torch.Tensor, family: str) -> dict[str, float]:
    """How close ``images`` (float, [0, 1]) lie to the generator's training images T: the median RMS pixel distance to
    the nearest one over the held-out reference A's (1.0: as close as new real images; far below: copies), and the
    share of near-copies (``crispdiff.evaluate.memorisation``'s threshold)."""
    found = nearest_neighbours(images, training_images(family))
    return {"copy_distance": found["nn_distance_median"] / new_image_distance(family),
            "near_copies": found["near_copy_fraction"]}  # fmt: skip


@cache
def training_images(family: str) -> torch.Tensor:
    return images01(recognition_for(family).split.train)


@cache
def new_image_distance(family: str) -> float:
    """Median distance from a held-out reference image to its nearest training image: the scale of "new"."""
    reference = images01(recognition_for(family).split.reference)
    return nearest_neighbours(reference, training_images(family))["nn_distance_median"]


def conditioned_on_family_classes(pipeline: Any, recognition: Recognition) -> bool:
    """Whether the pipeline's classes are the family's subcategories (so each sample's intended class is known)."""
    names = getattr(pipeline, "classes", None)
    return bool(names) and getattr(pipeline, "class_mix", None) is None and set(names) <= set(recognition.classes)


def measure_pipeline(
    folder: str | Path,
    family: str,
    *,
    seed: int = 0,
    num_images: int = NUM_IMAGES,
    per_class: int = PER_CLASS,
    steps: int = 25,
    guidance_scale: float | None = None,
    pipeline: Any = None,
) -> dict[str, Any]:
    """The quality row of the pipeline in ``folder`` (or the already loaded ``pipeline``)."""
    started = time.perf_counter()
    recognition = recognition_for(family)
    split = recognition.split
    pipeline = pipeline if pipeline is not None else load_pipeline(folder)
    labelled = conditioned_on_family_classes(pipeline, recognition)
    labels = None
    if labelled:
        known = set(pipeline.classes)
        labels = reference_class_mix([r["subcategory"] for r in split.reference if r["subcategory"] in known],
                                     num_images, seed)  # fmt: skip
    samples = generate_samples(
        pipeline, num_images, steps=steps, seed=seed, class_labels=labels, guidance_scale=guidance_scale
    )
    reference = images01(split.reference)
    generated = compute_all(reference, samples, seed=0)
    floor = floor_row(family)
    row: dict[str, Any] = {
        "swd": generated["swd_avg"],
        "swd_ratio": generated["swd_avg"] / floor["swd"],
        "hf": generated["hf_energy_ratio"],
        "laplacian": generated["laplacian_var_ratio"],
        "blob": generated["colour_blob"],
        **recognition.precision_recall(samples),
        **copying(samples, family),
    }
    if labelled:
        targets = torch.tensor([recognition.classes.index(name) for name in labels])
        row["top1_mix"] = recognition.class_scores(samples, targets)["top1"]  # beside A's own, floor "top1_mix"
        ids = torch.arange(len(pipeline.classes)).repeat_interleave(per_class)
        drawn = generate_samples(
            pipeline, len(ids), steps=steps, seed=seed + 10**6, class_labels=ids.tolist(), guidance_scale=guidance_scale
        )
        targets = torch.tensor([recognition.classes.index(pipeline.classes[i]) for i in ids.tolist()])
        row.update(recognition.class_scores(drawn, targets))
    row["eval_s"] = time.perf_counter() - started
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline")
    p.add_argument("--family", default="noto", choices=["noto", "openmoji"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--num_images", type=int, default=NUM_IMAGES)
    p.add_argument("--per_class", type=int, default=PER_CLASS, help="samples per class for top-1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sanity", action="store_true", help="also print the family's floor and sanity rows")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sanity:
        print("floor", json.dumps(floor_row(args.family)))
        for name, values in recognition_for(args.family).sanity_rows().items():
            print(name, json.dumps(values))
    row = measure_pipeline(args.pipeline, args.family, seed=args.seed, num_images=args.num_images,
                           per_class=args.per_class, guidance_scale=args.guidance_scale)  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
