"""Building the denoising UNet (diffusers' `UNet2DModel`) from a few readable numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import UNet2DModel

from crispdiff.config import ModelConfig


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
) -> UNet2DModel:
    """A UNet2DModel with one level per channel multiplier and self-attention at the listed resolutions.

    Level i works at ``resolution / 2**i`` pixels; a level gets attention blocks when that resolution is in
    `attention_res` (the usual choice at 64 px is 16 and 8: global context where it is cheap).
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
    )


def unet_from_config(
    config: ModelConfig, resolution: int, in_channels: int = 3, out_channels: int | None = None
) -> UNet2DModel:
    """The UNet a training config asks for: from `--model_config_name_or_path` or from the builder flags."""
    if config.model_config_name_or_path:
        unet_config = load_unet_config(config.model_config_name_or_path)
        unet_config.update(sample_size=resolution, in_channels=in_channels, out_channels=out_channels or in_channels)
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
    )


def load_unet_config(name_or_path: str) -> dict:
    """A UNet2DModel config from a config.json, a model folder (with or without a `unet/` subfolder) or a Hub id."""
    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if path.exists():
        raise FileNotFoundError(f"--model_config_name_or_path {path} holds no config.json (nor unet/config.json)")
    try:
        return dict(UNet2DModel.load_config(name_or_path, subfolder="unet"))
    except OSError:
        try:
            return dict(UNet2DModel.load_config(name_or_path))
        except OSError as err:
            raise FileNotFoundError(
                f"--model_config_name_or_path {name_or_path!r} is not a local config nor a reachable Hub model: {err}"
            ) from err


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_parameters(count: int) -> str:
    """'12.3M parameters' style text for the start-of-training banner."""
    if count >= 1e6:
        return f"{count / 1e6:.1f}M parameters"
    return f"{count / 1e3:.1f}K parameters"
