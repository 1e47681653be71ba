"""The latent space the main job's UNet trains in: the encoded-once latent cache wired to the images it was made from
(its key, folder and scaling) and ``LatentSpace``, the ``crispdiff.train.spaces.TrainingSpace`` whose ``x0`` draws
``z = mean + std * eps`` from the cached posterior, picks the mirror image's latents half the time with
``--random_flip``, and scales them to unit variance."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crispdiff.data.loading import to_device
from crispdiff.latent.cache import LatentCache, load_or_build_latent_cache
from crispdiff.latent.vae import (
    AnyVAE,
    measure_scaling_factor,
    measure_shift_factor,
    read_scaling,
    sample_posterior,
    scale_latents,
)
from crispdiff.train.spaces import ImageDataSpace

if TYPE_CHECKING:
    from crispdiff.latent.trainer import LatentTrainConfig

__all__ = ["LatentSpace", "build_latent_space", "load_latents", "preprocessing_key", "resolve_scaling"]

#: Posterior samples used to measure the scaling factor when the VAE's config states none (evenly spaced images).
SCALING_SAMPLE_IMAGES = 4096


def preprocessing_key(config: Any) -> dict[str, Any]:
    """The preprocessing flags that decide a cached latent (with the image cache's own key, part of the cache key)."""
    return {
        "resolution": int(config.resolution),
        "interpolation": str(config.interpolation),
        "background": str(config.background),
        "min_image_size": int(config.min_image_size),
        "crop": "center" if config.center_crop else "random",
    }


def crop_positions(view: Any, data: Any) -> int:
    """Crop positions the latent cache encodes per image: 1 (the centre) with --center_crop or when no image is
    larger than its crop, else --random_crop_positions."""
    if view.center_crop or not data.has_crop_slack():
        return 1
    return int(view.random_crop_positions)


def latent_cache_dir(config: Any) -> Path:
    """``--latent_cache_dir``, else ``latents/`` under crispdiff's cache root."""
    if getattr(config, "latent_cache_dir", None):
        return Path(config.latent_cache_dir).expanduser()
    from crispdiff.data.loading import cache_root

    return cache_root(config) / "latents"


def _statistics_sample(cache: LatentCache, seed: int = 0) -> torch.Tensor:
    """Posterior samples of up to SCALING_SAMPLE_IMAGES evenly spaced images (every variant), with a fixed seed."""
    count = len(cache)
    take = min(count, SCALING_SAMPLE_IMAGES)
    indices = torch.linspace(0, count - 1, take).round().long().unique()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for variant in range(cache.num_variants):
        mean, logvar = cache.posterior(indices, torch.full_like(indices, variant))
        samples.append(sample_posterior(mean, logvar, generator))
    return torch.cat(samples)


def resolve_scaling(vae: AnyVAE, cache: LatentCache, override: float | None = None) -> tuple[float, float | None, str]:
    """``(scaling_factor, shift_factor, where_from)`` for the diffusion space ``(z - shift) * scale``.

    An explicit ``--scaling_factor`` wins (with the config's shift, if any); then the VAE config's stated values;
    otherwise both are measured on the training latents so they have zero mean and unit variance — the LDM recipe,
    without which the noise schedule's signal-to-noise ratios would be off by the latents' scale.
    """
    stated_scale, stated_shift = read_scaling(vae)
    if override is not None:
        return float(override), stated_shift, "--scaling_factor"
    if stated_scale is not None:
        return stated_scale, stated_shift, "the VAE config"
    sample = _statistics_sample(cache)
    shift = stated_shift if stated_shift is not None else measure_shift_factor(sample)
    return measure_scaling_factor(sample), shift, "measured on the training latents"


class LatentSpace(ImageDataSpace):
    """Diffusion on a frozen VAE's scaled latents, sampled from the cached posterior of each image."""

    def __init__(
        self,
        cache: LatentCache,
        vae: AnyVAE,
        data: Any,
        *,
        scaling_factor: float,
        shift_factor: float | None = None,
    ):
        channels, height, width = cache.latent_shape
        if height != width:
            raise ValueError(f"latents of {height}x{width} are not square; crispdiff trains square images only")
        if len(cache) != len(data):
            raise ValueError(f"the latent cache holds {len(cache)} images but the data has {len(data)}")
        super().__init__(data)
        self.cache = cache
        self.vae = vae.eval().requires_grad_(False)  # frozen: no gradients, no optimizer state, no dropout
        self.channels = channels
        self.sample_size = height
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)

    def __len__(self) -> int:
        return len(self.cache)

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]``: variant (flip, crop) and posterior noise drawn from ``generator``."""
        indices = torch.as_tensor(indices).reshape(-1).cpu()
        return self.latents(indices, self.draw_variants(indices, generator), generator, device)

    def draw_variants(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Which cached latent of each image to train on: its flip and crop position (``crop * num_flips + flip``).

        One flip draw per image is taken even without flips, so the stream of random numbers does not depend on
        ``--random_flip`` and a resumed run (generator restored) reproduces the same samples bit for bit; with random
        crops (several cached crop positions) one more draw per image picks the crop. Separate from ``latents`` so a
        trainer that conditions on the crop (SDXL) knows which one was drawn.
        """
        indices = torch.as_tensor(indices).reshape(-1).cpu()
        coin = torch.rand(indices.numel(), generator=generator, device=generator.device).cpu()
        spec = self.cache.spec
        variants = (coin < 0.5).long() if spec.num_flips == 2 else torch.zeros_like(indices)
        if spec.crop_positions > 1:  # random crops: one of the cached crop positions per image
            pick = torch.rand(indices.numel(), generator=generator, device=generator.device).cpu()
            crops = (pick * spec.crop_positions).long().clamp_(max=spec.crop_positions - 1)
            variants = crops * spec.num_flips + variants
        return variants

    def latents(
        self, indices: torch.Tensor, variants: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` of these images' ``variants``, the posterior noise drawn from
        ``generator``."""
        indices = torch.as_tensor(indices).reshape(-1).cpu()
        mean, logvar = self.cache.posterior(indices, variants)
        if mean.device != generator.device:  # latents kept on the GPU (prepare): only the drawn noise travels
            eps = torch.randn(mean.shape, generator=generator, device=generator.device)
            z = mean + torch.exp(0.5 * logvar) * to_device(eps, mean.device)  # = sample_posterior with that noise
        else:
            z = sample_posterior(mean, logvar, generator)
        return scale_latents(z, self.scaling_factor, self.shift_factor).to(device)

    def prepare(self, device: torch.device) -> None:
        """On a GPU, keep the cached posteriors there when they fit (the trainer calls this once)."""
        if device.type != "cpu":
            self.cache.keep_on_device(device)

    def pipeline_components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "latent_scaling_factor": self.scaling_factor,
            "latent_shift_factor": self.shift_factor,
        }


def load_latents(
    view: Any, config: Any, vae: AnyVAE, *, data: Any = None, show_progress: bool = True, processes: Any = None
) -> tuple[Any, LatentCache]:
    """The images ``view`` describes (centre crops) and their latent cache, encoded once and then reused.

    ``view`` holds the data flags (folder, resolution, flips...) and ``config`` the cache flags; they differ when one
    run trains on several image sets (DreamBooth's instance and class images). ``data``: those images, when the
    caller has already loaded them with ``load_images(view, for_latents=True)``. ``processes``: the run's
    ``Accelerator``, when every process calls this (they decode and encode in shares); None: this process does all.
    """
    from crispdiff.data.loading import load_images

    if data is None:
        data = load_images(view, for_latents=True, show_progress=show_progress, processes=processes)
    cache = load_or_build_latent_cache(
        data,
        vae,
        latent_cache_dir(config),
        preprocessing=preprocessing_key(view),
        random_flip=bool(view.random_flip),
        dtype=config.latent_cache_dtype,
        batch_size=config.vae_batch_size,
        show_progress=show_progress,
        crop_positions=crop_positions(view, data),
        processes=processes,
    )
    return data, cache


def build_latent_space(
    config: LatentTrainConfig, vae: AnyVAE, *, data: Any = None, show_progress: bool = True, processes: Any = None
) -> LatentSpace:
    """Load the images (centre crops; or take ``data``), encode or reuse their latent cache (every process of
    ``processes`` its share), resolve the scaling."""
    data, cache = load_latents(config, config, vae, data=data, show_progress=show_progress, processes=processes)
    scale, shift, source = resolve_scaling(vae, cache, config.scaling_factor)
    if show_progress:
        state = "reused" if cache.encoded_images == 0 else f"encoded {cache.encoded_images} image(s)"
        shift_text = "" if shift is None else f", shift {shift:.4g}"
        print(  # before train() sets up logging, so print like accelerator.print does
            f"crispdiff: latent cache {cache.folder} ({state}): {len(cache)} x "
            f"{'x'.join(map(str, cache.latent_shape))} latents; scaling factor {scale:.4g}{shift_text} ({source})"
        )
    return LatentSpace(cache, vae, data, scaling_factor=scale, shift_factor=shift)
