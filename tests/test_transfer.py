"""Fine-tuning a pretrained UNet: schedule taken from the pretrained scheduler, resolution change, zero-initialised
class embedding, decoder-only and LoRA training (merge and adapter round trip), and a real `accelerate launch` run.

Every model is a real diffusers model saved as a real folder (a tiny DDPMPipeline, and google/ddpm-cifar10-32's
published configs from ../shared with random weights); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dir
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from tiny_models import base_config, tiny_unet

from crispdiff.core.errors import FlagError
from crispdiff.core.flags import parse_config
from crispdiff.data.loading import load_images
from crispdiff.diffusion.schedule import make_betas
from crispdiff.train.lora import plain_copy
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.transfer.adapters import add_unet_lora, load_lora_adapter, save_lora_adapter
from crispdiff.transfer.config import ADAPTER_FOLDER, TransferConfig
from crispdiff.transfer.pretrained import (
    adapt_unet,
    load_pretrained,
    pretrained_schedule,
    resolve_schedule,
    with_new_parameters,
)
from crispdiff.transfer.trainer import TransferTrainer, prepare_unet

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_attention_unet(seed: int = 0, sample_size: int = 16) -> UNet2DModel:
    """Two levels (8, 16 channels), attention on the second level and in the middle: ddpm-cifar10's layout in small."""
    return tiny_unet(
        seed,
        sample_size=sample_size,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory) -> Path:
    """A saved DDPMPipeline (16 px, linear betas, epsilon) as diffusers' train_unconditional.py would write it."""
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=tiny_attention_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, size: int) -> Path:
    """`count` coloured discs on white at `size` px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        img = np.full((size, size, 3), 255, np.uint8)
        cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [int(rng.integers(size // 6, size // 3))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 200, 3)
        Image.fromarray(img).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture(scope="module")
def images32(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images32"), 4, 32)


def transfer_flags(pretrained: Path, images: Path, out: Path, **overrides) -> list[str]:
    flags = {
        "pretrained_model_name_or_path": pretrained,
        "train_data_dir": images,
        "output_dir": out,
        "cache_dir": out.parent / "cache",
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 0,
        "validation_steps": 0,
        "num_validation_images": 1,
        "validation_inference_steps": 2,
        "report_to": "none",
        "ema_decay": 0.9,
        "cpu_threads": 1,
    }
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def transfer_config(pretrained: Path, images: Path, out: Path, **overrides) -> TransferConfig:
    return parse_config(TransferConfig, transfer_flags(pretrained, images, out, **overrides))


def make_trainer(config: TransferConfig) -> TransferTrainer:
    """What train_transfer does, minus the final export: the pretrained model prepared and the UNetTrainer built."""

    pretrained = load_pretrained(config.pretrained_model_name_or_path)
    config = resolve_schedule(config, pretrained)
    space = PixelSpace(load_images(config, show_progress=False))
    unet, trainable, new_keys = prepare_unet(config, pretrained, space)
    return TransferTrainer(config, space, make_accelerator(config), unet, trainable, new_keys)


def random_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter is a no-op); give it weights so the merge has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def unet_output(unet: torch.nn.Module, size: int = 32, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([20, 700]), **kwargs).sample


# -- the published ddpm-cifar10-32 configs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10_ddpm(tmp_path_factory) -> Path:
    """google/ddpm-cifar10-32's configs from ../shared with random weights, saved as a DDPMPipeline folder."""
    reference = shared_dir() / "reference" / "ddpm-cifar10-32"
    if not (reference / "unet" / "config.json").is_file():
        pytest.skip(f"ddpm-cifar10-32 configs not found at {reference} (set CRISPDIFF_SHARED to the shared/ folder)")
    unet = UNet2DModel.from_config(json.loads((reference / "unet" / "config.json").read_text()))
    scheduler = DDPMScheduler.from_config(json.loads((reference / "scheduler" / "scheduler_config.json").read_text()))
    folder = tmp_path_factory.mktemp("ddpm_cifar10")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def test_ddpm_cifar10_configs_train_a_step_at_64(cifar10_ddpm, tmp_path, caplog):
    images = write_images(tmp_path / "images64", 2, 64)
    config = transfer_config(cifar10_ddpm, images, tmp_path / "out", resolution=64, train_batch_size=1)
    config = config.with_values(use_ema=False)  # 35.7M parameters: one step, no EMA copy
    with caplog.at_level(logging.INFO, logger="crispdiff"):
        trainer = make_trainer(config)
    config = trainer.config  # the pretrained schedule resolved into the run's config
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.prediction_type) == (
        "linear",
        1e-4,
        0.02,
        "epsilon",
    )
    assert "attention now runs at 32x32 (level 1), 8x8 (middle block)" in caplog.text
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.config.sample_size == 64 and list(unet.config.block_out_channels) == [128, 256, 256, 256]
    pretrained = UNet2DModel.from_pretrained(cifar10_ddpm, subfolder="unet")
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pretrained.state_dict().items())
    losses = trainer.optimizer_step()
    assert trainer.step == 1 and torch.isfinite(losses["loss"])
    assert not torch.equal(unet.conv_out.weight, pretrained.conv_out.weight)


