"""diffusers' own README commands for its three example scripts, run on crispdiff's counterparts with real
``accelerate launch``: verbatim apart from local paths for the model and data, a tiny model (and its resolution), a
handful of steps, and the network-bound flags (``--push_to_hub``, ``--report_to wandb``) that cannot run offline.

The commands are diffusers' READMEs for ``examples/unconditional_image_generation`` (Oxford flowers),
``examples/dreambooth`` (the dog, LoRA) and ``examples/text_to_image`` (Naruto captions, LoRA).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dir
from PIL import Image
from tiny_models import make_tiny_sd, tiny_unet

from crispdiff.core.images import make_grid

REPO = Path(__file__).resolve().parents[1]
NOTE = "defaults that differ from diffusers'"


def launch(script: str, command: str, **replacements: str) -> str:
    """``accelerate launch`` crispdiff's ``script`` with diffusers' README ``command`` (its flags, a shell line with
    ``$VARIABLES``), after ``replacements`` (flag -> new value; ``None`` drops the flag); returns the log of the
    successful run."""
    done = launched(script, command, **replacements)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def launched(script: str, command: str, **replacements: str) -> subprocess.CompletedProcess:
    """The finished ``accelerate launch`` of :func:`launch`, whatever its exit status."""
    flags = shlex.split(command)
    out: list[str] = []
    for token in flags:
        name = token.split("=", 1)[0].lstrip("-")
        if name in replacements:
            value = replacements.pop(name)
            if value is not None:
                out.append(f"--{name}={value}")
        else:
            out.append(token)
    out += [f"--{name}={value}" for name, value in replacements.items() if value is not None]  # additions
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        str(REPO / "train_scripts" / script), *out,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def tracked_image(out: Path, tag: str) -> np.ndarray:
    """The last image logged under ``tag`` to the run's tensorboard events (int16 HWC)."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard events under {out / 'logs'}"
    accumulator = EventAccumulator(str(events[-1].parent), size_guidance={IMAGES: 0})
    accumulator.Reload()
    encoded = accumulator.Images(tag)[-1].encoded_image_string
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=np.int16)


def disc_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    images = []
    for _ in range(count):
        image = np.empty((height, width, 3), np.uint8)
        image[:] = rng.integers(0, 255, 3)
        cy, cx, r = rng.integers(height // 3, 2 * height // 3), rng.integers(width // 3, 2 * width // 3), height // 4
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
        images.append(Image.fromarray(image))
    return images


def saved_dataset(folder: Path, images: list[Image.Image], captions: list[str] | None = None) -> Path:
    """A local ``datasets`` dataset (save_to_disk) with an ``image`` (and ``text``) column: a Hub dataset, offline."""
    import datasets

    columns: dict = {"image": images}
    if captions is not None:
        columns["text"] = captions
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(folder))
    return folder


FLOWERS = """
  --dataset_name="huggan/flowers-102-categories" \
  --resolution=64 --center_crop --random_flip \
  --output_dir="ddpm-ema-flowers-64" \
  --train_batch_size=16 \
  --num_epochs=100 \
  --gradient_accumulation_steps=1 \
  --use_ema \
  --learning_rate=1e-4 \
  --lr_warmup_steps=500 \
  --mixed_precision=no \
  --push_to_hub
"""


def test_flowers_unconditional_readme_command(tmp_path):
    """The flowers command: 3 epochs (not 100) of 8 images, one batch of 16 each, on a tiny UNet, with a small final
    grid (--eval_batch_size, --ddpm_num_inference_steps); the pipeline loads, and the log names crispdiff's defaults
    for the flags not passed, once, and not the ones passed."""

    from crispdiff.core.config import TrainConfig
    from crispdiff.core.flags import parse_config

    tiny = tiny_unet(sample_size=64, add_attention=False)
    tiny.save_config(tmp_path / "tiny_unet")
    data = saved_dataset(tmp_path / "flowers", disc_images(8, (72, 80)))
    out = tmp_path / "ddpm-ema-flowers-64"
    log = launch(
        "train_unconditional.py",
        FLOWERS.replace("\\", ""),
        dataset_name=str(data),
        output_dir=str(out),
        push_to_hub=None,
        num_epochs="3",
        model_config_name_or_path=str(tmp_path / "tiny_unet" / "config.json"),
        eval_batch_size="2",
        ddpm_num_inference_steps="3",
    )
    assert "3 steps of 16 images" in log  # 3 epochs of one batch (8 images repeated to fill it)
    assert log.count(NOTE) == 1
    note = next(line for line in log.splitlines() if NOTE in line)
    assert "--prediction_type v_prediction (diffusers: epsilon)" in note
    assert "--use_ema" not in note and "--learning_rate" not in note and "--train_batch_size" not in note

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 64, 64, 3)
    saved = json.loads((out / "pipeline" / "crispdiff_training.json").read_text())
    config = parse_config(TrainConfig, [])
    assert (saved["learning_rate"], saved["lr_warmup_steps"], saved["use_ema"]) == (1e-4, 500, True)
    assert config.learning_rate != 1e-4  # the command's values, not crispdiff's defaults, were used


