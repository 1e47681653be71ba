"""LoRA / DreamBooth on Stable Diffusion, with a tiny real SD built from configs (no weights downloaded).

The base is a real ``StableDiffusionPipeline`` folder: a two-level ``UNet2DConditionModel`` with cross-attention, an
f=2 ``AutoencoderKL``, a two-layer ``CLIPTextModel`` and a CLIP tokenizer over a byte-level vocabulary with no
merges (every byte is a token), written by the fixture. Images are 16 px (8x8 latents).
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
from PIL import Image
from tiny_models import RES, WITHOUT_CRISPDIFF, kill_after_checkpoint, make_tiny_sd

from crispdiff.core.flags import parse_config
from crispdiff.core.provenance import PROVENANCE_NAME, public_command
from crispdiff.sd.base import load_sd
from crispdiff.sd.config import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    DreamBoothLoRAConfig,
    SDLoRAError,
    TextToImageLoRAConfig,
)
from crispdiff.sd.prompts import generate_class_images
from crispdiff.sd.trainer import train_dreambooth_lora, train_text_to_image_lora

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    """Four 24 px pictures (a coloured disc on a background) with per-image captions for two of them."""
    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    for i in range(4):
        image = np.empty((24, 24, 3), np.uint8)
        image[:] = rng.integers(0, 255, 3)
        disc = (yy - 12 - i) ** 2 + (xx - 10 - i) ** 2 < 40
        image[disc] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    rows = [{"file_name": "00.png", "text": "sks dog on grass"}, {"file_name": "01.png", "text": ""}]
    rows += [{"file_name": f"{i:02d}.png", "text": f"sks dog number {i}"} for i in (2, 3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def captioned_dir(subject_dir, tmp_path_factory) -> Path:
    """The subject pictures with a caption for every image (text-to-image needs one each)."""
    folder = tmp_path_factory.mktemp("captioned")
    for image in subject_dir.glob("*.png"):
        shutil.copy(image, folder / image.name)
    rows = [{"file_name": f"{i:02d}.png", "text": f"sks dog {['red', 'green', 'blue', 'grey'][i]}"} for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def common_flags(base: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--cache_dir", str(cache),
        "--resolution", str(RES), "--train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
        "--num_validation_images", "2", "--validation_inference_steps", "3", "--vae_batch_size", "4",
        "--cpu_threads", "1",
    ]  # fmt: skip


def plain_diffusers_images(
    base: Path,
    lora: Path | None,
    prompt: str,
    weight_name: str | None = None,
    count: int = 2,
    steps: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """What a user gets with diffusers alone: the base, load_lora_weights, DPM-Solver++ (as crispdiff samples)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), **({"weight_name": weight_name} if weight_name else {}))
    return pipe(
        [prompt] * count,
        num_inference_steps=steps,
        height=RES,
        width=RES,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def grid_tensor(path: Path) -> torch.Tensor:
    """The two images of a 1x2 sample grid as [2, 3, RES, RES] in [0, 1] (grids are quantised to uint8)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    height, width = tensor.shape[1:]
    if (height, width) == (RES, 2 * RES):
        return torch.stack([tensor[:, :, :RES], tensor[:, :, RES:]])
    pad = (width - 2 * RES) // 3  # make_grid pads between and around the tiles
    tiles = [tensor[:, pad : pad + RES, left : left + RES] for left in (pad, 2 * pad + RES)]
    return torch.stack(tiles)


# ----------------------------------------------------------------------------------------------------------------------


def test_dreambooth_lora_loads_in_plain_diffusers_and_kohya(tiny_sd, subject_dir, tmp_path):
    """Prior preservation (class images made once), LoRA on attention and feed-forward with alpha != rank, min-SNR,
    per-image captions: the saved file and its kohya copy give plain diffusers the in-training model's images."""
    out = tmp_path / "out"
    flags = common_flags(tiny_sd, out, tmp_path / "cache") + [
        "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--caption_column", "text",
        "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a photo of dog",
        "--num_class_images", "3", "--sample_batch_size", "2", "--class_inference_steps", "2",
        "--rank", "4", "--lora_alpha", "8", "--lora_target_modules", "attention", "ff",
        "--snr_gamma", "5", "--max_train_steps", "3", "--checkpointing_steps", "0", "--validation_steps", "0",
        "--validation_prompt", PROMPT, "--export_kohya",
    ]  # fmt: skip
    config = parse_config(DreamBoothLoRAConfig, flags)
    path = train_dreambooth_lora(config)
    assert path == out / LORA_WEIGHTS_NAME

    # the class images were generated once: a second top-up makes none and leaves the files as they were
    class_files = sorted((tmp_path / "class").glob("*.png"))
    assert len(class_files) == 3
    before = [f.read_bytes() for f in class_files]
    assert generate_class_images(config, load_sd(str(tiny_sd)), torch.device("cpu")) == 0
    assert [f.read_bytes() for f in sorted((tmp_path / "class").glob("*.png"))] == before

    # both the UNet and the text encoder got adapters, stored in diffusers' layout with the adapter config
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert any(k.startswith("unet.") and "ff.net" in k for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8

    trained = grid_tensor(out / "samples.png")  # the in-training model's samples of the validation prompt
    loaded = plain_diffusers_images(tiny_sd, out, PROMPT)
    base = plain_diffusers_images(tiny_sd, None, PROMPT)
    assert (loaded - base).abs().max() > 0.02  # the LoRA changes the images (the comparison below can fail)
    assert (loaded - trained).abs().max() <= 1.0 / 255 + 1e-6  # equal up to the grid's uint8 rounding

    with safe_open(str(out / KOHYA_WEIGHTS_NAME), "pt") as handle:
        kohya_keys = list(handle.keys())
        assert float(handle.get_tensor(next(k for k in kohya_keys if k.endswith(".alpha")))) == 8.0
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in kohya_keys)
    kohya = plain_diffusers_images(tiny_sd, out, PROMPT, weight_name=KOHYA_WEIGHTS_NAME)
    torch.testing.assert_close(kohya, loaded, atol=1e-4, rtol=0)

    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_sd}" in card and "dreambooth" in card and PROMPT in card
    record = json.loads((out / PROVENANCE_NAME).read_text())
    assert record["command"] == public_command() and f"Command: `{' '.join(record['command'])}`" in card


