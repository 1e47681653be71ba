"""Loading the pretrained UNet to fine-tune (a DDPMPipeline folder or Hub id, a crispdiff pipeline, a bare UNet), its
schedule and prediction type, and adapting it to the run (resolution, classes) with new parameters zero-initialised."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DModel

from crispdiff.core.errors import FlagError, PathError
from crispdiff.diffusion.schedule import make_betas
from crispdiff.pipelines.pipeline_crispdiff import class_name_list
from crispdiff.transfer.config import SCHEDULE_FIELDS, TransferConfig

logger = logging.getLogger("crispdiff")


#: diffusers beta_schedule names -> crispdiff's (the same curves; compared numerically before use).
_DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


@dataclass
class Pretrained:
    """A pretrained denoiser with what was saved around it."""

    unet: ModelMixin
    scheduler_config: dict[str, Any]
    source: str  # "DDPMPipeline", "CrispDiffPipeline", "UNet2DModel" ...
    training_config: dict[str, Any] | None = None  # crispdiff_training.json of a crispdiff pipeline
    class_names: list[str] | None = None


#: The scheduler diffusers' train_unconditional.py trains with by default: assumed for a UNet folder without one.
DDPM_DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _load_config(loader: Any, name: str, revision: str | None, subfolder: str | None = None) -> dict[str, Any] | None:
    """A config from a Hub id (or a local folder), or None when there is none there."""
    try:
        kwargs: dict[str, Any] = {"revision": revision}
        if subfolder:
            kwargs["subfolder"] = subfolder
        return dict(loader.load_config(name, **kwargs))
    except (OSError, ValueError):
        return None


def load_pretrained(name: str, revision: str | None = None) -> Pretrained:
    """The UNet, scheduler config (and class names) of a DDPMPipeline / crispdiff pipeline / bare UNet.

    Local folders and Hub ids go through the same ``from_pretrained`` / ``load_config`` calls, so a Hub id works
    wherever the Hub is reachable (``HF_HUB_OFFLINE=1`` makes an uncached id a one-line error).
    """
    from diffusers import DDPMScheduler, DiffusionPipeline

    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise PathError(f"--pretrained_model_name_or_path {path} is not a folder")
        index = _read_json(path / "model_index.json")
        unet_config = None if index else _read_json(path / "config.json")
        if index is None and unet_config is None:
            raise PathError(f"{path} holds neither model_index.json (a pipeline) nor config.json (a UNet)")
    else:
        index = _load_config(DiffusionPipeline, name, revision)
        unet_config = None if index else _load_config(UNet2DModel, name, revision)
        if index is None and unet_config is None:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise PathError(
                f"--pretrained_model_name_or_path {name!r} is neither a local folder nor a reachable Hub model{offline}"
            )

    if index is None:  # a bare UNet folder
        scheduler = None
        if path.is_dir():  # a pipeline's unet/ subfolder: its scheduler is the sibling
            scheduler = _read_json(path.parent / "scheduler" / "scheduler_config.json")
        if scheduler is None:
            logger.warning(
                "%s is a bare UNet without a scheduler: assuming diffusers' DDPM training defaults (linear betas "
                "1e-4..0.02, epsilon); pass --beta_schedule / --prediction_type if it was trained otherwise",
                name,
            )
            scheduler = dict(DDPM_DEFAULT_SCHEDULER)
        unet = _load_unet_class(unet_config or {}).from_pretrained(name, revision=revision)
        return Pretrained(unet=unet, scheduler_config=scheduler, source=str(unet_config.get("_class_name")))

    pipeline_class = index.get("_class_name")
    if isinstance(pipeline_class, (list, tuple)):  # a pipeline saved with its module: [module, class]
        pipeline_class = pipeline_class[-1]
    if index.get("vae") and index["vae"][0] is not None:
        raise FlagError(
            f"{name} is a latent pipeline ({pipeline_class} with a VAE); train_transfer fine-tunes pixel models only"
        )
    entry = index.get("unet")
    if not entry or entry[0] is None:
        raise FlagError(f"{name} ({pipeline_class}) has no unet component to fine-tune")
    library, class_name = entry
    if library == "diffusers" and class_name == "UNet2DModel":
        unet = UNet2DModel.from_pretrained(name, subfolder="unet", revision=revision)
    elif path.is_dir() and pipeline_class == "CrispDiffPipeline":  # a custom denoiser saved with its module
        from crispdiff.publish.export import load_pipeline

        unet = load_pipeline(path).unet
    else:
        raise FlagError(f"{name}: cannot fine-tune a {library}.{class_name} unet (UNet2DModel expected)")
    scheduler = _load_config(DDPMScheduler, name, revision, subfolder="scheduler")
    if scheduler is None:
        raise PathError(f"{name} ({pipeline_class}) has no scheduler config to take the noise schedule from")
    training = _read_json(path / "crispdiff_training.json") if path.is_dir() else None
    return Pretrained(
        unet=unet,
        scheduler_config=scheduler,
        source=str(pipeline_class),
        training_config=training,
        class_names=class_name_list(index.get("class_names")),  # stored as {"0": name, ...}
    )


def _load_unet_class(config: dict[str, Any]) -> type[ModelMixin]:
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise FlagError(f"a bare {class_name} folder cannot be fine-tuned here (UNet2DModel expected)")
    return UNet2DModel


def pretrained_schedule(scheduler: dict[str, Any], training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The crispdiff NoiseConfig fields that reproduce a pretrained scheduler's betas and objective.

    A diffusers scheduler names its schedule (``linear`` ...); a crispdiff pipeline stores explicit ``trained_betas``,
    which are matched against its crispdiff_training.json and then against the named schedules. Either way the
    betas are recomputed and compared, so a schedule crispdiff cannot reproduce is an error, not a silent change.
    """
    fields: dict[str, Any] = {
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "prediction_type": scheduler.get("prediction_type") or "epsilon",
        "rescale_betas_zero_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
    }
    T = fields["num_train_timesteps"]
    trained = scheduler.get("trained_betas")
    candidates: list[dict[str, Any]] = []
    if trained is None:
        name = scheduler.get("beta_schedule", "linear")
        if name not in _DIFFUSERS_SCHEDULES:
            raise FlagError(f"the pretrained scheduler's beta_schedule {name!r} is not one crispdiff can train with")
        candidates.append(
            {
                "beta_schedule": _DIFFUSERS_SCHEDULES[name],
                "beta_start": float(scheduler.get("beta_start", 1e-4)),
                "beta_end": float(scheduler.get("beta_end", 0.02)),
            }
        )
        target = make_betas(candidates[0]["beta_schedule"], T, **_beta_kwargs(candidates[0]))
    else:
        target = torch.tensor(trained, dtype=torch.float64)
        if training and training.get("beta_schedule"):
            keys = ("beta_schedule", "beta_start", "beta_end", "sigmoid_start", "sigmoid_end", "sigmoid_tau")
            candidates.append({k: training[k] for k in (*keys, "snr_shift") if k in training})
        candidates += [{"beta_schedule": s} for s in ("cosine", "sigmoid", "linear", "scaled_linear")]
    for candidate in candidates:
        try:
            betas = make_betas(candidate["beta_schedule"], T, **_beta_kwargs(candidate))
        except ValueError:
            continue
        if betas.shape == target.shape and torch.allclose(betas, target, rtol=1e-6, atol=1e-9):
            defaults = {"beta_start": 1e-4, "beta_end": 0.02}
            return {**fields, **defaults, **candidate}
    raise FlagError(
        "the pretrained scheduler's explicit trained_betas match no crispdiff schedule; pass --beta_schedule "
        "(and --beta_start/--beta_end) to fine-tune on another one"
    )