DOG = """
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a photo of sks dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --checkpointing_steps=100 \
  --learning_rate=1e-4 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=50 \
  --seed="0" \
  --push_to_hub
"""


def test_dog_dreambooth_lora_readme_command(tmp_path):
    """The dog command on the DreamBooth dataset's dog (or five pictures where ../shared is absent): the LoRA loads
    with plain diffusers' load_lora_weights and changes the images."""
    from test_sd_lora import RES, plain_diffusers_images

    dog = shared_dir() / "data" / "dreambooth" / "dog"
    if not dog.is_dir():
        dog = tmp_path / "dog"
        dog.mkdir()
        for i, image in enumerate(disc_images(5, (40, 32))):
            image.save(dog / f"{i:02d}.png")
    base = make_tiny_sd(tmp_path / "sd")
    out = tmp_path / "dog-lora"
    command = DOG.replace("\\", "").replace("$MODEL_NAME", str(base)).replace("$INSTANCE_DIR", str(dog))
    log = launch(
        "train_dreambooth_lora.py",
        command.replace("$OUTPUT_DIR", str(out)),
        resolution=str(RES),
        max_train_steps="4",
        report_to="tensorboard",
        push_to_hub=None,
        cache_dir=str(tmp_path / "cache"),
    )
    assert "4 steps of 1 images" in log and NOTE not in log  # every flag with a different default was passed
    loaded = plain_diffusers_images(base, out, "a photo of sks dog")
    # lr 1e-4 for 4 steps moves the images a little, but the loaded LoRA must move them
    assert (loaded - plain_diffusers_images(base, None, "a photo of sks dog")).abs().max() > 1e-4


NARUTO = """
  --pretrained_model_name_or_path=$MODEL_NAME \
  --dataset_name=$DATASET_NAME --caption_column="text" \
  --resolution=512 --random_flip \
  --train_batch_size=1 \
  --num_train_epochs=100 --checkpointing_steps=5000 \
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \
  --seed=42 \
  --output_dir="sd-naruto-model-lora" \
  --validation_prompt="cute dragon creature" --report_to="wandb"
"""