def test_text_to_image_resume_is_exact_and_validation_changes_nothing(tiny_sd, captioned_dir, tmp_path):
    """4 steps with a validation grid every step == 3 steps (checkpoint at 2) resumed to 4, bit for bit."""
    from safetensors.torch import load_file

    def run(out: Path, steps: int, *extra: str) -> Path | None:
        flags = common_flags(tiny_sd, out, tmp_path / "cache") + [
            "--train_data_dir", str(captioned_dir), "--max_train_steps", str(steps), "--lora_dropout", "0.1",
            "--noise_offset", "0.05", "--random_flip", "--snr_gamma", "5", *extra,
        ]  # fmt: skip
        return train_text_to_image_lora(parse_config(TextToImageLoRAConfig, flags))

    validating = ["--validation_prompt", "sks dog", "--validation_steps", "1", "--checkpointing_steps", "0"]
    straight = run(tmp_path / "a", 4, *validating)
    assert len(list((tmp_path / "a" / "samples").glob("step_*.png"))) == 3
    run(tmp_path / "b", 3, "--checkpointing_steps", "2", "--validation_steps", "0")
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "lora_unet.safetensors").is_file()
    # the checkpoint holds the adapter, not the frozen UNet
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*"))
    resume = ["--resume_from_checkpoint", "latest", "--overwrite_output_dir"]
    resumed = run(tmp_path / "b", 4, *resume, "--checkpointing_steps", "0", "--validation_steps", "0")
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at_two = load_file(str(checkpoint / "lora_unet.safetensors"))  # peft keys; training moved on after step 2
    ups = [k for k in at_two if "lora_B" in k]
    assert ups and any(not torch.equal(at_two[k], a["unet." + k.replace("lora_B", "lora.up")]) for k in ups)


