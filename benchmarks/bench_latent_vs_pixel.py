"""Latent vs pixel training speed at the same output resolution, and what the latent cache saves.

    python benchmarks/bench_latent_vs_pixel.py --resolutions 64 128 --train_batch_size 16

For each output resolution and UNet size, three runs of the real `UNetTrainer.optimizer_step` (same batch, same UNet
widths, depths and attention placement — the lowest level — so only the input size differs):

- pixel: the UNet on 3 x R x R pixels (`PixelSpace`);
- latent, cached: the UNet on C x R/f x R/f latents drawn from the latent cache (`LatentSpace`, what
  train_latent.py does);
- latent, encode every step: the same latent UNet, but each batch is pushed through the VAE encoder first (what a
  trainer without a cache does).

Steps are timed in alternation (A B C A B C ...) so machine noise hits all three. A second table measures the
latent cache's storage dtype: how far float16 rounding moves a latent compared with the posterior's own spread and
with the smallest noise level the diffusion model trains at, and what it does to decoded images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import append_results, emoji_dir, markdown_table, timed

from crispdiff.core.config import TrainConfig
from crispdiff.data.loading import load_images
from crispdiff.diffusion.schedule import NoiseSchedule
from crispdiff.diffusion.unets import describe_parameters
from crispdiff.latent.space import build_latent_space
from crispdiff.latent.trainer import LatentTrainConfig
from crispdiff.latent.vae import (
    AnyVAE,
    embedded_vae_dir,
    encode_posterior,
    load_vae,
    sample_posterior,
    scale_latents,
    unscale_latents,
    vae_downsample_factor,
)
from crispdiff.train.process import make_accelerator
from crispdiff.train.spaces import PixelSpace
from crispdiff.train.unet_trainer import UNetTrainer

#: UNet sizes compared: (name, base_channels, channel_mults, layers_per_block). Three levels each, attention at the
#: lowest level (R/4 pixels for the pixel UNet, R/4f for the latent one).
SIZES = {
    "tiny": (32, [1, 2, 4], 1),
    "small": (64, [1, 2, 4], 2),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="image folder (default: ../shared emoji, else embedded subset)")
    p.add_argument("--vae", default=None, help="VAE folder (default: the embedded one, else a random f=4 stand-in)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_images", type=int, default=256, help="images loaded (and encoded) per resolution")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype_only", action="store_true", help="only the latent cache dtype table (quick)")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args()


def stand_in_vae() -> AnyVAE:
    """A randomly initialised f=4 AutoencoderKL shaped like the embedded one (same speed, meaningless latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            mid_block_add_attention=False,
        )
        .eval()
        .requires_grad_(False)
    )


def resolve_vae(path: str | None) -> tuple[AnyVAE, str]:
    if path:
        vae = load_vae(path)
        return vae, f"{path} ({type(vae).__name__}, block_out_channels {list(vae.config.block_out_channels)})"
    if (embedded_vae_dir() / "config.json").is_file():
        return load_vae(None), "embedded vae-noto-f4"
    return stand_in_vae(), "random stand-in shaped like vae-noto-f4 (32, 64, 128), 1 layer (embedded VAE missing)"


class EncodeEveryStepSpace:
    """Latents made on the fly: pixel batch -> VAE encoder -> posterior sample -> scaling (no cache)."""

    def __init__(self, pixels: PixelSpace, vae: AnyVAE, channels: int, size: int, scale: float, shift: float | None):
        self.pixels, self.vae, self.channels, self.sample_size = pixels, vae, channels, size
        self.scale, self.shift = scale, shift

    def __len__(self) -> int:
        return len(self.pixels)

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        images = self.pixels.x0(indices, generator, device)
        mean, logvar = encode_posterior(self.vae, images)
        z = sample_posterior(mean.cpu(), logvar.cpu(), generator)
        return scale_latents(z, self.scale, self.shift).to(device)

    def pipeline_components(self) -> dict[str, Any]:
        return {}

    def reference_images(self, count: int) -> torch.Tensor:
        return self.pixels.reference_images(count)


def model_flags(size: str, unet_resolution: int) -> dict[str, Any]:
    base, mults, layers = SIZES[size]
    lowest = unet_resolution // 2 ** (len(mults) - 1)
    return dict(base_channels=base, channel_mults=mults, layers_per_block=layers, attention_res=[lowest], dropout=0.0)


def run_flags(tmp: str, data_dir: str, resolution: int, args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        train_data_dir=data_dir,
        resolution=resolution,
        max_train_samples=args.num_images,
        train_batch_size=args.train_batch_size,
        output_dir=tmp,
        cache_dir=tmp,
        report_to="none",
        max_train_steps=10**6,
        lr_warmup_steps=0,
        mixed_precision="no",
    )


