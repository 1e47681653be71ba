"""Non-leaking augmentation (--augment_prob): the UNet is told each sample's transform through its class label, and
the saved model is a plain class-conditional UNet that knows nothing of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crispdiff.core.config import TrainConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import parse_config
from crispdiff.data.loading import load_images
from crispdiff.train.augment import NUM_TRANSFORMS, apply_transforms, augmented_labels, draw_transforms
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.train.unet_trainer import UNetTrainer, train

NUM_CLASSES = 2


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """Eight 16 px images of two kinds: a disc in the top-left quarter (kind a) or a bar along the top (kind b), both
    asymmetric, so every transform changes them."""
    folder = tmp_path_factory.mktemp("labelled")
    rows = []
    for i in range(8):
        pixels = np.full((16, 16, 3), 255, np.uint8)
        colour = np.array([30 * i, 200 - 20 * i, 90], np.uint8)
        if i % 2 == 0:
            yy, xx = np.mgrid[:16, :16]
            pixels[(yy - 4) ** 2 + (xx - 4) ** 2 <= 9] = colour
        else:
            pixels[1:4, 2:13] = colour
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "kind": "ab"[i % 2]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def config_for(folder: Path, out: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, [
        "--train_data_dir", str(folder), "--class_column", "kind", "--output_dir", str(out), "--cache_dir",
        str(out.parent / "cache"), "--resolution", "16", "--base_channels", "8", "--channel_mults", "1", "2",
        "--attention_res", "8", "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--validation_steps", "0", "--num_validation_images", "2", "--validation_inference_steps", "2",
        "--report_to", "none", "--ema_decay", "0.9", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", *extra,
    ])  # fmt: skip


def test_the_eight_transforms_are_the_squares_symmetries_and_the_labels_keep_the_plain_ids():
    pattern = torch.arange(16.0).view(1, 1, 4, 4)
    views = apply_transforms(pattern.repeat(NUM_TRANSFORMS, 1, 1, 1), torch.arange(NUM_TRANSFORMS))
    assert torch.equal(views[0], pattern[0])
    assert len({tuple(v.flatten().tolist()) for v in views}) == NUM_TRANSFORMS  # eight different views
    assert torch.equal(views[4], pattern[0].flip(-1)) and torch.equal(views[1], torch.rot90(pattern[0], 1, (-2, -1)))

    classes = NUM_CLASSES + 1  # + the null class, id NUM_CLASSES
    labels = torch.arange(classes).repeat_interleave(NUM_TRANSFORMS)
    transforms = torch.arange(NUM_TRANSFORMS).repeat(classes)
    ids = augmented_labels(labels, transforms, NUM_CLASSES)
    assert sorted(ids.tolist()) == list(range(NUM_TRANSFORMS * classes))  # one row per (transform, class)
    plain = ids[transforms == 0].tolist()
    assert plain == [0, 1, NUM_TRANSFORMS * classes - 1]  # classes keep their ids, the null class is the last

    drawn = draw_transforms(4000, 0.25, torch.Generator().manual_seed(0))
    assert abs((drawn > 0).float().mean().item() - 0.25) < 0.03
    assert set(drawn.tolist()) == set(range(NUM_TRANSFORMS))


def test_the_unet_learns_transformed_samples_under_their_own_labels(labelled_folder, tmp_path):
    """With --augment_prob 1 every sample is transformed, so only the transformed rows of the class embedding get
    gradients: the plain classes' rows and the plain null row, the ones a saved model keeps, stay as they were."""
    config = config_for(labelled_folder, tmp_path / "out", "--augment_prob", "1", "--class_dropout_prob", "0.5")
    trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
    embedding = trainer.accelerator.unwrap_model(trainer.unet).class_embedding.weight
    assert embedding.shape[0] == NUM_TRANSFORMS * (NUM_CLASSES + 1)
    before = embedding.detach().clone()
    for _ in range(4):
        trainer.optimizer_step()
    moved = (embedding.detach() != before).any(dim=1)
    plain_rows = [*range(NUM_CLASSES), embedding.shape[0] - 1]
    assert not moved[plain_rows].any()
    assert moved.sum() >= 4  # transformed classes and transformed null classes were trained


