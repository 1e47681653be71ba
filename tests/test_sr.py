"""The SR post-step: real SR architectures saved under their original projects' key names, loaded through crispdiff
(spandrel), tiled vs untiled, the Lanczos blend, saving as a diffusers component, `crispdiff add-sr`, and a pipeline
with SR reloaded where crispdiff cannot be imported. Tiny random-weight networks, CPU.

Original key layouts reproduced here (spandrel's architecture classes build the networks, the tests rename keys):
- Real-ESRGAN / BasicSR ``RRDBNet``: ``conv_first``, ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1/2``,
  ``conv_hr``, ``conv_last`` inside ``{"params_ema": ...}``; the x2 model pixel-unshuffles its input (12 input
  channels to ``conv_first``).
- Real-ESRGAN ``SRVGGNetCompact`` ("realesr-general-x4v3"): ``body.0`` conv, ``body.1`` PReLU, ..., inside
  ``{"params": ...}`` (spandrel keeps these names).
- SwinIR (JingyunLiang/SwinIR): ``conv_first``, ``patch_embed.norm``, ``layers.I.residual_group.blocks.J.attn.*``
  including the ``relative_position_index`` / ``attn_mask`` buffers, ``upsample.0`` for the lightweight
  ``pixelshuffledirect`` upsampler, inside ``{"params": ...}`` (spandrel keeps these names).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import spandrel
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR
from tiny_models import SIZE, WITHOUT_CRISPDIFF, base_config, tiny_unet

from crispdiff.commands import add_sr
from crispdiff.evaluate.sharpen import save_sharpen_amount
from crispdiff.pipelines.sr_model import (
    MODULE_FILE,
    WEIGHTS_NAME,
    SpandrelSRModel,
    SRModelError,
    edge_ramp,
    lanczos_resize,
    tile_starts,
)
from crispdiff.publish.export import load_pipeline, save_pipeline
from crispdiff.superres.load import attach_sr, describe_sr_model, load_sr_model, parse_hub_ref

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---- tiny networks with the original projects' key names -------------------------------------------------------------


def basicsr_rrdb_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spandrel's old-ESRGAN names (``model.0``, ``model.1.sub.N.RDBk.convj.0``, ...) -> Real-ESRGAN's names."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.(weight|bias)$", k))})
    last, hr = indices[-1], indices[-2]
    trunk = max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.(weight|bias)$", k)))
    renamed = {}
    for key, value in state.items():
        block = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key)
        name, kind = key.rsplit(".", 1)
        if block:
            new = f"body.{block[1]}.rdb{block[2]}.conv{block[3]}.{block[4]}"
        elif name == "model.0":
            new = f"conv_first.{kind}"
        elif name == f"model.1.sub.{trunk}":
            new = f"conv_body.{kind}"
        elif name == f"model.{last}":
            new = f"conv_last.{kind}"
        elif name == f"model.{hr}":
            new = f"conv_hr.{kind}"
        else:  # upsampling convs sit at model.3, model.6
            new = f"conv_up{int(name.split('.')[1]) // 3}.{kind}"
        renamed[new] = value
    return renamed


def make_network(kind: str) -> tuple[torch.nn.Module, dict, dict]:
    """(reference network, checkpoint as the original project writes it, expected facts)."""
    torch.manual_seed({"esrgan_x4": 1, "esrgan_x2": 2, "compact_x4": 3, "swinir_x2": 4}[kind])
    if kind.startswith("esrgan"):
        x2 = kind == "esrgan_x2"
        net = ESRGAN(
            in_nc=12 if x2 else 3, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2 if x2 else None
        )
        with torch.no_grad():  # mid-grey output bias, so outputs are not clamped away and comparisons mean something
            net.model[-1].bias += 0.5
        checkpoint = {"params_ema": basicsr_rrdb_keys(net.state_dict())}
        facts = {"architecture": "ESRGAN", "scale": 2 if x2 else 4, "half": True, "bf16": True}
    elif kind == "compact_x4":
        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
        checkpoint = {"params": dict(net.state_dict())}
        facts = {"architecture": "Compact", "scale": 4, "half": True, "bf16": True}
    else:
        net = SwinIR(
            img_size=16,
            in_chans=3,
            embed_dim=12,
            depths=[2],
            num_heads=[2],
            window_size=4,
            mlp_ratio=2.0,
            upscale=2,
            upsampler="pixelshuffledirect",
            resi_connection="1conv",
        )
        checkpoint = {"params": dict(net.state_dict())}
        facts = {"architecture": "SwinIR", "scale": 2, "half": False, "bf16": True}
    return net.eval(), checkpoint, facts


def write_checkpoint(checkpoint: dict, path: Path) -> Path:
    """``.pth``: torch.save of the original wrapper dict; ``.safetensors``: the flat state dict (no nesting there)."""
    if path.suffix == ".safetensors":
        (state,) = checkpoint.values()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def sr_files(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, dict, dict]]:
    """Every tiny network written as .pth and .safetensors: name -> (reference net, {suffix: path}, facts)."""
    folder = tmp_path_factory.mktemp("sr_files")
    files = {}
    for kind in ("esrgan_x4", "esrgan_x2", "compact_x4", "swinir_x2"):
        net, checkpoint, facts = make_network(kind)
        paths = {s: write_checkpoint(checkpoint, folder / f"{kind}{s}") for s in (".pth", ".safetensors")}
        files[kind] = (net, paths, facts)
    return files


def test_checkpoints_use_the_original_key_names(sr_files):
    rrdb = torch.load(sr_files["esrgan_x4"][1][".pth"], weights_only=True)
    assert list(rrdb) == ["params_ema"]
    keys = set(rrdb["params_ema"])
    for key in (
        "conv_first.weight",
        "body.0.rdb1.conv1.weight",
        "body.0.rdb3.conv5.bias",
        "conv_body.weight",
        "conv_up1.weight",
        "conv_up2.weight",
        "conv_hr.weight",
        "conv_last.bias",
    ):
        assert key in keys
    assert not any(k.startswith("model.") for k in keys)
    x2 = torch.load(sr_files["esrgan_x2"][1][".pth"], weights_only=True)["params_ema"]
    assert x2["conv_first.weight"].shape[1] == 12, "Real-ESRGAN x2 pixel-unshuffles RGB into 12 channels"
    compact = torch.load(sr_files["compact_x4"][1][".pth"], weights_only=True)["params"]
    assert compact["body.1.weight"].shape == (8,) and compact["body.6.weight"].shape == (3 * 16, 8, 3, 3)
    swinir = torch.load(sr_files["swinir_x2"][1][".pth"], weights_only=True)["params"]
    for key in (
        "conv_first.weight",
        "patch_embed.norm.weight",
        "layers.0.residual_group.blocks.0.attn.qkv.weight",
        "layers.0.residual_group.blocks.0.attn.relative_position_index",
        "layers.0.residual_group.blocks.1.attn_mask",
        "layers.0.conv.weight",
        "norm.weight",
        "conv_after_body.weight",
        "upsample.0.weight",
    ):
        assert key in swinir


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("kind", ["esrgan_x4", "esrgan_x2", "compact_x4", "swinir_x2"])
def test_original_checkpoints_load_and_run(sr_files, kind, suffix):
    """Architecture, scale and dtype support are detected, and the network computes what the original weights do."""
    net, paths, facts = sr_files[kind]
    model = load_sr_model(paths[suffix], tile_size=0)
    assert model.config.architecture == facts["architecture"]
    assert model.config.scale == facts["scale"]
    assert (model.config.supports_half, model.config.supports_bfloat16) == (facts["half"], facts["bf16"])
    assert model.config.source == paths[suffix].name
    images = torch.rand(2, 3, 20, 16, generator=torch.Generator().manual_seed(0))
    out = model(images)
    assert out.shape == (2, 3, 20 * facts["scale"], 16 * facts["scale"])
    reference_model = spandrel.ModelLoader().load_from_state_dict(net.state_dict())
    with torch.no_grad():
        reference = torch.cat([reference_model(image[None]) for image in images])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    text = describe_sr_model(model)
    assert f"x{facts['scale']}" in text and f"fp16: {'yes' if facts['half'] else 'no'}" in text and "bf16: yes" in text


def test_rrdb_x2_unshuffle_tags_and_odd_sizes(sr_files):
    model = load_sr_model(sr_files["esrgan_x2"][1][".pth"], tile_size=0)
    assert "unshuffle" in model.config.tags and model.config.size_multiple_of == 4
    assert model(torch.rand(1, 3, 13, 7)).shape == (1, 3, 26, 14)


# ---- saving as a diffusers component -------------------------------------------------------------------------------


def test_component_save_reload_bit_identical(sr_files, tmp_path):
    model = load_sr_model(sr_files["swinir_x2"][1][".pth"], tile_size=48, tile_overlap=16)
    model.save_pretrained(tmp_path / "sr")
    files = sorted(p.name for p in (tmp_path / "sr").iterdir())
    assert files == sorted(["config.json", WEIGHTS_NAME, MODULE_FILE])
    assert (tmp_path / "sr" / MODULE_FILE).read_bytes() == (REPO_ROOT / "pipelines" / "sr_model.py").read_bytes()
    config = json.loads((tmp_path / "sr" / "config.json").read_text())
    assert config["_class_name"] == "SpandrelSRModel" and config["architecture"] == "SwinIR"
    assert (config["tile_size"], config["tile_overlap"]) == (48, 16)
    # the weights file alone is an ordinary SR model file that spandrel-based tools detect
    assert spandrel.ModelLoader().load_from_file(tmp_path / "sr" / WEIGHTS_NAME).architecture.id == "SwinIR"

    reloaded = SpandrelSRModel.from_pretrained(tmp_path / "sr")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(model.config)
    images = torch.rand(1, 3, 64, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(reloaded(images), model(images))
    assert torch.equal(reloaded.upscale(images, 0.3, (100, 70)), model.upscale(images, 0.3, (100, 70)))


def test_from_pretrained_honours_loader_kwargs(sr_files, tmp_path):
    load_sr_model(sr_files["esrgan_x4"][1][".safetensors"]).save_pretrained(tmp_path / "esrgan")
    load_sr_model(sr_files["swinir_x2"][1][".safetensors"]).save_pretrained(tmp_path / "swinir")
    loader_kwargs = {
        "device_map": None,
        "low_cpu_mem_usage": True,
        "variant": None,
        "use_safetensors": None,
        "offload_folder": None,
        "offload_state_dict": None,
        "max_memory": None,
        "disable_mmap": False,
    }
    bf16 = SpandrelSRModel.from_pretrained(tmp_path / "esrgan", torch_dtype=torch.bfloat16, **loader_kwargs)
    assert bf16.dtype == torch.bfloat16
    out = bf16.upscale(torch.rand(1, 3, 8, 8))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)
    # SwinIR cannot run in fp16: a float16 pipeline load keeps it float32 instead of failing
    swin = SpandrelSRModel.from_pretrained(tmp_path / "swinir", torch_dtype=torch.float16, **loader_kwargs)
    assert swin.dtype == torch.float32
    assert swin.to(torch.float16).dtype == torch.float32, "pipe.to(float16) leaves an fp16-incapable net at fp32"
    assert swin.to(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(SRModelError, match="float16"):
        swin.half()(torch.rand(1, 3, 16, 16))
    retiled = SpandrelSRModel.from_pretrained(tmp_path / "swinir", tile_size=64, tile_overlap=8)
    assert (retiled.config.tile_size, retiled.config.tile_overlap) == (64, 8)


def test_mixed_component_folder_is_refused(sr_files, tmp_path):
    """config.json of one model with the weights of another is caught instead of silently running the wrong net."""
    load_sr_model(sr_files["esrgan_x4"][1][".pth"]).save_pretrained(tmp_path / "a")
    load_sr_model(sr_files["compact_x4"][1][".pth"]).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(SRModelError, match="mixes files"):
        SpandrelSRModel.from_pretrained(tmp_path / "a")


# ---- tiling --------------------------------------------------------------------------------------------------------


def test_tile_layout_covers_aligns_and_ramps_sum_to_one():
    for length, tile, overlap, align in [(200, 64, 16, 1), (256, 96, 32, 4), (97, 40, 8, 1), (64, 64, 8, 1)]:
        starts = tile_starts(length, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
        assert all(s % align == 0 for s in starts[:-1])
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])), "neighbours share >= overlap px"
    # two neighbours overlapping by exactly `overlap`: their ramps add up to 1 across the shared pixels
    left, right = edge_ramp(64, 16, False, True), edge_ramp(64, 16, True, False)
    torch.testing.assert_close(left[-16:] + right[:16], torch.ones(16))
    assert float(left[-4:].abs().max()) == 0.0 and float(left[:48].min()) == 1.0, "outer quarter unused"


def overlap_mask(length: int, tile: int, overlap: int, align: int, scale: int) -> torch.Tensor:
    """Output pixels along one axis that lie in the overlap of two tiles."""
    starts = tile_starts(length, tile, overlap, align)
    mask = torch.zeros(length * scale, dtype=torch.bool)
    for a, b in zip(starts, starts[1:]):
        mask[b * scale : (a + tile) * scale] = True
    return mask


@pytest.mark.parametrize(
    "kind, size, tile, overlap, atol",
    [
        # convolutional nets: receptive-field radius <= overlap / 4 input px -> equal up to float rounding
        ("compact_x4", (70, 52), 32, 16, 1e-5),  # radius 4 px
        ("esrgan_x4", (200, 96), 160, 80, 1e-5),  # radius ~18.3 px
        # SwinIR attends across shifted windows, so tiles only approximate the whole image: stated tolerance 1e-3
        ("swinir_x2", (64, 48), 32, 16, 1e-3),
    ],
)
def test_tiled_matches_untiled_inside_the_overlap(sr_files, kind, size, tile, overlap, atol):
    path = sr_files[kind][1][".pth"]
    tiled = load_sr_model(path, tile_size=tile, tile_overlap=overlap)
    whole = load_sr_model(path, tile_size=0)
    scale = tiled.config.scale
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    a, b = tiled(images), whole(images)
    assert a.shape == b.shape == (1, 3, size[0] * scale, size[1] * scale)
    assert float(((b > 0) & (b < 1)).float().mean()) > 0.75, "outputs must not be saturated for the check to mean much"
    align = tiled.config.size_multiple_of
    rows, cols = (overlap_mask(n, min(tile, n), overlap, align, scale) for n in size)
    assert rows.any() or cols.any(), "the image must be split into several tiles"
    band = rows[:, None] | cols[None, :]
    assert float((a - b).abs()[..., band].max()) <= atol
    if atol <= 1e-5:
        assert float((a - b).abs().max()) <= atol


# ---- the Lanczos blend ---------------------------------------------------------------------------------------------


def pil_lanczos(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's float ("F" mode) Lanczos resize, channel by channel: the reference the torch version must match."""
    out = []
    for image in images:
        channels = [
            np.asarray(PIL.Image.fromarray(c.numpy(), mode="F").resize(size[::-1], PIL.Image.LANCZOS)) for c in image
        ]
        out.append(np.stack(channels))
    return torch.from_numpy(np.stack(out))


