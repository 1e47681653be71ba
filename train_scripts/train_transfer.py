"""Fine-tune a pretrained pixel UNet (e.g. google/ddpm-cifar10-32) on your images and save a crispdiff pipeline.

    accelerate launch train_scripts/train_transfer.py --pretrained_model_name_or_path google/ddpm-cifar10-32 \\
        --train_data_dir my_images --resolution 64 --train_modules lora --max_train_steps 2000

The noise schedule and prediction type are the pretrained scheduler's unless a flag says otherwise; the saved
pipeline samples with DPM-Solver++ on those betas. --train_modules all|decoder|lora picks what trains (LoRA is
merged into the saved UNet; --save_lora_adapter also keeps the adapter). Every flag: --help.
"""

from __future__ import annotations

from crispdiff.core.flags import parse_config
from crispdiff.transfer.config import TransferConfig
from crispdiff.transfer.trainer import train_transfer


def main(argv: list[str] | None = None) -> None:
    train_transfer(parse_config(TransferConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
