"""Evaluating a pipeline (or a file of samples) against reference images: metrics.json, a sample grid, a report.

Every number is written beside the same metric measured between two disjoint halves of the reference data (the
real-vs-real floor, see :func:`crispdiff.evaluate.metrics.real_vs_real_floor`), because SWD, FID and friends have no
absolute scale: the same SWD can be excellent with 1,000 images and out of reach with 100.

Resolution policy: the comparison happens at the *reference* resolution (the model's training resolution unless
``--resolution`` says otherwise). Samples larger than that (``--upscale`` with an SR model) are downscaled with an
antialiased bicubic filter for SWD, sharpness ratios, colour blobs, memorisation and FID, so an upscaled model is
judged on the same grid as its data. Their sharpness is *also* reported at the output resolution, against the
reference upscaled with bicubic interpolation: there 1.0 means "as sharp as a plain bicubic upscale of real images"
and a useful SR model reads above 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.config import AUTO_CLASS_COLUMN
from crispdiff.core.errors import DataError, FlagError
from crispdiff.evaluate.inputs import resize_images, to_float01
from crispdiff.evaluate.memorisation import NEAR_COPY_FACTOR, real_nn_distances
from crispdiff.evaluate.metrics import compute_all, real_vs_real_floor, split_reference
from crispdiff.evaluate.report import write_outputs
from crispdiff.evaluate.sampling import (
    NO_POSTPROCESS,
    conditioning_plan,
    generate_samples,
    load_samples_npz,
    native_resolution,
    save_samples_npz,
    training_resolution,
    training_setting,
)
from crispdiff.evaluate.sharpen import save_sharpen_amount, sharpen_sweep
from crispdiff.evaluate.sharpness import sharpness_ratios


def load_reference_data(
    reference: str | None,
    resolution: int,
    *,
    cache_dir: str | None = None,
    max_images: int | None = None,
    background: str = "white",
    class_column: str | None = None,
) -> Any:
    """The reference as ``crispdiff.data.loading.load_images`` reads it (an ``ImageData``; with ``class_column``, its
    classes).

    ``reference`` is an image folder, a folder written by ``datasets``' ``save_to_disk``, a Hub dataset id, or
    ``None`` / ``"default"`` for the embedded emoji subset.
    """
    from crispdiff.core.config import DataConfig
    from crispdiff.data.loading import is_saved_dataset, load_images

    config = DataConfig(
        resolution=int(resolution),
        center_crop=True,
        cache_dir=cache_dir,
        background=background,
        max_train_samples=max_images,
    )
    config.class_column = class_column  # read by load_images; DataConfig itself has no class flag
    if reference not in (None, "", "default"):
        path = Path(str(reference)).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            config.train_data_dir = str(path)
        else:
            config.dataset_name = str(reference)
    return load_images(config, show_progress=False)


def load_reference(
    reference: str | None,
    resolution: int,
    *,
    cache_dir: str | None = None,
    max_images: int | None = None,
    background: str = "white",
) -> torch.Tensor:
    """Reference images as uint8 [N, 3, R, R] centre crops (see :func:`load_reference_data` for ``reference``).

    Centre crops, not random ones, so the reference is the same on every run.
    """
    data = load_reference_data(reference, resolution, cache_dir=cache_dir, max_images=max_images, background=background)
    return data.center_crops()


def evaluate_samples(
    samples: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    *,
    seed: int = 0,
    memorisation: bool = True,
    fid: bool = True,
    inception_weights: str | None = None,
    device: str | torch.device = "cpu",
    swd_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics for ``samples`` against ``reference``, and the real-vs-real floor, as a JSON-ready dict.

    Layout: ``generated`` and ``real_vs_real_floor`` hold the same keys (see
    ``crispdiff.evaluate.metrics.compute_all``); ``output_resolution`` (only when samples are larger than the reference)
    holds sharpness at the samples' own size against a bicubic upscale of the reference; ``settings`` records counts,
    sizes and the seed.

    Both sides compare against the same reference subset A, and the generated side is measured against the whole
    reference for memorisation (the floor against the reference minus its own half), with one shared near-copy
    threshold computed from the full reference.
    """
    samples01 = to_float01(samples)
    ref01 = to_float01(reference)
    resolution = ref01.shape[-1]
    a_idx, _ = split_reference(len(ref01), len(samples01), seed=seed)
    real_median = threshold = None
    if memorisation:
        real_median = float(real_nn_distances(ref01, seed=seed).median())
        threshold = NEAR_COPY_FACTOR * real_median
    want_fid = fid or inception_weights is not None
    common = {
        "seed": seed,
        "memorisation_threshold": threshold,
        "real_nn_median": real_median,
        "inception_weights": inception_weights,
        "fid": want_fid,
        "device": device,
        "swd_kwargs": swd_kwargs,
    }
    generated = compute_all(ref01[a_idx], samples01, train=ref01 if memorisation else None, **common)
    floor = real_vs_real_floor(ref01, num_images=len(samples01), memorisation=memorisation, **common)
    result: dict[str, Any] = {
        "generated": generated,
        "real_vs_real_floor": floor,
        "settings": {
            "num_samples": len(samples01),
            "num_reference": len(ref01),
            "reference_subset_size": len(a_idx),
            "compared_at_resolution": resolution,
            "sample_resolution": samples01.shape[-1],
            "seed": seed,
        },
    }
    if samples01.shape[-1] > resolution:
        upscaled_ref = resize_images(ref01[a_idx], samples01.shape[-1])
        result["output_resolution"] = {
            "resolution": samples01.shape[-1],
            "baseline": "reference upscaled with bicubic interpolation",
            **sharpness_ratios(upscaled_ref, samples01),
        }
    return result


