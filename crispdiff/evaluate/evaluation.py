"""Evaluating a pipeline (or a file of samples) against reference images: metrics.json, a sample grid, a report.

Every number is written beside the same metric measured between two disjoint halves of the reference data (the
real-vs-real floor, see :func:`crispdiff.evaluate.metrics.real_vs_real_floor`), because SWD, FID and friends have no
absolute scale: "SWD 15" is excellent with 1,000 images and impossible with 100.

Resolution policy: the comparison happens at the *reference* resolution (the model's training resolution unless
``--resolution`` says otherwise). Samples larger than that (``--upscale`` with an SR model) are downscaled with an
antialiased bicubic filter for SWD, sharpness ratios, colour blobs, memorisation and FID, so an upscaled model is
judged on the same grid as its data. Their sharpness is *also* reported at the output resolution, against the
reference upscaled with bicubic interpolation: there 1.0 means "as sharp as a plain bicubic upscale of real images"
and a useful SR model reads above 1.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.errors import DataError, FlagError, PathError
from crispdiff.core.io import write_atomic, write_text_atomic
from crispdiff.data.auto_classes import AUTO_CLASS_COLUMN
from crispdiff.evaluate import metrics as M

METRICS_NAME = "metrics.json"
GRID_NAME = "samples.png"
REPORT_NAME = "report.md"
TRAINING_CONFIG_NAME = "crispdiff_training.json"
_GRID_IMAGES = 64

# (key, label, how to read it) for the report table, in order.
_REPORT_ROWS = [
    ("swd_avg", "SWD x1e3, average of levels", "lower is better; the floor is the best reachable"),
    ("swd_levels", "SWD x1e3 per level", "finest level first: detail ... layout"),
    ("hf_energy_ratio", "high-frequency energy ratio", "1 = as sharp as the data; < 1 blurry; >> 1 noisy"),
    ("laplacian_var_ratio", "Laplacian variance ratio", "1 = as sharp as the data; < 1 blurry; >> 1 noisy"),
    ("colour_blob", "colour-blob indicator", "0 = like the data; higher = flat patches of wrong colour"),
    ("colour_hist_jsd", "  colour histogram JSD (bits)", "wrong colours"),
    ("edge_density_deficit", "  edge-density deficit", "too few edges (flat or blurry)"),
    ("near_copy_fraction", "near-copies of training images", "share of samples closer than the threshold"),
    ("nn_median_ratio", "nearest-training-image distance ratio", "sample / real median; << 1 = memorising"),
    ("fid", "FID", "lower is better"),
    ("kid_mean", "KID", "lower is better"),
]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


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


def reference_class_mix(reference_classes: list[str], num_images: int, seed: int = 0) -> list[str]:
    """One class label per generated image, in the reference's class proportions (largest-remainder rounding).

    Why: a class-conditional model sampled unconditionally is not what its users run, and sampled with one class it
    cannot be compared with a mixed reference. Labels in the reference's mix make SWD and the sharpness ratios
    compare like with like. The order is shuffled (seeded) so that any prefix of the samples is mixed too.
    """
    counts: dict[str, int] = {}
    for name in reference_classes:
        counts[name] = counts.get(name, 0) + 1
    total = len(reference_classes)
    exact = {name: count * num_images / total for name, count in sorted(counts.items())}
    taken = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (taken[name] - exact[name], name))
    for name in by_remainder[: num_images - sum(taken.values())]:
        taken[name] += 1
    labels = [name for name, count in taken.items() for _ in range(count)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return [labels[i] for i in order]


def load_samples_npz(path: str | os.PathLike) -> torch.Tensor:
    """Images from an ``.npz`` file as float [N, 3, H, W] in [0, 1].

    The array is the one named ``images``, else ``arr_0`` (what ``np.savez(file, x)`` writes and what many papers'
    sample dumps use), else the file's only array; uint8 0..255 or float 0..1, NHWC or NCHW.
    """
    file = Path(path)
    if not file.is_file():
        raise PathError(f"--samples_npz {file} does not exist")
    with np.load(file, allow_pickle=False) as data:
        names = list(data.files)
        if "images" in names:
            key = "images"
        elif "arr_0" in names:
            key = "arr_0"
        elif len(names) == 1:
            key = names[0]
        else:
            raise FlagError(f"--samples_npz {file} holds arrays {names}; name the image array 'images'")
        array = data[key]
    try:
        return M.to_float01(array)
    except (TypeError, ValueError) as err:
        raise FlagError(f"--samples_npz {file} [{key}]: {err}") from err


def save_samples_npz(path: str | os.PathLike, images01: torch.Tensor) -> Path:
    """Write samples as uint8 NHWC under ``images`` (atomically), the format :func:`load_samples_npz` reads."""
    array = (images01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    target = Path(path)

    def write(handle: Any) -> None:
        np.savez_compressed(handle, images=array)

    return write_atomic(target, write, binary=True)


def native_resolution(pipeline: Any) -> int:
    """The size the pipeline produces before any super-resolution: unet size, times the VAE's factor if latent."""
    size = pipeline.unet.config.sample_size
    size = int(size if isinstance(size, int) else size[0])
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return size


