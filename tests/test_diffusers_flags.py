"""diffusers' example-script flags on crispdiff's scripts: every flag of the three reference scripts is accepted (with
diffusers' meaning) or refused with a one-line reason, and the settings users rely on behave as in diffusers, compared
by value (learning rates, schedules, step counts)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_dir

from crispdiff.core.config import TrainConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import parse_config
from crispdiff.sd.config import DreamBoothLoRAConfig, TextToImageLoRAConfig
from crispdiff.train.loop import LoopTrainer
from crispdiff.train.optimization import scaled_learning_rate
from crispdiff.train.process import make_accelerator

REPO = Path(__file__).resolve().parents[1]

#: crispdiff's counterpart of each reference script, and the reference flags it refuses (all others are accepted).
SCRIPTS = {
    "train_unconditional.py": {"preserve_input_precision"},
    "train_dreambooth_lora.py": {"class_labels_conditioning", "validation_images"},
    "train_text_to_image_lora.py": set(),
    # diffusers' SDXL scripts (examples/dreambooth, examples/text_to_image); checked when ../shared holds copies, and
    # against a list of their flags in tests/test_sdxl_lora.py either way
    "train_dreambooth_lora_sdxl.py": {
        "do_edm_style_training", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
        "prodigy_safeguard_warmup",
    },
    "train_text_to_image_lora_sdxl.py": {"enable_npu_flash_attention", "debug_loss"},
}  # fmt: skip


def reference_flags(script: str) -> set[str]:
    """The ``--flags`` a reference script's argparse defines, read from its source."""
    path = shared_dir() / "reference" / "diffusers-examples" / script
    if not path.is_file():
        pytest.skip(f"diffusers' reference scripts not found at {path.parent} (set CRISPDIFF_SHARED)")
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


def script_help(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "train_scripts" / script), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_reference_flag_is_in_the_scripts_help(script):
    """A flag of diffusers' script missing from crispdiff's ``--help`` fails here; refused ones say so in the help."""
    flags = reference_flags(script)
    assert len(flags) > 40  # the parse found the scripts' arguments
    help_text = script_help(script)
    offered = set(re.findall(r"(?<![\w-])--([a-z0-9_]+)", help_text))
    assert sorted(flags - offered) == []
    refused = set(re.findall(r"--([a-z0-9_]+)(?:\s+\[[^\]]*\])?\s+Refused \(diffusers' flag\)", help_text))
    assert refused == SCRIPTS[script]