def test_lanczos_matches_pil():
    images = torch.rand(2, 3, 20, 14, generator=torch.Generator().manual_seed(3))
    for size in [(80, 56), (40, 28), (33, 50), (9, 7), (20, 14)]:
        torch.testing.assert_close(lanczos_resize(images, size), pil_lanczos(images, size), rtol=0, atol=2e-6)


def test_sr_strength_blends_with_lanczos(sr_files):
    model = load_sr_model(sr_files["compact_x4"][1][".safetensors"])
    images = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(4))
    lanczos = lanczos_resize(images, (48, 40)).clamp(0, 1)
    assert torch.equal(model.upscale(images, sr_strength=0.0), lanczos), "0 is exactly the Lanczos upscale"
    sr = model(images)
    assert torch.equal(model.upscale(images, sr_strength=1.0), sr)
    half = model.upscale(images, sr_strength=0.5)
    torch.testing.assert_close(half, ((lanczos_resize(images, (48, 40)) + sr) / 2).clamp(0, 1), rtol=0, atol=1e-6)
    assert not torch.equal(half, sr) and not torch.equal(half, lanczos)
    assert model.upscale(images, 0.5, output_size=30).shape == (2, 3, 30, 30)
    assert model.upscale(images, 0.0, output_size=(17, 64)).shape == (2, 3, 17, 64)
    torch.testing.assert_close(
        model.upscale(images, 0.0, output_size=(17, 64)), pil_lanczos(images, (17, 64)).clamp(0, 1), rtol=0, atol=2e-6
    )
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sr_strength"):
            model.upscale(images, sr_strength=bad)


