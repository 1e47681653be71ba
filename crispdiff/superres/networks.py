"""Building the SR network (a module spandrel ships) and turning trained weights into the pipeline's SR component.

Why spandrel's own modules rather than a crispdiff network: spandrel detects architecture and scale from the
weights alone, so the file crispdiff saves loads in spandrel, chaiNNer and ComfyUI, and crispdiff's pipeline loads
it through the same path as a downloaded Real-ESRGAN (:class:`crispdiff.pipelines.sr_model.SpandrelSRModel`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from crispdiff.pipelines.sr_model import SpandrelSRModel


def build_sr_network(architecture: str, scale: int, num_feat: int, num_blocks: int) -> torch.nn.Module:
    """A freshly initialised network (weights from torch's global RNG: seed first)."""
    if architecture == "compact":
        from spandrel.architectures.Compact import Compact

        return Compact(num_feat=num_feat, num_conv=num_blocks, upscale=scale, act_type="prelu")
    if architecture == "safmn":
        from spandrel.architectures.SAFMN import SAFMN

        return SAFMN(dim=num_feat, n_blocks=num_blocks, upscaling_factor=scale)
    if architecture == "span":
        from spandrel.architectures.SPAN import SPAN

        return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=num_feat, upscale=scale)
    raise ValueError(f"unknown SR architecture {architecture!r}; use compact, safmn or span")


def ema_network(network: torch.nn.Module, ema: Any | None) -> torch.nn.Module:
    """A standalone copy carrying the EMA weights (the raw ones without EMA), in eval mode, gradients off."""
    copied = copy.deepcopy(network)
    if ema is not None:
        ema.copy_to(copied.parameters())
    return copied.eval().requires_grad_(False)


def as_sr_component(network: torch.nn.Module, source: str) -> SpandrelSRModel:
    """The pipeline's SR component around ``network``'s weights, re-detected by spandrel as any loaded file is.

    Detecting from the state dict (not wrapping the module as it is) proves before anything is saved that spandrel
    recognises the weights with the right scale.
    """
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return SpandrelSRModel.from_state_dict(state, source=source)
