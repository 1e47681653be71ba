"""A plain training step that mirrors diffusers' examples/unconditional_image_generation/train_unconditional.py.

This is the baseline crispdiff is measured against: `datasets` imagefolder + torchvision transforms decoding every
PNG every epoch through a DataLoader, `image.convert("RGB")`, DDPMScheduler.add_noise, plain MSE on the chosen
target, non-fused AdamW, EMA every step. Kept minimal and faithful, not tuned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torchvision import transforms


class DiffusersStyleLoop:
    """The diffusers example's data pipeline and inner loop, one optimizer step per `step()`."""

    def __init__(
        self,
        unet: UNet2DModel,
        data_dir: str | Path,
        *,
        resolution: int,
        batch_size: int,
        mixed_precision: str = "no",
        prediction_type: str = "epsilon",
        beta_schedule: str = "linear",
        learning_rate: float = 1e-4,
        use_ema: bool = True,
        random_flip: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        from datasets import load_dataset

        torch.manual_seed(seed)
        self.accelerator = Accelerator(mixed_precision=mixed_precision)
        dataset = load_dataset("imagefolder", data_dir=str(data_dir), split="train")
        augmentations = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
                transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

        def transform_images(examples):
            return {"input": [augmentations(image.convert("RGB")) for image in examples["image"]]}

        dataset.set_transform(transform_images)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True
        )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type
        )
        optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, betas=(0.95, 0.999), weight_decay=1e-6)
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=100_000)
        self.ema = (
            EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
            if use_ema
            else None
        )
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.model, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            unet, optimizer, loader, lr_scheduler
        )
        self.prediction_type = prediction_type
        self._batches = self._forever()

    def _forever(self) -> Iterator[dict]:
        while True:
            yield from self.loader

    def step(self) -> float:
        batch = next(self._batches)
        clean_images = batch["input"]
        noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device
        )
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        with self.accelerator.accumulate(self.model):
            model_output = self.model(noisy_images, timesteps).sample
            if self.prediction_type == "epsilon":
                target = noise
            elif self.prediction_type == "v_prediction":
                target = self.noise_scheduler.get_velocity(clean_images, noise, timesteps)
            else:
                target = clean_images
            loss = F.mse_loss(model_output.float(), target.float())
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return loss.item()