def _beta_kwargs(candidate: dict[str, Any]) -> dict[str, Any]:
    keys = ("beta_start", "beta_end", "sigmoid_start", "sigmoid_end", "sigmoid_tau", "snr_shift")
    return {k: v for k, v in candidate.items() if k in keys}


def schedule_betas(fields: dict[str, Any]) -> torch.Tensor:
    """The (un-rescaled) betas of a dict of NoiseConfig fields."""
    return make_betas(fields["beta_schedule"], fields["num_train_timesteps"], **_beta_kwargs(fields))


def resolve_schedule(config: TransferConfig, pretrained: Pretrained) -> TransferConfig:
    """``config`` with the schedule flags left at None filled from the pretrained scheduler (a new config: the run's
    resolved one); checks and warns about explicit changes.

    The pretrained values win unless a flag was given: a LoRA (or a frozen half) cannot retarget what the output
    layer means, so a prediction-type switch is refused there; with full fine-tuning it is allowed but experimental.
    """
    base = pretrained_schedule(pretrained.scheduler_config, pretrained.training_config)
    given = getattr(config, "explicit_flags", frozenset())  # flags on the command line win over the pretrained ones
    explicit = {k: getattr(config, k) for k in base if hasattr(config, k) and (k in given or k in SCHEDULE_FIELDS)}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    config = config.with_values(**{k: v for k, v in base.items() if k not in explicit and hasattr(config, k)})
    if config.prediction_type != base["prediction_type"]:
        if config.train_modules != "all" or config.freeze_encoder:
            what = "LoRA" if config.train_modules == "lora" else "a partly frozen UNet"
            raise FlagError(
                f"--prediction_type {config.prediction_type}: the pretrained model predicts {base['prediction_type']} "
                f"and {what} cannot retarget it; drop the flag or use --train_modules all without --freeze_encoder"
            )
        alpha_bar_T = torch.cumprod(1.0 - schedule_betas(base), 0)[-1]
        logger.warning(
            "experimental: switching the pretrained %s model to %s. Every output changes meaning; at t=T the "
            "pretrained x0 estimate amplifies its error by 1/alpha_T = %.0f on this schedule, where v is ~ -x0: "
            "expect the first few hundred steps to re-learn the output head",
            base["prediction_type"],
            config.prediction_type,
            1.0 / math.sqrt(float(alpha_bar_T)),
        )
    changed = {k: v for k, v in explicit.items() if k != "prediction_type" and v != base.get(k)}
    if changed:
        logger.warning("the schedule differs from the pretrained one (%s): the model must re-learn its noise levels",
                       ", ".join(f"{k}={v}" for k, v in changed.items()))  # fmt: skip
    config.check_snr_shift()  # the schedule is known only now
    return config


