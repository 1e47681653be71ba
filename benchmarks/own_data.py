"""Train/held-out splits of "a user's own data" for benchmarks/bench_own_data.py (and anyone measuring the same way).

A user's folder has no labels and is not the embedded set; its quality is measured against images the model did not
train on, beside a real-vs-real floor of two other disjoint sets of the same size. Each split is written once as a
plain folder of copied PNGs without ``metadata.jsonl`` (what a user's own folder looks like), so the training command
under test is exactly a user's: ``train_latent.py --train_data_dir SPLIT/train``.

* ``openmoji``: 1,000 random OpenMoji emoji (seeded) to train on, the other 3,494 held out (read from ../shared;
  CC-BY-SA-4.0, credit "OpenMoji").
* ``noto``: the 1,000 embedded Noto emoji without their metadata, held out: the other 2,786 Noto emoji of ../shared.

Held-out folders keep their ``metadata.jsonl`` (categories, subcategories): ``crispdiff evaluate`` samples a model
trained on real labels (the embedded main job) in the held-out images' class mix; auto-class models ignore it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from common import shared_dir

from crispdiff.data.loading import embedded_dataset_dir

FAMILIES = ("openmoji", "noto")
TRAIN_IMAGES = 1000


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")


def _write_folder(source: Path, names: list[str], target: Path, metadata: bool) -> None:
    """Copy ``names`` from ``source`` into ``target`` (built beside it, renamed into place: never half a split), with
    their rows of the source's ``metadata.jsonl`` if ``metadata``."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in names:
        shutil.copyfile(source / name, staging / name)
    if metadata:
        wanted = set(names)
        rows = [line for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
        kept = [row for row in rows if json.loads(row)["file_name"] in wanted]
        (staging / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def split_names(family: str, seed: int = 0) -> tuple[Path, list[str], list[str]]:
    """``(source folder, train names, held-out names)`` of one family."""
    if family == "openmoji":
        source = shared_dir() / "data" / "openmoji-64" / "train"
        names = _pngs(source)
        rng = random.Random(seed)
        train = sorted(rng.sample(names, TRAIN_IMAGES))
        chosen = set(train)
        return source, train, [n for n in names if n not in chosen]
    if family == "noto":
        source = shared_dir() / "data" / "noto-emoji-64" / "train"
        train = _pngs(embedded_dataset_dir())
        embedded = set(train)
        return source, train, [n for n in _pngs(source) if n not in embedded]
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def make_split(family: str, root: Path, seed: int = 0) -> dict[str, Path]:
    """``{"train": folder, "heldout": folder}`` under ``root/family``, written on first use and then reused."""
    source, train, held = split_names(family, seed)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: bench_own_data needs ../shared (or CRISPDIFF_SHARED)")
    folders = {"train": root / family / "train", "heldout": root / family / "heldout"}
    manifest = root / family / "split.json"
    wanted = {"source": str(source), "seed": seed, "train": train, "heldout": held, "heldout_metadata": True}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(f.is_dir() for f in folders.values()):
        return folders
    train_source = embedded_dataset_dir() if family == "noto" else source
    _write_folder(train_source, train, folders["train"], metadata=False)
    _write_folder(source, held, folders["heldout"], metadata=True)
    manifest.write_text(json.dumps(wanted))
    return folders


def make_128_split(root: Path, seed: int = 0) -> dict[str, Path]:
    """The 128 px Noto split of the super-resolution and 64-vs-128 benchmarks, written once under ``root/noto-128``.

    * ``heldout``: 1,000 seeded Noto emoji at 128 px that are not embedded (with metadata): what every 128 px result
      is measured against; ``floor``: 1,000 other non-embedded ones, the real-vs-real floor's second set.
    * ``sr_train``: every 128 px Noto emoji not held out (the SR model's training set: it never sees ``heldout``).
    * ``diffusion_train``: the embedded emoji that Noto draws at 128 px (no flags), without metadata: what the 64 px
      and 128 px diffusion models of the comparison train on (the 64 px ones at ``--resolution 64``, resized by the
      data pipeline).
    """
    source = shared_dir() / "data" / "noto-emoji-128" / "train"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: the 128 px benchmarks need ../shared (or CRISPDIFF_SHARED)")
    names = _pngs(source)
    embedded = set(_pngs(embedded_dataset_dir()))
    others = [n for n in names if n not in embedded]
    rng = random.Random(seed)
    held = sorted(rng.sample(others, TRAIN_IMAGES))
    rest = [n for n in others if n not in set(held)]
    parts = {
        "heldout": (held, True),
        "floor": (sorted(rng.sample(rest, TRAIN_IMAGES)), False),
        "sr_train": ([n for n in names if n not in set(held)], False),
        "diffusion_train": ([n for n in names if n in embedded], False),
    }
    folders = {name: root / "noto-128" / name for name in parts}
    manifest = root / "noto-128" / "split.json"
    wanted = {"source": str(source), "seed": seed, **{name: files for name, (files, _) in parts.items()}}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(f.is_dir() for f in folders.values()):
        return folders
    for name, (files, metadata) in parts.items():
        _write_folder(source, files, folders[name], metadata=metadata)
    manifest.write_text(json.dumps(wanted))
    return folders


def make_openmoji_128_split(root: Path, seed: int = 0) -> dict[str, Path]:
    """The 128 px OpenMoji sets the 128 px output of a model trained on ``make_split("openmoji")`` is measured on.

    ``heldout`` and ``floor``: two disjoint seeded sets of 1,000 OpenMoji at 128 px, both outside the 64 px model's
    training images (so the floor is real-vs-real on images the model never saw). Written once under
    ``root/openmoji-128``.
    """
    source = shared_dir() / "data" / "openmoji-128" / "train"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is missing: the 128 px benchmarks need ../shared (or CRISPDIFF_SHARED)")
    _, _, unseen = split_names("openmoji", seed)
    available = set(_pngs(source))
    unseen = [n for n in unseen if n in available]
    rng = random.Random(seed + 128)
    picked = rng.sample(unseen, 2 * TRAIN_IMAGES)
    parts = {"heldout": sorted(picked[:TRAIN_IMAGES]), "floor": sorted(picked[TRAIN_IMAGES:])}
    folders = {name: root / "openmoji-128" / name for name in parts}
    manifest = root / "openmoji-128" / "split.json"
    wanted = {"source": str(source), "seed": seed, **parts}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(f.is_dir() for f in folders.values()):
        return folders
    for name, files in parts.items():
        _write_folder(source, files, folders[name], metadata=False)
    manifest.write_text(json.dumps(wanted))
    return folders


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-own-data")
    for fam in FAMILIES:
        print(fam, make_split(fam, out))
    print("noto-128", make_128_split(out))
    print("openmoji-128", make_openmoji_128_split(out))
