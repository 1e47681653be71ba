"""The one training loop every crispdiff diffusion script uses.

Pixel and latent training differ only in where x0 comes from and which extra components the saved pipeline needs;
both are a `TrainingSpace`. The loop itself follows accelerate's examples: accelerate handles devices, precision
(fp16 with loss scaling, bf16), gradient accumulation and distribution; crispdiff adds what diffusers' example scripts
lack: data that is decoded once, an exact resume (model, EMA, optimizer, scaler, LR schedule, every RNG and the data
position), validation grids, and a saved pipeline that samples with DPM-Solver++ out of the box.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_mps_available, is_xpu_available, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.torch_version import TorchVersion
from tqdm.auto import tqdm

from crispdiff.auto_classes import AUTO_CLASS_COLUMN, class_mix
from crispdiff.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from crispdiff.config import LoopConfig, TrainConfig
from crispdiff.errors import FlagError, MissingDependencyError, OutputExistsError
from crispdiff.export import build_pipeline, save_pipeline
from crispdiff.hub import maybe_push_to_hub, write_model_card
from crispdiff.images import make_grid, save_image_atomic
from crispdiff.io import write_text_atomic
from crispdiff.model import count_parameters, describe_parameters, unet_from_config
from crispdiff.noise import NoiseSchedule, sample_noise, scheduler_base_config

logger = logging.getLogger("crispdiff")

# A class-conditional validation grid has one row per class up to this many classes, one tile per class beyond.
MAX_GRID_CLASS_ROWS = 16


class TrainingSpace(Protocol):
    """Where the diffusion happens: pixels, or a VAE's latents."""

    channels: int
    sample_size: int

    def __len__(self) -> int: ...

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Clean training samples for these dataset indices, randomness (crop, flip, posterior) from `generator`."""

    def pipeline_components(self) -> dict[str, Any]:
        """Extra keyword arguments for the saved pipeline (vae, latent scaling ...)."""

    def reference_images(self, count: int) -> torch.Tensor:
        """Up to `count` real images, uint8 [N, 3, H, W], for validation metrics."""

    # Class-conditional spaces (--class_column) also have ``class_names: list[str] | None`` and
    # ``class_labels(indices, device) -> LongTensor | None``; the Trainer reads both with getattr, so a space without
    # them is unconditional.


def space_class_names(space: Any) -> list[str] | None:
    """The space's class names (--class_column), or None for an unconditional space."""
    return getattr(space, "class_names", None)


