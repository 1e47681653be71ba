"""Training an SR model on the user's images (``train_scripts/train_sr.py``, ``crispdiff.superres``): paired crops
that stay aligned under every augmentation, a tiny real run whose saved model spandrel re-detects with the right
scale and that beats bicubic on its own training images, x4, exact resume, the VAE round trip and the input blur,
flag errors; and the adversarial recipe (``crispdiff.train.gan``): each player's terms move only that player,
feature matching, a start from a saved SR model, unpaired inputs the discriminator judges, and a GAN twin that
upscales sharper than its regression-only twin."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import spandrel
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import tiny_vae

from crispdiff.core.errors import DataError, FlagError
from crispdiff.core.flags import parse_config
from crispdiff.core.provenance import PROVENANCE_NAME
from crispdiff.evaluate.sharpness import high_frequency_share
from crispdiff.pipelines.pipeline_crispdiff import unsharp_mask
from crispdiff.pipelines.sr_model import WEIGHTS_NAME
from crispdiff.superres.config import SRTrainConfig
from crispdiff.superres.data import SRPairs, blur_each, downscale, vae_roundtrip
from crispdiff.superres.load import EMBEDDED_SR_SHARPEN_AMOUNT, embedded_sr_dir, load_sr_model
from crispdiff.superres.metrics import bicubic_upscale
from crispdiff.superres.trainer import build_sr_trainer, load_initial_model, train_sr
from crispdiff.train.gan import PatchDiscriminator, adversarial_terms, feature_matching_loss
from crispdiff.train.process import make_accelerator

REPO_ROOT = Path(__file__).resolve().parents[1]
HIGH = 32  # high-resolution side of the synthetic images


def flat_art(count: int, size: int, seed: int) -> np.ndarray:
    """uint8 [N, size, size, 3] icons: a coloured background with hard-edged discs and boxes, like emoji."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for n in range(count):
        image = np.full((size, size, 3), rng.integers(180, 256, 3), dtype=np.uint8)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 8, size / 3)]
            mask = (
                (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
                if rng.random() < 0.5
                else (abs(yy - cy) < r) & (abs(xx - cx) < r / 2)
            )
            image[mask] = rng.integers(0, 200, 3)
        images[n] = image
    return images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("icons")
    for i, image in enumerate(flat_art(24, HIGH, seed=0)):
        PIL.Image.fromarray(image).save(folder / f"icon_{i:02d}.png")
    return folder


def textured_art(count: int, size: int, seed: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: flat_art's shapes filled with one-pixel checks or stripes of two colours, a texture
    that downscaling x2 removes entirely (the input shows the shape's average colour), so only a model that adds
    detail the input does not hold can put it back."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for n in range(count):
        image = np.full((size, size, 3), rng.integers(150, 256, 3), dtype=np.uint8)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 5, size / 2.5)]
            disc = rng.random() < 0.5
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if disc else (abs(yy - cy) < r) & (abs(xx - cx) < r)
            colours, kind, phase = rng.integers(0, 256, (2, 3)), rng.integers(3), rng.integers(2)
            pattern = [(yy + xx + phase) % 2 == 0, (yy + phase) % 2 == 0, (xx + phase) % 2 == 0][kind]
            image[mask & pattern], image[mask & ~pattern] = colours[0], colours[1]
        images[n] = image
    return images


@pytest.fixture(scope="module")
def unpaired_folder(tmp_path_factory) -> Path:
    """Low-resolution inputs with no originals (HIGH / 2 px), as a diffusion model's samples would be."""
    folder = tmp_path_factory.mktemp("samples")
    for i, image in enumerate(flat_art(6, HIGH // 2, seed=7)):
        PIL.Image.fromarray(image).save(folder / f"sample_{i}.png")
    return folder


def config_for(folder: Path, out: Path, *extra: str, network: tuple[str, ...] | None = None) -> SRTrainConfig:
    """The tiny test run's config; ``network`` replaces its network-size flags (none: read from an --init model)."""
    sizes = ("--num_feat", "16", "--num_blocks", "3") if network is None else network
    return parse_config(
        SRTrainConfig,
        [
            "--train_data_dir", str(folder), "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--resolution", str(HIGH), "--crop_size", "16", *sizes,
            "--train_batch_size", "8", "--learning_rate", "5e-3", "--lr_scheduler", "constant",
            "--max_train_steps", "600",
            "--validation_fraction", "0.2", "--validation_steps", "0", "--checkpointing_steps", "0",
            "--report_to", "none", "--cpu_threads", "1", *extra,
        ],
    )  # fmt: skip


def make_trainer(config: SRTrainConfig):
    """The run's trainer, as train_sr builds it (an --init model adopted first), without the loop."""
    config = config.resolve()
    initial = None
    if config.init_sr_model_name_or_path:
        config, initial = load_initial_model(config)
    torch.manual_seed(config.seed)
    return build_sr_trainer(config, make_accelerator(config), initial)


def test_paired_crops_stay_aligned_under_flips_and_turns():
    """Block-constant originals: with nearest downscaling every target is exactly its input upscaled x2, so any
    misplaced crop offset, or a flip / turn applied to one side only, breaks equality."""
    low = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    high = low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(downscale(high, 2, "nearest"), low)
    pairs = SRPairs(high, downscale(high, 2, "nearest"))
    generator = torch.Generator().manual_seed(0)
    inputs, targets = pairs.crops(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), 6, generator, augment=True)
    assert inputs.shape == (8, 3, 6, 6) and targets.shape == (8, 3, 12, 12)
    assert torch.equal(F.interpolate(inputs, scale_factor=2, mode="nearest"), targets)
    # the augmentation really happens: some crops differ from every un-augmented crop at their offset
    plain, _ = pairs.crops(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), 6, torch.Generator().manual_seed(0), augment=False)
    assert not torch.equal(plain, inputs)


def test_downscale_uses_the_data_pipelines_filter():
    high = torch.from_numpy(flat_art(2, HIGH, seed=1)).permute(0, 3, 1, 2).contiguous()
    for name, filter_ in [("lanczos", PIL.Image.Resampling.LANCZOS), ("bicubic", PIL.Image.Resampling.BICUBIC)]:
        expected = np.asarray(PIL.Image.fromarray(high[1].permute(1, 2, 0).numpy()).resize((16, 16), filter_))
        assert np.array_equal(downscale(high, 2, name)[1].permute(1, 2, 0).numpy(), expected)


def test_a_tiny_run_saves_a_spandrel_model_that_beats_bicubic_on_its_training_images(
    image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "sr"
    monkeypatch.setattr(sys, "argv", ["train_sr.py", "--output_dir", str(out)])
    folder = train_sr(config_for(image_folder, out))
    assert folder == out / "sr_model"
    expected = ["README.md", "config.json", WEIGHTS_NAME, "sr_model.py", PROVENANCE_NAME]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    record = json.loads((folder / PROVENANCE_NAME).read_text())
    assert record["command"] == ["train_sr.py", "--output_dir", str(out)] and record["crispdiff_version"]

    # spandrel alone recognises the file, with the architecture and scale it was trained with
    descriptor = spandrel.ModelLoader().load_from_state_dict(load_file(folder / WEIGHTS_NAME))
    assert descriptor.architecture.id == "Compact" and descriptor.scale == 2

    # and it beats bicubic on the images it trained on (whole images, EMA weights, as the pipeline runs it)
    model = load_sr_model(folder)
    high = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in sorted(image_folder.glob("*.png"))])
    high_t = torch.from_numpy(high).permute(0, 3, 1, 2).contiguous()
    low01 = downscale(high_t, 2, "lanczos").float() / 255.0
    target = high_t.float() / 255.0
    sr_error = (model.upscale(low01, sr_strength=1.0) - target).square().mean()
    bicubic_error = (bicubic_upscale(low01, HIGH) - target).square().mean()
    assert sr_error < 0.8 * bicubic_error, (sr_error, bicubic_error)

    summary = json.loads((out / "sr_summary.json").read_text())
    assert summary["steps"] == 600 and summary["num_held_out"] == 5 and summary["num_train"] == 19
    assert set(summary["held_out"]) == {"sr", "lanczos", "bicubic"}
    assert "| sr |" in (folder / "README.md").read_text()
    # comparison.png is the final network's held-out grid, drawn once (as validation at the last step)
    assert (out / "comparison.png").read_bytes() == (out / "validation" / "step_0000600.png").read_bytes()


