"""A UNet with a timm encoder (--encoder timm:NAME) vs crispdiff's UNet2DModel at a similar parameter count.

    python benchmarks/bench_timm_unet.py --encoder timm:convnext_atto --train_steps 200 --train_batch_size 16

Both models are trained from random init by crispdiff's own loop with the same recipe, data (the emoji set, pixel
space at --resolution), batch, steps, learning-rate schedule, EMA and seed; only the denoiser differs. The UNet2DModel's
--base_channels is chosen (multiples of 4) so that its parameter count is the closest to the timm model's, unless
--baseline_base_channels fixes it. Reported per model:

- parameters;
- training speed: forward + backward + AdamW step on the same batch, the two models timed in alternation (A B A B ...)
  so machine noise hits both, as img/s and as the ratio to UNet2DModel;
- held-out loss: the training loss (v-prediction, min-SNR 5) of the saved EMA model on 256 reference images with fixed
  noise and timesteps, the same for both;
- samples: DPM-Solver++ 25 from the same seeded noise, ms per image, multi-scale SWD and the sharpness ratios
  (crispdiff.evaluate.metrics) against half of the reference data, beside the real-vs-real floor.

Random init on purpose: a fair architecture comparison at equal steps. With ImageNet weights (--encoder_weights) the
timm encoder starts from better features; that is a user's option, not measured here (nothing is downloaded).

Writes --out_dir (default benchmarks/out/timm_unet): timm_unet.json, timm_unet.md, grids/*.png; appends the table to
benchmarks/RESULTS.md unless --no_record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from bench_samplers import (
    QUALITY_HEADER,
    add_common_flags,
    data_dir_for,
    display_path,
    generate,
    json_ready,
    load_reference,
    measure,
    pipeline_sampler,
    prepare_reference,
    quality_cells,
    save_grid,
    train_config,
    train_model,
)
from common import append_results, machine, markdown_table, timed

from crispdiff.core.config import TrainConfig
from crispdiff.core.io import write_text_atomic
from crispdiff.diffusion.schedule import NoiseSchedule, sample_noise
from crispdiff.diffusion.unets import count_parameters, unet_from_config

EVAL_IMAGES = 256
EVAL_SEED = 1234


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, "timm_unet")
    p.set_defaults(train_steps=200, train_batch_size=16, lr_warmup_steps=20, channel_mults=[1, 2, 4, 4])
    timm_group = p.add_argument_group("the timm-encoder UNet")
    timm_group.add_argument("--encoder", default="timm:convnext_atto", help="timm:<model name>")
    timm_group.add_argument("--stem_channels", type=int, default=32, help="its --base_channels (stem width)")
    timm_group.add_argument(
        "--baseline_base_channels",
        type=int,
        default=None,
        help="UNet2DModel --base_channels (default: matched to the timm model's parameter count)",
    )
    timm_group.add_argument("--speed_repeats", type=int, default=4, help="timed optimizer steps per model")
    timm_group.add_argument("--sampler_steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def match_base_channels(config: TrainConfig, target: int) -> int:
    """The multiple of 4 whose UNet2DModel (same levels, attention, depth) has the parameter count nearest `target`."""
    counts = {}
    for base in range(8, 257, 4):
        model = unet_from_config(dataclasses.replace(config, base_channels=base), resolution=config.resolution)
        counts[base] = count_parameters(model)
        if counts[base] > target:
            break
    return min(counts, key=lambda b: abs(counts[b] - target))


def train_speed(configs: dict[str, TrainConfig], batch: int, repeats: int, seed: int) -> dict[str, float]:
    """Training images per second of each model: one optimizer step on a fixed batch, models timed in alternation."""
    schedule = NoiseSchedule.from_config(next(iter(configs.values())))
    g = torch.Generator().manual_seed(seed)
    resolution = next(iter(configs.values())).resolution
    x0 = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=g)
    x_t = schedule.add_noise(x0, noise, t)
    steps = {}
    for name, config in configs.items():
        torch.manual_seed(seed)
        model = unet_from_config(config, resolution=resolution).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: Any = model, optimizer: Any = optimizer) -> None:
            loss = schedule.loss(model(x_t, t).sample, x0, noise, t, 5.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (allocations, AdamW state)
        steps[name] = step
    seconds = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds[name] += timed(step, 1)
    return {name: batch * repeats / seconds[name] for name in steps}


def held_out_loss(pipeline: Any, config: TrainConfig, reference: torch.Tensor) -> float:
    """The training objective of the saved (EMA) model on fixed reference images, noise and timesteps."""
    schedule = NoiseSchedule.from_config(config)
    g = torch.Generator().manual_seed(EVAL_SEED)
    x0 = reference[:EVAL_IMAGES].float() / 127.5 - 1
    noise = sample_noise(tuple(x0.shape), g, "cpu")
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g)
    unet = pipeline.unet.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, x0.shape[0], 64):
            sl = slice(start, start + 64)
            pred = unet(schedule.add_noise(x0[sl], noise[sl], t[sl]), t[sl]).sample
            total += schedule.loss(pred, x0[sl], noise[sl], t[sl], config.snr_gamma).item() * pred.shape[0]
    return total / x0.shape[0]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from crispdiff.publish.export import load_pipeline

    out_dir = Path(args.out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_for(args)
    images = load_reference(data_dir, args.resolution)
    reference = prepare_reference(images, args.num_images, args.seed)
    eval_images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(EVAL_SEED))]

    base = train_config(args, data_dir, out_dir / "models" / "unet2d", cpu_threads=args.threads)
    timm_config = dataclasses.replace(
        base,
        encoder=args.encoder,
        base_channels=args.stem_channels,
        output_dir=str(out_dir / "models" / "timm"),
    )
    timm_params = count_parameters(unet_from_config(timm_config, resolution=args.resolution))
    baseline_channels = args.baseline_base_channels or match_base_channels(base, timm_params)
    configs = {
        "UNet2DModel": dataclasses.replace(base, base_channels=baseline_channels),
        f"{args.encoder} UNet": timm_config,
    }
    print(f"UNet2DModel --base_channels {baseline_channels} (timm model: {timm_params / 1e6:.2f}M parameters)")
    speed = train_speed(configs, args.train_batch_size, args.speed_repeats, args.seed)

    rows, results = [], {}
    for name, config in configs.items():
        trained = train_model(config)
        pipeline = load_pipeline(trained.pipeline_dir)
        pipeline.set_progress_bar_config(disable=True)
        params = count_parameters(pipeline.unet)
        loss = held_out_loss(pipeline, config, eval_images)
        sampled, ms = generate(
            pipeline_sampler(pipeline, "dpmsolver++", args.sampler_steps),
            reference.num_images,
            args.sample_batch_size,
            args.seed,
        )
        metrics = measure(reference, sampled, args.seed)
        slug = "timm" if config.encoder else "unet2d"
        save_grid(sampled, out_dir / "grids" / f"{slug}.png")
        results[name] = {
            "parameters": params,
            "base_channels": config.base_channels,
            "train_img_per_s": speed[name],
            "train_wall_s": trained.seconds,
            "held_out_loss": loss,
            "ms_per_image": ms,
            **json_ready(metrics),
        }
        rows.append([name, f"{params / 1e6:.2f}M", speed[name], loss, ms, *quality_cells(metrics)])
        print(f"{name}: {results[name]}")

    baseline = results["UNet2DModel"]["train_img_per_s"]
    for row, name in zip(rows, results):
        results[name]["train_speed_ratio"] = results[name]["train_img_per_s"] / baseline
        row.insert(3, f"{results[name]['train_speed_ratio']:.2f}x")
    floor = reference.floor
    rows.append(["real vs real (floor)", "", "", "", "", "", *quality_cells(floor)])
    sampling = f"ms/img (DPM++ {args.sampler_steps})"
    header = ["model", "params", "train img/s", "speed vs UNet2DModel", "held-out loss", sampling]
    table = markdown_table(header + QUALITY_HEADER, rows)
    notes = (
        f"{args.train_steps} steps of {args.train_batch_size} images at {args.resolution} px from random init, same "
        f"recipe/data/seed; UNet2DModel --base_channels {baseline_channels} --channel_mults "
        f"{' '.join(map(str, args.channel_mults))} --attention_res {' '.join(map(str, args.attention_res))}; timm "
        f"stem {args.stem_channels}. Data: {display_path(Path(data_dir))}. Held-out loss: {EVAL_IMAGES} images, "
        "fixed noise/timesteps. SWD x1e3 lower is better; sharpness ratios 1 = as sharp as the data."
    )
    summary = {
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "floor": json_ready(floor),
    }
    write_text_atomic(out_dir / "timm_unet.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / "timm_unet.md", table + "\n\n" + notes + "\n")
    append_results(
        "timm-encoder UNet vs UNet2DModel (random init, equal steps)", table, notes, record=not args.no_record
    )


if __name__ == "__main__":
    main()