def training_setting(pipeline_dir: str | os.PathLike, name: str) -> Any:
    """One value recorded in the folder's crispdiff_training.json (None without the file or the key)."""
    path = Path(pipeline_dir) / TRAINING_CONFIG_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get(name)


def training_resolution(pipeline_dir: str | os.PathLike) -> int | None:
    """The ``resolution`` recorded in the folder's crispdiff_training.json, if there is one."""
    value = training_setting(pipeline_dir, "resolution")
    return int(value) if value else None


def class_label_flag(pipeline: object, text: str | None, pipeline_dir: str) -> int | str | None:
    """--class as the pipeline takes it: a class name, else an id; a FlagError names the classes there are."""
    if text is None:
        return None
    names = getattr(pipeline, "classes", None)
    num_class_embeds = getattr(pipeline.unet.config, "num_class_embeds", None)  # type: ignore[attr-defined]
    if num_class_embeds is None:
        raise FlagError(f"--class {text!r} given but {pipeline_dir} holds an unconditional model (no classes)")
    if names and text in names:
        return text
    if text.isdigit() and int(text) < num_class_embeds - 1:
        return int(text)
    known = f"its classes are {names}" if names else f"it stores no class names; pass an id 0..{num_class_embeds - 2}"
    raise FlagError(f"--class {text!r} is not a class of {pipeline_dir}; {known}")


def conditioning_plan(
    pipeline: Any,
    pipeline_dir: str | os.PathLike,
    reference_data: Any,
    num_images: int,
    class_label: int | str | None,
    seed: int,
) -> tuple[list[str] | int | str | None, torch.Tensor | None, str]:
    """What a class-conditional pipeline samples in an evaluation: ``(class_labels, reference subset, description)``.

    ``class_label`` given: every sample is that class, measured against the reference images of that class when the
    reference has the model's class column (else all of it). Not given: labels in the reference's class mix
    (:func:`reference_class_mix`; reference images of classes the model does not know are left out of the mix and
    the comparison). A reference without the class column, or an unconditional pipeline: no labels
    (a conditional model then samples its null class, i.e. unconditionally), except for a pipeline that stores its
    class mix (``--class_column auto``): no labels, so it draws them from that mix as a user's unlabelled call does.
    """
    conditional = getattr(pipeline.unet.config, "num_class_embeds", None) is not None
    column = training_setting(pipeline_dir, "class_column") if conditional else None
    classes = reference_classes(reference_data, column)
    if class_label is None and conditional and getattr(pipeline, "class_mix", None) is not None:
        return None, None, "classes drawn from the pipeline's own class mix (auto classes)"
    if class_label is not None:
        class_label = class_label_flag(pipeline, str(class_label), str(pipeline_dir))
        if classes is None or not isinstance(class_label, str):
            return class_label, None, f"class {class_label!r}, against the whole reference"
        subset = torch.tensor([i for i, name in enumerate(classes) if name == class_label], dtype=torch.long)
        if len(subset) < 4:
            raise FlagError(f"--class {class_label!r}: the reference has {len(subset)} images of it (need >= 4)")
        return class_label, subset, f"class {class_label!r}, against the reference's {len(subset)} images of it"
    if classes is None:
        if conditional:
            return None, None, f"unconditional (null class): the reference has no {column!r} classes"
        return None, None, "unconditional"
    known = set(getattr(pipeline, "classes", None) or [])
    if known and not known.issuperset(classes):  # held-out data can have classes the model never saw: compare like
        subset = torch.tensor([i for i, name in enumerate(classes) if name in known], dtype=torch.long)
        if len(subset) < 4:
            raise FlagError(f"the reference has {len(subset)} images of the model's {column!r} classes (need >= 4)")
        mix = reference_class_mix([classes[i] for i in subset.tolist()], num_images, seed)
        dropped = len(classes) - len(subset)
        return mix, subset, f"classes in the reference's {column!r} mix ({dropped} images of other classes left out)"
    return reference_class_mix(classes, num_images, seed), None, f"classes in the reference's {column!r} mix"