def throughput_rows(args: argparse.Namespace, vae: AnyVAE, data_dir: str) -> list[list[Any]]:
    factor = vae_downsample_factor(vae)
    rows = []
    for resolution in args.resolutions:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 64 px emoji upscaled to 128 px: fine for timing
            base = run_flags(tmp, data_dir, resolution, args)
            latent_config = LatentTrainConfig(**base, **model_flags("tiny", resolution // factor))
            latent_space = build_latent_space(latent_config, vae, show_progress=False)
            pixel_space = PixelSpace(load_images(TrainConfig(**base), show_progress=False))
            encode_space = EncodeEveryStepSpace(
                pixel_space,
                vae,
                latent_space.channels,
                latent_space.sample_size,
                latent_space.scaling_factor,
                latent_space.shift_factor,
            )
            for size in args.sizes:
                trainers = {}
                for name, space, unet_res in (
                    ("pixel", pixel_space, resolution),
                    ("latent, cached", latent_space, resolution // factor),
                    ("latent, encode every step", encode_space, resolution // factor),
                ):
                    config = TrainConfig(**base, **model_flags(size, unet_res))
                    trainers[name] = UNetTrainer(config, space, make_accelerator(config))
                times: dict[str, list[float]] = {name: [] for name in trainers}
                for trainer in trainers.values():
                    trainer.optimizer_step()  # warm-up
                for _ in range(args.repeats):
                    for name, trainer in trainers.items():
                        times[name].append(timed(trainer.optimizer_step, args.steps))
                ips = {name: args.train_batch_size / statistics.median(t) for name, t in times.items()}
                for name, trainer in trainers.items():
                    shape = f"{trainer.space.channels}x{trainer.space.sample_size}x{trainer.space.sample_size}"
                    rows.append(
                        [
                            resolution,
                            size,
                            name,
                            shape,
                            describe_parameters(trainer.num_parameters).replace(" parameters", ""),
                            ips[name],
                            ips[name] / ips["pixel"],
                        ]
                    )
                cached, uncached = ips["latent, cached"], ips["latent, encode every step"]
                print(f"{resolution}px {size}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in ips.items()))
                print(f"  cache speed-up over encoding every step: {cached / uncached:.2f}x")
    return rows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def dtype_rows(vae: AnyVAE, data_dir: str, resolution: int, count: int) -> list[list[Any]]:
    """What float16 storage does to the cached latents, in the diffusion model's (scaled) units."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LatentTrainConfig(
            train_data_dir=data_dir,
            resolution=resolution,
            max_train_samples=count,
            cache_dir=tmp,
            latent_cache_dtype="float32",
        )
        space = build_latent_space(config, vae, show_progress=False)
        data = space.data
    images = data.center_crops().float() / 127.5 - 1.0
    mean, logvar = encode_posterior(vae, images)
    scale, shift = space.scaling_factor, space.shift_factor
    rounded = mean.half().float()
    error = (scale_latents(rounded, scale, shift) - scale_latents(mean, scale, shift)).abs()
    posterior_std = torch.exp(0.5 * logvar) * scale
    schedule = NoiseSchedule.from_config(TrainConfig())
    sigma_min = float(schedule.sqrt_one_minus_alphas_cumprod[0] / schedule.sqrt_alphas_cumprod[0])
    with torch.no_grad():
        decoded32 = vae.decode(unscale_latents(scale_latents(mean, scale, shift), scale, shift)).sample
        decoded16 = vae.decode(rounded).sample
    per_image = int(np.prod(mean.shape[1:]))
    return [
        ["max abs(fp16 - fp32) of a scaled latent", float(error.max())],
        ["mean abs(fp16 - fp32) of a scaled latent", float(error.mean())],
        ["median posterior std (scaled)", float(posterior_std.median())],
        ["smallest training noise sigma (t=0, cosine)", sigma_min],
        ["PSNR decode(fp16 mean) vs decode(fp32 mean), dB", psnr(decoded16, decoded32)],
        ["PSNR decode(fp32 mean) vs the image, dB", psnr(decoded32, images)],
        ["bytes per image (mean + logvar, one variant), fp16 / fp32", f"{per_image * 2 * 2} / {per_image * 2 * 4}"],
    ]


def throughput_report(
    args: argparse.Namespace, vae: AnyVAE, vae_name: str, data_dir: str, dtype_table: str
) -> tuple[str, str]:
    """The throughput table and its notes (machine-independent facts, cache speed-ups, the dtype table)."""
    rows = throughput_rows(args, vae, data_dir)
    table = markdown_table(["output px", "UNet", "space", "UNet input", "params", "img/s (median)", "vs pixel"], rows)
    by_key = {(r[0], r[1], r[2]): r[5] for r in rows}
    cached = {(r, s): by_key[(r, s, "latent, cached")] for r in args.resolutions for s in args.sizes}
    uncached = {(r, s): by_key[(r, s, "latent, encode every step")] for r in args.resolutions for s in args.sizes}
    speedups = [f"{r}px {s}: {cached[(r, s)] / uncached[(r, s)]:.2f}x" for (r, s) in cached]
    notes = (
        f"VAE: {vae_name} (f={vae_downsample_factor(vae)}). Batch {args.train_batch_size}, fp32, real "
        f"`UNetTrainer.optimizer_step` (EMA included), median of {args.repeats} x {args.steps} steps timed in "
        f"alternation; data: {Path(data_dir).name} ({args.num_images} images, upscaled for 128 px). UNet sizes "
        f"{SIZES} (base, mults, layers), attention at the lowest level.\n\n"
        f"Cached latents vs encoding every step: {', '.join(speedups)}.\n\n"
        f"Latent cache dtype, 256 emoji at 64 px:\n\n{dtype_table}"
    )
    return table, notes


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or str(emoji_dir())
    vae, vae_name = resolve_vae(args.vae)
    dtype_table = markdown_table(["latent cache storage", "value"], dtype_rows(vae, data_dir, 64, 256))
    if args.dtype_only:
        title = "Latent cache storage dtype (bench_latent_vs_pixel.py --dtype_only)"
        table, notes = dtype_table, f"VAE: {vae_name}; 256 emoji at 64 px."
    else:
        title = "Latent vs pixel training throughput (bench_latent_vs_pixel.py)"
        table, notes = throughput_report(args, vae, vae_name, data_dir, dtype_table)
    append_results(title, table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
