"""What ``--train_modules`` trains (all, decoder, or LoRA on the pretrained UNet), and the LoRA adapter files."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from crispdiff.core.errors import FlagError, PathError
from crispdiff.core.io import write_atomic, write_json_atomic
from crispdiff.train.lora import (
    UNET2D_LORA_PRESETS,
    adapter_config,
    inject_lora,
    load_lora_config,
    lora_state,
)
from crispdiff.transfer.config import DECODER_PREFIXES, ENCODER_PREFIXES, TransferConfig

logger = logging.getLogger("crispdiff")


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


ADAPTER_CONFIG_NAME = "adapter_config.json"


def add_unet_lora(unet: torch.nn.Module, config: TransferConfig) -> list[str]:
    """Put peft LoRA adapters on ``unet`` in place; returns the names of the modules that got one."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = config.lora_targets()
    lora_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, target_modules=targets
    )
    try:
        inject_lora(unet, lora_config)
    except ValueError as err:
        raise FlagError(
            f"--lora_target_modules {' '.join(config.lora_target_modules)} matched no module of the UNet; use the "
            f"presets {sorted(UNET2D_LORA_PRESETS)} or module names such as conv1"
        ) from err
    return [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def select_trainable(unet: torch.nn.Module, config: TransferConfig, new_keys: list[str]) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` as --train_modules says (new parameters always train); returns the trainable ones."""
    names = [name for name, _ in unet.named_parameters()]
    if config.train_modules != "all" or config.freeze_encoder:
        if not any(n.startswith(ENCODER_PREFIXES) for n in names) or not any(
            n.startswith(DECODER_PREFIXES) for n in names
        ):
            raise FlagError(f"--train_modules {config.train_modules}: this UNet has no conv_in/down_blocks/up_blocks")
    if config.train_modules == "lora":
        adapted = add_unet_lora(unet, config)
        logger.info("LoRA rank %d on %d modules", config.lora_rank, len(adapted))
    new = set(new_keys)
    for name, param in unet.named_parameters():
        if name in new:
            train = True
        elif config.train_modules == "lora":
            train = "lora_" in name
        elif config.train_modules == "decoder":
            train = name.startswith(DECODER_PREFIXES)
        else:
            train = not (config.freeze_encoder and name.startswith(ENCODER_PREFIXES))
        param.requires_grad_(train)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise FlagError("nothing to train: --train_modules / --lora_target_modules selected no parameter")
    return trainable


def adapter_state(model: torch.nn.Module, extra_keys: list[str] = ()) -> dict[str, torch.Tensor]:
    """The LoRA weights (peft keys) plus any fully trained new parameters (their own keys), fp32 on the CPU."""
    state = lora_state(model)
    own = model.state_dict()
    state.update({k: own[k].detach().float().cpu().contiguous() for k in extra_keys})
    return state


def save_lora_adapter(
    model: torch.nn.Module, folder: str | os.PathLike, extra_keys: list[str] = (), ema: EMAModel | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's names) for the (EMA) adapter."""
    from safetensors.torch import save

    if ema is not None:
        model = copy.deepcopy(model)
        ema.copy_to(model.parameters())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_config = adapter_config(model)
    metadata = {"lora_config": json.dumps(lora_config), "extra_keys": json.dumps(list(extra_keys))}
    weights = save(adapter_state(model, extra_keys), metadata=metadata)
    write_atomic(folder / ADAPTER_WEIGHTS_NAME, lambda handle: handle.write(weights), binary=True)
    write_json_atomic(folder / ADAPTER_CONFIG_NAME, lora_config, sort_keys=True)
    return folder


def load_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> torch.nn.Module:
    """Inject the adapter saved by :func:`save_lora_adapter` into ``model`` (a plain UNet) and load its weights."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise PathError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    lora_config = load_lora_config(json.loads(metadata["lora_config"]))
    extra = json.loads(metadata.get("extra_keys", "[]"))
    state = load_file(str(path))
    inject_lora(model, lora_config)
    own = model.state_dict()  # tensors share storage with the parameters
    with torch.no_grad():
        for key in extra:
            own[key].copy_(state.pop(key))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: keys this adapter does not have: {result.unexpected_keys[:8]}")
    return model
