"""The training loop end to end on tiny models: loss falls, resume is exact, the saved pipeline reloads, DDP runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import assert_ranks_saw_different_data_and_noise, kill_launcher, read_records, record_launcher

from crispdiff.core.config import TrainConfig
from crispdiff.core.flags import parse_config
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.train.unet_trainer import UNetTrainer, train

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Eight 16 px images: coloured discs on white, so there is structure to learn."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    for i in range(8):
        img = np.full((16, 16, 3), 255, np.uint8)
        cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 6)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 200, 3)
        Image.fromarray(img).save(folder / f"img_{i}.png")
    return folder


def tiny_flags(image_folder: Path, output_dir: Path, **overrides) -> list[str]:
    flags = {
        "train_data_dir": image_folder,
        "output_dir": output_dir,
        "cache_dir": output_dir.parent / "cache",
        "resolution": 16,
        "base_channels": 8,
        "channel_mults": "1 2",
        "attention_res": "8",
        "layers_per_block": 1,
        "train_batch_size": 4,
        "max_train_steps": 6,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 3,
        "validation_steps": 0,
        "num_validation_images": 2,
        "validation_inference_steps": 2,
        "report_to": "none",
        "dropout": 0.1,
        "ema_decay": 0.99,
        "random_flip": "true",
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is None:  # an override of None leaves the flag out: the script's default applies
            continue
        argv.append(f"--{key}")
        argv.extend(str(value).split(" ") if key in ("channel_mults", "attention_res") else [str(value)])
    return argv


def tiny_config(image_folder: Path, output_dir: Path, **overrides) -> TrainConfig:
    return parse_config(TrainConfig, tiny_flags(image_folder, output_dir, **overrides))


def test_flags_parse_into_config(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "out", use_ema="false", ema_decay=None, snr_gamma=0)
    assert config.channel_mults == [1, 2] and config.attention_res == [8]
    assert config.use_ema is False and config.random_flip is True and not config.snr_gamma
    defaults = parse_config(TrainConfig, [])
    assert (defaults.beta_schedule, defaults.prediction_type, defaults.snr_gamma, defaults.use_ema) == (
        "cosine",
        "v_prediction",
        5.0,
        True,
    )


def _fixed_eval_loss(trainer: UNetTrainer) -> float:
    """Loss on a fixed batch, fixed noise and fixed timesteps: comparable before and after training."""
    from crispdiff.diffusion.schedule import sample_noise

    g = torch.Generator().manual_seed(123)
    x0 = trainer.space.x0(torch.arange(4), g, torch.device("cpu"))
    noise = sample_noise(tuple(x0.shape), g, "cpu")
    t = torch.tensor([50, 300, 600, 900])
    unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
    with torch.no_grad():
        loss = trainer.schedule.loss(unet(trainer.schedule.add_noise(x0, noise, t), t).sample, x0, noise, t, 5.0)
    unet.train()
    return loss.item()


def test_loss_falls_on_a_fixed_batch(image_folder, tmp_path):
    from crispdiff.data.loading import load_images

    config = tiny_config(
        image_folder, tmp_path / "out", max_train_steps=40, dropout=0.0, checkpointing_steps=0, random_flip="false"
    )
    config = config.with_values(max_train_samples=4)  # one batch: the same four images every step
    trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
    before = _fixed_eval_loss(trainer)
    while trainer.step < 40:
        trainer.optimizer_step()
    after = _fixed_eval_loss(trainer)
    assert after < 0.7 * before, (before, after)


def _pipeline_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "extra",
    [{}, {"validation_steps": 3, "save_model_steps": 3}],
    ids=["checkpoints-only", "validation-and-export-on-the-checkpoint-step"],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(image_folder, tmp_path, extra):
    """Run 6 steps with a checkpoint at 3; a second run resumed from that checkpoint must end bit-identical.

    Dropout, random flips, gradient accumulation and EMA are all on, so every RNG and counter must be restored; with
    a validation grid and an export on the checkpoint's step, the uninterrupted run samples and builds modules after
    the checkpoint was written, which must not move the RNG dropout draws from.
    """
    import shutil

    full = tmp_path / "full"
    overrides = dict(gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=3, **extra)
    train(tiny_config(image_folder, full, **overrides))
    assert (full / "checkpoint-3").is_dir() and (full / "pipeline" / "model_index.json").is_file()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_config(image_folder, resumed, resume_from_checkpoint="latest", **overrides))

    a, b = _pipeline_weights(full / "pipeline"), _pipeline_weights(resumed / "pipeline")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    # and the weights did move from the checkpoint (the test would be vacuous otherwise)
    from safetensors.torch import load_file

    ckpt = load_file(str(full / "checkpoint-3" / "ema.safetensors"))
    norm = lambda tensors: sum(t.double().pow(2).sum().item() for t in tensors)  # noqa: E731
    assert len(ckpt) == len(a) and norm(ckpt.values()) != norm(a.values())


def test_autoguidance_guide_is_the_ema_at_its_snapshot_and_survives_a_resume(image_folder, tmp_path):
    """--autoguidance_scale 2 --autoguidance_snapshot 0.5 over 6 steps: the guide is the EMA after step 3 (taken
    before that step's checkpoint is written), it is saved in the pipeline with the scale, a run resumed from the
    checkpoint ends with the same guide and UNet, and a plain diffusers load samples with it by default."""
    import shutil

    from diffusers import DiffusionPipeline, UNet2DModel
    from safetensors.torch import load_file

    overrides = dict(max_train_steps=6, checkpointing_steps=3, autoguidance_scale=2, autoguidance_snapshot=0.5)
    full = tmp_path / "full"
    train(tiny_config(image_folder, full, **overrides))
    guide = load_file(str(full / "pipeline" / "guide_unet" / "diffusion_pytorch_model.safetensors"))
    ema_at_3 = load_file(str(full / "checkpoint-3" / "ema.safetensors"))
    in_order = list(UNet2DModel.from_pretrained(full / "pipeline" / "guide_unet").parameters())
    assert len(in_order) == len(ema_at_3) and len(guide) == len(ema_at_3)
    assert all(torch.equal(ema_at_3[f"shadow.{i}"], p.detach()) for i, p in enumerate(in_order))
    final = _pipeline_weights(full / "pipeline")
    assert any(not torch.equal(final[k], guide[k]) for k in final), "the guide must be a less trained model"

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_config(image_folder, resumed, resume_from_checkpoint="latest", **overrides))
    again = load_file(str(resumed / "pipeline" / "guide_unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(guide[k], again[k]) for k in guide)
    assert all(torch.equal(final[k], v) for k, v in _pipeline_weights(resumed / "pipeline").items())

    pipe = DiffusionPipeline.from_pretrained(str(full / "pipeline"), trust_remote_code=True)
    assert pipe.config.autoguidance_scale == 2.0 and pipe.guide_unet is not None
    guided, repeated = _sample(pipe), _sample(pipe)
    np.testing.assert_array_equal(guided, repeated)
    assert not np.array_equal(guided, _sample_with(pipe, autoguidance_scale=1.0))


def _sample_with(pipe, seed: int = 7, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


# checkpoint-6 half-written: its weights and EMA are there, its state file is not
_KILLED_WHILE_SAVING = kill_launcher("crispdiff.train.checkpoint:_save_ema", "args[1].name.startswith('checkpoint-6')")


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_whole_one(image_folder, tmp_path):
    """SIGKILL in the middle of writing checkpoint-6 (a real, separate process): what is left is checkpoint-3 and
    a half-written ``checkpoint-6.tmp``; ``--resume_from_checkpoint latest`` takes checkpoint-3 and the run ends
    bit-identical to one that was never killed."""
    overrides = dict(max_train_steps=9, checkpointing_steps=3, gradient_accumulation_steps=2, cpu_threads=1)
    full = tmp_path / "full"
    train(tiny_config(image_folder, full, **overrides))

    killed = tmp_path / "killed"
    script = str(REPO_ROOT / "train_scripts" / "train_unconditional.py")
    flags = tiny_flags(image_folder, killed, **overrides)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, script, *flags], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    assert (killed / "checkpoint-3").is_dir() and (killed / "checkpoint-6.tmp").is_dir()
    assert not (killed / "checkpoint-6").exists() and not (killed / "pipeline").exists()

    train(tiny_config(image_folder, killed, resume_from_checkpoint="latest", **overrides))
    a, b = _pipeline_weights(full / "pipeline"), _pipeline_weights(killed / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / "checkpoint-6.tmp").exists() and (killed / "checkpoint-6").is_dir()


# the new pipeline's weights and config are staged, its samples.png is not yet written
_KILLED_WHILE_EXPORTING = kill_launcher("crispdiff.publish.export:save_image_atomic", before=True)


def test_a_run_killed_while_exporting_leaves_the_previous_pipeline_whole(image_folder, tmp_path):
    """A second run over a finished one (--overwrite_output_dir) is SIGKILLed half-way through writing its pipeline:
    the previous pipeline folder is still there, byte for byte, and loads."""
    import hashlib

    from crispdiff.publish.export import load_pipeline

    out = tmp_path / "run"
    overrides = dict(max_train_steps=2, checkpointing_steps=0)
    train(tiny_config(image_folder, out, **overrides))
    pipeline = out / "pipeline"

    def snapshot() -> dict[str, str]:
        return {
            p.relative_to(pipeline).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pipeline.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    script = str(REPO_ROOT / "train_scripts" / "train_unconditional.py")
    flags = tiny_flags(image_folder, out, seed=1, overwrite_output_dir="true", **overrides)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _KILLED_WHILE_EXPORTING, script, *flags], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    assert snapshot() == before
    staged = [p for p in out.iterdir() if p.name.startswith(".pipeline.")]
    assert staged and (staged[0] / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # it was half-way
    assert load_pipeline(pipeline) is not None
    # the next successful save removes what the dead writer left, once it is old enough not to be a live one's
    os.utime(staged[0], (0, 0))
    train(tiny_config(image_folder, out, seed=1, overwrite_output_dir="true", **overrides))
    assert not [p for p in out.iterdir() if p.name.startswith(".pipeline.")] and snapshot() != before


def _sample(pipe, seed: int = 7) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images


def test_saved_pipeline_reproduces_in_process_images(image_folder, tmp_path):
    """The folder written at the end samples exactly what the trainer's own in-memory pipeline samples."""
    from diffusers import DiffusionPipeline

    from crispdiff.data.loading import load_images
    from crispdiff.publish.export import build_pipeline

    config = tiny_config(image_folder, tmp_path / "run", max_train_steps=2, checkpointing_steps=0)
    trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
    while trainer.step < 2:
        trainer.optimizer_step()
    folder = trainer.export()
    in_process = _sample(build_pipeline(**trainer.pipeline_kwargs()))
    reloaded = _sample(DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True))
    assert in_process.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(reloaded, in_process)
    untrained = UNetTrainer(config, trainer.space, make_accelerator(config))
    assert not np.array_equal(_sample(build_pipeline(**untrained.pipeline_kwargs())), in_process), "vacuous"
    assert (folder / "samples.png").is_file() and (folder / "crispdiff_training.json").is_file()
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert pipe.scheduler.__class__.__name__ == "DPMSolverMultistepScheduler"


