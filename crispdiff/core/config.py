"""Training configuration, one concept kept whole past 500 lines (the flag groups resolve together): the config
dataclasses whose fields are the scripts' flags, and the resolved run config.

``DataConfig``, ``ModelConfig``, ``NoiseConfig``, ``HubConfig`` and ``LoopConfig`` are the flag groups; ``TrainConfig``
(the pixel trainer's) combines them and later scripts subclass it. Flag names follow diffusers' example scripts
(``--resolution``, ``--train_batch_size``, ``--snr_gamma`` ...) so users' muscle memory works. How fields become flags
and a command line becomes a config is :mod:`crispdiff.core.flags`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from crispdiff.core.cores import native_bf16
from crispdiff.core.diffusers_flags import (
    PRESERVE_INPUT_PRECISION,
)
from crispdiff.core.errors import FlagError, UserError
from crispdiff.core.flags import Condition, check_conditional_flags, flag, flag_list
from crispdiff.core.io import write_json_atomic

SECRET_MARKERS = ("token", "password", "secret", "api_key")
#: A name holding one of the secret markers as a whole word: ``hub_token``, ``token``, not ``tokenizer_name``.
_SECRET_NAME = re.compile(r"(^|[_-])(" + "|".join(map(re.escape, SECRET_MARKERS)) + r")($|[_-])")


def is_secret_name(name: str) -> bool:
    """Whether a setting or flag name (``hub_token``, ``--token``) names a credential."""
    return bool(_SECRET_NAME.search(name.lstrip("-").lower()))


def resolve_mixed_precision(value: str | None) -> str | None:
    """``--mixed_precision auto``: bf16 where the machine runs it natively, else None (accelerate's own choice)."""
    if value != "auto":
        return value
    return "bf16" if native_bf16() else None


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A configuration without credentials (``hub_token`` ...), fit to save beside a model or publish in a card."""
    return {k: v for k, v in values.items() if not is_secret_name(k)}


#: The per-epoch pixel augmentation flags of DataConfig: each a number in [0, 1], 0 meaning off.
PIXEL_AUGMENTATIONS = ("color_jitter", "blur_prob", "color_remap_prob")

#: The ``--class_column`` value that asks for clusters instead of a metadata column, and the one that turns classes off.
AUTO_CLASS_COLUMN = "auto"
NO_CLASS_COLUMN = "none"

@dataclass
class DataConfig:
    """Where the images come from and how they are turned into training tensors."""

    conditional_flags: ClassVar[dict[str, Condition]] = {
        "dataset_config_name": (lambda c: bool(c.dataset_name), "--dataset_name"),
        "image_column": (lambda c: bool(c.dataset_name), "--dataset_name (a folder's images need no column)"),
        "random_crop_positions": (lambda c: not c.center_crop, "random crops (drop --center_crop)"),
    }

    dataset_name: str | None = flag(None, "A Hub dataset id or a local `datasets` folder (saved with save_to_disk).")
    dataset_config_name: str | None = flag(None, "The dataset's config name, if it has several.")
    train_data_dir: str | None = flag(
        None,
        "A folder of images, optionally with metadata.jsonl (datasets' imagefolder layout). With --dataset_name the "
        "dataset is used, as in diffusers, and this names the folder inside it to load (datasets' data_dir).",
    )
    image_column: str = flag("image", "Column holding the images when --dataset_name is used.")
    caption_column: str | None = flag(None, "Optional caption column (kept for conditional scripts).")
    cache_dir: str | None = flag(
        None, "Where decoded image / latent caches and downloaded datasets go (default: ~/.cache/crispdiff)."
    )
    resolution: int = flag(64, "Training resolution in pixels (square).")
    interpolation: str = flag(
        "lanczos",
        "Resize filter (PIL's; diffusers' --image_interpolation_mode names).",
        choices=["bicubic", "lanczos", "bilinear", "nearest", "nearest_exact", "box", "hamming"],
    )
    center_crop: bool = flag(
        False,
        "Center-crop to --resolution (default: a random crop, drawn anew each time an image is used; on cached "
        "latents one of --random_crop_positions crops encoded once per image).",
    )
    random_crop_positions: int = flag(
        4,
        "Trainers on cached latents (latent, LoRA), without --center_crop: crops at this many evenly spaced positions "
        "along each image's longer side are encoded once (this many times the encoding), and each step draws one. "
        "Square images need none.",
    )
    random_flip: bool = flag(False, "Randomly flip images horizontally.")
    background: str = flag("white", "Colour that transparent pixels (RGBA, LA, palette) are composited onto.")
    min_image_size: int = flag(16, "Reject images whose shorter side is smaller than this many pixels.")
    max_train_samples: int | None = flag(
        None, "Use only N images, a random subset drawn with --seed as in diffusers (for quick experiments)."
    )
    color_jitter: float = flag(0.0, "Opt-in colour jitter strength (0 = off; 0.05 is gentle).")
    blur_prob: float = flag(0.0, "Opt-in probability of a weak Gaussian blur per image (0 = off).")
    blur_sigma: float = flag(0.5, "Sigma of the weak blur augmentation, in pixels.")
    color_remap_prob: float = flag(
        0.0,
        "Opt-in probability that an image's colours are remapped: each channel's 0 and 1 go to random levels "
        "(white background -> any colour, sometimes inverted). For VAEs, which otherwise wash out large saturated "
        "or dark fields they never saw (the embedded VAE's last training stage used 0.25).",
    )

    def pixel_augmentations(self) -> list[str]:
        """The per-epoch pixel augmentations switched on, as flags (e.g. ``["--color_jitter"]``).

        Trainers that encode every image once into a latent cache cannot honour them and refuse this list, so a new
        augmentation added here is refused by all of them.
        """
        return [f"--{name}" for name in PIXEL_AUGMENTATIONS if getattr(self, name) > 0]


#: The flags crispdiff's UNet builder shapes a UNet2DModel from; a --model_config_name_or_path config replaces them all.
UNET_BUILDER_FLAGS = (
    "base_channels",
    "channel_mults",
    "attention_res",
    "layers_per_block",
    "dropout",
    "attention_head_dim",
    "resnet_time_scale_shift",
)
#: The builder flags the timm-encoder UNet (--encoder) has no use for.
NOT_TIMM_UNET_FLAGS = ("channel_mults", "attention_res", "attention_head_dim", "resnet_time_scale_shift")
#: The flags only the timm-encoder UNet uses.
TIMM_UNET_FLAGS = ("encoder_weights", "encoder_norm")


@dataclass
class ModelConfig:
    """The UNet2DModel architecture."""

    model_config_name_or_path: str | None = flag(
        None,
        "A UNet2DModel config (Hub id, folder or config.json) used instead of the builder flags below (giving one of "
        "those too is refused: the config decides them).",
    )
    base_channels: int = flag(48, "Channels of the first UNet level.")
    channel_mults: list[int] = flag([1, 2, 4, 8], "Channel multiplier per level; one level per entry.")
    attention_res: list[int] = flag([16, 8], "Feature-map resolutions (in pixels of the UNet input) with attention.")
    layers_per_block: int = flag(2, "ResNet layers per UNet level.")
    dropout: float = flag(0.1, "Dropout inside the ResNet blocks.")
    attention_head_dim: int = flag(32, "Channels per attention head.")
    resnet_time_scale_shift: str = flag(
        "default",
        "How the time (+ class) embedding enters each ResNet block: added to its features (default) or as a "
        "scale and shift of its GroupNorm (scale_shift: AdaGN, Dhariwal & Nichol 2021; stronger class conditioning "
        "for a few more parameters). diffusers' UNet2DModel option of the same name.",
        choices=["default", "scale_shift"],
    )
    encoder: str | None = flag(
        None,
        "Use a timm network as the UNet's encoder, e.g. `timm:convnext_atto` or `timm:resnet18` (needs "
        "`pip install 'crispdiff[timm]'`). --base_channels is then the stem width, --layers_per_block and --dropout "
        "shape the decoder; --channel_mults, --attention_res, --attention_head_dim and --resnet_time_scale_shift are "
        "refused (not used).",
    )
    encoder_weights: str | None = flag(
        None,
        "With --encoder: a local .safetensors or .pth state dict of the timm model (e.g. ImageNet weights) to start "
        "from; nothing is downloaded. Default: random init.",
    )
    encoder_norm: str = flag(
        "group",
        "With --encoder: its norm layers: BatchNorm -> GroupNorm keeping the affine weights (group), BatchNorm frozen "
        "at its running statistics (frozen_bn; for --encoder_weights), or timm's BatchNorm unchanged (batch).",
        choices=["group", "frozen_bn", "batch"],
    )

    def check_architecture_flags(self) -> None:
        """Refuse architecture flags the UNet being built would not use (a config file or a timm encoder decides
        them), rather than accept them and build something else; defaults left alone are not refused."""
        given = getattr(self, "explicit_flags", frozenset())
        if self.model_config_name_or_path:
            ignored = [name for name in (*UNET_BUILDER_FLAGS, "encoder", *TIMM_UNET_FLAGS) if name in given]
            if ignored:
                raise FlagError(
                    f"--model_config_name_or_path {self.model_config_name_or_path} describes the whole UNet, so "
                    f"{flag_list(ignored)} would be ignored: drop them, or change those values in the config file"
                )
        elif self.encoder:
            ignored = [name for name in NOT_TIMM_UNET_FLAGS if name in given]
            if ignored:
                raise FlagError(f"{flag_list(ignored)}: not used by the timm-encoder UNet (--encoder); drop them")
        else:
            ignored = [name for name in TIMM_UNET_FLAGS if name in given]
            if ignored:
                raise FlagError(f"{flag_list(ignored)}: for a timm encoder only; add --encoder timm:NAME or drop them")


#: The schedules defined by a continuous alpha-bar, the only ones --snr_shift can shift.
SHIFTABLE_SCHEDULES = ("cosine", "sigmoid")


@dataclass
class NoiseConfig:
    """The forward process and the training objective."""

    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.weighting_scheme == "logit_normal", "--weighting_scheme logit_normal")
        for name in ("logit_mean", "logit_std")
    }

    num_train_timesteps: int = flag(1000, "T, the number of training timesteps.")
    beta_schedule: str = flag("cosine", "Noise schedule.", choices=["linear", "scaled_linear", "cosine", "sigmoid"])
    beta_start: float = flag(1e-4, "First beta of the linear / scaled_linear schedules.")
    beta_end: float = flag(0.02, "Last beta of the linear / scaled_linear schedules.")
    sigmoid_start: float = flag(-3.0, "Chen 2023 sigmoid schedule: start of the sigmoid's input range.")
    sigmoid_end: float = flag(3.0, "Chen 2023 sigmoid schedule: end of the sigmoid's input range.")
    sigmoid_tau: float = flag(1.0, "Chen 2023 sigmoid schedule: temperature (larger = noisier middle).")
    snr_shift: float = flag(
        0.0,
        "Shift the cosine / sigmoid schedule's log-SNR by this many nats at every t (Hoogeboom et al. 2023). "
        "Negative = noisier (large images: -2*ln(resolution/64)); positive = cleaner (small latents). 0 = off.",
    )
    rescale_betas_zero_snr: bool = flag(False, "Rescale the schedule to zero terminal SNR (Lin et al. 2023).")
    prediction_type: str = flag(
        "v_prediction", "What the UNet predicts.", choices=["epsilon", "v_prediction", "sample"]
    )
    snr_gamma: float | None = flag(5.0, "Min-SNR-gamma loss weighting (Hang et al. 2023); pass 0 to disable.")
    weighting_scheme: str = flag(
        "none",
        "How training timesteps are drawn (diffusers' SD3 flag): none = uniformly; logit_normal = t / T from a "
        "logit-normal (Esser et al. 2024), so mid-noise steps are trained more often.",
        choices=["none", "logit_normal"],
    )
    logit_mean: float = flag(0.0, "--weighting_scheme logit_normal: mean of the normal behind t / T (0 = mid-run).")
    logit_std: float = flag(1.0, "--weighting_scheme logit_normal: its standard deviation (larger = nearer uniform).")
    noise_offset: float = flag(0.0, "Offset noise strength (0 = off).")

    def check_snr_shift(self) -> None:
        """--snr_shift needs a shiftable schedule; a schedule still unknown (None: taken later from a pretrained
        scheduler) is checked again once it is resolved."""
        if self.snr_shift and self.beta_schedule is not None and self.beta_schedule not in SHIFTABLE_SCHEDULES:
            raise FlagError(
                f"--snr_shift applies to the {' and '.join(SHIFTABLE_SCHEDULES)} schedules, not {self.beta_schedule!r}"
            )


@dataclass
class HubConfig:
    """Publishing to the Hugging Face Hub."""

    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.push_to_hub, "--push_to_hub") for name in ("hub_model_id", "hub_private_repo", "hub_token")
    }

    push_to_hub: bool = flag(False, "Upload the final pipeline folder to the Hub.")
    hub_model_id: str | None = flag(
        None, "With --push_to_hub: the repository id on the Hub (default: the output folder's name)."
    )
    hub_private_repo: bool = flag(False, "With --push_to_hub: create the Hub repository as private.")
    hub_token: str | None = flag(
        None, "With --push_to_hub: the token for the Hub (default: the cached login / HF_TOKEN)."
    )
    license: str | None = flag(
        None,
        "Licence id written into the model card's metadata (e.g. apache-2.0, mit, openrail++). Default: 'other' "
        "(unspecified) for a crispdiff model; a LoRA states its base model's licence when its card names one.",
    )


@dataclass
class LoopConfig:
    """The optimisation loop every crispdiff trainer shares: steps, optimizer, precision, EMA, checkpoints, logs."""

    conditional_flags: ClassVar[dict[str, Condition]] = {
        "lr_reference_batch": (lambda c: c.scale_lr, "--scale_lr"),
        **{name: (lambda c: c.use_ema, "--use_ema") for name in ("ema_decay", "ema_inv_gamma", "ema_power")},
    }

    output_dir: str = flag("crispdiff-output", "Where checkpoints, logs, samples and the saved model go.")
    overwrite_output_dir: bool = flag(False, "Allow replacing a finished model in --output_dir.")
    seed: int = flag(0, "Seed for weights, data order, noise and validation samples.")
    train_batch_size: int = flag(64, "Images per process per micro-batch.")
    gradient_accumulation_steps: int = flag(1, "Micro-batches per optimizer step.")
    max_train_steps: int | None = flag(None, "Optimizer steps to train for (overrides --num_epochs).")
    num_epochs: int = flag(
        100,
        "Epochs (passes over the data) to train for when --max_train_steps is not given; passing it without "
        "--max_train_steps also overrides a script's default step count, as in diffusers.",
    )
    learning_rate: float = flag(2e-4, "Peak learning rate.")
    scale_lr: bool = flag(
        False,
        "Scale --learning_rate by the global batch (batch x accumulation x processes) divided by "
        "--lr_reference_batch; with its default of 1 that is diffusers' rule. Off: the LR is used as given.",
    )
    lr_reference_batch: int = flag(
        1,
        "With --scale_lr: the global batch --learning_rate was tuned for (e.g. 64 for crispdiff's 2e-4 defaults); the "
        "LR is scaled by the ratio to it.",
    )
    lr_scheduler: str = flag(
        "cosine",
        "LR schedule after warmup.",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    lr_warmup_steps: int = flag(
        500,
        "Linear warmup steps. A script's default is capped at half the run (logged); a value you pass is used as is.",
    )
    lr_num_cycles: int = flag(1, "Hard restarts of --lr_scheduler cosine_with_restarts (diffusers' get_scheduler).")
    lr_power: float = flag(1.0, "Power of --lr_scheduler polynomial (diffusers' get_scheduler).")
    adam_beta1: float = flag(0.9, "AdamW beta1.")
    adam_beta2: float = flag(0.999, "AdamW beta2.")
    adam_weight_decay: float = flag(0.0, "AdamW weight decay.")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = flag(False, "Use bitsandbytes' 8-bit AdamW (pip install 'crispdiff[bnb]').")
    max_grad_norm: float = flag(1.0, "Gradient clipping norm (0 = off).")
    mixed_precision: str | None = flag(
        None,
        "Mixed precision (default: what `accelerate config` chose). `auto`: bf16 where this machine runs it natively "
        "(a GPU that supports it, a CPU with AVX512-BF16 or AMX), else what `accelerate config` chose.",
        choices=["no", "fp16", "bf16", "auto"],
    )
    allow_tf32: bool = flag(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    deterministic: bool = flag(
        False,
        "Use only deterministic kernels (torch.use_deterministic_algorithms, no cuDNN benchmarking, no TF32), so a "
        "resumed GPU run ends bit-identical to an uninterrupted one; slower. CPU runs are deterministic without it.",
    )
    cpu_threads: int | None = flag(
        None,
        "Torch threads per process when training on the CPU (default: the cores divided among this machine's "
        "processes; `accelerate launch` without a config would otherwise leave one).",
    )
    use_ema: bool = flag(True, "Keep an exponential moving average of the weights; it is what gets sampled and saved.")
    ema_decay: float = flag(0.9999, "Maximum EMA decay.")
    ema_inv_gamma: float = flag(1.0, "EMA warmup inverse gamma.")
    ema_power: float = flag(0.75, "EMA warmup power (3/4 suits runs of tens of thousands of steps).")
    checkpointing_steps: int = flag(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = flag(None, "Keep at most this many checkpoints (default: all).")
    resume_from_checkpoint: str | None = flag(None, "A checkpoint folder, or 'latest'.")
    validation_steps: int = flag(500, "Validate (sample grid / held-out metrics) every N steps.")
    validation_epochs: int | None = flag(
        None, "Validate every N epochs instead of every --validation_steps (diffusers' flag; pass one of the two)."
    )
    dataloader_num_workers: int = flag(
        0, "Accepted for diffusers' command lines; no effect: images are decoded once and batches need no workers."
    )
    local_rank: int = flag(-1, "Accepted for diffusers' command lines; no effect: accelerate sets each process's rank.")
    logging_dir: str = flag("logs", "Tensorboard folder, relative to --output_dir.")
    logging_steps: int = flag(10, "Log the loss, learning rate and speed every N optimizer steps (and at the last).")
    report_to: str = flag("tensorboard", "Where accelerate logs go.", choices=["tensorboard", "wandb", "all", "none"])

    # -- the resolved run ---------------------------------------------------------------------------------------
    # A config is built from flags (or by a caller), then resolved once: ``resolve()`` returns a read-only copy with
    # every default that depends on other flags filled in and every flag checked. The run reads and saves that copy
    # (crispdiff_training.json); what a stage decides before the loop (the time budget's steps and UNet, the VAE
    # adaptation's steps, a pretrained model's schedule) goes into a new copy made with ``with_values``, never into
    # the one it was given.

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_resolved", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot set {name}: a resolved config is read-only; make a new one with with_values({name}=...)"
            )
        object.__setattr__(self, name, value)

    @property
    def is_resolved(self) -> bool:
        return bool(self.__dict__.get("_resolved", False))

    def resolve(self) -> Any:
        """The run's settings, resolved once: a read-only copy with the given flags' meaning applied
        (``resolve_given_flags``), defaults filled in and combinations refused (``fill_and_check``), and flags that
        would change nothing refused (``check_conditional_flags``). A resolved config resolves to itself. A
        ``ValueError`` from the checks is raised as a ``FlagError`` (one ``error:`` line on the command line)."""
        if self.is_resolved:
            return self
        resolved = copy.copy(self)  # carries explicit_flags, which is not a field
        try:
            resolved.resolve_given_flags()
            resolved.fill_and_check()
            check_conditional_flags(resolved)
        except UserError:
            raise
        except ValueError as err:
            raise FlagError(str(err)) from err
        object.__setattr__(resolved, "_resolved", True)
        return resolved

    def fill_and_check(self) -> None:
        """Fill in the defaults that depend on other flags and refuse combinations the run would only fail on later
        (each config class extends this); runs once, inside ``resolve``, on the copy being resolved."""

    def with_values(self, **values: Any) -> Any:
        """A copy with ``values`` decided by a stage before the loop starts (resolved when this is). Only fields."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        changed = copy.copy(self)
        for name, value in values.items():
            object.__setattr__(changed, name, value)
        return changed

    def values_for_steps(self, steps: int) -> dict[str, Any]:
        """The settings whose defaults follow the run's length, for a run of ``steps`` optimizer steps (once a time
        budget or the epochs have decided them); none here."""
        return {}

    def resolve_given_flags(self) -> None:
        """What the flags a user passed mean together, as in diffusers' scripts (``explicit_flags`` is set)."""
        given = getattr(self, "explicit_flags", frozenset())
        if {"num_epochs", "max_train_steps"} <= given:
            raise FlagError("pass --max_train_steps or --num_epochs, not both (the step count would decide alone)")
        if "num_epochs" in given:
            self.max_train_steps = None  # epochs asked for: a script's default step count must not override them
        if "validation_epochs" in given and "validation_steps" in given:
            raise FlagError("pass --validation_steps or --validation_epochs, not both")
        self.mixed_precision = resolve_mixed_precision(self.mixed_precision)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as saved beside checkpoints and models: without the Hub token."""
        return without_secrets(dataclasses.asdict(self))

    def save_json(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict(), sort_keys=True)


#: Why the scripts that train without captions refuse --caption_column.
NO_CAPTIONS = (
    "this script trains without captions (train_text_to_image_lora.py and train_dreambooth_lora.py use them); "
    "drop it (--class_column conditions a UNet on a metadata column)"
)
#: Why the scripts that crop images anew each time refuse --random_crop_positions.
CROPS_DRAWN_ANEW = (
    "this script draws a new random crop each time an image is used; fixed crop positions are for the trainers on "
    "cached latents (train_latent.py, the LoRA scripts); drop it"
)


@dataclass
class TrainConfig(DataConfig, ModelConfig, NoiseConfig, HubConfig, LoopConfig):
    """Everything `train_scripts/train_unconditional.py` accepts."""

    #: Flags that cannot make sense here (flag -> why, and what to do instead): diffusers' and crispdiff's own.
    refused_flags: ClassVar[dict[str, str]] = {
        "preserve_input_precision": PRESERVE_INPUT_PRECISION,
        "caption_column": NO_CAPTIONS,
        "random_crop_positions": CROPS_DRAWN_ANEW,
    }
    conditional_flags: ClassVar[dict[str, Condition]] = {
        "torch_compile_backend": (lambda c: c.torch_compile, "--torch_compile"),
        "num_auto_classes": (lambda c: c.class_column == AUTO_CLASS_COLUMN, f"--class_column {AUTO_CLASS_COLUMN}"),
        **{
            name: (lambda c: c.class_column not in (None, "", NO_CLASS_COLUMN), "--class_column")
            for name in ("class_dropout_prob", "guidance_scale", "augment_prob")
        },
        "guidance_interval": (
            lambda c: c.class_column not in (None, "", NO_CLASS_COLUMN) or c.autoguidance_scale > 1,
            "--class_column or --autoguidance_scale above 1",
        ),
        "autoguidance_snapshot": (lambda c: c.autoguidance_scale > 1, "--autoguidance_scale above 1"),
        "streaming": (lambda c: bool(c.dataset_name), "--dataset_name (a Hub id or a local folder datasets loads)"),
        "shuffle_buffer_size": (lambda c: c.streaming, "--streaming"),
    }
    #: The diffusers script this config stands in for, and its defaults where crispdiff's differ on purpose.
    diffusers_script: ClassVar[str | None] = "train_unconditional.py"
    diffusers_defaults: ClassVar[dict[str, Any]] = {
        "prediction_type": "epsilon",
        "beta_schedule": "linear",
        "snr_gamma": None,
        "use_ema": False,
        "learning_rate": 1e-4,
        "train_batch_size": 16,
        "adam_beta1": 0.95,
        "adam_weight_decay": 1e-6,
        "sampler": "ddpm",
        "validation_inference_steps": 1000,
        "dropout": 0.0,
    }

    gradient_checkpointing: bool = flag(False, "Trade compute for memory in the UNet.")
    enable_xformers_memory_efficient_attention: bool = flag(False, "Use xformers attention (optional extra).")
    torch_compile: bool = flag(
        False, "Compile the UNet with torch.compile (the first steps are slow while it compiles; GPU runs gain most)."
    )
    torch_compile_backend: str = flag(
        "inductor", "torch.compile backend for --torch_compile ('aot_eager' compiles in seconds but runs no faster)."
    )
    save_model_steps: int | None = flag(
        None, "Also write the pipeline folder every N steps (default: only at the end)."
    )
    save_model_epochs: int | None = flag(
        None, "Also write the pipeline folder every N epochs (diffusers' flag; pass it or --save_model_steps)."
    )
    class_column: str | None = flag(
        None,
        "Train a class-conditional model on this metadata.jsonl / dataset column (e.g. the embedded emoji's "
        "`category`); sample a class with classifier-free guidance (`crispdiff sample --class NAME`). `auto`: "
        "classes made by clustering the images (crispdiff/data/auto_classes.py); the pipeline then samples their mix "
        "when called without labels.",
    )
    num_auto_classes: int | None = flag(
        None,
        "With --class_column auto: how many clusters (default: one per 8 training images, 2 to 256).",
    )
    class_dropout_prob: float = flag(
        0.1,
        "With --class_column: probability of training an image as the null class, so that one model is both "
        "conditional and unconditional (classifier-free guidance needs both).",
    )
    augment_prob: float = flag(
        0.0,
        "With --class_column: probability that a training sample is mirrored or turned by quarter turns, the transform "
        "given to the UNet with its class label so that samples never come out transformed (non-leaking "
        "augmentation, Karras et al. 2022). More views of each image for long runs on few images, which otherwise "
        "drift towards copying them; 0 = off.",
    )
    guidance_scale: float = flag(
        2.0,
        "With --class_column: the classifier-free guidance scale saved as the pipeline's default and used for the "
        "sample grids (1 = the conditional model alone; higher makes each class more recognisable, and past a point "
        "trades diversity for typicality).",
    )
    guidance_interval: list[float] | None = flag(
        None,
        "With --class_column: guide only at noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in (MIN, MAX] "
        "(Kynkaanniemi et al. 2024), saved as the pipeline's default; the other sampling steps run the conditional "
        "model alone. Two numbers, MIN MAX; default: every step.",
    )
    autoguidance_scale: float = flag(
        1.0,
        "Autoguidance (Karras et al. 2024) strength saved as the pipeline's default: every sampling step adds "
        "(w - 1) x (model - guide), where the guide is a weaker version of the same model (--autoguidance_snapshot); "
        "no labels needed, and it combines with classifier-free guidance. 1 = off.",
    )
    autoguidance_snapshot: float = flag(
        0.25,
        "With --autoguidance_scale: the guide model is the EMA weights after this fraction of the training steps "
        "(a less trained model whose mistakes the guidance steers away from), saved in the pipeline as guide_unet.",
    )
    num_validation_images: int = flag(
        16,
        "Images in the validation and final sample grids (a class-conditional model: one row per class, at least 4 per "
        "row; with more than 16 classes, one image per class). 0: no grids. Left at its default, with "
        "--validation_inference_steps, a grid is shrunk (to no fewer than 4 images x 10 steps) when it would cost more "
        "than a tenth of the training steps it follows; the log says so.",
    )
    validation_inference_steps: int = flag(25, "Sampler steps of the validation and final sample grids.")
    validation_metrics: bool = flag(False, "Log SWD and sharpness ratios at each validation.")
    sampler: str = flag(
        "dpmsolver++",
        "Default sampler of the saved pipeline.",
        choices=["dpmsolver++", "ddim", "unipc", "pndm", "ddpm"],
    )
    thresholding: bool = flag(False, "Dynamic thresholding of predicted x0 while sampling (pixel models only).")
    sr_model_name_or_path: str | None = flag(
        None,
        "A super-resolution model saved into the pipeline (.pth / .safetensors, a crispdiff SR folder from "
        "train_sr.py, or hub 'repo_id/file'); it upscales every call by default. 'embedded': the package's emoji SR x2 "
        "(64 px models only), used when asked (pipe(upscale=True)); 'none': no SR.",
    )
    sr_strength: float = flag(0.5, "Default blend of SR output with a Lanczos upscale (0 = Lanczos only, 1 = SR only).")
    sharpen_amount: float | None = flag(
        None,
        "Default unsharp-mask amount of the saved pipeline (radius 1 px), applied after decoding / SR; callers can "
        "override it per call (pipe(sharpen_amount=...)). Default: 0, except the latent trainer with the embedded "
        "VAE, which uses the amount calibrated for that decoder.",
    )
    time_budget_minutes: float | None = flag(
        None,
        "Size the run to end this many minutes after it starts, on this machine (export included), instead of "
        "--max_train_steps: a short probe times a few steps, and the steps chosen are saved in the training config "
        "(max_train_steps) so the run can be repeated exactly. The latent trainer's VAE adaptation gets a share.",
    )
    streaming: bool = flag(
        False,
        "Stream --dataset_name with `datasets` (load_dataset(..., streaming=True)) instead of decoding it into the "
        "image cache first: for data that does not fit on disk twice. Each process takes its share of the stream "
        "(datasets' split_dataset_by_node), shuffled in a buffer of --shuffle_buffer_size examples and anew each "
        "pass. Needs --max_train_steps (a stream's length is unknown); --max_train_samples keeps its first N "
        "examples; a resumed run rereads the stream up to where it was.",
    )
    shuffle_buffer_size: int = flag(
        1000, "With --streaming: examples in the shuffle buffer (datasets' IterableDataset.shuffle)."
    )
    sharpen_calibration_images: int = flag(
        0,
        "At the end of training, sample this many images without the unsharp mask and save the amount whose "
        "high-frequency and Laplacian ratios best match the training images (the rule of `crispdiff evaluate "
        "--sharpen_sweep`). 0 = keep --sharpen_amount. Worth it on long runs: the amount a model needs falls as it "
        "gets sharper with training; 256 is plenty.",
    )

    upscale_calibration_images: int = flag(
        256,
        "When the pipeline carries an SR step and the training images are at least its output size: at the end of "
        "training, sample this many images, upscale them and save the unsharp amount after the SR step whose "
        "high-frequency and Laplacian ratios best match the training images decoded at that size "
        "(upscale_sharpen_amount). How much detail SR restores depends on the data's design. 0 = keep the SR "
        "model's default (the embedded SR's, else --sharpen_amount).",
    )

    def fill_and_check(self) -> None:
        """Refuse flag combinations every diffusion trainer would only fail on later (subclasses extend this)."""
        self.check_snr_shift()
        self.check_architecture_flags()
        if {"save_model_steps", "save_model_epochs"} <= getattr(self, "explicit_flags", frozenset()):
            raise ValueError("pass --save_model_steps or --save_model_epochs, not both")
        if self.sharpen_amount is not None and self.sharpen_amount < 0:
            raise ValueError(f"--sharpen_amount must be >= 0, got {self.sharpen_amount}")
        if self.sharpen_calibration_images < 0:
            raise ValueError(f"--sharpen_calibration_images must be >= 0, got {self.sharpen_calibration_images}")
        if self.upscale_calibration_images < 0:
            raise ValueError(f"--upscale_calibration_images must be >= 0, got {self.upscale_calibration_images}")
        no_sr = (self.sr_model_name_or_path or "none").lower() == "none"
        if no_sr and "upscale_calibration_images" in getattr(self, "explicit_flags", frozenset()):
            raise ValueError("--upscale_calibration_images calibrates the SR step: pass --sr_model_name_or_path")
        if self.num_validation_images < 0:
            raise ValueError(
                f"--num_validation_images must be >= 0 (0: no sample grids), got {self.num_validation_images}"
            )
        if self.validation_inference_steps < 1:
            raise ValueError(f"--validation_inference_steps must be >= 1, got {self.validation_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"--guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_interval is not None and not (
            len(self.guidance_interval) == 2 and 0 <= self.guidance_interval[0] < self.guidance_interval[1]
        ):
            raise ValueError(f"--guidance_interval needs two numbers 0 <= MIN < MAX, got {self.guidance_interval}")
        interval = self.guidance_interval
        if interval is not None and interval[0] <= 0 and math.isinf(interval[1]):
            self.guidance_interval = None  # every step: stored as no interval
        if self.autoguidance_scale < 1:
            raise ValueError(f"--autoguidance_scale must be >= 1 (1 = off), got {self.autoguidance_scale}")
        if not 0 < self.autoguidance_snapshot < 1:
            raise ValueError(f"--autoguidance_snapshot must be a fraction in (0, 1), got {self.autoguidance_snapshot}")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(f"--time_budget_minutes must be positive, got {self.time_budget_minutes}")
        length = [name for name in ("max_train_steps", "num_epochs") if name in getattr(self, "explicit_flags", ())]
        if self.time_budget_minutes is not None and length:
            raise ValueError(f"pass --time_budget_minutes or --{length[0]}, not both (the budget sets the steps)")
        if self.num_auto_classes is not None and self.num_auto_classes < 2:
            raise ValueError(f"--num_auto_classes must be >= 2, got {self.num_auto_classes}")
        if self.streaming:
            self.check_streaming()

    def check_streaming(self) -> None:
        """Refuse what a stream cannot give: a length (epochs, a time budget's probes would take its batches) and
        classes known before training starts."""
        given = getattr(self, "explicit_flags", frozenset())
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        if self.time_budget_minutes is not None:
            raise ValueError(
                "--time_budget_minutes with --streaming: its probe steps would take batches of the stream the run "
                "trains on; give --max_train_steps"
            )
        if not self.max_train_steps:
            epochs = " (--num_epochs counts passes over data of known length)" if "num_epochs" in given else ""
            raise ValueError(f"--streaming needs --max_train_steps: a stream's length is unknown{epochs}")
        per_epoch = [name for name in ("validation_epochs", "save_model_epochs") if getattr(self, name)]
        if per_epoch:
            raise ValueError(
                f"{flag_list(per_epoch)} with --streaming: a stream has no known epoch length; use "
                "--validation_steps / --save_model_steps"
            )
        if self.class_column not in (None, "", NO_CLASS_COLUMN):
            raise ValueError(
                f"--class_column {self.class_column} with --streaming: a class-conditional model needs its classes "
                "before training starts, which a stream gives only by reading it whole; drop --streaming (the image "
                "cache reads it once) or --class_column"
            )