def test_naruto_text_to_image_lora_readme_command(tmp_path):
    """The Naruto command (``accelerate launch --mixed_precision="fp16"`` is the GPU's; here the CPU config): epochs
    decide the length as in diffusers (3 captioned images x 2 epochs = 6 steps), not crispdiff's 500-step default."""
    from test_sd_lora import RES, plain_diffusers_images

    base = make_tiny_sd(tmp_path / "sd")
    captions = ["a red creature", "a green dragon", "a blue ninja"]
    data = saved_dataset(tmp_path / "naruto", disc_images(3, (24, 24)), captions)
    out = tmp_path / "sd-naruto-model-lora"
    command = NARUTO.replace("\\", "").replace("$MODEL_NAME", str(base)).replace("$DATASET_NAME", str(data))
    log = launch(
        "train_text_to_image_lora.py",
        command,
        resolution=str(RES),
        num_train_epochs="2",
        report_to="tensorboard",
        output_dir=str(out),
        cache_dir=str(tmp_path / "cache"),
    )
    assert re.search(r"\b6 steps of 1 images", log), log[-2000:]
    assert NOTE not in log
    loaded = plain_diffusers_images(base, out, "cute dragon creature")
    assert (loaded - plain_diffusers_images(base, None, "cute dragon creature")).abs().max() > 1e-4  # lr 1e-4, 6 steps

    # diffusers' final validation: the saved LoRA reloaded into the base and sampled (4 images, 25 steps by default,
    # the command's seed); samples.png is what load_lora_weights gives a user, and the grid reached the tracker
    assert "final samples from the saved LoRA" in log
    prompt = "cute dragon creature"
    expected = make_grid(plain_diffusers_images(base, out, prompt, count=4, steps=25, seed=42), value_range=(0, 1))
    saved = np.asarray(Image.open(out / "samples.png").convert("RGB"), dtype=np.int16)
    assert saved.shape == (2 * RES, 2 * RES, 3)
    assert np.abs(saved - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert np.array_equal(tracked_image(out, "final"), saved)


@pytest.mark.parametrize("epochs", [3])
def test_common_unconditional_flags_validate_and_save_per_epoch(tmp_path, epochs):
    """Flags users commonly add to train_unconditional.py: a sample grid every --save_images_epochs of
    --eval_batch_size images with --ddpm_num_inference_steps steps, --logger, --ema_max_decay, --checkpointing_steps
    with all checkpoints kept, --dataloader_num_workers: 8 images of 4 = 2 steps an epoch."""
    from accelerate.state import AcceleratorState

    from crispdiff.core.config import TrainConfig
    from crispdiff.core.flags import parse_config
    from crispdiff.train.unet_trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(disc_images(8, (16, 16))):
        image.save(folder / f"{i}.png")
    out = tmp_path / "out"
    flags = [
        "--train_data_dir", str(folder), "--resolution", "16", "--output_dir", str(out),
        "--cache_dir", str(tmp_path / "cache"), "--base_channels", "8", "--channel_mults", "1", "2",
        "--attention_res", "8", "--layers_per_block", "1", "--train_batch_size", "4", "--num_epochs", str(epochs),
        "--save_images_epochs", "1", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2",
        "--logger", "tensorboard", "--ema_max_decay", "0.99", "--checkpointing_steps", "1",
        "--dataloader_num_workers", "4", "--lr_warmup_steps", "0", "--mixed_precision", "no",
    ]  # fmt: skip
    train(parse_config(TrainConfig, flags))
    assert sorted(p.name for p in (out / "samples").glob("step_*.png")) == ["step_0000002.png", "step_0000004.png"]
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [1, 2, 3, 4, 5]  # all kept
    assert list((out / "logs").rglob("events.out.tfevents*"))


# ----------------------------------------------------------------------------------------------------------------------
# SDXL: diffusers' README_sdxl.md commands (examples/dreambooth and examples/text_to_image), on a tiny SDXL and a VAE
# folder of its own standing in for madebyollin/sdxl-vae-fp16-fix. `--mixed_precision="fp16"` is a flag of these
# commands: it runs as written on a GPU; on a CPU (where crispdiff refuses fp16) it is replaced by "no".
# ----------------------------------------------------------------------------------------------------------------------

DOG_XL = """
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --pretrained_vae_model_name_or_path=$VAE_PATH \
  --output_dir=$OUTPUT_DIR \
  --mixed_precision="fp16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=1024 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --learning_rate=1e-4 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub
"""

PLAYGROUND_XL = """
  --pretrained_model_name_or_path="playgroundai/playground-v2.5-1024px-aesthetic"  \
  --instance_data_dir="dog" \
  --output_dir="dog-playground-lora" \
  --mixed_precision="fp16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=1024 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --learning_rate=1e-4 \
  --use_8bit_adam \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub
"""

NARUTO_XL = """
  --pretrained_model_name_or_path=$MODEL_NAME \
  --pretrained_vae_model_name_or_path=$VAE_NAME \
  --dataset_name=$DATASET_NAME --caption_column="text" \
  --resolution=1024 --random_flip \
  --train_batch_size=1 \
  --num_train_epochs=2 --checkpointing_steps=500 \
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \
  --mixed_precision="fp16" \
  --seed=42 \
  --output_dir="sd-naruto-model-lora-sdxl" \
  --validation_prompt="cute dragon creature" --report_to="wandb" \
  --push_to_hub
"""

NARUTO_XL_DEEPSPEED = """
  --pretrained_model_name_or_path=$MODEL_NAME \
  --pretrained_vae_model_name_or_path=$VAE_NAME \
  --dataset_name=$DATASET_NAME --caption_column="text" \
  --resolution=1024  \
  --train_batch_size=1 \
  --num_train_epochs=2 \
  --checkpointing_steps=2 \
  --learning_rate=1e-04 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --mixed_precision="fp16" \
  --max_train_steps=20 \
  --validation_epochs=20 \
  --seed=1234 \
  --output_dir="sd-naruto-model-lora-sdxl" \
  --validation_prompt="cute dragon creature"
"""

NARUTO_XL_TEXT_ENCODER = """
  --pretrained_model_name_or_path=$MODEL_NAME \
  --dataset_name=$DATASET_NAME --caption_column="text" \
  --resolution=1024 --random_flip \
  --train_batch_size=1 \
  --num_train_epochs=2 --checkpointing_steps=500 \
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \
  --seed=42 \
  --output_dir="sd-naruto-model-lora-sdxl-txt" \
  --train_text_encoder \
  --validation_prompt="cute dragon creature" --report_to="wandb" \
  --push_to_hub
"""


def cpu_precision() -> dict[str, str]:
    """The commands' `--mixed_precision="fp16"`, kept on a GPU and replaced by "no" on a CPU."""
    return {} if torch.cuda.is_available() else {"mixed_precision": "no"}


@pytest.fixture(scope="module")
def tiny_sdxl_with_vae(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SDXL and, in a folder of its own, a VAE with other decoder weights (as the fp16-fix VAE is)."""
    from diffusers import AutoencoderKL
    from tiny_models import make_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    base = make_tiny_sdxl(root)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.mul_(1.05)
    vae.save_pretrained(root / "sdxl-vae-fp16-fix")
    return base, root / "sdxl-vae-fp16-fix"


def sdxl_images(base: Path, lora: Path | None, prompt: str, vae: Path | None = None, **kwargs) -> torch.Tensor:
    from test_sdxl_lora import images_of, plain_sdxl

    return images_of(plain_sdxl(base, lora, vae=vae), prompt, **kwargs)


def test_dog_dreambooth_lora_sdxl_readme_command(tmp_path, tiny_sdxl_with_vae):
    """README_sdxl.md's dog command, with the fp16-fix VAE option: 2 steps of 4 accumulated micro-batches; the LoRA
    loads with plain diffusers (and that VAE) and changes the images."""
    from tiny_models import SDXL_RES

    base, vae = tiny_sdxl_with_vae
    dog = tmp_path / "dog"
    dog.mkdir()
    for i, image in enumerate(disc_images(5, (48, 40))):
        image.save(dog / f"{i:02d}.png")
    out = tmp_path / "lora-trained-xl"
    command = DOG_XL.replace("\\", "").replace("$MODEL_NAME", str(base)).replace("$INSTANCE_DIR", str(dog))
    log = launch(
        "train_dreambooth_lora_sdxl.py",
        command.replace("$VAE_PATH", str(vae)).replace("$OUTPUT_DIR", str(out)),
        resolution=str(SDXL_RES),
        max_train_steps="2",
        report_to="tensorboard",
        push_to_hub=None,
        cache_dir=str(tmp_path / "cache"),
        num_validation_images="1",
        **cpu_precision(),
    )
    assert "2 steps of 4 images" in log and NOTE not in log
    prompt = "a photo of sks dog"
    loaded = sdxl_images(base, out, prompt, vae=vae)
    assert (loaded - sdxl_images(base, None, prompt, vae=vae)).abs().max() > 1e-4


def test_playground_dreambooth_lora_sdxl_readme_command(tmp_path, tiny_sdxl_with_vae):
    """The Playground command on the tiny SDXL (Playground v2.5 itself, an EDM model, is refused: see
    test_sdxl_lora.py): with --use_8bit_adam it trains where bitsandbytes is installed, and otherwise stops in one
    line saying what to install, before training."""
    import importlib.util

    from tiny_models import SDXL_RES

    base, _ = tiny_sdxl_with_vae
    dog = tmp_path / "dog"
    dog.mkdir()
    for i, image in enumerate(disc_images(3, (40, 40))):
        image.save(dog / f"{i:02d}.png")
    out = tmp_path / "dog-playground-lora"
    command = PLAYGROUND_XL.replace("\\", "")
    replacements = dict(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(dog), output_dir=str(out),
        resolution=str(SDXL_RES), max_train_steps="1", report_to="tensorboard", push_to_hub=None,
        cache_dir=str(tmp_path / "cache"), **cpu_precision(),
    )  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is not None:
        launch("train_dreambooth_lora_sdxl.py", command, **replacements)
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        return
    done = launched("train_dreambooth_lora_sdxl.py", command, **replacements)
    errors = {line for line in done.stderr.splitlines() if "error:" in line}  # accelerate repeats its child's stderr
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "--use_8bit_adam needs bitsandbytes: pip install" in errors.pop()
    assert f'File "{REPO / "crispdiff"}' not in done.stderr  # a one-line error, no traceback from crispdiff
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_naruto_text_to_image_lora_sdxl_readme_command(tmp_path, tiny_sdxl_with_vae):
    """README_sdxl.md's Naruto LoRA command: 3 captioned images x 2 epochs = 6 steps; the final samples are what
    plain diffusers gives with the same VAE and the saved LoRA (4 images, 25 steps, the command's seed)."""
    from tiny_models import SDXL_RES

    base, vae = tiny_sdxl_with_vae
    captions = ["a red creature", "a green dragon", "a blue ninja"]
    data = saved_dataset(tmp_path / "naruto", disc_images(3, (40, 48)), captions)
    out = tmp_path / "sd-naruto-model-lora-sdxl"
    command = NARUTO_XL.replace("\\", "").replace("$MODEL_NAME", str(base)).replace("$DATASET_NAME", str(data))
    log = launch(
        "train_text_to_image_lora_sdxl.py",
        command.replace("$VAE_NAME", str(vae)),
        resolution=str(SDXL_RES),
        report_to="tensorboard",
        push_to_hub=None,
        output_dir=str(out),
        cache_dir=str(tmp_path / "cache"),
        **cpu_precision(),
    )
    assert re.search(r"\b6 steps of 1 images", log), log[-2000:]
    assert NOTE not in log
    prompt = "cute dragon creature"
    expected = make_grid(sdxl_images(base, out, prompt, vae=vae, count=4, steps=25, seed=42), value_range=(0, 1))
    saved = np.asarray(Image.open(out / "samples.png").convert("RGB"), dtype=np.int16)
    assert saved.shape == (2 * SDXL_RES, 2 * SDXL_RES, 3)
    assert np.abs(saved - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert (sdxl_images(base, out, prompt, vae=vae) - sdxl_images(base, None, prompt, vae=vae)).abs().max() > 1e-4


def test_naruto_text_encoder_lora_sdxl_readme_command(tmp_path, tiny_sdxl_with_vae):
    """README_sdxl.md's "Finetuning the text encoder and UNet" command: both text encoders get LoRA, saved in the
    file plain diffusers loads."""
    from safetensors import safe_open
    from tiny_models import SDXL_RES

    base, _ = tiny_sdxl_with_vae
    data = saved_dataset(tmp_path / "naruto", disc_images(2, (40, 40)), ["a red creature", "a green dragon"])
    out = tmp_path / "sd-naruto-model-lora-sdxl-txt"
    command = NARUTO_XL_TEXT_ENCODER.replace("\\", "").replace("$MODEL_NAME", str(base))
    log = launch(
        "train_text_to_image_lora_sdxl.py",
        command.replace("$DATASET_NAME", str(data)),
        resolution=str(SDXL_RES),
        report_to="tensorboard",
        push_to_hub=None,
        output_dir=str(out),
        cache_dir=str(tmp_path / "cache"),
        num_validation_images="1",
    )
    assert "text encoders trained" in log and re.search(r"\b4 steps of 1 images", log)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    prompt = "cute dragon creature"
    assert (sdxl_images(base, out, prompt) - sdxl_images(base, None, prompt)).abs().max() > 1e-4


def test_deepspeed_sdxl_readme_command_is_refused_in_one_line():
    """README_sdxl.md's DeepSpeed command gives both --num_train_epochs and --max_train_steps; diffusers lets the step
    count win and ignores the epochs, crispdiff refuses the pair by name (one of them would change nothing)."""
    from crispdiff.core.errors import FlagError
    from crispdiff.core.flags import parse_config
    from crispdiff.sd.config import SDXLTextToImageLoRAConfig

    command = NARUTO_XL_DEEPSPEED.replace("\\", "").replace("$MODEL_NAME", "sdxl").replace("$VAE_NAME", "vae")
    with pytest.raises(FlagError, match="pass --max_train_steps or --num_epochs, not both"):
        parse_config(SDXLTextToImageLoRAConfig, shlex.split(command.replace("$DATASET_NAME", "naruto")))
