"""Figures for the benchmarks: metric-vs-steps curves (matplotlib, optional) and labelled side-by-side sample grids.

matplotlib is not a crispdiff dependency, so a missing matplotlib skips the curve with a message instead of failing a
benchmark that has already spent minutes training and sampling; the sample-grid figure needs only PIL.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

SAMPLER_LABELS = {"dpmsolver++": "DPM-Solver++", "ddim": "DDIM", "unipc": "UniPC", "ddpm": "DDPM", "pndm": "PNDM"}


def sampler_label(sampler: str, steps: int | None = None) -> str:
    """'DPM-Solver++ 25': the human name used in tables, legends and grid captions."""
    name = SAMPLER_LABELS.get(sampler, sampler)
    return name if steps is None else f"{name} {steps}"


def _atomic_target(path: Path) -> tuple[Path, Path]:
    """A temp file beside `path` (same filesystem, so os.replace is atomic) and the final path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
    return Path(tmp), path


def plot_sampler_sweep(rows: Sequence[dict[str, Any]], floor: dict[str, float], path: str | os.PathLike) -> Path | None:
    """Three panels against the number of sampler steps: SWD (with the real-vs-real floor), sharpness ratios (with
    the 1.0 = as-sharp-as-the-data line) and milliseconds per image, one series per sampler.

    Each row needs ``sampler``, ``steps``, ``swd_avg``, ``hf_energy_ratio``, ``laplacian_var_ratio`` and
    ``ms_per_image``. Returns the PNG's path, or None (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib); the table has the same numbers")
        return None
    if not rows:
        print("plot skipped: no sampler finished")
        return None
    by_sampler: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["steps"]):
        by_sampler.setdefault(row["sampler"], []).append(row)

    fig, (ax_swd, ax_sharp, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    for sampler, series in by_sampler.items():
        steps = [r["steps"] for r in series]
        label = sampler_label(sampler)
        ax_swd.plot(steps, [r["swd_avg"] for r in series], "o-", label=label)
        (line,) = ax_sharp.plot(steps, [r["hf_energy_ratio"] for r in series], "o-", label=f"{label} HF energy")
        ax_sharp.plot(
            steps, [r["laplacian_var_ratio"] for r in series], "s--", color=line.get_color(), label=f"{label} Lap. var"
        )
        ax_time.plot(steps, [r["ms_per_image"] for r in series], "o-", label=label)
    if "swd_avg" in floor:
        ax_swd.axhline(floor["swd_avg"], color="grey", linestyle=":", label="real vs real (floor)")
    ax_sharp.axhline(1.0, color="grey", linestyle=":", label="as sharp as the data")
    ax_swd.set(title="multi-scale SWD x1e3 (lower is better)", ylabel="SWD")
    ax_sharp.set(title="sharpness, generated / real (1 = data)", ylabel="ratio")
    ax_time.set(title="sampling time", ylabel="ms per image", yscale="log")
    all_steps = sorted({r["steps"] for r in rows})
    for ax in (ax_swd, ax_sharp, ax_time):
        ax.set(xscale="log", xlabel="sampler steps")
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp, target = _atomic_target(Path(path))
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return target


def labelled_side_by_side(
    panels: Sequence[tuple[str, PIL.Image.Image]], path: str | os.PathLike, min_width: int = 256, gap: int = 8
) -> Path:
    """Put sample grids next to each other with a caption above each, and write the PNG atomically.

    Small grids (a 4x4 grid of 32 px samples is 128 px wide) are enlarged by an integer factor with nearest-neighbour
    so that blur and noise stay visible as what they are rather than being smoothed by an image viewer.
    """
    if not panels:
        raise ValueError("labelled_side_by_side needs at least one (caption, image) panel")
    scale = max(1, -(-min_width // max(image.width for _, image in panels)))
    images = [
        image.convert("RGB").resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
        for _, image in panels
    ]
    font = PIL.ImageFont.load_default()
    caption_height = 18
    # A column is as wide as its grid or its caption, whichever is wider, so captions never run into each other.
    columns = [max(image.width, int(font.getlength(caption)) + 1) for (caption, _), image in zip(panels, images)]
    width = sum(columns) + gap * (len(images) + 1)
    height = max(image.height for image in images) + caption_height + 2 * gap
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    x = gap
    for (caption, _), image, column in zip(panels, images, columns):
        draw.text((x, gap // 2), caption, fill=(0, 0, 0), font=font)
        canvas.paste(image, (x, gap + caption_height))
        x += column + gap
    tmp, target = _atomic_target(Path(path))
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
