"""Training throughput: crispdiff's optimizer step vs a diffusers-example-style loop, same UNet, batch, precision.

    python benchmarks/bench_throughput.py --resolution 64 --train_batch_size 16 --steps 5

Both run in this one process and are timed in alternation (A B A B ...), so machine noise hits both; the figure that
matters is the ratio. The crispdiff side runs the real `UNetTrainer.optimizer_step` (cached uint8 data, augmentation on
the device, fp32 noise, min-SNR v-prediction, fused AdamW on CUDA, EMA); the baseline decodes PNGs through a
DataLoader every step as diffusers' train_unconditional.py does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from common import append_results, emoji_dir, markdown_table, timed
from diffusers_baseline import DiffusersStyleLoop

from crispdiff.core.config import TrainConfig
from crispdiff.data.loading import load_images
from crispdiff.diffusion.unets import build_unet, count_parameters, describe_parameters
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.train.unet_trainer import UNetTrainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="image folder (default: ../shared emoji, else embedded subset)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2, 4])
    p.add_argument("--attention_res", type=int, nargs="+", default=[16])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--torch_compile", action="store_true", help="time crispdiff's loop with --torch_compile")
    p.add_argument("--torch_compile_backend", default="inductor", help="backend for --torch_compile")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    data_dir = args.data_dir or str(emoji_dir())
    arch = dict(
        base_channels=args.base_channels,
        channel_mults=args.channel_mults,
        attention_res=args.attention_res,
        layers_per_block=args.layers_per_block,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            train_data_dir=data_dir,
            resolution=args.resolution,
            train_batch_size=args.train_batch_size,
            mixed_precision=args.mixed_precision,
            output_dir=tmp,
            cache_dir=tmp,
            report_to="none",
            max_train_steps=10**6,
            random_flip=True,
            dropout=0.0,
            torch_compile=args.torch_compile,
            torch_compile_backend=args.torch_compile_backend,
            **arch,
        )
        ours = UNetTrainer(config, PixelSpace(load_images(config)), make_accelerator(config))
        unet = build_unet(args.resolution, dropout=0.0, **arch)
        baseline = DiffusersStyleLoop(
            unet,
            data_dir,
            resolution=args.resolution,
            batch_size=args.train_batch_size,
            mixed_precision=args.mixed_precision,
        )
        for _ in range(args.warmup):
            ours.optimizer_step()
            baseline.step()
        ours_times, base_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(ours.optimizer_step, args.steps))
            base_times.append(timed(baseline.step, args.steps))
        # The data path alone: what a fast accelerator waits for when the UNet step itself is cheap.
        device = ours.accelerator.device
        ours_data = timed(lambda: ours.space.x0(torch.arange(args.train_batch_size), ours.data_generator, device), 20)
        base_data = timed(lambda: next(baseline._batches)["input"].to(device), 20)
    ours_ips = args.train_batch_size / statistics.median(ours_times)
    base_ips = args.train_batch_size / statistics.median(base_times)
    table = markdown_table(
        ["loop", "img/s (median)", "ratio vs diffusers-style", "data alone: ms / batch", "data-bound ceiling, img/s"],
        [
            ["diffusers-style baseline", base_ips, 1.0, base_data * 1e3, args.train_batch_size / base_data],
            [
                "crispdiff Trainer.optimizer_step",
                ours_ips,
                ours_ips / base_ips,
                ours_data * 1e3,
                args.train_batch_size / ours_data,
            ],
        ],
    )
    notes = (
        f"UNet {describe_parameters(count_parameters(unet))} ({arch}), {args.resolution} px, batch "
        f"{args.train_batch_size}, precision {args.mixed_precision}, {args.repeats} x {args.steps} steps alternated"
        + (
            f", crispdiff compiled ({args.torch_compile_backend}, compile time in the warmup)."
            if args.torch_compile
            else "."
        )
    )
    append_results("Training throughput: crispdiff vs diffusers-style loop", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