def test_dreambooth_killed_after_a_checkpoint_resumes_exactly(tiny_sd, subject_dir, tmp_path, capsys):
    """DreamBooth with prior preservation, LoRA dropout on the UNet and the text encoder, accumulation 2, and a
    validation grid on the checkpoint's step: a run SIGKILLed right after writing checkpoint-2 (a real process, before
    that grid) resumes with ``--resume_from_checkpoint latest`` to the LoRA of a run never killed, bit for bit.
    (Validation here draws nothing from the global RNG today; a sampler that did would break this test without
    ``untouched_rng``: checked by hand.)"""
    from safetensors.torch import load_file

    def flags(out: Path) -> list[str]:
        return common_flags(tiny_sd, out, tmp_path / "cache") + [
            "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--caption_column", "text",
            "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a dog",
            "--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2",
            "--train_text_encoder", "--lora_dropout", "0.1", "--gradient_accumulation_steps", "2",
            "--noise_offset", "0.05", "--snr_gamma", "5", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        ]  # fmt: skip

    straight = train_dreambooth_lora(parse_config(DreamBoothLoRAConfig, flags(tmp_path / "straight")))
    assert (tmp_path / "straight" / "samples" / "step_0000002.png").is_file()  # validated on the checkpoint's step

    out = tmp_path / "out"
    script = str(REPO / "train_scripts" / "train_dreambooth_lora.py")
    command = [sys.executable, "-c", kill_after_checkpoint(out.name, 2), script]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command + flags(out), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -9, (done.stdout + done.stderr)[-3000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "samples").exists() and not (out / LORA_WEIGHTS_NAME).exists()

    capsys.readouterr()
    resumed = train_dreambooth_lora(
        parse_config(DreamBoothLoRAConfig, flags(out) + ["--resume_from_checkpoint", "latest"])
    )
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed LoRA diverged"
    assert any(k.startswith("text_encoder.") for k in a)
    at_two = load_file(str(out / "checkpoint-2" / "lora_unet.safetensors"))  # training moved on after step 2
    ups = [k for k in at_two if "lora_B" in k]
    assert ups and any(not torch.equal(at_two[k], a["unet." + k.replace("lora_B", "lora.up")]) for k in ups)


_NO_CRISPDIFF = WITHOUT_CRISPDIFF + textwrap.dedent(
    """
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    folder, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["sks dog"] * 2, num_inference_steps=3, height=16, width=16,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(out, images)
    print(type(pipe).__module__, type(pipe).__name__)
    """
)


