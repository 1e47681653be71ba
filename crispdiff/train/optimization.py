"""How long a run is and how it steps: optimizer steps from epochs, the warm-up, the learning rate (scaled to the
global batch or not) and the optimizer (fused AdamW where torch has the kernel, or 8-bit AdamW)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.torch_version import TorchVersion

from crispdiff.core.config import LoopConfig
from crispdiff.core.errors import FlagError, MissingDependencyError

logger = logging.getLogger("crispdiff")


def make_optimizer(config: LoopConfig, parameters: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device, or 8-bit AdamW.

    Fused is one kernel per step instead of one per tensor: on a CPU it makes the main job's optimizer update a small
    share of the step instead of a noticeable one. It is chosen from where the parameters *are*, not where they will be:
    torch 2.1-2.3 reject a fused AdamW over CPU parameters, so there it is CUDA only, and callers move the model to
    its device first (``UNetTrainer`` does).
    """
    parameters = list(parameters)
    kwargs = dict(
        lr=config.learning_rate if lr is None else lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise MissingDependencyError(
                "--use_8bit_adam needs bitsandbytes: pip install 'crispdiff[bnb]' (or drop the flag)"
            ) from err
        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, fused=True if fused_adamw_supported(parameters) else None, **kwargs)


def fused_adamw_supported(parameters: list[Any]) -> bool:
    """Whether this torch has a fused AdamW kernel for the device all `parameters` are on (CPU: torch >= 2.4).

    `parameters` are tensors or param groups (dicts with "params"), as torch optimizers accept either.
    """
    tensors = [t for p in parameters for t in (p["params"] if isinstance(p, dict) else [p])]
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and TorchVersion(torch.__version__) >= (2, 4)


def images_per_optimizer_step(config: LoopConfig, num_processes: int) -> int:
    """Images per optimizer step: the micro-batch x gradient accumulation x processes."""
    return config.train_batch_size * config.gradient_accumulation_steps * num_processes


def scaled_learning_rate(config: LoopConfig, num_processes: int) -> float:
    """--learning_rate, or with --scale_lr the linear scaling rule (Goyal et al. 2017): lr x global batch / reference.

    The default reference batch is 1, which is diffusers' rule (lr x accumulation x batch x processes), so their
    command lines get their learning rate. ``--lr_reference_batch 64`` scales crispdiff's own defaults (2e-4 tuned at
    64 images) instead: multiplying those by the batch itself turns 2e-4 into 1.3e-2 and diverges.
    """
    if not config.scale_lr:
        return config.learning_rate
    if config.lr_reference_batch < 1:
        raise FlagError(f"--lr_reference_batch must be >= 1, got {config.lr_reference_batch}")
    return config.learning_rate * images_per_optimizer_step(config, num_processes) / config.lr_reference_batch


def total_train_steps(config: LoopConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: --max_train_steps, else --num_epochs worth of accumulated batches."""
    if config.max_train_steps:
        return config.max_train_steps
    return epochs_to_steps(config, config.num_epochs, batches_per_epoch)


def epochs_to_steps(config: LoopConfig, epochs: int, batches_per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` passes over the data (at least one)."""
    return max(1, epochs * batches_per_epoch // config.gradient_accumulation_steps)


def warmup_steps(config: LoopConfig, max_steps: int) -> int:
    """--lr_warmup_steps as passed; a script's default (not passed) is capped at half the run, with a log line.

    Why the cap on defaults only: crispdiff's defaults (500 warm-up steps) would otherwise never reach the peak LR in
    a short run, while a diffusers command line that asks for a warm-up longer than the run gets exactly that.
    """
    steps = config.lr_warmup_steps
    if "lr_warmup_steps" in getattr(config, "explicit_flags", frozenset()) or steps <= max_steps // 2:
        return steps
    logger.info(
        "crispdiff: the default --lr_warmup_steps %d is capped at %d, half of the %d steps (pass it to choose)",
        steps,
        max_steps // 2,
        max_steps,
    )
    return max_steps // 2
