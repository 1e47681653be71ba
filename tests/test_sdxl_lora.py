"""LoRA / DreamBooth-LoRA on SDXL, with a tiny real SDXL built from configs (no weights downloaded).

The base is a real ``StableDiffusionXLPipeline`` folder (``tiny_models.make_tiny_sdxl``): a UNet with SDXL's
``text_time`` added conditioning, an f=4 VAE, ``CLIPTextModel`` + ``CLIPTextModelWithProjection`` and two offline
tokenizers. Images are 32 px (8 x 8 latents). What a user does afterwards is done with plain diffusers:
``StableDiffusionXLPipeline.from_pretrained(base)`` + ``load_lora_weights(output_dir)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import SDXL_RES, make_tiny_sd, make_tiny_sdxl

from crispdiff.core.errors import FlagError, UserError
from crispdiff.core.flags import parse_config
from crispdiff.sd.config import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    DreamBoothLoRAConfig,
    SDLoRAError,
    SDXLDreamBoothLoRAConfig,
    SDXLTextToImageLoRAConfig,
    TextToImageLoRAConfig,
)
from crispdiff.sd.trainer import train_dreambooth_lora, train_text_to_image_lora

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"
RES = SDXL_RES

#: The subject pictures: (height, width) of each file, none of them square, so the crops have room to move.
SUBJECT_SIZES = [(40, 56), (56, 40), (48, 64), (36, 36)]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def disc_pictures(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """A coloured disc on a coloured background per size, saved as PNG files 00.png, 01.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        yy, xx = np.mgrid[:height, :width]
        image = np.empty((height, width, 3), np.uint8)
        image[:] = rng.integers(0, 255, 3)
        disc = (yy - height // 2) ** 2 + (xx - width // 3) ** 2 < (min(height, width) // 3) ** 2
        image[disc] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    return disc_pictures(tmp_path_factory.mktemp("subject"), SUBJECT_SIZES)


@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory) -> Path:
    folder = disc_pictures(tmp_path_factory.mktemp("captioned"), SUBJECT_SIZES, seed=1)
    colours = ["red", "green", "blue", "grey"]
    rows = [{"file_name": f"{i:02d}.png", "text": f"sks dog {colours[i]}"} for i in range(len(SUBJECT_SIZES))]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def common_flags(base: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--cache_dir", str(cache),
        "--resolution", str(RES), "--train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
        "--num_validation_images", "2", "--validation_inference_steps", "3", "--vae_batch_size", "4",
        "--cpu_threads", "1",
    ]  # fmt: skip


def plain_sdxl(base: Path, lora: Path | None = None, weight_name: str | None = None, vae: Path | None = None):
    """What a user gets with diffusers alone: the SDXL base (and a VAE), load_lora_weights, DPM-Solver++."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    extra = {"vae": AutoencoderKL.from_pretrained(vae)} if vae is not None else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(base, add_watermarker=False, **extra)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), **({"weight_name": weight_name} if weight_name else {}))
    return pipe


def images_of(pipe, prompt: str = PROMPT, count: int = 2, steps: int = 3, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(
        [prompt] * count,
        num_inference_steps=steps,
        height=RES,
        width=RES,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images


def grid_tensor(path: Path, count: int = 2) -> torch.Tensor:
    """The images of a 1 x ``count`` sample grid as [count, 3, RES, RES] in [0, 1] (grids are uint8)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return torch.stack([tensor[:, :, i * RES : (i + 1) * RES] for i in range(count)])