def test_text_encoder_lora_script_and_exported_pipeline(tiny_sd, captioned_dir, tmp_path):
    """`accelerate launch` of the script with a text-encoder LoRA and --save_pipeline: the fused pipeline gives the
    in-training model's images, and reloads bit-identically where crispdiff cannot be imported."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        str(REPO / "train_scripts" / "train_text_to_image_lora.py"),
        *common_flags(tiny_sd, out, tmp_path / "cache"),
        "--train_data_dir", str(captioned_dir), "--train_text_encoder", "--rank", "2", "--lora_alpha", "3",
        "--max_train_steps", "3", "--checkpointing_steps", "0", "--validation_prompt", "sks dog",
        "--validation_steps", "0", "--save_pipeline", "--output_size", "8", "--export_kohya",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    from safetensors import safe_open

    with safe_open(str(out / LORA_WEIGHTS_NAME), "pt") as handle:
        assert any(k.startswith("text_encoder.") for k in handle.keys())  # noqa: SIM118
    with safe_open(str(out / KOHYA_WEIGHTS_NAME), "pt") as handle:  # the kohya copy carries the text encoder too
        te_alphas = [handle.get_tensor(k) for k in handle.keys() if k.startswith("lora_te_") and k.endswith(".alpha")]  # noqa: SIM118
        assert any(k.startswith("lora_te_") and k.endswith(".lora_down.weight") for k in handle.keys())  # noqa: SIM118
    assert te_alphas and all(float(a) == 3.0 for a in te_alphas)  # the real --lora_alpha, not the rank

    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_crispdiff_sd", "CrispDiffSDPipeline"]
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler" and (folder / "pipeline_crispdiff_sd.py").is_file()
    for made_by_the_run in (out, folder):  # the LoRA folder and the fused export name the command of the run
        command = json.loads((made_by_the_run / PROVENANCE_NAME).read_text())["command"]
        assert command[0].endswith("train_text_to_image_lora.py")
        assert command[-3:] == ["--output_size", "8", "--export_kohya"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"

    def images(size: int | None, kind: str = "pt") -> torch.Tensor:
        return pipe(
            ["sks dog"] * 2, num_inference_steps=3, height=RES, width=RES, output_size=size,
            generator=torch.Generator().manual_seed(0), output_type=kind,
        ).images  # fmt: skip

    native = images(RES)
    trained = grid_tensor(out / "samples.png")
    base = plain_diffusers_images(tiny_sd, None, "sks dog")
    assert (native - base).abs().max() > 0.02  # the fused LoRA (UNet and text encoder) matters ...
    assert (native - trained).abs().max() <= 2.0 / 255  # ... and is the in-training model, up to grid rounding
    try:  # plain diffusers loads a text-encoder LoRA through transformers, which may demand a newer peft
        loaded = plain_diffusers_images(tiny_sd, out, "sks dog")
    except ValueError as err:
        assert "PEFT" in str(err), err  # only that environment limit is tolerated (transformers 5.x wants peft>=0.22)
    else:
        assert (loaded - trained).abs().max() <= 2.0 / 255
    small = images(None, "np")
    assert small.shape == (2, 8, 8, 3)  # the configured output_size: a Lanczos downsample of the 16 px images

    # the kohya copy, text-encoder part included, fuses into the same model (export-sd --output_dir, diffusers' name)
    from crispdiff.cli import main

    kohya_folder = tmp_path / "kohya_pipeline"
    assert main(["export-sd", "--base", str(tiny_sd), "--lora", str(out / KOHYA_WEIGHTS_NAME),
                 "--output_dir", str(kohya_folder)]) == 0  # fmt: skip
    kohya_pipe = DiffusionPipeline.from_pretrained(kohya_folder, trust_remote_code=True)
    kohya_pipe.set_progress_bar_config(disable=True)
    from_kohya = kohya_pipe(
        ["sks dog"] * 2, num_inference_steps=3, height=RES, width=RES,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(from_kohya, native, atol=1e-4, rtol=0)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    threads = str(torch.get_num_threads())
    reload = [sys.executable, "-I", "-c", _NO_CRISPDIFF, str(folder), str(tmp_path / "out.npy"), threads]
    done = subprocess.run(reload, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "CrispDiffSDPipeline"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), small)


def test_bf16_dora_with_gradient_checkpointing_keeps_fp32_adapters(tiny_sd, subject_dir, tmp_path):
    """The CPU's mixed-precision path (bf16 autocast; fp16 needs a GPU): base weights bf16, DoRA weights fp32."""
    out = tmp_path / "out"
    flags = common_flags(tiny_sd, out, tmp_path / "cache") + [
        "--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--use_dora",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--max_train_steps", "2",
        "--checkpointing_steps", "0", "--num_validation_images", "1",
    ]  # fmt: skip
    path = train_dreambooth_lora(parse_config(DreamBoothLoRAConfig, flags))
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert any("lora_magnitude_vector" in k for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())  # (the file is written in fp32 whatever trained)
    images = plain_diffusers_images(tiny_sd, out, PROMPT)  # DoRA loads in plain diffusers too
    assert torch.isfinite(images).all()


