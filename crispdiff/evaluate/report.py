"""``crispdiff evaluate``'s outputs: ``metrics.json``, ``report.md`` and the sample grid, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.io import write_json_atomic, write_text_atomic

METRICS_NAME = "metrics.json"


GRID_NAME = "samples.png"


REPORT_NAME = "report.md"


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
    paths = {
        "metrics": write_json_atomic(folder / METRICS_NAME, _jsonable(result), sort_keys=True),
        "grid": save_image_atomic(
            make_grid(samples01[:_GRID_IMAGES], value_range=(0.0, 1.0), padding=2), folder / GRID_NAME
        ),
    }
    report = format_report(result, title=title, command=command)
    paths["report"] = write_text_atomic(folder / REPORT_NAME, report)
    return paths
