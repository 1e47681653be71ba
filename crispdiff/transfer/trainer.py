"""Fine-tuning a pretrained UNet (e.g. google/ddpm-cifar10-32) on small data: full, decoder-only or LoRA.

Why a separate entry point rather than a flag of ``train_unconditional.py``: a pretrained model brings its own
architecture *and* its own noise schedule and prediction type. crispdiff's defaults (cosine, v-prediction) are right
for a model trained from scratch and wrong for one that learned to predict epsilon on linear betas, so here every
schedule flag defaults to "whatever the pretrained scheduler says" and only an explicit flag changes it.

What happens to the pretrained network:

* the resolution may change (``sample_size`` in the config; the weights are convolutional, so nothing else moves),
  which moves every attention layer to a larger feature map: the log says where attention runs now;
* new parameters (a class embedding for ``--class_column``) are created with ``from_config`` + ``load_state_dict(
  strict=False)``, zero-initialised so the model starts exactly where the pretrained one was, and the missing keys
  are checked to be exactly the new ones (``from_pretrained`` with extra config kwargs leaves them uninitialised in
  diffusers 0.42);
* ``--train_modules`` picks what trains: everything, the decoder half only, or LoRA adapters injected with peft
  directly (``UNet2DModel`` has no ``PeftAdapterMixin``). The saved pipeline always holds a plain ``UNet2DModel``
  with the adapters merged, so it loads anywhere; ``--save_lora_adapter`` also writes the adapter itself.

The training loop is crispdiff's own ``Trainer`` (EMA, exact resume, checkpoints, validation, export): this module
only prepares the UNet and the list of trainable parameters it gets.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import ModelMixin, UNet2DModel
from diffusers.training_utils import EMAModel

from crispdiff.core.config import TrainConfig, flag
from crispdiff.core.errors import FlagError, PathError
from crispdiff.core.io import write_atomic, write_text_atomic
from crispdiff.diffusion.schedule import make_betas
from crispdiff.diffusion.unets import count_parameters, describe_parameters
from crispdiff.pipelines.pipeline_crispdiff import class_name_list
from crispdiff.train.loop import run_trainer, start_run
from crispdiff.train.lora import (
    UNET2D_LORA_PRESETS,
    adapter_config,
    expand_targets,
    has_adapters,
    inject_lora,
    load_lora_config,
    lora_state,
)
from crispdiff.train.unet_trainer import PixelSpace, Trainer, TrainingSpace, check_output_dir

logger = logging.getLogger("crispdiff")

TRAIN_MODULES = ("all", "decoder", "lora")

#: The adapter files ``--save_lora_adapter`` writes (peft's names), in OUTPUT_DIR/lora_adapter.
ADAPTER_FOLDER = "lora_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

#: Parts of a UNet2DModel that the "encoder" (frozen by --freeze_encoder) and "decoder" (--train_modules decoder) are.
ENCODER_PREFIXES = ("conv_in.", "down_blocks.")
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")

#: Schedule fields that default to the pretrained scheduler's values (None on the command line = "from there").
SCHEDULE_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "rescale_betas_zero_snr",
)

#: diffusers beta_schedule names -> crispdiff's (the same curves; compared numerically before use).
_DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


@dataclass
class TransferConfig(TrainConfig):
    """Everything `train_scripts/train_transfer.py` accepts: the training flags plus the pretrained model's."""

    pretrained_model_name_or_path: str | None = flag(
        None,
        "The pretrained model (required): a diffusers DDPMPipeline folder or Hub id (google/ddpm-cifar10-32), a "
        "crispdiff pipeline folder, or a bare UNet2DModel folder.",
    )
    revision: str | None = flag(None, "Revision (branch, tag or commit) of a Hub model.")
    train_modules: str = flag(
        "all",
        "What trains: 'all' (every weight), 'decoder' (up blocks and output layers; the encoder, middle block and "
        "time embedding stay as pretrained) or 'lora' (low-rank adapters, merged into the saved UNet).",
        choices=list(TRAIN_MODULES),
    )
    freeze_encoder: bool = flag(False, "With --train_modules all: keep conv_in and the down blocks as pretrained.")
    lora_rank: int = flag(8, "LoRA rank.")
    lora_alpha: float | None = flag(None, "LoRA alpha (scale = alpha / rank; default: the rank, i.e. scale 1).")
    lora_target_modules: list[str] = flag(
        ["attention", "conv"],
        "Modules that get LoRA: presets 'attention' (to_q/k/v/out; in ddpm-cifar10 that hits just 3 places: one "
        "down level, one up level and the middle block), 'resnet' (the 3x3 convolutions of every ResNet block), "
        "'conv' (those, the 1x1 shortcuts and the down/up samplers), 'time' (each block's time projection), or "
        "module names.",
    )
    save_lora_adapter: bool = flag(
        False, f"With --train_modules lora: also write OUTPUT_DIR/{ADAPTER_FOLDER} (the EMA adapter, safetensors)."
    )
    # The schedule and objective come from the pretrained scheduler unless given explicitly.
    num_train_timesteps: int | None = flag(None, "T (default: the pretrained scheduler's).")
    beta_schedule: str | None = flag(
        None,
        "Noise schedule (default: the pretrained scheduler's; another one retrains the model's noise levels).",
        choices=["linear", "scaled_linear", "cosine", "sigmoid"],
    )
    beta_start: float | None = flag(None, "First beta of linear schedules (default: the pretrained scheduler's).")
    beta_end: float | None = flag(None, "Last beta of linear schedules (default: the pretrained scheduler's).")
    rescale_betas_zero_snr: bool | None = flag(
        None, "Rescale the schedule to zero terminal SNR (default: as the pretrained scheduler does)."
    )
    prediction_type: str | None = flag(
        None,
        "What the UNet predicts (default: the pretrained scheduler's). Switching it (e.g. epsilon -> v_prediction) "
        "is experimental and needs --train_modules all without --freeze_encoder.",
        choices=["epsilon", "v_prediction", "sample"],
    )
    # fine-tuning defaults
    output_dir: str = flag("crispdiff-transfer", "Where checkpoints, logs, samples and the saved model go.")
    learning_rate: float = flag(1e-4, "Peak learning rate (fine-tuning wants less than training from scratch).")
    lr_warmup_steps: int = flag(100, "Linear warmup steps.")
    ema_power: float = flag(2 / 3, "EMA warmup power (2/3 suits the shorter runs of fine-tuning).")

    def validate(self) -> None:
        super().validate()
        if not self.pretrained_model_name_or_path:
            raise FlagError("--pretrained_model_name_or_path is required (a DDPMPipeline / crispdiff / UNet folder)")
        if self.lora_rank < 1:
            raise FlagError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if self.freeze_encoder and self.train_modules != "all":
            raise FlagError(f"--freeze_encoder goes with --train_modules all, not {self.train_modules}")
        if self.save_lora_adapter and self.train_modules != "lora":
            raise FlagError("--save_lora_adapter needs --train_modules lora")
        if self.model_config_name_or_path or self.encoder or self.encoder_weights:
            raise FlagError(
                "--model_config_name_or_path / --encoder / --encoder_weights do not apply: the architecture is the "
                "pretrained model's (train a timm-encoder UNet with train_unconditional.py or train_latent.py)"
            )

    def lora_targets(self) -> list[str]:
        """The module names peft gets (presets expanded)."""
        return expand_targets(self.lora_target_modules, UNET2D_LORA_PRESETS)


