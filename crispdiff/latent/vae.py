"""The VAE side of latent diffusion: loading, encoding to posterior parameters, latent scaling and fingerprints.

Why a module of its own: the latent trainer, the latent cache and the VAE trainer all need the same answers to "which
VAE is this, how far does it downsample, how are its latents scaled, has its weights changed" — and both diffusers
autoencoder families (``AutoencoderKL`` with a Gaussian posterior, ``AutoencoderTiny`` with a deterministic encoder)
must give them in one shape so the callers never branch on the class.

Latent scaling follows diffusers' convention: a diffusion model sees ``(z - shift_factor) * scaling_factor`` and the
decoder receives ``z / scaling_factor + shift_factor``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from crispdiff.core.errors import PathError

#: The command-line flag every loading error names, so users know what to change.
VAE_FLAG = "--pretrained_vae_name_or_path"

#: ``AutoencoderTiny`` has no posterior: its encoder is deterministic. We report its latents as a Gaussian with this
#: log-variance (std ~3e-7, the same floor diffusers clamps ``AutoencoderKL`` log-variances to) so callers can treat
#: both families alike; sampling from it returns the mean to float32 precision.
TINY_LOGVAR = -30.0

_VAE_CLASSES: dict[str, type] = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}

AnyVAE = AutoencoderKL | AutoencoderTiny


#: The unsharp-mask amount (radius 1 px) a latent pipeline on the embedded VAE gets by default. Its decoder is
#: trained to map a diffusion model's slightly-off latents back to clean images (``--decoder_noise``), which leaves
#: them a little soft; this amount, the best of ``crispdiff evaluate --sharpen_sweep`` on the main job, brings its
#: samples to the data's high-frequency energy. Longer runs need less (``--sharpen_calibration_images``).
EMBEDDED_VAE_SHARPEN_AMOUNT = 0.3

#: The same with autoguidance, which sharpens the samples itself and so needs less (the sweep's best on the autoguided
#: main job).
EMBEDDED_VAE_SHARPEN_AMOUNT_AUTOGUIDED = 0.15


def embedded_vae_dir() -> Path:
    """The folder of the default VAE shipped inside the package (f=4, trained on Noto emoji)."""
    return Path(__file__).resolve().parents[1] / "assets" / "vae-noto-f4"


def _config_class(config_path: Path, flag: str = VAE_FLAG) -> type:
    """Pick the autoencoder class from a config.json's ``_class_name``; refuse anything else with a clear message."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not a readable diffusers config ({error}); check {flag}.") from error
    class_name = config.get("_class_name")
    if class_name not in _VAE_CLASSES:
        raise ValueError(
            f"{config_path} describes a {class_name!r}, but {flag} must point to one of "
            f"{sorted(_VAE_CLASSES)} (a diffusers VAE folder, or a pipeline folder with a vae/ subfolder)."
        )
    return _VAE_CLASSES[class_name]


def _local_vae_folder(path: Path, flag: str = VAE_FLAG) -> Path:
    """The folder holding the VAE's config.json: ``path`` itself or its ``vae/`` subfolder (a pipeline folder)."""
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            if not any(candidate.glob("*.safetensors")):
                raise PathError(
                    f"{candidate} has a config.json but no .safetensors weights; {flag} loads safetensors only "
                    "(convert .bin/.ckpt weights with diffusers' save_pretrained first)."
                )
            return candidate
    raise PathError(
        f"{path} is neither a diffusers VAE folder (config.json + .safetensors) nor a pipeline folder with a vae/ "
        f"subfolder; check {flag}."
    )