# -- the schedule comes from the pretrained scheduler -----------------------------------------------------------------


def test_schedule_and_prediction_type_come_from_the_pretrained_scheduler(tiny_ddpm, images32, tmp_path, caplog):
    config = transfer_config(tiny_ddpm, images32, tmp_path / "out")
    assert config.beta_schedule is None and config.prediction_type is None  # no crispdiff default sneaks in
    config = resolve_schedule(config, load_pretrained(str(tiny_ddpm)))
    assert (config.beta_schedule, config.prediction_type, config.num_train_timesteps) == ("linear", "epsilon", 1000)

    switched = transfer_config(tiny_ddpm, images32, tmp_path / "out", prediction_type="v_prediction")
    with caplog.at_level(logging.WARNING, logger="crispdiff"):
        switched = resolve_schedule(switched, load_pretrained(str(tiny_ddpm)))
    assert switched.prediction_type == "v_prediction" and switched.beta_schedule == "linear"
    alpha_bar_T = torch.cumprod(1.0 - make_betas("linear", 1000), 0)[-1]
    assert "experimental" in caplog.text and f"1/alpha_T = {1.0 / math.sqrt(float(alpha_bar_T)):.0f} " in caplog.text

    for modules in (dict(train_modules="lora"), dict(train_modules="decoder"), dict(freeze_encoder="true")):
        refused = transfer_config(tiny_ddpm, images32, tmp_path / "out", prediction_type="v_prediction", **modules)
        with pytest.raises(FlagError, match="cannot retarget"):
            resolve_schedule(refused, load_pretrained(str(tiny_ddpm)))


def test_schedule_flags_given_on_the_command_line_win_over_the_pretrained_pipelines(tmp_path, images32, caplog):
    """A crispdiff pipeline trained with ``--snr_shift -1`` passes its shift on to a transfer run, unless the user
    gives ``--snr_shift`` (or another schedule flag): then the flag wins, with a warning that the schedule changed."""
    from crispdiff.publish.export import save_pipeline

    shifted = make_betas("cosine", 1000, snr_shift=-1.0).tolist()
    save_pipeline(tmp_path / "crisp", unet=tiny_attention_unet(),
                  scheduler_base_config={**base_config("v_prediction"), "trained_betas": shifted},
                  beta_schedule="cosine", training_config={"beta_schedule": "cosine", "snr_shift": -1.0})  # fmt: skip
    pretrained = load_pretrained(str(tmp_path / "crisp"))
    inherited = transfer_config(tmp_path / "crisp", images32, tmp_path / "a")
    inherited = resolve_schedule(inherited, pretrained)
    assert (inherited.beta_schedule, inherited.snr_shift) == ("cosine", -1.0)
    given = transfer_config(tmp_path / "crisp", images32, tmp_path / "b", snr_shift=0.5)
    with caplog.at_level(logging.WARNING, logger="crispdiff"):
        given = resolve_schedule(given, pretrained)
    assert (given.beta_schedule, given.snr_shift) == ("cosine", 0.5)
    assert "snr_shift=0.5" in caplog.text and "re-learn its noise levels" in caplog.text


