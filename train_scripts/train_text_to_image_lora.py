#!/usr/bin/env python
"""LoRA fine-tuning of Stable Diffusion 1.x/2.x on captioned images (diffusers' flag names); see crispdiff.sd.trainer.

    accelerate launch train_scripts/train_text_to_image_lora.py --pretrained_model_name_or_path SD \
        --train_data_dir my_images --caption_column text --resolution 512 --output_dir runs/lora
"""

from crispdiff.core.flags import parse_config
from crispdiff.sd.config import TextToImageLoRAConfig
from crispdiff.sd.trainer import train_text_to_image_lora

if __name__ == "__main__":
    train_text_to_image_lora(parse_config(TextToImageLoRAConfig))
