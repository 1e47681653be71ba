"""How well a VAE reconstructs emoji it never trained on: PSNR, SSIM and both sharpness ratios, per held-out set.

    python benchmarks/bench_vae.py                                  # the embedded VAE
    python benchmarks/bench_vae.py --vae old=/tmp/old-vae new=crispdiff/assets/vae-noto-f4
    python benchmarks/bench_vae.py --other_family ~/.cache/crispdiff/twemoji-64   # after fetch_twemoji.py

The held-out sets are the ones the embedded VAE was trained without (``crispdiff.vae.trainer.holdout_split`` with
the card's flags): whole categories (--holdout_values) and a seeded 5 % of the remaining images. Reconstructions use
the posterior mean; sharpness ratios are reconstruction / original (1 = as sharp as the data). The embedded 1,000
(the main job's data, mostly seen in training) are reported too, since they bound how sharp the main job can be.
``--other_family`` adds a folder of emoji from a design family the VAE never saw (issue 8: >= 25 dB, hf >= 0.85;
``fetch_twemoji.py`` fetches Twemoji).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import append_results, emoji_dir, markdown_table

from crispdiff.core.config import DataConfig
from crispdiff.data.loading import load_images
from crispdiff.latent.vae import latent_channels, load_vae, vae_downsample_factor
from crispdiff.vae.evaluation import holdout_split, reconstruction_metrics


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", nargs="+", default=["embedded"], help="NAME=PATH (or 'embedded') per VAE to measure")
    p.add_argument("--holdout_column", default="category")
    p.add_argument("--holdout_values", nargs="+", default=["Activities", "Food & Drink"])
    p.add_argument("--validation_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other_family", help="a folder of emoji of another design family (e.g. fetch_twemoji.py's)")
    p.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    data = load_images(DataConfig(train_data_dir=str(emoji_dir())), show_progress=False)
    _, held, classes = holdout_split(
        data, args.validation_fraction, args.seed, args.holdout_column, args.holdout_values
    )
    embedded = load_images(DataConfig(), show_progress=False)
    sets = {
        f"held-out images ({len(held)})": data.center_crops(held),
        f"held-out categories {', '.join(args.holdout_values)} ({len(classes)})": data.center_crops(classes),
        f"embedded 1,000 (main job data; mostly trained on) ({len(embedded)})": embedded.center_crops(),
    }
    if args.other_family:
        other = load_images(DataConfig(train_data_dir=args.other_family), show_progress=False)
        sets[f"another design family: {Path(args.other_family).name} ({len(other)})"] = other.center_crops()
    rows = []
    for spec in args.vae:
        name, _, path = spec.partition("=")
        vae = load_vae(None if (path or name) == "embedded" else (path or name)).float().eval()
        shape = f"{latent_channels(vae)}ch f={vae_downsample_factor(vae)}"
        for label, images in sets.items():
            with torch.no_grad():
                m = reconstruction_metrics(vae, images)
            rows.append([name, shape, label, m["psnr"], m["ssim"], m["hf_energy_ratio"], m["laplacian_var_ratio"]])
            print(rows[-1])
    table = markdown_table(["VAE", "latent", "images", "PSNR dB", "SSIM", "hf ratio", "Laplacian ratio"], rows)
    notes = (
        f"Data: {emoji_dir()} (64 px, composited on white). Held out with holdout_split(column "
        f"{args.holdout_column!r}, values {args.holdout_values}, fraction {args.validation_fraction}, seed "
        f"{args.seed}); posterior mean; SSIM 11x11 Gaussian window."
        + (f" Other design family: {args.other_family} (composited on white)." if args.other_family else "")
    )
    append_results("VAE reconstruction on held-out emoji (bench_vae.py)", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
