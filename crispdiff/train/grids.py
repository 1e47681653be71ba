"""What a UNet trainer's sample grids contain, and what they may cost.

A grid is sampled with the pipeline's own sampler, so it costs ``images x steps`` UNet evaluations, twice that with
classifier-free guidance. A training step costs about ``TRAIN_PASSES_PER_IMAGE`` evaluations per image (forward and
backward), so the two compare without a timer and the same on every machine. A grid the user did not size is shrunk to
``GRID_COMPUTE_SHARE`` of the training it follows: a short run on a big UNet (a 2-step fine-tune of a 36M-parameter
model on a CPU) would otherwise spend many times its training time on its pictures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: A class-conditional grid has one row per class up to this many classes, one tile per class beyond.
MAX_GRID_CLASS_ROWS = 16
#: The share of a run's training compute (between two grids, or to the end) that a default-sized grid may cost.
GRID_COMPUTE_SHARE = 0.1
#: The smallest grid shrinking goes to: fewer DPM-Solver++ steps or images are no longer worth looking at.
MIN_GRID_STEPS = 10
MIN_GRID_IMAGES = 4
#: UNet evaluations per training image per optimizer step: one forward pass, and a backward pass of about two.
TRAIN_PASSES_PER_IMAGE = 3


@dataclass(frozen=True)
class GridPlan:
    """One sample grid: its tiles' class ids (None: unconditional), images per row (None: square), sampler steps,
    and UNet passes per step (one, plus one for classifier-free guidance and one for autoguidance's guide model)."""

    count: int
    steps: int
    nrow: int | None = None
    labels: list[int] | None = None
    passes: int = 1
    shrunk_from: tuple[int, int] | None = None  # (images, steps) before shrinking to the compute share

    @property
    def guided(self) -> bool:
        return self.passes > 1

    @property
    def unet_evaluations(self) -> int:
        return self.count * self.steps * self.passes

    def describe(self) -> str:
        text = f"{self.count} images x {self.steps} steps"
        if self.guided:
            text += f" (guided: {self.passes} UNet passes a step)"
        if self.shrunk_from:
            images, steps = self.shrunk_from
            text += (
                f", shrunk from {images} x {steps} to cost at most {GRID_COMPUTE_SHARE:.0%} of the training it follows"
            )
        return text


def class_tiles(images: int, num_classes: int, fit: bool = False) -> tuple[list[int], int | None]:
    """The class id of each tile and the images per row of a class-conditional grid of about ``images`` images.

    Up to ``MAX_GRID_CLASS_ROWS`` classes: one row per class, ``images / classes`` per row but at least 4, so every
    class can be seen to learn; more classes (the emoji's 90 subcategories): one tile per class, in a square grid.
    ``fit``: at most ``images`` tiles (a shrunk grid): rows as long as fit, or, with fewer images than classes, one
    tile each for classes spread evenly over the ids.
    """
    if num_classes <= MAX_GRID_CLASS_ROWS and (not fit or images >= num_classes):
        per_class = images // num_classes if fit else max(4, math.ceil(images / num_classes))
        return [k for k in range(num_classes) for _ in range(per_class)], per_class if per_class > 1 else None
    if not fit or images >= num_classes:
        return list(range(num_classes)), None
    if images == 1:
        return [0], None
    return [round(i * (num_classes - 1) / (images - 1)) for i in range(images)], None


def affordable_grid(images: int, steps: int, passes: int, budget: float) -> tuple[int, int]:
    """``(images, steps)`` of a grid that costs at most ``budget`` UNet evaluations: fewer sampler steps first (down
    to ``MIN_GRID_STEPS``), then fewer images (down to ``MIN_GRID_IMAGES``); never more than asked, and the floors
    even when they cost more than the budget. ``passes``: UNet passes per sampler step."""
    if images * steps * passes <= budget:
        return images, steps
    steps = max(min(steps, MIN_GRID_STEPS), min(steps, int(budget // (images * passes))))
    images = max(min(images, MIN_GRID_IMAGES), min(images, int(budget // (steps * passes))))
    return images, steps


def user_sized(config: Any) -> bool:
    """Whether the user chose the grid's size: ``--num_validation_images`` or ``--validation_inference_steps`` (or
    diffusers' names for them) was passed, or set to something other than its default."""
    given = getattr(config, "explicit_flags", frozenset())
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    names = ("num_validation_images", "validation_inference_steps")
    return any(name in given or getattr(config, name) != defaults[name] for name in names)


def plan_grid(config: Any, class_names: list[str] | None, training_evaluations: float) -> GridPlan:
    """The grid for this config: ``--num_validation_images`` x ``--validation_inference_steps`` laid out by class
    (:func:`class_tiles`), shrunk (unless :func:`user_sized`) to ``GRID_COMPUTE_SHARE`` of ``training_evaluations``,
    the UNet evaluations of the training a grid follows."""
    count, steps = config.num_validation_images, config.validation_inference_steps
    guidance = bool(class_names) and config.guidance_scale != 1
    passes = 1 + int(guidance) + int(getattr(config, "autoguidance_scale", 1.0) > 1)
    if count <= 0:
        return GridPlan(0, steps)
    labels, nrow = class_tiles(count, len(class_names)) if class_names else (None, None)
    plan = GridPlan(len(labels) if labels else count, steps, nrow, labels, passes)
    if user_sized(config):
        return plan
    images, steps = affordable_grid(plan.count, steps, passes, GRID_COMPUTE_SHARE * training_evaluations)
    if (images, steps) == (plan.count, plan.steps):
        return plan
    labels, nrow = class_tiles(images, len(class_names), fit=True) if class_names else (None, None)
    return GridPlan(len(labels) if labels else images, steps, nrow, labels, passes, (plan.count, plan.steps))
