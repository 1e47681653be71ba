"""A diffusion UNet whose encoder is a timm backbone (ResNet, ConvNeXt, RegNet, ...): ``TimmEncoderUNet``.

Why this file exists on its own: a saved pipeline folder carries a copy of it in ``unet/timm_unet.py`` and names it in
``model_index.json`` as ``["timm_unet", "TimmEncoderUNet"]``, so ``DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)`` rebuilds the UNet on a machine where crispdiff is not installed. It therefore imports only
torch, diffusers and timm.

The design keeps a pretrained encoder useful instead of destroying it on the first step:

- **Timestep by zero-initialised FiLM.** After every encoder stage the features are modulated by ``h * (1 + scale) +
  shift`` with ``(scale, shift)`` a linear function of the timestep (and class) embedding whose weights start at zero:
  at step 0 the encoder computes exactly the features of the bare timm model, and training learns how far to move.
- **A full-resolution stem skip.** timm stems already divide by 2 (ResNet) or 4 (ConvNeXt), so at 32-64 px the
  encoder never sees single pixels; a small convolution path at input resolution (and at stride 2 when the timm stem
  divides by 4) feeds the decoder levels the encoder has no features for.
- **Norms.** A diffusion model sees batches mixing every noise level, so BatchNorm's batch statistics (and the gap
  between its train and eval behaviour) hurt. ``encoder_norm="group"`` (default) swaps each BatchNorm for a GroupNorm
  that keeps its affine weights; ``"frozen_bn"`` keeps BatchNorm but frozen at its running statistics (the exact
  pretrained function, meant for ``--encoder_weights``); ``"batch"`` leaves timm's BatchNorm as it is. Networks with
  LayerNorm (ConvNeXt) are unaffected by this choice.
- **A light decoder.** One level per power of two from the deepest encoder stride up to full resolution: upsample,
  concatenate the encoder (or stem) features at that stride when there are any, diffusers ResNet blocks that take the
  time embedding.

Only timm models whose ``features_only`` wrapper is a ``FeatureListNet`` (a plain sequence of stages: ResNet, ConvNeXt,
RegNet, ...) are supported, because FiLM has to act between stages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from timm.layers import GroupNormAct, freeze_batch_norm_2d
from timm.layers.norm_act import BatchNormAct2d
from timm.models import FeatureListNet
from torch import nn

MODULE_NAME = "timm_unet"
ENCODER_NORMS = ("group", "frozen_bn", "batch")


class EncoderWeightsError(ValueError):
    """An ``encoder_weights`` file that does not fit the encoder; the message names the file and the keys."""


def groups_for(channels: int, preferred: int = 32) -> int:
    """The largest group count <= ``preferred`` that divides ``channels`` (GroupNorm needs an exact division)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def batch_norms_to_group_norms(module: nn.Module, preferred_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm2d (and timm's BatchNormAct2d) by a GroupNorm keeping the affine weights.

    The running statistics cannot carry over (GroupNorm normalises per sample); the affine scale and shift do, which is
    what a pretrained network's zero-initialised residual gammas rely on.
    """
    if isinstance(module, BatchNormAct2d):
        channels = module.num_features
        new: nn.Module = GroupNormAct(channels, groups_for(channels, preferred_groups), eps=module.eps)
        new.act, new.drop = module.act, module.drop
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        channels = module.num_features
        new = nn.GroupNorm(groups_for(channels, preferred_groups), channels, eps=module.eps, affine=module.affine)
    else:
        for name, child in module.named_children():
            converted = batch_norms_to_group_norms(child, preferred_groups)
            if converted is not child:
                module.add_module(name, converted)
        return module
    if module.affine:
        with torch.no_grad():
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
    return new


def convert_norms(encoder: nn.Module, encoder_norm: str, preferred_groups: int = 32) -> nn.Module:
    """Apply the ``encoder_norm`` choice (see the module docstring) to a timm ``features_only`` model."""
    if encoder_norm == "group":
        return batch_norms_to_group_norms(encoder, preferred_groups)
    if encoder_norm == "frozen_bn":
        return freeze_batch_norm_2d(encoder)
    if encoder_norm == "batch":
        return encoder
    raise ValueError(f"encoder_norm must be one of {ENCODER_NORMS}, got {encoder_norm!r}")


def create_encoder(name: str, in_channels: int) -> FeatureListNet:
    """The bare timm ``features_only`` network, randomly initialised (nothing is ever downloaded here)."""
    encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels)
    if not isinstance(encoder, FeatureListNet):
        raise ValueError(
            f"timm model {name!r} exposes its features through {type(encoder).__name__}, not a FeatureListNet; "
            "TimmEncoderUNet needs a plain sequence of stages (e.g. resnet*, convnext*, regnet*)"
        )
    return encoder


class TimmEncoderUNet(ModelMixin, ConfigMixin):
    """A UNet with a timm encoder, FiLM timestep conditioning, a full-resolution stem skip and a light decoder.

    Args:
        encoder: timm model name (``timm.list_models()``), e.g. ``"convnext_atto"`` or ``"resnet18"``.
        sample_size: input height/width in pixels (or latents); must be divisible by the encoder's deepest stride.
        in_channels, out_channels: channels of the input and of the prediction (out defaults to in).
        decoder_channels: width of each decoder level, index ``i`` working at stride ``2**i`` (index 0 = full
            resolution); one entry per power of two up to the encoder's deepest stride. ``None``: ``stem_channels *
            2**i`` capped at 128.
        stem_channels: width of the full-resolution stem path (its stride-2 level, if any, is ``decoder_channels[1]``
            wide).
        layers_per_block: ResNet blocks per decoder level.
        encoder_norm: ``"group"``, ``"frozen_bn"`` or ``"batch"`` (see the module docstring).
        norm_num_groups: preferred GroupNorm group count (the largest divisor of each width <= this is used).
        num_class_embeds: number of class ids (including the null class) for class conditioning; ``None``: none.
        time_embedding_dim: width of the timestep (+ class) embedding; ``None``: 4 x ``stem_channels``.
        dropout: dropout inside the decoder's ResNet blocks.
    """

    @register_to_config
    def __init__(
        self,
        encoder: str = "convnext_atto",
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int | None = None,
        decoder_channels: list[int] | tuple[int, ...] | None = None,
        stem_channels: int = 32,
        layers_per_block: int = 1,
        encoder_norm: str = "group",
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        time_embedding_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if encoder_norm not in ENCODER_NORMS:
            raise ValueError(f"encoder_norm must be one of {ENCODER_NORMS}, got {encoder_norm!r}")
        out_channels = out_channels or in_channels
        self.backbone = convert_norms(create_encoder(encoder, in_channels), encoder_norm, norm_num_groups)
        strides = [int(r) for r in self.backbone.feature_info.reduction()]
        widths = [int(c) for c in self.backbone.feature_info.channels()]
        if any(s & (s - 1) for s in strides):
            raise ValueError(f"timm model {encoder!r} has feature strides {strides}; only powers of two are supported")
        deepest = max(strides)
        if sample_size % deepest:
            raise ValueError(f"sample_size {sample_size} is not divisible by {encoder!r}'s deepest stride {deepest}")
        levels = int(math.log2(deepest))  # decoder levels at strides 2**0 .. 2**(levels - 1); the deepest is the mid
        if decoder_channels is None:
            decoder_channels = [min(stem_channels * 2**i, 128) for i in range(levels)]
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != levels:
            raise ValueError(
                f"decoder_channels needs {levels} entries for {encoder!r} (strides 1..{deepest // 2}), "
                f"got {len(decoder_channels)}"
            )
        temb = time_embedding_dim or 4 * stem_channels

        self.time_proj = Timesteps(stem_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(stem_channels, temb)
        self.class_embedding = nn.Embedding(num_class_embeds, temb) if num_class_embeds is not None else None
        # one FiLM per encoder stage, zero-initialised so the encoder starts as the bare timm network
        self.film = nn.ModuleList(nn.Linear(temb, 2 * c) for c in widths)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

        def block(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                in_channels=cin,
                out_channels=cout,
                temb_channels=temb,
                groups=groups_for(cin, norm_num_groups),
                groups_out=groups_for(cout, norm_num_groups),
                dropout=dropout,
                eps=1e-5,
            )

        # the stem path: full resolution, then one stride-2 level per power of two the timm stem skips over
        # (ConvNeXt's stride-4 patchify leaves stride 2 without encoder features; ResNet's stem leaves none)
        stem_widths = [stem_channels] + [decoder_channels[j] for j in range(1, int(math.log2(min(strides))))]
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1)
        self.stem_down = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1) for cin, cout in zip(stem_widths, stem_widths[1:])
        )
        self.stem_blocks = nn.ModuleList(block(c, c) for c in stem_widths)
        skip_widths = {**{2**j: c for j, c in enumerate(stem_widths)}, **dict(zip(strides, widths))}
        self.mid = block(widths[-1], decoder_channels[-1])
        self.up = nn.ModuleList()
        previous = decoder_channels[-1]
        for level in reversed(range(levels)):  # deepest first
            skip = skip_widths.get(2**level, 0)
            blocks = [block(previous + skip, decoder_channels[level])]
            blocks += [block(decoder_channels[level], decoder_channels[level]) for _ in range(layers_per_block - 1)]
            self.up.append(nn.ModuleList(blocks))
            previous = decoder_channels[level]
        self.up_convs = nn.ModuleList(
            nn.Conv2d(c, c, 3, padding=1) for c in [decoder_channels[-1], *reversed(decoder_channels[1:])]
        )
        self.norm_out = nn.GroupNorm(groups_for(decoder_channels[0], norm_num_groups), decoder_channels[0])
        self.conv_out = nn.Conv2d(decoder_channels[0], out_channels, 3, padding=1)

    # ---- pieces ------------------------------------------------------------------------------------------------------

    def embed(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device, class_labels: Any) -> Any:
        """The timestep (+ class) embedding, as in UNet2DModel: sinusoidal projection, MLP, plus a class vector."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(device)
        timesteps = timestep.to(device) * torch.ones(batch, dtype=timestep.dtype, device=device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given: this model was built with num_class_embeds")
            emb = emb + self.class_embedding(class_labels.to(device)).to(dtype=emb.dtype)
        return emb

    def encode(self, sample: torch.Tensor, emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The encoder's per-stage features, each FiLM-modulated (and passed on modulated) when ``emb`` is given."""
        features = []
        x = sample
        for name, module in self.backbone.items():
            x = module(x)
            if name in self.backbone.return_layers:
                if emb is not None:
                    scale, shift = self.film[len(features)](emb).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
                    x = x * (1 + scale) + shift
                features.append(x)
        return features

    # ---- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict from a noisy ``sample`` at ``timestep`` (the UNet2DModel call signature)."""
        emb = self.embed(timestep, sample.shape[0], sample.device, class_labels)
        features = self.encode(sample, emb)
        skips = dict(zip(self.backbone.feature_info.reduction(), features))
        h = self.stem(sample)
        for j, layer in enumerate(self.stem_blocks):
            if j:
                h = self.stem_down[j - 1](h)
            h = layer(h, emb)
            skips[2**j] = h

        x = self.mid(features[-1], emb)
        levels = len(self.up)
        for i, (blocks, up_conv) in enumerate(zip(self.up, self.up_convs)):
            stride = 2 ** (levels - 1 - i)
            size = (sample.shape[-2] // stride, sample.shape[-1] // stride)
            x = up_conv(F.interpolate(x, size=size, mode="nearest"))
            if stride in skips:
                x = torch.cat([x, skips[stride]], dim=1)
            for layer in blocks:
                x = layer(x, emb)
        out = self.conv_out(F.silu(self.norm_out(x)))
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    # ---- pretrained encoder weights ----------------------------------------------------------------------------------

    def load_encoder_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "encoder_weights") -> None:
        """Load a timm state dict (of the full classification model or its ``features_only`` version) into the encoder.

        Keys are matched with ``.`` and ``_`` treated alike (``features_only`` renames ``stages.0`` to ``stages_0``);
        keys of the classifier head are ignored. The weights go into a bare timm encoder first and then through the
        same norm conversion as at construction, so GroupNorm keeps the pretrained affine weights and frozen BatchNorm
        the running statistics. A first convolution trained on RGB is adapted to other ``in_channels`` the way timm
        does. Any missing, unknown or misshapen key raises :class:`EncoderWeightsError` naming ``source``.
        """
        config = self.config
        bare = create_encoder(config.encoder, config.in_channels)
        target = bare.state_dict()
        by_norm = {key.replace(".", "_"): key for key in target}
        head_keys = self._head_keys()
        loaded: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            mine = by_norm.get(key.replace(".", "_"))
            if mine is None:
                if key.replace(".", "_") not in head_keys:
                    unknown.append(key)
                continue
            loaded[mine] = value
        missing = sorted(set(target) - set(loaded))
        if unknown or missing:
            raise EncoderWeightsError(
                f"{source} does not fit timm model {config.encoder!r}: "
                + "; ".join(
                    f"{what} keys {keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                    for what, keys in (("missing", missing), ("unexpected", unknown))
                    if keys
                )
            )
        first_conv = self._first_conv_key(bare)
        for key, value in loaded.items():
            if value.shape == target[key].shape:
                continue
            if key == first_conv and value.ndim == 4 and value.shape[0] == target[key].shape[0]:
                from timm.models import adapt_input_conv

                loaded[key] = adapt_input_conv(int(config.in_channels), value.float()).to(value.dtype)
                continue
            raise EncoderWeightsError(
                f"{source}: {key} has shape {tuple(value.shape)} but timm model {config.encoder!r} "
                f"(in_channels={config.in_channels}) needs {tuple(target[key].shape)}"
            )
        bare.load_state_dict(loaded, strict=True)
        converted = convert_norms(bare, config.encoder_norm, config.norm_num_groups)
        self.backbone.load_state_dict(converted.state_dict(), strict=True)

    def _head_keys(self) -> set[str]:
        """State-dict keys (``.`` -> ``_``) of the full timm model that its ``features_only`` version drops."""
        full = timm.create_model(self.config.encoder, pretrained=False, in_chans=self.config.in_channels)
        features = {key.replace(".", "_") for key in create_encoder(self.config.encoder, 3).state_dict()}
        return {key.replace(".", "_") for key in full.state_dict()} - features

    def _first_conv_key(self, bare: nn.Module) -> str | None:
        """The weight key of the first convolution (the one an RGB checkpoint must be adapted for)."""
        for name, module in bare.named_modules():
            if isinstance(module, nn.Conv2d):
                return f"{name}.weight"
        return None


__all__ = ["ENCODER_NORMS", "EncoderWeightsError", "TimmEncoderUNet", "convert_norms", "create_encoder"]
