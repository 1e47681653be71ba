"""A dozen flag combinations diffusers users commonly add to the three example scripts' commands (their READMEs,
the docs' training guides), run unchanged on crispdiff's counterparts with a tiny model and two steps, each checked
for what it does: to the saved folder, and to the run itself, seen through spies around the real functions (the
optimizer's steps and learning rates, the training schedule and target, the loss weights, the noise, the batches), so
that a flag accepted and then ignored fails its check."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from test_diffusers_commands import disc_images, saved_dataset
from tiny_models import RES, make_tiny_sd

import crispdiff.sd.trainer
import crispdiff.train.unet_trainer
from crispdiff.core.config import TrainConfig
from crispdiff.core.flags import parse_config
from crispdiff.data.batches import ImageData
from crispdiff.diffusion.schedule import NoiseSchedule, sample_noise
from crispdiff.latent.cache import LatentCache
from crispdiff.latent.space import LatentSpace
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


@dataclass
class Seen:
    """What the run did, recorded by spies that call the real function and keep what went in and came out."""

    optimizer_steps: list[dict[str, Any]] = field(default_factory=list)  # the first param group at each real step
    targets: list[str] = field(default_factory=list)  # the prediction type of every training target
    schedules: list[torch.Tensor] = field(default_factory=list)  # the training schedule's alpha-bar at each target
    loss_weights: list[tuple[float | None, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # gamma, SNR, w
    noise_offsets: list[torch.Tensor] = field(default_factory=list)  # noise minus the same draw without an offset
    pixel_batches: list[tuple[ImageData, list[int], torch.Tensor]] = field(default_factory=list)
    latent_variants: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (flips cached, variants drawn)
    training_output_dtypes: list[torch.dtype] = field(default_factory=list)  # the UNet's output under autograd
    ema_decays: list[float] = field(default_factory=list)


@pytest.fixture
def seen(monkeypatch) -> Seen:
    """Spies on the run's real functions; each records and returns exactly what the function returned."""
    record = Seen()

    def spy(owner: Any, name: str, wrap: Callable[[Callable, tuple, dict], Any]) -> None:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: wrap(original, args, kwargs))

    def optimizer_step(original, args, kwargs):
        group = args[0].param_groups[0]
        record.optimizer_steps.append({k: group[k] for k in ("lr", "betas", "eps", "weight_decay")})
        return original(*args, **kwargs)

    def target(original, args, kwargs):
        record.targets.append(args[0].prediction_type)
        record.schedules.append(args[0].alphas_cumprod.detach().cpu().clone())
        return original(*args, **kwargs)

    def loss_weights(original, args, kwargs):
        schedule, t, gamma = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("snr_gamma")
        weights = original(*args, **kwargs)
        record.loss_weights.append((gamma, schedule.snr.to(t.device)[t].cpu(), weights.cpu()))
        return weights

    def noise(original, args, kwargs):
        shape, generator, device = args[:3]
        state = generator.get_state()
        plain = original(shape, generator, device, 0.0)
        generator.set_state(state)  # the run's own draw is the same one, with its offset
        drawn = original(*args, **kwargs)
        record.noise_offsets.append((drawn - plain).cpu())
        return drawn

    def batch(original, args, kwargs):
        out = original(*args, **kwargs)
        record.pixel_batches.append((args[0], [int(i) for i in args[1]], out.detach().cpu()))
        return out

    drawing = []  # inside LatentSpace.latents: the loops' draws, not the cache's own statistics

    def latents(original, args, kwargs):
        drawing.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            drawing.pop()

    def posterior(original, args, kwargs):
        if drawing:
            record.latent_variants.append((args[0].spec.num_flips, torch.as_tensor(args[2]).clone()))
        return original(*args, **kwargs)

    def unet_forward(original, args, kwargs):
        out = original(*args, **kwargs)
        if torch.is_grad_enabled():
            record.training_output_dtypes.append(out.sample.dtype)
        return out

    def ema_step(original, args, kwargs):
        out = original(*args, **kwargs)
        record.ema_decays.append(float(args[0].cur_decay_value))
        return out

    spy(torch.optim.AdamW, "step", optimizer_step)
    spy(NoiseSchedule, "target", target)
    spy(NoiseSchedule, "loss_weights", loss_weights)
    for module in (crispdiff.train.unet_trainer, crispdiff.sd.trainer):
        monkeypatch.setattr(module, "sample_noise", lambda *a, **k: noise(sample_noise, a, k))
    spy(ImageData, "batch", batch)
    spy(LatentSpace, "latents", latents)
    spy(LatentCache, "posterior", posterior)
    spy(UNet2DModel, "forward", unet_forward)
    spy(EMAModel, "step", ema_step)
    return record