class PixelSpace:
    """Diffusion directly on pixels in [-1, 1]."""

    channels = 3

    def __init__(self, data: Any):
        self.data = data
        self.sample_size = data.resolution
        self.class_names: list[str] | None = getattr(data, "class_names", None)

    def __len__(self) -> int:
        return len(self.data)

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.data.batch(indices, generator, device=device)

    def class_labels(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Class ids of these images (--class_column), or None when the data has no classes."""
        return self.data.class_labels(indices, device) if self.class_names else None

    def prepare(self, device: torch.device) -> None:
        """On a GPU, keep the uint8 images there when they fit (on the CPU the memory map already is RAM)."""
        if device.type != "cpu" and self.data.keep_on_device(device):
            logger.info("keeping the %d training images on %s", len(self.data), device)

    def pipeline_components(self) -> dict[str, Any]:
        return {}

    def reference_images(self, count: int) -> torch.Tensor:
        return self.data.center_crops(range(min(count, len(self.data))))


@dataclass
class DataPosition:
    """Where the loop is in the data: epoch and micro-batch within it (restored on resume)."""

    epoch: int = 0
    batch_in_epoch: int = 0


class EpochBatches:
    """Deterministic per-epoch shuffles, sharded across processes, with no DataLoader.

    The data is already decoded in memory (or memory-mapped), so a DataLoader's workers would only add copies.
    Shuffling with `seed + epoch` makes the order a pure function of the position, which is what makes resuming
    exact. Each process takes its own slice of every global batch.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        global_batch = batch_size * num_processes
        self.batches_per_epoch = max(1, num_items // global_batch)
        self._order_epoch: int | None = None
        self._order = torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled item order of ``epoch``, computed once per epoch (not once per micro-step)."""
        if self._order_epoch != epoch:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            global_batch = self.batch_size * self.num_processes
            if len(order) < global_batch:  # tiny datasets: repeat the shuffled order to fill one batch
                order = order.repeat(math.ceil(global_batch / len(order)))
            self._order, self._order_epoch = order, epoch
        return self._order

    def indices(self, position: DataPosition) -> torch.Tensor:
        """This process's slice of global batch ``position.batch_in_epoch`` of the epoch's order."""
        global_batch = self.batch_size * self.num_processes
        start = position.batch_in_epoch * global_batch + self.process_index * self.batch_size
        return self.epoch_order(position.epoch)[start : start + self.batch_size]

    def advance(self, position: DataPosition) -> DataPosition:
        if position.batch_in_epoch + 1 < self.batches_per_epoch:
            return DataPosition(position.epoch, position.batch_in_epoch + 1)
        return DataPosition(position.epoch + 1, 0)


def has_accelerator_device() -> bool:
    return torch.cuda.is_available() or is_mps_available() or is_xpu_available()


def use_cpu_cores(config: LoopConfig, local_processes: int) -> None:
    """On a CPU-only run, give each local process its share of the cores (or `--cpu_threads`).

    `accelerate launch` without a config file sets OMP_NUM_THREADS=1 for every process, which leaves half of a
    two-core laptop idle.
    """
    if has_accelerator_device():
        return
    torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local_processes)))


def make_accelerator(config: LoopConfig) -> Accelerator:
    """The Accelerator for a run. Without a GPU it is told `cpu=True`, which is what makes processes started by
    `accelerate launch --num_processes N` on a CPU-only machine join one gloo group instead of N lone runs."""
    output_dir = Path(config.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        cpu=not has_accelerator_device(),
    )


def make_optimizer(config: LoopConfig, parameters: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device, or 8-bit AdamW.

    Fused is one kernel per step instead of one per tensor: on a 2-core CPU it takes the main job's 2.8M-parameter
    update from 11 ms to 2 ms (4% of a step). It is chosen from where the parameters *are*, not where they will be:
    torch 2.1-2.3 reject a fused AdamW over CPU parameters, so there it is CUDA only, and callers move the model to
    its device first (``Trainer`` does).
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


def scaled_learning_rate(config: LoopConfig, num_processes: int) -> float:
    """--learning_rate, or with --scale_lr the linear scaling rule (Goyal et al. 2017) from --lr_reference_batch.

    Why a reference batch: the default LRs are already tuned for a batch (2e-4 at 64 images); multiplying them by
    the batch itself, as diffusers' example scripts do, turns 2e-4 into 1.3e-2 and diverges.
    """
    if not config.scale_lr:
        return config.learning_rate
    if config.lr_reference_batch < 1:
        raise FlagError(f"--lr_reference_batch must be >= 1, got {config.lr_reference_batch}")
    global_batch = config.train_batch_size * config.gradient_accumulation_steps * num_processes
    return config.learning_rate * global_batch / config.lr_reference_batch


def total_train_steps(config: LoopConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: --max_train_steps, else --num_epochs worth of accumulated batches."""
    if config.max_train_steps:
        return config.max_train_steps
    return max(1, config.num_epochs * batches_per_epoch // config.gradient_accumulation_steps)


def tracker_config(config: LoopConfig) -> dict[str, Any]:
    """Tensorboard's hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()}


def refuse_to_overwrite(config: LoopConfig, folder: Path, marker: str, what: str) -> None:
    """Refuse to silently replace a finished model unless asked to (--overwrite_output_dir) or resuming."""
    if (folder / marker).exists() and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise OutputExistsError(
            f"{folder} already holds {what}; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint latest to continue, or choose another --output_dir"
        )


def check_output_dir(config: TrainConfig) -> None:
    refuse_to_overwrite(config, Path(config.output_dir) / "pipeline", "model_index.json", "a trained pipeline")


class LoopTrainer:
    """What every crispdiff trainer shares: batches, steps, generators, EMA, LR schedule, checkpoints, the loop.

    A subclass builds its models, then calls `setup_optimization`, and implements `micro_step` (one forward and
    backward under `accelerator.accumulate`, returning named scalar losses; the first one is shown in the progress
    bar), `ema_parameters`, `validate` and `finish` (the final save, on the main process).
    """

    config_file = "crispdiff_training.json"
    tracker_name = "crispdiff"
    progress_label = "train"

    def __init__(self, config: LoopConfig, accelerator: Accelerator, num_items: int):
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)
        self.batches = EpochBatches(
            num_items, config.train_batch_size, accelerator.num_processes, accelerator.process_index, config.seed
        )
        self.max_steps = total_train_steps(config, self.batches.batches_per_epoch)
        # Separate, checkpointed generators: data augmentation on the CPU; noise, timesteps and posterior samples
        # on the device. Every random draw of the loop comes from them (or from dropout's global RNG, which
        # accelerate's checkpoints restore), which is what makes a resumed run bit-identical.
        rank_seed = config.seed + 1_000_003 * accelerator.process_index
        self.data_generator = torch.Generator().manual_seed(rank_seed)
        self.noise_generator = torch.Generator(device=accelerator.device).manual_seed(rank_seed + 1)
        self.step = 0
        self.position = DataPosition()
        self.ema: EMAModel | None = None
        self.deadline: float | None = None  # time.perf_counter() value at which the loop stops early, if any

    def setup_optimization(self, model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
        """EMA of `model` (if --use_ema), the optimizer over `trainable`, and the warmup + decay LR schedule."""
        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
        if device.type == "cuda" and not config.deterministic:
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
            torch.backends.cudnn.allow_tf32 = config.allow_tf32
        lr = scaled_learning_rate(config, accelerator.num_processes)
        if config.use_ema:
            self.ema = EMAModel(
                model.parameters(),
                decay=config.ema_decay,
                use_ema_warmup=True,
                inv_gamma=config.ema_inv_gamma,
                power=config.ema_power,
                model_cls=type(model),
                model_config=getattr(model, "config", None),
                foreach=True,
            )
            self.ema.to(device)
        self.optimizer = make_optimizer(config, trainable, lr)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=min(config.lr_warmup_steps, self.max_steps // 2),
            num_training_steps=self.max_steps,
        )
        self.accelerator.register_for_checkpointing(self.lr_scheduler)

    # -- what subclasses provide --------------------------------------------------------------------------------
    def micro_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def ema_parameters(self) -> Any:
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError

    def finish(self) -> Path:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.max_steps} steps"

    def periodic(self) -> None:
        """Extra work after each optimizer step (e.g. saving the model every N steps)."""

    # -- shared machinery ---------------------------------------------------------------------------------------
    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "noise": self.noise_generator}

    def resume(self) -> None:
        """Continue from --resume_from_checkpoint (a folder or 'latest'), restoring RNGs and the data position."""
        which = self.config.resume_from_checkpoint
        if not which:
            return
        path = find_checkpoint(self.output_dir, which)
        if path is None:
            self.accelerator.print(f"No checkpoint in {self.output_dir} yet: starting a new run.")
            return
        state = load_checkpoint(self.accelerator, path, ema=self.ema, generators=self.generators)
        self.step = state["step"]
        self.position = DataPosition(state["epoch"], state["batch_in_epoch"])
        self.accelerator.print(f"Resumed from {path} at step {self.step} (epoch {self.position.epoch}).")

    def save_checkpoint(self) -> None:
        state = {"epoch": self.position.epoch, "batch_in_epoch": self.position.batch_in_epoch}
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            state,
            ema=self.ema,
            generators=self.generators,
            total_limit=self.config.checkpoints_total_limit,
        )

    def optimizer_step(self) -> dict[str, torch.Tensor]:
        """Micro-steps until the accumulated gradients are applied, then the LR schedule and the EMA follow."""
        while True:
            losses = self.micro_step()
            if self.accelerator.sync_gradients:
                break
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.ema_parameters())
        self.step += 1
        return losses

    def past_deadline(self) -> bool:
        """Whether ``deadline`` has passed on any process (all of them must stop at the same step)."""
        from crispdiff.time_budget import agreed_seconds

        return agreed_seconds(self.accelerator, time.perf_counter() - (self.deadline or 0.0)) >= 0

    def due(self, every: int | None) -> bool:
        """True every `every` steps, except at the last step (the end of training does its own saving)."""
        return bool(every) and self.step % every == 0 and self.step < self.max_steps

    def _log(self, losses: dict[str, torch.Tensor], images_per_second: float, progress: tqdm) -> None:
        logs = {f"train/{k}": self.accelerator.gather(v).mean().item() for k, v in losses.items()}
        logs["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        logs["train/img_per_s"] = images_per_second
        first = next(iter(losses))
        progress.set_postfix(
            {
                first: f"{logs[f'train/{first}']:.4f}",
                "lr": f"{logs['train/lr']:.2e}",
                "img_s": f"{images_per_second:.1f}",
            }
        )
        self.accelerator.log(logs, step=self.step)

    def train(self) -> Path | None:
        """The loop, then the end of the run (trackers closed, process group torn down). Returns what `finish` saved
        (on the main process; None elsewhere)."""
        result = self.run()
        self.accelerator.end_training()
        return result

    def run(self) -> Path | None:
        """The loop and the final save, leaving the process group up for a later stage (e.g. the UNet after an
        adapted VAE). Returns what `finish` saved (on the main process; None elsewhere)."""
        config, accelerator = self.config, self.accelerator
        global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        accelerator.print(
            f"crispdiff: {self.describe()}, {self.max_steps} steps of {global_batch} images "
            f"({accelerator.num_processes} process(es), precision {accelerator.mixed_precision})."
        )
        progress = tqdm(
            total=self.max_steps,
            initial=self.step,
            disable=not accelerator.is_local_main_process,
            desc=self.progress_label,
        )
        window_start, window_images = time.perf_counter(), 0
        while self.step < self.max_steps:
            losses = self.optimizer_step()
            window_images += global_batch
            progress.update(1)
            if self.step % 10 == 0 or self.step == self.max_steps:
                self._log(losses, window_images / max(time.perf_counter() - window_start, 1e-9), progress)
                window_start, window_images = time.perf_counter(), 0
            if self.due(config.checkpointing_steps):
                self.save_checkpoint()
            if self.due(config.validation_steps):
                self.validate()
            self.periodic()  # no barrier per step: checkpoints synchronise on their own, exports happen on rank 0
            if self.deadline is not None and self.past_deadline():
                self.max_steps = self.step  # a time-boxed stage (e.g. the VAE adaptation): stop where it is
        progress.close()
        result = self.finish() if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        return result


def configure_kernels(config: LoopConfig) -> None:
    """Fast kernels by default, reproducible ones with --deterministic.

    Default: cuDNN benchmarks its convolution algorithms once per input shape (the shapes never change during a
    run) and keeps the fastest. That choice, and many CUDA kernels (atomic-add reductions in the backward pass), are
    non-deterministic, so a resumed GPU run drifts from an uninterrupted one in the last bits. --deterministic asks
    torch for deterministic algorithms everywhere (an error names any op that has none), turns benchmarking and TF32
    off and sets the cuBLAS workspace that deterministic matmuls need; it must run before CUDA is first used.
    """
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether peft LoRA adapters were injected into ``model`` (crispdiff.transfer sets ``peft_config`` then)."""
    return isinstance(getattr(model, "peft_config", None), dict)


def ema_copy(model: Any, ema: EMAModel | None) -> Any:
    """A standalone fp32 copy of a diffusers model carrying the EMA weights (the raw ones without EMA), in eval mode.

    The one place sampling, validation and export get their weights from: ``from_config`` builds fp32 and the
    trained weights are fp32 masters, so nothing is rounded on the way. A model carrying peft LoRA adapters
    (``--train_modules lora``) comes back with them merged: a plain model that loads without peft.
    """
    if has_adapters(model):
        from crispdiff.transfer import plain_copy

        return plain_copy(model, ema)
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.eval()


def start_run(config: LoopConfig) -> Accelerator:
    """Kernel settings, the Accelerator, CPU threads, logging and global seed of a run (before any model is built)."""
    configure_kernels(config)
    accelerator = make_accelerator(config)
    use_cpu_cores(config, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)
    return accelerator


def run_trainer(trainer: LoopTrainer) -> Path | None:
    """Save the config, start the trackers, resume if asked, and train."""
    config, accelerator = trainer.config, trainer.accelerator
    if accelerator.is_main_process:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        config.save_json(trainer.output_dir / trainer.config_file)
    if config.report_to != "none":
        accelerator.init_trackers(trainer.tracker_name, config=tracker_config(config))
    trainer.resume()
    return trainer.train()


class Trainer(LoopTrainer):
    """A diffusion UNet on a `TrainingSpace` (pixels or latents), saved as a crispdiff pipeline."""

    def __init__(
        self,
        config: TrainConfig,
        space: TrainingSpace,
        accelerator: Accelerator,
        unet: Any = None,
        trainable: list[torch.nn.Parameter] | None = None,
    ):
        """``unet``: a prebuilt denoiser (e.g. a pretrained one, crispdiff.transfer) instead of one built from the
        config; ``trainable``: the parameters the optimizer gets (default: all of them; frozen ones stay as given)."""
        super().__init__(config, accelerator, len(space))
        self.space = space
        device = accelerator.device
        self.class_names = space_class_names(space)
        if self.class_names and not 0.0 <= config.class_dropout_prob < 1.0:
            raise FlagError(f"--class_dropout_prob must be within [0, 1), got {config.class_dropout_prob}")
        num_class_embeds = len(self.class_names) + 1 if self.class_names else None  # + the null class, id N
        if unet is None:
            unet = unet_from_config(
                config, resolution=space.sample_size, in_channels=space.channels, num_class_embeds=num_class_embeds
            )
        elif getattr(unet.config, "num_class_embeds", None) != num_class_embeds:
            raise FlagError(
                f"the given UNet has num_class_embeds={getattr(unet.config, 'num_class_embeds', None)} but the data "
                f"has {len(self.class_names or [])} classes (--class_column), which need "
                f"{num_class_embeds} (the classes + the null class)"
            )
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        unet = unet.to(device)  # before the optimizer: fused AdamW must see its parameters on the device
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        self.num_parameters = count_parameters(unet)
        # .to() above kept the Parameter objects, so a `trainable` list made before it still names them
        self.setup_optimization(unet, list(unet.parameters()) if trainable is None else list(trainable))
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        if config.torch_compile:
            # in place (nn.Module.compile): state-dict keys, EMA, checkpoints and the saved pipeline are unchanged
            accelerator.unwrap_model(self.unet).compile(backend=config.torch_compile_backend)
        self.schedule = NoiseSchedule.from_config(config).to(device)
        prepare = getattr(space, "prepare", None)
        if callable(prepare):  # e.g. keep the uint8 images on the GPU when they fit
            prepare(device)

    def describe(self) -> str:
        auto = " auto" if self.config.class_column == AUTO_CLASS_COLUMN else ""
        classes = f", {len(self.class_names)}{auto} classes" if self.class_names else ""
        return f"{len(self.space)} training items{classes}, UNet with {describe_parameters(self.num_parameters)}"

    def class_labels(self, indices: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The micro-batch's class ids, each replaced by the null id N with probability --class_dropout_prob.

        The dropout coin comes from the noise generator (checkpointed), so a resumed run drops the same labels.
        None for an unconditional space.
        """
        if not self.class_names:
            return None
        labels = self.space.class_labels(indices, device)
        drop = torch.rand(batch_size, generator=self.noise_generator, device=self.noise_generator.device).to(device)
        return torch.where(drop < self.config.class_dropout_prob, len(self.class_names), labels)

    def ema_parameters(self) -> Any:
        return self.accelerator.unwrap_model(self.unet).parameters()

    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward on this process's micro-batch; returns the (unscaled) loss."""
        config, device = self.config, self.accelerator.device
        indices = self.batches.indices(self.position)
        x0 = self.space.x0(indices, self.data_generator, device)
        noise = sample_noise(tuple(x0.shape), self.noise_generator, device, config.noise_offset)
        t = self.schedule.sample_timesteps(x0.shape[0], self.noise_generator, device)
        x_t = self.schedule.add_noise(x0, noise, t)
        labels = self.class_labels(indices, x0.shape[0], device)
        if device.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with self.accelerator.accumulate(self.unet):
            model_output = self.unet(x_t, t, class_labels=labels).sample
            loss = self.schedule.loss(model_output, x0, noise, t, config.snr_gamma)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        return {"loss": loss.detach()}

    def sampling_unet(self) -> UNet2DModel:
        """A standalone copy of the UNet carrying the EMA weights (or the raw ones without EMA), in fp32."""
        return ema_copy(self.accelerator.unwrap_model(self.unet), self.ema).to(self.accelerator.device)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What `crispdiff.export` needs to build or save this run's pipeline (EMA weights, sampler, schedule)."""
        config = self.config
        return dict(
            unet=self.sampling_unet(),
            scheduler_base_config=scheduler_base_config(config),
            beta_schedule=config.beta_schedule,
            sampler=config.sampler,
            thresholding=config.thresholding,
            sr_strength=config.sr_strength,
            sharpen_amount=config.sharpen_amount or 0.0,
            class_names=self.class_names,
            guidance_scale=self.config.guidance_scale if self.class_names else 1.0,
            class_mix=self.auto_class_mix(),
            guidance_interval=self.config.guidance_interval if self.class_names else None,
            **self.space.pipeline_components(),
        )

    def auto_class_mix(self) -> list[float] | None:
        """With ``--class_column auto``: the clusters' shares of the training images, stored in the pipeline so that
        calls without labels (the user never named a class) sample the data's mix; None otherwise."""
        if self.config.class_column != AUTO_CLASS_COLUMN or not self.class_names:
            return None
        return class_mix(self.space.data.class_ids, len(self.class_names))

    def sample_grid(self, pipeline: Any) -> tuple[Any, torch.Tensor]:
        """The validation grid: always the same seed, so grids at different steps are comparable.

        A class-conditional model gets one row per class (in class-id order, ceil(images / classes) images each but at
        least 4, sampled with the pipeline's guidance scale), so every class can be seen to learn. With more than
        ``MAX_GRID_CLASS_ROWS`` classes (e.g. the emoji's 90 Unicode subcategories) rows of 4 would make a grid too tall
        to look at, so every class gets one tile instead, in class-id order, in a square grid.
        """
        generator = torch.Generator().manual_seed(self.config.seed)
        count, nrow, labels = self.grid_plan()
        images = pipeline(
            batch_size=count,
            num_inference_steps=self.config.validation_inference_steps,
            generator=generator,
            upscale=False,
            output_type="pt",
            class_labels=labels,
        ).images
        return make_grid(images, nrow=nrow, value_range=(0, 1)), images

    def grid_plan(self) -> tuple[int, int | None, list[int] | None]:
        """``(images, images per row or None for a square grid, class id of each or None)`` of the sample grid."""
        count, nrow, labels = self.config.num_validation_images, None, None
        if self.class_names:
            num_classes = len(self.class_names)
            if num_classes > MAX_GRID_CLASS_ROWS:
                per_class = 1  # make_grid's default layout is the square one
            else:
                per_class = nrow = max(4, math.ceil(count / num_classes))
            labels = [k for k in range(num_classes) for _ in range(per_class)]
            count = len(labels)
        return count, nrow, labels

    def grid_seconds(self) -> float:
        """Estimated seconds to sample one sample grid (and, per image, everything else sampled at the end)."""
        from crispdiff.time_budget import sampling_seconds

        count, _, labels = self.grid_plan()
        pipeline = build_pipeline(**self.pipeline_kwargs())
        return sampling_seconds(pipeline, count, self.config.validation_inference_steps, labels)

    def validate(self) -> None:
        """Sample a grid with the fast sampler (main process), save it and log it; optionally log metrics."""
        if not self.accelerator.is_main_process:
            return
        grid, images = self.sample_grid(build_pipeline(**self.pipeline_kwargs()))
        path = self.output_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(grid, path)
        logs: dict[str, float] = {}
        if self.config.validation_metrics:
            from crispdiff.metrics import compute_validation_metrics

            reference = self.space.reference_images(max(256, len(images)))
            logs.update({f"val/{k}": v for k, v in compute_validation_metrics(reference, images).items()})
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        if logs:
            self.accelerator.log(logs, step=self.step)

    def calibrated_sharpen_amount(self, pipeline: Any) -> float:
        """The unsharp amount that brings this model's samples to the training images' sharpness (and a log line).

        ``--sharpen_calibration_images`` samples, unsharpened, classes taken in turn, go through
        ``crispdiff.evaluate.sharpen_sweep`` against up to 2,000 training images; the sweep table is kept next to the
        pipeline in ``sharpen_calibration.json``.
        """
        from crispdiff.evaluate import NO_POSTPROCESS, generate_samples, sharpen_sweep

        count = self.config.sharpen_calibration_images
        labels = [k % len(self.class_names) for k in range(count)] if self.class_names else None
        samples = generate_samples(
            pipeline,
            count,
            steps=self.config.validation_inference_steps,
            seed=self.config.seed,
            upscale=False,
            class_labels=labels,
            postprocess=NO_POSTPROCESS,
        )
        sweep = sharpen_sweep(pipeline, samples, self.space.reference_images(2000))
        best = next(row for row in sweep["rows"] if row["amount"] == sweep["best_amount"])
        write_text_atomic(self.output_dir / "sharpen_calibration.json", json.dumps(sweep, indent=2) + "\n")
        self.accelerator.print(
            f"Unsharp amount calibrated on {count} samples: {sweep['best_amount']} (high-frequency ratio "
            f"{best['hf_energy_ratio']:.2f}, Laplacian ratio {best['laplacian_var_ratio']:.2f}; "
            f"--sharpen_amount was {sweep['pipeline_amount']})."
        )
        return float(sweep["best_amount"])

    def export(self, calibrate_sharpening: bool = False) -> Path:
        """Write the pipeline folder (EMA weights, DPM-Solver++ default, sample grid, training config).

        With ``calibrate_sharpening`` (the final export) and ``--sharpen_calibration_images``, the saved unsharp amount
        is the calibrated one, and the grid shows it.
        """
        kwargs = self.pipeline_kwargs()
        if calibrate_sharpening and self.config.sharpen_calibration_images:
            kwargs["sharpen_amount"] = self.calibrated_sharpen_amount(build_pipeline(**kwargs))
        grid, _ = self.sample_grid(build_pipeline(**kwargs))
        if self.config.sr_model_name_or_path:
            from crispdiff.sr import load_sr_model

            kwargs["sr_model"] = load_sr_model(self.config.sr_model_name_or_path)
        folder = save_pipeline(
            self.output_dir / "pipeline", training_config=self.config.to_dict(), sample_grid=grid, **kwargs
        )
        write_model_card(folder, self.config.to_dict())
        return folder

    def periodic(self) -> None:
        if self.due(self.config.save_model_steps) and self.accelerator.is_main_process:
            self.export()

    def finish(self) -> Path:
        folder = self.export(calibrate_sharpening=True)
        self.accelerator.print(f"Pipeline saved to {folder} (sample grid: {folder / 'samples.png'}).")
        if self.config.push_to_hub:
            self.accelerator.print(f"Uploaded to {maybe_push_to_hub(folder, self.config)}")
        return folder


def train(config: TrainConfig, space: TrainingSpace | None = None, budget: Any = None) -> Path | None:
    """Train a diffusion UNet as `config` says; `space` defaults to pixels of the configured image data.

    ``budget``: a ``crispdiff.time_budget.TimeBudget`` already running (the latent trainer starts it before encoding);
    by default one starts here when ``--time_budget_minutes`` is set.
    """
    from crispdiff.time_budget import TimeBudget

    if budget is None and config.time_budget_minutes:
        budget = TimeBudget(config.time_budget_minutes)
    check_output_dir(config)
    accelerator = start_run(config)
    if space is None:
        from crispdiff.data import load_images

        with accelerator.main_process_first():  # the first process builds the decode cache, the others reuse it
            space = PixelSpace(load_images(config, show_progress=accelerator.is_local_main_process))
    if budget is not None:
        config.max_train_steps = budgeted_steps(config, space, accelerator, budget)
        set_seed(config.seed)  # the real run starts from the seed the probe started from
    return run_trainer(Trainer(config, space, accelerator))


def budgeted_steps(config: TrainConfig, space: TrainingSpace, accelerator: Accelerator, budget: Any) -> int:
    """The UNet steps that end the run by ``budget``'s deadline, export included (``--time_budget_minutes``).

    A throwaway trainer, built like the real one, times a few steps and the sample grid (see
    ``crispdiff.time_budget``). A resumed run keeps the count its first part chose (saved in the output folder).
    """
    from crispdiff.time_budget import EXPORT_MARGIN, affordable_steps, agreed_seconds, seconds_per_step

    saved = Path(config.output_dir) / LoopTrainer.config_file
    if config.resume_from_checkpoint and saved.is_file() and find_checkpoint(config.output_dir, "latest"):
        steps = int(json.loads(saved.read_text())["max_train_steps"])
        accelerator.print(f"crispdiff: resuming a budgeted run of {steps} steps")
        return steps
    probe = Trainer(config, space, make_accelerator(config))
    per_step = seconds_per_step(probe)
    grid = agreed_seconds(accelerator, probe.grid_seconds())
    per_image = grid / probe.grid_plan()[0]
    del probe
    export = EXPORT_MARGIN * (grid + per_image * config.sharpen_calibration_images)
    # validation grids along the way cost a grid every --validation_steps steps
    per_step_with_validation = per_step + (grid / config.validation_steps if config.validation_steps else 0.0)
    steps = affordable_steps(budget.remaining() - export, per_step_with_validation)
    accelerator.print(
        f"crispdiff: time budget of {budget.minutes:g} min: {1000 * per_step:.0f} ms a step here and about "
        f"{export:.0f} s to export, so {steps} steps (to repeat this run exactly: --max_train_steps {steps})"
    )
    return steps