def attention_resolutions(config: dict[str, Any], resolution: int) -> list[str]:
    """Where a UNet2DModel config's attention layers run at this input resolution ('32x32 (down/up level 1)' ...)."""
    where: list[str] = []
    down = list(config.get("down_block_types", []))
    for level, block in enumerate(down):
        if "Attn" in block:
            size = resolution // 2**level
            where.append(f"{size}x{size} (level {level})")
    if config.get("add_attention", True) and down:
        size = resolution // 2 ** (len(down) - 1)
        where.append(f"{size}x{size} (middle block)")
    return where


def with_new_parameters(model: ModelMixin, changes: dict[str, Any]) -> tuple[ModelMixin, list[str]]:
    """``type(model).from_config(config + changes)`` carrying the pretrained weights; returns it and the new keys.

    The new parameters (those the pretrained state dict lacks) are zero-initialised: a zero class embedding adds
    nothing to the time embedding, so the adapted model starts out computing exactly what the pretrained one did.
    Any other difference between the two state dicts (an unexpected key, a missing key that is not new, a shape
    change) is an error naming the keys.
    """
    # diffusers drops every key listed in "_use_default_values" (num_class_embeds among them) in from_config, which
    # would silently build the model without the new parameters
    config = {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}
    adapted = type(model).from_config({**config, **changes})
    pretrained_state = model.state_dict()
    own = adapted.state_dict()
    reshaped = sorted(k for k in own if k in pretrained_state and own[k].shape != pretrained_state[k].shape)
    if reshaped:
        raise RuntimeError(f"the new config changes the shape of pretrained weights: {reshaped[:8]}")
    result = adapted.load_state_dict(pretrained_state, strict=False)
    new_keys = sorted(set(own) - set(pretrained_state))
    if sorted(result.missing_keys) != new_keys or result.unexpected_keys:
        raise RuntimeError(
            f"loading the pretrained weights into the adapted UNet: missing {sorted(result.missing_keys)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]} (only {new_keys} should be new)"
        )
    with torch.no_grad():
        for key in new_keys:
            own[key].zero_()  # state_dict tensors share storage with the parameters and buffers
    return adapted, new_keys


def adapt_unet(
    pretrained: ModelMixin,
    resolution: int,
    in_channels: int = 3,
    num_class_embeds: int | None = None,
    dropout: float | None = None,
) -> tuple[ModelMixin, list[str]]:
    """The pretrained UNet at ``resolution`` (and with a zero class embedding of ``num_class_embeds`` rows, and
    ``dropout`` in its ResNet blocks when given: dropout holds no weights, so the pretrained ones still fit).

    Returns the model and the names of its new (zero-initialised) parameters, which always train.
    """
    config = dict(pretrained.config)
    if config.get("in_channels", in_channels) != in_channels:
        raise FlagError(f"the pretrained UNet takes {config['in_channels']} channels, the data has {in_channels}")
    levels = len(config.get("down_block_types", [])) or 1
    if resolution % 2 ** (levels - 1):
        raise FlagError(f"--resolution {resolution} is not divisible by 2**{levels - 1}, which this UNet's levels need")
    changes: dict[str, Any] = {"sample_size": resolution}
    if dropout is not None:
        if "dropout" not in config:
            raise FlagError(f"--dropout: the pretrained {type(pretrained).__name__} has no dropout setting; drop it")
        changes["dropout"] = dropout
    existing = config.get("num_class_embeds")
    if num_class_embeds != existing:
        if existing is not None and num_class_embeds is None:
            raise FlagError(
                f"the pretrained UNet is class-conditional ({existing - 1} classes + null); pass --class_column"
            )
        if existing is not None:
            raise FlagError(
                f"the pretrained UNet has {existing} class embeddings, the data needs {num_class_embeds} "
                "(classes + null): fine-tune it on data with the same classes"
            )
        if config.get("class_embed_type") is not None:
            raise FlagError(f"the pretrained UNet's class_embed_type {config['class_embed_type']!r} is not supported")
        changes["num_class_embeds"] = num_class_embeds
    old, new = (
        attention_resolutions(config, int(config.get("sample_size") or resolution)),
        attention_resolutions(config, resolution),
    )
    if config.get("sample_size") != resolution:
        logger.info(
            "resolution %s -> %d px: attention now runs at %s (it ran at %s)",
            config.get("sample_size"),
            resolution,
            ", ".join(new) or "no level",
            ", ".join(old) or "no level",
        )
    return with_new_parameters(pretrained, changes)