def lrs(seen: Seen) -> list[float]:
    return [step["lr"] for step in seen.optimizer_steps]


def follows_diffusers_linear_schedule(out: Path, seen: Seen) -> bool:
    """The saved scheduler and the training schedule are diffusers' own linear DDPM betas (1e-4 to 0.02, T = 1000),
    named so, with an epsilon target: built by diffusers from the name, not read back from crispdiff."""
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    saved = DDPMScheduler.from_pretrained(out / "pipeline", subfolder="scheduler")
    config = unet_scheduler(out)
    return (
        config["beta_schedule"] == "linear"
        and saved.config.prediction_type == "epsilon"
        and torch.allclose(saved.alphas_cumprod, theirs, rtol=1e-5)
        and all(torch.allclose(alphas, theirs, rtol=1e-5) for alphas in seen.schedules)
        and set(seen.targets) == {"epsilon"}
    )


def ema_warms_up_as_asked(seen: Seen, inv_gamma: float, power: float) -> bool:
    """EMA decay 1 - (1 + step / inv_gamma) ** -power at the optimizer steps after the first (the first copies)."""
    expected = [0.0] + [1 - (1 + step / inv_gamma) ** -power for step in range(1, len(seen.ema_decays))]
    return len(seen.ema_decays) == 2 and all(abs(a - b) < 1e-6 for a, b in zip(seen.ema_decays, expected))


def saw_centre_crops_and_their_mirrors(seen: Seen) -> bool:
    """Every pixel image the loop trained on is its centre crop or that crop mirrored, and some were mirrored (the
    square test images have no room to crop elsewhere: this checks the flips)."""
    mirrored = 0
    for data, indices, batch in seen.pixel_batches:
        crops = data.center_crops(indices).float() / 127.5 - 1.0
        for crop, image in zip(crops, batch):
            if torch.allclose(image, crop.flip(2), atol=1e-6) and not torch.allclose(image, crop, atol=1e-6):
                mirrored += 1
            elif not torch.allclose(image, crop, atol=1e-6):
                return False
    return mirrored > 0


def drew_mirrored_latents(seen: Seen) -> bool:
    """The latent cache holds each image and its mirror, and the loop drew some mirrored ones (odd variants)."""
    return (
        bool(seen.latent_variants)
        and all(flips == 2 for flips, _ in seen.latent_variants)
        and any(bool((variants % 2 == 1).any()) for _, variants in seen.latent_variants)
    )


def min_snr_weighted(seen: Seen, gamma: float) -> bool:
    """The loop weighed every loss with min-SNR-gamma (the gamma it passed is --snr_gamma's), and the weights are the
    formula's for epsilon, min(1, gamma / SNR), at the timesteps it drew. (Two draws rarely reach SNR > gamma, where
    the weights leave 1; that the loop asks for them with this gamma is what an ignored flag would change.)"""
    return bool(seen.loss_weights) and all(
        given == gamma and torch.allclose(weights, torch.clamp(gamma / snr, max=1.0), rtol=1e-5)
        for given, snr, weights in seen.loss_weights
    )


def offset_noise(seen: Seen, strength: float) -> bool:
    """The noise differs from the same draw without an offset by one constant per image and channel, of the size
    --noise_offset asks for."""
    if not seen.noise_offsets:
        return False
    for difference in seen.noise_offsets:
        per_channel = difference.mean(dim=(2, 3), keepdim=True)
        if not torch.allclose(difference, per_channel.expand_as(difference), atol=1e-6):
            return False
        if not 0 < float(per_channel.abs().max()) < 6 * strength:
            return False
    return True


