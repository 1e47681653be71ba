"""Can a classifier tell which emoji a class-conditional pipeline drew? A number for "recognisable".

    python benchmarks/bench_recognition.py --pipeline main=crispdiff-latent/pipeline --guidance 1 2 4

Issue 8 asks for a ``samples.png`` in which a person recognises faces, hands, flags and objects. SWD and the sharpness
ratios do not see that: a grid of well-coloured, sharp, shapeless figures scores close to a grid of emoji. This
benchmark measures it the way classification-accuracy scores do (Ravuri & Vinyals 2019): a small CNN is trained on
real Noto emoji *outside* the embedded 1,000 (``../shared/data/noto-emoji-64``) to name their Unicode subcategory;
each pipeline then draws ``--per_class`` images of each of its subcategories (DPM-Solver++ 25, image i from seed i, at
each ``--guidance`` scale), and the table gives how often the classifier names the subcategory the image was drawn
for (top-1 and top-5), overall and for the categories the issue names. The same classifier on the embedded 1,000 real
emoji (the generator's training images, which it never saw) is the ceiling row: samples cannot be expected to read
better than the data.

The classifier (32 px input, about 0.3M parameters, no pretrained weights: none are available offline) is cached
under ``--cache_dir`` keyed by its recipe, so a second run only samples. Writes OUT_DIR/recognition.json and .md and
appends the table to RESULTS.md unless ``--no_record``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from common import BENCH_DIR, append_results, emoji_dir, machine, markdown_table
from safetensors.torch import load_file, save_file
from torch import nn

from crispdiff.core.io import write_text_atomic
from crispdiff.data.sources import embedded_dataset_dir
from crispdiff.evaluate.sampling import generate_samples
from crispdiff.publish.export import load_pipeline

CLASSIFIER_RESOLUTION = 32
CLASSIFIER_EPOCHS = 30
# The words, as Unicode categories (hands are People & Body subcategories named hand-* / *-hand*).
GROUPS = {
    "faces": lambda cat, sub: cat == "Smileys & Emotion" and sub.startswith("face-"),
    "hands": lambda cat, sub: "hand" in sub,
    "flags": lambda cat, sub: cat == "Flags",
    "objects": lambda cat, sub: cat == "Objects",
}


def read_emoji(folder: Path) -> list[dict[str, Any]]:
    """metadata.jsonl rows of an emoji folder, each with its image as uint8 [3, 64, 64] composited onto white."""
    rows = []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        with PIL.Image.open(folder / row["file_name"]) as image:
            rgba = image.convert("RGBA").resize((64, 64), PIL.Image.LANCZOS)
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        row["image"] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        rows.append(row)
    return rows


class EmojiClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and a linear head: small enough to train in a minute on a CPU."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for multiplier in (1, 2, 4):
            out = width * multiplier
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            layers += [nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Logits for float images in [0, 1] of any size (resized to the classifier's 32 px)."""
        x = F.interpolate(images01, size=CLASSIFIER_RESOLUTION, mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3)))