def test_bf16_autocast_trains_in_bf16_and_saves_the_fp32_master_weights(image_folder, tmp_path):
    """bf16 autocast (available on CPU too) changes the arithmetic (weights differ from an fp32 run with the same
    seed, slightly), and the saved pipeline holds the fp32 EMA weights bit for bit, not a bf16 round trip."""
    from crispdiff.data.loading import load_images

    def run(mixed_precision: str, out: Path) -> UNetTrainer:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(0)  # the same initial weights for both runs
        config = tiny_config(
            image_folder, out, max_train_steps=3, checkpointing_steps=0, mixed_precision=mixed_precision, dropout=0.0
        )
        trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
        while trainer.step < 3:
            losses = trainer.optimizer_step()
        assert torch.isfinite(losses["loss"])
        trainer.export()
        return trainer

    bf16, fp32 = run("bf16", tmp_path / "bf16"), run("no", tmp_path / "fp32")
    saved = _pipeline_weights(tmp_path / "bf16" / "pipeline")
    ema = dict(zip(bf16.accelerator.unwrap_model(bf16.unet).state_dict(), bf16.ema.shadow_params))
    assert all(w.dtype == torch.float32 for w in saved.values())
    assert all(torch.equal(saved[name], ema[name].cpu()) for name in saved), "saved weights must be the fp32 EMA"
    fp32_saved = _pipeline_weights(tmp_path / "fp32" / "pipeline")
    differences = [(saved[k] - fp32_saved[k]).abs().max().item() for k in saved]
    assert max(differences) > 0, "bf16 autocast must change the arithmetic (was it applied at all?)"
    assert max(differences) < 1e-2, "but only by rounding"
    del fp32


