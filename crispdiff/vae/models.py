"""Building a VAE for ``train_vae.py``: from a config or a pretrained one, its latent widened (more channels) or
deepened (another down/up level) without losing what it learned, and LPIPS when its weights are on this machine.
The GAN stage's patch discriminator is :class:`crispdiff.train.gan.PatchDiscriminator`, shared with SR training."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from crispdiff.diffusion.unets import group_norm_groups
from crispdiff.latent.vae import (
    load_vae,
)
from crispdiff.vae.config import PRESETS, VAETrainConfig

logger = logging.getLogger("crispdiff")


def build_vae(config: VAETrainConfig) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` from the preset, with any explicit overrides, at the training resolution."""
    channels, layers = PRESETS[config.preset]
    channels = tuple(config.block_out_channels or channels)
    layers = config.layers_per_block or layers
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=config.latent_channels or 4,
        norm_num_groups=config.norm_num_groups or group_norm_groups(list(channels)),
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_block_attention,
    )


def initial_vae(config: VAETrainConfig) -> AutoencoderKL:
    """The model to train: pretrained (decoder-only or widened if asked) or from scratch, trainable parts unfrozen."""
    if not config.pretrained_vae_name_or_path:
        return build_vae(config).train()
    vae = load_vae(config.pretrained_vae_name_or_path, torch_dtype=torch.float32)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"--pretrained_vae_name_or_path {config.pretrained_vae_name_or_path!r} is a {type(vae).__name__}; "
            "train_vae.py trains AutoencoderKL models only."
        )
    wanted = config.latent_channels or vae.config.latent_channels
    if wanted != vae.config.latent_channels:
        if config.train_decoder_only:
            raise ValueError("--latent_channels cannot change with --train_decoder_only (the encoder is frozen).")
        vae = widen_latent(vae, wanted)
    if config.layers_per_block and config.layers_per_block != vae.config.layers_per_block:
        vae = deepen(vae, config.layers_per_block)
    vae.train().requires_grad_(True)
    if config.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae


@torch.no_grad()
def widen_latent(vae: AutoencoderKL, latent_channels: int) -> AutoencoderKL:
    """A copy of ``vae`` with more latent channels that decodes exactly as ``vae`` did (function-preserving growth).

    Why: a 4-channel f=4 latent is what loses detail, and retraining from scratch throws away hours of CPU. The new
    channels start as extra encoder outputs (fresh init) that the decoder's first convolution ignores (zero columns),
    and the 1x1 quant convolutions pass them through (identity), so training starts from the old model's quality and
    the gradient teaches the decoder to use the new channels.
    """
    old = vae.config.latent_channels
    if latent_channels < old:
        raise ValueError(
            f"--latent_channels {latent_channels} is smaller than the pretrained VAE's {old}; it can only be widened."
        )
    wide = AutoencoderKL.from_config({**vae.config, "latent_channels": latent_channels})
    source, target = vae.state_dict(), wide.state_dict()
    for name, tensor in source.items():
        if target[name].shape == tensor.shape:
            target[name].copy_(tensor)
    # [mean, logvar] channels: old channel i lands at kept[i]; the others are new (fresh encoder rows)
    kept = torch.tensor([*range(old), *range(latent_channels, latent_channels + old)])
    target["encoder.conv_out.weight"][kept] = source["encoder.conv_out.weight"]
    target["encoder.conv_out.bias"][kept] = source["encoder.conv_out.bias"]
    if vae.quant_conv is not None:  # 1x1 conv over [mean, logvar]
        _grow_1x1(target, "quant_conv", source, kept)
    if vae.post_quant_conv is not None:
        _grow_1x1(target, "post_quant_conv", source, torch.arange(old))
    # the decoder's first convolution ignores the new channels at step 0
    target["decoder.conv_in.weight"].zero_()
    target["decoder.conv_in.weight"][:, :old] = source["decoder.conv_in.weight"]
    wide.load_state_dict(target)
    return wide


@torch.no_grad()
def deepen(vae: AutoencoderKL, layers_per_block: int) -> AutoencoderKL:
    """A copy of ``vae`` with more ResNet layers per level that encodes and decodes exactly as ``vae`` did.

    Why: the f=4 decoder's full-resolution level is narrow, and with a frozen encoder (``--train_decoder_only``) more
    decoder depth is the capacity that can be added without changing a single latent. ``AutoencoderKL`` has one
    ``layers_per_block`` for both halves, so the encoder grows too; every new ResNet is appended after a level's
    existing ones with its last convolution zeroed, which makes it an exact identity (``x + 0``). Frozen, the encoder's
    new layers stay identities; trainable, the decoder's learn from step 0.
    """
    old = vae.config.layers_per_block
    if layers_per_block < old:
        raise ValueError(
            f"--layers_per_block {layers_per_block} is smaller than the pretrained VAE's {old}; "
            "it can only be deepened."
        )
    deep = AutoencoderKL.from_config({**vae.config, "layers_per_block": layers_per_block})
    kept = deep.state_dict()
    missing = set(kept)
    for name, tensor in vae.state_dict().items():
        kept[name].copy_(tensor)
        missing.discard(name)
    for name in missing:  # only the new ResNets' parameters
        if ".conv2." in name:
            kept[name].zero_()
    deep.load_state_dict(kept)
    return deep


def load_lpips(config: VAETrainConfig) -> nn.Module | None:
    """LPIPS from the ``lpips`` package when it and its backbone weights are already on this machine, else ``None``.

    Never downloads: the backbone (torchvision's AlexNet/VGG/SqueezeNet) must already sit in torch's hub cache. The
    printed message says why LPIPS is off and how to turn it on.
    """
    if config.lpips_weight <= 0:
        return None
    try:
        import lpips  # noqa: F401
    except ImportError:
        print("LPIPS is off: the lpips package is not installed (pip install lpips); --lpips_weight is ignored.")
        return None
    backbone = {"alex": "alexnet-owt-*.pth", "vgg": "vgg16-*.pth", "squeeze": "squeezenet1_1-*.pth"}[config.lpips_net]
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not list(hub_checkpoints.glob(backbone)):
        print(
            f"LPIPS is off: no cached {config.lpips_net} backbone ({backbone}) in {hub_checkpoints}, and crispdiff "
            "never downloads during training; place the torchvision weights there to enable --lpips_weight."
        )
        return None
    import lpips

    model = lpips.LPIPS(net=config.lpips_net, verbose=False).eval().requires_grad_(False)
    return model


def _grow_1x1(target: dict[str, torch.Tensor], name: str, source: dict[str, torch.Tensor], kept: torch.Tensor) -> None:
    """A widened 1x1 convolution: the old map between the ``kept`` channels, identity on the new ones."""
    weight, bias = target[f"{name}.weight"], target[f"{name}.bias"]
    weight.zero_(), bias.zero_()
    weight[:, :, 0, 0] = torch.eye(weight.shape[0])
    weight[kept[:, None], kept[None, :]] = source[f"{name}.weight"]
    bias[kept] = source[f"{name}.bias"]
