"""The timm-encoder UNet (pipelines/timm_unet.py): shapes, zero-initialised FiLM, --encoder_weights, and a real
`accelerate launch` run whose pipeline folder reloads bit-identically where crispdiff is not installed.

Every network is a real timm model at 32-64 px (convnext_atto: 3.4M encoder parameters; resnet10t: 4.9M) with a tiny
decoder; nothing is downloaded. Skipped where timm is not installed (the `timm` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import WITHOUT_CRISPDIFF, tiny_vae

from crispdiff.core.config import TrainConfig
from crispdiff.core.errors import FlagError, MissingDependencyError, PathError
from crispdiff.diffusion.unets import unet_from_config

timm = pytest.importorskip("timm")

from crispdiff.pipelines.timm_unet import TimmEncoderUNet  # noqa: E402  (needs timm)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(stem_channels=8, decoder_channels=None, layers_per_block=1, norm_num_groups=4)


def tiny(encoder: str, sample_size: int = 32, seed: int = 0, **overrides) -> TimmEncoderUNet:
    torch.manual_seed(seed)
    return TimmEncoderUNet(encoder=encoder, sample_size=sample_size, **{**TINY, **overrides})


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"base_channels": 8, "layers_per_block": 1, "dropout": 0.0, **overrides})


@pytest.mark.parametrize(
    ("encoder", "size", "in_channels"),
    [("convnext_atto", 32, 3), ("convnext_atto", 64, 4), ("resnet10t", 32, 3), ("resnet10t", 64, 3)],
)
def test_forward_shapes_and_rebuild_from_config(encoder, size, in_channels):
    model = tiny(encoder, size, in_channels=in_channels, num_class_embeds=3).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 900]), class_labels=torch.tensor([0, 2])).sample
        same_t = model(x, 17, class_labels=torch.tensor([1, 1])).sample
        swapped_t = model(x, torch.tensor([900, 3]), class_labels=torch.tensor([0, 2])).sample
        swapped_class = model(x, torch.tensor([3, 900]), class_labels=torch.tensor([2, 0])).sample
    assert out.shape == x.shape and same_t.shape == x.shape
    for other in (swapped_t, swapped_class):  # the timestep and the class each change every sample's output
        assert all((out[i] - other[i]).abs().max() > 1e-4 for i in range(2))
    assert model.config.num_class_embeds == 3 and model.config.sample_size == size

    copy = TimmEncoderUNet.from_config(model.config)  # what EMA copies and checkpoints do
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(copy.eval()(x, torch.tensor([3, 900]), class_labels=torch.tensor([0, 2])).sample, out)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 3)


def _bare_with_statistics(name: str, seed: int = 1) -> torch.nn.Module:
    """The plain timm classifier with seeded weights and non-trivial BatchNorm statistics (as trained weights have)."""
    torch.manual_seed(seed)
    bare = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for module in bare.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return bare.eval()


@pytest.mark.parametrize(("encoder", "norm"), [("convnext_atto", "group"), ("resnet10t", "frozen_bn")])
def test_encoder_weights_load_and_film_starts_at_the_bare_features(encoder, norm, tmp_path):
    """With zero-initialised FiLM, the encoder at any timestep computes exactly the bare timm model's features."""
    bare = _bare_with_statistics(encoder)
    weights = tmp_path / f"{encoder}.safetensors"
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(weights))

    model = unet_from_config(
        config(encoder=f"timm:{encoder}", encoder_weights=str(weights), encoder_norm=norm), resolution=32
    )
    assert isinstance(model, TimmEncoderUNet) and model.config.encoder == encoder
    # the reference: timm's own loader reading the same local file into its own features_only model
    features = timm.create_model(
        encoder, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, features_only=True
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = features.eval()(x)
        emb = model.embed(torch.tensor([5, 999]), 2, x.device, None)
        got = model.encode(x, emb)
        without_film = model.encode(x, None)
    assert len(got) == len(expected) == len(without_film)
    # frozen BatchNorm computes x * (w / sqrt(var + eps)) + (b - mean * scale): the same function as timm's eval-mode
    # BatchNorm, rounded differently; everything else is the same arithmetic, so it must match exactly
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if norm == "frozen_bn" else {"rtol": 0, "atol": 0}
    for a, b, c in zip(got, expected, without_film):
        assert torch.equal(a, c)  # zero FiLM is exactly the identity, at any timestep
        torch.testing.assert_close(a, b, **tolerance)


def test_encoder_weights_from_pth_adapt_the_first_conv_to_latent_channels(tmp_path):
    bare = _bare_with_statistics("resnet10t")
    weights = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": bare.state_dict()}, weights)  # a training checkpoint nests the weights
    model = unet_from_config(config(encoder="timm:resnet10t", encoder_weights=str(weights)), 32, in_channels=4)
    first = model.backbone.state_dict()["conv1.0.weight"]
    assert first.shape[1] == 4
    # the RGB kernels are spread over 4 channels the way timm adapts them (repeat, rescaled by 3/4)
    rgb = bare.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(first[:, :3], rgb * 3 / 4)


def test_bad_encoder_weights_and_names_are_flag_errors(tmp_path):
    resnet = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, str(resnet))
    with pytest.raises(FlagError, match=r"resnet10t\.safetensors does not fit timm model 'convnext_atto'"):
        unet_from_config(config(encoder="timm:convnext_atto", encoder_weights=str(resnet)), resolution=32)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(FlagError, match="broken.pth cannot be read"):
        unet_from_config(config(encoder="timm:resnet10t", encoder_weights=str(broken)), resolution=32)
    with pytest.raises(PathError, match="nowhere.pth"):
        unet_from_config(config(encoder="timm:resnet10t", encoder_weights=str(tmp_path / "nowhere.pth")), 32)
    with pytest.raises(FlagError, match="did you mean.*convnext_atto"):
        unet_from_config(config(encoder="timm:convnext_ato"), resolution=32)
    with pytest.raises(FlagError, match="timm:<model name>"):
        unet_from_config(config(encoder="convnext_atto"), resolution=32)
    with pytest.raises(FlagError, match="not divisible"):
        unet_from_config(config(encoder="timm:convnext_atto"), resolution=48)
    with pytest.raises(FlagError, match="give one of them"):
        unet_from_config(config(encoder="timm:convnext_atto", model_config_name_or_path="x"), resolution=32)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError, as when not installed
    with pytest.raises(MissingDependencyError, match=r"crispdiff\[timm\]"):
        unet_from_config(config(encoder="timm:convnext_atto"), resolution=32)