# ----------------------------------------------------------------------------------------------------------------------
# Loading the pretrained model and its schedule
# ----------------------------------------------------------------------------------------------------------------------


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


def resolve_schedule(config: TransferConfig, pretrained: Pretrained) -> None:
    """Fill the schedule flags left at None from the pretrained scheduler; check and warn about explicit changes.

    The pretrained values win unless a flag was given: a LoRA (or a frozen half) cannot retarget what the output
    layer means, so a prediction-type switch is refused there; with full fine-tuning it is allowed but experimental.
    """
    base = pretrained_schedule(pretrained.scheduler_config, pretrained.training_config)
    explicit = {k: getattr(config, k) for k in SCHEDULE_FIELDS if getattr(config, k) is not None}
    for key, value in base.items():
        if key in SCHEDULE_FIELDS and getattr(config, key) is not None:
            continue
        if hasattr(config, key):
            setattr(config, key, value)
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


# ----------------------------------------------------------------------------------------------------------------------
# The adapted UNet
# ----------------------------------------------------------------------------------------------------------------------


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
    pretrained: ModelMixin, resolution: int, in_channels: int = 3, num_class_embeds: int | None = None
) -> tuple[ModelMixin, list[str]]:
    """The pretrained UNet at ``resolution`` (and with a zero class embedding of ``num_class_embeds`` rows).

    Returns the model and the names of its new (zero-initialised) parameters, which always train.
    """
    config = dict(pretrained.config)
    if config.get("in_channels", in_channels) != in_channels:
        raise FlagError(f"the pretrained UNet takes {config['in_channels']} channels, the data has {in_channels}")
    levels = len(config.get("down_block_types", [])) or 1
    if resolution % 2 ** (levels - 1):
        raise FlagError(f"--resolution {resolution} is not divisible by 2**{levels - 1}, which this UNet's levels need")
    changes: dict[str, Any] = {"sample_size": resolution}
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


