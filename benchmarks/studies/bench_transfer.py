"""Transfer vs scratch: fine-tuning a pretrained UNet on 100 images of an unseen emoji category at a new resolution.

    OMP_NUM_THREADS=1 python benchmarks/studies/bench_transfer.py            # ~12 minutes on one CPU thread

google/ddpm-cifar10-32's weights are not reachable offline, so this builds a stand-in: a UNet of ddpm-cifar10's
layout (four levels, attention on the second, positional time embedding) scaled down to fit a CPU (--channels,
--layers_per_block), pretrained at 32 px on the shared emoji minus two categories and saved as a diffusers
DDPMPipeline folder. It is trained with crispdiff's recipe (cosine betas, saved under diffusers' name
squaredcos_cap_v2, v-prediction, min-SNR 5) rather than ddpm-cifar10's linear betas + epsilon: in the few hundred
CPU steps affordable here, linear + epsilon still samples mostly noise (RESULTS.md, "Recipe": HF-energy ratio 8 at
400 steps; a first run of this benchmark with it gave SWD ~210 for every row, pretrained model included), which
would hide any difference between the modes. The schedule still comes from the pretrained scheduler config.

Then, at 64 px on --num_target images of one held-out category (--target), for the same steps and batch:

* scratch: the same architecture, randomly initialised (same schedule, objective, EMA);
* full: every pretrained weight trains;
* decoder: up blocks and output layers only (crispdiff.transfer.trainer's --train_modules decoder);
* lora: LoRA adapters on the attention and convolution layers (--train_modules lora), merged for sampling.

Each model is sampled at --eval_at steps (DPM-Solver++, fixed seeds) and measured with crispdiff.evaluate.metrics
against all images of the target category: multi-scale SWD (lower is better) and the two sharpness ratios (1 = as sharp
as
the real images). The "real (unseen)" row measures the category's images that were not trained on the same way:
the floor at this sample size. Everything runs in one process, so the rows are comparable with each other only.

Writes --out_dir (default benchmarks/out/transfer): transfer.json, transfer.md and sample grids; appends the table to
benchmarks/RESULTS.md unless --no_record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import BENCH_DIR, append_results, emoji_dir, machine, markdown_table  # noqa: E402

from crispdiff.core.io import write_text_atomic  # noqa: E402

MODES = ("scratch", "full", "decoder", "lora")
LEARNING_RATES = {"scratch": 5e-4, "full": 2e-4, "decoder": 2e-4, "lora": 1e-3}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="emoji folder with metadata.jsonl (default: ../shared's)")
    p.add_argument("--target", default="Food & Drink", help="held-out category to fine-tune on")
    p.add_argument("--also_held_out", default="Animals & Nature", help="second category left out of pretraining")
    p.add_argument("--num_target", type=int, default=100, help="target images to fine-tune on")
    p.add_argument("--channels", type=int, nargs=4, default=[16, 32, 32, 32], help="ddpm-cifar10: 128 256 256 256")
    p.add_argument("--layers_per_block", type=int, default=1, help="ddpm-cifar10: 2")
    p.add_argument("--pretrain_steps", type=int, default=800)
    p.add_argument("--pretrain_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every mode")
    p.add_argument("--batch", type=int, default=8, help="fine-tuning batch")
    p.add_argument("--eval_at", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--num_samples", type=int, default=32, help="images sampled per evaluation")
    p.add_argument("--sampling_steps", type=int, default=25, help="DPM-Solver++ steps per sample")
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(BENCH_DIR / "out" / "transfer"))
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


# -- data --------------------------------------------------------------------------------------------------------------


def subset_folder(source: Path, folder: Path, rows: list[dict[str, Any]]) -> str:
    """An imagefolder of `rows` (symlinks to the source PNGs + their metadata.jsonl lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        link = folder / row["file_name"]
        if not link.exists():
            link.symlink_to(source / row["file_name"])
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_text_atomic(folder / "metadata.jsonl", text)
    return str(folder)


def split_data(args: argparse.Namespace, out: Path) -> tuple[str, str, str, str]:
    """(pretraining folder, target training folder, all-target folder, unseen-target folder)."""
    source = Path(args.data_dir) if args.data_dir else emoji_dir()
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if not rows or "category" not in rows[0]:
        raise SystemExit(f"{source}/metadata.jsonl has no `category` column (the full ../shared emoji set has)")
    held_out = {args.target, args.also_held_out}
    target = sorted((r for r in rows if r["category"] == args.target), key=lambda r: r["file_name"])
    if len(target) <= args.num_target:
        raise SystemExit(f"category {args.target!r} has {len(target)} images, need more than {args.num_target}")
    pretrain = [r for r in rows if r["category"] not in held_out]
    data = out / "data"
    return (
        subset_folder(source, data / "pretrain", pretrain),
        subset_folder(source, data / "target", target[: args.num_target]),
        subset_folder(source, data / "target_all", target),
        subset_folder(source, data / "target_unseen", target[args.num_target :]),
    )


def real_images(folder: str, resolution: int) -> torch.Tensor:
    from crispdiff.core.config import TrainConfig
    from crispdiff.data.loading import load_images

    return load_images(TrainConfig(train_data_dir=folder, resolution=resolution), show_progress=False).center_crops()


# -- models ------------------------------------------------------------------------------------------------------------


def cifar10_layout(args: argparse.Namespace, sample_size: int) -> Any:
    """google/ddpm-cifar10-32's UNet config with fewer channels / layers."""
    from diffusers import UNet2DModel

    torch.manual_seed(args.seed)
    return UNet2DModel(
        sample_size=sample_size,
        block_out_channels=tuple(args.channels),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=args.layers_per_block,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=min(32, min(args.channels)),
        attention_head_dim=None,
        center_input_sample=False,
    )


def loop_config(cls: type, args: argparse.Namespace, data: str, out: Path, **fields: Any) -> Any:
    """A config for one run: DDPM's schedule and objective, no checkpoints, no validation, no trackers."""
    base = dict(
        train_data_dir=data,
        cache_dir=str(out.parent / "cache"),
        output_dir=str(out),
        overwrite_output_dir=True,
        seed=args.seed,
        report_to="none",
        checkpointing_steps=0,
        validation_steps=0,
        lr_warmup_steps=20,
        ema_power=2 / 3,
        cpu_threads=args.threads,
    )
    base.update(fields)
    return cls(**base)


def pretrain(args: argparse.Namespace, data: str, out: Path) -> tuple[Path, float]:
    """Pretrain the stand-in at 32 px and save it as a diffusers DDPMPipeline folder (as google's model is)."""
    from accelerate.state import AcceleratorState
    from diffusers import DDPMPipeline, DDPMScheduler

    from crispdiff.core.config import TrainConfig
    from crispdiff.data.loading import load_images
    from crispdiff.train.process import make_accelerator
    from crispdiff.train.spaces import PixelSpace
    from crispdiff.train.unet_trainer import UNetTrainer

    folder = out / "pretrained"
    config = loop_config(
        TrainConfig,
        args,
        data,
        out / "pretrain_run",
        resolution=32,
        beta_schedule="cosine",
        prediction_type="v_prediction",
        train_batch_size=args.pretrain_batch,
        max_train_steps=args.pretrain_steps,
        learning_rate=5e-4,
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    space = PixelSpace(load_images(config, show_progress=False))
    trainer = UNetTrainer(config, space, make_accelerator(config), unet=cifar10_layout(args, 32))
    start = time.perf_counter()
    while trainer.step < trainer.max_steps:
        trainer.optimizer_step()
    seconds = time.perf_counter() - start
    # diffusers' name for the same cosine betas: the transfer code must map it back (and checks the betas match)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    DDPMPipeline(unet=trainer.sampling_unet().cpu(), scheduler=scheduler).save_pretrained(folder)
    save_grid(sample(trainer, args), out / "grids" / "pretrained_32px_own_data.png")
    print(f"pretrained {len(space)} images x {args.pretrain_steps} steps at 32 px in {seconds:.0f} s -> {folder}")
    return folder, seconds


def fine_tune_trainer(mode: str, args: argparse.Namespace, pretrained: Path, data: str, out: Path) -> Any:
    """The UNetTrainer of one mode at 64 px; `scratch` is a fresh model of the same layout and schedule."""
    from accelerate.state import AcceleratorState

    from crispdiff.data.loading import load_images
    from crispdiff.train.process import make_accelerator
    from crispdiff.train.spaces import PixelSpace
    from crispdiff.train.unet_trainer import UNetTrainer
    from crispdiff.transfer.config import TransferConfig
    from crispdiff.transfer.pretrained import load_pretrained, resolve_schedule
    from crispdiff.transfer.trainer import TransferTrainer, prepare_unet

    AcceleratorState._reset_state(reset_partial_state=True)
    fields = dict(
        resolution=64,
        train_batch_size=args.batch,
        max_train_steps=args.steps,
        learning_rate=LEARNING_RATES[mode],
        pretrained_model_name_or_path=str(pretrained),
        train_modules="all" if mode == "scratch" else mode,
        lora_rank=args.lora_rank,
    )
    config = loop_config(TransferConfig, args, data, out / mode, **fields)
    loaded = load_pretrained(str(pretrained))
    # the pretrained schedule and objective: scratch uses the same recipe
    config = resolve_schedule(config.resolve(), loaded)
    space = PixelSpace(load_images(config, show_progress=False))
    accelerator = make_accelerator(config)
    if mode == "scratch":
        return UNetTrainer(config, space, accelerator, unet=cifar10_layout(args, 64))
    unet, trainable, new_keys = prepare_unet(config, loaded, space)
    return TransferTrainer(config, space, accelerator, unet, trainable, new_keys)


def sample(trainer: Any, args: argparse.Namespace) -> torch.Tensor:
    from crispdiff.publish.export import build_pipeline

    pipeline = build_pipeline(**trainer.pipeline_kwargs())
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_samples)]
    return pipeline(
        batch_size=args.num_samples,
        num_inference_steps=args.sampling_steps,
        generator=generators,
        output_type="pt",
        upscale=False,
    ).images.float()