def test_bf16_training_keeps_base_weights_bf16_and_trains_fp32_adapters(tiny_sd, captioned_dir, tmp_path):
    """What the trainer holds while it trains (the saved file is always fp32, so it cannot tell): under bf16 the
    frozen UNet and text-encoder weights are bf16, every adapter weight is fp32 and is what the optimizer moves."""
    from crispdiff.sd.prompts import PromptBank, TrainSet, captions_for, image_view, latent_space
    from crispdiff.sd.trainer import SDLoRATrainer, _prepare

    flags = common_flags(tiny_sd, tmp_path / "out", tmp_path / "cache") + [
        "--train_data_dir", str(captioned_dir), "--train_text_encoder", "--mixed_precision", "bf16",
        "--max_train_steps", "2", "--checkpointing_steps", "0", "--validation_steps", "0",
    ]  # fmt: skip
    config = parse_config(TextToImageLoRAConfig, flags)
    accelerator, parts = _prepare(config)
    space, data = latent_space(image_view(config), config, parts.vae, False)
    captions = captions_for(data, None)
    prompts = PromptBank(parts.tokenizer, captions)
    trainer = SDLoRATrainer(config, accelerator, parts, prompts, TrainSet(space, prompts.ids(captions)))
    models = trainer._named_models()
    assert set(models) == {"unet", "text_encoder"}
    before = {}
    for name, model in models.items():
        adapters = {k: p for k, p in model.named_parameters() if "lora_" in k}
        frozen = [p for k, p in model.named_parameters() if "lora_" not in k]
        assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values()), name
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen), name
        before.update({f"{name}.{k}": p.detach().clone() for k, p in adapters.items()})
    trainer.optimizer_step()
    after = {f"{n}.{k}": p for n, m in models.items() for k, p in m.named_parameters() if "lora_" in k}
    assert all(after[k].dtype == torch.float32 for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("text_encoder."))


