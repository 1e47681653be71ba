"""Class-conditional training (--class_column) and classifier-free guidance in the pipeline and `crispdiff sample`.

Every model is a real, tiny diffusers model; the guidance tests recompute the sampling loop by hand with the same
scheduler and noise, so "guidance 1 = the conditional model" and "guidance s = uncond + s (cond - uncond)" are checked
against arithmetic, not against the pipeline itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from safetensors.torch import load_file
from tiny_models import SIZE, WITHOUT_CRISPDIFF, base_config, tiny_unet, tiny_vae

from crispdiff.core.config import TrainConfig
from crispdiff.core.errors import DataError
from crispdiff.data.loading import load_images
from crispdiff.publish.export import build_pipeline
from crispdiff.train import grids
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.train.unet_trainer import UNetTrainer, train

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "ring", "square"]  # sorted: ids 0, 1, 2; the null class is 3
PER_CLASS = 4


def _shape_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx, r = rng.integers(6, 10), rng.integers(6, 10), rng.integers(4, 6)
    inside = {
        "disc": (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
        "ring": np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r) < 1.2,
        "square": (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r),
    }[kind]
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    img[inside] = rng.integers(0, 200, 3)
    return img


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """Twelve 16 px images of three shapes, the shape in metadata.jsonl's `shape` column (listed out of order)."""
    folder = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(PER_CLASS * len(CLASSES)):
        kind = ["square", "disc", "ring"][i % 3]
        Image.fromarray(_shape_image(kind, rng)).save(folder / f"img_{i:02d}.png")
        rows.append({"file_name": f"img_{i:02d}.png", "shape": kind, "caption": f"a {kind}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def tiny_config(folder: Path, output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        train_data_dir=str(folder),
        class_column="shape",
        output_dir=str(output_dir),
        cache_dir=str(output_dir.parent / "cache"),
        resolution=SIZE,
        base_channels=8,
        channel_mults=[1, 2],
        attention_res=[8],
        layers_per_block=1,
        train_batch_size=4,
        max_train_steps=4,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        checkpointing_steps=2,
        validation_steps=0,
        num_validation_images=4,
        validation_inference_steps=2,
        report_to="none",
        dropout=0.1,
        ema_decay=0.99,
        random_flip=True,
        class_dropout_prob=0.5,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def tiny_class_unet(num_classes: int = len(CLASSES), seed: int = 0) -> UNet2DModel:
    """The tiny_models UNet with a class embedding of num_classes + 1 (null) rows."""
    return tiny_unet(seed, num_class_embeds=num_classes + 1).eval()


def class_pipeline(unet: UNet2DModel | None = None, class_names: list[str] | None = CLASSES):
    pipe = build_pipeline(
        unet=unet or tiny_class_unet(),
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        class_names=class_names,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- data and training --------------------------------------------------------------------------------------------


def test_class_column_gives_sorted_names_ids_and_shares_the_image_cache(class_folder, tmp_path):
    config = tiny_config(class_folder, tmp_path / "out")
    data = load_images(config, show_progress=False)
    assert data.class_names == CLASSES
    rows = [json.loads(line) for line in (class_folder / "metadata.jsonl").read_text().splitlines()]
    expected = [CLASSES.index(row["shape"]) for row in sorted(rows, key=lambda r: r["file_name"])]
    assert data.class_ids.tolist() == expected
    assert data.class_labels([2, 0], "cpu").tolist() == [expected[2], expected[0]]

    config.class_column = None  # the same images unconditionally: the same decode cache, reused, no labels
    plain = load_images(config, show_progress=False)
    assert plain.cache_path == data.cache_path and plain.cache_hit
    assert plain.class_names is None and PixelSpace(plain).class_labels(torch.arange(2), "cpu") is None


def test_trainer_builds_a_class_embedding_with_a_null_row_and_drops_labels_from_the_noise_generator(
    class_folder, tmp_path, monkeypatch
):
    config = tiny_config(class_folder, tmp_path / "out", train_batch_size=12)
    trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.config.num_class_embeds == len(CLASSES) + 1 and unet.class_embedding.num_embeddings == 4

    indices = torch.arange(12)
    true_labels = trainer.space.class_labels(indices, "cpu")
    state = trainer.noise_generator.get_state()
    labels = trainer.class_labels(indices, 12, torch.device("cpu"))
    replay = torch.Generator()
    replay.set_state(state)
    dropped = torch.rand(12, generator=replay) < 0.5
    assert torch.equal(labels, torch.where(dropped, torch.tensor(len(CLASSES)), true_labels))
    assert 0 < int(dropped.sum()) < 12, "vacuous: every label dropped or none"
    assert torch.equal(trainer.noise_generator.get_state(), replay.get_state()), "draws beyond the dropout coin"

    # the validation grid has one row per class: ceil(4 images / 3 classes) = 2, but at least 4 columns; 3 rows
    grid, images = trainer.sample_grid("validation grid")
    assert images.shape[0] == 12 and grid.size == (4 * SIZE, 3 * SIZE)

    # more classes than MAX_GRID_CLASS_ROWS (90 emoji subcategories would be 360 tiles): one tile per class, square
    monkeypatch.setattr(grids, "MAX_GRID_CLASS_ROWS", 2)
    grid, images = trainer.sample_grid("validation grid")
    assert images.shape[0] == len(CLASSES) and grid.size == (2 * SIZE, 2 * SIZE)


def test_conditional_resume_gives_the_same_weights_as_an_uninterrupted_run(class_folder, tmp_path):
    """Class dropout on: the coin is in the checkpointed noise generator, so a resumed run ends bit-identical, also
    with a guided validation grid on the checkpoint's step."""
    full = tmp_path / "full"
    train(tiny_config(class_folder, full, validation_steps=2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train(tiny_config(class_folder, resumed, resume_from_checkpoint="latest", validation_steps=2))
    a = load_file(str(full / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert "class_embedding.weight" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed conditional run diverged"
    index = json.loads((full / "pipeline" / "model_index.json").read_text())
    assert index["class_names"] == {"0": "disc", "1": "ring", "2": "square"}


def test_a_datasets_class_label_column_gives_the_datasets_own_names(tmp_path):
    import datasets

    rng = np.random.default_rng(2)
    images = [Image.fromarray(_shape_image(kind, rng)) for kind in ["ring", "disc", "ring", "disc"]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ring", "disc"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    config = tiny_config(tmp_path, tmp_path / "out", train_data_dir=None, dataset_name=str(tmp_path / "ds"))
    config.class_column = "label"
    data = load_images(config, show_progress=False)
    assert data.class_names == ["disc", "ring"] and data.class_ids.tolist() == [1, 0, 1, 0]
    config.class_column = "kind"
    with pytest.raises(DataError, match=r"--class_column 'kind' is not a column of --dataset_name .*\['label'\]"):
        load_images(config, show_progress=False)


def _write_folder(folder: Path, rows: list[dict] | None, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(_shape_image("disc", rng)).save(folder / f"{i}.png")
    if rows is not None:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_class_column_errors_name_the_columns_the_file_and_the_single_class(class_folder, tmp_path):
    config = tiny_config(class_folder, tmp_path / "out", class_column="colour")
    with pytest.raises(
        DataError, match=r"--class_column 'colour' is not a column .*\['caption', 'file_name', 'shape'\]"
    ):
        load_images(config, show_progress=False)

    rows = [{"file_name": "0.png", "shape": "a"}, {"file_name": "1.png", "shape": ""}, {"file_name": "2.png"}]
    folder = _write_folder(tmp_path / "empty", rows)
    with pytest.raises(DataError, match=r"image 1\.png has no value"):
        load_images(tiny_config(folder, tmp_path / "out"), show_progress=False)

    rows = [{"file_name": f"{i}.png", "shape": "a"} for i in range(3)]
    folder = _write_folder(tmp_path / "single", rows)
    with pytest.raises(DataError, match=r"single class \('a'\).*at least two"):
        load_images(tiny_config(folder, tmp_path / "out"), show_progress=False)

    folder = _write_folder(tmp_path / "bare", None)
    with pytest.raises(DataError, match=r"no metadata\.jsonl"):
        load_images(tiny_config(folder, tmp_path / "out"), show_progress=False)


# ---- the pipeline: labels and guidance ------------------------------------------------------------------------------


def _by_hand(pipe, latents: torch.Tensor, labels: torch.Tensor, steps: int, scale: float | None) -> torch.Tensor:
    """The sampling loop written out: conditional only (scale None), or uncond + scale * (cond - uncond)."""
    scheduler = pipe.make_sampler(pipe.config.sampler)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    null = torch.full_like(labels, len(CLASSES))
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            cond = pipe.unet(model_input, t, class_labels=labels).sample
            if scale is None:
                out = cond
            else:
                uncond = pipe.unet(model_input, t, class_labels=null).sample
                out = uncond + scale * (cond - uncond)
            x = scheduler.step(out, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def _noise(batch: int = 3) -> torch.Tensor:
    return torch.randn((batch, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5))


def test_guidance_scale_one_is_the_conditional_model_exactly():
    pipe = class_pipeline()
    labels = torch.tensor([0, 2, 1])
    out = pipe(num_inference_steps=4, latents=_noise(), class_labels=[0, 2, 1], output_type="pt").images
    assert torch.equal(out, _by_hand(pipe, _noise(), labels, 4, None))
    other = pipe(num_inference_steps=4, latents=_noise(), class_labels=[1, 0, 2], output_type="pt").images
    assert not torch.allclose(out, other), "vacuous: the class embedding changes nothing"
    # no labels: the null class for every image, i.e. unconditional sampling; guidance would have nothing to add, so
    # asking for it is refused
    unconditional = pipe(num_inference_steps=4, latents=_noise(), output_type="pt").images
    assert torch.equal(unconditional, _by_hand(pipe, _noise(), torch.full((3,), 3), 4, None))
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe(num_inference_steps=4, latents=_noise(), guidance_scale=3.0, output_type="pt")


@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_guidance_is_uncond_plus_scale_times_the_difference(scale):
    pipe = class_pipeline()
    labels = torch.tensor([2, 0, 1])
    guided = pipe(
        num_inference_steps=4, latents=_noise(), class_labels=["square", "disc", "ring"], guidance_scale=scale,
        output_type="pt",
    ).images  # fmt: skip
    # one batched unet call vs two separate ones: equal up to float rounding of the batched kernels
    torch.testing.assert_close(guided, _by_hand(pipe, _noise(), labels, 4, scale), rtol=0, atol=1e-5)
    plain = pipe(num_inference_steps=4, latents=_noise(), class_labels=[2, 0, 1], output_type="pt").images
    assert (guided - plain).abs().max() > 1e-3, "vacuous: guidance changed nothing"


def test_the_saved_guidance_scale_is_the_default_for_labelled_calls_only():
    pipe = build_pipeline(
        unet=tiny_class_unet(), scheduler_base_config=base_config(), beta_schedule="cosine", class_names=CLASSES,
        guidance_scale=2.5,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_scale == 2.5 and class_pipeline().config.guidance_scale == 1.0
    labelled = dict(num_inference_steps=4, class_labels=["ring", "disc", "square"], output_type="pt")
    default = pipe(latents=_noise(), **labelled).images
    assert torch.equal(default, pipe(latents=_noise(), guidance_scale=2.5, **labelled).images)
    assert not torch.allclose(default, pipe(latents=_noise(), guidance_scale=1.0, **labelled).images)
    # without labels the model samples its null class, unguided, whatever the saved scale
    unlabelled = pipe(num_inference_steps=4, latents=_noise(), output_type="pt").images
    assert torch.equal(unlabelled, _by_hand(pipe, _noise(), torch.full((3,), 3), 4, None))


def test_guidance_without_labels_is_refused_when_there_is_no_class_mix_to_draw_them_from():
    """`pipe(guidance_scale=s)` without labels on a conditional model without a class mix would sample its null class
    unguided while the caller asked for guidance: refused, naming class_labels (as `crispdiff sample` refuses it).
    Scale 1 (no guidance) and a model with a class mix (labels drawn from it) still sample."""
    pipe = class_pipeline()
    with pytest.raises(ValueError, match=r"guidance_scale=3\.0 needs class_labels: .*\['disc', 'ring', 'square'\]"):
        pipe(num_inference_steps=2, latents=_noise(), guidance_scale=3.0, output_type="pt")
    assert pipe(num_inference_steps=2, latents=_noise(), guidance_scale=1.0, output_type="pt").images.shape[0] == 3
    mixed = build_pipeline(
        unet=tiny_class_unet(), scheduler_base_config=base_config(), beta_schedule="cosine", class_names=CLASSES,
        class_mix=[0.5, 0.25, 0.25],
    )  # fmt: skip
    mixed.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    guided = mixed(num_inference_steps=2, generator=generator, guidance_scale=3.0, output_type="pt").images
    assert guided.shape == (1, 3, SIZE, SIZE)


def test_reference_class_mix_keeps_the_proportions_and_is_seeded():
    from crispdiff.evaluate.sampling import reference_class_mix

    reference = ["a"] * 6 + ["b"] * 3 + ["c"]
    mix = reference_class_mix(reference, 20, seed=0)
    assert sorted(mix) == ["a"] * 12 + ["b"] * 6 + ["c"] * 2
    assert mix == reference_class_mix(reference, 20, seed=0) and mix != reference_class_mix(reference, 20, seed=1)
    assert mix != sorted(mix), "shuffled, so that any prefix of the samples is mixed"
    # largest remainders: 4.2, 2.1, 0.7 -> 4, 2, 1
    assert sorted(reference_class_mix(reference, 7)) == ["a"] * 4 + ["b"] * 2 + ["c"]


def test_labels_resolve_from_names_ids_and_broadcast():
    pipe = class_pipeline()
    resolve = lambda labels, n=3: pipe.resolve_class_labels(labels, n, torch.device("cpu")).tolist()  # noqa: E731
    assert pipe.classes == CLASSES
    assert resolve("ring") == [1, 1, 1] and resolve(2) == [2, 2, 2] and resolve(None) == [3, 3, 3]
    assert resolve(["square", 0, "ring"]) == [2, 0, 1] and resolve(torch.tensor([1, 3, 0])) == [1, 3, 0]
    with pytest.raises(ValueError, match=r"unknown class 'star'; .*\['disc', 'ring', 'square'\]"):
        resolve("star")
    with pytest.raises(ValueError, match="got 2 class_labels for a batch of 3"):
        resolve(["disc", "ring"])
    with pytest.raises(ValueError, match=r"class id 4 is out of range: 0\.\.2, or 3 for no class"):
        resolve(4)
    no_names = class_pipeline(class_names=None)
    assert no_names.classes is None and no_names.resolve_class_labels(1, 2, torch.device("cpu")).tolist() == [1, 1]
    with pytest.raises(ValueError, match="stores no class names"):
        no_names(class_labels="disc", num_inference_steps=1)


def test_unconditional_models_refuse_labels_and_guidance_and_names_must_match_the_embedding():
    from tiny_models import tiny_unet

    plain = build_pipeline(unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine")
    with pytest.raises(ValueError, match="unet is unconditional"):
        plain(class_labels=0, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        plain(guidance_scale=2.0, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"2 class_names need a unet with num_class_embeds = 3 .* has 4"):
        class_pipeline(class_names=["a", "b"])


# ---- the latent script end to end, and `crispdiff sample --class` ---------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random f=2 AutoencoderKL with a stated scaling factor."""
    vae = tiny_vae(sample_size=SIZE, scaling_factor=1.0)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


_NO_CRISPDIFF = WITHOUT_CRISPDIFF + textwrap.dedent(
    """
    import json

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  class_labels="square", guidance_scale=2.0, output_type="pt").images
    print(json.dumps({"classes": pipe.classes, "shape": list(images.shape), "finite": bool(images.isfinite().all())}))
    """
)


def test_train_latent_script_with_a_class_column_writes_a_pipeline_that_samples_a_named_class(
    class_folder, vae_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "train_scripts" / "train_latent.py"),
        "--train_data_dir", str(class_folder), "--class_column", "shape", "--pretrained_vae_name_or_path", str(vae_dir),
        "--resolution", str(SIZE), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
        "--base_channels", "8", "--channel_mults", "1", "2", "--attention_res", "4", "--train_batch_size", "4",
        "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--num_validation_images", "3", "--validation_inference_steps", "2", "--report_to", "none",
        "--cpu_threads", "1", "--adapt_vae", "off",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "3 classes" in done.stdout + done.stderr
    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["class_names"] == {"0": "disc", "1": "ring", "2": "square"}
    assert json.loads((folder / "unet" / "config.json").read_text())["num_class_embeds"] == 4

    # diffusers alone (crispdiff blocked) loads it and samples a class by name with guidance
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    clean_env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    alone = subprocess.run(
        [sys.executable, "-I", "-c", _NO_CRISPDIFF, str(folder)],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    report = json.loads(alone.stdout.strip().splitlines()[-1])
    assert report == {"classes": CLASSES, "shape": [2, 3, SIZE, SIZE], "finite": True}

    from crispdiff.cli import main

    grid_dir = tmp_path / "grid"
    args = [str(folder), "--num_images", "2", "--steps", "2", "--device", "cpu", "--output_dir", str(grid_dir)]
    assert main(["sample", *args, "--class", "ring", "--guidance_scale", "3"]) == 0
    assert Image.open(grid_dir / "grid.png").size == (2 * SIZE, SIZE)
    capsys.readouterr()
    assert main(["sample", *args, "--class", "star"]) == 2
    assert "--class 'star' is not a class of" in capsys.readouterr().err
    assert main(["sample", *args, "--guidance_scale", "3"]) == 2
    assert "--guidance_scale needs --class" in capsys.readouterr().err

    # evaluate samples the classes in the reference's mix with the saved guidance, or one class against its images
    assert index["guidance_scale"] == 3.0  # the latent trainer's --guidance_scale default, saved with the classes
    evaluate = [str(folder), "--reference", str(class_folder), "--num_images", "6", "--steps", "2", "--no_fid",
                "--no_memorisation", "--device", "cpu", "--batch_size", "4"]  # fmt: skip
    assert main(["evaluate", *evaluate, "--output_dir", str(tmp_path / "mix")]) == 0
    settings = json.loads((tmp_path / "mix" / "metrics.json").read_text())["settings"]
    assert settings["conditioning"] == "classes in the reference's 'shape' mix" and settings["guidance_scale"] == 3.0
    assert main(["evaluate", *evaluate, "--output_dir", str(tmp_path / "ring"), "--class", "ring"]) == 0
    settings = json.loads((tmp_path / "ring" / "metrics.json").read_text())["settings"]
    assert settings["conditioning"] == f"class 'ring', against the reference's {PER_CLASS} images of it"
    capsys.readouterr()
    assert main(["evaluate", *evaluate, "--class", "star"]) == 2
    assert "--class 'star' is not a class of" in capsys.readouterr().err
