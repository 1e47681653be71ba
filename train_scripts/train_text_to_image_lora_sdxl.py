#!/usr/bin/env python
"""LoRA fine-tuning of SDXL on captioned images (diffusers' flag names); see crispdiff.sd.trainer.

    accelerate launch train_scripts/train_text_to_image_lora_sdxl.py --pretrained_model_name_or_path SDXL \
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --train_data_dir my_images \
        --caption_column text --resolution 1024 --output_dir runs/lora-xl
"""

from crispdiff.core.flags import parse_config
from crispdiff.sd.config import SDXLTextToImageLoRAConfig
from crispdiff.sd.trainer import train_text_to_image_lora

if __name__ == "__main__":
    train_text_to_image_lora(parse_config(SDXLTextToImageLoRAConfig))
