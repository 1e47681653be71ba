"""Fine-tuning a pretrained UNet (e.g. google/ddpm-cifar10-32) on small data: full, decoder-only or LoRA.

Why a separate entry point rather than a flag of ``train_unconditional.py``: a pretrained model brings its own
architecture *and* its own noise schedule and prediction type. crispdiff's defaults (cosine, v-prediction) are right
for a model trained from scratch and wrong for one that learned to predict epsilon on linear betas, so here every
schedule flag defaults to "whatever the pretrained scheduler says" and only an explicit flag changes it.

What happens to the pretrained network:

* the resolution may change (``sample_size`` in the config; the weights are convolutional, so nothing else moves),
  which moves every attention layer to a larger feature map: the log says where attention runs now;
* new parameters (a class embedding for ``--class_column``) are created with ``from_config`` + ``load_state_dict(
  strict=False)``, zero-initialised so the model starts exactly where the pretrained one was, and the missing keys
  are checked to be exactly the new ones (``from_pretrained`` with extra config kwargs leaves them uninitialised in
  diffusers 0.42);
* ``--train_modules`` picks what trains: everything, the decoder half only, or LoRA adapters injected with peft
  directly (``UNet2DModel`` has no ``PeftAdapterMixin``). The saved pipeline always holds a plain ``UNet2DModel``
  with the adapters merged, so it loads anywhere; ``--save_lora_adapter`` also writes the adapter itself.

The training loop is crispdiff's own ``UNetTrainer`` (EMA, exact resume, checkpoints, validation, export): this module
only prepares the UNet and the list of trainable parameters it gets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import ModelMixin

from crispdiff.core.errors import FlagError
from crispdiff.diffusion.unets import count_parameters, describe_parameters
from crispdiff.train.augment import class_embed_count
from crispdiff.train.loop import check_output_dir, run_trainer
from crispdiff.train.lora import (
    has_adapters,
)
from crispdiff.train.process import start_run
from crispdiff.train.spaces import TrainingSpace, pixel_space
from crispdiff.train.unet_trainer import UNetTrainer
from crispdiff.transfer.adapters import save_lora_adapter, select_trainable
from crispdiff.transfer.config import ADAPTER_FOLDER, TransferConfig
from crispdiff.transfer.pretrained import Pretrained, adapt_unet, load_pretrained, resolve_schedule

logger = logging.getLogger("crispdiff")


class TransferTrainer(UNetTrainer):
    """crispdiff's UNetTrainer on a prepared pretrained UNet; with LoRA it can also save the adapter."""

    def __init__(
        self,
        config: TransferConfig,
        space: TrainingSpace,
        accelerator: Accelerator,
        unet: ModelMixin,
        trainable: list[torch.nn.Parameter],
        new_keys: list[str] = (),
    ):
        self.new_keys = list(new_keys)
        self.num_trainable = sum(p.numel() for p in trainable)
        super().__init__(config, space, accelerator, unet=unet, trainable=trainable)

    def describe(self) -> str:
        unet = self.accelerator.unwrap_model(self.unet)
        total = count_parameters(unet)
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return (
            f"{len(self.space)} training items{classes}, pretrained UNet with {describe_parameters(total)} "
            f"({describe_parameters(self.num_trainable)} trainable: --train_modules {self.config.train_modules})"
        )

    def export(self, final: bool = False) -> Path:
        folder = super().export(final)
        unet = self.accelerator.unwrap_model(self.unet)
        if self.config.save_lora_adapter and has_adapters(unet):
            saved = save_lora_adapter(unet, self.output_dir / ADAPTER_FOLDER, self.new_keys, self.ema)
            self.accelerator.print(f"LoRA adapter saved to {saved}")
        return folder


def prepare_unet(
    config: TransferConfig, pretrained: Pretrained, space: TrainingSpace
) -> tuple[ModelMixin, list[torch.nn.Parameter], list[str]]:
    """The adapted UNet, its trainable parameters and its new parameter names, for this config and data."""
    class_names = getattr(space, "class_names", None)
    num_class_embeds = class_embed_count(len(class_names), config.augment_prob) if class_names else None
    if config.augment_prob > 0 and pretrained.unet.config.get("num_class_embeds") is not None:
        raise FlagError(
            "--augment_prob needs a class embedding row for each transform of each class, and the pretrained UNet "
            "already has its own class embedding: fine-tune it without --augment_prob"
        )
    if class_names and pretrained.class_names and list(pretrained.class_names) != list(class_names):
        raise FlagError(f"the pretrained model's classes {pretrained.class_names} differ from the data's {class_names}")
    unet, new_keys = adapt_unet(pretrained.unet, space.sample_size, space.channels, num_class_embeds, config.dropout)
    trainable = select_trainable(unet, config, new_keys)
    return unet, trainable, new_keys


def train_transfer(config: TransferConfig, space: TrainingSpace | None = None) -> Path | None:
    """Fine-tune ``--pretrained_model_name_or_path`` on the configured data; returns the saved pipeline folder."""
    config = config.resolve()
    check_output_dir(config)
    pretrained = load_pretrained(config.pretrained_model_name_or_path, config.revision)
    config = resolve_schedule(config, pretrained)
    accelerator = start_run(config)
    logger.info(
        "pretrained %s: %s schedule, %s prediction (T=%d)",
        pretrained.source,
        config.beta_schedule,
        config.prediction_type,
        config.num_train_timesteps,
    )
    if space is None:
        space = pixel_space(config, accelerator)
    unet, trainable, new_keys = prepare_unet(config, pretrained, space)
    return run_trainer(TransferTrainer(config, space, accelerator, unet, trainable, new_keys))