def logged_scalars(out: Path, tag: str) -> list[float]:
    """Every value logged under ``tag`` to the run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard events under {out / 'logs'}"
    accumulator = EventAccumulator(str(events[-1].parent))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


# ----------------------------------------------------------------------------------------------------------------------


def test_dreambooth_sdxl_lora_on_both_text_encoders_loads_in_plain_diffusers(tiny_sdxl, subject_dir, tmp_path, capsys):
    """DreamBooth on SDXL with prior preservation (class images generated and trained on), LoRA on the UNet and both
    text encoders, random flips, the kohya copy: finite losses (the class half too), trained weights, and a file plain
    diffusers loads into both text encoders and the UNet, giving the images the run's own final samples show."""
    from safetensors import safe_open

    out = tmp_path / "out"
    flags = common_flags(tiny_sdxl, out, tmp_path / "cache") + [
        "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--random_flip",
        "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a photo of dog",
        "--num_class_images", "3", "--sample_batch_size", "2", "--class_inference_steps", "2",
        "--train_text_encoder", "--text_encoder_lr", "1e-2", "--rank", "4", "--lora_alpha", "8",
        "--max_train_steps", "3", "--checkpointing_steps", "0", "--validation_steps", "0", "--logging_steps", "1",
        "--report_to", "tensorboard", "--validation_prompt", PROMPT, "--output_kohya_format",
    ]  # fmt: skip
    path = train_dreambooth_lora(parse_config(SDXLDreamBoothLoRAConfig, flags))
    assert path == out / LORA_WEIGHTS_NAME
    log = capsys.readouterr().out
    assert "on 4 images + 3 class images, text encoders trained, SDXL micro-conditioning" in log
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    losses, prior = logged_scalars(out, "train/loss"), logged_scalars(out, "train/prior")
    assert len(losses) == len(prior) == 3 and all(np.isfinite(losses + prior)) and min(prior) > 0

    with safe_open(str(path), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        ups = [v for k, v in state.items() if k.startswith(part) and ("lora.up" in k or "lora_linear_layer.up" in k)]
        assert ups and any(v.abs().max() > 0 for v in ups), f"{part}: no trained LoRA weights"  # initialised at 0
    assert metadata["unet.lora_alpha"] == metadata["text_encoder_2.lora_alpha"] == 8

    base = plain_sdxl(tiny_sdxl)
    loaded = plain_sdxl(tiny_sdxl, out)
    assert any("lora" in name for name, _ in loaded.text_encoder_2.named_parameters())
    with torch.no_grad():  # both text encoders' LoRA act: both halves of the hidden states and the pooled embedding
        theirs = base.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        ours = loaded.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    for half in (slice(0, 16), slice(16, 32)):
        assert (ours[0][..., half] - theirs[0][..., half]).abs().max() > 1e-3
    assert (ours[2] - theirs[2]).abs().max() > 1e-3
    loaded_images, base_images = images_of(loaded), images_of(base)
    assert (loaded_images - base_images).abs().max() > 0.02
    assert (loaded_images - grid_tensor(out / "samples.png")).abs().max() <= 1.0 / 255 + 1e-6

    with safe_open(str(out / KOHYA_WEIGHTS_NAME), "pt") as handle:
        kohya_keys = list(handle.keys())
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in kohya_keys), prefix
    kohya = images_of(plain_sdxl(tiny_sdxl, out, weight_name=KOHYA_WEIGHTS_NAME))
    torch.testing.assert_close(kohya, loaded_images, atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "stable-diffusion-xl" in card


def test_micro_conditioning_names_the_crop_that_was_encoded(tiny_sdxl, tmp_path):
    """The time ids of every cached latent: the file's size (EXIF rotation applied), the crop's corner in the image
    resized to 32 px on its short side (mirrored for a flipped variant), the target size; and the pixels at that
    corner are the ones the latent cache encoded. One case worked by hand."""
    from crispdiff.sd.base import load_sd
    from crispdiff.sd.micro_conditioning import micro_conditioning
    from crispdiff.sd.prompts import image_view, latent_space

    folder = disc_pictures(tmp_path / "pictures", [(40, 56), (56, 40), (32, 32)])
    rotated = Image.open(folder / "00.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a 40 x 56 file is a 56 x 40 picture
    rotated.save(folder / "03.jpg", exif=exif.tobytes())
    names = ["00.png", "01.png", "02.png", "03.jpg"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in names))
    vae = load_sd(str(tiny_sdxl)).vae
    for center, positions in ((False, [0.0, 0.5, 1.0]), (True, [None])):
        flags = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--train_data_dir", str(folder),
                 "--resolution", str(RES), "--cache_dir", str(tmp_path / "cache"), "--random_flip",
                 *(["--center_crop"] if center else ["--random_crop_positions", "3"])]  # fmt: skip
        config = parse_config(SDXLTextToImageLoRAConfig, flags)
        view = image_view(config)
        space, data = latent_space(view, config, vae, False)
        micro = micro_conditioning(view, data, space.cache.spec)
        assert micro.original_sizes.tolist() == [[40, 56], [56, 40], [32, 32], [56, 40]]
        assert space.cache.num_variants == 2 * len(positions)
        for variant in range(space.cache.num_variants):
            rows = torch.arange(len(data))
            ids = micro.time_ids(rows, torch.full_like(rows, variant))
            assert ids[:, 4:].tolist() == [[RES, RES]] * len(data)
            if center:
                continue
            position, flipped = positions[variant // 2], variant % 2
            encoded = data.crops_at(position)  # what the cache encoded for this crop position
            for i in range(len(data)):
                top, left = (int(v) for v in ids[i, 2:4])
                stored = data.stored_image(i)
                if flipped:  # the crop as seen in the mirrored picture
                    stored = stored[:, ::-1]
                crop = torch.from_numpy(np.ascontiguousarray(stored[top : top + RES, left : left + RES]))
                expected = encoded[i].permute(1, 2, 0).flip(1) if flipped else encoded[i].permute(1, 2, 0)
                assert torch.equal(crop, expected), (i, variant)
        # by hand: 40 x 56 -> 32 x 45 (x 0.8); its last crop starts at column 13, mirrored at 45 - 32 - 13 = 0
        first = micro.time_ids(torch.tensor([0, 0]), torch.tensor([4, 5]) if not center else torch.tensor([0, 1]))
        if center:
            assert first.tolist() == [[40, 56, 0, 6, RES, RES], [40, 56, 0, 7, RES, RES]]  # (45 - 32) // 2 = 6
        else:
            assert first.tolist() == [[40, 56, 0, 13, RES, RES], [40, 56, 0, 0, RES, RES]]


def test_training_gives_the_unet_the_drawn_crops_time_ids(tiny_sdxl, captioned_dir, tmp_path):
    """What the UNet receives in training (a forward hook on the real UNet, nothing replaced): one time-ids row per
    latent, each the micro-conditioning of an image of the batch at one of its cached crops, with the pooled text
    embedding beside it."""
    from crispdiff.sd.prompts import captions_for, image_view, latent_space, train_set
    from crispdiff.sd.trainer import SDLoRATrainer, _prepare, prompt_bank

    flags = common_flags(tiny_sdxl, tmp_path / "out", tmp_path / "cache") + [
        "--train_data_dir", str(captioned_dir), "--max_train_steps", "2", "--checkpointing_steps", "0",
        "--validation_steps", "0", "--random_flip",
    ]  # fmt: skip
    config = parse_config(SDXLTextToImageLoRAConfig, flags)
    accelerator, parts = _prepare(config)
    view = image_view(config)
    space, data = latent_space(view, config, parts.vae, False)
    captions = captions_for(data, None)
    prompts = prompt_bank(config, parts, captions)
    instance = train_set(view, space, data, prompts.ids(captions), parts)
    trainer = SDLoRATrainer(config, accelerator, parts, prompts, instance)
    seen = []
    hook = parts.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    try:
        trainer.optimizer_step()
    finally:
        hook.remove()
    assert len(seen) == 1
    time_ids, pooled = seen[0]["time_ids"], seen[0]["text_embeds"]
    assert time_ids.shape == (2, 6) and pooled.shape == (2, 16)
    variants = torch.arange(space.cache.num_variants)
    every = {
        tuple(row)
        for i in range(len(data))
        for row in instance.micro.time_ids(torch.full_like(variants, i), variants).tolist()
    }
    assert all(tuple(row) in every for row in time_ids.tolist())
    assert {row[:2] for row in every} == {(40, 56), (56, 40), (48, 64), (36, 36)}  # the files' own sizes


def test_text_to_image_sdxl_script_with_a_vae_exports_a_pipeline_that_upscales(tiny_sdxl, captioned_dir, tmp_path):
    """`accelerate launch` of the text-to-image SDXL script with --pretrained_vae_model_name_or_path (a VAE of its own
    weights, as the fp16-fix VAE is) and --save_pipeline with an SR model: the exported folder carries that VAE, gives
    the images of plain diffusers with the same VAE and the LoRA, and upscales 32 -> 128 px by default."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from spandrel.architectures.Compact import Compact

    vae_dir = tmp_path / "fp16-fix-vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.mul_(1.05)  # a different decoder: its images tell which VAE a pipeline holds
    vae.save_pretrained(vae_dir)
    torch.manual_seed(3)
    sr = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
    torch.save({"params": dict(sr.state_dict())}, tmp_path / "compact_x4.pth")

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        str(REPO / "train_scripts" / "train_text_to_image_lora_sdxl.py"),
        *common_flags(tiny_sdxl, out, tmp_path / "cache"),
        "--pretrained_vae_model_name_or_path", str(vae_dir), "--train_data_dir", str(captioned_dir),
        "--caption_column", "text", "--max_train_steps", "3", "--checkpointing_steps", "0", "--validation_steps", "0",
        "--validation_prompt", "sks dog", "--save_pipeline",
        "--sr_model_name_or_path", str(tmp_path / "compact_x4.pth"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_crispdiff_sd", "CrispDiffSDXLPipeline"]
    assert index["sr_model"] == ["sr_model", "SpandrelSRModel"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    saved = dict(pipe.vae.decoder.named_parameters())
    assert all(torch.equal(saved[k], v) for k, v in vae.decoder.named_parameters())
    native = images_of(pipe, "sks dog", upscale=False)
    with_vae = images_of(plain_sdxl(tiny_sdxl, out, vae=vae_dir), "sks dog")
    without_vae = images_of(plain_sdxl(tiny_sdxl, out), "sks dog")
    assert (native - with_vae).abs().max() <= 1e-4  # the LoRA fused, the run's VAE: plain diffusers' images
    assert (native - without_vae).abs().max() > 1e-3  # (the base's VAE would give others)
    upscaled = images_of(pipe, "sks dog")
    assert upscaled.shape == (2, 3, 4 * RES, 4 * RES) and native.shape == (2, 3, RES, RES)
    small = images_of(pipe, "sks dog", upscale=False, output_size=16)
    assert small.shape == (2, 3, 16, 16)


def test_export_sd_fuses_an_sdxl_lora_and_its_kohya_copy(tiny_sdxl, captioned_dir, tmp_path):
    """`crispdiff export-sd` on an SDXL base: the diffusers file and the kohya copy (text encoders included) fuse into
    the same model, the one plain diffusers gives with load_lora_weights; the folder reloads with SR and upscales."""
    from diffusers import DiffusionPipeline
    from spandrel.architectures.Compact import Compact

    from crispdiff.cli import main

    out = tmp_path / "out"
    flags = common_flags(tiny_sdxl, out, tmp_path / "cache") + [
        "--train_data_dir", str(captioned_dir), "--train_text_encoder", "--rank", "2", "--lora_alpha", "3",
        "--max_train_steps", "2", "--checkpointing_steps", "0", "--num_validation_images", "0", "--export_kohya",
    ]  # fmt: skip
    train_text_to_image_lora(parse_config(SDXLTextToImageLoRAConfig, flags))
    torch.manual_seed(3)
    sr = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2, act_type="prelu")
    torch.save({"params": dict(sr.state_dict())}, tmp_path / "compact_x2.pth")
    fused = {}
    for name, lora in (("diffusers", out), ("kohya", out / KOHYA_WEIGHTS_NAME)):
        folder = tmp_path / name
        argv = ["export-sd", "--base", str(tiny_sdxl), "--lora", str(lora), "--output_dir", str(folder)]
        assert main([*argv, "--sr_model", str(tmp_path / "compact_x2.pth")]) == 0
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == "CrispDiffSDXLPipeline"
        fused[name] = images_of(pipe, "sks dog", upscale=False)
        assert images_of(pipe, "sks dog", count=1).shape == (1, 3, 2 * RES, 2 * RES)
    loaded = images_of(plain_sdxl(tiny_sdxl, out), "sks dog")
    assert (loaded - images_of(plain_sdxl(tiny_sdxl), "sks dog")).abs().max() > 0.02
    torch.testing.assert_close(fused["diffusers"], loaded, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused["kohya"], loaded, atol=1e-4, rtol=0)


def test_sdxl_dreambooth_resumes_exactly_with_both_text_encoders(tiny_sdxl, subject_dir, tmp_path):
    """4 steps straight == 3 steps (checkpoint at 2) resumed to 4, bit for bit, with LoRA on both text encoders
    (each checkpointed in a file of its own) and random crops and flips drawn per step."""
    from safetensors.torch import load_file

    def run(out: Path, steps: int, *extra: str) -> Path | None:
        flags = common_flags(tiny_sdxl, out, tmp_path / "cache") + [
            "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--train_text_encoder",
            "--random_flip", "--lora_dropout", "0.1", "--max_train_steps", str(steps), "--validation_steps", "0",
            "--num_validation_images", "0", *extra,
        ]  # fmt: skip
        return train_dreambooth_lora(parse_config(SDXLDreamBoothLoRAConfig, flags))

    straight = run(tmp_path / "a", 4, "--checkpointing_steps", "0")
    run(tmp_path / "b", 3, "--checkpointing_steps", "2")
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "lora_text_encoder_2.safetensors").is_file()
    resumed = run(tmp_path / "b", 4, "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest",
                  "--overwrite_output_dir")  # fmt: skip
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert any(k.startswith("text_encoder_2.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed LoRA diverged"


def test_text_encoder_lr_and_weight_decay_are_their_own(tiny_sdxl, subject_dir, tmp_path):
    """diffusers' SDXL DreamBooth: the text encoders' LoRA learns at --text_encoder_lr with
    --adam_weight_decay_text_encoder, the UNet's at --learning_rate with --adam_weight_decay."""
    from crispdiff.sd.prompts import captions_for, image_view, latent_space, train_set
    from crispdiff.sd.trainer import SDLoRATrainer, _prepare, prompt_bank

    flags = common_flags(tiny_sdxl, tmp_path / "out", tmp_path / "cache") + [
        "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--train_text_encoder",
        "--text_encoder_lr", "3e-3", "--adam_weight_decay_text_encoder", "0.05", "--adam_weight_decay", "0.02",
        "--lr_warmup_steps", "0", "--max_train_steps", "2",
    ]  # fmt: skip
    config = parse_config(SDXLDreamBoothLoRAConfig, flags)
    accelerator, parts = _prepare(config)
    view = image_view(config, train_data_dir=config.instance_data_dir)
    space, data = latent_space(view, config, parts.vae, False)
    captions = captions_for(data, PROMPT)
    prompts = prompt_bank(config, parts, captions)
    instance = train_set(view, space, data, prompts.ids(captions), parts)
    trainer = SDLoRATrainer(config, accelerator, parts, prompts, instance)
    unet_group, text_group = trainer.optimizer.param_groups
    assert (unet_group["lr"], unet_group["weight_decay"]) == (1e-2, 0.02)
    assert (text_group["lr"], text_group["weight_decay"]) == (3e-3, 0.05)
    text_ids = {id(p) for encoder in parts.text_encoders for p in encoder.parameters() if p.requires_grad}
    assert {id(p) for p in text_group["params"]} == text_ids and len(text_ids) > 0


def test_dreambooth_sdxl_from_a_dataset_with_repeats(tiny_sdxl, tmp_path, capsys):
    """--dataset_name instead of --instance_data_dir, captions from its column (empty ones -> the instance prompt),
    and --repeats: 3 images x 2 repeats, batch 2, one epoch = 3 steps."""
    import datasets

    pictures = disc_pictures(tmp_path / "pictures", [(32, 40)] * 3)
    images = [Image.open(p).convert("RGB") for p in sorted(pictures.glob("*.png"))]
    data = datasets.Dataset.from_dict({"image": images, "prompt": ["sks dog left", "", "sks dog right"]})
    data.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "dog"))
    out = tmp_path / "out"
    flags = common_flags(tiny_sdxl, out, tmp_path / "cache") + [
        "--dataset_name", str(tmp_path / "dog"), "--caption_column", "prompt", "--instance_prompt", PROMPT,
        "--repeats", "2", "--num_train_epochs", "1", "--checkpointing_steps", "0", "--num_validation_images", "0",
    ]  # fmt: skip
    assert train_dreambooth_lora(parse_config(SDXLDreamBoothLoRAConfig, flags)) == out / LORA_WEIGHTS_NAME
    assert "3 steps of 2 images" in capsys.readouterr().out
    from crispdiff.data.loading import load_images
    from crispdiff.sd.prompts import captions_for, image_view

    config = parse_config(SDXLDreamBoothLoRAConfig, flags)
    loaded = load_images(image_view(config, train_data_dir=None), for_latents=True, show_progress=False)
    assert captions_for(loaded, PROMPT) == ["sks dog left", PROMPT, "sks dog right"]


