"""The flags of ``train_transfer.py`` (``TransferConfig``) and the names of the UNet parts ``--train_modules`` picks."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

from crispdiff.core.config import ModelConfig, TrainConfig
from crispdiff.core.errors import FlagError
from crispdiff.core.flags import Condition, flag
from crispdiff.train.lora import (
    UNET2D_LORA_PRESETS,
    expand_targets,
)

logger = logging.getLogger("crispdiff")


TRAIN_MODULES = ("all", "decoder", "lora")


#: The adapter files ``--save_lora_adapter`` writes (peft's names), in OUTPUT_DIR/lora_adapter.
ADAPTER_FOLDER = "lora_adapter"


#: Parts of a UNet2DModel that the "encoder" (frozen by --freeze_encoder) and "decoder" (--train_modules decoder) are.
ENCODER_PREFIXES = ("conv_in.", "down_blocks.")


DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


#: Schedule fields that default to the pretrained scheduler's values (None on the command line = "from there").
SCHEDULE_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "rescale_betas_zero_snr",
)


#: Why train_transfer.py refuses the UNet architecture flags (all of ModelConfig's but --dropout, which it applies).
ARCHITECTURE_IS_PRETRAINED = (
    "the architecture is the pretrained model's (--pretrained_model_name_or_path); drop the flag, or train a new "
    "UNet with train_unconditional.py or train_latent.py"
)


@dataclass
class TransferConfig(TrainConfig):
    """Everything `train_scripts/train_transfer.py` accepts: the training flags plus the pretrained model's."""

    diffusers_script: ClassVar[str | None] = None  # crispdiff's own script: no diffusers defaults to compare with
    refused_flags: ClassVar[dict[str, str]] = {
        **TrainConfig.refused_flags,
        **{f.name: ARCHITECTURE_IS_PRETRAINED for f in dataclasses.fields(ModelConfig) if f.name != "dropout"},
        "time_budget_minutes": "train_transfer.py runs --max_train_steps (or --num_epochs); drop it",
    }
    conditional_flags: ClassVar[dict[str, Condition]] = {
        name: (lambda c: c.train_modules == "lora", "--train_modules lora")
        for name in ("lora_rank", "lora_alpha", "lora_target_modules")
    }

    pretrained_model_name_or_path: str | None = flag(
        None,
        "The pretrained model (required): a diffusers DDPMPipeline folder or Hub id (google/ddpm-cifar10-32), a "
        "crispdiff pipeline folder, or a bare UNet2DModel folder.",
    )
    revision: str | None = flag(None, "Revision (branch, tag or commit) of a Hub model.")
    train_modules: str = flag(
        "all",
        "What trains: 'all' (every weight), 'decoder' (up blocks and output layers; the encoder, middle block and "
        "time embedding stay as pretrained) or 'lora' (low-rank adapters, merged into the saved UNet).",
        choices=list(TRAIN_MODULES),
    )
    freeze_encoder: bool = flag(False, "With --train_modules all: keep conv_in and the down blocks as pretrained.")
    lora_rank: int = flag(8, "With --train_modules lora: the LoRA rank.")
    lora_alpha: float | None = flag(
        None, "With --train_modules lora: LoRA alpha (scale = alpha / rank; default: the rank, i.e. scale 1)."
    )
    lora_target_modules: list[str] = flag(
        ["attention", "conv"],
        "With --train_modules lora: the modules that get LoRA: presets 'attention' (to_q/k/v/out; in ddpm-cifar10 "
        "that hits just 3 places: one down level, one up level and the middle block), 'resnet' (the 3x3 convolutions "
        "of every ResNet block), 'conv' (those, the 1x1 shortcuts and the down/up samplers), 'time' (each block's "
        "time projection), or module names.",
    )
    save_lora_adapter: bool = flag(
        False, f"With --train_modules lora: also write OUTPUT_DIR/{ADAPTER_FOLDER} (the EMA adapter, safetensors)."
    )
    # The schedule and objective come from the pretrained scheduler unless given explicitly.
    num_train_timesteps: int | None = flag(None, "T (default: the pretrained scheduler's).")
    beta_schedule: str | None = flag(
        None,
        "Noise schedule (default: the pretrained scheduler's; another one retrains the model's noise levels).",
        choices=["linear", "scaled_linear", "cosine", "sigmoid"],
    )
    beta_start: float | None = flag(None, "First beta of linear schedules (default: the pretrained scheduler's).")
    beta_end: float | None = flag(None, "Last beta of linear schedules (default: the pretrained scheduler's).")
    rescale_betas_zero_snr: bool | None = flag(
        None, "Rescale the schedule to zero terminal SNR (default: as the pretrained scheduler does)."
    )
    prediction_type: str | None = flag(
        None,
        "What the UNet predicts (default: the pretrained scheduler's). Switching it (e.g. epsilon -> v_prediction) "
        "is experimental and needs --train_modules all without --freeze_encoder.",
        choices=["epsilon", "v_prediction", "sample"],
    )
    dropout: float | None = flag(
        None, "Dropout inside the pretrained UNet's ResNet blocks (default: the pretrained model's own, often 0)."
    )
    # fine-tuning defaults
    output_dir: str = flag("crispdiff-transfer", "Where checkpoints, logs, samples and the saved model go.")
    learning_rate: float = flag(1e-4, "Peak learning rate (fine-tuning wants less than training from scratch).")
    lr_warmup_steps: int = flag(100, "Linear warmup steps.")
    ema_power: float = flag(2 / 3, "EMA warmup power (2/3 suits the shorter runs of fine-tuning).")

    def fill_and_check(self) -> None:
        super().fill_and_check()
        if not self.pretrained_model_name_or_path:
            raise FlagError("--pretrained_model_name_or_path is required (a DDPMPipeline / crispdiff / UNet folder)")
        if self.lora_rank < 1:
            raise FlagError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if self.freeze_encoder and self.train_modules != "all":
            raise FlagError(f"--freeze_encoder goes with --train_modules all, not {self.train_modules}")
        if self.save_lora_adapter and self.train_modules != "lora":
            raise FlagError("--save_lora_adapter needs --train_modules lora")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise FlagError(f"--dropout must be in [0, 1), got {self.dropout}")

    def lora_targets(self) -> list[str]:
        """The module names peft gets (presets expanded)."""
        return expand_targets(self.lora_target_modules, UNET2D_LORA_PRESETS)
