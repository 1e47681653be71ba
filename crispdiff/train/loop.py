"""The one training loop every crispdiff trainer runs (diffusion UNets, VAEs, LoRA on Stable Diffusion).

It follows accelerate's examples: accelerate handles devices, precision (fp16 with loss scaling, bf16), gradient
accumulation and distribution; crispdiff adds what diffusers' example scripts lack: data that is decoded once, an
exact resume (model, EMA, optimizer, scaler, LR schedule, every RNG and the data position), validation grids, and a
saved pipeline that samples with DPM-Solver++ out of the box. Subclasses fill in the hooks (``micro_step``,
``ema_parameters``, ``log_validation``, ``finish``, ``describe``, optionally ``periodic``; see ``LoopTrainer``);
:class:`crispdiff.train.unet_trainer.UNetTrainer` is the diffusion one.

A process makes one ``Accelerator`` (:mod:`crispdiff.train.process`) and hands it to each stage it runs: a stage
that another follows (the VAE adaptation before the UNet, a time-budget probe) runs ``train_stage`` or only steps, then
``release_stage`` clears what it registered with the accelerator, so the next stage's checkpoints hold its own state
only; the last stage runs ``train_and_end_run``. Step counts, the learning rate and the optimizer are
:mod:`crispdiff.train.optimization`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from crispdiff.core.config import LoopConfig
from crispdiff.core.diffusers_flags import defaults_note
from crispdiff.core.errors import FlagError, OutputExistsError, TrainingDivergedError
from crispdiff.train.checkpoint import (
    check_same_run,
    checkpoints_to_replace,
    find_checkpoint,
    identity_hash,
    load_checkpoint,
    new_run_id,
    read_state,
    remove_checkpoints,
    run_identity,
    save_checkpoint,
)
from crispdiff.train.lora import has_adapters, plain_copy
from crispdiff.train.optimization import (
    epochs_to_steps,
    images_per_optimizer_step,
    make_optimizer,
    scaled_learning_rate,
    total_train_steps,
    warmup_steps,
)
from crispdiff.train.process import release_stage

logger = logging.getLogger("crispdiff")


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

    @property
    def images_per_batch(self) -> int:
        """Images in one global micro-batch (every process's slice together)."""
        return self.batch_size * self.num_processes

    def position_after(self, epoch: int, images: int) -> DataPosition:
        """The first micro-batch of ``epoch`` none of whose images is among its first ``images`` (the images other
        processes or batch sizes had seen: a run resumed with a different layout continues from there)."""
        batch = math.ceil(images / self.images_per_batch)
        return DataPosition(epoch, batch) if batch < self.batches_per_epoch else DataPosition(epoch + 1, 0)

    def advance(self, position: DataPosition) -> DataPosition:
        if position.batch_in_epoch + 1 < self.batches_per_epoch:
            return DataPosition(position.epoch, position.batch_in_epoch + 1)
        return DataPosition(position.epoch + 1, 0)


def loss_scale(accelerator: Accelerator) -> float | None:
    """The fp16 loss scaler's current scale (None without one: fp32 and bf16 runs)."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None


def step_was_skipped(accelerator: Accelerator, scale_before: float | None) -> bool:
    """Whether the fp16 loss scaler skipped the optimizer step just taken (its gradients overflowed).

    accelerate's ``optimizer_step_was_skipped`` alone misses it for a fused AdamW (crispdiff's default wherever torch
    has the kernel): torch hands the overflow check to the fused kernel, so the step is "called" and skipped inside
    it. A skipped step always lowers the scale (``GradScaler.update`` backs off on an overflow and never otherwise),
    so that is checked too.
    """
    if scale_before is None:
        return False
    return accelerator.optimizer_step_was_skipped or loss_scale(accelerator) < scale_before


def tracker_config(config: LoopConfig) -> dict[str, Any]:
    """Tensorboard's hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()}


def check_output_dir(
    config: LoopConfig, subfolder: str = "pipeline", marker: str = "model_index.json", what: str = "a trained pipeline"
) -> None:
    """Refuse to silently replace a finished model (``OUTPUT_DIR/subfolder/marker``) unless asked to
    (--overwrite_output_dir) or resuming, and with --push_to_hub make sure the Hub repo can be written; every trainer
    calls it before spending time on anything else."""
    folder = Path(config.output_dir) / subfolder
    if (folder / marker).exists() and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise OutputExistsError(
            f"{folder} already holds {what}; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint latest to continue, or choose another --output_dir"
        )
    if not config.resume_from_checkpoint:  # a fresh run: no earlier run's checkpoints may stay (see LoopTrainer.resume)
        for run_folder in [Path(config.output_dir), *sorted(Path(config.output_dir).glob("*/"))]:
            checkpoints_to_replace(run_folder, None, fresh=True, overwrite=config.overwrite_output_dir)
    if getattr(config, "push_to_hub", False) and int(os.environ.get("RANK", "0")) == 0:
        from crispdiff.publish.hub import check_hub_access, hub_repo_id

        check_hub_access(hub_repo_id(config), bool(config.hub_private_repo), config.hub_token)


