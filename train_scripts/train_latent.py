"""Train a latent diffusion model (the main job) on a frozen VAE's latents and save it as a diffusers pipeline.

    accelerate launch train_scripts/train_latent.py

With no arguments it trains on crispdiff's embedded Noto emoji subset (64 px) with the embedded f=4 VAE, sized to
finish in a few minutes on a laptop CPU, latent encoding included, and writes crispdiff-latent/pipeline (with
samples.png). Your own data and VAE:

    accelerate launch train_scripts/train_latent.py --train_data_dir my_images --resolution 128 \\
        --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse

Every flag: --help.
"""

from __future__ import annotations

from crispdiff.core.flags import parse_config
from crispdiff.latent.trainer import LatentTrainConfig, train_latent


def main(argv: list[str] | None = None) -> None:
    train_latent(parse_config(LatentTrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
