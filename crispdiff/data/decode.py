"""Decoding one image with a fixed recipe: any PIL mode to RGB uint8, transparency composited onto ``--background``,
16-bit scaled, short side resized to ``--resolution``; too-small and unreadable files come back with a reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageOps

from crispdiff.core.errors import DataError

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,  # torchvision's name; on PIL images it is PIL's NEAREST
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# ----------------------------------------------------------------------------------------------------------------------
# Decoding one image
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeRecipe:
    """Everything that determines the stored pixels of one image; part of the cache key."""

    resolution: int
    interpolation: str
    background: tuple[int, int, int]
    center: bool  # store only the centre square (True) or the whole short-side-resized image (False)
    min_image_size: int

    def as_key(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "interpolation": self.interpolation,
            "background": list(self.background),
            "crop": "center" if self.center else "full",
            "min_image_size": self.min_image_size,
        }


def parse_background(text: str) -> tuple[int, int, int]:
    """Turn ``--background`` (a CSS colour name or #hex) into RGB, with an error that names the flag."""
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError as err:
        raise DataError(f"--background {text!r} is not a colour name or #rrggbb hex value") from err
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha-composite straight (non-premultiplied) RGBA onto an opaque colour, rounding to nearest.

    Why not ``convert("RGB")``: PIL simply drops alpha, which keeps the arbitrary colour stored under fully
    transparent pixels (often black or garbage) and makes emoji edges dark.
    """
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32)
    mixed = rgb * alpha + bg * (255 - alpha)
    return ((mixed + 127) // 255).astype(np.uint8)


def _high_bit_depth_to_rgb(img: Image.Image) -> np.ndarray:
    """Scale 16-bit (``I;16*``, ``I``) and float (``F``) grayscale to 8 bits instead of clipping at 255.

    PIL's own ``convert("RGB")`` clips those modes, turning most 16-bit scans pure white.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _to_rgb_array(img: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, compositing transparency (alpha, palette or colour-key) onto ``background``."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        return _composite(np.asarray(img.convert("RGBA")), background)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``size`` (width, height) with PIL's antialiased ``interpolation`` filter.

    The one resize of the data pipeline: super-resolution training makes its low-resolution inputs with it, so an
    SR model learns to undo exactly the downscaling that the diffusion model's training images went through.
    """
    return np.asarray(Image.fromarray(rgb).resize(size, INTERPOLATIONS[interpolation]))


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` of an image once its shorter side is resized to ``resolution`` (the aspect ratio kept).

    One formula for the resize itself and for what is worked out from an image's original size later (SDXL's crop
    coordinates, in the resized image, when only the centre square was stored)."""
    if min(height, width) == resolution:
        return height, width
    scale = resolution / min(height, width)
    new_w = resolution if width <= height else max(resolution, round(width * scale))
    new_h = resolution if height <= width else max(resolution, round(height * scale))
    return new_h, new_w


def _resize_short_side(rgb: np.ndarray, recipe: DecodeRecipe) -> np.ndarray:
    """Resize so the shorter side equals ``resolution``; optionally keep only the centre square."""
    height, width = rgb.shape[:2]
    res = recipe.resolution
    if (height, width) != (new_size := resized_size(height, width, res)):
        height, width = new_size
        rgb = resize_rgb(rgb, (width, height), recipe.interpolation)
    if recipe.center:
        top, left = (height - res) // 2, (width - res) // 2
        rgb = rgb[top : top + res, left : left + res]
    return np.ascontiguousarray(rgb)


@dataclass
class DecodedImage:
    """The result of decoding one item: pixels, or ``None`` with the reason it was skipped."""

    pixels: np.ndarray | None
    upscaled: bool = False
    skipped_because: str | None = None  # "unreadable" or "WxH, under --min_image_size N"


def _open(item: Any) -> Image.Image:
    """Open a path, raw bytes, a ``datasets`` Image dict or a PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return _open(item["bytes"])
        if item.get("path"):
            return Image.open(item["path"])
        raise OSError("empty image entry")
    if isinstance(item, (bytes, bytearray, memoryview)):
        import io

        return Image.open(io.BytesIO(bytes(item)))
    return Image.open(item)


#: EXIF orientations that turn the picture by 90 degrees (``exif_transpose`` swaps its width and height).
_QUARTER_TURNS = (5, 6, 7, 8)


def original_size(item: Any) -> tuple[int, int]:
    """``(height, width)`` of an image as ``decode_image`` sees it before resizing (upright: the EXIF rotation
    applied), read from the file's header without decoding the pixels. What SDXL conditions on as the original
    size."""
    with _open(item) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in _QUARTER_TURNS:
            width, height = height, width
    return height, width


def decode_image(item: Any, name: str, recipe: DecodeRecipe) -> DecodedImage:
    """Decode one image with the recipe; unreadable and too-small files come back without pixels and with a reason.

    Why skip small images instead of upscaling them: a 12-pixel thumbnail upscaled to 64 px would teach the model
    blur, the one thing this project exists to avoid. Why skip rather than stop: one stray icon in a folder of
    thousands should not end a run; the skipped files are named in a warning and listed in a log file.
    """
    try:
        with _open(item) as img:
            img.load()
            width, height = img.size
            if min(width, height) < recipe.min_image_size:
                return DecodedImage(
                    None, skipped_because=f"{width}x{height}, under --min_image_size {recipe.min_image_size}"
                )
            if img.getexif().get(0x0112, 1) != 1:  # camera rotation tag: photos should be upright
                img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb_array(img, recipe.background)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError, EOFError):
        return DecodedImage(None, skipped_because="unreadable")
    upscaled = min(rgb.shape[:2]) < recipe.resolution
    return DecodedImage(_resize_short_side(rgb, recipe), upscaled)