def test_a_refused_flag_is_a_one_line_error_naming_what_to_do(tmp_path):
    cases = [(TrainConfig, "--preserve_input_precision"), (DreamBoothLoRAConfig, "--validation_images")]
    for config_cls, flag in cases:
        with pytest.raises(FlagError, match=rf"^{flag} is not supported by crispdiff: .*drop"):
            parse_config(config_cls, [flag, "a.png", "b.png"] if "images" in flag else [flag])
    done = subprocess.run(
        [sys.executable, str(REPO / "train_scripts" / "train_unconditional.py"), "--preserve_input_precision"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--preserve_input_precision is not supported" in done.stderr


def test_diffusers_names_set_crispdiff_flags():
    """Each diffusers spelling lands on the crispdiff setting of the same meaning."""
    theirs = parse_config(
        TrainConfig,
        [
            "--num_epochs", "7", "--ema_max_decay", "0.995", "--logger", "none", "--eval_batch_size", "9",
            "--ddpm_num_inference_steps", "13", "--ddpm_num_steps", "500", "--ddpm_beta_schedule", "squaredcos_cap_v2",
            "--save_images_epochs", "3", "--save_model_epochs", "4", "--dataloader_num_workers", "4",
            "--local_rank", "0",
        ],
    )  # fmt: skip
    assert (theirs.num_epochs, theirs.ema_decay, theirs.report_to) == (7, 0.995, "none")
    assert (theirs.num_validation_images, theirs.validation_inference_steps) == (9, 13)
    assert (theirs.num_train_timesteps, theirs.beta_schedule) == (500, "cosine")  # diffusers' name of the cosine
    assert (theirs.validation_epochs, theirs.save_model_epochs) == (3, 4)
    lora = parse_config(
        DreamBoothLoRAConfig,
        [
            "--pretrained_model_name_or_path", "sd", "--instance_data_dir", "dog", "--instance_prompt", "sks dog",
            "--num_train_epochs", "2", "--image_interpolation_mode", "bicubic", "--lora_rank", "8",
            "--validation_epochs", "5", "--tokenizer_max_length", "12", "--text_encoder_use_attention_mask",
            "--pre_compute_text_embeddings", "--prior_generation_precision", "bf16", "--with_prior_preservation",
            "--class_data_dir", "dogs", "--class_prompt", "a dog",
        ],
    )  # fmt: skip
    assert (lora.num_epochs, lora.max_train_steps, lora.interpolation, lora.rank) == (2, None, "bicubic", 8)
    assert (lora.validation_epochs, lora.tokenizer_max_length, lora.text_encoder_use_attention_mask) == (5, 12, True)
    from crispdiff.transfer.config import TransferConfig

    transfer = parse_config(
        TransferConfig, ["--pretrained_model_name_or_path", "unet", "--train_modules", "lora", "--rank", "3"]
    )
    assert transfer.lora_rank == 3  # one LoRA-rank flag name for every trainer
    with pytest.raises(FlagError, match="--validation_steps or --validation_epochs"):
        parse_config(TextToImageLoRAConfig, ["--pretrained_model_name_or_path", "sd", "--validation_steps", "5",
                                             "--validation_epochs", "1"])  # fmt: skip


def test_scale_lr_is_diffusers_rule():
    """diffusers: lr x gradient accumulation x batch x processes (crispdiff once divided that by 64)."""
    config = parse_config(
        TextToImageLoRAConfig,
        ["--pretrained_model_name_or_path", "sd", "--scale_lr", "--learning_rate", "1e-4", "--train_batch_size", "2",
         "--gradient_accumulation_steps", "3"],
    )  # fmt: skip
    assert scaled_learning_rate(config, num_processes=4) == pytest.approx(1e-4 * 3 * 2 * 4)


def lr_schedule(config, num_items: int = 8) -> tuple[int, list[float]]:
    """The run's length and the learning rate of each of its optimizer steps, from the real loop's scheduler."""
    config = config.with_values(report_to="none", output_dir="unused")
    trainer = LoopTrainer(config, make_accelerator(config), num_items)
    weight = torch.nn.Parameter(torch.zeros(2))
    trainer.setup_optimization(torch.nn.Linear(2, 2), [weight])
    lrs = []
    for _ in range(trainer.max_steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return trainer.max_steps, lrs


def test_lr_warmup_epochs_cycles_and_power_are_diffusers(tmp_path):
    base = ["--pretrained_model_name_or_path", "sd", "--learning_rate", "1e-3", "--train_batch_size", "2"]

    def schedule(*flags: str) -> tuple[int, list[float]]:
        return lr_schedule(parse_config(TextToImageLoRAConfig, [*base, *flags]))

    # an explicit warm-up longer than the run is kept (diffusers), not capped at half the steps
    steps, lrs = schedule("--max_train_steps", "6", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10")
    assert steps == 6 and lrs == pytest.approx([1e-3 * k / 10 for k in range(6)])
    # a default warm-up (here the transfer-style 500 set without the flag) is still capped at half the run
    config = parse_config(TextToImageLoRAConfig, [*base, "--max_train_steps", "6", "--lr_scheduler",
                                                  "constant_with_warmup"])  # fmt: skip
    config = config.with_values(lr_warmup_steps=500)
    assert lr_schedule(config)[1] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    # --num_train_epochs without --max_train_steps: epochs over the script's default step count (8 images of 2)
    steps, _ = schedule("--num_train_epochs", "3")
    assert steps == 12
    # two hard restarts of the cosine: the LR is back at its peak half way
    steps, lrs = schedule("--max_train_steps", "8", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2")
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3) and lrs[2] < 1e-3
    # polynomial decay with power 2 to diffusers' end LR of 1e-7
    steps, lrs = schedule("--max_train_steps", "8", "--lr_scheduler", "polynomial", "--lr_power", "2")
    assert lrs == pytest.approx([(1e-3 - 1e-7) * (1 - k / 8) ** 2 + 1e-7 for k in range(8)])


def test_checkpoints_are_all_kept_by_default():
    assert parse_config(TrainConfig, []).checkpoints_total_limit is None


def test_defaults_note_names_only_flags_not_passed():
    from crispdiff.core.diffusers_flags import defaults_note

    note = defaults_note(parse_config(TrainConfig, ["--prediction_type", "epsilon", "--use_ema"]))
    assert "--beta_schedule cosine (diffusers: linear)" in note and "--snr_gamma 5.0 (diffusers: none)" in note
    assert "--prediction_type" not in note and "--use_ema" not in note
    assert defaults_note(TrainConfig()) is None  # not parsed from a command line: nothing to say


def test_lora_latents_are_random_crops_unless_center_crop(tmp_path):
    """Without --center_crop the LoRA trainer's latents are crops at several positions of each image (diffusers'
    random crop, discretised), each the VAE's encoding of those pixels; with it, the centre crop alone."""
    import numpy as np
    from PIL import Image
    from tiny_models import make_tiny_sd

    from crispdiff.core.images import uint8_to_model
    from crispdiff.latent.vae import encode_posterior
    from crispdiff.sd.base import load_sd
    from crispdiff.sd.prompts import image_view, latent_space

    base = make_tiny_sd(tmp_path / "sd")
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # 16 x 40 pictures: 24 columns of slack
        Image.fromarray(rng.integers(0, 255, (16, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "text": "x"}}\n' for i in range(3)))
    vae = load_sd(str(base)).vae
    for center, positions in ((False, [0.0, 0.5, 1.0]), (True, [0.5])):
        flags = [
            "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(folder), "--resolution", "16",
            "--cache_dir", str(tmp_path / "cache"), "--latent_cache_dtype", "float32",
        ] + (["--center_crop"] if center else ["--random_crop_positions", "3"])  # fmt: skip
        config = parse_config(TextToImageLoRAConfig, flags)
        space, data = latent_space(image_view(config), config, vae, False)
        assert space.cache.num_variants == len(positions)
        rows = torch.arange(3)
        for variant, position in enumerate(positions):
            expected, _ = encode_posterior(vae, uint8_to_model(data.crops_at(position)))
            cached, _ = space.cache.posterior(rows, torch.full_like(rows, variant))
            torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
        if not center:  # the crops differ, and training draws every one of them
            assert not torch.allclose(
                space.cache.posterior(rows, rows * 0)[0], space.cache.posterior(rows, rows * 0 + 2)[0]
            )
        assert sorted(drawn_variants(space, rows).unique().tolist()) == list(range(len(positions)))


def drawn_variants(space, rows: torch.Tensor, draws: int = 20) -> torch.Tensor:
    """The cached variants (crop positions) that ``draws`` calls of the real ``x0`` read, recorded on their way."""
    drawn: list[torch.Tensor] = []
    real_posterior = space.cache.posterior

    def recording(indices: torch.Tensor, variants: torch.Tensor):
        drawn.append(variants.clone())
        return real_posterior(indices, variants)

    space.cache.posterior = recording
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        space.x0(rows, generator, torch.device("cpu"))
    space.cache.posterior = real_posterior
    return torch.cat(drawn)
