"""Recognisable, not only sharp: a classifier of the data's own design family, and what it sees in samples.

SWD and the sharpness ratios do not see whether a sample is *something*: a grid of sharp, well-coloured, shapeless
figures scores close to real emoji. This module measures that the way classification-accuracy scores do (Ravuri &
Vinyals 2019), and extends it to models trained without labels:

* a family's images are split once (seeded) into T, the generator's training images; A, the 1,000 held-out images
  every sample set is compared with; B, 1,000 other held-out images (the real-vs-real floor's second set); and the
  rest. A small CNN learns the images' Unicode / OpenMoji ``subcategory`` on everything outside T and A (those labels
  are never used to train a generator without labels);
* ``top-1``: where the intended class of a sample is known (a model conditioned on subcategories), how often the
  classifier names it, ``per_class`` samples of each class;
* improved precision and recall (k = 3) and density / coverage in the classifier's feature space
  (``crispdiff.evaluate.feature_metrics``), samples against A, each beside the real-vs-real value T against A (two
  sets of real images the classifier never saw).

Families: ``noto`` (T: the 1,000 embedded Noto emoji; held-out pool: the other shared Noto emoji of the embedded
set's 90 subcategories) and ``openmoji`` (T: ``own_data.py``'s 1,000 seeded OpenMoji training emoji; pool: the
other 3,494; CC-BY-SA-4.0, "OpenMoji").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from common import shared_dir
from own_data import split_names
from safetensors.torch import load_file, save_file
from torch import nn

from crispdiff.data.sources import embedded_dataset_dir
from crispdiff.evaluate.feature_metrics import feature_precision_recall

FAMILIES = ("noto", "openmoji")
CLASSIFIER_RESOLUTION = 32
CLASSIFIER_EPOCHS = 30
REFERENCE_IMAGES = 1000
NEIGHBOURS = 3  # k of improved precision / recall, as Kynkaanniemi et al. 2019 recommend
DEFAULT_CACHE = Path.home() / ".cache" / "crispdiff" / "bench"

# The words, as Unicode categories (hands are People & Body subcategories named hand-* / *-hand*).
GROUPS = {
    "faces": lambda cat, sub: cat.lower().startswith("smileys") and sub.startswith("face-"),
    "hands": lambda cat, sub: "hand" in sub,
    "flags": lambda cat, sub: cat.lower().startswith("flags"),
    "objects": lambda cat, sub: cat.lower() == "objects",
}


def read_emoji(folder: Path) -> list[dict[str, Any]]:
    """metadata.jsonl rows of an emoji folder, each with its image as uint8 [3, 64, 64] composited onto white."""
    rows = []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        with PIL.Image.open(folder / row["file_name"]) as image:
            rgba = image.convert("RGBA").resize((64, 64), PIL.Image.LANCZOS)
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        row["image"] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        rows.append(row)
    return rows


def images01(rows: list[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([r["image"] for r in rows]).float() / 255


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

    def embed(self, images01: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of float images in [0, 1] of any size (resized to the classifier's 32 px)."""
        x = F.interpolate(images01, size=CLASSIFIER_RESOLUTION, mode="bilinear", antialias=True, align_corners=False)
        return self.features(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images01))