def run_evaluation(
    *,
    out_dir: str | os.PathLike,
    pipeline_dir: str | os.PathLike | None = None,
    samples_npz: str | os.PathLike | None = None,
    reference: str | None = None,
    num_images: int = 1000,
    steps: int = 25,
    sampler: str | None = None,
    upscale: bool | None = None,
    seed: int = 0,
    batch_size: int = 32,
    resolution: int | None = None,
    cache_dir: str | None = None,
    max_reference_images: int | None = None,
    inception_weights: str | None = None,
    fid: bool = True,
    memorisation: bool = True,
    save_samples: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    command: str | None = None,
    log: Any = print,
    class_label: int | str | None = None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    autoguidance_scale: float | None = None,
    sweep_sharpen: bool = False,
    save_best_sharpen: bool = False,
) -> dict[str, Any]:
    """Sample (or read) images, measure them against the reference, write the three outputs; returns the metrics.

    Exactly one of ``pipeline_dir`` and ``samples_npz`` is needed. The comparison resolution is ``resolution``, else
    the folder's training resolution, else the pipeline's native (pre-SR) size, else the samples' size. ``dtype``
    is the precision the models sample in (fp32 when None); metrics are always computed in fp32. A class-conditional
    pipeline samples its classes in the reference's mix, or ``class_label`` (see :func:`conditioning_plan`), with
    ``guidance_scale``, ``guidance_interval`` and ``autoguidance_scale`` (default: the pipeline's own).
    ``sweep_sharpen`` samples once without the unsharp mask, measures every amount (:func:`sharpen_sweep`) and
    evaluates the pipeline's own amount as usual; ``save_best_sharpen`` then writes the best amount into the pipeline
    folder.
    """
    if (pipeline_dir is None) == (samples_npz is None):
        raise FlagError("give either a pipeline folder or --samples_npz, not both or neither")
    started = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    title = "crispdiff evaluation"
    sweep: dict[str, Any] | None = None  # set when a pipeline's samples are swept (sweep_sharpen)
    upscaled = False  # the samples are a pipeline's SR output
    if samples_npz is not None:
        samples = load_samples_npz(samples_npz)
        resolution = resolution or samples.shape[-1]
        title += f" of {Path(samples_npz).name}"
        source: dict[str, Any] = {"samples_npz": str(samples_npz)}
        sampled = time.time()
        log(f"loading the reference images at {resolution}px")
        ref = load_reference(reference, resolution, cache_dir=cache_dir, max_images=max_reference_images)
    else:
        from crispdiff.publish.export import load_pipeline

        pipeline = load_pipeline(pipeline_dir, sampler=sampler, device=device, dtype=dtype)
        if autoguidance_scale not in (None, 1.0) and getattr(pipeline, "guide_unet", None) is None:
            raise FlagError(f"--autoguidance_scale {autoguidance_scale:g} needs a guide model; {pipeline_dir} has none")
        resolution = resolution or training_resolution(pipeline_dir) or native_resolution(pipeline)
        log(f"loading the reference images at {resolution}px")
        column = training_setting(pipeline_dir, "class_column")
        if column == AUTO_CLASS_COLUMN:  # clusters of the training images: no reference image carries one
            column = None
        try:
            reference_data = load_reference_data(
                reference, resolution, cache_dir=cache_dir, max_images=max_reference_images, class_column=column
            )
        except DataError:  # the reference lacks the model's class column: compare unconditional samples
            reference_data = load_reference_data(
                reference, resolution, cache_dir=cache_dir, max_images=max_reference_images
            )
        labels, subset, conditioning = conditioning_plan(
            pipeline, pipeline_dir, reference_data, num_images, class_label, seed
        )
        ref = reference_data.center_crops(subset)
        if guidance_scale is None and (labels is not None or getattr(pipeline, "class_mix", None) is not None):
            guidance_scale = float(pipeline.config.get("guidance_scale", 1.0))
        guided = f", guidance {guidance_scale:g}" if guidance_scale is not None else ""
        log(f"sampling {num_images} images with {steps} steps ({pipeline.config.sampler}) on {device}: "
            f"{conditioning}{guided}")  # fmt: skip
        samples = generate_samples(
            pipeline,
            num_images,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            upscale=upscale,
            log=log,
            class_labels=labels,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            autoguidance_scale=autoguidance_scale,
            postprocess=NO_POSTPROCESS if sweep_sharpen else None,
        )
        upscaled = samples.shape[-1] > native_resolution(pipeline)
        if sweep_sharpen:
            if upscaled and ref.shape[-1] != samples.shape[-1]:
                raise FlagError(
                    f"--sharpen_sweep on upscaled samples measures them at their own size: pass --resolution "
                    f"{samples.shape[-1]} (a --reference with images at least that large)"
                )
            compared, _ = split_reference(len(ref), len(samples), seed=seed)  # the subset evaluate_samples uses
            sweep = sharpen_sweep(pipeline, samples, ref[compared], upscaled=upscaled)
            samples = pipeline.postprocess(samples, upscaled=upscaled)  # the pipeline's own post-processing
            best, own = sweep["best_amount"], sweep["pipeline_amount"]
            log(f"unsharp-mask sweep: best amount {best:g} (the pipeline's: {own:g})")
        sampled = time.time()
        title += f" of {Path(pipeline_dir).name}"
        source = {
            "pipeline_dir": str(pipeline_dir),
            "sampler": pipeline.config.sampler if sampler is None else sampler,
            "steps": steps,
            "upscale": upscale,
            "upscaled": upscaled,
            "conditioning": conditioning,
            "guidance_scale": guidance_scale,
            "guidance_interval": list(guidance_interval or pipeline.default_guidance_interval or []) or None,
            "autoguidance_scale": autoguidance_scale,
        }
    log(f"measuring {len(samples)} samples against {len(ref)} reference images")
    result = evaluate_samples(
        samples,
        ref,
        seed=seed,
        memorisation=memorisation,
        fid=fid,
        inception_weights=inception_weights,
        device=device,
    )
    result["settings"].update(source)
    if sweep is not None:
        result["sharpen_sweep"] = sweep
        if save_best_sharpen:
            path = save_sharpen_amount(pipeline_dir, sweep["best_amount"], upscaled=upscaled)
            key = "upscale_sharpen_amount" if upscaled else "sharpen_amount"
            log(f"wrote {key} {sweep['best_amount']:g} into {path}")
    result["settings"]["reference"] = reference or "default"
    result["settings"]["seconds_sampling"] = round(sampled - started, 2)
    result["settings"]["seconds_metrics"] = round(time.time() - sampled, 2)
    paths = write_outputs(out_dir, result, samples, title=title, command=command)
    if save_samples:
        paths["samples"] = save_samples_npz(Path(out_dir) / "samples.npz", samples)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result