# ---- bad inputs ----------------------------------------------------------------------------------------------------


def test_corrupt_and_unsupported_files_give_clear_errors(sr_files, tmp_path):
    good = sr_files["esrgan_x4"][1][".pth"]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not safetensors" * 10)
    unet = tiny_unet(sample_size=8, block_out_channels=(4, 8))
    unsupported = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unsupported))
    pickled = tmp_path / "pickled_module.pth"
    torch.save(torch.nn.Conv2d(3, 3, 3), pickled)
    wrong_type = tmp_path / "model.onnx"
    wrong_type.write_bytes(b"onnx")

    cases = [
        (truncated, "cannot read"),
        (garbage, "cannot read"),
        (pickled, "cannot read"),
        (unsupported, "no known super-resolution architecture"),
        (wrong_type, "unsupported SR model file type"),
        (tmp_path / "missing.pth", "not found"),
    ]
    for path, message in cases:
        with pytest.raises(SRModelError, match=message) as info:
            load_sr_model(path)
        assert str(path.name) in str(info.value)
    with pytest.raises(SRModelError) as info:
        load_sr_model(unsupported)
    assert "ESRGAN" in str(info.value) and "SwinIR" in str(info.value), "lists the supported families"


def test_hub_references(monkeypatch):
    assert parse_hub_ref("hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth").repo_id == "ai-forever/Real-ESRGAN"
    ref = parse_hub_ref("hf://owner/repo@v1/weights/4x.safetensors")
    assert (ref.repo_id, ref.filename, ref.revision) == ("owner/repo", "weights/4x.safetensors", "v1")
    assert parse_hub_ref("owner/repo/model.pth").filename == "model.pth"
    assert parse_hub_ref("models/not-here/readme.txt") is None and parse_hub_ref("model.pth") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SRModelError, match="HF_HUB_OFFLINE=1") as info:
        load_sr_model("hf://crispdiff-test/none/RealESRGAN_x4plus.pth")
    assert "RealESRGAN_x4plus.pth" in str(info.value) and "local file path" in str(info.value)


