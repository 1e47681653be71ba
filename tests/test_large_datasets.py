"""Large datasets: caches built in parts by the processes of an ``accelerate launch``, resumed after a kill, and
checked image by image on first read instead of hashed whole at every start; ``--streaming`` from ``datasets``.

Everything runs the real code: decode and encode calls are counted by wrapping the real functions (they still run),
interruptions are raised from those wrappers, and two processes are a real ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crispdiff.data.cache as image_cache
from crispdiff.core.config import DataConfig
from crispdiff.core.errors import DataError
from crispdiff.data.loading import load_images

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:skipped 2 image")  # the two broken files, on every load
REAL_DECODE = image_cache.decode_image
NUM_IMAGES = 100
CHUNK = 16  # 7 chunks: 6 of 16 images and one of 4


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """100 small images of random colours and sizes, two of them broken (skipped, recorded in their chunk)."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        if i in (5, 70):
            (folder / f"{i:03d}.png").write_bytes(b"not a png")
            continue
        height, width = rng.integers(10, 14, 2)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def data_config(folder: Path, cache: Path) -> DataConfig:
    return DataConfig(
        train_data_dir=str(folder), cache_dir=str(cache), resolution=8, interpolation="nearest", min_image_size=4
    )


class Decodes:
    """Records which source items the real ``decode_image`` decodes (from any thread); raises ``Interrupted`` once
    ``fail_after`` items are decoded, as a kill would stop a build."""

    class Interrupted(Exception):
        pass

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None):
        self.names: list[str] = []
        self.fail_after = fail_after
        self._lock = threading.Lock()

        def decode(item, name, recipe):
            with self._lock:
                if self.fail_after is not None and len(self.names) >= self.fail_after:
                    raise Decodes.Interrupted("killed while decoding")
                self.names.append(name)
            return REAL_DECODE(item, name, recipe)

        monkeypatch.setattr(image_cache, "decode_image", decode)


def load(config: DataConfig, **kwargs):
    return load_images(config, show_progress=False, chunk_size=CHUNK, **kwargs)


def image_cache_folder(cache_dir: Path) -> Path:
    """The one image cache folder under a --cache_dir (beside it: its lock file)."""
    (folder,) = [path for path in (cache_dir / "images").iterdir() if path.is_dir()]
    return folder


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a finished cache folder by name, the chunk records without their file times."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        if name.endswith(".json"):
            values = json.loads(path.read_text())
            if name == "header.json":
                values["chunks"] = [size for size, _ in values["chunks"]]
            values.pop("mtime_ns", None)
            files[name] = json.dumps(values, sort_keys=True).encode()
        else:
            files[name] = path.read_bytes()
    return files


# ----------------------------------------------------------------------------------------------------------------------
# The image cache: resumable, checked on first read
# ----------------------------------------------------------------------------------------------------------------------


def test_a_killed_image_cache_build_resumes_without_decoding_the_done_chunks(many_images, tmp_path, monkeypatch):
    """Interrupted in its fourth chunk, the build leaves three finished chunks; the next load decodes only the other
    four (counted), leaves the finished chunk files untouched (same inode and time), and ends with a cache equal, file
    for file, to one built in one go."""
    config = data_config(many_images, tmp_path / "cache")
    with pytest.raises(Decodes.Interrupted):
        Decodes(monkeypatch, fail_after=3 * CHUNK + 5)
        load(config)
    folder = image_cache_folder(tmp_path / "cache")
    done = sorted(int(p.stem) for p in (folder / "chunks").glob("*.json"))
    assert done == [0, 1, 2] and not (folder / "header.json").exists()
    stamps = {c: (folder / "chunks" / f"{c:06d}.bin").stat() for c in done}

    decodes = Decodes(monkeypatch)
    data = load(config)
    expected = [f"{i:03d}.png" for i in range(3 * CHUNK, NUM_IMAGES)]
    assert sorted(decodes.names) == expected, "only the chunks without a record were decoded again"
    for chunk, before in stamps.items():
        after = (folder / "chunks" / f"{chunk:06d}.bin").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(data) == NUM_IMAGES - 2 and data.num_skipped == 2

    one_go = load(data_config(many_images, tmp_path / "one-go"))
    assert cache_files(one_go.cache_path) == cache_files(folder)
    assert torch.equal(one_go.center_crops(), data.center_crops())


