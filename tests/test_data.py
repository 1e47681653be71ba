"""Tests for crispdiff.data.loading: decoding recipe, sources, the uint8 cache, batching and bad-input errors."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crispdiff.core.config import DataConfig
from crispdiff.data.loading import DataError, embedded_dataset_dir, load_images


def _config(tmp_path: Path, folder: Path | None = None, **overrides) -> DataConfig:
    """A DataConfig that caches under tmp_path and loads ``folder`` at 32 px with the nearest filter."""
    values = dict(
        train_data_dir=str(folder) if folder is not None else None,
        cache_dir=str(tmp_path / "cache"),
        resolution=32,
        interpolation="nearest",
        min_image_size=8,
    )
    values.update(overrides)
    return DataConfig(**values)


def _load(config: DataConfig, **kwargs):
    """load_images without a progress bar."""
    return load_images(config, show_progress=False, **kwargs)


def _solid(color: tuple[int, ...], size=(32, 32), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _asymmetric(size: int = 32) -> Image.Image:
    """Left half black, right half white: a horizontal flip is easy to see."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, size // 2 :] = 255
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Decoding recipe
# ----------------------------------------------------------------------------------------------------------------------


def _rgba_test_image() -> Image.Image:
    """Row 0-9 fully transparent (with green hidden under it), 10-19 half-transparent red, 20-31 opaque blue."""
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[:10] = (0, 255, 0, 0)
    pixels[10:20] = (255, 0, 0, 128)
    pixels[20:] = (0, 0, 255, 255)
    return Image.fromarray(pixels, "RGBA")


@pytest.mark.parametrize(
    ("background", "bg_rgb"), [("white", (255, 255, 255)), ("#204060", (32, 64, 96)), ("black", (0, 0, 0))]
)
def test_rgba_is_composited_onto_background(tmp_path, folder, background, bg_rgb):
    _rgba_test_image().save(folder / "a.png")
    data = _load(_config(tmp_path, folder, background=background))
    image = data.center_crops()[0].permute(1, 2, 0).numpy().astype(int)
    assert image.shape == (32, 32, 3)
    assert (image[:10] == bg_rgb).all(), "fully transparent pixels must become the background, not hidden green"
    expected_half = [round((c * 128 + b * 127) / 255) for c, b in zip((255, 0, 0), bg_rgb)]
    assert (np.abs(image[10:20] - expected_half) <= 1).all()
    assert (image[20:] == (0, 0, 255)).all()


def test_la_is_composited(tmp_path, folder):
    pixels = np.zeros((32, 32, 2), dtype=np.uint8)
    pixels[:, :16] = (0, 0)  # transparent black -> white
    pixels[:, 16:] = (50, 255)  # opaque dark gray
    Image.fromarray(pixels, "LA").save(folder / "la.png")
    image = _load(_config(tmp_path, folder)).center_crops()[0]
    assert (image[:, :, :16] == 255).all()
    assert (image[:, :, 16:] == 50).all()


def test_palette_with_transparency(tmp_path, folder):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * (254 * 3))
    img.paste(1, (0, 0, 32, 16))  # top half index 1 (red), bottom half index 0 (transparent black)
    img.save(folder / "p.png", transparency=0)
    assert Image.open(folder / "p.png").mode == "P"
    image = _load(_config(tmp_path, folder)).center_crops()[0].permute(1, 2, 0).numpy()
    assert (image[:16] == (200, 10, 10)).all()
    assert (image[16:] == 255).all(), "the transparent palette entry must become the white background"


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, folder):
    values = np.zeros((32, 32), dtype=np.uint16)
    values[:, 8:16] = 32768
    values[:, 16:24] = 65535
    values[:, 24:] = 1000
    Image.fromarray(values).save(folder / "g16.png")
    assert Image.open(folder / "g16.png").mode in ("I;16", "I")
    image = _load(_config(tmp_path, folder)).center_crops()[0]
    assert (image[:, :, :8] == 0).all()
    assert (image[:, :, 8:16] == 128).all()
    assert (image[:, :, 16:24] == 255).all()
    assert (image[:, :, 24:] == 4).all(), "1000/65535*255 = 3.9 -> 4, not clipped to 255"
    assert (image[0] == image[1]).all() and (image[1] == image[2]).all()


