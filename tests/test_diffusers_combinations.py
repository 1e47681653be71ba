"""A dozen flag combinations diffusers users commonly add to the three example scripts' commands (their READMEs,
the docs' training guides), run unchanged on crispdiff's counterparts with a tiny model and two steps, each checked
for what it means in the output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from safetensors import safe_open
from test_diffusers_commands import disc_images, saved_dataset
from test_sd_lora import RES, make_tiny_sd

from crispdiff.core.config import TrainConfig, parse_config
from crispdiff.sd.config import LORA_WEIGHTS_NAME, DreamBoothLoRAConfig, TextToImageLoRAConfig
from crispdiff.sd.trainer import train_dreambooth_lora, train_text_to_image_lora
from crispdiff.train.unet_trainer import train


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD base, four pictures of a subject, and a captioned ``datasets`` dataset of four."""
    root = tmp_path_factory.mktemp("combinations")
    subject = root / "subject"
    subject.mkdir()
    for i, image in enumerate(disc_images(4, (24, 24))):
        image.save(subject / f"{i}.png")
    captions = ["a red creature", "a green dragon", "a blue ninja", "a grey cat"]
    return {
        "sd": make_tiny_sd(root / "sd"),
        "subject": subject,
        "dataset": saved_dataset(root / "dataset", disc_images(4, (24, 24), seed=1), captions),
    }


def lora_keys(out: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(out / LORA_WEIGHTS_NAME), "pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def saved_config(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def unet_scheduler(out: Path) -> dict:
    return json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())


class Combination(NamedTuple):
    script: str  # "unconditional", "dreambooth" or "text_to_image"
    flags: list[str]  # added to the script's minimal command (a flag given here replaces the minimal one)
    means: Callable[[Path], bool]  # what the flags must do to the output folder
    drop: tuple[str, ...] = ()  # flags of the minimal command left out (e.g. --max_train_steps when epochs decide)


def lora_ranks(out: Path) -> set[int]:
    return {shape[0] for key, shape in lora_keys(out).items() if "lora_A" in key or "lora.down" in key}


COMBINATIONS = {
    "unconditional: diffusers' EMA and DDPM schedule": Combination(
        "unconditional",
        ["--use_ema", "--ema_inv_gamma", "1.0", "--ema_power", "0.75", "--ema_max_decay", "0.9999",
         "--ddpm_num_steps", "1000", "--ddpm_beta_schedule", "linear", "--prediction_type", "epsilon"],
        lambda out: (s := unet_scheduler(out))["beta_schedule"] == "linear" and s["prediction_type"] == "epsilon",
    ),
    "unconditional: Adam and a cosine LR with warm-up": Combination(
        "unconditional",
        ["--adam_beta1", "0.95", "--adam_beta2", "0.999", "--adam_weight_decay", "1e-6", "--adam_epsilon", "1e-08",
         "--lr_scheduler", "cosine", "--lr_warmup_steps", "500"],
        lambda out: saved_config(out / "pipeline", "crispdiff_training.json")["lr_warmup_steps"] == 500,
    ),
    "unconditional: crops, flips, accumulation, bf16": Combination(
        "unconditional",
        ["--center_crop", "--random_flip", "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16"],
        lambda out: (c := saved_config(out / "pipeline", "crispdiff_training.json"))["center_crop"]
        and c["gradient_accumulation_steps"] == 2,
    ),
    "unconditional: x0 prediction, epochs, one checkpoint kept": Combination(
        "unconditional",
        ["--prediction_type", "sample", "--num_epochs", "2", "--checkpointing_steps", "1",
         "--checkpoints_total_limit", "1"],
        lambda out: unet_scheduler(out)["prediction_type"] == "sample" and checkpoints(out) == [3],
        drop=("--max_train_steps",),  # 4 images of 2: 2 steps an epoch, 4 in all; the last checkpoint before 4: 3
    ),
    "dreambooth: text encoder, gradient checkpointing": Combination(
        "dreambooth",
        ["--train_text_encoder", "--gradient_checkpointing"],
        lambda out: any(k.startswith("text_encoder.") for k in lora_keys(out)),
    ),
    "dreambooth: prior preservation": Combination(
        "dreambooth",
        ["--with_prior_preservation", "--prior_loss_weight", "1.0", "--class_prompt", "a photo of dog",
         "--num_class_images", "2", "--sample_batch_size", "2"],
        lambda out: len(list((out.parent / "class_images").glob("*.png"))) == 2,
    ),
    "dreambooth: scaled LR, accumulation, cosine restarts": Combination(
        "dreambooth",
        ["--scale_lr", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine_with_restarts",
         "--lr_num_cycles", "2", "--lr_warmup_steps", "1"],
        lambda out: saved_config(out, "crispdiff_lora_training.json")["gradient_accumulation_steps"] == 2,
    ),
    "dreambooth: rank, centre crop, checkpoints, validation": Combination(
        "dreambooth",
        ["--rank", "8", "--center_crop", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
         "--validation_prompt", "a photo of sks dog in a bucket", "--num_validation_images", "1",
         "--validation_epochs", "1", "--allow_tf32", "--dataloader_num_workers", "2"],
        lambda out: checkpoints(out) == [1] and lora_ranks(out) == {8} and (out / "samples.png").is_file(),
    ),
    "text-to-image: min-SNR, offset noise, rank, flips": Combination(
        "text_to_image",
        ["--snr_gamma", "5.0", "--noise_offset", "0.05", "--rank", "4", "--random_flip", "--center_crop"],
        lambda out: lora_ranks(out) == {4},
    ),
    "text-to-image: columns, samples, epochs, validation": Combination(
        "text_to_image",
        ["--image_column", "image", "--caption_column", "text", "--max_train_samples", "2", "--num_train_epochs",
         "1", "--validation_epochs", "1", "--validation_prompt", "a blue dragon", "--num_validation_images", "2"],
        lambda out: (out / "samples.png").is_file() and checkpoints(out) == [],
        drop=("--max_train_steps",),
    ),
    "text-to-image: polynomial LR, clipping, seed, no grids": Combination(
        "text_to_image",
        ["--lr_scheduler", "polynomial", "--lr_power", "2", "--max_grad_norm", "1", "--seed", "1337",
         "--num_validation_images", "0"],
        lambda out: not (out / "samples.png").exists() and (out / LORA_WEIGHTS_NAME).is_file(),
    ),
    "text-to-image: tensorboard, logging dir, resume latest on a fresh run": Combination(
        "text_to_image",
        ["--report_to", "tensorboard", "--logging_dir", "tb", "--checkpointing_steps", "1",
         "--resume_from_checkpoint", "latest"],
        lambda out: bool(list((out / "tb").rglob("events.out.tfevents*"))) and checkpoints(out) == [1],
    ),
}  # fmt: skip