# ---- pipelines: add-sr, and reloading without crispdiff ------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (hidden ones too) and its hash: 'unchanged' means this is identical."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_add_sr(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_sr.add_parser(parser.add_subparsers(dest="command"))
    return add_sr.run(parser.parse_args(["add-sr", *argv]))


def sample(folder: Path, seed: int = 0, **kwargs) -> torch.Tensor:
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="pt", **kwargs).images


@pytest.fixture
def plain_dir(tmp_path) -> Path:
    return save_pipeline(
        tmp_path / "pipe",
        unet=tiny_unet(),
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        training_config={"resolution": SIZE},
    )


def test_add_sr_adds_and_replaces_the_component(sr_files, plain_dir, capsys):
    plain = sample(plain_dir, seed=1)
    assert run_add_sr(str(plain_dir), "--sr_model", str(sr_files["esrgan_x2"][1][".pth"]), "--sr_strength", "0.7") == 0
    assert "ESRGAN x2" in capsys.readouterr().out
    index = json.loads((plain_dir / "model_index.json").read_text())
    assert index["sr_model"] == ["sr_model", "SpandrelSRModel"] and index["upscale"] is True
    assert index["sr_strength"] == 0.7
    assert sorted(p.name for p in (plain_dir / "sr_model").iterdir()) == sorted(
        ["config.json", WEIGHTS_NAME, MODULE_FILE]
    )
    assert not [p for p in plain_dir.iterdir() if p.name.startswith(".")], "no staging leftovers"

    pipe = load_pipeline(plain_dir)
    assert pipe.sr_model.config.architecture == "ESRGAN" and pipe.config.sr_strength == 0.7
    upscaled = sample(plain_dir, seed=1)
    assert upscaled.shape == (2, 3, 2 * SIZE, 2 * SIZE)
    assert torch.equal(sample(plain_dir, seed=1, upscale=False), plain), "the diffusion part is untouched"
    assert torch.equal(upscaled, pipe.sr_model.upscale(plain, sr_strength=0.7).clamp(0, 1))

    # replacing keeps the pipeline's sr_strength unless a new one is given, and drops the unsharp amount calibrated
    # after the old model (the new one's output gets the pipeline's own sharpen_amount)
    save_sharpen_amount(plain_dir, 0.35, upscaled=True)
    assert load_pipeline(plain_dir).config.upscale_sharpen_amount == 0.35
    assert run_add_sr(str(plain_dir), "--sr_model", str(sr_files["compact_x4"][1][".safetensors"])) == 0
    assert load_pipeline(plain_dir).sr_model.config.architecture == "Compact"
    index = json.loads((plain_dir / "model_index.json").read_text())
    assert index["sr_strength"] == 0.7 and "upscale_sharpen_amount" not in index
    assert load_pipeline(plain_dir).config.upscale_sharpen_amount is None
    assert sample(plain_dir, seed=1).shape == (2, 3, 4 * SIZE, 4 * SIZE)