def test_refusals_are_one_line(tiny_sd, subject_dir, tmp_path, capsys):
    from crispdiff.cli import main

    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_sd, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    v_model = make_tiny_sd(tmp_path / "v", prediction_type="v_prediction")
    flags = ["--instance_data_dir", str(subject_dir), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "o")]
    prior_without_class = ["--caption_column", "text", "--with_prior_preservation"]
    cases = [
        (["--pretrained_model_name_or_path", str(sdxl)], "StableDiffusionXLPipeline"),
        (["--pretrained_model_name_or_path", str(tiny_sd), "--prediction_type", "v_prediction"], "--prediction_type"),
        (["--pretrained_model_name_or_path", str(v_model), "--prediction_type", "epsilon"], "base scheduler's v_pred"),
        (["--pretrained_model_name_or_path", str(tiny_sd), "--use_dora", "--export_kohya"], "--export_kohya"),
        (["--pretrained_model_name_or_path", str(tiny_sd), "--mixed_precision", "fp16"], "needs a GPU"),
        (["--pretrained_model_name_or_path", str(tiny_sd), *prior_without_class], "--class_data_dir"),
        (["--pretrained_model_name_or_path", str(tiny_sd), "--lora_target_modules", "nope"], "matched no UNet module"),
    ]  # fmt: skip
    for extra, expected in cases:
        with pytest.raises(SDLoRAError, match=expected) as info:
            train_dreambooth_lora(parse_config(DreamBoothLoRAConfig, flags + extra))
        assert "\n" not in str(info.value)
    t2i = ["--pretrained_model_name_or_path", str(tiny_sd), "--train_data_dir", str(subject_dir)]
    t2i += ["--output_dir", str(tmp_path / "t"), "--cache_dir", str(tmp_path / "cache"), "--resolution", str(RES)]
    with pytest.raises(SDLoRAError, match=r"empty --caption_column caption \(first: 01.png\)"):
        train_text_to_image_lora(parse_config(TextToImageLoRAConfig, t2i))

    capsys.readouterr()
    assert main(["export-sd", "--base", str(sdxl), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "StableDiffusionXLPipeline" in err[0] and not (tmp_path / "p").exists()


def test_export_with_an_sr_component_reloads_and_upscales(tiny_sd, tmp_path):
    """export-sd --sr_model: the SR network is saved inside the folder and applied by default (16 px -> 64 px)."""
    from diffusers import DiffusionPipeline
    from spandrel.architectures.Compact import Compact

    from crispdiff.cli import main

    torch.manual_seed(3)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
    weights = tmp_path / "compact_x4.pth"
    torch.save({"params": dict(net.state_dict())}, weights)
    folder = tmp_path / "pipe"
    assert main(["export-sd", "--base", str(tiny_sd), "--sr_model", str(weights), "--out", str(folder)]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["sr_model"] == ["sr_model", "SpandrelSRModel"] and (folder / "sr_model" / "sr_model.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="pt")
    up = pipe("sks dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("sks dog", generator=torch.Generator().manual_seed(0), upscale=False, **kwargs).images
    assert up.shape == (1, 3, 4 * RES, 4 * RES) and plain.shape == (1, 3, RES, RES)


def test_push_to_hub_offline_is_a_clear_error(tiny_sd, tmp_path, monkeypatch):
    from crispdiff.publish.hub import HubUploadError
    from crispdiff.sd.lora_files import push_lora_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = ["--pretrained_model_name_or_path", str(tiny_sd), "--train_data_dir", str(tmp_path), "--push_to_hub"]
    config = parse_config(TextToImageLoRAConfig, [*flags, "--hub_token", "hf_x", "--output_dir", str(tmp_path)])
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE"):
        push_lora_to_hub(tmp_path, config)


def test_each_image_trains_with_its_own_caption(tiny_sd, subject_dir, tmp_path):
    """Per-image captions from metadata.jsonl (empty ones -> the instance prompt), each encoded once and looked up."""
    from crispdiff.data.loading import load_images
    from crispdiff.sd.prompts import PromptBank, captions_for, image_view

    config = parse_config(
        DreamBoothLoRAConfig,
        ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(subject_dir)]
        + ["--instance_prompt", PROMPT, "--caption_column", "text", "--cache_dir", str(tmp_path), "--resolution", "16"],
    )
    data = load_images(image_view(config, train_data_dir=str(subject_dir)), for_latents=True, show_progress=False)
    captions = captions_for(data, PROMPT)
    assert captions == ["sks dog on grass", PROMPT, "sks dog number 2", "sks dog number 3"]
    parts = load_sd(str(tiny_sd))
    bank = PromptBank(parts.tokenizer, captions + [PROMPT])
    assert len(bank.prompts) == 4  # the instance prompt is encoded once
    bank.precompute(parts.text_encoder, torch.device("cpu"))
    ids = bank.ids(captions)
    looked_up = bank.encode(ids, None, torch.device("cpu")).hidden
    tokens = parts.tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = parts.text_encoder(tokens.input_ids)[0]
    torch.testing.assert_close(looked_up, direct)
    assert not torch.equal(looked_up[0], looked_up[2])


def test_sd_pipeline_saved_directly_is_readable_by_others(tiny_sd, tmp_path):
    """``CrispDiffSDPipeline.save_pretrained`` rewrites model_index.json through a temp file: it must get the usual
    permissions (0644 under umask 022), not mkstemp's 0600, or nobody else on a shared machine can load it."""
    import stat

    from crispdiff.pipelines.pipeline_crispdiff_sd import CrispDiffSDPipeline

    pipe = CrispDiffSDPipeline.from_pretrained(str(tiny_sd))
    previous = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "saved" / "model_index.json").stat().st_mode) == 0o644


def test_a_lora_checkpoint_loads_with_load_lora_weights(tiny_sd, captioned_dir, tmp_path):
    """``pipe.load_lora_weights(OUTPUT_DIR/checkpoint-2)`` works as on diffusers' checkpoints, and gives the model of
    step 2: the images of a run that stopped there (constant LR, so the first two steps are the same)."""

    def run(out: Path, steps: int) -> None:
        flags = common_flags(tiny_sd, out, tmp_path / "cache") + [
            "--train_data_dir", str(captioned_dir), "--max_train_steps", str(steps), "--checkpointing_steps", "2",
            "--validation_steps", "0", "--num_validation_images", "1",
        ]  # fmt: skip
        train_text_to_image_lora(parse_config(TextToImageLoRAConfig, flags))

    run(tmp_path / "three", 3)
    run(tmp_path / "two", 2)
    checkpoint = tmp_path / "three" / "checkpoint-2"
    from_checkpoint = plain_diffusers_images(tiny_sd, checkpoint, "sks dog")
    torch.testing.assert_close(from_checkpoint, plain_diffusers_images(tiny_sd, tmp_path / "two", "sks dog"))
    assert (from_checkpoint - plain_diffusers_images(tiny_sd, None, "sks dog")).abs().max() > 0.02


def test_push_to_hub_is_checked_before_training_and_uploads_only_the_lora(tiny_sd, captioned_dir, tmp_path):
    """diffusers creates the Hub repo before step 1: offline or without a token, the run stops before any work. The
    upload leaves out checkpoints, logs, the fused pipeline and the intermediate grids."""
    from crispdiff.publish.hub import HubAccessError, files_to_upload
    from crispdiff.sd.lora_files import LORA_UPLOAD_IGNORE_PATTERNS

    out = tmp_path / "out"
    flags = common_flags(tiny_sd, out, tmp_path / "cache") + ["--train_data_dir", str(captioned_dir), "--push_to_hub"]
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        train_text_to_image_lora(parse_config(TextToImageLoRAConfig, [*flags, "--hub_token", "hf_x"]))
    assert not out.exists() and not (tmp_path / "cache").exists()

    for name in ["pytorch_lora_weights.safetensors", "README.md", "samples.png", "crispdiff_lora_training.json",
                 "samples/step_0000100.png", "pipeline/unet/diffusion_pytorch_model.safetensors",
                 "checkpoint-100/lora_unet.safetensors", "logs/events"]:  # fmt: skip
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    assert files_to_upload(out, LORA_UPLOAD_IGNORE_PATTERNS) == [
        "README.md", "crispdiff_lora_training.json", "pytorch_lora_weights.safetensors", "samples.png",
    ]  # fmt: skip


def test_model_card_takes_the_base_models_licence_and_names_prompts_rightly(tmp_path):
    """The licence is the base model's (SD 2.x is not creativeml-openrail-m); the widget shows the sample grid with its
    prompt; only DreamBooth has an instance_prompt."""
    from huggingface_hub.repocard import metadata_load

    from crispdiff.sd.lora_files import model_card

    base = tmp_path / "sd2"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: openrail++\ntags:\n- stable-diffusion\n---\n# SD 2\n")
    common = ["--pretrained_model_name_or_path", str(base), "--validation_prompt", "cute dragon creature"]
    t2i = parse_config(TextToImageLoRAConfig, [*common, "--num_train_epochs", "3"])
    card = tmp_path / "t2i.md"
    card.write_text(model_card(t2i, True, ["train"], steps=12, samples_prompt="cute dragon creature"))
    meta = metadata_load(card)
    assert meta["license"] == "openrail++" and "instance_prompt" not in meta
    assert meta["widget"] == [{"text": "cute dragon creature", "output": {"url": "samples.png"}}]
    assert "for 12 steps" in card.read_text()
    dreambooth = parse_config(DreamBoothLoRAConfig, [*common, "--instance_data_dir", "d", "--instance_prompt", PROMPT])
    card.write_text(model_card(dreambooth, True, ["train"]))
    assert metadata_load(card)["instance_prompt"] == PROMPT
    unknown = parse_config(TextToImageLoRAConfig, ["--pretrained_model_name_or_path", str(tmp_path / "none")])
    card.write_text(model_card(unknown, False, ["train"]))
    assert "license" not in metadata_load(card) and "widget" not in metadata_load(card)
    chosen = parse_config(TextToImageLoRAConfig, [*common, "--license", "cc-by-4.0"])  # --license wins over the base's
    card.write_text(model_card(chosen, True, ["train"]))
    assert metadata_load(card)["license"] == "cc-by-4.0"


def test_no_validation_images_means_no_grids(tiny_sd, captioned_dir, tmp_path):
    """--num_validation_images 0 turns the grids off (validation and final), as in diffusers; the LoRA is saved."""
    out = tmp_path / "out"
    flags = common_flags(tiny_sd, out, tmp_path / "cache") + [
        "--train_data_dir", str(captioned_dir), "--max_train_steps", "2", "--num_validation_images", "0",
        "--validation_prompt", "sks dog", "--validation_steps", "1", "--checkpointing_steps", "0",
    ]  # fmt: skip
    assert train_text_to_image_lora(parse_config(TextToImageLoRAConfig, flags)) == out / LORA_WEIGHTS_NAME
    assert not (out / "samples").exists() and not (out / "samples.png").exists()
    assert "samples.png" not in (out / "README.md").read_text()
