"""The process's one ``Accelerator``: kernel settings, CPU threads, logging and the seed, made once per process and
handed to every stage it runs, and releasing what a finished stage registered with it.

accelerate's state is a per-process singleton, so a second ``Accelerator`` in one process would share it; a stage that
another follows (the VAE adaptation before the UNet, a time-budget probe) is released instead (``release_stage``), so
the next stage's checkpoints hold its own state only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_mps_available, is_xpu_available, set_seed

from crispdiff.core.config import LoopConfig, resolve_mixed_precision
from crispdiff.core.cores import available_cores


def configure_kernels(config: LoopConfig) -> None:
    """Fast kernels by default, reproducible ones with --deterministic.

    Default: cuDNN benchmarks its convolution algorithms once per input shape (the shapes never change during a
    run) and keeps the fastest. That choice, and many CUDA kernels (atomic-add reductions in the backward pass), are
    non-deterministic, so a resumed GPU run drifts from an uninterrupted one in the last bits. --deterministic asks
    torch for deterministic algorithms everywhere (an error names any op that has none), turns benchmarking and TF32
    off and sets the cuBLAS workspace that deterministic matmuls need; it must run before CUDA is first used.
    TF32 is set both ways, for matmuls and cuDNN alike: torch's own default leaves cuDNN's on, which neither
    --allow_tf32 false nor --deterministic may.
    """
    tf32 = config.allow_tf32 and not config.deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def has_accelerator_device() -> bool:
    return torch.cuda.is_available() or is_mps_available() or is_xpu_available()


def use_cpu_cores(config: LoopConfig, local_processes: int) -> None:
    """On a CPU-only run, give each local process its share of the cores (or `--cpu_threads`).

    `accelerate launch` without a config file sets OMP_NUM_THREADS=1 for every process, which leaves half of a
    two-core laptop idle.
    """
    if has_accelerator_device():
        return
    torch.set_num_threads(config.cpu_threads or max(1, available_cores() // max(1, local_processes)))


def make_accelerator(config: LoopConfig) -> Accelerator:
    """The Accelerator for a run. Without a GPU it is told `cpu=True`, which is what makes processes started by
    `accelerate launch --num_processes N` on a CPU-only machine join one gloo group instead of N lone runs."""
    output_dir = Path(config.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        cpu=not has_accelerator_device(),
    )


def start_process(config: LoopConfig) -> Accelerator:
    """Kernel settings, the process's one Accelerator, CPU threads and logging: made once per process, before CUDA is
    first used, and handed to every stage the process runs (accelerate's state is a per-process singleton)."""
    configure_kernels(config)
    accelerator = make_accelerator(config)
    use_cpu_cores(config, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator


def start_run(config: LoopConfig) -> Accelerator:
    """``start_process`` and the global seed: what a run of one stage does before any model is built."""
    accelerator = start_process(config)
    set_seed(config.seed)
    return accelerator


def release_stage(accelerator: Accelerator) -> None:
    """Forget what a finished stage registered with the process's Accelerator (models, optimizers, LR schedules,
    checkpoint hooks, the fp16 loss scaler's state), so that the next stage's checkpoints save and restore its own
    state only, as if it had an Accelerator of its own.

    accelerate has no public call for the registered objects and hooks (``free_memory`` drops the prepared models,
    optimizers and schedulers and resets the accumulation counter only), hence its private lists here."""
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    accelerator._save_model_state_pre_hook.clear()
    accelerator._load_model_state_pre_hook.clear()
    if accelerator.scaler is not None:  # fp16: a fresh scaler, at its initial scale
        from accelerate.utils import get_grad_scaler

        accelerator.scaler = get_grad_scaler(accelerator.distributed_type)