def _losses(config: TrainConfig, steps: int) -> list[float]:
    from accelerate.state import AcceleratorState

    from crispdiff.data.loading import load_images

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    trainer = UNetTrainer(config, PixelSpace(load_images(config, show_progress=False)), make_accelerator(config))
    return [trainer.optimizer_step()["loss"].item() for _ in range(steps)]


def test_torch_compile_gives_the_losses_of_eager_mode(image_folder, tmp_path):
    """--torch_compile trains the same model: equal losses within float tolerance over a few steps. The test uses
    the aot_eager backend (dynamo graph capture + AOT autograd, as inductor gets them); inductor itself needs
    minutes of C++ compilation on a 2-core CI machine."""
    torch._dynamo.reset()
    common = dict(max_train_steps=3, checkpointing_steps=0, dropout=0.0)
    eager = _losses(tiny_config(image_folder, tmp_path / "eager", **common), 3)
    compiled_config = tiny_config(
        image_folder, tmp_path / "compiled", torch_compile="true", torch_compile_backend="aot_eager", **common
    )
    compiled = _losses(compiled_config, 3)
    assert len(set(eager)) == 3, "the loss must change from step to step"
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_scale_lr_scales_by_the_ratio_to_the_reference_batch():
    from crispdiff.train.optimization import scaled_learning_rate

    config = TrainConfig(learning_rate=2e-4, train_batch_size=64, gradient_accumulation_steps=2)
    assert scaled_learning_rate(config, num_processes=2) == 2e-4, "without --scale_lr the LR is used as given"
    config.scale_lr, config.lr_reference_batch = True, 64
    assert scaled_learning_rate(config, num_processes=2) == pytest.approx(8e-4)  # 256 images vs the reference 64
    config.lr_reference_batch = 256
    assert scaled_learning_rate(config, num_processes=2) == pytest.approx(2e-4)


