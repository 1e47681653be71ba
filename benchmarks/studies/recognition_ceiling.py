"""Is a flat top-1 the generator's limit or the classifier's? (issue 34)

    python benchmarks/studies/recognition_ceiling.py [--run out/levers/l60-b48-s0 --guide 1438]

Prints, for the Noto classifier of ``recognition.py``:

* its top-1 on real images in their own class mix and with every class weighted alike (the way samples are drawn
  for top-1, ``per_class`` of each class);
* its top-1 on the training images T after the generator's own rendering steps (VAE round trip, unsharp mask, a
  slight blur, noise): if those cost top-1, samples would be under-scored for how they are made, not what they show;
* with ``--run``: per-class samples of that run (4 per class, autoguidance from the snapshot ``--guide``), and for
  each its nearest training image in pixel space: how often that image is of the intended class, how often the
  classifier names the image itself, and how often it gives sample and image the same name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: quality, recognition
from quality import recognition_for  # noqa: E402
from recognition import Recognition  # noqa: E402
from study_levers import guide_with_snapshot  # noqa: E402

from crispdiff.evaluate.memorisation import nearest_neighbours
from crispdiff.pipelines.pipeline_crispdiff import gaussian_blur, unsharp_mask
from crispdiff.vae.evaluation import reconstruct


def class_mix_rows(recognition: Recognition) -> dict[str, float]:
    out = {}
    for part, rows in (("T", recognition.split.train), ("A", recognition.split.reference)):
        images, labels = recognition.labelled(rows)
        out[f"{part} top-1, own mix"] = (recognition.named(images) == labels).float().mean().item()
        out[f"{part} top-1, classes alike"] = recognition.balanced_top1(images, labels)
    return out


def rendering_rows(recognition: Recognition, vae: torch.nn.Module) -> dict[str, float]:
    train, labels = recognition.labelled(recognition.split.train)
    round_trip = reconstruct(vae, train * 2 - 1) / 2 + 0.5
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(0))
    variants = {
        "T": train,
        "T, VAE round trip": round_trip,
        "T, VAE round trip + unsharp 0.3": unsharp_mask(round_trip, 0.3).clamp(0, 1),
        "T, unsharp 0.4": unsharp_mask(train, 0.4).clamp(0, 1),
        "T, blur sigma 0.5 px": gaussian_blur(train, 0.5).clamp(0, 1),
        "T, noise 0.02": (train + 0.02 * noise).clamp(0, 1),
    }
    return {name: (recognition.named(images) == labels).float().mean().item() for name, images in variants.items()}


def copies_rows(recognition: Recognition, run: Path, guide: int) -> dict[str, float]:
    from crispdiff.evaluate.sampling import generate_samples
    from crispdiff.publish.export import load_pipeline

    pipeline = load_pipeline(run / "pipeline")
    guide_with_snapshot(pipeline, run, guide, 1.5)
    ids = torch.arange(len(pipeline.classes)).repeat_interleave(4)
    samples = generate_samples(pipeline, len(ids), steps=25, seed=10**6, class_labels=ids.tolist())
    intended = torch.tensor([recognition.classes.index(pipeline.classes[i]) for i in ids.tolist()])
    train, labels = recognition.labelled(recognition.split.train)
    original = nearest_neighbours(samples, train)["indices"]
    sample_name, original_name = recognition.named(samples), recognition.named(train)[original]
    return {
        "samples named as intended (top-1)": (sample_name == intended).float().mean().item(),
        "nearest training image of the intended class": (labels[original] == intended).float().mean().item(),
        "nearest training images named as their class": (original_name == labels[original]).float().mean().item(),
        "sample and nearest training image given one name": (sample_name == original_name).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a study_levers.py run folder")
    parser.add_argument("--guide", type=int, default=0, help="the run's snapshot step to autoguide with (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recognition = recognition_for("noto")
    rows = class_mix_rows(recognition)
    if args.run is not None:
        from crispdiff.publish.export import load_pipeline

        rows |= rendering_rows(recognition, load_pipeline(args.run / "pipeline").vae)
        rows |= copies_rows(recognition, args.run, args.guide)
    for name, value in rows.items():
        print(f"{name:55s} {value:.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