def shifted(images01: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random translations of up to ``max_shift`` pixels (white fill): the only augmentation, since colour and
    orientation carry class information in emoji (flags, arrows)."""
    padded = F.pad(images01, [max_shift] * 4, value=1.0)
    size = images01.shape[-1]
    out = torch.empty_like(images01)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images01), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(images01: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0) -> EmojiClassifier:
    """AdamW with a one-cycle LR over ``CLASSIFIER_EPOCHS`` epochs of batch 64."""
    torch.manual_seed(seed)
    model = EmojiClassifier(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps_per_epoch = -(-len(images01) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=CLASSIFIER_EPOCHS * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(CLASSIFIER_EPOCHS):
        order = torch.randperm(len(images01), generator=generator)
        total = 0.0
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(shifted(images01[batch], generator)), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if epoch % 5 == 4 or epoch == CLASSIFIER_EPOCHS - 1:
            print(f"classifier epoch {epoch + 1}/{CLASSIFIER_EPOCHS}: loss {total / len(order):.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def top5_predictions(model: EmojiClassifier, images01: torch.Tensor) -> torch.Tensor:
    """The classifier's five most likely classes per image, best first: [N, 5] class ids."""
    return torch.cat([model(images01[i : i + 256]).topk(5, dim=1).indices for i in range(0, len(images01), 256)])


def load_or_train_classifier(
    classes: list[str], cache_dir: Path, embedded_names: set[str]
) -> tuple[EmojiClassifier, int]:
    """The subcategory classifier over ``classes``, trained on shared Noto emoji outside the embedded set."""
    key = f"emoji-subcategory-{len(classes)}-r{CLASSIFIER_RESOLUTION}-e{CLASSIFIER_EPOCHS}"
    path = cache_dir / f"{key}.safetensors"
    index = {name: k for k, name in enumerate(classes)}
    rows = [r for r in read_emoji(emoji_dir()) if r["file_name"] not in embedded_names and r["subcategory"] in index]
    model = EmojiClassifier(len(classes))
    if path.is_file():
        model.load_state_dict(load_file(path))
        print(f"classifier: {path}")
        return model.eval(), len(rows)
    images01 = torch.stack([r["image"] for r in rows]).float() / 255
    labels = torch.tensor([index[r["subcategory"]] for r in rows])
    print(f"training the classifier on {len(rows)} shared Noto emoji outside the embedded set ...", flush=True)
    model = train_classifier(images01, labels, len(classes))
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model, len(rows)


def scores(top5: torch.Tensor, labels: torch.Tensor, group_of: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 subcategory accuracy, and per issue group how often an image drawn for one of the group's
    subcategories is named as *some* subcategory of that group (a face read as a face, whichever face)."""
    out = {
        "top1": (top5[:, 0] == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
    }
    drawn, named = group_of[labels], group_of[top5[:, 0]]
    for k, name in enumerate(GROUPS):
        mask = drawn == k
        out[name] = (named[mask] == k).float().mean().item() if mask.any() else float("nan")
    return out


def class_groups(classes: list[str], category_of: dict[str, str]) -> torch.Tensor:
    """Each class's index in GROUPS, or -1 for classes in none of them."""
    found = [next((k for k, rule in enumerate(GROUPS.values()) if rule(category_of[c], c)), -1) for c in classes]
    return torch.tensor(found)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", nargs="+", required=True, help="NAME=DIR of class-conditional pipelines (subcategory)")
    p.add_argument("--guidance", type=float, nargs="+", default=[None], help="scales (default: each pipeline's own)")
    p.add_argument("--per_class", type=int, default=8, help="samples per subcategory and scale")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "crispdiff" / "bench"))
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "recognition"))
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    pipelines = dict(item.split("=", 1) for item in args.pipeline)
    first = load_pipeline(next(iter(pipelines.values())))
    classes = list(first.classes or [])
    if not classes:
        raise SystemExit("the pipeline is not class-conditional; train it with --class_column subcategory")
    embedded = read_emoji(embedded_dataset_dir())
    category_of = {r["subcategory"]: r["category"] for r in embedded}
    model, num_train = load_or_train_classifier(classes, Path(args.cache_dir), {r["file_name"] for r in embedded})

    real = [r for r in embedded if r["subcategory"] in category_of]
    real_labels = torch.tensor([classes.index(r["subcategory"]) for r in real])
    real_images = torch.stack([r["image"] for r in real]).float() / 255
    group_of = class_groups(classes, category_of)
    rows = [
        {"model": "real (embedded 1,000, never seen)", "guidance": "-"}
        | scores(top5_predictions(model, real_images), real_labels, group_of)
    ]
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    for name, folder in pipelines.items():
        pipeline = load_pipeline(folder)
        if list(pipeline.classes or []) != classes:
            raise SystemExit(f"{folder}: its classes differ from {next(iter(pipelines.values()))}'s")
        for scale in args.guidance:
            samples = generate_samples(
                pipeline, len(labels), steps=args.steps, class_labels=labels.tolist(), guidance_scale=scale
            )
            shown = scale if scale is not None else pipeline.config.get("guidance_scale", 1.0)
            rows.append({"model": name, "guidance": shown} | scores(top5_predictions(model, samples), labels, group_of))
            print(rows[-1], flush=True)
    header = ["model", "guidance", "top-1", "top-5", *GROUPS]
    table = markdown_table(
        header, [[r["model"], r["guidance"], r["top1"], r["top5"], *(r[g] for g in GROUPS)] for r in rows]
    )
    group_sizes = ", ".join(f"{g} {int((group_of == k).sum())}" for k, g in enumerate(GROUPS))
    notes = (
        f"Classifier: {len(classes)} Unicode subcategories (chance top-1 {1 / len(classes):.3f}), trained on the "
        f"{num_train} shared Noto emoji outside the embedded 1,000 (32 px, random shifts, {CLASSIFIER_EPOCHS} epochs). "
        f"Samples: {args.per_class} per subcategory and scale, DPM-Solver++ {args.steps}, image i from seed i. Group "
        f"columns: of the images drawn for a group's subcategories ({group_sizes} subcategories), the share the "
        f"classifier names as one of that group's subcategories. {machine()}, "
        f"{(time.time() - started) / 60:.1f} min in all."
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "recognition.json", json.dumps(rows, indent=2))
    write_text_atomic(out_dir / "recognition.md", table + "\n\n" + notes + "\n")
    print(table + "\n\n" + notes)
    if not args.no_record:
        append_results("Recognisable samples: a subcategory classifier (bench_recognition.py)", table, notes)


if __name__ == "__main__":
    main()
