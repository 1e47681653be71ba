"""The unsharp-mask sweep (``--sharpen_sweep``): the amount that matches the data's sharpness, saved in the pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.io import write_json_atomic
from crispdiff.evaluate.inputs import resize_images, to_float01
from crispdiff.evaluate.sharpness import sharpness_ratios

#: Unsharp-mask amounts ``--sharpen_sweep`` tries (0 = off), with the pipeline's own radius and threshold; steps of
#: 0.05, because the amount that fits upscaled output (whose ratios move fastest with it) often falls between 0.1s.
SHARPEN_SWEEP_AMOUNTS = tuple(round(0.05 * step, 2) for step in range(31))


def sharpen_sweep(
    pipeline: Any,
    unsharpened01: torch.Tensor,
    reference: torch.Tensor | np.ndarray,
    amounts: tuple[float, ...] = SHARPEN_SWEEP_AMOUNTS,
    upscaled: bool = False,
) -> dict[str, Any]:
    """Both sharpness ratios of the same samples under each unsharp amount, and the amount that matches the data best.

    Why: the right amount depends on how sharp the model is before post-processing, and that changes with training
    length (an amount that matches the data after a short run oversharpens the same model trained longer).
    Sharpening is post-processing, so one unsharpened sampling pass serves every amount.
    ``unsharpened01`` are the pipeline's outputs with ``sharpen_amount=0`` and ``gamma=1``; each amount goes through
    the pipeline's own ``postprocess`` (unsharp mask, then its gamma), so the figures are what the pipeline would
    give. The best amount is :func:`best_sharpen_amount`'s. ``upscaled``: the samples are the SR step's output,
    whose own amount is the pipeline's ``upscale_sharpen_amount`` (reported as ``pipeline_amount``).
    """
    ref01 = to_float01(reference)
    rows = []
    for amount in amounts:
        sharpened = pipeline.postprocess(unsharpened01, sharpen_amount=amount)
        ratios = sharpness_ratios(ref01, resize_images(sharpened, ref01.shape[-1]))
        rows.append(
            {
                "amount": amount,
                "hf_energy_ratio": ratios["hf_energy_ratio"],
                "laplacian_var_ratio": ratios["laplacian_var_ratio"],
            }
        )
    own = pipeline.default_sharpen_amount(upscaled)
    return {"rows": rows, "best_amount": best_sharpen_amount(rows), "pipeline_amount": own}


def best_sharpen_amount(rows: list[dict[str, float]]) -> float:
    """The amount of the row whose worse ratio is nearest 1: neither blurry nor noisy by either measure.

    Nearest in the ratios' own terms, as the sharpness band is set (1 +- the same margin), not on a log scale: when
    the two measures disagree (high-frequency share high, Laplacian low, as on outlined flat art after SR), a log
    distance counts the low ratio as further off and settles nearer the high ratio's edge of the band.
    """
    best = min(rows, key=lambda r: max(abs(r["hf_energy_ratio"] - 1), abs(r["laplacian_var_ratio"] - 1)))
    return best["amount"]


def save_sharpen_amount(pipeline_dir: str | os.PathLike, amount: float, upscaled: bool = False) -> Path:
    """Write ``amount`` as the saved pipeline's default unsharp mask (its model_index.json, atomically); ``upscaled``:
    the amount after its SR step (``upscale_sharpen_amount``)."""
    from crispdiff.publish.export import MODEL_INDEX_NAME, read_model_index

    index = read_model_index(pipeline_dir)  # clear errors for a missing folder or another kind of pipeline
    index["upscale_sharpen_amount" if upscaled else "sharpen_amount"] = amount
    return write_json_atomic(Path(pipeline_dir) / MODEL_INDEX_NAME, index, sort_keys=True)
