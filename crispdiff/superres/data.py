"""Training pairs for super-resolution: each high-resolution image, its downscaled input, and random paired crops.

Inputs are made with the data pipeline's own resize (:func:`crispdiff.data.decode.resize_rgb`), so the SR model
learns to invert exactly the downscaling a diffusion model's training images went through, and optionally passed
through a VAE round trip so it also cleans what a latent model's decoder leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crispdiff.data.decode import resize_rgb

#: Uniform numbers drawn per pair and batch, whatever the options: crop top, crop left, flip, turn, round trip.
DRAWS_PER_PAIR = 5


def downscale(images: torch.Tensor, scale: int, interpolation: str) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, H / scale, W / scale] with the data pipeline's antialiased filter."""
    height, width = images.shape[-2] // scale, images.shape[-1] // scale
    rgb = images.permute(0, 2, 3, 1).numpy()
    small = np.stack([resize_rgb(np.ascontiguousarray(image), (width, height), interpolation) for image in rgb])
    return torch.from_numpy(small).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def vae_roundtrip(
    vae: torch.nn.Module, images: torch.Tensor, latent_noise: float, seed: int, batch_size: int = 64
) -> torch.Tensor:
    """uint8 images -> the VAE's uint8 reconstructions from the posterior mean, plus Gaussian noise of a std drawn
    uniformly in [0, latent_noise] per image in the diffusion model's (scaled) latent units; seeded."""
    from crispdiff.core.images import to_uint8, uint8_to_model
    from crispdiff.latent.vae import encode_posterior, read_scaling, scale_latents, unscale_latents

    generator = torch.Generator().manual_seed(seed)
    scaling, shift = read_scaling(vae)
    out = []
    for start in range(0, len(images), batch_size):
        mean, _ = encode_posterior(vae, uint8_to_model(images[start : start + batch_size]))
        latents = scale_latents(mean, scaling, shift)
        std = torch.rand(len(latents), 1, 1, 1, generator=generator) * latent_noise
        latents = latents + (std * torch.randn(latents.shape, generator=generator)).to(latents.device)
        decoded = vae.decode(unscale_latents(latents, scaling, shift).to(vae.dtype)).sample
        out.append(to_uint8(decoded.float().cpu()))
    return torch.cat(out)


@dataclass
class SRPairs:
    """High-resolution uint8 images and their low-resolution inputs (and optional VAE round trips of those)."""

    high: torch.Tensor  # uint8 [N, 3, H, W]
    low: torch.Tensor  # uint8 [N, 3, H / scale, W / scale]
    roundtrip: torch.Tensor | None = None  # uint8, like low
    roundtrip_prob: float = 0.0

    @property
    def scale(self) -> int:
        return self.high.shape[-1] // self.low.shape[-1]

    def __len__(self) -> int:
        return len(self.high)

    def crops(
        self, ids: torch.Tensor, crop: int, generator: torch.Generator, augment: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float [B, 3, crop, crop] inputs and [B, 3, crop*scale, crop*scale] targets in [0, 1], paired exactly.

        ``DRAWS_PER_PAIR`` numbers per pair come from ``generator`` whatever the options, so a resumed run (generator
        restored from its checkpoint) sees the same crops. ``augment`` adds a horizontal flip and a 90-degree turn,
        applied to input and target alike (SR is local: an edge seen turned is still an edge).
        """
        draws = torch.rand(len(ids), DRAWS_PER_PAIR, generator=generator)
        scale, low_size = self.scale, self.low.shape[-1]
        inputs, targets = [], []
        for j, i in enumerate(ids.tolist()):
            top = min(int(draws[j, 0] * (low_size - crop + 1)), low_size - crop)
            left = min(int(draws[j, 1] * (low_size - crop + 1)), low_size - crop)
            source = self.low
            if self.roundtrip is not None and draws[j, 4] < self.roundtrip_prob:
                source = self.roundtrip
            x = source[i, :, top : top + crop, left : left + crop]
            y = self.high[i, :, top * scale : (top + crop) * scale, left * scale : (left + crop) * scale]
            if augment:
                if draws[j, 2] < 0.5:
                    x, y = x.flip(-1), y.flip(-1)
                turns = int(draws[j, 3] * 4) % 4
                x, y = x.rot90(turns, (-2, -1)), y.rot90(turns, (-2, -1))
            inputs.append(x)
            targets.append(y)
        return torch.stack(inputs).float() / 255.0, torch.stack(targets).float() / 255.0
