"""The shared loop's own arithmetic (crispdiff.train.loop.LoopTrainer) on a one-layer model small enough to check by
hand: what is logged and when, and what a step the fp16 loss scaler skipped may not move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crispdiff.core.config import LoopConfig, TrainConfig
from crispdiff.core.flags import parse_config
from crispdiff.train.loop import LoopTrainer, run_trainer
from crispdiff.train.process import make_accelerator

NUM_ITEMS = 16


class LineTrainer(LoopTrainer):
    """A one-layer model fitting y = 2x on ``NUM_ITEMS`` points through the real loop (accelerate, optimizer, LR
    schedule, EMA, checkpoints); it remembers every micro-batch's loss and indices. At the steps in ``inf_at_steps``
    its loss (and so every gradient) is infinite, as an fp16 overflow makes it."""

    def __init__(self, config: LoopConfig, accelerator, inf_at_steps: tuple[int, ...] = ()):
        super().__init__(config, accelerator, NUM_ITEMS)
        torch.manual_seed(config.seed)
        model = torch.nn.Linear(1, 1)
        self.setup_optimization(model, list(model.parameters()))
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.inf_at_steps = set(inf_at_steps)
        self.micro_losses: list[float] = []
        self.weights_after_step: list[torch.Tensor] = []

    def micro_step(self) -> dict[str, torch.Tensor]:
        indices = self.batches.indices(self.position)
        x = indices.float().unsqueeze(1) / NUM_ITEMS
        x = x + 0.01 * torch.randn(x.shape, generator=self.data_generator)
        with self.accelerator.accumulate(self.model):
            loss = torch.nn.functional.mse_loss(self.model(x), 2 * x)
            if self.step + 1 in self.inf_at_steps:
                loss = loss * float("inf")
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position = self.batches.advance(self.position)
        self.micro_losses.append(loss.item())
        return {"loss": loss.detach()}

    def optimizer_step(self) -> dict[str, torch.Tensor]:
        losses = super().optimizer_step()
        self.weights_after_step.append(self.accelerator.unwrap_model(self.model).weight.detach().clone())
        return losses

    def ema_parameters(self):
        return self.accelerator.unwrap_model(self.model).parameters()

    def log_validation(self) -> None:
        pass

    def finish(self) -> Path:
        return self.output_dir


def line_config(output_dir: Path, **overrides) -> LoopConfig:
    values = dict(
        output_dir=str(output_dir),
        train_batch_size=2,
        max_train_steps=6,
        learning_rate=0.1,
        lr_scheduler="linear",
        lr_warmup_steps=0,
        checkpointing_steps=0,
        validation_steps=0,
        report_to="none",
        ema_decay=0.9,
    )
    values.update(overrides)
    return LoopConfig(**values)


def logged_scalars(output_dir: Path, tag: str) -> dict[int, float]:
    """Every value tensorboard received for ``tag``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file written"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_the_logged_loss_is_the_mean_of_the_accumulation_window_every_logging_steps(tmp_path):
    """With 3 micro-batches per step, each logged loss is the mean of that step's 3, not the last one's; and it is
    logged every --logging_steps steps and at the last."""
    config = line_config(
        tmp_path / "run", gradient_accumulation_steps=3, max_train_steps=7, logging_steps=3, report_to="tensorboard"
    )
    trainer = LineTrainer(config, make_accelerator(config))
    run_trainer(trainer)
    logged = logged_scalars(tmp_path / "run", "train/loss")
    assert sorted(logged) == [3, 6, 7]
    for step, value in logged.items():
        window = trainer.micro_losses[3 * (step - 1) : 3 * step]
        assert value == pytest.approx(sum(window) / 3, rel=1e-6), (step, value, window)
        assert value != pytest.approx(window[-1], rel=1e-3)  # the window's losses differ: the test can tell


def test_logging_steps_must_be_positive(tmp_path):
    from crispdiff.core.errors import FlagError

    config = line_config(tmp_path / "run", logging_steps=0)
    with pytest.raises(FlagError, match="--logging_steps"):
        LineTrainer(config, make_accelerator(config))