def test_the_noised_input_and_the_target_show_the_same_transformed_sample(labelled_folder, tmp_path):
    """With --augment_prob 1 every training sample is one of the seven other views of the same image an unaugmented
    run draws (the same seed), and the UNet's noised input is made from that view, not from the upright image."""
    batches = {}
    for prob in ("0", "1"):
        config = config_for(labelled_folder, tmp_path / f"out{prob}", "--augment_prob", prob, "--seed", "3")
        trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
        batches[prob] = trainer.training_batch()
    plain, augmented = batches["0"], batches["1"]
    assert torch.equal(plain["noise"], augmented["noise"]) and torch.equal(plain["t"], augmented["t"])
    expected = trainer.schedule.add_noise(augmented["x0"], augmented["noise"], augmented["t"])
    assert torch.equal(augmented["x_t"], expected)
    for upright, seen, label in zip(plain["x0"], augmented["x0"], augmented["labels"].tolist()):
        views = apply_transforms(upright.repeat(NUM_TRANSFORMS, 1, 1, 1), torch.arange(NUM_TRANSFORMS))
        matches = [k for k in range(NUM_TRANSFORMS) if torch.equal(views[k], seen)]
        assert matches and 0 not in matches  # a transformed view, never the upright image
        assert label >= NUM_CLASSES  # and the label says so


def test_an_augmented_run_saves_a_plain_conditional_unet_and_resumes_exactly(labelled_folder, tmp_path):
    """The pipeline's UNet and guide have the N classes + null of a plain conditional UNet, the guide's rows those of
    the trained EMA's untransformed classes; a run resumed mid-way (the transforms drawn from the checkpointed
    generator) ends bit-identical; a plain diffusers load samples each class."""
    from diffusers import DiffusionPipeline, UNet2DModel

    extra = ("--augment_prob", "0.5", "--autoguidance_scale", "1.5", "--autoguidance_snapshot", "0.5")
    full = tmp_path / "full"
    train(config_for(labelled_folder, full, *extra))
    unet = UNet2DModel.from_pretrained(full / "pipeline" / "unet")
    guide = UNet2DModel.from_pretrained(full / "pipeline" / "guide_unet")
    assert unet.config.num_class_embeds == guide.config.num_class_embeds == NUM_CLASSES + 1

    # the guide is the EMA after step 3, kept before that step's checkpoint: its rows are the checkpoint's EMA's
    trained = load_file(str(full / "checkpoint-3" / "model.safetensors"))["class_embedding.weight"]
    assert trained.shape[0] == NUM_TRANSFORMS * (NUM_CLASSES + 1)
    names = [name for name, _ in guide.named_parameters()]
    ema = load_file(str(full / "checkpoint-3" / "ema.safetensors"))[f"shadow.{names.index('class_embedding.weight')}"]
    assert torch.equal(guide.class_embedding.weight.detach(), torch.cat([ema[:NUM_CLASSES], ema[-1:]]))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(config_for(labelled_folder, resumed, *extra, "--resume_from_checkpoint", "latest"))
    for folder in ("unet", "guide_unet"):
        a = load_file(str(full / "pipeline" / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / "pipeline" / folder / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"the resumed run's {folder} diverged"

    pipe = DiffusionPipeline.from_pretrained(str(full / "pipeline"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, class_labels=[0, 1], output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_augment_prob_needs_class_labels_and_a_probability(labelled_folder, tmp_path):
    with pytest.raises(FlagError, match="--augment_prob"):
        parse_config(TrainConfig, ["--train_data_dir", str(labelled_folder), "--augment_prob", "0.5"])
    config = config_for(labelled_folder, tmp_path / "out", "--augment_prob", "1.5")
    with pytest.raises(FlagError, match=r"--augment_prob must be within \[0, 1\]"):
        UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