# ---- end to end: accelerate launch, the saved folder, loading without crispdiff ------------------------------------

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
    print(json.dumps([type(pipe.unet).__module__, type(pipe.unet).__name__, pipe.unet.config.encoder]))
    """
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Six 32 px images: coloured discs on white."""
    folder = tmp_path_factory.mktemp("images32")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for i in range(6):
        img = np.full((32, 32, 3), 255, np.uint8)
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 10)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 200, 3)
        Image.fromarray(img).save(folder / f"img_{i}.png")
    return folder


def test_accelerate_launch_with_timm_encoder_saves_a_folder_that_reloads_without_crispdiff(image_folder, tmp_path):
    from crispdiff.publish.export import load_pipeline

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = {
        "train_data_dir": image_folder,
        "output_dir": out,
        "cache_dir": tmp_path / "cache",
        "resolution": 32,
        "encoder": "timm:convnext_atto",
        "base_channels": 8,
        "layers_per_block": 1,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 0,
        "validation_steps": 0,
        "num_validation_images": 2,
        "validation_inference_steps": 2,
        "report_to": "none",
        "cpu_threads": 1,
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"),
        str(REPO_ROOT / "train_scripts" / "train_unconditional.py"),
        *[item for key, value in flags.items() for item in (f"--{key}", str(value))],
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["timm_unet", "TimmEncoderUNet"]
    assert (folder / "unet" / "timm_unet.py").read_bytes() == (REPO_ROOT / "pipelines" / "timm_unet.py").read_bytes()

    pipe = load_pipeline(folder)
    assert type(pipe.unet).__name__ == "TimmEncoderUNet" and pipe.unet.config.encoder == "convnext_atto"
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7), output_type="np"
    ).images
    assert expected.shape == (2, 32, 32, 3)

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    child_env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    threads = str(torch.get_num_threads())
    script = [sys.executable, "-I", "-c", _NO_CRISPDIFF, str(folder), str(tmp_path / "out.npy"), threads]
    done = subprocess.run(script, cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, name, encoder = json.loads(done.stdout.strip().splitlines()[-1])
    assert (module, name, encoder) == ("diffusers_modules.local.timm_unet", "TimmEncoderUNet", "convnext_atto")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_train_latent_with_timm_encoder_takes_the_vae_channels(tmp_path):
    """train_latent.py's path: the encoder's first conv takes the VAE's 4 latent channels; the folder reloads."""
    from diffusers import DiffusionPipeline

    from crispdiff.latent.trainer import LatentTrainConfig, train_latent

    vae = tiny_vae(sample_size=64)  # f=2: 64 px images -> 32 px latents, the smallest size a stride-32 encoder takes
    vae.save_pretrained(tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = LatentTrainConfig(
        train_data_dir=str(images),
        pretrained_vae_name_or_path=str(tmp_path / "vae"),
        resolution=64,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        encoder="timm:convnext_atto",
        base_channels=8,
        layers_per_block=1,
        train_batch_size=2,
        max_train_steps=1,
        lr_warmup_steps=0,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=2,
        validation_inference_steps=2,
        report_to="none",
        class_column="none",
        adapt_vae="off",
    )
    folder = train_latent(config)
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["timm_unet", "TimmEncoderUNet"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 32
    out = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