ARCHITECTURE_FLAGS = {
    "model_config_name_or_path": "unet.json",
    "base_channels": "16",
    "channel_mults": "1",
    "attention_res": "8",
    "layers_per_block": "3",
    "attention_head_dim": "4",
    "resnet_time_scale_shift": "scale_shift",
    "encoder": "timm:resnet18",
    "encoder_weights": "w.safetensors",
    "encoder_norm": "batch",
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURE_FLAGS))
def test_architecture_flags_are_refused_in_one_line(name, tiny_ddpm, images32, tmp_path):
    """The pretrained model decides the architecture: a builder flag would be ignored, so it is refused by name."""
    with pytest.raises(FlagError, match=rf"^--{name} is not supported here: the architecture is the pretrained"):
        transfer_config(tiny_ddpm, images32, tmp_path / "out", **{name: ARCHITECTURE_FLAGS[name]})


def resnet_dropouts(unet: torch.nn.Module) -> set[float]:
    return {block.dropout.p for name, block in unet.named_modules() if name.endswith(("resnets.0", "resnets.1"))}


def test_dropout_is_set_on_the_pretrained_unet_only_when_given(tiny_ddpm, images32, tmp_path):
    """--dropout changes the dropout of the pretrained UNet's ResNet blocks (the weights stay the pretrained ones);
    without the flag the pretrained model's own dropout (0 here) is kept."""
    pretrained = load_pretrained(str(tiny_ddpm))
    space = PixelSpace(load_images(transfer_config(tiny_ddpm, images32, tmp_path / "out"), show_progress=False))
    kept, _, _ = prepare_unet(transfer_config(tiny_ddpm, images32, tmp_path / "out"), pretrained, space)
    dropped, _, new_keys = prepare_unet(
        transfer_config(tiny_ddpm, images32, tmp_path / "out", dropout=0.3), pretrained, space
    )
    assert resnet_dropouts(kept) == {0.0} and kept.config.dropout == 0.0
    assert resnet_dropouts(dropped) == {0.3} and dropped.config.dropout == 0.3 and new_keys == []
    assert all(torch.equal(a, b) for a, b in zip(dropped.state_dict().values(), pretrained.unet.state_dict().values()))
    with pytest.raises(FlagError, match="--dropout must be in"):
        transfer_config(tiny_ddpm, images32, tmp_path / "out", dropout=1.5)