def shifted(batch01: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random translations of up to ``max_shift`` pixels (white fill): the only augmentation, since colour and
    orientation carry class information in emoji (flags, arrows)."""
    padded = F.pad(batch01, [max_shift] * 4, value=1.0)
    size = batch01.shape[-1]
    out = torch.empty_like(batch01)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(batch01), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0) -> EmojiClassifier:
    """AdamW with a one-cycle LR over ``CLASSIFIER_EPOCHS`` epochs of batch 64."""
    torch.manual_seed(seed)
    model = EmojiClassifier(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps_per_epoch = -(-len(images) // 64)
    total_steps = CLASSIFIER_EPOCHS * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(CLASSIFIER_EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(shifted(images[batch], generator)), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 9:
            print(f"classifier epoch {epoch + 1}/{CLASSIFIER_EPOCHS}: loss {total / len(order):.3f}", flush=True)
    return model.eval()


@dataclass
class FamilySplit:
    """One family's images, split into the generator's training set T, the reference A, the floor's B, and the
    classifier's training rows (everything outside T and A that has one of ``classes``)."""

    family: str
    train: list[dict[str, Any]]
    reference: list[dict[str, Any]]
    floor: list[dict[str, Any]]
    classifier_rows: list[dict[str, Any]]
    classes: list[str]

    def key(self) -> str:
        names = json.dumps([[r["file_name"] for r in part] for part in (self.train, self.reference)] + [self.classes])
        return f"{self.family}-{hashlib.sha256(names.encode()).hexdigest()[:12]}"


def family_split(family: str, seed: int = 0) -> FamilySplit:
    """The seeded split of ``family`` (see the module docstring); A and B are drawn from the held-out pool."""
    if family == "noto":
        folder = shared_dir() / "data" / "noto-emoji-64" / "train"
        train_names = {p.name for p in embedded_dataset_dir().glob("*.png")}
    elif family == "openmoji":
        folder, train_list, _ = split_names("openmoji", seed)
        train_names = set(train_list)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if not (folder / "metadata.jsonl").is_file():
        raise SystemExit(f"{folder} is missing: the recognition benchmarks need ../shared (or CRISPDIFF_SHARED)")
    rows = read_emoji(folder)
    train = [r for r in rows if r["file_name"] in train_names]
    pool = [r for r in rows if r["file_name"] not in train_names]
    if family == "noto":  # compare like with like: the held-out images of the embedded set's subcategories
        known = {r["subcategory"] for r in train}
        pool = [r for r in pool if r["subcategory"] in known]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    reference = [pool[i] for i in order[:REFERENCE_IMAGES]]
    floor = [pool[i] for i in order[REFERENCE_IMAGES : 2 * REFERENCE_IMAGES]]
    outside = [pool[i] for i in order[REFERENCE_IMAGES:]]
    if family == "noto":
        classes = sorted({r["subcategory"] for r in train})
    else:  # subcategories with a few images to learn from
        counts: dict[str, int] = {}
        for r in outside:
            counts[r["subcategory"]] = counts.get(r["subcategory"], 0) + 1
        classes = sorted(name for name, count in counts.items() if count >= 3)
    index = set(classes)
    classifier_rows = [r for r in outside if r["subcategory"] in index]
    return FamilySplit(family, train, reference, floor, classifier_rows, classes)


class Recognition:
    """The family's classifier (trained once, cached) and the measures taken in its feature space."""

    def __init__(self, split: FamilySplit, cache_dir: Path = DEFAULT_CACHE):
        self.split = split
        self.classes = split.classes
        self.model = self._load_or_train(Path(cache_dir))
        category_of = {r["subcategory"]: r["category"] for r in split.train + split.classifier_rows}
        self.group_of = torch.tensor(
            [next((k for k, rule in enumerate(GROUPS.values()) if rule(category_of[c], c)), -1) for c in self.classes]
        )

    def _load_or_train(self, cache_dir: Path) -> EmojiClassifier:
        path = cache_dir / f"classifier-{self.split.key()}-r{CLASSIFIER_RESOLUTION}-e{CLASSIFIER_EPOCHS}.safetensors"
        model = EmojiClassifier(len(self.classes))
        if path.is_file():
            model.load_state_dict(load_file(path))
            return model.eval()
        rows = self.split.classifier_rows
        index = {name: k for k, name in enumerate(self.classes)}
        print(f"training the {self.split.family} classifier on {len(rows)} images outside T and A ...", flush=True)
        model = train_classifier(images01(rows), torch.tensor([index[r["subcategory"]] for r in rows]), len(index))
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
        return model

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.embed(images[i : i + 256]) for i in range(0, len(images), 256)])

    @torch.no_grad()
    def top5(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(images[i : i + 256]).topk(5, dim=1).indices for i in range(0, len(images), 256)])

    @cached_property
    def reference_features(self) -> torch.Tensor:
        return self.features(images01(self.split.reference))

    def precision_recall(self, images: torch.Tensor) -> dict[str, float]:
        """Improved precision / recall and density / coverage of ``images`` against the reference A."""
        return feature_precision_recall(self.reference_features, self.features(images), k=NEIGHBOURS)

    def class_scores(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Top-1 / top-5 of images drawn for ``labels`` (ids into ``classes``), and per group how often an image
        drawn for one of the group's classes is named as some class of that group (a face read as a face)."""
        top5 = self.top5(images)
        out = {
            "top1": (top5[:, 0] == labels).float().mean().item(),
            "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        }
        drawn, named = self.group_of[labels], self.group_of[top5[:, 0]]
        for k, name in enumerate(GROUPS):
            mask = drawn == k
            out[name] = (named[mask] == k).float().mean().item() if mask.any() else float("nan")
        return out

    def labelled(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``rows`` whose subcategory is one of ``classes``, and their class ids."""
        index = {name: k for k, name in enumerate(self.classes)}
        known = [r for r in rows if r["subcategory"] in index]
        return images01(known), torch.tensor([index[r["subcategory"]] for r in known])

    def named(self, images: torch.Tensor) -> torch.Tensor:
        """The class id the classifier gives each image."""
        return self.top5(images)[:, 0]

    def balanced_top1(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 with every class weighted alike (the mean of per-class top-1): the measure of samples drawn
        ``per_class`` per class. Real images in their own class mix score far higher, because the classifier knows
        the frequent classes (faces, flags) best and the rare ones barely."""
        named = self.named(images) == labels
        return torch.stack([named[labels == c].float().mean() for c in labels.unique()]).mean().item()

    def real_row(self) -> dict[str, float]:
        """The real-vs-real values: T (the generator's training images, never seen by the classifier) against A.
        ``top1`` is T's class-balanced top-1, comparable with samples drawn per class; ``top1_mix`` is A's top-1 in
        its own class mix, comparable with samples drawn in A's class mix."""
        row = self.precision_recall(images01(self.split.train))
        train, labels = self.labelled(self.split.train)
        row.update(self.class_scores(train, labels))
        row["top1_natural"] = row["top1"]  # T in its own mix: what the tables quoted as "real" before
        row["top1"] = self.balanced_top1(train, labels)
        reference, reference_labels = self.labelled(self.split.reference)
        row["top1_mix"] = self.class_scores(reference, reference_labels)["top1"]
        return row

    def sanity_rows(self, seed: int = 0) -> dict[str, dict[str, float]]:
        """What the measures say of damaged real images (T): blurred, block-shuffled ("confetti"), two averaged."""
        train = images01(self.split.train)
        generator = torch.Generator().manual_seed(seed)
        return {name: self.precision_recall(images) for name, images in damaged_sets(train, generator).items()}


def damaged_sets(images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sanity sets made from real images: a gaussian blur (sigma 1.5 px), 8x8 blocks shuffled within each image,
    and each image averaged with another one."""
    from crispdiff.pipelines.pipeline_crispdiff import gaussian_blur

    n, c, h, w = images.shape
    block = 8
    tiles = images.reshape(n, c, h // block, block, w // block, block).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, -1, c, block, block)
    shuffled = torch.stack([t[torch.randperm(len(t), generator=generator)] for t in tiles])
    shuffled = shuffled.reshape(n, h // block, w // block, c, block, block).permute(0, 3, 1, 4, 2, 5)
    partner = torch.randperm(n, generator=generator)
    return {
        "blurred (sigma 1.5 px)": gaussian_blur(images, 1.5).clamp(0, 1),
        "block-shuffled 8x8": shuffled.reshape(n, c, h, w),
        "two images averaged": (images + images[partner]) / 2,
    }
