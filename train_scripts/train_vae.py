"""Train a small AutoencoderKL for latent diffusion, or fine-tune the decoder of a pretrained one.

    accelerate launch train_scripts/train_vae.py --train_data_dir my_images --resolution 64 --preset f4
    accelerate launch train_scripts/train_vae.py --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse \
        --train_decoder_only --train_data_dir my_images

The result is a diffusers AutoencoderKL folder in <output_dir>/vae with a measured scaling_factor; pass it to
train_latent.py with --pretrained_vae_name_or_path. Every flag: --help.
"""

from __future__ import annotations

from pathlib import Path

from crispdiff.core.flags import parse_config
from crispdiff.vae.config import VAETrainConfig
from crispdiff.vae.trainer import train_vae


def main(argv: list[str] | None = None) -> Path | None:
    return train_vae(parse_config(VAETrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
