"""Building the denoising UNet (diffusers' `UNet2DModel`) from a few readable numbers."""

from __future__ import annotations

import difflib
import json
import logging
import math
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DModel

from crispdiff.core.config import ModelConfig
from crispdiff.core.errors import FlagError, MissingDependencyError, PathError

logger = logging.getLogger(__name__)


def group_norm_groups(channels: list[int], preferred: int = 32) -> int:
    """The largest group count <= `preferred` that divides every level's channel count.

    diffusers defaults to 32 groups, which rejects the widths small models want (48, 96, 192, ...); 48 channels get
    24 groups, 64 get 32.
    """
    common = 0
    for c in channels:
        common = math.gcd(common, c)
    for groups in range(min(preferred, common), 0, -1):
        if common % groups == 0:
            return groups
    return 1


def build_unet(
    resolution: int,
    *,
    in_channels: int = 3,
    out_channels: int | None = None,
    base_channels: int = 48,
    channel_mults: tuple[int, ...] | list[int] = (1, 2, 4, 8),
    attention_res: tuple[int, ...] | list[int] = (16, 8),
    layers_per_block: int = 2,
    dropout: float = 0.0,
    attention_head_dim: int = 32,
    num_class_embeds: int | None = None,
    resnet_time_scale_shift: str = "default",
) -> UNet2DModel:
    """A UNet2DModel with one level per channel multiplier and self-attention at the listed resolutions.

    Level i works at ``resolution / 2**i`` pixels; a level gets attention blocks when that resolution is in
    `attention_res` (the usual choice at 64 px is 16 and 8: global context where it is cheap).
    ``num_class_embeds`` (N classes + 1 null class) adds diffusers' built-in class embedding, which is added to the
    time embedding: the cheapest conditioning there is, and one that plain diffusers loads.
    """
    if not channel_mults:
        raise ValueError("--channel_mults needs at least one level")
    if resolution % (2 ** (len(channel_mults) - 1)) != 0:
        raise ValueError(
            f"--resolution {resolution} is not divisible by 2**{len(channel_mults) - 1}, which "
            f"{len(channel_mults)} --channel_mults levels need"
        )
    channels = [base_channels * m for m in channel_mults]
    level_res = [resolution // 2**i for i in range(len(channels))]
    # Resolutions below the deepest level are simply deeper than this UNet goes (e.g. the 64 px default `16 8` at
    # 128 px, whose levels end at 16); anything else that matches no level is a typo worth an error.
    unknown = sorted(r for r in set(attention_res) - set(level_res) if r >= level_res[-1])
    if unknown:
        raise ValueError(f"--attention_res {unknown} matches no UNet level; the levels are at {level_res} px")
    with_attention = [r in set(attention_res) for r in level_res]
    # at least one head even when a tiny model's attention levels are narrower than the head dim
    attention_widths = [c for c, a in zip(channels, with_attention) if a]
    head_dim = min([attention_head_dim, *attention_widths, channels[-1]])  # the middle block always has attention
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        dropout=dropout,
        attention_head_dim=head_dim,
        norm_num_groups=group_norm_groups(channels),
        add_attention=True,
        num_class_embeds=num_class_embeds,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )


def unet_from_config(
    config: ModelConfig,
    resolution: int,
    in_channels: int = 3,
    out_channels: int | None = None,
    num_class_embeds: int | None = None,
) -> UNet2DModel:
    """The UNet a training config asks for: from `--model_config_name_or_path` or from the builder flags.

    ``num_class_embeds`` (classes + 1 null class, for --class_column) replaces whatever class embedding a given
    config had: the classes are those of this run's data.
    """
    if config.encoder:
        return timm_unet_from_config(config, resolution, in_channels, out_channels, num_class_embeds)
    if config.model_config_name_or_path:
        unet_config = load_unet_config(config.model_config_name_or_path)
        unet_config.update(sample_size=resolution, in_channels=in_channels, out_channels=out_channels or in_channels)
        if num_class_embeds is not None:
            unet_config.update(num_class_embeds=num_class_embeds, class_embed_type=None)
        return UNet2DModel.from_config(unet_config)
    return build_unet(
        resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        attention_res=config.attention_res,
        layers_per_block=config.layers_per_block,
        dropout=config.dropout,
        attention_head_dim=config.attention_head_dim,
        num_class_embeds=num_class_embeds,
        resnet_time_scale_shift=config.resnet_time_scale_shift,
    )