def test_crispdiff_pipelines_trained_betas_map_back_to_their_schedule():
    cosine = base_config("v_prediction")  # what a crispdiff pipeline's scheduler stores: explicit betas
    fields = pretrained_schedule({**cosine, "beta_schedule": "linear"})
    assert (fields["beta_schedule"], fields["prediction_type"]) == ("cosine", "v_prediction")
    named = pretrained_schedule({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})
    assert named["beta_schedule"] == "cosine"  # diffusers' name for the same betas
    diffusers_betas = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(
        diffusers_betas, torch.tensor(cosine["trained_betas"], dtype=torch.float64), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(FlagError, match="match no crispdiff schedule"):
        pretrained_schedule({**cosine, "trained_betas": [b * 1.01 for b in cosine["trained_betas"]]})


# -- new parameters ---------------------------------------------------------------------------------------------------


def test_class_embedding_is_zero_and_exactly_the_new_keys_are_missing():
    pretrained = tiny_attention_unet()
    adapted, new_keys = adapt_unet(pretrained, 32, num_class_embeds=4)
    assert new_keys == ["class_embedding.weight"] and adapted.config.sample_size == 32
    assert adapted.class_embedding.weight.shape[0] == 4 and not adapted.class_embedding.weight.any()
    # zero-initialised: every class computes what the pretrained unconditional model computes (to the last bits,
    # which BLAS kernels may round differently for differently aligned copies of the same weights)
    expected = unet_output(pretrained)
    torch.testing.assert_close(unet_output(adapted, class_labels=torch.tensor([0, 3])), expected, rtol=1e-6, atol=1e-6)

    with_extra = tiny_attention_unet()
    with_extra.register_buffer("leftover", torch.zeros(1))
    with pytest.raises(RuntimeError, match="unexpected \\['leftover'\\]"):
        with_new_parameters(with_extra, {"num_class_embeds": 4})
    with pytest.raises(FlagError, match="pass --class_column"):
        adapt_unet(adapted, 32, num_class_embeds=None)


def test_class_conditional_fine_tuning_trains_the_new_embedding_even_with_lora(tiny_ddpm, tmp_path):
    images = write_images(tmp_path / "classes", 4, 32)
    rows = [{"file_name": f"img_{i}.png", "kind": "ab"[i % 2]} for i in range(4)]
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = transfer_config(tiny_ddpm, images, tmp_path / "out", train_modules="lora", class_column="kind")
    trainer = make_trainer(config)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.config.num_class_embeds == 3 and unet.class_embedding.weight.requires_grad  # a, b + null
    assert not unet.class_embedding.weight.any()
    for _ in range(2):
        trainer.optimizer_step()
    assert unet.class_embedding.weight.any()
    kwargs = trainer.pipeline_kwargs()
    assert kwargs["class_names"] == ["a", "b"] and kwargs["unet"].class_embedding.weight.any()


def test_crispdiff_pipelines_and_bare_unet_folders_load_with_their_schedule(tmp_path):
    from crispdiff.publish.export import save_pipeline

    unet = tiny_attention_unet()
    save_pipeline(tmp_path / "crisp", unet=unet, scheduler_base_config=base_config("v_prediction"),
                  beta_schedule="cosine", training_config={"beta_schedule": "cosine"})  # fmt: skip
    loaded = load_pretrained(str(tmp_path / "crisp"))
    assert loaded.source == "CrispDiffPipeline"
    # the weights come back bit for bit (outputs may differ in the last bit: BLAS kernels depend on memory alignment)
    reference = unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.unet.state_dict().items())
    fields = pretrained_schedule(loaded.scheduler_config, loaded.training_config)
    assert (fields["beta_schedule"], fields["prediction_type"]) == ("cosine", "v_prediction")

    bare = load_pretrained(str(tmp_path / "crisp" / "unet"))  # a pipeline's unet/: the sibling scheduler is used
    assert bare.scheduler_config.get("prediction_type") == "v_prediction"
    unet.save_pretrained(tmp_path / "lone")
    assert load_pretrained(str(tmp_path / "lone")).scheduler_config["prediction_type"] == "epsilon"  # DDPM's default
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        load_pretrained(str(tmp_path))


def test_a_class_conditional_crispdiff_pipeline_brings_its_class_names(tmp_path):
    """model_index.json stores the names as {"0": name, ...}; the transfer must read them back as a list in id order
    (they are compared with the data's classes before fine-tuning)."""
    from crispdiff.publish.export import save_pipeline

    names = ["b", "a", "c"]  # id order, not sorted order
    unet, _ = adapt_unet(tiny_attention_unet(), 16, num_class_embeds=len(names) + 1)
    save_pipeline(tmp_path / "classes", unet=unet, scheduler_base_config=base_config("v_prediction"),
                  beta_schedule="cosine", class_names=names)  # fmt: skip
    assert load_pretrained(str(tmp_path / "classes")).class_names == names


# -- what trains ------------------------------------------------------------------------------------------------------