def _looks_like_path(name: str) -> bool:
    """Whether a string that does not exist on disk was meant as a path rather than a Hub repository id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _hub_vae(repo_id: str, flag: str = VAE_FLAG) -> tuple[type, str | None]:
    """Find a VAE config in a Hub repository (root, then ``vae/``); return its class and subfolder."""
    from huggingface_hub import hf_hub_download

    errors = []
    for subfolder in (None, "vae"):
        try:
            config_path = hf_hub_download(repo_id, "config.json", subfolder=subfolder)
        except Exception as error:  # noqa: BLE001 - offline, missing repo and missing file all mean "not here"
            errors.append(f"{subfolder or '.'}: {type(error).__name__}")
            continue
        return _config_class(Path(config_path), flag), subfolder
    raise PathError(
        f"Could not find a VAE for {flag}={repo_id!r}: it is not a local folder, and the Hub repository has no "
        f"config.json at its root or in vae/ ({'; '.join(errors)}). Pass a local diffusers VAE folder, a pipeline "
        "folder, or a reachable Hub id (e.g. stabilityai/sd-vae-ft-mse); omit the flag for the embedded default."
    )


def load_vae(
    name_or_path: str | os.PathLike | None, *, torch_dtype: torch.dtype | None = None, flag: str = VAE_FLAG
) -> AnyVAE:
    """Load an ``AutoencoderKL`` or ``AutoencoderTiny`` from a Hub id, a local folder, or the embedded default.

    ``None`` loads the embedded default. A local folder may be a VAE folder or a pipeline folder with ``vae/``. The
    class comes from the config's ``_class_name`` so one flag serves both families; weights must be safetensors.
    The model is returned in eval mode with gradients off: every caller except the VAE trainer wants it frozen.
    ``flag``: the command-line flag the errors name (the SDXL scripts call it ``--pretrained_vae_model_name_or_path``).
    """
    if name_or_path is None:
        folder = embedded_vae_dir()
        if not (folder / "config.json").is_file():
            raise PathError(f"The embedded default VAE is missing from {folder} (a broken install?); pass {VAE_FLAG}.")
        name_or_path = folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        folder = _local_vae_folder(path, flag)
        cls = _config_class(folder / "config.json", flag)
        vae = cls.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
    elif _looks_like_path(str(name_or_path)):
        raise PathError(f"{flag}={str(name_or_path)!r}: no such file or folder.")
    else:
        cls, subfolder = _hub_vae(str(name_or_path), flag)
        vae = cls.from_pretrained(str(name_or_path), subfolder=subfolder, torch_dtype=torch_dtype, use_safetensors=True)
    vae.eval().requires_grad_(False)
    return vae


def vae_downsample_factor(vae: AnyVAE) -> int:
    """How many pixels one latent cell covers along each side (4 for the embedded VAE, 8 for Stable Diffusion's)."""
    if isinstance(vae, AutoencoderTiny):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae: AnyVAE) -> int:
    """Channels of the latent the diffusion model works on."""
    return int(vae.config.latent_channels)


