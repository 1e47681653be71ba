"""Train a small diffusion model directly on pixels and save it as a diffusers pipeline.

    accelerate launch train_scripts/train_unconditional.py --train_data_dir my_images --resolution 64

With no data flag it trains on crispdiff's embedded Noto emoji subset. Every flag: --help.
"""

from __future__ import annotations

from crispdiff.core.config import TrainConfig
from crispdiff.core.flags import parse_config
from crispdiff.train.unet_trainer import train


def main(argv: list[str] | None = None) -> None:
    train(parse_config(TrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