class Combination(NamedTuple):
    script: str  # "unconditional", "dreambooth" or "text_to_image"
    flags: list[str]  # added to the script's minimal command (a flag given here replaces the minimal one)
    means: Callable[[Path, Seen], bool]  # what the flags must do to the output folder and to the run
    drop: tuple[str, ...] = ()  # flags of the minimal command left out (e.g. --max_train_steps when epochs decide)


def polynomial_power_two(used: list[float], peak: float, end: float = 1e-7) -> bool:
    """diffusers' polynomial decay over two steps without warm-up: the peak, then end + (peak - end) * (1/2) ** 2."""
    return used == pytest.approx([peak, end + (peak - end) * 0.25])


def lora_ranks(out: Path) -> set[int]:
    return {shape[0] for key, shape in lora_keys(out).items() if "lora_A" in key or "lora.down" in key}


COMBINATIONS = {
    "unconditional: diffusers' EMA and DDPM schedule": Combination(
        "unconditional",
        ["--use_ema", "--ema_inv_gamma", "1.0", "--ema_power", "0.75", "--ema_max_decay", "0.9999",
         "--ddpm_num_steps", "1000", "--ddpm_beta_schedule", "linear", "--prediction_type", "epsilon"],
        lambda out, seen: follows_diffusers_linear_schedule(out, seen) and ema_warms_up_as_asked(seen, 1.0, 0.75),
    ),
    "unconditional: Adam and a cosine LR with warm-up": Combination(
        "unconditional",
        ["--adam_beta1", "0.95", "--adam_beta2", "0.999", "--adam_weight_decay", "1e-6", "--adam_epsilon", "1e-08",
         "--lr_scheduler", "cosine", "--lr_warmup_steps", "500"],
        lambda out, seen: [(s["betas"], s["weight_decay"], s["eps"]) for s in seen.optimizer_steps]
        == [((0.95, 0.999), 1e-6, 1e-8)] * 2
        and lrs(seen) == pytest.approx([0.0, saved_config(out, "crispdiff_training.json")["learning_rate"] / 500]),
    ),
    "unconditional: crops, flips, accumulation, bf16": Combination(
        "unconditional",
        ["--center_crop", "--random_flip", "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16"],
        lambda out, seen: saw_centre_crops_and_their_mirrors(seen)
        and (len(seen.pixel_batches), len(seen.optimizer_steps)) == (4, 2)  # two micro-batches per optimizer step
        and set(seen.training_output_dtypes) == {torch.bfloat16},
    ),
    "unconditional: x0 prediction, epochs, one checkpoint kept": Combination(
        "unconditional",
        ["--prediction_type", "sample", "--num_epochs", "2", "--checkpointing_steps", "1",
         "--checkpoints_total_limit", "1"],
        lambda out, seen: unet_scheduler(out)["prediction_type"] == "sample" and set(seen.targets) == {"sample"}
        and checkpoints(out) == [3] and len(seen.optimizer_steps) == 4,
        drop=("--max_train_steps",),  # 4 images of 2: 2 steps an epoch, 4 in all; the last checkpoint before 4: 3
    ),
    "dreambooth: text encoder, gradient checkpointing": Combination(
        "dreambooth",
        ["--train_text_encoder", "--gradient_checkpointing"],
        lambda out, seen: any(k.startswith("text_encoder.") for k in lora_keys(out)),
    ),
    "dreambooth: prior preservation": Combination(
        "dreambooth",
        ["--with_prior_preservation", "--prior_loss_weight", "1.0", "--class_prompt", "a photo of dog",
         "--num_class_images", "2", "--sample_batch_size", "2"],
        lambda out, seen: len(list((out.parent / "class_images").glob("*.png"))) == 2
        and all(len(variants) == 1 for _, variants in seen.latent_variants)
        and len(seen.latent_variants) == 2 * len(seen.optimizer_steps),  # an instance and a class image each step
    ),
    "dreambooth: scaled LR, accumulation, cosine restarts": Combination(
        "dreambooth",
        ["--scale_lr", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine_with_restarts",
         "--lr_num_cycles", "2", "--lr_warmup_steps", "1"],
        lambda out, seen: len(seen.latent_variants) == 4  # two micro-batches for each of the two steps
        and lrs(seen) == pytest.approx([0.0, 2 * saved_config(out, "crispdiff_lora_training.json")["learning_rate"]]),
    ),
    "dreambooth: rank, centre crop, checkpoints, validation": Combination(
        "dreambooth",
        ["--rank", "8", "--center_crop", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
         "--validation_prompt", "a photo of sks dog in a bucket", "--num_validation_images", "1",
         "--validation_epochs", "1", "--allow_tf32", "--dataloader_num_workers", "2"],
        lambda out, seen: checkpoints(out) == [1] and lora_ranks(out) == {8} and (out / "samples.png").is_file(),
    ),
    "text-to-image: min-SNR, offset noise, rank, flips": Combination(
        "text_to_image",
        ["--snr_gamma", "5.0", "--noise_offset", "0.05", "--rank", "4", "--random_flip", "--center_crop"],
        lambda out, seen: lora_ranks(out) == {4} and min_snr_weighted(seen, 5.0) and offset_noise(seen, 0.05)
        and drew_mirrored_latents(seen),
    ),
    "text-to-image: columns, samples, epochs, validation": Combination(
        "text_to_image",
        ["--image_column", "image", "--caption_column", "text", "--max_train_samples", "2", "--num_train_epochs",
         "1", "--validation_epochs", "1", "--validation_prompt", "a blue dragon", "--num_validation_images", "2"],
        lambda out, seen: (out / "samples.png").is_file() and checkpoints(out) == []
        and len(seen.optimizer_steps) == 2,  # one epoch of two of the four images, one a step
        drop=("--max_train_steps",),
    ),
    "text-to-image: polynomial LR, clipping, seed, no grids": Combination(
        "text_to_image",
        ["--lr_scheduler", "polynomial", "--lr_power", "2", "--lr_warmup_steps", "0", "--max_grad_norm", "1",
         "--seed", "1337", "--num_validation_images", "0"],
        lambda out, seen: not (out / "samples.png").exists() and (out / LORA_WEIGHTS_NAME).is_file()
        and polynomial_power_two(lrs(seen), saved_config(out, "crispdiff_lora_training.json")["learning_rate"]),
    ),
    "text-to-image: tensorboard, logging dir, resume latest on a fresh run": Combination(
        "text_to_image",
        ["--report_to", "tensorboard", "--logging_dir", "tb", "--checkpointing_steps", "1",
         "--resume_from_checkpoint", "latest"],
        lambda out, seen: bool(list((out / "tb").rglob("events.out.tfevents*"))) and checkpoints(out) == [1],
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
        return flags | {"--instance_data_dir": str(inputs["subject"]), "--instance_prompt": "a photo of sks dog"}
    return flags | {"--dataset_name": str(inputs["dataset"])}


RUN = {
    "unconditional": lambda argv: train(parse_config(TrainConfig, argv)),
    "dreambooth": lambda argv: train_dreambooth_lora(parse_config(DreamBoothLoRAConfig, argv)),
    "text_to_image": lambda argv: train_text_to_image_lora(parse_config(TextToImageLoRAConfig, argv)),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_a_common_flag_combination_runs_unchanged_and_does_what_it_says(name, inputs, tmp_path, seen):
    combination = COMBINATIONS[name]
    out = tmp_path / "out"
    minimal = minimal_command(combination.script, inputs, out)
    skip = set(combination.drop) | {token for token in combination.flags if token.startswith("--")}
    if "--with_prior_preservation" in combination.flags:  # the class flags are refused without it
        minimal |= {"--class_data_dir": str(out.parent / "class_images"), "--class_inference_steps": "2"}
    argv = [token for flag, value in minimal.items() if flag not in skip for token in (flag, value)]
    RUN[combination.script](argv + combination.flags)
    assert combination.means(out, seen), (name, seen)
