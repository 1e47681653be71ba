"""LoRA and DreamBooth on Stable Diffusion, their files, and the fused export."""
