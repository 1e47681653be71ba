"""Drawing samples from a saved pipeline for evaluation and ``crispdiff sample``: in the reference's class mix,
with the pipeline's own resolution and guidance, and the samples' ``.npz`` files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.errors import FlagError, PathError
from crispdiff.core.io import write_atomic
from crispdiff.evaluate.inputs import to_float01
from crispdiff.publish.export import class_label_flag

TRAINING_CONFIG_NAME = "crispdiff_training.json"


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
        return to_float01(array)
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
    autoguidance_scale: float | None = None,
) -> torch.Tensor:
    """``num_images`` samples as float [N, 3, H, W] in [0, 1] on the CPU (``crispdiff sample`` and ``evaluate``).

    ``class_labels`` (one class name or id for every image, or a list with one per image), ``guidance_scale`` and
    ``guidance_interval`` (default: the pipeline's own) go to a class-conditional pipeline, ``autoguidance_scale``
    (default: the pipeline's own) to one with a guide model; they are passed only when
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
        if autoguidance_scale is not None:
            conditioning["autoguidance_scale"] = autoguidance_scale
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


#: ``generate_samples(postprocess=...)`` for images as they leave the decoder / SR model: what ``sharpen_sweep`` takes.
NO_POSTPROCESS = {"sharpen_amount": 0.0, "gamma": 1.0}
