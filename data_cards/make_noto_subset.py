"""Rebuild ``crispdiff/assets/noto-emoji-64`` (the embedded default dataset) from the full Noto Emoji 64 px set.

Why a script: the committed subset must be reproducible from the shared source, so its selection (which files,
how many per category) is code, not a hand-picked list. Run from the repository root::

    python data_cards/make_noto_subset.py [--source ../shared/data/noto-emoji-64/train] [--total 1000] [--seed 0]

Selection: stratified by ``category``. The ``--total`` images are apportioned to categories proportionally to their
size (largest-remainder rounding), then every category is raised to at least ``min(size, --min_per_category)``
images, the extra images coming from the largest category. Within a category the files are drawn uniformly without
replacement with ``random.Random(seed)`` from the file names sorted in code-point order. PNG files are copied
byte-for-byte (still RGBA; ``crispdiff.data.loading`` composites them onto ``--background`` when loading). The folder's
``LICENSE`` file is kept as it is. The per-category counts are printed as a Markdown table for the data card.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path(os.environ.get("CRISPDIFF_SHARED", REPO_ROOT.parent / "shared")) / "data/noto-emoji-64/train"
TARGET = REPO_ROOT / "crispdiff" / "assets" / "noto-emoji-64"


def read_rows(source: Path) -> list[dict]:
    """The source's metadata rows, sorted by file name so the selection never depends on file order."""
    with (source / "metadata.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return sorted(rows, key=lambda row: row["file_name"])


def apportion(sizes: dict[str, int], total: int, minimum: int) -> dict[str, int]:
    """Images per category: proportional (largest remainder), then topped up to ``min(size, minimum)``."""
    population = sum(sizes.values())
    total = min(total, population)
    quotas = {name: total * size / population for name, size in sizes.items()}
    counts = {name: int(quota) for name, quota in quotas.items()}
    by_remainder = sorted(sizes, key=lambda name: (-(quotas[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    for name, size in sizes.items():
        floor = min(size, minimum)
        while counts[name] < floor:
            donor = max((n for n in counts if counts[n] > min(sizes[n], minimum)), key=lambda n: (counts[n], n))
            counts[donor] -= 1
            counts[name] += 1
    return counts


def select(rows: list[dict], total: int, minimum: int, seed: int) -> list[dict]:
    """The chosen rows, in file-name order."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    counts = apportion({name: len(items) for name, items in by_category.items()}, total, minimum)
    rng = random.Random(seed)
    chosen: list[dict] = []
    for name in sorted(by_category):
        chosen.extend(rng.sample(by_category[name], counts[name]))
    return sorted(chosen, key=lambda row: row["file_name"])


def write_subset(source: Path, chosen: list[dict], target: Path) -> None:
    """Write images + metadata.jsonl (+ the existing LICENSE) into a temp folder, then swap it in."""
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for row in chosen:
            shutil.copyfile(source / row["file_name"], tmp / row["file_name"])
        with (tmp / "metadata.jsonl").open("w", encoding="utf-8") as handle:
            for row in chosen:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if (target / "LICENSE").exists():
            shutil.copyfile(target / "LICENSE", tmp / "LICENSE")
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(rows: list[dict], chosen: list[dict]) -> str:
    """Per-category counts (full set vs subset) for the data card."""
    full: dict[str, int] = defaultdict(int)
    subset: dict[str, int] = defaultdict(int)
    for row in rows:
        full[row["category"]] += 1
    for row in chosen:
        subset[row["category"]] += 1
    lines = ["| category | full set | embedded subset |", "| --- | ---: | ---: |"]
    for name in sorted(full, key=lambda n: (-full[n], n)):
        lines.append(f"| {name} | {full[name]:,} | {subset[name]} |")
    lines.append(f"| **total** | **{len(rows):,}** | **{len(chosen)}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the full noto-emoji-64/train folder")
    parser.add_argument("--target", type=Path, default=TARGET, help="where the subset goes")
    parser.add_argument("--total", type=int, default=1000, help="images in the subset")
    parser.add_argument("--min_per_category", type=int, default=20, help="smallest share of any category")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-category draws")
    args = parser.parse_args(argv)
    if not (args.source / "metadata.jsonl").exists():
        parser.error(f"--source {args.source} has no metadata.jsonl")
    rows = read_rows(args.source)
    chosen = select(rows, args.total, args.min_per_category, args.seed)
    write_subset(args.source, chosen, args.target)
    size = sum(p.stat().st_size for p in args.target.iterdir())
    print(f"wrote {len(chosen)} images ({size / 1e6:.2f} MB) to {args.target}\n")
    print(markdown_table(rows, chosen))


if __name__ == "__main__":
    main()
