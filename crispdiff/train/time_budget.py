"""``--time_budget_minutes``: a run sized to end on time on this machine, instead of a step count.

Why: users' machines differ widely in speed, so a step count that fits a few minutes on one takes far longer on
another. With a budget the trainer measures how fast *this* machine is and sizes the run to fit; the steps it chose
are written into the run's resolved config (``max_train_steps``, the UNet rung's flags, ``adapt_vae_steps``), saved
with it, so the same run can be repeated exactly without the budget.

How: the UNet's learning-rate schedule (warm-up, then decay to zero) and its EMA warm-up depend on the total number of
steps, so that number is decided before the run starts, from a short probe: a throwaway trainer built exactly like
the real one, on the process's accelerator (released after), runs a few optimizer steps (the first ones are slower
and not counted), and one pipeline samples a couple of steps of the final sample grid, which gives the cost of the
export at the end. The real trainer is then
built from the same seed, so it is bit-identical to a run given ``--max_train_steps`` with the chosen count. The VAE
adaptation of the latent trainer (constant learning rate after warm-up) instead stops at its share of the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: Optimizer steps the probe runs before timing (allocations, first-call overheads), then the steps it times.
PROBE_WARMUP_STEPS = 2
PROBE_STEPS = 8

#: The export's estimated cost is multiplied by this, for what the estimate leaves out (saving, the model card).
EXPORT_MARGIN = 1.15

#: A budgeted run trains at least this many UNet steps, however tight the budget.
MIN_STEPS = 10


@dataclass
class TimeBudget:
    """A deadline: ``minutes`` from ``start`` (``time.perf_counter()`` when the job began)."""

    minutes: float
    start: float = field(default_factory=time.perf_counter)

    @property
    def deadline(self) -> float:
        return self.start + 60.0 * self.minutes

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.deadline - time.perf_counter()


def agreed_seconds(accelerator: Any, seconds: float) -> float:
    """The slowest process's ``seconds``: every process must size the run the same way or they would deadlock."""
    value = torch.tensor([float(seconds)], device=accelerator.device)
    return float(accelerator.gather(value).max())


def seconds_per_step(trainer: Any) -> float:
    """Wall seconds per optimizer step of ``trainer`` (it trains :data:`PROBE_STEPS` + warm-up steps: a throwaway)."""
    for _ in range(PROBE_WARMUP_STEPS):
        trainer.optimizer_step()
    trainer.accelerator.wait_for_everyone()
    started = time.perf_counter()
    for _ in range(PROBE_STEPS):
        trainer.optimizer_step()
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return agreed_seconds(trainer.accelerator, (time.perf_counter() - started) / PROBE_STEPS)


def sampling_seconds(pipeline: Any, batch_size: int, steps: int, class_labels: Any = None) -> float:
    """Estimated seconds for ``pipeline`` to sample ``batch_size`` images in ``steps`` steps, from 1- and 2-step calls.

    Two short calls separate the per-step cost (the UNet) from the fixed one (decoding, post-processing).
    """

    def timed(num_steps: int) -> float:
        started = time.perf_counter()
        pipeline(
            batch_size=batch_size,
            num_inference_steps=num_steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            upscale=False,
            class_labels=class_labels,
        )
        return time.perf_counter() - started

    pipeline.set_progress_bar_config(disable=True)
    one, two = timed(1), timed(2)
    per_step = max(two - one, 0.0)
    return max(one - per_step, 0.0) + per_step * steps


def affordable_steps(seconds: float, per_step: float) -> int:
    """How many steps of ``per_step`` seconds fit in ``seconds`` (at least :data:`MIN_STEPS`)."""
    return max(MIN_STEPS, int(seconds / max(per_step, 1e-9)))


@dataclass(frozen=True)
class ModelRung:
    """One UNet size a time budget can buy: its builder flags, and the fewest of its own optimizer steps the budget
    must afford before it is chosen over the rung below (a bigger model trained for too few steps is worse than a
    smaller one trained for many)."""

    name: str
    flags: dict[str, Any]
    min_steps: int = 0


def describe_rung_flags(flags: dict[str, Any]) -> str:
    """The rung's builder flags as a command line fragment (``--base_channels 48 --channel_mults 1 2 4``)."""
    parts = []
    for name, value in flags.items():
        parts.append(f"--{name} " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return " ".join(parts)


@dataclass(frozen=True)
class RungCost:
    """What a probe measured for one rung: seconds per optimizer step, seconds to export, parameters."""

    per_step: float
    export: float
    parameters: int


def climb_ladder(rungs: list[ModelRung], remaining: Any, cost_of: Any) -> tuple[ModelRung | None, int, RungCost]:
    """The biggest rung whose affordable steps reach its ``min_steps``, with those steps and its cost.

    ``rungs`` smallest first (the first is always taken; ``[]`` stands for the config's own UNet, passed to
    ``cost_of`` as None); ``remaining()`` gives the seconds left, ``cost_of(rung)`` probes a rung. Rungs are
    probed upwards and the climb stops at the first that does not qualify: bigger ones cost more per step.
    """
    chosen: tuple[ModelRung | None, int, RungCost] | None = None
    for rung in rungs or [None]:
        cost = cost_of(rung)
        steps = affordable_steps(remaining() - cost.export, cost.per_step)
        if chosen is not None and steps < rung.min_steps:
            break
        chosen = (rung, steps, cost)
    assert chosen is not None
    return chosen