class LoopTrainer:
    """What every crispdiff trainer shares: batches, steps, generators, EMA, LR schedule, checkpoints, the loop.

    A subclass builds its models, then calls `setup_optimization`, and implements `micro_step` (one forward and
    backward under `accelerator.accumulate`, returning named scalar losses; the first one is shown in the progress
    bar), `ema_parameters`, `log_validation` (every --validation_steps: sample grids or held-out metrics) and
    `finish` (the final save, on the main process); optionally `describe`, `periodic` and `generators`.
    """

    config_file = "crispdiff_training.json"
    tracker_name = "crispdiff"
    progress_label = "train"

    def __init__(self, config: LoopConfig, accelerator: Accelerator, num_items: int):
        if config.logging_steps < 1:
            raise FlagError(f"--logging_steps must be >= 1 (log every N optimizer steps), got {config.logging_steps}")
        self.config = config
        self.accelerator = accelerator
        # the process's Accelerator may have run a stage with other settings (the VAE adaptation before the UNet)
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
        self.output_dir = Path(config.output_dir)
        self.batches = EpochBatches(
            num_items, config.train_batch_size, accelerator.num_processes, accelerator.process_index, config.seed
        )
        self.max_steps = total_train_steps(config, self.batches.batches_per_epoch)
        # Separate, checkpointed generators: data augmentation on the CPU; noise, timesteps and posterior samples
        # on the device. Every random draw of the loop comes from them (or from dropout's global RNG, which
        # accelerate's checkpoints restore), which is what makes a resumed run bit-identical.
        self.data_generator = torch.Generator()
        self.noise_generator = torch.Generator(device=accelerator.device)
        self.seed_generators()
        self.step = 0
        self.position = DataPosition()
        self.ema: EMAModel | None = None
        self.deadline: float | None = None  # time.perf_counter() value at which the loop stops early, if any
        self.run_id: str | None = None  # set by resume(): this run's, or the resumed checkpoint's
        self.identity: dict[str, str] = {}  # set by setup_optimization(): what a checkpoint must share to resume

    def seed_generators(self, offset: int = 0) -> None:
        """Seed this process's generators from --seed, its rank and ``offset`` (a different stream per rank)."""
        rank_seed = self.config.seed + 1_000_003 * self.accelerator.process_index + offset
        self.data_generator.manual_seed(rank_seed)
        self.noise_generator.manual_seed(rank_seed + 1)

    def setup_optimization(self, model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
        """EMA of `model` (if --use_ema), the optimizer over `trainable`, and the warmup + decay LR schedule."""
        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
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
        self.identity = run_identity(config, model, trainable, self.batches.num_items)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=warmup_steps(config, self.max_steps),
            num_training_steps=self.max_steps,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        self.accelerator.register_for_checkpointing(self.lr_scheduler)

    # -- what subclasses provide --------------------------------------------------------------------------------
    def micro_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def ema_parameters(self) -> Any:
        raise NotImplementedError

    def log_validation(self) -> None:
        raise NotImplementedError

    def finish(self) -> Path:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.max_steps} steps"

    def periodic(self) -> None:
        """Extra work after each optimizer step (e.g. saving the model every N steps)."""

    def process_state(self) -> dict[str, Any]:
        """What this process alone must restore to continue (e.g. its place in a stream), saved per process."""
        return {}

    def restore_process_state(self, state: dict[str, Any]) -> None:
        """Restore ``process_state``'s values (nothing here; a checkpoint of another process count has none)."""

    # -- shared machinery ---------------------------------------------------------------------------------------
    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "noise": self.noise_generator}

    def resume(self) -> None:
        """Continue from --resume_from_checkpoint (a folder or 'latest') if there is one, else start fresh; either
        way the output folder is then this run's alone.

        Resuming checks that the checkpoint is one of this kind of run (``checkpoint.check_same_run``) and keeps its
        run id; a fresh run gets a new one. Other runs' checkpoints in the folder are refused, or removed with
        --overwrite_output_dir, before anything is written (``checkpoint.checkpoints_to_replace``), so ``latest``
        and --checkpoints_total_limit only ever see this run's.
        """
        config, accelerator = self.config, self.accelerator
        which = config.resume_from_checkpoint
        path = find_checkpoint(self.output_dir, which) if which else None
        if which and path is None:
            accelerator.print(f"No checkpoint in {self.output_dir} yet: starting a new run.")
        saved = read_state(path) if path is not None else {}
        if path is not None:
            check_same_run(path, saved, self.identity)
        self.run_id = broadcast_object_list([saved.get("run_id") or new_run_id()])[0]  # the main process's
        foreign = checkpoints_to_replace(self.output_dir, self.run_id, path is None, config.overwrite_output_dir)
        accelerator.wait_for_everyone()  # every process has looked before the main one removes anything
        if foreign and accelerator.is_main_process:
            remove_checkpoints(foreign)
            accelerator.print(
                f"crispdiff: removed {len(foreign)} checkpoint(s) of another run from {self.output_dir} "
                "(--overwrite_output_dir)"
            )
        accelerator.wait_for_everyone()
        if path is None:
            return
        state = load_checkpoint(accelerator, path, ema=self.ema, generators=self.generators)
        self.step = state["step"]
        self.position = DataPosition(state["epoch"], state["batch_in_epoch"])
        self.restore_process_state(state.get("process_state", {}))
        self.continue_with_this_layout(path, state)
        accelerator.print(f"Resumed from {path} at step {self.step} (epoch {self.position.epoch}).")

    def continue_with_this_layout(self, path: Path, state: dict[str, Any]) -> None:
        """A checkpoint written with another number of processes (or batch size) continues here, not bit-exactly.

        The data position is mapped by images seen: the epoch's order does not depend on the layout, so the run
        picks up at the first micro-batch after the images already seen in the epoch. Each process's generators
        (and global RNG) are reseeded from --seed, its rank and the step: with another number of processes there
        is no rank-for-rank continuation of the saved streams.
        """
        accelerator = self.accelerator
        saved_processes = state.get("num_processes", accelerator.num_processes)
        saved_batch = state.get("images_per_batch", self.config.train_batch_size * saved_processes)
        if saved_batch != self.batches.images_per_batch:
            seen = self.position.batch_in_epoch * saved_batch
            self.position = self.batches.position_after(self.position.epoch, seen)
        if saved_processes == accelerator.num_processes:
            return
        self.seed_generators(offset=7_919 * self.step)
        set_seed(self.config.seed + self.step, device_specific=True)
        logger.warning(
            "crispdiff: %s was written by %d process(es) and this run has %d: it resumes at step %d, but no longer "
            "bit-exactly: the data continues after the images already seen in epoch %d, and every process's random "
            "streams are reseeded. Resume with %d process(es) for an exact continuation.",
            path,
            saved_processes,
            accelerator.num_processes,
            self.step,
            self.position.epoch,
            saved_processes,
        )

    def save_checkpoint(self) -> None:
        self.run_id = self.run_id or new_run_id()  # a loop run without resume() (a probe) is a fresh run too
        state = {
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "images_per_batch": self.batches.images_per_batch,
            "run_id": self.run_id,
            "run_hash": identity_hash(self.identity),
            "run_identity": self.identity,
        }
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            state,
            ema=self.ema,
            generators=self.generators,
            total_limit=self.config.checkpoints_total_limit,
            process_state=self.process_state(),
        )

    def optimizer_step(self) -> dict[str, torch.Tensor]:
        """Micro-steps until the accumulated gradients are applied, then the LR schedule and the EMA follow; returns
        each loss averaged over the accumulation window (the gradient applied is that window's mean too).

        A step the fp16 loss scaler skipped (an overflow: the weights did not change) counts as a step of the run but
        moves neither the LR schedule nor the EMA, as accelerate's own prepared schedulers do: otherwise every early
        overflow would shorten the warm-up and pull the EMA towards weights that did not change.
        """
        window: dict[str, list[torch.Tensor]] = {}
        scale_before = loss_scale(self.accelerator)
        while True:
            for name, value in self.micro_step().items():
                window.setdefault(name, []).append(value.detach().float())
            if self.accelerator.sync_gradients:
                break
        if not step_was_skipped(self.accelerator, scale_before):
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.ema_parameters())
        self.step += 1
        return {name: torch.stack(values).mean() for name, values in window.items()}

    def past_deadline(self) -> bool:
        """Whether ``deadline`` has passed on any process (all of them must stop at the same step)."""
        from crispdiff.train.time_budget import agreed_seconds

        return agreed_seconds(self.accelerator, time.perf_counter() - (self.deadline or 0.0)) >= 0

    def every(self, steps: int | None, epochs: int | None) -> int | None:
        """A period in optimizer steps: ``epochs`` (diffusers' per-epoch flags) when given, else ``steps``."""
        if epochs:
            return epochs_to_steps(self.config, epochs, self.batches.batches_per_epoch)
        return steps

    def log_grid(self, name: str, grid: Any) -> None:
        """A sample grid (PIL image) to every tracker that takes images: tensorboard and wandb, whichever is set."""
        import numpy as np

        array = np.asarray(grid)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, array, self.step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [array]}, step=self.step)

    def due(self, every: int | None) -> bool:
        """True every `every` steps, except at the last step (the end of training does its own saving)."""
        return bool(every) and self.step % every == 0 and self.step < self.max_steps

    def _log(self, losses: dict[str, torch.Tensor], images_per_second: float, progress: tqdm) -> None:
        logs = {f"train/{k}": self.accelerator.gather(v).mean().item() for k, v in losses.items()}
        if not all(math.isfinite(value) for value in logs.values()):
            raise TrainingDivergedError(
                f"the loss became {', '.join(f'{v:g}' for v in logs.values())} by step {self.step}: the run diverged "
                f"and training on would only waste time. Start again with a lower --learning_rate (this run's peak: "
                f"{self.config.learning_rate:g})"
            )
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

    def train_and_end_run(self) -> Path | None:
        """``train_stage``, then the end of the run (trackers closed, process group torn down): the last stage of a
        process. Returns what `finish` saved (on the main process; None elsewhere)."""
        result = self.train_stage()
        self.accelerator.end_training()
        return result

    def train_stage(self) -> Path | None:
        """The loop and the final save, leaving the process group up for a later stage (e.g. the UNet after an
        adapted VAE). Returns what `finish` saved (on the main process; None elsewhere)."""
        config, accelerator = self.config, self.accelerator
        images_per_step = images_per_optimizer_step(config, accelerator.num_processes)
        accelerator.print(
            f"crispdiff: {self.describe()}, {self.max_steps} steps of {images_per_step} images "
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
            window_images += images_per_step
            progress.update(1)
            if self.step % config.logging_steps == 0 or self.step == self.max_steps:
                self._log(losses, window_images / max(time.perf_counter() - window_start, 1e-9), progress)
                window_start, window_images = time.perf_counter(), 0
            if self.due(config.checkpointing_steps):
                self.save_checkpoint()
            with untouched_rng():  # sampling and building modules here must not move dropout's RNG (exact resume)
                if self.due(self.every(config.validation_steps, config.validation_epochs)):
                    self.log_validation()
                self.periodic()  # no barrier per step: checkpoints synchronise on their own, exports on rank 0
            if self.deadline is not None and self.past_deadline():
                self.max_steps = self.step  # a time-boxed stage (e.g. the VAE adaptation): stop where it is
        progress.close()
        result = self.finish() if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        return result


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Leave torch's global RNGs (CPU and every CUDA device) as they were found.

    Training's own draws come from seeded generators, but dropout draws from the global RNG, which checkpoints save.
    Validation grids and exports sample and build modules (``from_config`` initialises weights from that RNG); a
    checkpoint written just before them would hold the RNG state from before, so a run resumed from it would diverge
    from one that ran on. Work inside this block leaves no trace.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def ema_copy(model: Any, ema: EMAModel | None) -> Any:
    """A standalone fp32 copy of a diffusers model carrying the EMA weights (the raw ones without EMA), in eval mode.

    The one place sampling, validation and export get their weights from: ``from_config`` builds fp32 and the
    trained weights are fp32 masters, so nothing is rounded on the way. A model carrying peft LoRA adapters
    (``--train_modules lora``) comes back with them merged: a plain model that loads without peft.
    """
    if has_adapters(model):
        return plain_copy(model, ema)
    copy = type(model).from_config(model.config)
    copy.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.eval()


def run_trainer(trainer: LoopTrainer, *, end_run: bool = True) -> Path | None:
    """Save the config, start the trackers, resume if asked, and train. ``end_run=False``: a stage another follows
    in this process (``LoopTrainer.train_stage``, then ``release_stage``), leaving the process group up."""
    config, accelerator = trainer.config, trainer.accelerator
    note = defaults_note(config)
    if note:
        accelerator.print(note)
    if accelerator.is_main_process:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        config.save_json(trainer.output_dir / trainer.config_file)
    if config.report_to != "none":
        accelerator.init_trackers(trainer.tracker_name, config=tracker_config(config))
    trainer.resume()
    if end_run:
        return trainer.train_and_end_run()
    result = trainer.train_stage()
    release_stage(trainer.accelerator)
    return result
