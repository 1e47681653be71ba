"""Latent diffusion: the latent cache (build once, reuse, invalidate, repair, resume) and the latent trainer.

Every model here is a real, tiny diffusers model (an AutoencoderKL of ~20K parameters, a UNet of ~45K); encoder
calls are counted with a forward hook on the real encoder, not with mocks.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from tiny_models import assert_ranks_saw_different_data_and_noise, record_launcher, tiny_vae

from crispdiff.core.errors import FlagError
from crispdiff.core.flags import parse_config
from crispdiff.data.loading import load_images
from crispdiff.diffusion.schedule import NoiseSchedule, betas_from_config
from crispdiff.diffusion.unets import unet_from_config
from crispdiff.latent.cache import load_or_build_latent_cache
from crispdiff.latent.space import LatentSpace, build_latent_space, latent_cache_dir, preprocessing_key, resolve_scaling
from crispdiff.latent.trainer import EMBEDDED_CLASS_COLUMN, MAIN_JOB_SNR_SHIFT, LatentTrainConfig
from crispdiff.latent.vae import (
    EMBEDDED_VAE_SHARPEN_AMOUNT,
    EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED,
    embedded_vae_dir,
    encode_posterior,
    load_vae,
    unscale_latents,
)

NUM_IMAGES = 10
RESOLUTION = 16


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random f=2 AutoencoderKL folder whose config states no scaling factor (so it gets measured)."""
    vae = tiny_vae(sample_size=RESOLUTION)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("scaling_factor", None)
    config.pop("shift_factor", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten small RGBA images with varied colour and transparency (so --background matters)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        pixels = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").save(folder / f"{i:02d}.png")
    return folder


def make_config(image_dir: Path, vae_dir: Path, tmp_path: Path, **overrides) -> LatentTrainConfig:
    settings = dict(
        train_data_dir=str(image_dir),
        pretrained_vae_name_or_path=str(vae_dir),
        resolution=RESOLUTION,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        vae_batch_size=4,
        base_channels=8,
        channel_mults=[1, 2],
        attention_res=[4],
        train_batch_size=4,
        max_train_steps=3,
        lr_warmup_steps=1,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=2,
        validation_inference_steps=2,
        report_to="none",
        class_column="none",  # these tests are about the latent cache and trainer: no auto classes,
        adapt_vae="off",  # and the tiny random VAE as it is (tests/test_own_data.py covers both)
    )
    settings.update(overrides)
    return LatentTrainConfig(**settings)


class EncoderCalls:
    """Counts forward calls of the VAE's real encoder; optionally raises after `fail_after` calls (an interrupt)."""

    def __init__(self, vae: AutoencoderKL, fail_after: int | None = None):
        self.count = 0
        self.fail_after = fail_after
        self.handle = vae.encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.count += 1
        if self.fail_after is not None and self.count >= self.fail_after:
            raise KeyboardInterrupt("simulated interrupt during encoding")

    def remove(self) -> None:
        self.handle.remove()


def build_cache(config: LatentTrainConfig, vae: AutoencoderKL, chunk_size: int = 4):
    data = load_images(config, for_latents=True, show_progress=False)
    cache = load_or_build_latent_cache(
        data,
        vae,
        latent_cache_dir(config),
        preprocessing=preprocessing_key(config),
        random_flip=config.random_flip,
        dtype=config.latent_cache_dtype,
        batch_size=config.vae_batch_size,
        chunk_size=chunk_size,
        show_progress=False,
    )
    return data, cache


def test_latent_round_trip_shapes_and_scaling(image_dir, vae_dir, tmp_path):
    config = make_config(image_dir, vae_dir, tmp_path, random_flip=True, latent_cache_dtype="float32")
    vae = load_vae(config.pretrained_vae_name_or_path)
    space = build_latent_space(config, vae, show_progress=False)
    assert (space.channels, space.sample_size, len(space)) == (4, RESOLUTION // 2, NUM_IMAGES)

    # the cache holds exactly what the encoder says, for the image and its mirror image
    crops = space.data.center_crops().float() / 127.5 - 1.0
    mean, logvar = encode_posterior(vae, crops)
    mean_flipped, logvar_flipped = encode_posterior(vae, crops.flip(3))
    assert torch.equal(torch.from_numpy(np.array(space.cache.mean[:, 0])), mean)
    assert torch.equal(torch.from_numpy(np.array(space.cache.logvar[:, 0])), logvar)
    assert torch.equal(torch.from_numpy(np.array(space.cache.mean[:, 1])), mean_flipped)

    # no scaling factor in the VAE config: measured so the training latents have zero mean and unit variance
    scale, shift, source = resolve_scaling(vae, space.cache)
    assert source.startswith("measured") and (space.scaling_factor, space.shift_factor) == (scale, shift)
    indices = torch.arange(NUM_IMAGES).repeat(20)
    x0 = space.x0(indices, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x0.shape == (len(indices), 4, RESOLUTION // 2, RESOLUTION // 2) and x0.dtype == torch.float32
    assert abs(x0.std().item() - 1.0) < 0.05 and abs(x0.mean().item()) < 0.05

    # x0 is exactly: one coin per image picks the variant, then z = mean + std * eps, scaled; same draws, same batch
    generator = torch.Generator().manual_seed(0)
    flipped = torch.rand(len(indices), generator=generator) < 0.5
    eps = torch.randn(x0.shape, generator=generator)
    chosen_mean = torch.where(flipped.view(-1, 1, 1, 1), mean_flipped[indices], mean[indices])
    chosen_logvar = torch.where(flipped.view(-1, 1, 1, 1), logvar_flipped[indices], logvar[indices])
    expected = (chosen_mean + torch.exp(0.5 * chosen_logvar) * eps - shift) * scale
    assert 0 < int(flipped.sum()) < len(indices)
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0, space.x0(indices, torch.Generator().manual_seed(0), torch.device("cpu")))
    unscaled = unscale_latents(x0, scale, shift)

    # latents kept on a device (GPU runs; forced onto the CPU here) give the same posteriors as the memory map
    variants = (torch.arange(len(indices)) % 2).long()
    from_map = space.cache.posterior(indices, variants)
    assert not space.cache.keep_on_device("cpu", max_bytes=16) and space.cache.resident_device is None
    assert space.cache.keep_on_device("cpu", max_bytes=10**8) and space.cache.resident_device == torch.device("cpu")
    assert all(torch.equal(a, b) for a, b in zip(space.cache.posterior(indices, variants), from_map))
    assert torch.equal(x0, space.x0(indices, torch.Generator().manual_seed(0), torch.device("cpu")))

    # decoding the unscaled latents gives images of the training resolution
    images = vae.decode(unscaled[:2]).sample
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)

    # an explicit --scaling_factor wins; the reference images are real uint8 crops
    assert resolve_scaling(vae, space.cache, 0.5)[0] == 0.5
    reference = space.reference_images(3)
    assert reference.dtype == torch.uint8 and reference.shape == (3, 3, RESOLUTION, RESOLUTION)


def test_cache_reused_then_rebuilt_after_vae_or_preprocessing_change(image_dir, vae_dir, tmp_path):
    config = make_config(image_dir, vae_dir, tmp_path)
    vae = load_vae(config.pretrained_vae_name_or_path)
    calls = EncoderCalls(vae)
    _, first = build_cache(config, vae)
    assert calls.count == 3 and first.encoded_images == NUM_IMAGES  # 10 images in batches of 4
    assert first.mean.dtype == np.float16  # the default storage dtype

    _, reused = build_cache(config, vae)
    assert calls.count == 3 and reused.encoded_images == 0 and reused.folder == first.folder
    assert np.array_equal(reused.mean, first.mean) and np.array_equal(reused.logvar, first.logvar)

    with torch.no_grad():  # new VAE weights -> a different key, a fresh encode
        vae.encoder.conv_in.bias.add_(0.01)
    _, after_vae = build_cache(config, vae)
    assert calls.count == 6 and after_vae.folder != first.folder and not np.array_equal(after_vae.mean, first.mean)

    config.background = "black"  # new preprocessing -> new pixels -> new key
    _, after_preprocessing = build_cache(config, vae)
    assert calls.count == 9 and after_preprocessing.folder not in (first.folder, after_vae.folder)
    calls.remove()


def test_corrupted_cache_is_detected_and_rebuilt(image_dir, vae_dir, tmp_path):
    config = make_config(image_dir, vae_dir, tmp_path)
    vae = load_vae(config.pretrained_vae_name_or_path)
    _, original = build_cache(config, vae)
    expected_mean, expected_logvar = np.array(original.mean), np.array(original.logvar)
    folder = original.folder
    del original

    # flip bytes inside the second chunk (images 4..7) of mean.npy: only that chunk is re-encoded
    path = folder / "mean.npy"
    raw = bytearray(path.read_bytes())
    row_bytes = expected_mean[0].nbytes
    data_start = len(raw) - expected_mean.nbytes
    for offset in range(data_start + 5 * row_bytes, data_start + 5 * row_bytes + 16):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    calls = EncoderCalls(vae)
    with pytest.warns(UserWarning, match="checksum"):
        _, repaired = build_cache(config, vae)
    assert calls.count == 1 and repaired.encoded_images == 4
    assert np.array_equal(repaired.mean, expected_mean) and np.array_equal(repaired.logvar, expected_logvar)
    del repaired

    # a truncated file (wrong size) makes the whole cache rebuild
    path = folder / "logvar.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="rebuilding"):
        _, rebuilt = build_cache(config, vae)
    assert calls.count == 1 + 3 and rebuilt.encoded_images == NUM_IMAGES
    assert np.array_equal(rebuilt.logvar, expected_logvar)
    calls.remove()


def test_a_load_reads_no_latent_and_damage_is_found_on_first_read(image_dir, vae_dir, tmp_path):
    """Bytes flipped in the second chunk's rows of mean.npy with the file's time kept (so the load's size-and-time
    check cannot see it): the load encodes nothing and checks no row; the first chunk reads fine; reading an image
    of the damaged chunk stops with an error naming the chunk and what to do; the next load re-encodes that chunk
    alone (4 images, one encoder batch) and its latents are the original ones."""
    from crispdiff.core.errors import DataError

    config = make_config(image_dir, vae_dir, tmp_path)
    vae = load_vae(config.pretrained_vae_name_or_path)
    _, original = build_cache(config, vae)
    expected = np.array(original.mean)
    path = original.folder / "mean.npy"
    del original
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    data_start = len(raw) - expected.nbytes
    raw[data_start + 5 * expected[0].nbytes + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    calls = EncoderCalls(vae)
    _, cache = build_cache(config, vae)
    assert cache.encoded_images == 0 and calls.count == 0 and not cache._check.checked.any(), "no latent read"
    mean, _ = cache.posterior(torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert torch.equal(mean, torch.from_numpy(expected[:4, 0].astype(np.float32)))
    with pytest.raises(DataError, match=r"latent cache .* is damaged: the latents of image 5 \(chunk 000001\.json\)"):
        cache.posterior(torch.tensor([4, 5]), torch.zeros(2, dtype=torch.long))
    del cache

    _, repaired = build_cache(config, vae)
    assert repaired.encoded_images == 4 and calls.count == 1
    assert np.array_equal(repaired.mean, expected)
    calls.remove()


def test_interrupted_encode_resumes(image_dir, vae_dir, tmp_path):
    config = make_config(image_dir, vae_dir, tmp_path, vae_batch_size=2)
    vae = load_vae(config.pretrained_vae_name_or_path)
    # chunks of 4 images = 2 encoder batches each; interrupt during the 5th batch (the 3rd chunk)
    calls = EncoderCalls(vae, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, vae)
    calls.remove()

    calls = EncoderCalls(vae)
    _, resumed = build_cache(config, vae)
    assert resumed.encoded_images == NUM_IMAGES - 8 and calls.count == 1  # only the last chunk (images 8, 9)
    calls.remove()

    other = make_config(image_dir, vae_dir, tmp_path / "fresh", vae_batch_size=2)
    _, fresh = build_cache(other, vae)
    assert np.array_equal(resumed.mean, fresh.mean) and np.array_equal(resumed.logvar, fresh.logvar)


def test_train_latent_calibrates_the_unsharp_amount_it_saves(image_dir, vae_dir, tmp_path):
    """--sharpen_calibration_images: the saved amount is the sweep's best on the final model, not the flag's."""
    from crispdiff.evaluate.sharpen import SHARPEN_SWEEP_AMOUNTS
    from crispdiff.latent.trainer import train_latent

    config = make_config(image_dir, vae_dir, tmp_path, sharpen_amount=1.0, sharpen_calibration_images=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline_dir = train_latent(config)
    sweep = json.loads((pipeline_dir.parent / "sharpen_calibration.json").read_text())
    rows = sweep["rows"]
    assert [row["amount"] for row in rows] == list(SHARPEN_SWEEP_AMOUNTS) and sweep["pipeline_amount"] == 1.0
    hf = [row["hf_energy_ratio"] for row in rows]
    assert all(a < b for a, b in zip(hf, hf[1:]))  # each amount really sharpened the same samples more

    def mismatch(row: dict) -> float:
        return max(abs(row["hf_energy_ratio"] - 1), abs(row["laplacian_var_ratio"] - 1))

    # a tiny VAE after 3 steps decodes soft (ratios ~0.75 at the flag's 1.0): the sweep must ask for more
    assert sweep["best_amount"] == min(rows, key=mismatch)["amount"] > 1.0
    assert json.loads((pipeline_dir / "model_index.json").read_text())["sharpen_amount"] == sweep["best_amount"]
    with pytest.raises(ValueError, match="sharpen_calibration_images"):
        make_config(image_dir, vae_dir, tmp_path, sharpen_calibration_images=-1).resolve()


def test_train_latent_writes_a_pipeline_that_reloads_with_the_frozen_vae(image_dir, vae_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from crispdiff.latent.trainer import train_latent

    config = make_config(image_dir, vae_dir, tmp_path, random_flip=True, sharpen_amount=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline_dir = train_latent(config)
    assert pipeline_dir is not None and (pipeline_dir / "samples.png").is_file()
    assert json.loads((pipeline_dir / "model_index.json").read_text())["sharpen_amount"] == 0.25

    # the VAE was frozen: the saved weights are the original ones, bit for bit
    original = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    assert original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)

    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir, trust_remote_code=True)
    assert pipeline.unet.config.in_channels == 4 and pipeline.unet.config.sample_size == RESOLUTION // 2
    assert pipeline.config.latent_scaling_factor > 0
    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(images).all()
    # the output is clamped to [0, 1], so check what the clamp would hide: a wrong latent scale saturates it
    saturated = ((images == 0) | (images == 1)).float().mean().item()
    assert saturated < 0.25, f"{saturated:.0%} of the pixels are clipped: is the latent scaling applied?"


def test_latent_space_freezes_the_vae(image_dir, vae_dir, tmp_path):
    config = make_config(image_dir, vae_dir, tmp_path)
    vae = AutoencoderKL.from_pretrained(vae_dir).train().requires_grad_(True)  # as if handed over unfrozen
    space = build_latent_space(config, vae, show_progress=False)
    assert isinstance(space, LatentSpace) and not space.vae.training
    assert not any(p.requires_grad for p in space.vae.parameters())


def test_default_command_uses_embedded_data_and_vae(tmp_path):
    config = parse_config(LatentTrainConfig, [])
    assert config.pretrained_vae_name_or_path is None
    assert Path(config.resolved_vae_path()) == embedded_vae_dir()
    assert config.train_data_dir is None and config.dataset_name is None
    assert (config.resolution, config.vae_trainable) == (64, "none")
    # the embedded decoder's measured post-sharpening is the default only for the embedded VAE; the main job
    # autoguides, which sharpens by itself, so it gets the amount measured with autoguidance
    assert config.autoguidance_scale > 1 and config.sharpen_amount == EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED > 0
    unguided = parse_config(LatentTrainConfig, ["--autoguidance_scale", "1"])
    assert unguided.sharpen_amount == EMBEDDED_VAE_SHARPEN_AMOUNT > EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED
    assert parse_config(LatentTrainConfig, ["--pretrained_vae_name_or_path", "x"]).sharpen_amount == 0.0
    assert parse_config(LatentTrainConfig, ["--sharpen_amount", "0"]).sharpen_amount == 0.0
    # the main job is class-conditional on the embedded emoji's subcategories; other data on auto classes
    assert config.class_column == EMBEDDED_CLASS_COLUMN == "subcategory"
    off = parse_config(LatentTrainConfig, ["--class_column", "none"])
    assert off.resolve() is off  # train_latent resolves again: "none" must stay off, not become the default
    assert off.class_column == "none" and off.cache_dir is None
    off = off.with_values(cache_dir=str(tmp_path), max_train_samples=20)
    assert load_images(off, for_latents=True, show_progress=False).class_names is None
    own_data = ["--train_data_dir", str(tmp_path)]
    assert parse_config(LatentTrainConfig, own_data).class_column == "auto"
    assert config.adapt_vae == "auto" and config.guidance_interval == [0.28, 5.42]
    assert parse_config(LatentTrainConfig, [*own_data, "--class_column", "x"]).class_column == "x"
    config = config.with_values(cache_dir=str(tmp_path), max_train_samples=100)
    data = load_images(config, for_latents=True, show_progress=False)
    assert "embedded" in data.source and data.resolution == 64
    assert len(data.class_names) >= 2 and len(data.class_ids) == 100


def test_main_job_shifts_a_shiftable_schedule_and_conditions_through_the_norms():
    """The latent trainer's defaults: AdaGN and a -1 nat log-SNR shift on the cosine schedule. The shift is resolved
    from the schedule, so `--beta_schedule linear` (which cannot be shifted) works without also passing
    `--snr_shift 0`, while an explicit shift of a linear schedule is still refused."""
    config = parse_config(LatentTrainConfig, [])
    assert unet_from_config(config, resolution=16, in_channels=8).config.resnet_time_scale_shift == "scale_shift"
    assert (config.beta_schedule, config.snr_shift) == ("cosine", MAIN_JOB_SNR_SHIFT) and MAIN_JOB_SNR_SHIFT < 0
    assert parse_config(LatentTrainConfig, ["--beta_schedule", "sigmoid"]).snr_shift == MAIN_JOB_SNR_SHIFT
    assert parse_config(LatentTrainConfig, ["--beta_schedule", "linear"]).snr_shift == 0.0
    assert parse_config(LatentTrainConfig, ["--snr_shift", "0"]).snr_shift == 0.0
    with pytest.raises(FlagError, match="--snr_shift applies to the cosine and sigmoid schedules"):
        parse_config(LatentTrainConfig, ["--beta_schedule", "linear", "--snr_shift", "-1"])
    # the shift reaches the betas the trainer uses: every step away from the capped ends is noisier than unshifted
    shifted = NoiseSchedule(betas_from_config(config)).snr
    unshifted = NoiseSchedule(betas_from_config(parse_config(LatentTrainConfig, ["--snr_shift", "0"]))).snr
    ratio = (shifted / unshifted)[50:-50]
    assert torch.allclose(ratio, torch.full_like(ratio, math.exp(MAIN_JOB_SNR_SHIFT)), rtol=1e-3)


def test_unsupported_flags_are_rejected_with_the_alternative():
    with pytest.raises(ValueError, match="train_decoder_only"):
        parse_config(LatentTrainConfig, ["--vae_trainable", "decoder"])
    with pytest.raises(ValueError, match="pixel augmentations"):
        parse_config(LatentTrainConfig, ["--color_jitter", "0.1"])
    with pytest.raises(ValueError, match="pixel augmentations"):
        parse_config(LatentTrainConfig, ["--color_remap_prob", "0.5"])


@pytest.mark.slow
def test_two_processes_encode_once(image_dir, vae_dir, tmp_path):
    """Under `accelerate launch` with two CPU processes, rank 0 encodes and rank 1 reuses the finished cache."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(repo / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", "29631",
        str(repo / "train_scripts" / "train_latent.py"),
        "--train_data_dir", str(image_dir), "--pretrained_vae_name_or_path", str(vae_dir),
        "--resolution", str(RESOLUTION), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
        "--base_channels", "8", "--channel_mults", "1", "2", "--attention_res", "4", "--train_batch_size", "2",
        "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--report_to", "none",
        "--adapt_vae", "always", "--adapt_vae_steps", "3", "--num_auto_classes", "2",
    ]  # fmt: skip
    records = tmp_path / "records"
    (tmp_path / "record_launcher.py").write_text(record_launcher(str(records)))
    command.insert(command.index(str(repo / "train_scripts" / "train_latent.py")), str(tmp_path / "record_launcher.py"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count(f"(encoded {NUM_IMAGES} image(s))") == 1 and "2 process(es)" in output
    # the UNet's 2 steps: each rank its own slice of the latents and its own noise (the VAE stage's 32-image global
    # batch repeats the 9 images it trains on, so only the last 2 micro-steps' data are disjoint by construction)
    assert_ranks_saw_different_data_and_noise(records, last_micro_steps=2)
    # the VAE adaptation ran distributed too (one process group, one saved VAE) before the UNet, on auto classes
    assert output.count("VAE adapted:") == 1 and "2 auto classes" in output
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def test_main_job_precision_steps_and_learning_rate_defaults_follow_each_other():
    """``--mixed_precision auto`` is bf16 exactly where the machine runs it natively; a bf16 main job takes
    MAIN_JOB_BF16_STEPS instead of MAIN_JOB_STEPS unless the user chose the length; the default learning rate follows
    the run's steps and width, and a rate the user gave stays."""
    from crispdiff.core.config import resolve_mixed_precision
    from crispdiff.core.cores import native_bf16
    from crispdiff.latent.trainer import MAIN_JOB_BF16_STEPS, MAIN_JOB_LR, MAIN_JOB_STEPS, main_job_learning_rate

    assert resolve_mixed_precision("auto") == ("bf16" if native_bf16() else None)
    assert resolve_mixed_precision("no") == "no"
    bf16 = parse_config(LatentTrainConfig, ["--mixed_precision", "bf16"])
    fp32 = parse_config(LatentTrainConfig, ["--mixed_precision", "no"])
    assert (bf16.max_train_steps, fp32.max_train_steps) == (MAIN_JOB_BF16_STEPS, MAIN_JOB_STEPS)
    chosen = parse_config(LatentTrainConfig, ["--mixed_precision", "bf16", "--max_train_steps", "700"])
    assert chosen.max_train_steps == 700
    assert bf16.learning_rate == fp32.learning_rate == MAIN_JOB_LR  # up to 1,000 steps of the 32-channel UNet
    assert main_job_learning_rate(4000, 32) == pytest.approx(MAIN_JOB_LR / 2)
    assert main_job_learning_rate(1000, 64) == pytest.approx(MAIN_JOB_LR / 2)
    longer = parse_config(LatentTrainConfig, ["--max_train_steps", "4000", "--base_channels", "64"])
    assert longer.learning_rate == pytest.approx(MAIN_JOB_LR / 4)
    given = parse_config(LatentTrainConfig, ["--max_train_steps", "4000", "--learning_rate", "1e-3"])
    assert given.learning_rate == 1e-3