GAN_RUN = ("--gan_weight", "0.5", "--gan_start_step", "3", "--feature_matching_weight", "1", "--disc_channels", "8",
           "--input_blur_max", "1.5")  # fmt: skip


@pytest.mark.parametrize("adversarial", [False, True], ids=["regression", "gan"])
def test_resume_is_exact(image_folder, unpaired_folder, tmp_path, adversarial):
    """Validation and a checkpoint on the same step, augmentation on: resumed from checkpoint-6 of a run (its later
    files gone, as after a kill) it ends bit-identical to the run that went on to step 12. With the adversarial
    recipe (a discriminator, feature matching, unpaired inputs, input blur), the same."""
    common = ("--max_train_steps", "12", "--checkpointing_steps", "6", "--validation_steps", "6")
    if adversarial:
        common += (*GAN_RUN, "--unpaired_data_dir", str(unpaired_folder))
    whole = train_sr(config_for(image_folder, tmp_path / "whole", *common))
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", killed / "checkpoint-6")
    resumed = train_sr(config_for(image_folder, killed, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(whole / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the copy really resumed (from step 6), not trained from scratch
    assert json.loads((killed / "sr_summary.json").read_text())["steps"] == 12
    assert not (killed / "validation" / "step_0000006.png").exists()
    if adversarial:  # the discriminator was checkpointed and restored too, and the card says what trained
        summary = json.loads((killed / "sr_summary.json").read_text())
        assert summary["held_out_adversarial"] == json.loads((whole.parent / "sr_summary.json").read_text())[
            "held_out_adversarial"
        ]
        assert summary["num_unpaired"] == 6 and "unpaired_sr_hf_energy_ratio" in summary["held_out_adversarial"]
        card = (resumed / "README.md").read_text()
        assert "adversarial (hinge) weight 0.5 from step 3" in card and "feature-matching weight 1.0" in card
        assert "6 unpaired low-resolution inputs" in card and "std up to 1.5 input pixels" in card


def test_vae_roundtrip_inputs_are_seeded_and_noisier_with_latent_noise():
    vae = tiny_vae().eval()
    images = torch.from_numpy(flat_art(3, 16, seed=2)).permute(0, 3, 1, 2).contiguous()
    clean = vae_roundtrip(vae, images, 0.0, seed=0)
    assert clean.shape == images.shape and clean.dtype == torch.uint8
    assert torch.equal(clean, vae_roundtrip(vae, images, 0.0, seed=5)), "no noise: the seed does not matter"
    noisy = vae_roundtrip(vae, images, 2.0, seed=0)
    assert torch.equal(noisy, vae_roundtrip(vae, images, 2.0, seed=0))
    assert not torch.equal(noisy, clean)


def test_x4_through_accelerate_launch_into_a_pipeline(image_folder, tmp_path):
    """The script under `accelerate launch` at x4 (8 -> 32 px) with VAE round trips; `add-sr` puts it in a pipeline."""
    out = tmp_path / "sr4"
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_scripts" / "train_sr.py"),
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
        "--resolution", str(HIGH), "--scale", "4", "--crop_size", "4", "--num_feat", "8", "--num_blocks", "2",
        "--train_batch_size", "4", "--max_train_steps", "3", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--vae_roundtrip_prob", "0.5", "--vae_latent_noise", "0.5", "--pretrained_vae_name_or_path", str(vae_dir),
        "--report_to", "none", "--cpu_threads", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    model = load_sr_model(out / "sr_model")
    assert model.config.scale == 4
    assert model.upscale(torch.rand(2, 3, 8, 8)).shape == (2, 3, 32, 32)

    from tiny_models import SIZE, base_config, tiny_unet

    from crispdiff.publish.export import load_pipeline, save_pipeline
    from crispdiff.superres.load import attach_sr

    pipeline_dir = save_pipeline(
        tmp_path / "pipe", unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine"
    )
    attach_sr(pipeline_dir, out / "sr_model")
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (1, 3, 4 * SIZE, 4 * SIZE)


def test_the_input_blur_softens_inputs_only_and_keeps_the_draws():
    """--input_blur_max blurs the inputs (less high-frequency energy), never the targets, and draws the same
    numbers whatever it is, so the crops and the generator's later stream do not change with it."""
    high = torch.from_numpy(flat_art(6, HIGH, seed=4)).permute(0, 3, 1, 2).contiguous()
    low = downscale(high, 2, "lanczos")
    ids = torch.arange(6)
    crops = {}
    for blur in (0.0, 2.0):
        generator = torch.Generator().manual_seed(0)
        crops[blur] = SRPairs(high, low, blur_max=blur).crops(ids, 12, generator, augment=True)
        crops[blur] += (torch.rand(1, generator=generator),)  # what the generator draws next
    (sharp, target, after), (blurred, blurred_target, blurred_after) = crops[0.0], crops[2.0]
    assert torch.equal(target, blurred_target) and torch.equal(after, blurred_after)
    assert high_frequency_share(blurred).mean() < 0.8 * high_frequency_share(sharp).mean()
    images = torch.rand(3, 3, 8, 8)
    assert torch.equal(blur_each(images, torch.zeros(3)), images)  # a std of 0 leaves an image as it was


def tiny_generator_and_discriminator() -> tuple[torch.nn.Module, PatchDiscriminator]:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 3, 3, padding=1), PatchDiscriminator(channels=8, layers=2)


def test_each_players_terms_move_only_that_player(tmp_path):
    """The generator's adversarial term and feature matching reach only the generator's weights; the
    discriminator's hinge loss only the discriminator's: so one backward pass of their sum trains both, each on
    its own objective. The values are the hinge losses of the discriminator's logits."""
    generator, disc = tiny_generator_and_discriminator()
    accelerator = make_accelerator(config_for(tmp_path, tmp_path / "out"))
    real, inputs = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    fake, unpaired = generator(inputs), generator(inputs.flip(-1))
    terms = adversarial_terms(accelerator, disc, real, [fake, unpaired], feature_matching=True)
    players = {"generator": list(generator.parameters()), "discriminator": list(disc.parameters())}

    def moved(term: torch.Tensor) -> set[str]:
        weights = [p for ps in players.values() for p in ps]
        grads = torch.autograd.grad(term, weights, allow_unused=True, retain_graph=True)
        owners = [name for name, ps in players.items() for _ in ps]
        return {owner for owner, g in zip(owners, grads) if g is not None and g.abs().sum() > 0}

    assert moved(terms.generator[0]) == moved(terms.generator[1]) == {"generator"}
    assert moved(terms.feature_matching) == {"generator"}
    assert moved(terms.discriminator) == {"discriminator"}
    with torch.no_grad():
        real_logits, fake_logits = disc(real), disc(torch.cat([fake, unpaired]))
        assert terms.generator[0].item() == pytest.approx(-disc(fake).mean().item(), rel=1e-5)
        hinge = 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
        assert terms.discriminator.item() == pytest.approx(hinge.item(), rel=1e-5)


def test_feature_matching_is_zero_on_the_real_images_and_grows_with_the_difference():
    _, disc = tiny_generator_and_discriminator()
    real = torch.rand(4, 3, 32, 32)
    features = {name: disc(images, return_features=True)[1] for name, images in (
        ("real", real), ("close", real + 0.01 * torch.randn_like(real)), ("far", torch.rand_like(real)))}  # fmt: skip
    assert len(features["real"]) == 3  # one per LeakyReLU: the first convolution and each strided layer
    assert feature_matching_loss(features["real"], features["real"]) == 0
    assert 0 < feature_matching_loss(features["close"], features["real"]) < feature_matching_loss(
        features["far"], features["real"]
    )


def test_a_start_from_a_saved_sr_model_reproduces_it_at_step_0(image_folder, tmp_path):
    """--init_sr_model_name_or_path: the network and its EMA start as the embedded SR x2 (its architecture and sizes
    read from it), so step 0 upscales exactly as that model does."""
    trainer = make_trainer(config_for(image_folder, tmp_path / "out", "--init_sr_model_name_or_path", "embedded",
                                      "--gan_weight", "0.1", network=()))  # fmt: skip
    assert (trainer.config.architecture, trainer.config.scale, trainer.config.num_feat, trainer.config.num_blocks) == (
        "compact", 2, 48, 8
    )
    embedded = load_sr_model(embedded_sr_dir())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = embedded.net(images)
        assert torch.allclose(trainer.eval_network()(images), expected, atol=1e-5)
        assert torch.allclose(trainer.network(images), expected, atol=1e-5)


def test_init_weight_blend_saves_the_interpolation_of_the_start_and_the_trained_network(image_folder, tmp_path):
    """--init_weight_blend 0.25: the saved weights are 0.75 x the starting model's + 0.25 x those the same run saves
    without the blend (ESRGAN's network interpolation), and the card says so."""
    saved = {}
    for blend in ("1", "0.25"):
        config = config_for(image_folder, tmp_path / blend, "--init_sr_model_name_or_path", "embedded",
                            "--max_train_steps", "3", "--init_weight_blend", blend, network=())  # fmt: skip
        saved[blend] = load_file(train_sr(config) / WEIGHTS_NAME)
    start = load_file(embedded_sr_dir() / WEIGHTS_NAME)
    assert any(not torch.equal(saved["1"][k], start[k]) for k in start)  # the run did train
    for name, value in saved["0.25"].items():
        assert torch.allclose(value, 0.75 * start[name] + 0.25 * saved["1"][name], atol=1e-6), name
    assert "0.75 x its weights + 0.25 x the trained ones" in (tmp_path / "0.25" / "sr_model" / "README.md").read_text()


@pytest.fixture(scope="module")
def x4_model(tmp_path_factory) -> Path:
    """A saved SR component folder of a small x4 Compact network."""
    from crispdiff.superres.networks import as_sr_component, build_sr_network

    folder = tmp_path_factory.mktemp("x4") / "sr_model"
    as_sr_component(build_sr_network("compact", 4, 8, 2), source="test").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--num_feat", "16"), "--num_feat 16 disagrees with --init_sr_model_name_or_path {m}, whose num_feat is 8"),
        (("--scale", "2"), "--scale 2 disagrees"),
        ((), "with --init_sr_model_name_or_path {m}: --crop_size 16 must be between 4 and --resolution / --scale = 8"),
    ],
)
def test_a_start_from_a_saved_sr_model_refuses_settings_that_do_not_fit_it(
    image_folder, tmp_path, x4_model, flags, named
):
    """Given flags that disagree with the model are refused by name; so are flags that fit the default x2 but not
    the model's x4 (16 px crops of 32 / 4 = 8 px inputs); a missing model is named too. Before any output."""
    config = config_for(image_folder, tmp_path / "out", "--init_sr_model_name_or_path", str(x4_model), *flags,
                        network=())  # fmt: skip
    with pytest.raises(FlagError, match=re.escape(named.format(m=x4_model))):
        train_sr(config)
    missing = str(tmp_path / "nothing")
    with pytest.raises(FlagError, match="--init_sr_model_name_or_path: .*not found"):
        train_sr(config_for(image_folder, tmp_path / "out", "--init_sr_model_name_or_path", missing, network=()))
    assert not (tmp_path / "out").exists()


