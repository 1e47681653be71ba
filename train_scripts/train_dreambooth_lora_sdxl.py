#!/usr/bin/env python
"""DreamBooth LoRA on SDXL (diffusers' flag names); see crispdiff.sd.trainer.

    accelerate launch train_scripts/train_dreambooth_lora_sdxl.py --pretrained_model_name_or_path SDXL \
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --instance_data_dir dog \
        --instance_prompt "a photo of sks dog" --resolution 1024 --output_dir runs/dog-lora-xl
"""

from crispdiff.core.flags import parse_config
from crispdiff.sd.config import SDXLDreamBoothLoRAConfig
from crispdiff.sd.trainer import train_dreambooth_lora

if __name__ == "__main__":
    train_dreambooth_lora(parse_config(SDXLDreamBoothLoRAConfig))