def minimal_command(script: str, inputs: dict[str, Path], out: Path) -> dict[str, str]:
    """The smallest command of each script: a tiny model, two steps, tiny grids, no trackers."""
    flags = {
        "--output_dir": str(out),
        "--cache_dir": str(out.parent / "cache"),
        "--max_train_steps": "2",
        "--report_to": "none",
        "--cpu_threads": "1",
        "--validation_inference_steps": "2",
    }
    if script == "unconditional":
        return flags | {
            "--train_data_dir": str(inputs["subject"]),
            "--resolution": "16",
            "--base_channels": "8",
            "--layers_per_block": "1",
            "--train_batch_size": "2",
            "--num_validation_images": "1",
        }
    flags |= {
        "--pretrained_model_name_or_path": str(inputs["sd"]),
        "--resolution": str(RES),
        "--train_batch_size": "1",
        "--vae_batch_size": "4",
        "--num_validation_images": "1",
    }
    if script == "dreambooth":
        return flags | {
            "--instance_data_dir": str(inputs["subject"]),
            "--instance_prompt": "a photo of sks dog",
            "--class_data_dir": str(out.parent / "class_images"),
            "--class_inference_steps": "2",
        }
    return flags | {"--dataset_name": str(inputs["dataset"])}


RUN = {
    "unconditional": lambda argv: train(parse_config(TrainConfig, argv)),
    "dreambooth": lambda argv: train_dreambooth_lora(parse_config(DreamBoothLoRAConfig, argv)),
    "text_to_image": lambda argv: train_text_to_image_lora(parse_config(TextToImageLoRAConfig, argv)),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_a_common_flag_combination_runs_unchanged_and_means_what_it_says(name, inputs, tmp_path):
    combination = COMBINATIONS[name]
    out = tmp_path / "out"
    minimal = minimal_command(combination.script, inputs, out)
    skip = set(combination.drop) | {token for token in combination.flags if token.startswith("--")}
    argv = [token for flag, value in minimal.items() if flag not in skip for token in (flag, value)]
    RUN[combination.script](argv + combination.flags)
    assert combination.means(out), name
