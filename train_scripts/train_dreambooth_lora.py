#!/usr/bin/env python
"""DreamBooth LoRA on Stable Diffusion 1.x/2.x (diffusers' flag names); see crispdiff.sd.trainer.

    accelerate launch train_scripts/train_dreambooth_lora.py --pretrained_model_name_or_path SD \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --with_prior_preservation \
        --class_data_dir class_dog --class_prompt "a photo of dog" --output_dir runs/dog-lora
"""

from crispdiff.core.flags import parse_config
from crispdiff.sd.config import DreamBoothLoRAConfig
from crispdiff.sd.trainer import train_dreambooth_lora

if __name__ == "__main__":
    train_dreambooth_lora(parse_config(DreamBoothLoRAConfig))
