"""CrispDiffPipeline, one self-contained file past 500 lines because every saved pipeline folder carries a copy of it:
image generation from a crispdiff model (unet + scheduler [+ vae] [+ sr_model]), unconditional or class-conditional
with classifier-free guidance.

This file is self-contained on purpose: a copy of it is saved into every pipeline folder so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works on a machine that has only torch, numpy,
PIL and diffusers installed. It must therefore never import crispdiff.

Samplers are built by :func:`make_scheduler` from one explicit list of betas (``trained_betas``), so training and every
sampler agree on the noise schedule whatever scheduler class is used to sample. The config's ``beta_schedule`` (which
diffusers ignores once ``trained_betas`` is set) names those betas truthfully: see :func:`schedule_name_fields`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    ModelMixin,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

SAMPLERS = ("dpmsolver++", "ddim", "unipc", "pndm", "ddpm")
"""Names accepted by :func:`make_scheduler`, ``CrispDiffPipeline.set_sampler`` and the ``sampler`` call argument."""

PIPELINE_FILE_NAME = "pipeline_crispdiff.py"
SR_MODULE_NAME = "sr_model"
OUTPUT_TYPES = ("pil", "np", "pt")

# Below this half-log-SNR (lambda) an x0 prediction is numerically useless (alpha < 0.6 %); diffusers recommends
# clipping DPM-Solver's lambda there for the cosine schedule (see lambda_min_clipped in DPMSolverMultistepScheduler).
LAMBDA_MIN_CLIPPED = -5.1
# DDIM and PNDM step from t to t - T // steps whatever their timestep list says: other step counts are refused.
FIXED_STRIDE_SAMPLERS = ("ddim", "pndm")
_BASE_KEYS = ("num_train_timesteps", "trained_betas", "prediction_type")

#: The named schedules every diffusers sampler builds from ``beta_start`` / ``beta_end`` alone.
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: A scheduler config's ``beta_schedule`` when diffusers has no name for its betas and the caller gave no label of its
#: own: the ``trained_betas`` list itself is the schedule.
TRAINED_BETAS_SCHEDULE = "trained_betas"


# --------------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------------


def has_zero_terminal_snr(trained_betas: list[float] | np.ndarray) -> bool:
    """Whether the last beta is 1, i.e. alpha_bar(T) = 0 and the final timestep is pure noise.

    Detected from the betas themselves as well as from the ``rescale_betas_zero_snr`` flag, because the betas handed
    over by training may already be rescaled.
    """
    return float(np.asarray(trained_betas, dtype=np.float64)[-1]) >= 1.0 - 1e-9


def dpm_lambda_clip(trained_betas: list[float] | np.ndarray) -> float | None:
    """DPM-Solver's ``lambda_min_clipped`` for these betas: the clip when their tail falls below it, else ``None``.

    Decided from the betas' own log-SNR, not from a schedule's name: cosine, sigmoid or any user schedule whose last
    betas are capped (``MAX_BETA``) ends near log-SNR -10 or below without being zero-SNR, and the first step from
    there would divide by alpha ~ 0. A zero-terminal-SNR schedule is meant to start from pure noise and is not
    clipped; a schedule that never goes below the clip (e.g. DDPM's linear one) needs none.
    """
    betas = np.asarray(trained_betas, dtype=np.float64)
    if has_zero_terminal_snr(betas):
        return None
    alpha_bar_last = float(np.prod(1.0 - betas))
    half_log_snr_last = 0.5 * (np.log(alpha_bar_last) - np.log1p(-alpha_bar_last))
    return LAMBDA_MIN_CLIPPED if half_log_snr_last < LAMBDA_MIN_CLIPPED else None


def diffusers_schedule(trained_betas: list[float] | np.ndarray) -> dict[str, Any] | None:
    """The diffusers ``beta_schedule`` (with its ``beta_start`` / ``beta_end``) that rebuilds these betas, or None.

    Checked by letting diffusers build each named schedule from the betas' own ends and comparing (to float32
    precision, which is how every scheduler stores its betas), so a name written beside ``trained_betas`` is one a
    scheduler given only that name would turn into the same schedule.
    """
    betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64))
    ends = {"beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    for name in DIFFUSERS_BETA_SCHEDULES:
        rebuilt = DDPMScheduler(num_train_timesteps=len(betas), beta_schedule=name, **ends).betas.double()
        if torch.allclose(rebuilt, betas, rtol=1e-5, atol=1e-9):
            return {"beta_schedule": name, **ends}
    return None


def _diffusers_builds(name: str) -> bool:
    """Whether diffusers reads ``name`` as a schedule of its own (and would build it if the betas were dropped)."""
    try:
        DDPMScheduler(beta_schedule=name)
    except NotImplementedError:
        return False
    return True


def schedule_name_fields(base_config: dict[str, Any]) -> dict[str, Any]:
    """The ``beta_schedule`` (and ``beta_start`` / ``beta_end``) a scheduler config holding these betas states.

    diffusers ignores ``beta_schedule`` when ``trained_betas`` is set, but people (and tools that drop the betas) read
    it, so it must not name a schedule the betas do not follow: diffusers' own name when one rebuilds the betas
    (:func:`diffusers_schedule`), else ``base_config["beta_schedule"]`` when that label is not a diffusers schedule
    (crispdiff's labels read like ``crispdiff:sigmoid(start=-3, end=3, tau=1)``), else ``"trained_betas"``. A folder
    saved before this rule says ``"linear"`` whatever its betas; it is renamed the same way when loaded.
    """
    named = diffusers_schedule(base_config["trained_betas"])
    if named is not None:
        return named
    label = base_config.get("beta_schedule")
    if not label or _diffusers_builds(str(label)):
        label = TRAINED_BETAS_SCHEDULE
    return {"beta_schedule": str(label)}


def name_schedule(scheduler: Any) -> None:
    """Correct a scheduler's ``beta_schedule`` to :func:`schedule_name_fields` when it holds ``trained_betas``.

    Only the name changes (the betas, and so sampling, stay as they are); a folder saved by an older crispdiff, whose
    config says ``"linear"`` beside cosine betas, then says the truth when it is saved again.
    """
    config = getattr(scheduler, "config", None)
    if config is None or config.get("trained_betas") is None:
        return
    named = {"trained_betas": config["trained_betas"], "beta_schedule": config.get("beta_schedule")}
    fields = schedule_name_fields(named)
    if any(config.get(key) != value for key, value in fields.items()):
        scheduler.register_to_config(**fields)


def check_step_count(sampler: str, num_train_timesteps: int, num_inference_steps: int) -> None:
    """Refuse DDIM / PNDM step counts that do not divide T.

    Those samplers move the sample from t to t - T // steps but, with trailing spacing and T % steps != 0, the
    timestep list holds gaps of T // steps + 1 too: the model would be told a timestep the sample is not at.
    """
    if sampler in FIXED_STRIDE_SAMPLERS and num_train_timesteps % num_inference_steps:
        divisors = [n for n in range(1, 201) if num_train_timesteps % n == 0]
        nearest = sorted(divisors, key=lambda n: abs(n - num_inference_steps))[:2]
        raise ValueError(
            f"the {sampler!r} sampler needs a step count that divides num_train_timesteps={num_train_timesteps}; "
            f"{num_inference_steps} does not (try {' or '.join(map(str, sorted(nearest)))}), "
            "or use dpmsolver++ / unipc, which take any count"
        )


def base_config_from_scheduler(scheduler: Any) -> dict[str, Any]:
    """The sampler-independent part of a scheduler's config: T, the explicit betas, the prediction type, zero SNR and
    the schedule's name.

    Read back from whatever scheduler the pipeline holds so that switching samplers never needs anything beyond
    the saved ``scheduler/scheduler_config.json``. Falls back to the scheduler's own ``betas`` tensor when it was
    built from a named schedule rather than ``trained_betas``.
    """
    config = scheduler.config
    betas = config.get("trained_betas")
    if betas is None:
        betas = scheduler.betas.double().tolist()
    return {
        "num_train_timesteps": int(config["num_train_timesteps"]),
        "trained_betas": [float(b) for b in betas],
        "prediction_type": config.get("prediction_type", "epsilon"),
        "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "beta_schedule": config.get("beta_schedule"),
    }


def _check_base_config(base_config: dict[str, Any]) -> None:
    """Fail early, naming the missing keys, instead of inside a diffusers constructor."""
    missing = [key for key in _BASE_KEYS if base_config.get(key) is None]
    if missing:
        raise ValueError(f"scheduler base config is missing {missing}; it needs {list(_BASE_KEYS)}")
    betas = base_config["trained_betas"]
    if len(betas) != int(base_config["num_train_timesteps"]):
        raise ValueError(
            f"scheduler base config has {len(betas)} trained_betas but num_train_timesteps="
            f"{base_config['num_train_timesteps']}; they must match"
        )


def make_scheduler(
    sampler: str,
    base_config: dict[str, Any],
    *,
    thresholding: bool = False,
    latent: bool = False,
) -> Any:
    """Build the diffusers scheduler for ``sampler`` from the explicit betas in ``base_config``.

    Every sampler uses ``timestep_spacing="trailing"`` so that the first step starts at t = T-1 (the only spacing that
    reaches pure noise with few steps, Lin et al. 2023). Pixel models clip x0 predictions to [-1, 1] (DDIM/DDPM) and
    may use dynamic thresholding; latent models do neither, as latents are not bounded.

    Args:
        sampler: one of :data:`SAMPLERS`.
        base_config: ``num_train_timesteps``, ``trained_betas``, ``prediction_type`` and optionally
            ``rescale_betas_zero_snr`` and ``beta_schedule``, a label for betas diffusers has no name for (see
            ``crispdiff.diffusion.schedule.scheduler_base_config`` and :func:`schedule_name_fields`).
        thresholding: dynamic thresholding of predicted x0 (Saharia et al. 2022), pixel models only.
        latent: whether the model samples VAE latents rather than pixels.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    _check_base_config(base_config)
    prediction_type = base_config["prediction_type"]
    betas = [float(b) for b in base_config["trained_betas"]]
    zero_snr = bool(base_config.get("rescale_betas_zero_snr", False)) or has_zero_terminal_snr(betas)
    if zero_snr and prediction_type == "epsilon":
        raise ValueError(
            "prediction_type 'epsilon' cannot sample from a zero-terminal-SNR schedule: at t=T the input is pure "
            "noise, so x0 = (x - sqrt(1-alpha_bar) * eps) / sqrt(alpha_bar) divides by zero. Train with "
            "--prediction_type v_prediction, or without --rescale_betas_zero_snr."
        )
    if thresholding and latent:
        raise ValueError("thresholding clips predicted pixels to [-1, 1]; it cannot be used with a latent (VAE) model")

    common: dict[str, Any] = {
        "num_train_timesteps": int(base_config["num_train_timesteps"]),
        "trained_betas": betas,
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing",
        **schedule_name_fields(base_config),
    }
    if sampler == "pndm":
        return _make_pndm(common, zero_snr=zero_snr, thresholding=thresholding)

    common["rescale_betas_zero_snr"] = zero_snr
    common.update(thresholding=thresholding, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    if sampler == "dpmsolver++":
        clip = None if zero_snr else dpm_lambda_clip(betas)  # zero SNR wants to start from pure noise
        extra = {"lambda_min_clipped": clip} if clip is not None else {}
        # final_sigmas_type="zero" ends on a first-order (Euler) step straight to the x0 prediction, and
        # lower_order_final keeps the last steps first-order below 15 steps: both stop the second-order update from
        # amplifying errors when there are few, large steps.
        return DPMSolverMultistepScheduler(
            **common,
            **extra,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=False,
            final_sigmas_type="zero",
        )
    if sampler == "unipc":
        return UniPCMultistepScheduler(
            **common,
            solver_order=2,
            predict_x0=True,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    if sampler == "ddim":
        return DDIMScheduler(
            **common, clip_sample=not latent, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0
        )
    return DDPMScheduler(**common, clip_sample=not latent, clip_sample_range=1.0, variance_type="fixed_small")


def _make_pndm(common: dict[str, Any], *, zero_snr: bool, thresholding: bool) -> PNDMScheduler:
    """PLMS (PNDM without Runge-Kutta warm-up), refusing the configurations it cannot sample."""
    if zero_snr:
        raise ValueError(
            "the 'pndm' sampler cannot be used with a zero-terminal-SNR schedule (rescale_betas_zero_snr): its update "
            "divides by sqrt(alpha_bar(T)) = 0. Use --sampler dpmsolver++, ddim, unipc or ddpm."
        )
    if common["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"the 'pndm' sampler supports prediction_type 'epsilon' or 'v_prediction', not "
            f"{common['prediction_type']!r}; use another sampler"
        )
    if thresholding:
        logger.warning("the 'pndm' sampler has no dynamic thresholding; sampling without it")
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0)


# --------------------------------------------------------------------------------------------------------------------
# Post-processing (torch, on [0, 1] NCHW images)
# --------------------------------------------------------------------------------------------------------------------


def class_name_list(class_names: list[str] | dict[str, str] | None) -> list[str] | None:
    """Class names as a list in id order, from a list or from the ``{"0": name, ...}`` form saved in the config."""
    if class_names is None:
        return None
    if isinstance(class_names, dict):
        try:
            return [str(class_names[str(i)]) for i in range(len(class_names))]
        except KeyError as err:
            raise ValueError(
                f"class_names must map the ids 0..{len(class_names) - 1} to names, got {class_names}"
            ) from err
    names = [str(name) for name in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    return names


def class_mix_list(class_mix: list[float] | dict[str, float] | None) -> list[float] | None:
    """Class shares as a list in id order, from a list or from the ``{"0": share, ...}`` form saved in the config."""
    if class_mix is None:
        return None
    if isinstance(class_mix, dict):
        class_mix = [class_mix[str(i)] for i in range(len(class_mix))]
    shares = [float(share) for share in class_mix]
    if not shares or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"class_mix must be non-negative shares with a positive sum, got {shares}")
    return shares


def timestep_sigmas(scheduler: Any) -> torch.Tensor:
    """Noise-to-signal ratio ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` of every training timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
    return ((1.0 - alphas_cumprod) / alphas_cumprod.clamp_min(1e-20)).sqrt()


def in_interval(sigma: torch.Tensor | float, interval: tuple[float, float] | list[float] | None) -> bool:
    """Whether noise level ``sigma`` lies in ``(low, high]`` (None: every level)."""
    if interval is None:
        return True
    low, high = interval
    return low < float(sigma) <= high


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding (works for images smaller than the kernel too)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(device=images.device, dtype=images.dtype)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def unsharp_mask(images01: torch.Tensor, amount: float, radius: float = 1.0, threshold: float = 0.0) -> torch.Tensor:
    """Add ``amount`` x (image - Gaussian blur) where the detail is at least ``threshold`` (in [0, 1] units).

    The classic darkroom sharpen: it boosts edges without touching flat areas, and the threshold keeps it from
    amplifying low-amplitude noise. ``amount == 0`` returns the input unchanged.
    """
    if amount == 0:
        return images01
    detail = images01 - gaussian_blur(images01, radius)
    if threshold > 0:
        detail = detail * (detail.abs() >= threshold).to(detail.dtype)
    return (images01 + amount * detail).clamp(0.0, 1.0)


def apply_gamma(images01: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x ** (1 / gamma)``: gamma > 1 brightens mid-tones, < 1 darkens them, 0 and 1 stay put; 1 is the identity."""
    if gamma == 1:
        return images01
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return images01.clamp(0.0, 1.0) ** (1.0 / gamma)


def _resize(images01: torch.Tensor, output_size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize, used for ``output_size`` when no SR model upscales."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return F.interpolate(images01, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """A temp file, fsynced, given the permissions ``open()`` would give (mkstemp's are 0600), renamed into place,
    then the folder fsynced (the rename itself): a crash or power cut leaves the old index or the new one, whole.

    crispdiff's own ``core.io`` does this for everything else; this file must load without crispdiff installed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # some filesystems (and Windows) cannot open or fsync a folder; the file itself is synced
        folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def _save_component_module(folder: Path, component: str, model: Any, module_name: str | None = None) -> list[str]:
    """Copy a custom component's module into ``folder/component/`` and return its model_index entry.

    diffusers imports a custom component's module (with ``trust_remote_code=True``) only from the component's own
    folder, so the file has to travel there; the module name defaults to the source file's own name.
    """
    source = inspect.getsourcefile(type(model))
    if source is None:
        raise ValueError(f"cannot find the source file of {type(model)!r} to save with the pipeline")
    module_name = module_name or Path(source).stem
    destination = folder / component / f"{module_name}.py"
    destination.parent.mkdir(exist_ok=True)
    if not (destination.exists() and os.path.samefile(source, destination)):
        shutil.copyfile(source, destination)
    return [module_name, type(model).__name__]


# --------------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------------


class CrispDiffPipeline(DiffusionPipeline):
    """Image generation: noise -> unet/scheduler loop -> [vae decode] -> [SR upscale] -> [sharpen, gamma].

    Unconditional, or class-conditional with classifier-free guidance when the unet has a class embedding
    (``num_class_embeds`` = N classes + 1; id N is the null class the model was trained on with label dropout).

    Components: ``unet`` (UNet2DModel), ``scheduler`` (built by :func:`make_scheduler`), optional ``vae``
    (AutoencoderKL / AutoencoderTiny, for latent models) and optional ``sr_model`` (any ModelMixin with
    ``upscale(images01, sr_strength=..., output_size=...)``). The remaining ``__init__`` arguments are stored in the
    pipeline config (model_index.json) and come back on ``from_pretrained``.

    Args:
        sampler: name of the sampler ``scheduler`` was built for (one of :data:`SAMPLERS`).
        beta_schedule: the schedule the betas came from in crispdiff's words with its parameters (``cosine``,
            ``cosine(snr_shift=-1)``, ``sigmoid(start=-3, end=3, tau=1)`` ...), for people reading the config (samplers
            derive everything from the betas themselves; the scheduler config names them in diffusers' terms).
        thresholding: dynamic thresholding when switching samplers (pixel models only; ignored with a vae).
        latent_scaling_factor, latent_shift_factor: latents are decoded as ``vae.decode(z / scale + shift)``; stored
            here because crispdiff may measure them on the data instead of trusting the VAE config (None = VAE config).
        upscale: whether calls upscale with ``sr_model`` by default (None = whenever an sr_model is present).
        sr_strength: default blend of the SR output with a Lanczos upscale (0 = Lanczos only, 1 = SR only).
        sharpen_amount, sharpen_radius, sharpen_threshold: unsharp mask after decoding/SR (amount 0 = off).
        upscale_sharpen_amount: the unsharp amount after the SR step, when it differs from ``sharpen_amount`` (None =
            the same). Upscaled output has its own sharpness: how much detail the SR step restores depends on the
            samples and on the data's design, so crispdiff calibrates this one against the data at the output size.
        gamma: output gamma, ``x ** (1/gamma)`` (1 = off).
        class_names: a class-conditional unet's class names in id order (a list; stored in model_index.json as
            ``{"0": name, ...}``, because diffusers reads any list there as a ``[library, class]`` component entry
            and then refuses to download the folder from the Hub). See :attr:`classes`.
        class_mix: each class's share of the training images, in id order (stored like ``class_names``). When set
            (models trained on ``--class_column auto`` clusters, which the user never named), a call without
            ``class_labels`` draws each image's class from this mix and samples it with guidance; without it such a
            call samples the null class.
        guidance_min_sigma, guidance_max_sigma: the default guidance interval: classifier-free guidance applies only
            at noise levels ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` in ``(min, max]`` (Kynkaanniemi et
            al. 2024); the other steps run the conditional model alone. Guidance at the noisiest steps pulls every
            sample of a class towards one layout and at the cleanest ones adds nothing; None = no limit.
        autoguidance_scale: the default strength of autoguidance with ``guide_unet`` (1 = off), see ``__call__``.
    """

    model_cpu_offload_seq = "unet->guide_unet->vae->sr_model"
    _optional_components = ["vae", "sr_model", "guide_unet"]

    def __init__(
        self,
        unet: ModelMixin,  # UNet2DModel, or a custom denoiser with its signature (TimmEncoderUNet)
        scheduler: Any,
        vae: AutoencoderKL | AutoencoderTiny | None = None,
        sr_model: ModelMixin | None = None,
        sampler: str = "dpmsolver++",
        beta_schedule: str | None = None,
        thresholding: bool = False,
        latent_scaling_factor: float | None = None,
        latent_shift_factor: float | None = None,
        upscale: bool | None = None,
        sr_strength: float = 0.5,
        sharpen_amount: float = 0.0,
        sharpen_radius: float = 1.0,
        sharpen_threshold: float = 0.0,
        gamma: float = 1.0,
        class_names: list[str] | dict[str, str] | None = None,
        guidance_scale: float = 1.0,
        class_mix: list[float] | dict[str, float] | None = None,
        guidance_min_sigma: float | None = None,
        guidance_max_sigma: float | None = None,
        guide_unet: ModelMixin | None = None,
        autoguidance_scale: float = 1.0,
        upscale_sharpen_amount: float | None = None,
    ):
        super().__init__()
        names = class_name_list(class_names)
        num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        if names is not None and num_class_embeds != len(names) + 1:
            raise ValueError(
                f"{len(names)} class_names need a unet with num_class_embeds = {len(names) + 1} (the classes and the "
                f"null class), but this unet has {num_class_embeds}"
            )
        mix = class_mix_list(class_mix)
        if mix is not None and num_class_embeds != len(mix) + 1:
            raise ValueError(
                f"a class_mix of {len(mix)} classes needs a unet with num_class_embeds = {len(mix) + 1}, but this unet "
                f"has {num_class_embeds}"
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if thresholding and vae is not None:
            logger.warning(
                "thresholding clips pixels to [-1, 1] and does not apply to a latent (vae) model; ignoring it"
            )
            thresholding = False
        if guide_unet is not None and getattr(guide_unet.config, "num_class_embeds", None) != num_class_embeds:
            raise ValueError("guide_unet must take the same class labels as unet (num_class_embeds differs)")
        name_schedule(scheduler)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, sr_model=sr_model, guide_unet=guide_unet)
        self.register_to_config(
            sampler=sampler,
            beta_schedule=beta_schedule,
            thresholding=bool(thresholding),
            latent_scaling_factor=latent_scaling_factor,
            latent_shift_factor=latent_shift_factor,
            upscale=(sr_model is not None) if upscale is None else bool(upscale),
            sr_strength=float(sr_strength),
            sharpen_amount=float(sharpen_amount),
            sharpen_radius=float(sharpen_radius),
            sharpen_threshold=float(sharpen_threshold),
            gamma=float(gamma),
            class_names=None if names is None else {str(i): name for i, name in enumerate(names)},
            guidance_scale=float(guidance_scale),
            class_mix=None if mix is None else {str(i): share for i, share in enumerate(mix)},
            guidance_min_sigma=None if guidance_min_sigma is None else float(guidance_min_sigma),
            guidance_max_sigma=None if guidance_max_sigma is None else float(guidance_max_sigma),
            autoguidance_scale=float(autoguidance_scale),
            upscale_sharpen_amount=None if upscale_sharpen_amount is None else float(upscale_sharpen_amount),
        )

    @property
    def classes(self) -> list[str] | None:
        """The class names in id order (``pipe(class_labels=name)`` accepts them), or None."""
        return class_name_list(self.config.get("class_names"))

    @property
    def default_guidance_interval(self) -> tuple[float, float] | None:
        """``(min sigma, max sigma)`` saved with the pipeline (None: guidance at every step)."""
        low, high = self.config.get("guidance_min_sigma"), self.config.get("guidance_max_sigma")
        if low is None and high is None:
            return None
        return (0.0 if low is None else float(low), math.inf if high is None else float(high))

    @property
    def class_mix(self) -> list[float] | None:
        """Each class's share in id order, which calls without labels sample from (None: they sample the null class)."""
        return class_mix_list(self.config.get("class_mix"))

    # ---- loading / saving ----------------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """Read model_index.json, pointing ``_class_name`` at this class when it is the one the folder names.

        A saved folder records ``["pipeline_crispdiff", "CrispDiffPipeline"]`` so that ``DiffusionPipeline`` loads
        the copy of this file inside it. When the caller already holds the class (``CrispDiffPipeline.from_pretrained``)
        diffusers would still import that copy (and demand ``trust_remote_code``); reporting the plain class name
        makes it use ``cls`` instead. ``DiffusionPipeline.load_config`` is untouched.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)) and class_name and class_name[-1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save like diffusers, then make the folder self-describing: this file, and the SR component's module.

        ``model_index.json`` gets ``_class_name = ["pipeline_crispdiff", "CrispDiffPipeline"]`` (diffusers imports the
        copy saved beside it with ``trust_remote_code=True``) and, with an SR model, ``sr_model =
        ["sr_model", <class>]`` with the module copied to ``sr_model/sr_model.py``: diffusers only imports a custom
        component's module from the component's own folder. A unet that is not a diffusers class (the timm-encoder
        UNet) is saved the same way: ``unet = ["timm_unet", "TimmEncoderUNet"]`` with ``unet/timm_unet.py``.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "CrispDiffPipeline.save_pretrained(push_to_hub=True) would upload before the folder is complete; "
                "save first, then upload the folder (crispdiff's hub upload does this)"
            )
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        shutil.copyfile(Path(__file__).resolve(), folder / PIPELINE_FILE_NAME)

        index_path = folder / self.config_name
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_FILE_NAME[: -len(".py")], type(self).__name__]
        if self.sr_model is not None:
            index["sr_model"] = _save_component_module(folder, "sr_model", self.sr_model, SR_MODULE_NAME)
        if not type(self.unet).__module__.startswith("diffusers."):  # e.g. TimmEncoderUNet (timm_unet.py)
            index["unet"] = _save_component_module(folder, "unet", self.unet)
        _write_json_atomic(index_path, index)

    # ---- samplers -------------------------------------------------------------------------------------------------

    def make_sampler(self, sampler: str) -> Any:
        """A fresh scheduler for ``sampler`` with the same betas / prediction type as the current one."""
        return make_scheduler(
            sampler,
            base_config_from_scheduler(self.scheduler),
            thresholding=self.config.thresholding,
            latent=self.vae is not None,
        )

    def set_sampler(self, sampler: str) -> None:
        """Switch the pipeline's scheduler to ``sampler`` (recorded in the config, so it is saved as the default)."""
        self.scheduler = self.make_sampler(sampler)
        self.register_to_config(sampler=sampler)

    # ---- generation -----------------------------------------------------------------------------------------------

    def _sample_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """(B, C, H, W) of the unet's input, from its config."""
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet.config.sample_size is not set; the pipeline cannot tell what size to sample")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, int(self.unet.config.in_channels), int(height), int(width))

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Initial noise (float32 on ``device``), drawn on the generator's device (CPU by default).

        Drawing on the CPU makes a seed give the same images on any accelerator.
        """
        shape = self._sample_shape(batch_size)
        if latents is None:
            first = generator[0] if isinstance(generator, list) else generator
            noise_device = first.device if first is not None else torch.device("cpu")
            latents = randn_tensor(shape, generator=generator, device=noise_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=torch.float32)

    def resolve_class_labels(
        self, class_labels: Any, batch_size: int, device: torch.device, generator: Any = None
    ) -> torch.Tensor | None:
        """``class_labels`` as a LongTensor of ``batch_size`` ids (None for an unconditional unet).

        Accepts an id, a class name, or a list / tensor of them (one per image; a single label is used for every
        image). Id N (= ``num_class_embeds - 1``) is the null class. A class-conditional unet called without labels
        samples the stored :attr:`class_mix` (drawn from ``generator``, one draw per image's generator when given a
        list), or the null class (unconditionally) when there is none; an unconditional unet refuses labels.
        """
        num_class_embeds = getattr(self.unet.config, "num_class_embeds", None)
        if num_class_embeds is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given but this pipeline's unet is unconditional (no class embedding); "
                    "call it without class_labels"
                )
            return None
        null_id = int(num_class_embeds) - 1
        if class_labels is None:
            if self.class_mix is not None:
                return self.draw_class_labels(batch_size, generator).to(device)
            return torch.full((batch_size,), null_id, dtype=torch.long, device=device)
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            items = [int(v) for v in np.asarray(torch.as_tensor(class_labels).cpu()).reshape(-1)]
        elif isinstance(class_labels, (list, tuple)):
            items = list(class_labels)
        else:
            items = [class_labels]
        if len(items) == 1:
            items = items * batch_size
        if len(items) != batch_size:
            raise ValueError(f"got {len(items)} class_labels for a batch of {batch_size}; give one, or one per image")
        return torch.tensor([self._class_id(item, null_id) for item in items], dtype=torch.long, device=device)

    def draw_class_labels(self, batch_size: int, generator: Any = None) -> torch.Tensor:
        """``batch_size`` class ids drawn from :attr:`class_mix` (one draw per generator when given a list).

        Drawn after the initial noise, so the noise a seed gives does not depend on whether the model has a mix.
        """
        shares = torch.tensor(self.class_mix, dtype=torch.float64)
        if isinstance(generator, list):
            return torch.cat([torch.multinomial(shares.to(g.device), 1, generator=g).cpu() for g in generator])
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.multinomial(shares.to(device), batch_size, replacement=True, generator=generator).cpu()

    def _class_id(self, label: Any, null_id: int) -> int:
        """One label -> its id: a name looked up in :attr:`classes`, or an int in 0..N (N = the null class)."""
        names = self.classes
        if isinstance(label, str):
            if names is None:
                raise ValueError(f"class label {label!r} is a name but this pipeline stores no class names; pass ids")
            if label not in names:
                raise ValueError(f"unknown class {label!r}; this pipeline's classes are {names}")
            return names.index(label)
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"a class label must be a class name or an int id, got {label!r}")
        if not 0 <= int(label) <= null_id:
            raise ValueError(f"class id {int(label)} is out of range: 0..{null_id - 1}, or {null_id} for no class")
        return int(label)

    def _denoise(
        self,
        scheduler: Any,
        sample: torch.Tensor,
        num_inference_steps: int,
        generator: Any,
        device: torch.device,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        autoguidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The sampling loop; the sample stays in float32 whatever the unet's dtype.

        With ``guidance_scale != 1`` each step in the guidance interval is one unet call on the batch twice over
        (conditional, then null labels) combined as ``uncond + s * (cond - uncond)`` (Ho & Salimans 2022): one
        call of twice the batch costs less than two calls. With ``autoguidance_scale != 1`` each step in the same
        interval also asks ``guide_unet`` (a weaker version of the model) for its prediction under the same labels and
        adds ``(w - 1) * (cond - guide)`` (Karras et al. 2024): the difference points away from the mistakes a weaker
        model makes, and needs no labels. Labels are passed only when there are any, so unconditional unets keep
        their plain ``unet(x, t)`` call.
        """
        null_id = None if class_labels is None else int(self.unet.config.num_class_embeds) - 1
        guided = class_labels is not None and guidance_scale != 1.0 and bool((class_labels != null_id).any())
        both = None if not guided else torch.cat([class_labels, torch.full_like(class_labels, null_id)])
        autoguided = autoguidance_scale != 1.0
        if autoguided and self.guide_unet is None:
            raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide_unet; this pipeline has none")
        scheduler.set_timesteps(num_inference_steps, device=device)
        noise_levels = timestep_sigmas(scheduler)
        sample = sample * scheduler.init_noise_sigma
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        if isinstance(scheduler, DDIMScheduler) and scheduler.config.clip_sample:
            # keep the noise estimate consistent with the clipped x0, or every step re-injects the clipped excess
            step_kwargs["use_clipped_model_output"] = True
        label_kwargs = {} if class_labels is None else {"class_labels": class_labels}
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(sample, t).to(self.unet.dtype)
            guide = guided and in_interval(noise_levels[int(t)], guidance_interval)
            labels = both if guide else class_labels
            unet_kwargs = {} if labels is None else {"class_labels": labels}
            batch = torch.cat([model_input, model_input]) if guide else model_input
            model_output = self.unet(batch, t, **unet_kwargs).sample.float()
            if guide:
                cond, uncond = model_output.chunk(2)
                model_output = uncond + guidance_scale * (cond - uncond)
            else:
                cond = model_output
            if autoguided and in_interval(noise_levels[int(t)], guidance_interval):
                weak = self.guide_unet(model_input.to(self.guide_unet.dtype), t, **label_kwargs).sample.float()
                model_output = model_output + (autoguidance_scale - 1.0) * (cond - weak)
            sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
        return sample

    def latent_scaling(self) -> tuple[float, float]:
        """``(scale, shift)`` that :meth:`decode` undoes (``z / scale + shift``): the pipeline config's, else the VAE
        config's, else ``(1, 0)``; the one place they are read, so an export folds the same values decode uses."""
        scale = self.config.latent_scaling_factor
        if scale is None:
            scale = getattr(self.vae.config, "scaling_factor", None) or 1.0
        shift = self.config.latent_shift_factor
        if shift is None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return scale, shift

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """Model output -> [0, 1] RGB images: VAE-decode latents (``z / scale + shift``), or read pixels directly."""
        if self.vae is not None:
            scale, shift = self.latent_scaling()
            latents = sample / scale + shift
            sample = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        images01 = (sample / 2 + 0.5).clamp(0.0, 1.0)
        if images01.shape[1] == 1:
            images01 = images01.expand(-1, 3, -1, -1)
        if images01.shape[1] != 3:
            raise ValueError(f"the model produced {images01.shape[1]} channels; CrispDiffPipeline outputs RGB (3)")
        return images01

    def _resolve_upscale(self, upscale: bool | None) -> bool:
        """Call argument > config default; asking for SR explicitly without an sr_model is an error."""
        if upscale is None:
            return bool(self.config.upscale) and self.sr_model is not None
        if upscale and self.sr_model is None:
            raise ValueError("upscale=True but this pipeline has no sr_model component")
        return bool(upscale)

    def default_sharpen_amount(self, upscaled: bool = False) -> float:
        """The unsharp amount a call applies when it names none: ``upscale_sharpen_amount`` on the SR step's output
        where the config sets it, else ``sharpen_amount``."""
        amount = self.config.get("upscale_sharpen_amount") if upscaled else None
        return float(self.config.sharpen_amount if amount is None else amount)

    def postprocess(
        self,
        images01: torch.Tensor,
        sharpen_amount: float | None = None,
        sharpen_radius: float | None = None,
        sharpen_threshold: float | None = None,
        gamma: float | None = None,
        upscaled: bool = False,
    ) -> torch.Tensor:
        """Unsharp mask, then gamma; arguments default to the pipeline config (both off unless configured).

        ``upscaled`` images (the SR step's output) default to the config's ``upscale_sharpen_amount`` where it is set.
        """
        amount = self.default_sharpen_amount(upscaled) if sharpen_amount is None else sharpen_amount
        radius = self.config.sharpen_radius if sharpen_radius is None else sharpen_radius
        threshold = self.config.sharpen_threshold if sharpen_threshold is None else sharpen_threshold
        images01 = unsharp_mask(images01, amount, radius, threshold)
        return apply_gamma(images01, self.config.gamma if gamma is None else gamma)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: str | None = None,
        upscale: bool | None = None,
        sr_strength: float | None = None,
        output_size: int | tuple[int, int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        sharpen_amount: float | None = None,
        sharpen_radius: float | None = None,
        sharpen_threshold: float | None = None,
        gamma: float | None = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        autoguidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images.

        Args:
            batch_size: number of images (ignored when ``latents`` is given).
            num_inference_steps: sampler steps.
            generator: a ``torch.Generator`` (or one per image) for reproducible noise; CPU generators give the same
                images on every device.
            sampler: sample with this sampler for this call only (default: the pipeline's scheduler).
            upscale, sr_strength: SR with ``sr_model`` (defaults from the config).
            output_size: final size; passed to the SR model, or a bicubic resize when not upscaling.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (NHWC float32 in [0, 1]) or ``"pt"``
                (NCHW float in [0, 1]).
            latents: initial noise of the unet's input shape, instead of drawing it.
            sharpen_amount, sharpen_radius, sharpen_threshold, gamma: override the config's post-processing (the
                amount also overrides ``upscale_sharpen_amount`` on upscaled output).
            class_labels: for a class-conditional model: a class name or id, or one per image (names: :attr:`classes`).
                Without them a model with a stored :attr:`class_mix` (auto classes) draws each image's class from it;
                any other conditional model samples its null class, i.e. unconditionally (the saved guidance scale
                does not apply, and an explicit ``guidance_scale`` other than 1 is refused: there is no class to
                guide towards). An unconditional model refuses them.
            guidance_interval: ``(min sigma, max sigma)``: guide (classifier-free and autoguidance) only at noise levels
                in that range (default: the pipeline's ``guidance_min_sigma`` / ``guidance_max_sigma``; ``(0, inf)``
                guides every step).
            guidance_scale: classifier-free guidance strength s: 1 = the conditional model alone (one unet pass);
                s > 1 pushes samples towards their class, ``uncond + s * (cond - uncond)`` (two passes in one batch).
                Default: the scale the model was saved with (``config.guidance_scale``; 1.0 for folders without one),
                used only when there are class labels (given, or drawn from :attr:`class_mix`).
            autoguidance_scale: autoguidance strength w with ``guide_unet``, a weaker version of the model: each step
                in the guidance interval adds ``(w - 1) * (cond - guide)``; 1 = off. Works with or without class
                labels, on top of classifier-free guidance. Default: the scale the model was saved with
                (``config.autoguidance_scale``).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if latents is not None:
            batch_size = latents.shape[0]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        do_upscale = self._resolve_upscale(upscale)
        device = self._execution_device
        scheduler = self.scheduler if sampler is None else self.make_sampler(sampler)
        check_step_count(sampler or self.config.sampler, scheduler.config.num_train_timesteps, num_inference_steps)

        sample = self.prepare_latents(batch_size, generator, latents, device)
        labels = self.resolve_class_labels(class_labels, batch_size, device, generator)
        labelled = class_labels is not None or (labels is not None and self.class_mix is not None)
        if guidance_scale is None:
            guidance_scale = float(self.config.get("guidance_scale", 1.0)) if labelled else 1.0
        if labels is None and guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model; this unet is not one")
        if not labelled and guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs class_labels: this model stores no class_mix to draw them "
                "from, so a call without labels samples its null class and guidance would change nothing; pass "
                f"class_labels (a class name or id, or one per image; names: {self.classes})"
            )
        if guidance_interval is None:
            guidance_interval = self.default_guidance_interval
        if autoguidance_scale is None:
            saved = float(self.config.get("autoguidance_scale", 1.0))
            autoguidance_scale = saved if self.guide_unet is not None else 1.0
        sample = self._denoise(
            scheduler,
            sample,
            num_inference_steps,
            generator,
            device,
            labels,
            guidance_scale,
            guidance_interval,
            autoguidance_scale,
        )
        images01 = self.decode(sample)
        if do_upscale:
            strength = self.config.sr_strength if sr_strength is None else sr_strength
            sr_input = images01.to(getattr(self.sr_model, "dtype", images01.dtype))
            images01 = self.sr_model.upscale(sr_input, sr_strength=strength, output_size=output_size)
            images01 = images01.float().clamp(0.0, 1.0)
        elif output_size is not None:
            images01 = _resize(images01, output_size)
        images01 = self.postprocess(
            images01, sharpen_amount, sharpen_radius, sharpen_threshold, gamma, upscaled=bool(do_upscale)
        )

        self.maybe_free_model_hooks()
        if output_type == "pt":
            images: Any = images01
        else:
            array = images01.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            images = array if output_type == "np" else self.numpy_to_pil(array)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = [
    "SAMPLERS",
    "CrispDiffPipeline",
    "apply_gamma",
    "base_config_from_scheduler",
    "check_step_count",
    "class_mix_list",
    "class_name_list",
    "diffusers_schedule",
    "dpm_lambda_clip",
    "gaussian_blur",
    "has_zero_terminal_snr",
    "make_scheduler",
    "name_schedule",
    "schedule_name_fields",
    "unsharp_mask",
]
