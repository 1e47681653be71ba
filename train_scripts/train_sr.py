"""Train a small super-resolution model on your own images (x2 or x4), saved as a spandrel-native SR component.

    accelerate launch train_scripts/train_sr.py --train_data_dir my_128px_images --resolution 128 --scale 2
    crispdiff add-sr crispdiff-latent/pipeline --sr_model crispdiff-sr/sr_model

Inputs are your images downscaled with crispdiff's own resize; the held-out PSNR against Lanczos is printed at each
validation and written to the card. Every flag: --help.
"""

from __future__ import annotations

from pathlib import Path

from crispdiff.core.flags import parse_config
from crispdiff.superres.config import SRTrainConfig
from crispdiff.superres.trainer import train_sr


def main(argv: list[str] | None = None) -> Path | None:
    return train_sr(parse_config(SRTrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