def test_cmyk_and_1bit_become_rgb(tmp_path, folder):
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    Image.new("1", (32, 32), 1).save(folder / "one.png")
    data = _load(_config(tmp_path, folder))
    crops = data.center_crops()
    assert crops.shape == (2, 3, 32, 32)
    assert (crops >= 250).all(), "white CMYK and a white 1-bit image stay white"


def test_short_side_resized_and_random_crop_covers_long_side(tmp_path, folder):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :] * 3  # a horizontal ramp shows where the crop is
    Image.fromarray(pixels).save(folder / "wide.png")
    data = _load(_config(tmp_path, folder))
    assert data.stored_image(0).shape == (32, 64, 3)
    generator = torch.Generator().manual_seed(0)
    lefts = {float(data.batch([0] * 16, generator)[j, 0, 0, 0]) for j in range(16)}
    assert len(lefts) > 3, "random crops of a wide image start at different columns"
    center = _load(_config(tmp_path, folder, center_crop=True))
    assert center.stored_image(0).shape == (32, 32, 3), "centre-crop mode stores only the square"
    batch = center.batch([0], torch.Generator().manual_seed(1))
    expected = center.center_crops()[0].float() / 127.5 - 1
    assert torch.allclose(batch[0], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_files_are_skipped_with_one_warning(tmp_path, folder):
    for i in range(3):
        _solid((i * 50, 0, 0)).save(folder / f"ok{i}.png")
    good = (folder / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _load(_config(tmp_path, folder))
    assert len(data) == 3 and data.num_skipped == 2
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1, messages
    assert "2" in messages[0] and "truncated.png" in messages[0] and "garbage.png" in messages[0]


def test_all_files_unreadable_is_an_error(tmp_path, folder):
    (folder / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 images"):
        _load(_config(tmp_path, folder))


def test_empty_folder_error_names_path_and_flag(tmp_path, folder):
    (folder / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="--train_data_dir") as info:
        _load(_config(tmp_path, folder))
    assert str(folder) in str(info.value)


def test_missing_folder_error_names_path_and_flag(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="--train_data_dir") as info:
        _load(_config(tmp_path, missing))
    assert str(missing) in str(info.value)


def test_too_small_images_are_skipped_and_counted_with_unreadable_ones(tmp_path, folder):
    """One 20x6 icon (and one broken file) among good images must not stop the run: skipped, named, logged."""
    from crispdiff.core.config import TrainConfig

    for i in range(3):
        _solid((i, 2, 3)).save(folder / f"fine{i}.png")
    _solid((1, 2, 3), size=(20, 6)).save(folder / "tiny.png")
    (folder / "broken.png").write_bytes(b"nope")
    output_dir = tmp_path / "run"
    config = TrainConfig(
        train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"), resolution=32, output_dir=str(output_dir)
    )
    config.min_image_size = 8
    for attempt in ("decoded", "from the cache"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = _load(config)
        messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert len(data) == 3 and data.num_skipped == 2, attempt
        assert len(messages) == 1, (attempt, messages)
        assert "1 unreadable" in messages[0] and "1 under --min_image_size 8" in messages[0], messages[0]
        assert "tiny.png" in messages[0] and "broken.png" in messages[0]
        log = output_dir / "skipped_images.txt"
        assert str(log) in messages[0]
        assert log.read_text().splitlines() == [
            "broken.png (unreadable)",
            "tiny.png (20x6, under --min_image_size 8)",
        ]
    with pytest.warns(UserWarning, match="upscaled"):
        assert len(_load(_config(tmp_path, folder, min_image_size=4))) == 4


def test_every_image_too_small_is_an_error_naming_the_flag(tmp_path, folder):
    _solid((1, 2, 3), size=(20, 6)).save(folder / "tiny.png")
    (folder / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="--min_image_size") as info:
        _load(_config(tmp_path, folder))
    assert "none of the 2 images" in str(info.value) and "tiny.png (20x6" in str(info.value)


def test_upscaled_images_warn(tmp_path, folder):
    _solid((9, 9, 9), size=(16, 16)).save(folder / "small.png")
    with pytest.warns(UserWarning, match="upscaled"):
        data = _load(_config(tmp_path, folder))
    assert data.center_crops().shape == (1, 3, 32, 32)


def test_bad_background_names_flag(tmp_path, folder):
    _solid((1, 2, 3)).save(folder / "a.png")
    with pytest.raises(DataError, match="--background"):
        _load(_config(tmp_path, folder, background="not-a-colour"))


def test_caption_column_missing_names_flag_and_columns(tmp_path, folder):
    _solid((1, 2, 3)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="--caption_column") as info:
        _load(_config(tmp_path, folder, caption_column="caption"))
    assert "text" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# Metadata and other sources
# ----------------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gray": (128, 128, 128)}


def test_metadata_captions_stay_aligned_when_files_are_skipped(tmp_path, folder):
    (folder / "sub").mkdir()
    names = {"red": "b.png", "green": "sub/a.png", "blue": "c.png", "gray": "a.png"}
    for colour, name in names.items():
        _solid(COLOURS[colour]).save(folder / name)
    (folder / "aa_broken.png").write_bytes(b"broken")
    rows = [{"file_name": name, "text": f"a {colour} square", "colour": colour} for colour, name in names.items()]
    rows.append({"file_name": "aa_broken.png", "text": "broken", "colour": "none"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    with pytest.warns(UserWarning, match="skipped 1"):
        data = _load(_config(tmp_path, folder, caption_column="text"))
    assert len(data) == 4 and len(data.captions) == 4 and len(data.metadata) == 4
    crops = data.center_crops()
    for i, (caption, row) in enumerate(zip(data.captions, data.metadata)):
        assert caption == f"a {row['colour']} square"
        assert tuple(crops[i, :, 0, 0].tolist()) == COLOURS[row["colour"]]
    assert [row["file_name"] for row in data.metadata] == ["a.png", "b.png", "c.png", "sub/a.png"]


def _subset(config: DataConfig, seed: int) -> list[int]:
    """The grey levels (= file numbers) of the images --max_train_samples kept with this --seed."""
    config.seed = seed  # a training config's LoopConfig field; a bare DataConfig draws with seed 0
    return _load(config).center_crops()[:, 0, 0, 0].tolist()


def test_max_train_samples_is_a_random_subset_drawn_with_the_seed(tmp_path, folder):
    """As diffusers' shuffle(seed).select(range(N)): the first N files in order would be a biased sample."""
    for i in range(10):
        _solid((i, i, i)).save(folder / f"{i}.png")
    subsets = {seed: _subset(_config(tmp_path, folder, max_train_samples=3), seed) for seed in range(4)}
    for seed, subset in subsets.items():
        assert len(set(subset)) == 3 and set(subset) <= set(range(10)) and subset == sorted(subset)
        assert _subset(_config(tmp_path, folder, max_train_samples=3), seed) == subset  # the seed decides it
    assert len({tuple(subset) for subset in subsets.values()}) > 1
    assert [0, 1, 2] not in subsets.values()
    assert _subset(_config(tmp_path, folder, max_train_samples=10), 0) == list(range(10))


def test_max_train_samples_of_a_dataset_is_a_random_subset_too(tmp_path):
    path = _save_hf_dataset(tmp_path)
    first = [tuple(c) for c in list(COLOURS.values())[:2]]
    kept = []
    for seed in (0, 1):
        config = _config(tmp_path, dataset_name=str(path), max_train_samples=2)
        config.seed = seed
        crops = _load(config).center_crops()
        kept.append([tuple(crops[i, :, 5, 5].tolist()) for i in range(len(crops))])
    assert all(len(colours) == 2 and set(colours) <= set(COLOURS.values()) for colours in kept)
    assert any(colours != first for colours in kept)


def _save_hf_dataset(tmp_path: Path, image_column: str = "image") -> Path:
    import datasets

    images = [_solid(COLOURS[c]) for c in COLOURS]
    ds = datasets.Dataset.from_dict(
        {image_column: images, "text": [f"a {c} square" for c in COLOURS]},
        features=datasets.Features({image_column: datasets.Image(), "text": datasets.Value("string")}),
    )
    path = tmp_path / "saved"
    ds.save_to_disk(str(path))
    return path


def test_dataset_name_saved_to_disk(tmp_path):
    path = _save_hf_dataset(tmp_path)
    data = _load(_config(tmp_path, dataset_name=str(path), caption_column="text"))
    assert len(data) == 4
    assert data.captions == [f"a {c} square" for c in COLOURS]
    assert data.metadata == [{"text": f"a {c} square"} for c in COLOURS]
    crops = data.center_crops()
    assert [tuple(crops[i, :, 5, 5].tolist()) for i in range(4)] == list(COLOURS.values())
    assert _load(_config(tmp_path, dataset_name=str(path))).cache_hit


def test_dataset_name_local_imagefolder(tmp_path):
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for i in range(3):
        _solid((i * 40, 0, 0), size=(40, 40)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n" for i in range(3))
    )
    data = _load(_config(tmp_path, dataset_name=str(folder.parent), caption_column="text"))
    assert data.captions == ["t0", "t1", "t2"]
    assert data.center_crops()[:, 0, 0, 0].tolist() == [0, 40, 80]


def test_dataset_name_wins_over_train_data_dir_which_picks_a_folder_inside_it(tmp_path, monkeypatch):
    """diffusers' scripts use the dataset when both flags are given (train_text_to_image_lora.py passes
    --train_data_dir as load_dataset's data_dir); the dataset used to be dropped for the folder."""
    root = tmp_path / "imagefolder"
    for sub, count, red in (("a", 2, 0), ("b", 3, 100)):
        (root / sub).mkdir(parents=True)
        for i in range(count):
            _solid((red + i, 0, 0)).save(root / sub / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()  # a folder of the same name beside the dataset, with other images
    _solid((250, 250, 250)).save(tmp_path / "a" / "x.png")
    both = _load(_config(tmp_path, dataset_name=str(root), train_data_dir="a"))
    assert sorted(both.center_crops()[:, 0, 0, 0].tolist()) == [0, 1]
    assert sorted(_load(_config(tmp_path, dataset_name=str(root))).center_crops()[:, 0, 0, 0].tolist()) == [
        0, 1, 100, 101, 102
    ]  # fmt: skip
    assert _load(_config(tmp_path, train_data_dir="a")).center_crops()[:, 0, 0, 0].tolist() == [250]
    with pytest.raises(DataError, match="--train_data_dir a with --dataset_name .*save_to_disk"):
        _load(_config(tmp_path, dataset_name=str(_save_hf_dataset(tmp_path)), train_data_dir="a"))


def test_unreachable_hub_dataset_names_flag(tmp_path):
    with pytest.raises(DataError, match="--dataset_name"):
        _load(_config(tmp_path, dataset_name="nobody/no-such-dataset-crispdiff"))


def test_dataset_wrong_image_column_names_flag_and_columns(tmp_path):
    path = _save_hf_dataset(tmp_path, image_column="img")
    with pytest.raises(DataError, match="--image_column") as info:
        _load(_config(tmp_path, dataset_name=str(path)))
    assert "'img'" in str(info.value) and "'text'" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------------


def _three_images(folder: Path) -> None:
    """An RGBA image and two solid ones (0.png, 1.png, 2.png)."""
    _rgba_test_image().save(folder / "0.png")
    _solid(COLOURS["green"]).save(folder / "1.png")
    _solid(COLOURS["blue"]).save(folder / "2.png")


def test_cache_is_reused_without_decoding(tmp_path, folder):
    _three_images(folder)
    config = _config(tmp_path, folder)
    first = _load(config)
    assert not first.cache_hit
    pixel_file = first.cache_path / "chunks" / "000000.bin"
    stamp = pixel_file.stat().st_mtime_ns
    # Overwrite a source file with garbage of the same size and mtime: only a load that decodes nothing still
    # returns the original pixels (a decoding load would skip the garbage file).
    target = folder / "1.png"
    stat = target.stat()
    target.write_bytes(b"\0" * stat.st_size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = _load(config)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert pixel_file.stat().st_mtime_ns == stamp
    assert torch.equal(first.center_crops(), second.center_crops())
    assert all(isinstance(m, np.memmap) for m in second._pixels._maps.values()), "memory-mapped, not read into RAM"


def test_cache_rebuilt_when_preprocessing_or_files_change(tmp_path, folder):
    _three_images(folder)
    base = _load(_config(tmp_path, folder))
    for change in (
        dict(resolution=16),
        dict(background="black"),
        dict(interpolation="bicubic"),
        dict(center_crop=True),
    ):
        other = _load(_config(tmp_path, folder, **change))
        assert not other.cache_hit and other.cache_path != base.cache_path, change
    _solid((7, 7, 7)).save(folder / "1.png")
    os.utime(folder / "1.png", ns=(1, 1))
    changed = _load(_config(tmp_path, folder))
    assert not changed.cache_hit and changed.cache_path != base.cache_path
    assert changed.center_crops()[1, 0, 0, 0] == 7


@pytest.mark.parametrize("damage", ["truncate_pixels", "zero_pixels", "flip_a_bit", "bad_header", "bad_index"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, folder, damage):
    """Truncated, zero-filled (what a power cut can leave: the right size, no data) or bit-flipped pixels, a broken
    header or index: each is detected at load (the chunk file's size or time, the manifest's checksum), warned about
    once and rebuilt to the same images."""
    _three_images(folder)
    config = _config(tmp_path, folder)
    original = _load(config).center_crops()
    cache = _load(config).cache_path
    pixels = cache / "chunks" / "000000.bin"
    if damage == "truncate_pixels":
        with pixels.open("r+b") as handle:
            handle.truncate(100)
    elif damage == "zero_pixels":
        pixels.write_bytes(bytes(pixels.stat().st_size))
    elif damage == "flip_a_bit":
        data = bytearray(pixels.read_bytes())
        data[len(data) // 2] ^= 1
        pixels.write_bytes(bytes(data))
    elif damage == "bad_header":
        (cache / "header.json").write_text("{not json")
    else:
        np.save(cache / "index.npy", np.zeros((2, 4), dtype=np.int64))
    with pytest.warns(UserWarning, match="damaged or stale"):
        rebuilt = _load(config)
    assert not rebuilt.cache_hit
    assert torch.equal(rebuilt.center_crops(), original)
    assert _load(config).cache_hit
    assert not [p for p in cache.rglob(".*")], "no temporary files left behind"


def test_cache_dir_env_override(tmp_path, folder, monkeypatch):
    _three_images(folder)
    monkeypatch.setenv("CRISPDIFF_CACHE", str(tmp_path / "env-cache"))
    data = _load(replace(_config(tmp_path, folder), cache_dir=None))
    assert data.cache_path.is_relative_to(tmp_path / "env-cache" / "images")


# ----------------------------------------------------------------------------------------------------------------------
# Batching and augmentation
# ----------------------------------------------------------------------------------------------------------------------


def test_batch_shape_range_and_determinism(tmp_path, folder):
    _three_images(folder)
    data = _load(_config(tmp_path, folder, random_flip=True, color_jitter=0.1, blur_prob=0.5))
    generator = torch.Generator().manual_seed(123)
    state = generator.get_state()
    indices = torch.tensor([0, 1, 2, 1, 0, 2, 2, 0])
    first = data.batch(indices, generator)
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    after_first = generator.get_state()
    generator.set_state(state)
    again = data.batch(indices, generator)
    assert torch.equal(first, again), "same generator state -> bit-identical batch"
    assert torch.equal(generator.get_state(), after_first)
    assert not torch.equal(data.batch(indices, generator), first), "the generator advanced"


def test_device_resident_images_give_the_same_batches_as_the_memory_map(tmp_path, folder):
    """keep_on_device (used on GPUs; forced onto the CPU here) gathers the same random crops, flips, jitter and blur
    bit for bit as the memory-map path, so resuming a run on either path reproduces the same data."""
    rng = np.random.default_rng(0)
    for i in range(5):  # 48x32 images at 32 px (stored as they are): random crops have room to move
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    options = dict(resolution=32, random_flip=True, color_jitter=0.1, blur_prob=0.5)
    mapped = _load(_config(tmp_path, folder, **options))
    resident = _load(_config(tmp_path, folder, **options))
    assert not resident.keep_on_device("cpu", max_bytes=5 * 32 * 48 * 3 - 1), "must respect the memory budget"
    assert resident.resident_device is None
    assert resident.keep_on_device("cpu", max_bytes=5 * 32 * 48 * 3)
    assert resident.resident_device == torch.device("cpu")
    indices = torch.tensor([4, 0, 3, 3, 1, 2, 0, 4, 2, 1])
    a = mapped.batch(indices, torch.Generator().manual_seed(9))
    b = resident.batch(indices, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert len({tuple(x[:, :2, :2].flatten().tolist()) for x in a}) > 5, "the crops must differ"


def test_images_of_different_sizes_stay_in_the_memory_map(tmp_path, folder):
    _solid((1, 2, 3), size=(32, 32)).save(folder / "square.png")
    _solid((1, 2, 3), size=(48, 32)).save(folder / "wide.png")
    data = _load(_config(tmp_path, folder))
    assert not data.keep_on_device("cpu", max_bytes=10**9) and data.resident_device is None
    assert data.batch([0, 1], torch.Generator()).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    ("options", "draws_per_image"),
    [
        (dict(), 7),
        (dict(random_flip=True, color_jitter=0.2, blur_prob=1.0), 7),
        (dict(color_remap_prob=0.5), 14),
        (dict(random_flip=True, color_jitter=0.2, blur_prob=1.0, color_remap_prob=1.0), 14),
    ],
)
def test_generator_consumption_is_fixed_by_the_options(tmp_path, folder, options, draws_per_image):
    """A batch draws a fixed count of numbers, whatever was drawn (what makes a resumed data stream exact): 7 per
    image, 7 more with --color_remap_prob."""
    _three_images(folder)
    data = _load(_config(tmp_path, folder, **options))
    generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    data.batch([0, 1, 2], generator)
    torch.rand(3, draws_per_image, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_flips_happen_only_when_enabled(tmp_path, folder):
    _asymmetric().save(folder / "half.png")
    plain = _load(_config(tmp_path, folder)).batch([0] * 32, torch.Generator().manual_seed(0))
    assert (plain[:, :, :, 0] == -1).all(), "no flip: left column stays black"
    flipped = _load(_config(tmp_path, folder, random_flip=True)).batch([0] * 32, torch.Generator().manual_seed(0))
    left_white = (flipped[:, 0, 0, 0] == 1).sum().item()
    assert 4 < left_white < 28, f"about half the copies should be flipped, got {left_white}/32"
    assert torch.equal(flipped[flipped[:, 0, 0, 0] == 1], plain[flipped[:, 0, 0, 0] == 1].flip(3))


def test_color_jitter_and_blur_are_gentle(tmp_path, folder):
    _asymmetric().save(folder / "half.png")
    _solid((100, 150, 200)).save(folder / "solid.png")
    base = _load(_config(tmp_path, folder)).batch([0, 1] * 8, torch.Generator().manual_seed(0))
    jitter = _load(_config(tmp_path, folder, color_jitter=0.05)).batch([0, 1] * 8, torch.Generator().manual_seed(0))
    assert not torch.equal(base, jitter)
    assert (jitter - base).abs().max() < 0.25, "5% jitter moves values by a few percent at most"
    blurred = _load(_config(tmp_path, folder, blur_prob=1.0, blur_sigma=0.7)).batch([0], torch.Generator())
    edge = blurred[0, 0, 0, 14:18]
    assert edge[0] < -0.9 and edge[-1] > 0.9 and -0.9 < edge[1] < edge[2] < 0.9, edge
    assert torch.allclose(blurred.mean(), base[0].mean(), atol=1e-3), "blur keeps the mean"


def test_color_remap_sends_black_and_white_to_random_levels(tmp_path, folder):
    """--color_remap_prob: chosen images get each channel's 0 and 1 moved to random levels (inverted when low > high),
    others are untouched; the black and white halves stay flat fields, so shapes and edges survive."""
    _asymmetric().save(folder / "half.png")
    base = _load(_config(tmp_path, folder)).batch([0] * 32, torch.Generator().manual_seed(0))
    remapped = _load(_config(tmp_path, folder, color_remap_prob=0.5)).batch([0] * 32, torch.Generator().manual_seed(0))
    changed = [not torch.equal(r, b) for r, b in zip(remapped, base)]
    assert 4 < sum(changed) < 28, f"about half should be remapped, got {sum(changed)}/32"
    black, white = base[0] == -1, base[0] == 1
    for image in remapped:
        assert image.min() >= -1 and image.max() <= 1
        for channel in range(3):
            assert image[channel][black[channel]].unique().numel() == 1, "the black half stays one flat level"
            assert image[channel][white[channel]].unique().numel() == 1, "the white half stays one flat level"
    backgrounds = {tuple(image[:, 0, -1].tolist()) for image in remapped}
    assert len(backgrounds) > 5, "white goes to many different colours"
    assert (remapped[:, :, 0, 0] > remapped[:, :, 0, -1]).any(), "some channels are inverted"
    with pytest.raises(DataError, match="--color_remap_prob"):
        _load(_config(tmp_path, folder, color_remap_prob=1.5))


def test_for_latents_stores_center_crops_only_with_center_crop(tmp_path, folder):
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, :, 0] = np.arange(64, dtype=np.uint8)  # red = column
    Image.fromarray(wide).save(folder / "wide.png")
    data = _load(_config(tmp_path, folder, center_crop=True), for_latents=True)
    assert data.stored_image(0).shape == (32, 32, 3) and not data.has_crop_slack()
    assert data.center_crops(torch.tensor([0, 0])).shape == (2, 3, 32, 32)
    full = _load(_config(tmp_path, folder), for_latents=True)  # random crops: the whole short-side-resized image
    assert full.stored_image(0).shape == (32, 64, 3) and full.has_crop_slack()
    assert full.crops_at(0.0)[0, 0, 0, 0] == 0 and full.crops_at(1.0)[0, 0, 0, 0] == 32  # left and right edges
    assert torch.equal(full.crops_at(0.5), data.center_crops())


# ----------------------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------------------


def test_real_emoji_load_with_captions(tmp_path, emoji_dir):
    rows = [json.loads(line) for line in (emoji_dir / "metadata.jsonl").read_text().splitlines()][::190][:20]
    folder = tmp_path / "emoji"
    folder.mkdir()
    for row in rows:
        shutil.copy(emoji_dir / row["file_name"], folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _load(_config(tmp_path, folder, resolution=64, interpolation="lanczos", caption_column="text"))
    assert len(data) == 20 and data.num_skipped == 0
    by_name = {r["file_name"]: r["text"] for r in rows}
    assert data.captions == [by_name[row["file_name"]] for row in data.metadata]
    crops = data.center_crops()
    assert crops.shape == (20, 3, 64, 64)
    assert (crops[:, :, 0, 0] == 255).all(), "transparent emoji corners become white"
    assert crops.float().std() > 30, "real content, not a blank canvas"


def test_embedded_default_dataset(tmp_path):
    if not (embedded_dataset_dir() / "metadata.jsonl").exists():
        pytest.skip("the embedded dataset has not been generated yet (data_cards/make_noto_subset.py)")
    data = _load(DataConfig(cache_dir=str(tmp_path / "cache"), caption_column="text"))
    assert 0 < len(data) <= 1000 and data.resolution == 64
    assert "embedded" in data.source
    assert len({row["category"] for row in data.metadata}) >= 9
    batch = data.batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert batch.shape == (8, 3, 64, 64) and batch.min() >= -1 and batch.max() <= 1