def test_fused_adamw_follows_where_the_parameters_are(monkeypatch):
    """Fused AdamW is chosen from the parameters' device: on the CPU only where torch has the kernel (2.4+)."""
    from crispdiff.train.optimization import make_optimizer

    cpu_params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = make_optimizer(TrainConfig(), cpu_params)
    assert optimizer.defaults.get("fused"), "torch >= 2.4 fuses AdamW over CPU parameters"
    before = cpu_params[0].detach().clone()
    cpu_params[0].grad = torch.ones(2)
    optimizer.step()
    assert not torch.equal(cpu_params[0].detach(), before), "the fused step must update the parameters"
    groups = [{"params": cpu_params}, {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-5}]
    assert make_optimizer(TrainConfig(), groups).defaults.get("fused"), "param groups (the VAE trainer's) too"
    monkeypatch.setattr(torch, "__version__", "2.3.1+cpu")
    assert not make_optimizer(TrainConfig(), cpu_params).defaults.get("fused"), "torch 2.1-2.3 reject fused on CPU"


def test_epoch_order_is_computed_once_per_epoch_and_covers_the_data(monkeypatch):
    from crispdiff.train.loop import DataPosition, EpochBatches

    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    batches = EpochBatches(num_items=10, batch_size=2, num_processes=1, process_index=0, seed=3)
    position, seen = DataPosition(), []
    for _ in range(batches.batches_per_epoch):
        seen += batches.indices(position).tolist()
        position = batches.advance(position)
    assert sorted(seen) == list(range(10)) and position == DataPosition(1, 0)
    assert len(calls) == 1, "one permutation per epoch, not one per micro-step"
    assert batches.indices(position).tolist() != seen[:2] and len(calls) == 2