def add_unet_lora(unet: torch.nn.Module, config: TransferConfig) -> list[str]:
    """Put peft LoRA adapters on ``unet`` in place; returns the names of the modules that got one."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = config.lora_targets()
    lora_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, target_modules=targets
    )
    try:
        inject_lora(unet, lora_config)
    except ValueError as err:
        raise FlagError(
            f"--lora_target_modules {' '.join(config.lora_target_modules)} matched no module of the UNet; use the "
            f"presets {sorted(UNET2D_LORA_PRESETS)} or module names such as conv1"
        ) from err
    return [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def select_trainable(unet: torch.nn.Module, config: TransferConfig, new_keys: list[str]) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` as --train_modules says (new parameters always train); returns the trainable ones."""
    names = [name for name, _ in unet.named_parameters()]
    if config.train_modules != "all" or config.freeze_encoder:
        if not any(n.startswith(ENCODER_PREFIXES) for n in names) or not any(
            n.startswith(DECODER_PREFIXES) for n in names
        ):
            raise FlagError(f"--train_modules {config.train_modules}: this UNet has no conv_in/down_blocks/up_blocks")
    if config.train_modules == "lora":
        adapted = add_unet_lora(unet, config)
        logger.info("LoRA rank %d on %d modules", config.lora_rank, len(adapted))
    new = set(new_keys)
    for name, param in unet.named_parameters():
        if name in new:
            train = True
        elif config.train_modules == "lora":
            train = "lora_" in name
        elif config.train_modules == "decoder":
            train = name.startswith(DECODER_PREFIXES)
        else:
            train = not (config.freeze_encoder and name.startswith(ENCODER_PREFIXES))
        param.requires_grad_(train)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise FlagError("nothing to train: --train_modules / --lora_target_modules selected no parameter")
    return trainable


# ----------------------------------------------------------------------------------------------------------------------
# Merging and saving adapters
# ----------------------------------------------------------------------------------------------------------------------


def adapter_state(model: torch.nn.Module, extra_keys: list[str] = ()) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft keys) plus any fully trained new parameters (their own keys), fp32 on the CPU."""
    state = lora_state(model)
    own = model.state_dict()
    state.update({k: own[k].detach().float().cpu().contiguous() for k in extra_keys})
    return state


def save_lora_adapter(
    model: torch.nn.Module, folder: str | os.PathLike, extra_keys: list[str] = (), ema: EMAModel | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's names) for the (EMA) adapter."""
    from safetensors.torch import save

    if ema is not None:
        model = copy.deepcopy(model)
        ema.copy_to(model.parameters())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_config = adapter_config(model)
    metadata = {"lora_config": json.dumps(lora_config), "extra_keys": json.dumps(list(extra_keys))}
    weights = save(adapter_state(model, extra_keys), metadata=metadata)
    write_atomic(folder / ADAPTER_WEIGHTS_NAME, lambda handle: handle.write(weights), binary=True)
    write_text_atomic(folder / ADAPTER_CONFIG_NAME, json.dumps(lora_config, indent=2, sort_keys=True))
    return folder