def fp16_accelerator_with_a_loss_scaler(config: LoopConfig):
    """An Accelerator with a real torch GradScaler. On a GPU, ``--mixed_precision fp16`` makes accelerate create
    one; on the CPU it makes none, so the test hands it one before anything is prepared: the scaling, the overflow
    check and the skipped step are then the real ones (accelerate's optimizer wrapper, torch's scaler)."""
    accelerator = make_accelerator(config)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return accelerator


def test_a_step_the_loss_scaler_skipped_moves_neither_the_lr_schedule_nor_the_ema(tmp_path):
    """Steps 3 and 4 overflow: the scaler skips their updates (the weights stay), and the LR schedule and the EMA
    must stay too, so the run's later steps get the LR and EMA decay of the updates that really happened."""
    config = line_config(tmp_path / "run", max_train_steps=6)
    trainer = LineTrainer(config, fp16_accelerator_with_a_loss_scaler(config), inf_at_steps=(3, 4))
    run_trainer(trainer)
    weights = trainer.weights_after_step
    assert torch.equal(weights[2], weights[1]) and torch.equal(weights[3], weights[1]), "the scaler skipped 3 and 4"
    assert not torch.equal(weights[4], weights[3])
    assert trainer.step == 6, "a skipped step still counts as a step of the run"
    assert trainer.lr_scheduler.last_epoch == 4, "the LR schedule advanced on the 4 applied updates only"
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1 * (6 - 4) / 6)  # linear decay over 6 steps
    assert trainer.ema.optimization_step == 4, "the EMA averaged the 4 applied updates only"


def test_stages_on_the_process_accelerator_train_and_checkpoint_as_if_each_had_its_own(tmp_path):
    """One Accelerator per process, made from the run's config and handed to each stage (the VAE adaptation, one
    micro-batch a step, then the UNet, here three): each stage trains with its own accumulation, and the first is
    released when it ends, so each ends with the weights and the checkpoint (its own model, optimizer and LR schedule
    only) of the same stage run on an Accelerator of its own."""
    import dataclasses
    import os

    first = line_config(tmp_path / "first", checkpointing_steps=3, seed=1)
    second = line_config(tmp_path / "second", gradient_accumulation_steps=3, checkpointing_steps=3)
    shared = make_accelerator(second)
    stages = []
    for config in (first, second):
        stages.append(LineTrainer(config, shared))
        run_trainer(stages[-1], end_run=False)
    listing = lambda out: sorted(os.listdir(Path(out) / "checkpoint-3"))  # noqa: E731
    for stage, config in zip(stages, (first, second)):
        own = dataclasses.replace(config, output_dir=str(tmp_path / f"alone-{config.seed}"))
        alone = LineTrainer(own, make_accelerator(own))
        run_trainer(alone, end_run=False)
        assert len(stage.weights_after_step) == len(alone.weights_after_step) == 6
        assert all(torch.equal(a, b) for a, b in zip(stage.weights_after_step, alone.weights_after_step))
        assert listing(config.output_dir) == listing(own.output_dir)
    assert "custom_checkpoint_1.pkl" not in listing(second.output_dir)  # the first stage's LR schedule is not in it


def test_a_resolved_config_is_read_only_and_a_stage_decides_values_into_a_new_one():
    """parse_config returns the resolved run config: defaults that depend on other flags are filled in (a guidance
    interval spanning every noise level is stored as none), resolving it again returns it, and nothing writes into it;
    what a stage decides (the time budget's steps) goes into a copy that keeps the flags the user gave."""
    import dataclasses

    config = parse_config(TrainConfig, ["--class_column", "kind", "--guidance_interval", "0", "inf"])
    assert config.is_resolved and config.resolve() is config and config.guidance_interval is None
    with pytest.raises(dataclasses.FrozenInstanceError, match="with_values"):
        config.max_train_steps = 5
    budgeted = config.with_values(max_train_steps=5)
    assert budgeted.max_train_steps == 5 and config.max_train_steps is None and budgeted.is_resolved
    assert budgeted.explicit_flags == config.explicit_flags == {"class_column", "guidance_interval"}
    with pytest.raises(TypeError, match="no field max_steps"):
        config.with_values(max_steps=5)
    unresolved = TrainConfig(class_column="kind", guidance_interval=[0.0, float("inf")])
    assert unresolved.resolve().guidance_interval is None and unresolved.guidance_interval is not None