def test_a_load_reads_no_pixels_and_a_damaged_image_is_found_on_first_read(many_images, tmp_path, monkeypatch):
    """A byte flipped in a chunk file whose size and time are kept (so the load's cheap check cannot see it): the
    load reads no pixel; reading an image of another chunk works; reading one of the damaged chunk stops with an
    error naming the chunk file and what to do, and removes it; the next load decodes that chunk alone, and the
    images are the original ones."""
    config = data_config(many_images, tmp_path / "cache")
    original = load(config).center_crops()
    folder = image_cache_folder(tmp_path / "cache")
    target = folder / "chunks" / "000002.bin"
    stat = target.stat()
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    data = load(config)
    assert data.cache_hit and not data._pixels._maps and not data._pixels._check.checked.any(), "no pixel read"
    assert torch.equal(data.center_crops(range(0, 2 * CHUNK - 1)), original[: 2 * CHUNK - 1])
    with pytest.raises(DataError, match=r"image cache chunk .*000002\.bin is damaged.*run again"):
        data.center_crops()
    assert not target.exists()

    decodes = Decodes(monkeypatch)
    with pytest.warns(UserWarning, match="decoding 1 damaged or missing chunk"):
        repaired = load(config)
    assert sorted(decodes.names) == [f"{i:03d}.png" for i in range(2 * CHUNK, 3 * CHUNK)]
    assert torch.equal(repaired.center_crops(), original)


def test_a_chunk_copied_without_its_time_is_checked_once_and_trusted_again(many_images, tmp_path, monkeypatch):
    """A chunk file rewritten with the same bytes (a copy that did not keep times) is checked in full at load, found
    intact, not decoded again, and its new time recorded: the load after it is a plain cache hit."""
    config = data_config(many_images, tmp_path / "cache")
    load(config)
    folder = image_cache_folder(tmp_path / "cache")
    target = folder / "chunks" / "000001.bin"
    target.write_bytes(target.read_bytes())
    decodes = Decodes(monkeypatch)
    with pytest.warns(UserWarning, match="recording it again"):
        assert not load(config).cache_hit
    assert decodes.names == [] and load(config).cache_hit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(script: Path, *args: str) -> str:
    """``accelerate launch`` of ``script`` on two CPU processes (gloo), as the training tests do."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()), str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


#: Run by both processes: load the images, then encode their latents, with the run's Accelerator; record what this
#: rank decoded and encoded.
_BUILD_BOTH_CACHES = """
import json, sys, threading
from pathlib import Path

from accelerate import Accelerator

import crispdiff.data.cache as image_cache
import crispdiff.latent.cache as latent_cache
from crispdiff.core.config import DataConfig
from crispdiff.data.loading import load_images
from crispdiff.latent.vae import load_vae

folder, cache, vae_dir, out = sys.argv[1:5]
accelerator = Accelerator(cpu=True)
decoded, encoded, lock = [], [], threading.Lock()
real_decode, real_encode = image_cache.decode_image, latent_cache._encode_images


def decode(item, name, recipe):
    with lock:
        decoded.append(name)
    return real_decode(item, name, recipe)


def encode(vae, data, start, end, *args):
    encoded.append([start, end])
    return real_encode(vae, data, start, end, *args)