def test_each_script_refuses_the_other_familys_base_naming_its_script(tiny_sdxl, subject_dir, tmp_path):
    sd = make_tiny_sd(tmp_path / "sd")
    dreambooth = ["--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path)]
    t2i = ["--train_data_dir", str(subject_dir), "--output_dir", str(tmp_path)]
    cases = [
        (DreamBoothLoRAConfig, tiny_sdxl, dreambooth, train_dreambooth_lora, "train_dreambooth_lora_sdxl.py"),
        (TextToImageLoRAConfig, tiny_sdxl, t2i, train_text_to_image_lora, "train_text_to_image_lora_sdxl.py"),
        (SDXLDreamBoothLoRAConfig, sd, dreambooth, train_dreambooth_lora, "train_dreambooth_lora.py"),
        (SDXLTextToImageLoRAConfig, sd, t2i, train_text_to_image_lora, "train_text_to_image_lora.py"),
    ]
    for config_cls, base, flags, run, script in cases:
        config = parse_config(config_cls, ["--pretrained_model_name_or_path", str(base), *flags])
        refusal = rf"is a StableDiffusion(XL)?Pipeline .*use train_scripts/{script}$"
        with pytest.raises(SDLoRAError, match=refusal) as info:
            run(config)
        assert "\n" not in str(info.value)


def test_sdxl_flags_crispdiff_cannot_honour_are_refused_in_one_line(tiny_sdxl, subject_dir, tmp_path):
    """diffusers' SDXL flags without a crispdiff counterpart, SD-only flags, and an EDM base (Playground v2.5) or a VAE
    with per-channel latent statistics: each refused naming what to drop."""
    base = ["--pretrained_model_name_or_path", str(tiny_sdxl)]
    dreambooth = [*base, "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT]
    t2i = [*base, "--train_data_dir", str(subject_dir)]
    cases = [
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--do_edm_style_training"], "--do_edm_style_training is not"),
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--optimizer", "prodigy"], "--optimizer prodigy is not offered"),
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--prodigy_beta3", "0.9"], "--prodigy_beta3 is not supported"),
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--text_encoder_lr", "1e-4"], "--text_encoder_lr: no effect without"),
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--pre_compute_text_embeddings"], "--pre_compute_text_embeddings"),
        (SDXLDreamBoothLoRAConfig, [*dreambooth, "--dataset_name", "dogs"], "not both"),
        (SDXLDreamBoothLoRAConfig, [*base, "--instance_prompt", PROMPT], "--instance_data_dir or --dataset_name"),
        (SDXLTextToImageLoRAConfig, [*t2i, "--tokenizer_name", "tok"], "--tokenizer_name is not supported here"),
        (SDXLTextToImageLoRAConfig, [*t2i, "--debug_loss"], "--debug_loss is not supported"),
        (SDXLTextToImageLoRAConfig, [*t2i, "--enable_npu_flash_attention"], "--enable_npu_flash_attention is not"),
    ]  # fmt: skip
    for config_cls, argv, expected in cases:
        with pytest.raises(FlagError, match=expected) as info:
            parse_config(config_cls, argv)
        assert "\n" not in str(info.value)
    assert parse_config(SDXLDreamBoothLoRAConfig, [*dreambooth, "--optimizer", "adamw"]).optimizer == "AdamW"

    edm = tmp_path / "edm"
    edm.mkdir()
    for entry in tiny_sdxl.iterdir():
        (edm / entry.name).symlink_to(entry)
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    (edm / "model_index.json").unlink()
    (edm / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EDMEulerScheduler"]}))
    config = parse_config(SDXLTextToImageLoRAConfig, ["--pretrained_model_name_or_path", str(edm), *t2i[2:],
                                                      "--output_dir", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(SDLoRAError, match="EDMEulerScheduler .*Playground"):
        train_text_to_image_lora(config)

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    vae.save_pretrained(tmp_path / "playground_vae")
    config = parse_config(SDXLTextToImageLoRAConfig, [*t2i, "--output_dir", str(tmp_path / "o"),
                                                      "--pretrained_vae_model_name_or_path",
                                                      str(tmp_path / "playground_vae")])  # fmt: skip
    with pytest.raises(SDLoRAError, match="--pretrained_vae_model_name_or_path .*latents_mean"):
        train_text_to_image_lora(config)
    config = parse_config(SDXLTextToImageLoRAConfig, [*t2i, "--output_dir", str(tmp_path / "o"),
                                                      "--pretrained_vae_model_name_or_path", str(tmp_path / "none")])
    with pytest.raises(UserError, match="--pretrained_vae_model_name_or_path") as info:
        train_text_to_image_lora(config)
    assert "\n" not in str(info.value)


#: Every flag of diffusers' SDXL LoRA scripts (examples/dreambooth/train_dreambooth_lora_sdxl.py and
#: examples/text_to_image/train_text_to_image_lora_sdxl.py at huggingface/diffusers 58eb52c, 2026-08), and the ones
#: crispdiff refuses; every other one must be accepted.
DIFFUSERS_SDXL_FLAGS = {
    "train_dreambooth_lora_sdxl.py": (
        "pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name "
        "dataset_config_name instance_data_dir cache_dir image_column caption_column repeats class_data_dir "
        "instance_prompt class_prompt validation_prompt num_validation_images validation_epochs do_edm_style_training "
        "with_prior_preservation prior_loss_weight num_class_images output_dir output_kohya_format seed resolution "
        "center_crop random_flip train_text_encoder train_batch_size sample_batch_size num_train_epochs "
        "max_train_steps checkpointing_steps checkpoints_total_limit resume_from_checkpoint "
        "gradient_accumulation_steps gradient_checkpointing learning_rate text_encoder_lr scale_lr lr_scheduler "
        "snr_gamma lr_warmup_steps lr_num_cycles lr_power dataloader_num_workers optimizer use_8bit_adam adam_beta1 "
        "adam_beta2 prodigy_beta3 prodigy_decouple adam_weight_decay adam_weight_decay_text_encoder adam_epsilon "
        "prodigy_use_bias_correction prodigy_safeguard_warmup max_grad_norm push_to_hub hub_token hub_model_id "
        "logging_dir allow_tf32 report_to mixed_precision prior_generation_precision local_rank "
        "enable_xformers_memory_efficient_attention rank lora_dropout use_dora image_interpolation_mode",
        {"do_edm_style_training", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
         "prodigy_safeguard_warmup"},
    ),
    "train_text_to_image_lora_sdxl.py": (
        "pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name "
        "dataset_config_name train_data_dir image_column caption_column validation_prompt num_validation_images "
        "validation_epochs max_train_samples output_dir cache_dir seed resolution center_crop random_flip "
        "train_text_encoder train_batch_size num_train_epochs max_train_steps checkpointing_steps "
        "checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing "
        "learning_rate scale_lr lr_scheduler lr_warmup_steps snr_gamma allow_tf32 dataloader_num_workers "
        "use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token "
        "prediction_type hub_model_id logging_dir report_to mixed_precision local_rank "
        "enable_xformers_memory_efficient_attention enable_npu_flash_attention noise_offset rank debug_loss "
        "image_interpolation_mode",
        {"enable_npu_flash_attention", "debug_loss"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(DIFFUSERS_SDXL_FLAGS))
def test_every_diffusers_sdxl_flag_is_in_the_scripts_help(script):
    """Each of diffusers' flags is offered by crispdiff's script (refused ones say so in --help)."""
    import re

    from test_diffusers_flags import script_help

    names, refused = DIFFUSERS_SDXL_FLAGS[script]
    help_text = script_help(script)
    offered = set(re.findall(r"(?<![\w-])--([a-z0-9_]+)", help_text))
    assert sorted(set(names.split()) - offered) == []
    said = set(re.findall(r"--([a-z0-9_]+)(?:\s+\[[^\]]*\])?\s+Refused \(diffusers' flag\)", help_text))
    assert said == refused