def test_decoder_training_leaves_the_encoder_bit_identical(tiny_ddpm, images32, tmp_path):
    config = transfer_config(tiny_ddpm, images32, tmp_path / "out", train_modules="decoder")
    trainer = make_trainer(config)
    before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.unet).state_dict().items()}
    for _ in range(2):
        trainer.optimizer_step()
    after = trainer.sampling_unet().state_dict()  # the EMA weights, which is what gets saved
    frozen = [k for k in before if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(k.startswith("down_blocks.") for k in frozen) and any(k.startswith("mid_block.") for k in frozen)
    assert not torch.equal(before["conv_out.weight"], after["conv_out.weight"])


def test_lora_merge_equals_the_adapter_model_and_the_adapter_file_reloads(tmp_path):
    config = parse_config(
        TransferConfig, ["--pretrained_model_name_or_path", "x", "--train_modules", "lora", "--lora_rank", "4"]
    )
    base, _ = adapt_unet(tiny_attention_unet(), 32, num_class_embeds=3)
    model, new_keys = adapt_unet(tiny_attention_unet(), 32, num_class_embeds=3)
    adapted = add_unet_lora(model, config)
    assert any(".to_q" in n for n in adapted) and any(n.endswith(".conv1") for n in adapted)
    assert any(n.endswith("samplers.0.conv") for n in adapted)  # the presets include the down/up samplers
    random_lora_b(model)
    with torch.no_grad():
        model.class_embedding.weight.normal_()  # a trained new parameter travels with the adapter
    labels = dict(class_labels=torch.tensor([1, 2]))
    expected = unet_output(model, **labels)
    assert not torch.allclose(expected, unet_output(base, **labels), atol=1e-3)  # the adapter does something

    merged = plain_copy(model)
    assert type(merged) is UNet2DModel and not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(unet_output(merged, **labels), expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # plain UNet2DModel weights: diffusers alone loads them
    reloaded = UNet2DModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(unet_output(reloaded, **labels), expected, atol=1e-5, rtol=1e-5)

    folder = save_lora_adapter(model, tmp_path / ADAPTER_FOLDER, new_keys)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    fresh = load_lora_adapter(adapt_unet(tiny_attention_unet(), 32, num_class_embeds=3)[0], folder)
    torch.testing.assert_close(unet_output(fresh, **labels), expected, atol=1e-6, rtol=1e-6)


def test_lora_training_keeps_the_base_frozen_and_samples_a_merged_unet(tiny_ddpm, images32, tmp_path):
    config = transfer_config(tiny_ddpm, images32, tmp_path / "out", train_modules="lora", lora_target_modules="conv")
    trainer = make_trainer(config)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    for _ in range(2):
        trainer.optimizer_step()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in base.items())
    sampled = trainer.sampling_unet()
    assert type(sampled) is UNet2DModel and not any("lora" in k for k in sampled.state_dict())


def test_a_lora_run_resumes_exactly(tiny_ddpm, images32, tmp_path, capsys):
    """Checkpoints hold the injected adapter and its EMA; a run resumed at step 2 ends with the same merged UNet,
    also with a validation grid on the checkpoint's step (it merges the adapter into a fresh UNet built there)."""
    import shutil

    from crispdiff.transfer.trainer import train_transfer

    flags = dict(train_modules="lora", max_train_steps=4, checkpointing_steps=2, validation_steps=2)
    first = train_transfer(transfer_config(tiny_ddpm, images32, tmp_path / "a", **flags))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    resumed = transfer_config(tiny_ddpm, images32, tmp_path / "b", resume_from_checkpoint="latest", **flags)
    second = train_transfer(resumed)
    assert "Resumed from" in capsys.readouterr().out  # not a second run from the start
    a = UNet2DModel.from_pretrained(first, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(second, subfolder="unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the script -------------------------------------------------------------------------------------------------------


def test_accelerate_launch_fine_tunes_a_ddpm_pipeline_folder(tiny_ddpm, images32, tmp_path):
    """A real `accelerate launch` of the script: 16 px DDPMPipeline -> 32 px LoRA run -> a crispdiff pipeline that
    reloads, samples with the pretrained betas, and whose UNet equals the base with the saved adapter loaded."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"),
        str(REPO_ROOT / "train_scripts" / "train_transfer.py"),
        *transfer_flags(tiny_ddpm, images32, out, train_modules="lora", save_lora_adapter="true"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "attention now runs at 16x16 (level 1), 16x16 (middle block)" in log

    from crispdiff.publish.export import load_pipeline

    pipeline = load_pipeline(out / "pipeline")
    scheduler = pipeline.scheduler.config
    assert scheduler.prediction_type == "epsilon" and type(pipeline.scheduler).__name__.startswith("DPMSolver")
    np.testing.assert_allclose(scheduler.trained_betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.images[0].size == (32, 32)

    base, _ = adapt_unet(UNet2DModel.from_pretrained(tiny_ddpm, subfolder="unet"), 32)
    with_adapter = load_lora_adapter(base, out / ADAPTER_FOLDER)
    torch.testing.assert_close(unet_output(pipeline.unet), unet_output(with_adapter), atol=1e-5, rtol=1e-5)


def test_the_script_refuses_lora_with_a_prediction_type_switch_in_one_line(tiny_ddpm, images32, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = transfer_flags(tiny_ddpm, images32, tmp_path / "out", train_modules="lora", prediction_type="v_prediction")
    script = str(REPO_ROOT / "train_scripts" / "train_transfer.py")
    result = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot retarget" in result.stderr, result.stderr[-2000:]