@torch.no_grad()
def encode_posterior(vae: AnyVAE, images_m11: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode images in [-1, 1] to the posterior's ``(mean, logvar)``, returned as float32.

    Why parameters and not samples: the latent cache stores them once and draws a fresh sample every epoch, which is
    what training through the encoder would have seen. ``AutoencoderTiny`` is deterministic: its latents come back as
    the mean with ``logvar = TINY_LOGVAR``. Inputs are cast to the VAE's dtype; load it in float32 (the default) for
    float32 encoding.
    """
    param = next(vae.parameters())
    images = images_m11.to(device=param.device, dtype=param.dtype)
    if isinstance(vae, AutoencoderTiny):
        mean = vae.encode(images).latents.float()
        return mean, torch.full_like(mean, TINY_LOGVAR)
    posterior = vae.encode(images).latent_dist
    return posterior.mean.float(), posterior.logvar.float()


def sample_posterior(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``mean + std * eps`` from stored posterior parameters with a seeded generator (for exact resume)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def scale_latents(
    latents: torch.Tensor, scaling_factor: float | None, shift_factor: float | None = None
) -> torch.Tensor:
    """VAE latents -> diffusion space: ``(z - shift) * scale`` (a missing factor means identity)."""
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * (1.0 if scaling_factor is None else scaling_factor)


def unscale_latents(
    latents: torch.Tensor, scaling_factor: float | None, shift_factor: float | None = None
) -> torch.Tensor:
    """Diffusion space -> VAE latents for decoding: ``z / scale + shift``; the inverse of :func:`scale_latents`."""
    latents = latents / (1.0 if scaling_factor is None else scaling_factor)
    return latents if shift_factor is None else latents + shift_factor


def measure_scaling_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of training latents, so that scaled latents have unit variance (Rombach et al. 2022, sec. G).

    The std is taken about the mean (like Stable Diffusion's 0.18215). Whether to also subtract that mean is the
    caller's choice, made by :func:`measure_shift_factor`: we store it as ``shift_factor`` only for VAEs whose config
    has that concept (every diffusers ``AutoencoderKL`` and ``AutoencoderTiny`` does) and that we train or measure
    ourselves, so published VAEs keep the factors their authors chose.
    """
    std = latents.detach().double().std().item()
    if not std > 0:
        raise ValueError("Cannot measure a scaling factor: the latents are constant (std 0).")
    return float(1.0 / std)


def measure_shift_factor(latents: torch.Tensor) -> float:
    """The latents' global mean, stored as ``shift_factor`` so scaled latents are also centred."""
    return float(latents.detach().double().mean().item())


@torch.no_grad()
def standardize_latent_channels(vae: AutoencoderKL, latents: torch.Tensor) -> AutoencoderKL:
    """Reparametrise ``vae`` in place so that these (posterior-sample) latents have mean 0 and std 1 per channel.

    Why: one global ``scaling_factor`` leaves channels at very different scales (a widened VAE's new channels had a
    std of 0.45 beside old ones at 1.0-2.1 with means up to -2.1); the same noise level then drowns some channels
    long before others, which makes the latents harder to generate. The change is exact and lives in the 1x1 quant
    convolutions: the encoder's ``quant_conv`` emits ``(mean - mu) / sigma`` and ``logvar - 2 log sigma``, and
    ``post_quant_conv`` first maps ``z' -> sigma * z' + mu``, so every image decodes as before.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("standardizing latent channels needs an AutoencoderKL with quant_conv and post_quant_conv")
    channels = vae.config.latent_channels
    flat = latents.double().transpose(0, 1).reshape(channels, -1)
    mu, sigma = flat.mean(dim=1), flat.std(dim=1)
    if not torch.all(sigma > 0):
        raise ValueError("cannot standardize latent channels: a channel is constant on these images")
    weight, bias = vae.quant_conv.weight.double(), vae.quant_conv.bias.double()
    weight[:channels] /= sigma[:, None, None, None]
    bias[:channels] = (bias[:channels] - mu) / sigma
    bias[channels:] -= 2.0 * sigma.log()
    vae.quant_conv.weight.copy_(weight), vae.quant_conv.bias.copy_(bias)
    weight, bias = vae.post_quant_conv.weight.double(), vae.post_quant_conv.bias.double()
    bias += weight[:, :, 0, 0] @ mu
    weight *= sigma[None, :, None, None]
    vae.post_quant_conv.weight.copy_(weight), vae.post_quant_conv.bias.copy_(bias)
    return vae


def read_scaling(vae: AnyVAE) -> tuple[float | None, float | None]:
    """``(scaling_factor, shift_factor)`` stated in the VAE's config, ``None`` for each one the file did not state.

    diffusers fills missing config keys with class defaults (``AutoencoderKL`` would claim SD's 0.18215) and lists
    them in ``_use_default_values``; treating those as absent is what lets callers measure instead of trusting a
    default that was never measured for this VAE. A VAE built in memory (no file) reports its values as stated.
    """
    defaulted = set(vae.config.get("_use_default_values", []))
    scale = vae.config.get("scaling_factor")
    shift = vae.config.get("shift_factor")
    scale = None if scale is None or "scaling_factor" in defaulted else float(scale)
    shift = None if shift is None or "shift_factor" in defaulted else float(shift)
    return scale, shift


def weights_fingerprint(vae: AnyVAE, samples_per_tensor: int = 4096) -> str:
    """A short stable hash of the VAE's config and weights, used to key latent caches.

    Cheap on purpose (Stable Diffusion's VAE hashes in well under a second): every tensor contributes its name, shape,
    dtype and the exact bytes of an evenly strided subset of its elements — fine-tuning moves all elements, so any real
    weight change alters the hash, while reading the whole model is not needed.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(type(vae).__name__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        subset = flat[::step].to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(subset.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
