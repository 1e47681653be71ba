"""Image sources before decoding: a folder (recursive, optional imagefolder metadata), a ``datasets`` dataset, or the
embedded Noto emoji; each gives a stable identity for the cache key, names, metadata rows and a way to fetch items."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crispdiff.core.config import AUTO_CLASS_COLUMN, NO_CLASS_COLUMN
from crispdiff.core.errors import DataError

#: File extensions picked up from ``--train_data_dir`` (lower-case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def embedded_dataset_dir() -> Path:
    """The folder of the Noto Emoji subset shipped inside the package (used when no data flag is given)."""
    return Path(__file__).resolve().parents[1] / "assets" / "noto-emoji-64"


def cache_root(config: Any = None) -> Path:
    """Where crispdiff caches go: ``--cache_dir``, else ``$CRISPDIFF_CACHE``, else ``~/.cache/crispdiff``."""
    configured = getattr(config, "cache_dir", None) if config is not None else None
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CRISPDIFF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "crispdiff"


# ----------------------------------------------------------------------------------------------------------------------
# Sources: each yields a stable identity (for the cache key), decodable items, names and metadata rows
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """A list of images before decoding: enough to build the cache key without reading any pixels."""

    description: str
    identity: str  # changes whenever the images change (file stats or dataset fingerprint)
    names: list[str]  # human-readable name per item, for warnings and errors
    metadata: list[dict[str, Any]] | None
    captions: list[str] | None
    fetch: Callable[[int, int], list[Any]]  # items[start:end] as things `_open` accepts
    columns: list[str] | None = None  # metadata columns, for "available columns" in errors

    def __len__(self) -> int:
        return len(self.names)


def _read_metadata_file(folder: Path) -> list[dict[str, Any]] | None:
    """Rows of ``metadata.jsonl`` (or ``metadata.csv``) at the folder root, as in datasets' imagefolder."""
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = []
        with jsonl.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{jsonl}:{line_no} is not valid JSON ({err.msg}) (--train_data_dir)") from err
        return rows
    if csv_path.exists():
        with csv_path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    return None


@dataclass
class ImageFile:
    """An image file found below a folder, with what the cache key hashes of it."""

    name: str  # relative to the folder, with forward slashes
    path: str
    size: int
    mtime_ns: int