def load_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> torch.nn.Module:
    """Inject the adapter saved by :func:`save_lora_adapter` into ``model`` (a plain UNet) and load its weights."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise PathError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    lora_config = load_lora_config(json.loads(metadata["lora_config"]))
    extra = json.loads(metadata.get("extra_keys", "[]"))
    state = load_file(str(path))
    inject_lora(model, lora_config)
    own = model.state_dict()  # tensors share storage with the parameters
    with torch.no_grad():
        for key in extra:
            own[key].copy_(state.pop(key))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: keys this adapter does not have: {result.unexpected_keys[:8]}")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


class TransferTrainer(Trainer):
    """crispdiff's Trainer on a prepared pretrained UNet; with LoRA it can also save the adapter."""

    def __init__(
        self,
        config: TransferConfig,
        space: TrainingSpace,
        accelerator: Accelerator,
        unet: ModelMixin,
        trainable: list[torch.nn.Parameter],
        new_keys: list[str] = (),
    ):
        self.new_keys = list(new_keys)
        self.num_trainable = sum(p.numel() for p in trainable)
        super().__init__(config, space, accelerator, unet=unet, trainable=trainable)

    def describe(self) -> str:
        unet = self.accelerator.unwrap_model(self.unet)
        total = count_parameters(unet)
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return (
            f"{len(self.space)} training items{classes}, pretrained UNet with {describe_parameters(total)} "
            f"({describe_parameters(self.num_trainable)} trainable: --train_modules {self.config.train_modules})"
        )

    def export(self, calibrate_sharpening: bool = False) -> Path:
        folder = super().export(calibrate_sharpening)
        unet = self.accelerator.unwrap_model(self.unet)
        if self.config.save_lora_adapter and has_adapters(unet):
            saved = save_lora_adapter(unet, self.output_dir / ADAPTER_FOLDER, self.new_keys, self.ema)
            self.accelerator.print(f"LoRA adapter saved to {saved}")
        return folder


def prepare_unet(
    config: TransferConfig, pretrained: Pretrained, space: TrainingSpace
) -> tuple[ModelMixin, list[torch.nn.Parameter], list[str]]:
    """The adapted UNet, its trainable parameters and its new parameter names, for this config and data."""
    class_names = getattr(space, "class_names", None)
    num_class_embeds = len(class_names) + 1 if class_names else None
    if class_names and pretrained.class_names and list(pretrained.class_names) != list(class_names):
        raise FlagError(f"the pretrained model's classes {pretrained.class_names} differ from the data's {class_names}")
    unet, new_keys = adapt_unet(pretrained.unet, space.sample_size, space.channels, num_class_embeds)
    trainable = select_trainable(unet, config, new_keys)
    return unet, trainable, new_keys


def train_transfer(config: TransferConfig, space: TrainingSpace | None = None) -> Path | None:
    """Fine-tune ``--pretrained_model_name_or_path`` on the configured data; returns the saved pipeline folder."""
    check_output_dir(config)
    pretrained = load_pretrained(config.pretrained_model_name_or_path, config.revision)
    resolve_schedule(config, pretrained)
    accelerator = start_run(config)
    logger.info(
        "pretrained %s: %s schedule, %s prediction (T=%d)",
        pretrained.source,
        config.beta_schedule,
        config.prediction_type,
        config.num_train_timesteps,
    )
    if space is None:
        from crispdiff.data.loading import load_images

        with accelerator.main_process_first():
            space = PixelSpace(load_images(config, show_progress=accelerator.is_local_main_process))
    unet, trainable, new_keys = prepare_unet(config, pretrained, space)
    return run_trainer(TransferTrainer(config, space, accelerator, unet, trainable, new_keys))
