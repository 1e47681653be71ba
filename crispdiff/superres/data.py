"""Training pairs for super-resolution: each high-resolution image, its downscaled input, and random paired crops.

Inputs are made with the data pipeline's own resize (:func:`crispdiff.data.decode.resize_rgb`), so the SR model
learns to invert exactly the downscaling a diffusion model's training images went through, and optionally passed
through a VAE round trip so it also cleans what a latent model's decoder leaves, and blurred a little so it also
sharpens inputs softer than a clean downscale. A diffusion model's own low-resolution samples, which have no
originals, are :class:`UnpairedInputs` for the adversarial loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crispdiff.data.decode import resize_rgb
from crispdiff.pipelines.pipeline_crispdiff import gaussian_blur  # the blur the data pipeline and the pipeline use

#: Uniform numbers drawn per pair and batch, whatever the options: crop top, crop left, flip, turn, round trip, blur.
DRAWS_PER_PAIR = 6
#: Uniform numbers drawn per unpaired crop, whatever the options: image, crop top, crop left, flip, turn.
DRAWS_PER_UNPAIRED_CROP = 5


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


def blur_each(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Float [N, C, H, W] images, each blurred by the pipeline's Gaussian with its own std in pixels (0: as it was)."""
    return torch.cat([gaussian_blur(image[None], float(sigma)) for image, sigma in zip(images, sigmas, strict=True)])


def crop_and_turn(
    images: list[torch.Tensor], top: int, left: int, size: int, scales: list[int], flip: bool, turns: int
) -> list[torch.Tensor]:
    """The same square of each image (``top``, ``left`` and ``size`` in the first one's pixels, times its scale),
    flipped and turned alike."""
    out = []
    for image, scale in zip(images, scales, strict=True):
        x = image[..., top * scale : (top + size) * scale, left * scale : (left + size) * scale]
        x = x.flip(-1) if flip else x
        out.append(x.rot90(turns, (-2, -1)))
    return out


@dataclass
class SRPairs:
    """High-resolution uint8 images and their low-resolution inputs (and optional VAE round trips of those)."""

    high: torch.Tensor  # uint8 [N, 3, H, W]
    low: torch.Tensor  # uint8 [N, 3, H / scale, W / scale]
    roundtrip: torch.Tensor | None = None  # uint8, like low
    roundtrip_prob: float = 0.0
    blur_max: float = 0.0  # inputs blurred by a Gaussian of std uniform in [0, blur_max] input pixels

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
        applied to input and target alike (SR is local: an edge seen turned is still an edge). The blur is of the
        whole input image, before the crop, so a crop's edges are blurred as the inside is.
        """
        draws = torch.rand(len(ids), DRAWS_PER_PAIR, generator=generator)
        scale, low_size = self.scale, self.low.shape[-1]
        sources = [
            self.roundtrip if self.roundtrip is not None and draws[j, 4] < self.roundtrip_prob else self.low
            for j in range(len(ids))
        ]
        low = torch.stack([source[i] for source, i in zip(sources, ids.tolist(), strict=True)]).float() / 255.0
        if self.blur_max > 0:
            low = blur_each(low, draws[:, 5] * self.blur_max)
        inputs, targets = [], []
        for j, i in enumerate(ids.tolist()):
            top = min(int(draws[j, 0] * (low_size - crop + 1)), low_size - crop)
            left = min(int(draws[j, 1] * (low_size - crop + 1)), low_size - crop)
            flip, turns = (bool(draws[j, 2] < 0.5), int(draws[j, 3] * 4) % 4) if augment else (False, 0)
            x, y = crop_and_turn([low[j], self.high[i]], top, left, crop, [1, scale], flip, turns)
            inputs.append(x)
            targets.append(y)
        return torch.stack(inputs), torch.stack(targets).float() / 255.0


@dataclass
class UnpairedInputs:
    """Low-resolution images with no originals (a diffusion model's own samples): inputs for the adversarial loss."""

    images: torch.Tensor  # uint8 [M, 3, h, w]

    def __len__(self) -> int:
        return len(self.images)

    def crops(self, count: int, crop: int, generator: torch.Generator, augment: bool) -> torch.Tensor:
        """Float [count, 3, crop, crop] in [0, 1]: random crops of random images (``DRAWS_PER_UNPAIRED_CROP``
        numbers each from ``generator``, whatever the options), flipped and turned as the pairs are."""
        draws = torch.rand(count, DRAWS_PER_UNPAIRED_CROP, generator=generator)
        size = self.images.shape[-1]
        out = []
        for row in draws:
            image = self.images[min(int(row[0] * len(self)), len(self) - 1)]
            top = min(int(row[1] * (size - crop + 1)), size - crop)
            left = min(int(row[2] * (size - crop + 1)), size - crop)
            flip, turns = (bool(row[3] < 0.5), int(row[4] * 4) % 4) if augment else (False, 0)
            out.append(crop_and_turn([image], top, left, crop, [1], flip, turns)[0])
        return torch.stack(out).float() / 255.0