def scan_image_files(folder: Path) -> list[ImageFile]:
    """All image files below ``folder`` (recursive; hidden files and folders, and linked folders, left out), sorted
    by name for a stable order across machines, each with the size and time the cache key hashes.

    One ``os.scandir`` walk and one ``stat`` per file: every process lists the folder at every start, so at 100,000
    files pathlib's per-path overhead would be most of a cache hit's start-up.
    """
    found: list[ImageFile] = []
    pending = [("", str(folder))]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((f"{prefix}{entry.name}/", entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    stat = entry.stat()
                    found.append(ImageFile(prefix + entry.name, entry.path, stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda file: file.name)


def list_image_files(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted for a stable order across machines."""
    return [Path(file.path) for file in scan_image_files(folder)]


def _check_caption_column(column: str | None, available: Sequence[str], where: str) -> None:
    if column is not None and column not in available:
        raise DataError(
            f"--caption_column {column!r} is not a column of {where}; available columns: {sorted(available)}"
        )


def metadata_class_column(config: Any) -> str | None:
    """The metadata column ``--class_column`` names; None for no flag, ``none``, or ``auto`` (classes from pixels)."""
    column = getattr(config, "class_column", None)
    return None if column in (None, "", NO_CLASS_COLUMN, AUTO_CLASS_COLUMN) else column


def _check_class_column(column: str | None, available: Sequence[str] | None, where: str) -> None:
    """--class_column must name a metadata column; say which ones there are (or that there is no metadata)."""
    if column is None:
        return
    if available is None:
        raise DataError(
            f"--class_column {column!r} was given but {where} has no metadata.jsonl / metadata.csv to read classes from"
        )
    if column not in available:
        raise DataError(f"--class_column {column!r} is not a column of {where}; available columns: {sorted(available)}")


def max_samples_subset(count: int, config: Any) -> list[int] | None:
    """The indices ``--max_train_samples`` keeps of ``count`` items, in source order; None to keep them all.

    A random subset drawn with ``--seed`` (diffusers' ``shuffle(seed).select(range(N))``), not the first N: file order
    groups similar images (neighbouring emoji codepoints, one photo session), so the first N are a biased sample.
    """
    limit = config.max_train_samples
    if limit is None or limit >= count:
        return None
    order = np.random.default_rng(int(getattr(config, "seed", 0))).permutation(count)
    return sorted(order[: max(0, int(limit))].tolist())


def _folder_source(folder: Path, config: Any, flag: str, description: str | None = None) -> ImageSource:
    """A folder of images (recursive) with an optional imagefolder-style metadata file."""
    if not folder.exists():
        raise DataError(f"{flag} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder")
    files = scan_image_files(folder)
    if not files:
        raise DataError(
            f"no images found in {folder} ({flag}); looked recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    subset = max_samples_subset(len(files), config)
    if subset is not None:
        files = [files[i] for i in subset]
    names = [file.name for file in files]
    rows = _read_metadata_file(folder)
    metadata = captions = columns = None
    if rows is not None:
        if rows and "file_name" not in rows[0]:
            raise DataError(f"the metadata file in {folder} has no 'file_name' column ({flag})")
        by_name = {str(row.get("file_name")): row for row in rows}
        columns = sorted({key for row in rows for key in row}) if rows else ["file_name"]
        metadata = [dict(by_name.get(name, {"file_name": name})) for name in names]
        _check_caption_column(config.caption_column, columns, f"the metadata file in {folder}")
        if config.caption_column is not None:
            captions = [str(row.get(config.caption_column) or "") for row in metadata]
    elif config.caption_column is not None:
        raise DataError(
            f"--caption_column {config.caption_column!r} was given but {folder} has no metadata.jsonl / metadata.csv"
        )
    _check_class_column(metadata_class_column(config), columns, f"the metadata of {folder}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.size}\0{file.mtime_ns}\n".encode())
    for meta in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if meta.exists():
            stat = meta.stat()
            digest.update(f"{meta.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return ImageSource(
        description=description or f"folder {folder} ({len(files)} image files)",
        identity=f"folder:{folder.resolve()}:{digest.hexdigest()}",
        names=names,
        metadata=metadata,
        captions=captions,
        fetch=lambda start, end: [Path(file.path) for file in files[start:end]],
        columns=columns,
    )


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def open_hf_dataset(config: Any, streaming: bool = False) -> Any:
    """Load ``--dataset_name`` with the ``datasets`` library as a single ``train`` split; ``streaming``: as an
    ``IterableDataset`` read as it is iterated (``load_dataset(..., streaming=True)``; a ``save_to_disk`` folder
    through ``to_iterable_dataset``), the same call for a Hub id and a local folder."""
    import datasets

    name = config.dataset_name
    local = Path(name).expanduser()
    data_dir = config.train_data_dir or None
    within = f" with --train_data_dir {data_dir} as its data_dir" if data_dir else ""
    try:
        if local.exists() and is_saved_dataset(local):
            if data_dir:
                raise DataError(
                    f"--train_data_dir {data_dir} with --dataset_name {name}: the dataset is used and --train_data_dir "
                    "names a folder inside it (its data_dir), but a save_to_disk folder has none; drop --train_data_dir"
                )
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" in loaded:
                    loaded = loaded["train"]
                elif len(loaded) == 1:
                    loaded = next(iter(loaded.values()))
                else:
                    raise DataError(f"--dataset_name {name} has splits {list(loaded)} but no 'train' split")
            return loaded.to_iterable_dataset() if streaming else loaded
        cache = str(cache_root(config) / "datasets") if getattr(config, "cache_dir", None) else None
        return datasets.load_dataset(
            str(local) if local.exists() else name,
            config.dataset_config_name,
            data_dir=data_dir,
            split="train",
            cache_dir=cache,
            streaming=streaming,
        )
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(f"could not load --dataset_name {name!r}{within}: {type(err).__name__}: {err}") from err


def _dataset_source(config: Any) -> ImageSource:
    """A ``datasets`` dataset; images are fetched undecoded so that bad files are skipped rather than crashing."""
    import datasets

    ds = open_hf_dataset(config)
    columns = list(ds.column_names)
    if config.image_column not in columns:
        raise DataError(
            f"--image_column {config.image_column!r} is not a column of --dataset_name {config.dataset_name}; "
            f"available columns: {columns}"
        )
    _check_caption_column(config.caption_column, columns, f"--dataset_name {config.dataset_name}")
    class_column = metadata_class_column(config)
    _check_class_column(
        class_column, [c for c in columns if c != config.image_column], f"--dataset_name {config.dataset_name}"
    )
    subset = max_samples_subset(len(ds), config)
    if subset is not None:
        ds = ds.select(subset)
    if len(ds) == 0:
        raise DataError(f"--dataset_name {config.dataset_name} has no rows in its train split")
    if isinstance(ds.features[config.image_column], datasets.Image):
        ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
    other = [c for c in columns if c != config.image_column]
    metadata = ds.select_columns(other).to_list() if other else None
    label_feature = ds.features[class_column] if class_column else None
    if metadata is not None and isinstance(label_feature, datasets.ClassLabel):  # ints -> the dataset's own names
        for row in metadata:
            if row[class_column] is not None and row[class_column] >= 0:  # -1 is datasets' "no label"
                row[class_column] = label_feature.int2str(int(row[class_column]))
            else:
                row[class_column] = None
    captions = [str(row[config.caption_column] or "") for row in metadata] if config.caption_column else None
    image_column = config.image_column
    return ImageSource(
        description=f"dataset {config.dataset_name} ({len(ds)} rows)",
        identity=f"dataset:{config.dataset_name}:{config.dataset_config_name}:{ds._fingerprint}:{len(ds)}",
        names=[f"{config.dataset_name}[{i}]" for i in range(len(ds))],
        metadata=metadata,
        captions=captions,
        fetch=lambda start, end: list(ds[start:end][image_column]),
        columns=other,
    )


def resolve_source(config: Any) -> ImageSource:
    """Pick the source from the flags: ``datasets``, then a folder, then the embedded default.

    With both data flags the dataset is used, as in diffusers' scripts, and ``--train_data_dir`` is the folder inside
    it to load (``load_dataset``'s ``data_dir``, as diffusers' train_text_to_image_lora.py passes it)."""
    if config.dataset_name:
        return _dataset_source(config)
    if config.train_data_dir:
        return _folder_source(Path(config.train_data_dir).expanduser(), config, "--train_data_dir")
    folder = embedded_dataset_dir()
    source = _folder_source(folder, config, "the embedded dataset folder", description="")
    source.description = f"embedded Noto Emoji subset ({len(source)} images, Apache-2.0, {folder})"
    return source