def test_add_sr_failure_leaves_the_folder_unchanged(sr_files, plain_dir, tmp_path, capsys):
    attach_sr(plain_dir, sr_files["compact_x4"][1][".pth"])
    before = snapshot(plain_dir)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(sr_files["esrgan_x4"][1][".pth"].read_bytes()[:-100])
    unsupported = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(unsupported))
    for bad in (corrupt, unsupported, tmp_path / "missing.safetensors"):
        assert run_add_sr(str(plain_dir), "--sr_model", str(bad)) == 2
        err = capsys.readouterr().err
        assert bad.name in err and "was not changed" in err
        assert snapshot(plain_dir) == before
    assert run_add_sr(str(plain_dir), "--sr_model", str(sr_files["esrgan_x4"][1][".pth"]), "--sr_strength", "2") == 2
    assert snapshot(plain_dir) == before
    assert run_add_sr(str(tmp_path / "nowhere"), "--sr_model", str(sr_files["esrgan_x4"][1][".pth"])) == 2


def test_add_sr_crash_while_the_new_index_goes_in_restores_the_old_component(sr_files, plain_dir, monkeypatch):
    """The SR folder and model_index.json change together: if the index rename fails after the new ``sr_model/``
    is in place, the old component and index come back (the swap's commit step)."""
    import crispdiff.core.io as io

    attach_sr(plain_dir, sr_files["compact_x4"][1][".pth"])
    before = snapshot(plain_dir)
    real_replace = os.replace

    def failing_index_rename(src, dst, *args, **kwargs):
        if Path(dst).name == "model_index.json":
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(io.os, "replace", failing_index_rename)
    with pytest.raises(OSError, match="disk full"):
        attach_sr(plain_dir, sr_files["esrgan_x2"][1][".pth"])
    monkeypatch.undo()
    assert snapshot(plain_dir) == before and load_pipeline(plain_dir).sr_model.config.architecture == "Compact"
    assert sorted(p.name for p in plain_dir.iterdir() if p.name.startswith(".")) == []  # no staging left behind