image_cache.decode_image, latent_cache._encode_images = decode, encode
config = DataConfig(train_data_dir=folder, cache_dir=cache, resolution=8, interpolation="nearest", min_image_size=4)
data = load_images(config, show_progress=False, processes=accelerator, chunk_size=16)
first = list(decoded)
again = load_images(config, show_progress=False, processes=accelerator, chunk_size=16)  # a cache hit, together
latents = latent_cache.load_or_build_latent_cache(
    data, load_vae(vae_dir), Path(cache) / "latents", preprocessing={}, random_flip=True, chunk_size=16,
    batch_size=8, show_progress=False, processes=accelerator,
)
record = {
    "decoded": first, "decoded_again": decoded[len(first):], "hit_again": again.cache_hit,
    "crops": data.center_crops().sum(dim=(1, 2, 3)).tolist(), "encoded": encoded,
    "encoded_images": latents.encoded_images, "latents": latents.mean.astype("float64").sum(axis=(1, 2, 3, 4)).tolist(),
}
Path(out, f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow
def test_two_processes_build_the_image_and_latent_caches_in_shares(many_images, tmp_path):
    """Real ``accelerate launch`` on two processes: rank 0 decodes chunks 0, 2, 4, 6 and rank 1 chunks 1, 3, 5, each
    image once; both then read the same images, and the cache equals one built by a single process file for file.
    Loaded again, by both together, it is a cache hit and nobody decodes anything. The latent cache of those 98
    images is then encoded in shares the same way, and equals one encoded by a single process."""
    from tiny_models import tiny_vae

    from crispdiff.latent.cache import load_or_build_latent_cache

    tiny_vae(sample_size=8).save_pretrained(tmp_path / "vae")
    script = tmp_path / "build.py"
    script.write_text(_BUILD_BOTH_CACHES)
    out = tmp_path / "records"
    out.mkdir()
    launch_two(script, str(many_images), str(tmp_path / "cache"), str(tmp_path / "vae"), str(out))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    shares = [sorted(int(name[:3]) // CHUNK for name in rank["decoded"]) for rank in ranks]
    assert sorted(set(shares[0])) == [0, 2, 4, 6] and sorted(set(shares[1])) == [1, 3, 5]
    assert sorted(ranks[0]["decoded"] + ranks[1]["decoded"]) == [f"{i:03d}.png" for i in range(NUM_IMAGES)]
    assert ranks[0]["crops"] == ranks[1]["crops"]
    assert all(rank["hit_again"] and rank["decoded_again"] == [] for rank in ranks)

    single = load(data_config(many_images, tmp_path / "single"))
    folder = image_cache_folder(tmp_path / "cache")
    assert cache_files(folder) == cache_files(single.cache_path)
    assert ranks[0]["crops"] == single.center_crops().sum(dim=(1, 2, 3)).tolist()

    # 98 images in latent chunks of 16: rank 0 encodes chunks 0, 2, 4, 6 (the last holds 2), rank 1 chunks 1, 3, 5
    assert ranks[0]["encoded"] == [[0, 16], [32, 48], [64, 80], [96, 98]]
    assert ranks[1]["encoded"] == [[16, 32], [48, 64], [80, 96]]
    assert ranks[0]["encoded_images"] == ranks[1]["encoded_images"] == NUM_IMAGES - 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process ran
    try:
        from crispdiff.latent.vae import load_vae

        alone = load_or_build_latent_cache(
            single, load_vae(tmp_path / "vae"), tmp_path / "single" / "latents", preprocessing={}, random_flip=True,
            chunk_size=16, batch_size=8, show_progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["latents"] == ranks[1]["latents"] == alone.mean.astype(np.float64).sum(axis=(1, 2, 3, 4)).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# --streaming: a datasets stream (local parquet shards, the same call as a Hub id), no cache
# ----------------------------------------------------------------------------------------------------------------------

STREAM_IMAGES = 40


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory) -> Path:
    """A dataset folder of two parquet shards (as the Hub stores them) with 40 images named s00.png ..., s03.png
    broken; ``load_dataset(folder, streaming=True)`` reads it like a Hub id."""
    import datasets

    folder = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(STREAM_IMAGES):
        data = b"not a png" if i == 3 else _png(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))
        rows.append({"bytes": data, "path": f"s{i:02d}.png"})
    dataset = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    for shard in range(2):
        dataset.shard(2, shard, contiguous=True).to_parquet(str(folder / f"train-{shard:05d}-of-00002.parquet"))
    return folder


def stream_flags(dataset: Path, out: Path, **overrides) -> list[str]:
    flags = {
        "dataset_name": dataset, "streaming": "true", "shuffle_buffer_size": 8, "output_dir": out,
        "cache_dir": out.parent / "cache", "resolution": 16, "base_channels": 8, "channel_mults": "1 2",
        "attention_res": "8", "layers_per_block": 1, "train_batch_size": 4, "max_train_steps": 4,
        "learning_rate": 1e-3, "lr_warmup_steps": 0, "checkpointing_steps": 2, "validation_steps": 0,
        "num_validation_images": 2, "validation_inference_steps": 2, "report_to": "none", "random_flip": "true",
    }  # fmt: skip
    flags.update(overrides)
    return [token for key, value in flags.items() for token in (f"--{key}", *str(value).split())]


class StreamDecodes:
    """The names of the stream's examples the real ``decode_image`` decodes (any thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import crispdiff.data.streaming as streaming

        self.names: list[str] = []
        lock, real = threading.Lock(), streaming.decode_image

        def decode(item, name, recipe):
            with lock:
                self.names.append(name)
            return real(item, name, recipe)

        monkeypatch.setattr(streaming, "decode_image", decode)


def _unet_weights(pipeline: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"))


def test_streaming_trains_from_the_stream_and_resumes_exactly(parquet_dataset, tmp_path, monkeypatch):
    """train_unconditional.py --streaming on a local parquet dataset: no image cache is written; with
    --max_train_samples 6 every image trained on (or measured against) is among the stream's first 6 examples (the
    broken one skipped with a warning), over several passes; a run resumed from its step-2 checkpoint, which holds
    the stream's position, ends with the weights of the run that was not stopped."""
    import shutil

    from crispdiff.core.config import TrainConfig
    from crispdiff.core.flags import parse_config
    from crispdiff.train.unet_trainer import train

    decodes = StreamDecodes(monkeypatch)
    full = tmp_path / "full"
    with pytest.warns(UserWarning, match=r"skipped s03\.png of the stream"):
        train(parse_config(TrainConfig, stream_flags(parquet_dataset, full, max_train_samples=6)))
    first_six = {f"s{i:02d}.png" for i in range(6)}
    trained = decodes.names
    assert set(trained) == first_six and len(trained) > 2 * 6, "several passes over the first 6 examples, no others"
    assert not (tmp_path / "cache" / "images").exists(), "a stream writes no image cache"
    assert json.loads((full / "checkpoint-2" / "process_state_0.json").read_text())["stream"]["taken"] > 0

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train(parse_config(TrainConfig, stream_flags(parquet_dataset, resumed, max_train_samples=6,
                                                 resume_from_checkpoint="latest")))  # fmt: skip
    a, b = _unet_weights(full / "pipeline"), _unet_weights(resumed / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed stream diverged"


STREAM = ["--dataset_name", "some/dataset", "--streaming"]


@pytest.mark.parametrize(
    "script, argv, refusal",
    [
        ("train_unconditional.py", STREAM, "--streaming needs --max_train_steps"),
        ("train_unconditional.py", [*STREAM, "--num_epochs", "2"], "--num_epochs counts passes"),
        ("train_unconditional.py", [*STREAM, "--max_train_steps", "5", "--validation_epochs", "1"], "epoch length"),
        ("train_unconditional.py", [*STREAM, "--max_train_steps", "5", "--class_column", "label"], "its classes"),
        ("train_unconditional.py", [*STREAM, "--time_budget_minutes", "1"], "its probe steps would take batches"),
        ("train_unconditional.py", [*STREAM, "--max_train_steps", "5", "--shuffle_buffer_size", "0"], ">= 1"),
        ("train_transfer.py", [*STREAM, "--pretrained_model_name_or_path", "m"], "--streaming needs --max_train_steps"),
        ("train_latent.py", [*STREAM, "--max_train_steps", "5"], "--streaming is not supported here: train_latent"),
    ],
)
def test_what_a_stream_cannot_give_is_refused_by_name(script, argv, refusal):
    """Epochs and a time budget need a length, classes need the whole data: each refused in one line naming the
    flag; the latent trainer, which encodes every image once, refuses --streaming itself."""
    from test_flag_walk import script_entry

    from crispdiff.core.errors import FlagError
    from crispdiff.core.flags import parse_config

    config_cls, _ = script_entry(script)
    with pytest.raises(FlagError, match=re.escape(refusal)):
        parse_config(config_cls, argv)


def test_streaming_flags_need_a_dataset_and_each_other():
    from crispdiff.core.config import TrainConfig
    from crispdiff.core.errors import FlagError
    from crispdiff.core.flags import parse_config

    with pytest.raises(FlagError, match="--streaming: no effect without --dataset_name"):
        parse_config(TrainConfig, ["--train_data_dir", "images", "--streaming", "--max_train_steps", "5"])
    with pytest.raises(FlagError, match="--shuffle_buffer_size: no effect without --streaming"):
        parse_config(TrainConfig, ["--dataset_name", "some/dataset", "--shuffle_buffer_size", "50"])
    config = parse_config(TrainConfig, ["--dataset_name", "d", "--streaming", "--max_train_steps", "5"])
    assert config.streaming and config.shuffle_buffer_size == 1000


#: Records, per rank, the stream examples the real decode_image decodes, then runs the training script.
_RECORD_STREAM = """
import json, os, runpy, sys, threading
from pathlib import Path

import crispdiff.data.streaming as streaming

record = Path(sys.argv[1]) / f"rank-{os.environ.get('RANK', '0')}.json"
names, lock, real = [], threading.Lock(), streaming.decode_image


def decode(item, name, recipe):
    with lock:
        names.append(name)
    return real(item, name, recipe)


streaming.decode_image = decode
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    record.write_text(json.dumps(names))
"""


@pytest.mark.slow
def test_two_processes_stream_disjoint_shares(parquet_dataset, tmp_path):
    """Real ``accelerate launch`` on two processes with --streaming: each rank trains on its own share of the stream
    (datasets' split_dataset_by_node gives each one of the two parquet shards), never the other's."""
    wrapper = tmp_path / "record_stream.py"
    wrapper.write_text(_RECORD_STREAM)
    records = tmp_path / "records"
    records.mkdir()
    flags = stream_flags(parquet_dataset, tmp_path / "out", train_batch_size=2, max_train_steps=3,
                         checkpointing_steps=0, num_validation_images=0)  # fmt: skip
    log = launch_two(wrapper, str(records), str(REPO_ROOT / "train_scripts" / "train_unconditional.py"), *flags)
    assert "2 process(es)" in log
    shares = [set(json.loads((records / f"rank-{r}.json").read_text())) for r in (0, 1)]
    halves = [{f"s{i:02d}.png" for i in range(k * 20, k * 20 + 20)} for k in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert all(any(share <= half for half in halves) for share in shares), "each rank reads one shard"
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()
