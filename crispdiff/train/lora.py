"""LoRA adapters, shared by every trainer that uses them (transfer and Stable Diffusion).

peft does the work (injection, state dicts, merging); this module holds what crispdiff adds around it: the target
presets users name on the command line, the adapter config as JSON, and a merged plain copy for export.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.training_utils import EMAModel

#: ``--lora_target_modules`` shorthands for ``UNet2DModel`` (the transfer trainer); any other value is a module name
#: passed to peft as is. "conv" adds the down/up samplers' convolutions (named ``conv``) to the ResNet ones.
UNET2D_LORA_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "resnet": ["conv1", "conv2"],
    "conv": ["conv1", "conv2", "conv_shortcut", "conv"],
    "time": ["time_emb_proj"],
}

#: The same for Stable Diffusion's ``UNet2DConditionModel``: there "conv" means the ResNet convolutions and the
#: transformer blocks' projections, as in diffusers' LoRA scripts (its samplers keep their weights).
SD_UNET_LORA_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    "conv": ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"],
}

#: CLIP text encoder attention projections (``--train_text_encoder``).
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def expand_targets(entries: list[str], presets: dict[str, list[str]]) -> list[str]:
    """The module names peft gets: presets expanded, duplicates dropped, order kept."""
    names: list[str] = []
    for entry in entries:
        for name in presets.get(entry, [entry]):
            if name not in names:
                names.append(name)
    return names


def inject_lora(model: torch.nn.Module, lora_config: Any) -> None:
    """Put peft LoRA layers on ``model`` in place and keep ``peft_config`` on it (as diffusers' ``add_adapter`` and
    transformers do), which is what :func:`has_adapters` and :func:`adapter_config` read."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config, model, adapter_name="default")
    model.peft_config = {"default": lora_config}


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether peft LoRA adapters were injected into ``model``."""
    return isinstance(getattr(model, "peft_config", None), dict)


def adapter_config(model: Any) -> dict[str, Any]:
    """The adapter's LoraConfig as a JSON-able dict (sets as sorted lists): diffusers' loader reads alpha and DoRA
    back from it, and :func:`load_lora_config` rebuilds it."""
    config = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def load_lora_config(values: dict[str, Any]) -> Any:
    """A peft LoraConfig from :func:`adapter_config`'s dict."""
    from peft import LoraConfig

    return LoraConfig(**{k: v for k, v in values.items() if k != "peft_type"})


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights of a model carrying peft LoRA layers (peft keys, no adapter name), fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every peft LoRA layer of ``model`` into its base layer and put the base layer back, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def plain_copy(model: Any, ema: EMAModel | None = None) -> Any:
    """A standalone fp32 copy with the EMA weights and any LoRA merged: plain ``type(model)`` keys, eval mode.

    Rebuilt with ``from_config`` + a strict ``load_state_dict``, so a leftover adapter key would be an error rather
    than a file that only peft can load.
    """
    working = copy.deepcopy(model).float()
    if ema is not None:
        ema.copy_to(working.parameters())
    merge_adapters(working)
    plain = type(model).from_config(model.config)
    plain.load_state_dict(working.state_dict())
    return plain.eval()