def measure(real: torch.Tensor, images01: torch.Tensor, seed: int) -> dict[str, float]:
    from crispdiff.evaluate.distribution import sliced_wasserstein_distance
    from crispdiff.evaluate.inputs import to_float01
    from crispdiff.evaluate.sharpness import sharpness_ratios

    real01 = to_float01(real)
    out = dict(sliced_wasserstein_distance(real01, images01, seed=seed))
    out.update(sharpness_ratios(real01, images01))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def save_grid(images01: torch.Tensor, path: Path) -> None:
    from crispdiff.core.images import make_grid, save_image_atomic

    save_image_atomic(make_grid(images01[:16], value_range=(0.0, 1.0)), path)


# -- the run -----------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    started = time.perf_counter()
    pretrain_dir, target_dir, target_all, target_unseen = split_data(args, out)
    reference = real_images(target_all, 64)
    rows: list[dict[str, Any]] = []

    unseen = real_images(target_unseen, 64).float() / 255
    rows.append({"mode": "real (unseen)", "step": None, "train_s": None, **measure(reference, unseen, args.seed)})

    pretrained, pretrain_seconds = pretrain(args, pretrain_dir, out)
    for mode in MODES:
        trainer = fine_tune_trainer(mode, args, pretrained, target_dir, out)
        if mode == "full":  # every transfer mode starts from the same model: the pretrained one, at 64 px
            images = sample(trainer, args)
            save_grid(images, out / "grids" / "pretrained_step0.png")
            rows.append({"mode": "pretrained, no fine-tuning", "step": 0, "train_s": 0.0,
                         **measure(reference, images, args.seed)})  # fmt: skip
        train_seconds = 0.0
        for point in sorted(args.eval_at):
            start = time.perf_counter()
            while trainer.step < min(point, trainer.max_steps):
                trainer.optimizer_step()
            train_seconds += time.perf_counter() - start
            images = sample(trainer, args)
            save_grid(images, out / "grids" / f"{mode}_step{trainer.step}.png")
            row = {
                "mode": mode,
                "step": trainer.step,
                "train_s": train_seconds,
                **measure(reference, images, args.seed),
            }
            rows.append(row)
            print(f"{mode:8s} step {trainer.step:4d}: SWD {row['swd_avg']:.1f}  ({train_seconds:.0f} s training)")
        trainable = sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"])
        for row in rows:
            if row["mode"] == mode:
                row["trainable"] = trainable

    header = ["mode", "step", "trainable params", "SWD avg x1e3", "HF-energy ratio", "Laplacian-var ratio", "train s"]
    table_rows = [
        [
            r["mode"],
            "-" if r["step"] is None else r["step"],
            r.get("trainable", "-"),
            r["swd_avg"],
            r["hf_energy_ratio"],
            r["laplacian_var_ratio"],
            "-" if r["train_s"] is None else round(r["train_s"]),
        ]
        for r in rows
    ]
    table = markdown_table(header, table_rows)
    total = time.perf_counter() - started
    notes = (
        f"Stand-in for google/ddpm-cifar10-32: its layout with channels {args.channels}, layers_per_block "
        f"{args.layers_per_block}, pretrained {args.pretrain_steps} steps x {args.pretrain_batch} at 32 px on the "
        f"emoji minus {args.target!r} and {args.also_held_out!r} ({pretrain_seconds:.0f} s); fine-tuned at 64 px on "
        f"{args.num_target} {args.target!r} images, batch {args.batch}, learning rates {LEARNING_RATES}, EMA on, "
        f"cosine betas + v-prediction + min-SNR 5 for every mode (see the module docstring); LoRA rank "
        f"{args.lora_rank} on attention + convolutions. SWD against all {len(reference)} images of the category "
        f"({args.num_samples} samples, DPM-Solver++ {args.sampling_steps} steps); 'real (unseen)' = the "
        f"{len(unseen)} images not trained on. Total {total / 60:.1f} min, {machine()}."
    )
    result = {"args": vars(args), "rows": rows, "pretrain_seconds": pretrain_seconds, "total_seconds": total}
    write_text_atomic(out / "transfer.json", json.dumps(result, indent=2, default=str))
    write_text_atomic(out / "transfer.md", f"# Transfer vs scratch\n\n{table}\n\n{notes}\n")
    append_results(
        "Transfer vs scratch (crispdiff.transfer.trainer, stand-in for ddpm-cifar10-32)",
        table,
        notes,
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