def test_deterministic_flag_turns_on_deterministic_algorithms(image_folder, tmp_path):
    """--deterministic reaches torch (the README's condition for bit-exact resume on a GPU)."""
    try:
        train(
            tiny_config(image_folder, tmp_path / "det", max_train_steps=1, checkpointing_steps=0, deterministic="true")
        )
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize(
    "flags, tf32",
    [
        ([], True),
        (["--allow_tf32", "false"], False),
        (["--deterministic"], False),
        (["--deterministic", "--allow_tf32"], False),
    ],
    ids=["default", "allow_tf32-false", "deterministic", "deterministic-over-allow_tf32"],
)
def test_tf32_follows_allow_tf32_and_deterministic_turns_it_off(flags, tf32):
    """--deterministic must turn TF32 off (cuDNN's TF32 is on by torch's default), and --allow_tf32 false must hold
    without it. The flags are torch's process-wide switches, settable on a CPU-only build too; each starts at the
    opposite of what the run must leave."""
    from crispdiff.train.process import configure_kernels

    cuda_matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cuda_matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    try:
        cuda_matmul.allow_tf32 = cudnn.allow_tf32 = not tf32
        configure_kernels(parse_config(TrainConfig, flags))
        assert (cuda_matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.use_deterministic_algorithms(False)
        cuda_matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved


def test_validation_grid_and_metrics_are_logged(image_folder, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(
        image_folder, out, max_train_steps=4, checkpointing_steps=0, validation_steps=2, report_to="tensorboard"
    )
    train(config.with_values(validation_metrics=True))
    grid = Image.open(out / "samples" / "step_0000002.png")
    assert grid.size == (2 * 16, 16)  # two 16 px validation images side by side
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and any(tag.startswith("val/swd") for tag in tags), tags
    assert set(acc.Tags()["images"]) == {"validation", "final"}  # the final grid reaches the trackers too
    # the final grid is measured as the validations were, and the model card shows the figures
    quality = json.loads((out / "pipeline" / "crispdiff_quality.json").read_text())
    assert quality["step"] == 4 and quality["num_samples"] == 2 and quality["metrics"]["swd_avg"] > 0
    card = (out / "pipeline" / "README.md").read_text()
    assert "## Quality" in card and f"| swd_avg | {quality['metrics']['swd_avg']:.4g} |" in card


def test_validation_reference_is_a_seeded_random_subset_not_the_first_files(image_folder, tmp_path):
    """The images validation metrics compare against are drawn over the whole data with the run's seed: the first
    files in name order are neighbours (codepoints, a class-sorted folder), not a sample."""
    from crispdiff.data.loading import load_images

    config = tiny_config(image_folder, tmp_path / "run")
    space = PixelSpace(load_images(config, show_progress=False))
    every = space.data.center_crops()

    def chosen(count: int, seed: int) -> list[int]:
        reference = space.reference_images(count, seed)
        assert reference.dtype == torch.uint8 and len(reference) == min(count, len(every))
        return [next(i for i, image in enumerate(every) if torch.equal(image, crop)) for crop in reference]

    draws = {tuple(chosen(4, seed)) for seed in range(5)}
    assert (0, 1, 2, 3) not in draws and len(draws) > 1, draws  # not the first files; the seed decides
    assert all(len(set(draw)) == 4 for draw in draws)  # distinct images
    assert chosen(4, 3) == chosen(4, 3) and chosen(50, 0) == list(range(len(every)))  # seeded; all when they fit


def test_sr_model_flag_and_failed_push_leave_a_complete_folder(image_folder, tmp_path):
    """--sr_model_name_or_path puts the SR component into the saved pipeline; a push that fails offline (the Hub
    went away after the pre-training check) fails clearly and leaves the folder, with its model card, complete."""
    from test_sr import make_network, write_checkpoint

    from crispdiff.publish.hub import HubAccessError, HubUploadError, maybe_push_to_hub

    _, checkpoint, _ = make_network("compact_x4")
    sr_file = write_checkpoint(checkpoint, tmp_path / "compact_x4.pth")
    out = tmp_path / "run"
    config = tiny_config(
        image_folder, out, max_train_steps=2, checkpointing_steps=0, sr_model_name_or_path=sr_file, license="mit"
    )
    config = config.with_values(push_to_hub=True, hub_model_id="someone/tiny", hub_token="hf_secret_token")
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):  # checked before training: nothing was trained
        train(config)
    assert not out.exists()
    train(config.with_values(push_to_hub=False))
    with pytest.raises(HubUploadError):
        maybe_push_to_hub(out / "pipeline", config)
    folder = out / "pipeline"
    card = (folder / "README.md").read_text()
    assert "library_name: diffusers" in card and "hf_secret_token" not in card
    assert "license: mit" in card  # --license reaches the card, through the export and the push's rewrite alike
    # without --validation_metrics the final grid still gets the cheap figures (sharpness, colour blobs), no SWD
    metrics = json.loads((folder / "crispdiff_quality.json").read_text())["metrics"]
    assert "hf_energy_ratio" in metrics and "colour_blob" in metrics and "swd_avg" not in metrics
    # the copy check runs on every final grid: a 2-step model makes noise, nowhere near its training images
    assert metrics["nn_median_ratio"] > 1 and metrics["near_copy_fraction"] == 0.0
    assert f"| nn_median_ratio | {metrics['nn_median_ratio']:.4g} |" in card
    assert "hf_secret_token" not in (folder / "crispdiff_training.json").read_text()
    assert "hf_secret_token" not in (out / "crispdiff_training.json").read_text()

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    upscaled = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert upscaled.images.shape == (1, 64, 64, 3)  # 16 px x4


def test_8bit_adam_without_bitsandbytes_names_the_extra(monkeypatch):
    import builtins

    from crispdiff.train.optimization import make_optimizer

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ImportError, match=r"--use_8bit_adam.*crispdiff\[bnb\]"):
        make_optimizer(TrainConfig(use_8bit_adam=True), params)