def reference_classes(reference_data: Any, column: str | None) -> list[str] | None:
    """The class name of each reference image in ``column`` (None without a column or when an image lacks it)."""
    if column is None:
        return None
    names = getattr(reference_data, "class_names", None)
    ids = getattr(reference_data, "class_ids", None)
    if names is None or ids is None:
        return None
    return [names[int(i)] for i in ids]


@torch.no_grad()
def generate_samples(
    pipeline: Any,
    num_images: int,
    *,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 32,
    upscale: bool | None = None,
    sr_strength: float | None = None,
    log: Any = None,
    class_labels: int | str | list[int | str] | None = None,
    guidance_scale: float | None = None,
    postprocess: dict[str, float] | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``num_images`` samples as float [N, 3, H, W] in [0, 1] on the CPU (``crispdiff sample`` and ``evaluate``).

    ``class_labels`` (one class name or id for every image, or a list with one per image), ``guidance_scale`` and
    ``guidance_interval`` (default: the pipeline's own) go to a class-conditional pipeline; they are passed only when
    set, so pipelines without them keep working. ``postprocess`` overrides the pipeline's post-processing arguments
    (e.g. ``NO_POSTPROCESS`` for images as they leave the decoder / SR model).

    Image ``i`` uses its own CPU generator seeded ``seed + i``, as ``crispdiff sample`` does, so the evaluated images
    are the ones that command shows for the same seed, whatever the batch size or device.
    """
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
        conditioning: dict[str, Any] = {}
        if isinstance(class_labels, list):
            conditioning["class_labels"] = class_labels[start : start + count]
        elif class_labels is not None:
            conditioning["class_labels"] = class_labels
        if guidance_scale is not None:
            conditioning["guidance_scale"] = guidance_scale
        if guidance_interval is not None:
            conditioning["guidance_interval"] = tuple(guidance_interval)
        conditioning.update(postprocess or {})
        out = pipeline(
            batch_size=count,
            num_inference_steps=steps,
            generator=generators,
            upscale=upscale,
            sr_strength=sr_strength,
            output_type="pt",
            **conditioning,
        )
        images.append(out.images.float().cpu().clamp(0, 1))
        if log is not None:
            log(f"sampled {start + count}/{num_images} images")
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


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
    samples01 = M.to_float01(samples)
    ref01 = M.to_float01(reference)
    resolution = ref01.shape[-1]
    a_idx, _ = M.split_reference(len(ref01), len(samples01), seed=seed)
    real_median = threshold = None
    if memorisation:
        real_median = float(M.real_nn_distances(ref01, seed=seed).median())
        threshold = M.NEAR_COPY_FACTOR * real_median
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
    generated = M.compute_all(ref01[a_idx], samples01, train=ref01 if memorisation else None, **common)
    floor = M.real_vs_real_floor(ref01, num_images=len(samples01), memorisation=memorisation, **common)
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
        upscaled_ref = M.resize_images(ref01[a_idx], samples01.shape[-1])
        result["output_resolution"] = {
            "resolution": samples01.shape[-1],
            "baseline": "reference upscaled with bicubic interpolation",
            **M.sharpness_ratios(upscaled_ref, samples01),
        }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _levels(values: dict[str, Any]) -> str:
    levels = sorted((k for k in values if k.startswith("swd_") and k[4:].isdigit()), key=lambda k: -int(k[4:]))
    return " / ".join(f"{k[4:]}px {values[k]:.3g}" for k in levels) or "-"


#: Unsharp-mask amounts ``--sharpen_sweep`` tries (0 = off), with the pipeline's own radius and threshold.
SHARPEN_SWEEP_AMOUNTS = tuple(round(0.1 * step, 1) for step in range(16))

#: ``generate_samples(postprocess=...)`` for images as they leave the decoder / SR model: what ``sharpen_sweep`` takes.
NO_POSTPROCESS = {"sharpen_amount": 0.0, "gamma": 1.0}


def sharpen_sweep(
    pipeline: Any,
    unsharpened01: torch.Tensor,
    reference: torch.Tensor | np.ndarray,
    amounts: tuple[float, ...] = SHARPEN_SWEEP_AMOUNTS,
) -> dict[str, Any]:
    """Both sharpness ratios of the same samples under each unsharp amount, and the amount that matches the data best.

    Why: the right amount depends on how sharp the model is before post-processing, and that changes with training
    length (benchmarks/RESULTS.md, "What more compute buys": the main job's 0.5 gives hf 1.07 after its 4 minutes but
    1.16 after 20 CPU-minutes). Sharpening is post-processing, so one unsharpened sampling pass serves every amount.
    ``unsharpened01`` are the pipeline's outputs with ``sharpen_amount=0`` and ``gamma=1``; each amount goes through
    the pipeline's own ``postprocess`` (unsharp mask, then its gamma), so the figures are what the pipeline would
    give. The best amount is the one whose worse ratio is nearest 1 on a log scale: neither blurry nor noisy by
    either measure.
    """
    ref01 = M.to_float01(reference)
    rows = []
    for amount in amounts:
        sharpened = pipeline.postprocess(unsharpened01, sharpen_amount=amount)
        ratios = M.sharpness_ratios(ref01, M.resize_images(sharpened, ref01.shape[-1]))
        rows.append(
            {
                "amount": amount,
                "hf_energy_ratio": ratios["hf_energy_ratio"],
                "laplacian_var_ratio": ratios["laplacian_var_ratio"],
            }
        )
    best = min(rows, key=lambda r: max(abs(math.log(r["hf_energy_ratio"])), abs(math.log(r["laplacian_var_ratio"]))))
    return {"rows": rows, "best_amount": best["amount"], "pipeline_amount": float(pipeline.config.sharpen_amount)}


def save_sharpen_amount(pipeline_dir: str | os.PathLike, amount: float) -> Path:
    """Write ``amount`` as the saved pipeline's default unsharp mask (its model_index.json, atomically)."""
    from crispdiff.publish.export import MODEL_INDEX_NAME, read_model_index

    index = read_model_index(pipeline_dir)  # clear errors for a missing folder or another kind of pipeline
    index["sharpen_amount"] = amount
    return write_text_atomic(Path(pipeline_dir) / MODEL_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sweep_lines(sweep: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Unsharp-mask sweep (the same samples, sharpened afterwards): best amount **{sweep['best_amount']:g}**, "
        f"the pipeline's is {sweep['pipeline_amount']:g}.",
        "",
        "| sharpen_amount | high-frequency energy ratio | Laplacian variance ratio |",
        "| --- | --- | --- |",
    ]
    for row in sweep["rows"]:
        marks = [
            m for m, a in (("best", sweep["best_amount"]), ("pipeline", sweep["pipeline_amount"])) if a == row["amount"]
        ]
        label = f"{row['amount']:g}" + (f" ({', '.join(marks)})" if marks else "")
        lines.append(f"| {label} | {row['hf_energy_ratio']:.3g} | {row['laplacian_var_ratio']:.3g} |")
    return lines


def format_report(result: dict[str, Any], *, title: str = "crispdiff evaluation", command: str | None = None) -> str:
    """A short markdown report: one table, generated beside the real-vs-real floor, and how to read each row."""
    gen, floor, settings = result["generated"], result["real_vs_real_floor"], result["settings"]
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"{settings['num_samples']} samples ({settings['sample_resolution']} px) against "
        f"{settings['reference_subset_size']} reference images, compared at {settings['compared_at_resolution']} px; "
        f"the floor compares two disjoint reference subsets of that size. Seed {settings['seed']}.",
        "",
        "| metric | generated | real-vs-real floor | how to read |",
        "| --- | --- | --- | --- |",
    ]
    for key, label, guide in _REPORT_ROWS:
        if key == "swd_levels":
            lines.append(f"| {label} | {_levels(gen)} | {_levels(floor)} | {guide} |")
        elif key in gen or key in floor:
            lines.append(f"| {label} | {_fmt(gen.get(key))} | {_fmt(floor.get(key))} | {guide} |")
    if "fid" not in gen and gen.get("fid_status"):
        lines += ["", str(gen["fid_status"])]
    if "threshold" in gen:
        lines += [
            "",
            f"Near-copy threshold: RMS pixel distance < {gen['threshold']:.4g} (a quarter of the median distance "
            f"between a real image and its nearest other real image, {gen['real_nn_distance_median']:.4g}).",
        ]
    out = result.get("output_resolution")
    if out:
        lines += [
            "",
            f"At the output resolution ({out['resolution']} px), against the reference upscaled with bicubic "
            f"interpolation (1.0 = as sharp as a bicubic upscale; a useful SR model reads above 1): "
            f"high-frequency energy ratio {out['hf_energy_ratio']:.3g}, Laplacian variance ratio "
            f"{out['laplacian_var_ratio']:.3g}.",
        ]
    if result.get("sharpen_sweep"):
        lines += _sweep_lines(result["sharpen_sweep"])
    lines += ["", f"![samples]({GRID_NAME})", ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_outputs(
    out_dir: str | os.PathLike,
    result: dict[str, Any],
    samples01: torch.Tensor,
    *,
    title: str = "crispdiff evaluation",
    command: str | None = None,
) -> dict[str, Path]:
    """Write metrics.json, samples.png (the first 64 samples) and report.md into ``out_dir``, each atomically."""
    from crispdiff.core.images import make_grid, save_image_atomic

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(result), indent=2, sort_keys=True) + "\n"
    paths = {
        "metrics": write_atomic(folder / METRICS_NAME, lambda h: h.write(text)),
        "grid": save_image_atomic(
            make_grid(samples01[:_GRID_IMAGES], value_range=(0.0, 1.0), padding=2), folder / GRID_NAME
        ),
    }
    report = format_report(result, title=title, command=command)
    paths["report"] = write_atomic(folder / REPORT_NAME, lambda h: h.write(report))
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The whole job


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
    sweep_sharpen: bool = False,
    save_best_sharpen: bool = False,
) -> dict[str, Any]:
    """Sample (or read) images, measure them against the reference, write the three outputs; returns the metrics.

    Exactly one of ``pipeline_dir`` and ``samples_npz`` is needed. The comparison resolution is ``resolution``, else
    the folder's training resolution, else the pipeline's native (pre-SR) size, else the samples' size. ``dtype``
    is the precision the models sample in (fp32 when None); metrics are always computed in fp32. A class-conditional
    pipeline samples its classes in the reference's mix, or ``class_label`` (see :func:`conditioning_plan`), with
    ``guidance_scale`` and ``guidance_interval`` (default: the pipeline's own). ``sweep_sharpen`` samples once
    without the unsharp mask, measures every amount (:func:`sharpen_sweep`) and evaluates the pipeline's own amount
    as usual; ``save_best_sharpen`` then writes the best amount into the pipeline folder.
    """
    if (pipeline_dir is None) == (samples_npz is None):
        raise FlagError("give either a pipeline folder or --samples_npz, not both or neither")
    started = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    title = "crispdiff evaluation"
    sweep: dict[str, Any] | None = None  # set when a pipeline's samples are swept (sweep_sharpen)
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
            postprocess=NO_POSTPROCESS if sweep_sharpen else None,
        )
        if sweep_sharpen:
            compared, _ = M.split_reference(len(ref), len(samples), seed=seed)  # the subset evaluate_samples uses
            sweep = sharpen_sweep(pipeline, samples, ref[compared])
            samples = pipeline.postprocess(samples)  # the pipeline's own amount and gamma, as it samples
            best, own = sweep["best_amount"], sweep["pipeline_amount"]
            log(f"unsharp-mask sweep: best amount {best:g} (the pipeline's: {own:g})")
        sampled = time.time()
        title += f" of {Path(pipeline_dir).name}"
        source = {
            "pipeline_dir": str(pipeline_dir),
            "sampler": pipeline.config.sampler if sampler is None else sampler,
            "steps": steps,
            "upscale": upscale,
            "conditioning": conditioning,
            "guidance_scale": guidance_scale,
            "guidance_interval": list(guidance_interval or pipeline.default_guidance_interval or []) or None,
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
            path = save_sharpen_amount(pipeline_dir, sweep["best_amount"])
            log(f"wrote sharpen_amount {sweep['best_amount']:g} into {path}")
    result["settings"]["reference"] = reference or "default"
    result["settings"]["seconds_sampling"] = round(sampled - started, 2)
    result["settings"]["seconds_metrics"] = round(time.time() - sampled, 2)
    paths = write_outputs(out_dir, result, samples, title=title, command=command)
    if save_samples:
        paths["samples"] = save_samples_npz(Path(out_dir) / "samples.npz", samples)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result
