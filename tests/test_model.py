"""The UNet builder."""

from __future__ import annotations

import json

import pytest
import torch

from crispdiff.core.config import ModelConfig
from crispdiff.diffusion.unets import build_unet, count_parameters, group_norm_groups, unet_from_config


def test_group_norm_groups_accept_48():
    assert group_norm_groups([48, 96, 192, 384]) == 24
    assert group_norm_groups([64, 128]) == 32
    assert group_norm_groups([8, 16]) == 8


def test_builder_places_attention_at_requested_resolutions():
    unet = build_unet(64, base_channels=48, channel_mults=[1, 2, 4, 8], attention_res=[16, 8], layers_per_block=1)
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert unet.config.up_block_types == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert unet.config.norm_num_groups == 24
    assert count_parameters(unet) > 1_000_000


def test_tiny_unet_forward_shape():
    unet = build_unet(16, base_channels=8, channel_mults=[1, 2], attention_res=[8], layers_per_block=1, in_channels=4)
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 500])).sample
    assert out.shape == (2, 4, 16, 16)


def test_tiny_unet_without_attention_levels():
    unet = build_unet(16, base_channels=8, channel_mults=[1, 2], attention_res=[], layers_per_block=1)
    assert unet(torch.randn(1, 3, 16, 16), torch.tensor([3])).sample.shape == (1, 3, 16, 16)


def test_default_attention_res_works_at_128_px():
    """The 64 px defaults (16, 8) at 128 px: 16 is a level, 8 is deeper than the UNet goes and is skipped."""
    config = ModelConfig(base_channels=8, layers_per_block=1)
    unet = unet_from_config(config, resolution=128)
    assert unet.config.down_block_types[-1] == "AttnDownBlock2D"
    assert sum(block.startswith("Attn") for block in unet.config.down_block_types) == 1


def test_builder_errors_name_the_flag():
    with pytest.raises(ValueError, match="--attention_res"):
        build_unet(64, base_channels=8, channel_mults=[1, 2], attention_res=[48])
    with pytest.raises(ValueError, match="--resolution"):
        build_unet(60, base_channels=8, channel_mults=[1, 2, 4, 8], attention_res=[])


def test_model_config_file_is_used(tmp_path):
    unet = build_unet(32, base_channels=8, channel_mults=[1, 2], attention_res=[])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(unet.config)))
    built = unet_from_config(ModelConfig(model_config_name_or_path=str(path)), resolution=16, in_channels=4)
    assert tuple(built.config.block_out_channels) == (8, 16)
    assert built.config.sample_size == 16 and built.config.in_channels == 4
    with pytest.raises(FileNotFoundError, match="--model_config_name_or_path"):
        unet_from_config(ModelConfig(model_config_name_or_path=str(tmp_path / "nope")), resolution=16)


def test_ddpm_cifar10_reference_config_builds(tmp_path):
    from conftest import shared_dir

    path = shared_dir() / "reference" / "ddpm-cifar10-32" / "unet" / "config.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    unet = unet_from_config(ModelConfig(model_config_name_or_path=str(path)), resolution=32)
    assert tuple(unet.config.block_out_channels) == (128, 256, 256, 256)


def test_scale_shift_flag_makes_class_and_time_modulate_the_norms():
    """--resnet_time_scale_shift scale_shift reaches the UNet: each ResNet's embedding projection doubles (a scale
    and a shift per channel), and a class label changes the output."""
    config = ModelConfig(base_channels=8, channel_mults=[1, 2], attention_res=[], layers_per_block=1)
    plain = unet_from_config(config, 16, in_channels=4, num_class_embeds=3)
    config.resnet_time_scale_shift = "scale_shift"
    adagn = unet_from_config(config, 16, in_channels=4, num_class_embeds=3)
    assert adagn.config.resnet_time_scale_shift == "scale_shift"
    block = adagn.down_blocks[0].resnets[0]
    assert block.time_emb_proj.out_features == 2 * plain.down_blocks[0].resnets[0].time_emb_proj.out_features
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        a = adagn(x, t, class_labels=torch.tensor([0, 0])).sample
        b = adagn(x, t, class_labels=torch.tensor([1, 1])).sample
    assert not torch.allclose(a, b)