def test_checkpoint_limit_of_one_keeps_only_the_newest(image_folder, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, max_train_steps=7, checkpointing_steps=2, checkpoints_total_limit=1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]


def test_default_hub_repo_is_named_after_the_run(tmp_path, monkeypatch):
    """--push_to_hub without --hub_model_id uses the output folder's name, not the 'pipeline' subfolder's."""
    import crispdiff.publish.hub as hub

    seen = {}
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo_id, **kwargs: seen.setdefault("repo_id", repo_id))
    config = TrainConfig(output_dir=str(tmp_path / "my-emoji-run"), push_to_hub=True)
    (tmp_path / "my-emoji-run" / "pipeline").mkdir(parents=True)
    hub.maybe_push_to_hub(tmp_path / "my-emoji-run" / "pipeline", config)
    assert seen["repo_id"] == "my-emoji-run"


def test_existing_pipeline_is_not_overwritten_silently(image_folder, tmp_path):
    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        train(tiny_config(image_folder, out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(image_folder: Path, out: Path, record: Path | None = None, **overrides) -> str:
    """``accelerate launch`` of the pixel trainer on two gloo processes; with ``record``, what each rank trained on is
    written there (``tiny_models.record_launcher``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    wrapper = []
    if record is not None:
        wrapper_file = record.parent / f"{record.name}_launcher.py"
        wrapper_file.write_text(record_launcher(str(record)))
        wrapper = [str(wrapper_file)]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()), *wrapper,
        str(REPO_ROOT / "train_scripts" / "train_unconditional.py"),
        *tiny_flags(image_folder, out, **overrides),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_two_process_accelerate_launch_and_exact_resume(image_folder, tmp_path):
    """Real `accelerate launch` with two gloo processes and gradient accumulation; the saved pipeline loads and
    samples, and a second launch resumed from the step-3 checkpoint ends with the same weights (every rank's
    generators and data shard restored)."""
    import shutil

    flags = dict(max_train_steps=4, train_batch_size=2, gradient_accumulation_steps=2)
    out = tmp_path / "ddp"
    log = _launch_two_processes(image_folder, out, record=tmp_path / "ddp_records", **flags)
    assert "2 process(es)" in log
    assert (out / "checkpoint-3" / "generators_1.safetensors").is_file()  # each rank saved its generators
    assert_ranks_saw_different_data_and_noise(tmp_path / "ddp_records")

    resumed = tmp_path / "ddp_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    log = _launch_two_processes(image_folder, resumed, resume_from_checkpoint="latest", **flags)
    assert "Resumed from" in log
    a, b = _pipeline_weights(out / "pipeline"), _pipeline_weights(resumed / "pipeline")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed two-process run diverged"

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"), trust_remote_code=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 3)


def test_a_checkpoint_resumes_on_another_number_of_processes_with_a_warning(image_folder, tmp_path, caplog):
    """One process -> two (real ``accelerate launch``) -> one. Resuming used to be refused; now it continues, says
    that it is no longer bit-exact, and maps the data position by images seen: the one-process checkpoint at step 3
    had seen 6 of the 8 images of epoch 0 (batches of 2); two processes take 4 images a micro-batch, so the epoch's
    last one is not a whole batch any more and they start epoch 1, each on its own slice of that epoch's order."""
    import logging
    import shutil

    from crispdiff.train.loop import EpochBatches

    out = tmp_path / "run"
    flags = dict(max_train_steps=7, train_batch_size=2, checkpointing_steps=3, seed=4)
    train(tiny_config(image_folder, out, **flags))
    records = tmp_path / "records"
    log = _launch_two_processes(image_folder, out, record=records, resume_from_checkpoint="checkpoint-3", **flags)
    assert "written by 1 process(es) and this run has 2" in log and "no longer bit-exact" in log, log[-3000:]
    epoch_1 = EpochBatches(8, 2, 2, 0, seed=4).epoch_order(1).tolist()
    first = read_records(records, "indices")
    assert (first[0][0], first[1][0]) == (epoch_1[0:2], epoch_1[2:4]), (first, epoch_1)
    assert_ranks_saw_different_data_and_noise(records)
    assert (out / "checkpoint-6" / "generators_1.safetensors").is_file()  # rewritten by the two processes

    shutil.rmtree(out / "pipeline")  # and back to one process, from the two-process checkpoint-6
    with caplog.at_level(logging.WARNING, logger="crispdiff"):
        train(tiny_config(image_folder, out, resume_from_checkpoint="latest", **flags))
    assert "written by 2 process(es) and this run has 1" in caplog.text
    assert (out / "pipeline" / "model_index.json").is_file()


# rank 0 with checkpoint-6 half-written kills the launcher and every rank
_KILL_ALL_RANKS_WHILE_SAVING = kill_launcher(
    "crispdiff.train.checkpoint:_save_ema", "args[1].name.startswith('checkpoint-6')", group=True
)


def test_a_two_process_run_killed_while_saving_resumes_exactly(image_folder, tmp_path):
    """Two gloo ranks and their launcher SIGKILLed together while checkpoint-6 is being written; a new
    ``accelerate launch`` with ``--resume_from_checkpoint latest`` takes checkpoint-3 and ends with the weights of a
    run that was never killed."""
    flags = dict(max_train_steps=9, checkpointing_steps=3, train_batch_size=2, gradient_accumulation_steps=2)
    full = tmp_path / "full"
    _launch_two_processes(image_folder, full, record=tmp_path / "full_records", **flags)
    assert_ranks_saw_different_data_and_noise(tmp_path / "full_records")

    killed = tmp_path / "killed"
    wrapper = tmp_path / "kill_all_ranks.py"
    wrapper.write_text(_KILL_ALL_RANKS_WHILE_SAVING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()), str(wrapper),
        str(REPO_ROOT / "train_scripts" / "train_unconditional.py"), *tiny_flags(image_folder, killed, **flags),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert done.returncode != 0 and not (killed / "pipeline").exists(), done.stderr[-2000:]
    assert (killed / "checkpoint-3").is_dir() and not (killed / "checkpoint-6").exists()

    log = _launch_two_processes(image_folder, killed, resume_from_checkpoint="latest", **flags)
    assert "Resumed from" in log
    a, b = _pipeline_weights(full / "pipeline"), _pipeline_weights(killed / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "config_path",
    [
        "crispdiff.core.config.TrainConfig",
        "crispdiff.latent.trainer.LatentTrainConfig",
        "crispdiff.vae.config.VAETrainConfig",
        "crispdiff.transfer.config.TransferConfig",
        "crispdiff.sd.config.TextToImageLoRAConfig",
        "crispdiff.sd.config.DreamBoothLoRAConfig",
    ],
)
def test_every_script_prints_its_help(config_path, capsys):
    """``--help`` of every training script lists its flags (a "%" in a help text once crashed argparse here)."""
    import importlib

    module, _, name = config_path.rpartition(".")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(getattr(importlib.import_module(module), name), ["--help"])
    assert exit_info.value.code == 0 and "--output_dir" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_cores_are_the_ones_this_process_may_run_on():
    """``taskset -c 0`` (or a container's cpuset) means one core, whatever ``os.cpu_count()`` says."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from crispdiff.core.cores import available_cores; print(available_cores())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"


def test_a_diverged_run_stops_with_an_error_that_names_the_learning_rate(image_folder, tmp_path):
    """A loss that is no longer finite ends the run at the next log line, with what to change, instead of training
    (and saving) garbage for the rest of the steps."""
    from crispdiff.core.errors import TrainingDivergedError

    config = tiny_config(image_folder, tmp_path / "run", learning_rate=1e30, max_grad_norm=0, max_train_steps=40,
                         checkpointing_steps=0)  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="--learning_rate"):
        train(config)
    assert not (tmp_path / "run" / "pipeline").exists()