TIMM_PREFIX = "timm:"
TIMM_EXTRA_HINT = "pip install 'crispdiff[timm]'"


def timm_unet_from_config(
    config: ModelConfig,
    resolution: int,
    in_channels: int = 3,
    out_channels: int | None = None,
    num_class_embeds: int | None = None,
) -> ModelMixin:
    """A ``TimmEncoderUNet`` for ``--encoder timm:<name>`` [+ ``--encoder_weights FILE``].

    The module lives in ``pipelines/timm_unet.py`` (saved into the pipeline folder), so it is imported only here:
    crispdiff itself must work without timm. Every problem a user can fix (timm missing, an unknown name, a
    weights file that does not fit) is a one-line FlagError / MissingDependencyError naming the flag or file.
    """
    encoder = config.encoder or ""
    if not encoder.startswith(TIMM_PREFIX) or not encoder[len(TIMM_PREFIX) :]:
        raise FlagError(f"--encoder {encoder!r} is not understood; use timm:<model name>, e.g. timm:convnext_atto")
    name = encoder[len(TIMM_PREFIX) :]
    if config.model_config_name_or_path:
        raise FlagError("--encoder and --model_config_name_or_path both describe the UNet; give one of them")
    if getattr(config, "gradient_checkpointing", False):
        raise FlagError("--gradient_checkpointing is not supported with --encoder (the timm-encoder UNet is small)")
    try:
        import timm
    except ImportError as err:
        raise MissingDependencyError(f"--encoder {encoder} needs timm: {TIMM_EXTRA_HINT}") from err
    from crispdiff.pipelines.timm_unet import EncoderWeightsError, TimmEncoderUNet

    if name.split(".")[0] not in timm.list_models():  # "resnet18.a1_in1k": a pretrained tag names weights only
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise FlagError(f"--encoder {encoder}: timm has no model {name!r}; {hint}")
    try:
        unet = TimmEncoderUNet(
            encoder=name,
            sample_size=resolution,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            stem_channels=config.base_channels,
            layers_per_block=config.layers_per_block,
            dropout=config.dropout,
            encoder_norm=config.encoder_norm,
            num_class_embeds=num_class_embeds,
        )
    except ValueError as err:
        raise FlagError(f"--encoder {encoder}: {err}") from err
    if config.encoder_weights:
        try:
            unet.load_encoder_weights(read_state_dict(config.encoder_weights), source=config.encoder_weights)
        except EncoderWeightsError as err:
            raise FlagError(f"--encoder_weights {err}") from err
    elif config.encoder_norm == "frozen_bn":
        logger.warning(
            "--encoder_norm frozen_bn without --encoder_weights freezes BatchNorm at its random init (zero-initialised "
            "residual gammas stay zero); use it with pretrained weights"
        )
    return unet


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch .pth/.pt/.ckpt (``weights_only``; a ``state_dict`` / ``model``
    entry is unwrapped, as training checkpoints nest the weights)."""
    file = Path(path)
    if not file.is_file():
        raise PathError(f"--encoder_weights {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which, not a pickle traceback
        raise FlagError(f"--encoder_weights {file} cannot be read as a state dict: {err}") from err
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FlagError(f"--encoder_weights {file} does not hold a state dict of tensors")
    return state


def load_unet_config(name_or_path: str) -> dict:
    """A UNet2DModel config from a config.json, a model folder (with or without a `unet/` subfolder) or a Hub id."""
    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if path.exists():
        raise PathError(f"--model_config_name_or_path {path} holds no config.json (nor unet/config.json)")
    try:
        return dict(UNet2DModel.load_config(name_or_path, subfolder="unet"))
    except OSError:
        try:
            return dict(UNet2DModel.load_config(name_or_path))
        except OSError as err:
            raise PathError(
                f"--model_config_name_or_path {name_or_path!r} is not a local config nor a reachable Hub model: {err}"
            ) from err


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_parameters(count: int) -> str:
    """'12.3M parameters' style text for the start-of-training banner."""
    if count >= 1e6:
        return f"{count / 1e6:.1f}M parameters"
    return f"{count / 1e3:.1f}K parameters"
