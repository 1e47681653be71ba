"""What every metric reads: images as float NCHW RGB in [0, 1] on the CPU, resized without aliasing, and their luma.

Images are accepted as uint8 (0..255) or float in [0, 1], as torch tensors or numpy arrays, NCHW or NHWC, and
converted with :func:`to_float01`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_float01(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Convert a batch of images to float32 NCHW RGB in [0, 1] on the CPU.

    Why so permissive: metrics are fed from pipelines (float NCHW), datasets (uint8 NCHW) and ``.npz`` files written by
    other tools (uint8 NHWC), and a silent layout mix-up would produce plausible-looking garbage numbers. Floats far
    outside [0, 1] (for example model-space [-1, 1] tensors) are rejected rather than clipped for the same reason.
    """
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array of images, got {type(images).__name__}")
    x = x.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images with 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 colour channels (RGB; composite RGBA first), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).contiguous()
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {x.dtype}")
    x = x.float()
    if x.numel() and (x.min() < -0.02 or x.max() > 1.02):
        raise ValueError(
            f"float images must lie in [0, 1] (got values in [{x.min():.3f}, {x.max():.3f}]); "
            "convert model-space [-1, 1] tensors with (x + 1) / 2 first"
        )
    return x.clamp(0.0, 1.0).contiguous()


def resize_images(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square images to ``size`` pixels with an antialiased bicubic filter.

    Why antialiased: comparing upscaled samples with the data at the data's resolution must not alias the samples'
    fine detail into spurious high frequencies that the metrics would then read as sharpness or noise.
    """
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    return F.interpolate(images01, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def luminance(images01: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma, [N, 1, H, W]: sharpness is perceived mostly in brightness, not chroma."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01 * weights).sum(dim=1, keepdim=True)