_NO_CRISPDIFF = WITHOUT_CRISPDIFF + textwrap.dedent(
    """
    import json

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    folder, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)  # as the parent: CPU kernels split reductions by thread count
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7),
                  output_type="np").images
    np.save(out, images)
    print(json.dumps([type(pipe.sr_model).__module__, pipe.sr_model.config.architecture, pipe.sr_model.config.scale]))
    """
)


def test_pipeline_with_added_sr_reloads_without_crispdiff(sr_files, plain_dir, tmp_path):
    """add-sr with a Real-ESRGAN x2 checkpoint and an unsharp amount of its own after it, then diffusers alone
    (crispdiff blocked) reproduces the images, that amount included."""
    attach_sr(plain_dir, sr_files["esrgan_x2"][1][".pth"], sr_strength=0.6, tile_size=8, tile_overlap=4)
    save_sharpen_amount(plain_dir, 0.5, upscaled=True)
    expected = sample(plain_dir, seed=7).permute(0, 2, 3, 1).numpy()
    assert not np.array_equal(expected, sample(plain_dir, seed=7, sharpen_amount=0.0).permute(0, 2, 3, 1).numpy())
    assert expected.shape == (2, 2 * SIZE, 2 * SIZE, 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    threads = str(torch.get_num_threads())
    command = [sys.executable, "-I", "-c", _NO_CRISPDIFF, str(plain_dir), str(tmp_path / "out.npy"), threads]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, architecture, scale = json.loads(done.stdout.strip().splitlines()[-1])
    assert (module, architecture, scale) == ("diffusers_modules.local.sr_model", "ESRGAN", 2)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