def test_unpaired_inputs_are_upscaled_and_judged_by_the_discriminator(image_folder, tmp_path):
    """Each step upscales crops of the --unpaired_data_dir images and hands them to the discriminator as fakes (the
    same SR output the network gives them), with a generator term of their own; the folder's images are decoded by
    the data recipe (transparency composited onto --background)."""
    samples = tmp_path / "samples"
    samples.mkdir()
    green = np.zeros((HIGH // 2, HIGH // 2, 4), np.uint8)
    green[..., 1], green[..., 3] = 255, 255
    green[0, 0, 3] = 0  # one transparent pixel: white on the default background
    for i in range(3):
        PIL.Image.fromarray(green, "RGBA").save(samples / f"{i}.png")
    trainer = make_trainer(config_for(image_folder, tmp_path / "out", "--gan_weight", "0.1", "--disc_channels", "8",
                                      "--unpaired_data_dir", str(samples), "--random_flip", "false"))  # fmt: skip
    assert trainer.unpaired.images.shape == (3, 3, 16, 16)
    assert trainer.unpaired.images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert trainer.unpaired.images[0, :, 1, 1].tolist() == [0, 255, 0]
    seen: list[torch.Tensor] = []
    trainer.accelerator.unwrap_model(trainer.disc).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():  # every crop of the 16 px samples is the whole sample
        expected = trainer.network(trainer.unpaired.images[:1].float() / 255.0)[0]
    terms = trainer.micro_step()
    assert {"gan_g", "gan_unpaired", "gan_d"} <= set(terms) and torch.isfinite(terms["gan_unpaired"])
    batch = trainer.config.train_batch_size
    judged = [images for images in seen if len(images) == 3 * batch]  # real crops, SR of pairs, SR of samples
    assert judged and all(torch.allclose(image, expected, atol=1e-6) for image in judged[0][2 * batch :])


def test_unpaired_inputs_of_another_size_are_refused_naming_the_folder(image_folder, unpaired_folder, tmp_path):
    from crispdiff.data.loading import load_images_of_size

    assert load_images_of_size(unpaired_folder, HIGH // 2, "white", "--unpaired_data_dir").shape == (6, 3, 16, 16)
    PIL.Image.fromarray(flat_art(1, HIGH, seed=8)[0]).save(tmp_path / "too_big.png")
    with pytest.raises(DataError, match=r"--unpaired_data_dir .*: too_big.png is 32x32 px; .* must be 16x16"):
        load_images_of_size(tmp_path, HIGH // 2, "white", "--unpaired_data_dir")
    with pytest.raises(DataError, match="--unpaired_data_dir .*: no images there"):
        load_images_of_size(tmp_path / "missing", HIGH // 2, "white", "--unpaired_data_dir")


def test_a_gan_twin_upscales_sharper_than_its_regression_only_twin(tmp_path):
    """Same images, seed and steps, today's pixel + FFT loss in both; the twin with --gan_weight puts back the
    one-pixel texture that downscaling removed (the regression twin returns its average, a flat colour), so its
    held-out hf ratio (SR / originals) is clearly higher."""
    folder = tmp_path / "textures"
    folder.mkdir()
    for i, image in enumerate(textured_art(32, HIGH, seed=0)):
        PIL.Image.fromarray(image).save(folder / f"{i:02d}.png")
    hf = {}
    for name, extra in (("regression", ()), ("gan", ("--gan_weight", "1", "--disc_channels", "16"))):
        out = tmp_path / name
        train_sr(config_for(folder, out, "--max_train_steps", "200", "--validation_fraction", "0.25", *extra))
        hf[name] = json.loads((out / "sr_summary.json").read_text())["held_out"]["sr"]["hf_energy_ratio"]
    assert hf["gan"] > 1.25 * hf["regression"], hf


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--crop_size", "80"], "--crop_size"),
        (["--scale", "5"], "--scale"),
        (["--resolution", "33"], "--resolution"),
        (["--vae_roundtrip_prob", "1.5"], "--vae_roundtrip_prob"),
        (["--color_jitter", "0.1"], "--color_jitter"),
        (["--feature_matching_weight", "1"], "--feature_matching_weight: no effect without --gan_weight"),
        (["--gan_weight", "0.1", "--crop_size", "8", "--disc_layers", "3"], "--disc_layers 3 is too deep"),
        (["--input_blur_max", "-1"], "--input_blur_max must be >= 0"),
        (["--init_weight_blend", "0.5"], "--init_weight_blend blends with the starting model"),
        (["--init_sr_model_name_or_path", "embedded", "--init_weight_blend", "1.5"], "--init_weight_blend must be in"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(flags, named):
    with pytest.raises(FlagError, match=named):
        parse_config(SRTrainConfig, ["--train_data_dir", "x", *flags])


BLOCK_SPANDREL = """
import importlib.abc, json, sys, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("spandrel", "crispdiff", "pipelines"):
            raise ModuleNotFoundError(f"{name} is blocked here")
sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
try:
    pipe(batch_size=1, num_inference_steps=2, upscale=True)
    error = ""
except Exception as err:
    error = str(err)
print(json.dumps({"shape": list(images.shape), "error": error}))
"""


def tiny_main_job(tmp_path: Path, image_size: int, seed: int, **flags: Any):
    """A 64 px latent run with the main job's defaults (the embedded SR x2 included) on 6 flat-art files of
    ``image_size`` px, a tiny UNet and VAE, one step; ``flags`` set further config fields."""
    from crispdiff.latent.trainer import LatentTrainConfig

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(flat_art(6, image_size, seed=seed)):
        PIL.Image.fromarray(image).save(folder / f"{i}.png")
    vae_dir = tmp_path / "vae"
    tiny_vae(sample_size=64).save_pretrained(vae_dir)
    return LatentTrainConfig(
        train_data_dir=str(folder), pretrained_vae_name_or_path=str(vae_dir), cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"), base_channels=8, channel_mults=[1, 2], attention_res=[4],
        train_batch_size=2, max_train_steps=1, checkpointing_steps=0, validation_steps=0, num_validation_images=1,
        validation_inference_steps=1, report_to="none", adapt_vae="off", class_column="none", **flags,
    )  # fmt: skip


def test_the_main_job_pipeline_carries_the_embedded_sr_and_upscales_when_asked(tmp_path):
    """A 64 px latent run with the defaults saves the embedded SR x2: pipe() stays 64 px, pipe(upscale=True) and
    `crispdiff sample --upscale` give 128 px (exactly the SR of the 64 px images), and the folder still loads and
    samples where spandrel (and crispdiff) are missing, with upscaling refused by a message that says what to do."""
    from crispdiff.cli import main as cli_main
    from crispdiff.latent.trainer import train_latent
    from crispdiff.publish.export import load_pipeline
    from crispdiff.superres.load import embedded_sr_dir

    config = tiny_main_job(tmp_path, image_size=64, seed=3)
    assert config.sr_model_name_or_path == "embedded"
    pipeline_dir = train_latent(config)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["sr_model"] == ["sr_model", "SpandrelSRModel"] and index["upscale"] is False
    assert index["sr_strength"] == 1.0
    # 64 px training images cannot tell how sharp 128 px output should be: the embedded SR's amount stays
    assert index["upscale_sharpen_amount"] == EMBEDDED_SR_SHARPEN_AMOUNT != index["sharpen_amount"]
    assert not (tmp_path / "out" / "upscale_sharpen_calibration.json").exists()
    shipped = load_file(embedded_sr_dir() / WEIGHTS_NAME)
    saved = load_file(pipeline_dir / "sr_model" / WEIGHTS_NAME)
    assert shipped.keys() == saved.keys() and all(torch.equal(shipped[k], saved[k]) for k in shipped)

    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, num_inference_steps=2, generator=generator, output_type="pt", **kwargs).images

    plain, upscaled = sample(), sample(upscale=True)
    assert plain.shape == (2, 3, 64, 64) and upscaled.shape == (2, 3, 128, 128)
    raw = pipe.sr_model.upscale(plain, sr_strength=1.0)
    assert torch.equal(sample(upscale=True, sharpen_amount=0.0), raw)  # an explicit amount applies after SR too
    assert torch.equal(upscaled, unsharp_mask(raw, EMBEDDED_SR_SHARPEN_AMOUNT))
    assert not torch.equal(upscaled, raw)

    out = tmp_path / "sampled"
    argv = ["sample", str(pipeline_dir), "--num_images", "2", "--steps", "2", "--upscale", "--output_dir", str(out)]
    assert cli_main(argv) == 0
    assert PIL.Image.open(out / "grid.png").size == (256, 128)

    done = subprocess.run(
        [sys.executable, "-c", BLOCK_SPANDREL, str(pipeline_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 3, 64, 64] and "pip install spandrel" in result["error"]


def test_the_unsharp_amount_after_sr_is_calibrated_against_the_training_images_at_the_output_size(tmp_path):
    """Training files at least twice the training resolution: the end of the run samples, upscales, sweeps the
    unsharp amounts against those files decoded at 128 px, and saves the best as upscale_sharpen_amount, which
    pipe(upscale=True) then applies (64 px output keeps its own amount)."""
    from crispdiff.data.loading import images_at_size, load_images
    from crispdiff.evaluate.sharpen import SHARPEN_SWEEP_AMOUNTS
    from crispdiff.evaluate.sharpness import sharpness_ratios
    from crispdiff.latent.trainer import train_latent
    from crispdiff.publish.export import load_pipeline

    config = tiny_main_job(tmp_path, image_size=128, seed=5, upscale_calibration_images=4)
    pipeline_dir = train_latent(config)
    sweep = json.loads((tmp_path / "out" / "upscale_sharpen_calibration.json").read_text())
    assert [row["amount"] for row in sweep["rows"]] == list(SHARPEN_SWEEP_AMOUNTS)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["upscale_sharpen_amount"] == sweep["best_amount"]
    assert sweep["pipeline_amount"] == EMBEDDED_SR_SHARPEN_AMOUNT  # what it replaced

    # the sweep's reference is the training files at 128 px: the ratios of the best amount are measured on them
    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(4)]
    raw = pipe(batch_size=4, num_inference_steps=1, generator=generators, upscale=True, sharpen_amount=0.0,
               output_type="pt").images  # fmt: skip
    data = load_images(config, for_latents=True, show_progress=False)
    reference = images_at_size(config, data, 128, list(range(len(data))))
    assert reference.shape == (6, 3, 128, 128)
    assert torch.equal(reference, load_images(dataclasses.replace(config, resolution=128), show_progress=False)
                       .center_crops())  # fmt: skip
    best = next(row for row in sweep["rows"] if row["amount"] == sweep["best_amount"])
    measured = sharpness_ratios(reference, unsharp_mask(raw, sweep["best_amount"]))
    assert measured["hf_energy_ratio"] == pytest.approx(best["hf_energy_ratio"], rel=1e-4)

    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(4)]
    upscaled = pipe(batch_size=4, num_inference_steps=1, generator=generators, upscale=True, output_type="pt").images
    assert torch.equal(upscaled, unsharp_mask(raw, sweep["best_amount"]))


def test_images_at_size_decodes_only_the_files_that_large(tmp_path):
    """The chosen rows' files decoded anew at the size, as the data pipeline decodes them at that resolution, the
    smaller ones left out; under half of them large enough: None (the data cannot say how sharp that size is)."""
    from crispdiff.core.config import DataConfig
    from crispdiff.data.loading import images_at_size, load_images

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, image in enumerate(flat_art(3, 128, seed=1)):
        PIL.Image.fromarray(image).save(folder / f"a_big_{i}.png")
    for i, image in enumerate(flat_art(3, 64, seed=2)):
        PIL.Image.fromarray(image).save(folder / f"b_small_{i}.png")
    config = DataConfig(train_data_dir=str(folder), resolution=32, center_crop=True, cache_dir=str(tmp_path / "c"))
    data = load_images(config, show_progress=False)
    large = load_images(dataclasses.replace(config, resolution=128, min_image_size=128), show_progress=False)
    assert len(data) == 6 and len(large) == 3
    assert torch.equal(images_at_size(config, data, 128, list(range(6))), large.center_crops())
    assert images_at_size(config, data, 128, [0, 3, 4, 5]) is None  # one large file of four


def test_the_embedded_sr_is_a_small_x2_spandrel_model_with_its_card():
    from crispdiff.superres.load import embedded_sr_dir

    folder = embedded_sr_dir()
    assert (folder / WEIGHTS_NAME).stat().st_size <= 5_000_000
    descriptor = spandrel.ModelLoader().load_from_state_dict(load_file(folder / WEIGHTS_NAME))
    assert descriptor.scale == 2 and descriptor.architecture.id == "Compact"
    card = (folder / "README.md").read_text()
    assert "train_scripts/train_sr.py" in card and "Lanczos" in card
