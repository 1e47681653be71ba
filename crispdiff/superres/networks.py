"""Building the SR network (a module spandrel ships) and turning trained weights into the pipeline's SR component.

Why spandrel's own modules rather than a crispdiff network: spandrel detects architecture and scale from the
weights alone, so the file crispdiff saves loads in spandrel, chaiNNer and ComfyUI, and crispdiff's pipeline loads
it through the same path as a downloaded Real-ESRGAN (:class:`crispdiff.pipelines.sr_model.SpandrelSRModel`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from crispdiff.pipelines.sr_model import SpandrelSRModel, SRModelError


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


#: spandrel's architecture ids of the networks ``build_sr_network`` makes.
SPANDREL_IDS = {"Compact": "compact", "SAFMN": "safmn", "SPAN": "span"}
#: spandrel's names of --num_feat and --num_blocks per architecture (SPAN's depth is fixed).
HYPERPARAMETER_NAMES = {
    "compact": ("num_feat", "num_conv"),
    "safmn": ("dim", "n_blocks"),
    "span": ("feature_channels", None),
}


def network_settings(model: SpandrelSRModel, where: str) -> dict[str, Any]:
    """The ``architecture`` / ``scale`` / ``num_feat`` / ``num_blocks`` of a loaded SR model, read from the
    hyperparameters spandrel detected (SPAN has no block count: none is returned); ``SRModelError`` naming ``where``
    for a network this trainer does not build."""
    architecture = SPANDREL_IDS.get(model.config.architecture)
    if architecture is None:
        raise SRModelError(
            f"{where} is a {model.config.architecture_name} model; train_sr.py trains "
            f"{', '.join(SPANDREL_IDS)} networks only"
        )
    hyper = model.net.hyperparameters
    feat, blocks = HYPERPARAMETER_NAMES[architecture]
    settings = {"architecture": architecture, "scale": int(model.config.scale), "num_feat": int(hyper[feat])}
    if blocks is not None:
        settings["num_blocks"] = int(hyper[blocks])
    return settings


@torch.no_grad()
def load_initial_weights(network: torch.nn.Module, model: SpandrelSRModel, where: str) -> None:
    """Copy a loaded SR model's weights into a freshly built ``network`` of the same settings, and check that the
    two now compute the same thing (a hyperparameter the settings do not cover, e.g. Compact's activation, would
    not): ``SRModelError`` naming ``where`` otherwise."""
    source = model.net
    try:
        network.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise SRModelError(f"{where}: its weights do not fit the network train_sr.py builds ({err})") from err
    probe = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    device = next(network.parameters()).device
    built, loaded = network.eval()(probe.to(device)).cpu(), source.eval()(probe.to(model.device)).cpu()
    network.train()
    if not torch.allclose(built, loaded, atol=1e-5):
        raise SRModelError(
            f"{where}: train_sr.py's network with its settings and weights computes something else (a setting it does "
            "not build, e.g. another activation); it cannot be fine-tuned here"
        )


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
