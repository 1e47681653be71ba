"""`crispdiff export --plain`: a folder diffusers' stock classes load (DDPMPipeline, LDMPipeline) without
trust_remote_code, sampling what the full crispdiff pipeline samples with its extras off at the same seed and steps.

Which comparisons are exact: a pixel folder (nothing folded) and a latent folder without a shift or classes are
compared with torch.equal. A class-conditional folder has its null class's embedding folded into the time embedding's
bias (``W h + (b + c)`` instead of ``(W h + b) + c``) and a latent shift folded into ``post_quant_conv``'s bias
(``W x + (b + s W 1)`` instead of ``W (x + s) + b``): the same network up to float32 rounding, so those are compared
to 1e-5 on [0, 1] pixels, with a check beside each that the tolerance tells apart what a wrong fold would give.
Tiny random models, CPU, a few steps."""

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
from diffusers import DDPMPipeline, DiffusionPipeline, LDMPipeline
from test_pipeline import tiny_sr_model
from tiny_models import SIZE, WITHOUT_CRISPDIFF, base_config, tiny_unet, tiny_vae

from crispdiff.cli import main
from crispdiff.core.errors import FlagError, OutputExistsError, UserError
from crispdiff.publish.export import EXPORT_RECORD_NAME, load_pipeline, save_pipeline
from crispdiff.publish.plain import export_plain

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
SEED = 5
CLASSES = ["disc", "ring", "square"]
NULL_ID = len(CLASSES)
#: Float32 rounding of a folded bias, carried through a few sampler steps and the decoder, on [0, 1] pixels.
FOLD_ATOL = 1e-5


def sample(pipe, seed: int = SEED, **kwargs) -> np.ndarray:
    """``batch_size=2`` images as NHWC float32 numpy in [0, 1] (the output type both stock classes offer)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(batch_size=2, num_inference_steps=STEPS, generator=generator, output_type="np", **kwargs).images


def loads_with_stock_class(folder: Path) -> DiffusionPipeline:
    """Load like a user without crispdiff's code: no trust_remote_code, and no .py file the folder could offer."""
    assert not list(folder.rglob("*.py")), "a plain folder carries no code"
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "safetensors only"
    index = json.loads((folder / "model_index.json").read_text())
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    assert all(v[0] == "diffusers" for v in components.values()), components
    return DiffusionPipeline.from_pretrained(folder)


# ---- the source folders ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    """A pixel pipeline with every pixel extra on by default: SR x2 that upscales, an unsharp mask, thresholding."""
    return save_pipeline(
        tmp_path_factory.mktemp("pixel") / "pipeline", unet=tiny_unet(), scheduler_base_config=base_config(),
        beta_schedule="cosine", sr_model=tiny_sr_model(), sharpen_amount=0.5, thresholding=True,
        training_config={"resolution": SIZE},
    )  # fmt: skip


def main_job_unet(seed: int):
    return tiny_unet(seed=seed, in_channels=4, sample_size=SIZE // 2, num_class_embeds=NULL_ID + 1)


@pytest.fixture(scope="module")
def main_job_dir(tmp_path_factory) -> Path:
    """What the main job saves: a latent UNet on auto classes (names, class mix, guidance and its interval), a guide
    model for autoguidance, a measured latent scale and shift, sharpening, and the SR x2 kept off by default."""
    return save_pipeline(
        tmp_path_factory.mktemp("main") / "pipeline", unet=main_job_unet(3), scheduler_base_config=base_config(),
        beta_schedule="cosine", vae=tiny_vae(block_out_channels=(8, 8)), latent_scaling_factor=0.7,
        latent_shift_factor=-0.2, class_names=CLASSES, class_mix=[0.5, 0.25, 0.25], guidance_scale=3.0,
        guidance_interval=(0.3, 5.0), guide_unet=main_job_unet(4), autoguidance_scale=1.5, sharpen_amount=0.3,
        sr_model=tiny_sr_model(), upscale=False,
        training_config={"class_dropout_prob": 0.1, "license": "mit", "hub_token": "hf_secret"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def pixel_plain(pixel_dir, tmp_path_factory) -> Path:
    return export_plain(pixel_dir, tmp_path_factory.mktemp("out") / "pixel-plain")


@pytest.fixture(scope="module")
def main_job_plain(main_job_dir, tmp_path_factory) -> Path:
    return export_plain(main_job_dir, tmp_path_factory.mktemp("out") / "main-plain")


EXTRAS_OFF_PIXEL = dict(upscale=False, sharpen_amount=0.0, gamma=1.0)
EXTRAS_OFF_MAIN_JOB = dict(
    class_labels=NULL_ID, guidance_scale=1.0, autoguidance_scale=1.0, upscale=False, sharpen_amount=0.0, gamma=1.0
)


# ---- pixel: DDPMPipeline, bit for bit -------------------------------------------------------------------------------


def test_a_pixel_folder_becomes_a_ddpm_pipeline_with_the_same_samples_bit_for_bit(pixel_dir, pixel_plain):
    plain = loads_with_stock_class(pixel_plain)
    assert type(plain) is DDPMPipeline and type(plain.scheduler).__name__ == "DPMSolverMultistepScheduler"
    full = load_pipeline(pixel_dir)
    expected = sample(full, **EXTRAS_OFF_PIXEL)
    assert np.array_equal(sample(plain), expected)
    assert sample(full).shape == (2, 2 * SIZE, 2 * SIZE, 3), "the source upscales by default; the plain folder not"
    assert not np.array_equal(sample(full, upscale=False), expected), "the source sharpens by default"
    record = json.loads((pixel_plain / EXPORT_RECORD_NAME).read_text())
    assert record["equal"] == "bit for bit" and record["folds"] == []
    assert record["extras_off_call"] == {"upscale": False, "sharpen_amount": 0.0, "gamma": 1.0}
    assert (pixel_plain / "crispdiff_provenance.json").is_file()
    assert json.loads((pixel_plain / "crispdiff_training.json").read_text()) == {"resolution": SIZE}


def test_the_ddpm_sampler_draws_its_step_noise_from_the_same_generator(pixel_dir, tmp_path):
    """DDPM's steps add noise: DDPMPipeline hands the scheduler the call's generator as crispdiff does, so a seed still
    gives the same images; --sampler puts that sampler's scheduler in the plain folder."""
    folder = export_plain(pixel_dir, tmp_path / "ddpm", sampler="ddpm")
    plain = loads_with_stock_class(folder)
    assert type(plain.scheduler).__name__ == "DDPMScheduler"
    expected = sample(load_pipeline(pixel_dir), sampler="ddpm", **EXTRAS_OFF_PIXEL)
    assert np.array_equal(sample(plain), expected)
    assert not np.array_equal(sample(plain, seed=SEED + 1), expected)


# ---- latent: LDMPipeline --------------------------------------------------------------------------------------------


def test_the_main_jobs_folder_becomes_an_ldm_pipeline_sampling_its_unconditional_model(main_job_dir, main_job_plain):
    plain = loads_with_stock_class(main_job_plain)
    assert type(plain) is LDMPipeline and type(plain.vqvae).__name__ == "AutoencoderKL"
    assert plain.unet.config.num_class_embeds is None and plain.unet.class_embedding is None
    assert plain.vqvae.config.scaling_factor == 0.7 and plain.vqvae.config.shift_factor is None
    full = load_pipeline(main_job_dir)
    expected = sample(full, **EXTRAS_OFF_MAIN_JOB)
    got = sample(plain)
    np.testing.assert_allclose(got, expected, rtol=0, atol=FOLD_ATOL)  # two folded biases: float rounding
    # the tolerance tells apart what a wrong fold gives: another class, or the latents decoded without the shift
    assert np.abs(got - sample(full, **{**EXTRAS_OFF_MAIN_JOB, "class_labels": 0})).max() > 100 * FOLD_ATOL
    unshifted = load_pipeline(main_job_dir)
    unshifted.register_to_config(latent_shift_factor=0.0)
    assert np.abs(got - sample(unshifted, **EXTRAS_OFF_MAIN_JOB)).max() > 100 * FOLD_ATOL
    record = json.loads((main_job_plain / EXPORT_RECORD_NAME).read_text())
    assert record["equal"] == "to float rounding" and record["samples"] == "unconditionally"
    assert len(record["folds"]) == 2 and record["extras_off_call"] == EXTRAS_OFF_MAIN_JOB
    training = json.loads((main_job_plain / "crispdiff_training.json").read_text())
    assert training == {"class_dropout_prob": 0.1, "license": "mit"}, "the copy leaves credentials out"


@pytest.mark.parametrize(
    ("shift", "vae_config", "sampler"),
    [
        (None, {}, None),
        (None, {}, "ddim"),
        (None, {}, "unipc"),
        (None, {}, "pndm"),
        (-0.2, {"use_post_quant_conv": False}, None),
    ],
    ids=["no-shift", "ddim", "unipc", "pndm", "shift-into-a-new-identity-post-quant-conv"],
)
def test_an_unconditional_latent_folder_is_bit_for_bit(shift, vae_config, sampler, tmp_path):
    """Nothing to fold (the scale is LDMPipeline's own division), with each sampler LDMPipeline steps as crispdiff
    does; or a shift on a VAE without post_quant_conv: the identity 1x1 convolution added for it computes
    ``1 * x + 0 * others + shift``, which float32 gets exactly (TF32 convolutions on a GPU would round its input, so
    the record says "to float rounding" there too)."""
    source = save_pipeline(
        tmp_path / "latent", unet=tiny_unet(seed=3, in_channels=4, sample_size=SIZE // 2),
        scheduler_base_config=base_config(), beta_schedule="cosine",
        vae=tiny_vae(block_out_channels=(8, 8), **vae_config), latent_scaling_factor=0.7, latent_shift_factor=shift,
    )  # fmt: skip
    folder = export_plain(source, tmp_path / "plain", sampler=sampler)
    plain = loads_with_stock_class(folder)
    assert plain.vqvae.post_quant_conv is not None
    assert np.array_equal(sample(plain), sample(load_pipeline(source, sampler=sampler)))
    record = json.loads((folder / EXPORT_RECORD_NAME).read_text())
    assert record["equal"] == ("bit for bit" if shift is None else "to float rounding")


def test_one_class_can_be_folded_instead_of_the_null_class(main_job_dir, tmp_path):
    folder = export_plain(main_job_dir, tmp_path / "ring", class_label="ring")
    got = sample(loads_with_stock_class(folder))
    full = load_pipeline(main_job_dir)
    np.testing.assert_allclose(got, sample(full, **{**EXTRAS_OFF_MAIN_JOB, "class_labels": 1}), rtol=0, atol=FOLD_ATOL)
    assert json.loads((folder / EXPORT_RECORD_NAME).read_text())["samples"] == "class 'ring' only"
    by_id = export_plain(main_job_dir, tmp_path / "id1", class_label="1")
    assert np.array_equal(sample(DiffusionPipeline.from_pretrained(by_id)), got)


# ---- without crispdiff ----------------------------------------------------------------------------------------------

_LOAD_ALONE = WITHOUT_CRISPDIFF + textwrap.dedent(
    """
    import json

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(int(sys.argv[2]))  # the parent's: convolutions sum in a thread-count-dependent order
    result = {}
    for job in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])  # no trust_remote_code
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(job["seed"])
        images = pipe(batch_size=2, num_inference_steps=job["steps"], generator=generator, output_type="np").images
        np.save(job["out"], images)
        result[job["folder"]] = type(pipe).__module__ + "." + type(pipe).__name__
    print(json.dumps(result))
    """
)


def test_the_plain_folders_load_and_sample_where_crispdiff_cannot_be_imported(
    pixel_dir, pixel_plain, main_job_dir, main_job_plain, tmp_path
):
    jobs = [
        {"folder": str(folder), "seed": SEED, "steps": STEPS, "out": str(tmp_path / f"{name}.npy")}
        for name, folder in (("pixel", pixel_plain), ("main", main_job_plain))
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    threads = str(torch.get_num_threads())
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=threads)
    done = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_ALONE, json.dumps(jobs), threads],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    classes = json.loads(done.stdout.strip().splitlines()[-1])
    assert classes[str(pixel_plain)] == "diffusers.pipelines.ddpm.pipeline_ddpm.DDPMPipeline"
    assert classes[str(main_job_plain)].endswith("pipeline_latent_diffusion_uncond.LDMPipeline")
    assert classes[str(main_job_plain)].startswith("diffusers.pipelines.")
    assert np.array_equal(np.load(tmp_path / "pixel.npy"), sample(load_pipeline(pixel_dir), **EXTRAS_OFF_PIXEL))
    expected = sample(load_pipeline(main_job_dir), **EXTRAS_OFF_MAIN_JOB)
    np.testing.assert_allclose(np.load(tmp_path / "main.npy"), expected, rtol=0, atol=FOLD_ATOL)


# ---- the card -------------------------------------------------------------------------------------------------------


def test_the_card_says_what_was_left_out_and_how_to_get_it_back(main_job_dir, main_job_plain, pixel_plain):
    card = (main_job_plain / "README.md").read_text()
    assert "library_name: diffusers" in card and "license: mit" in card and "latent-diffusion" in card
    assert f'DiffusionPipeline.from_pretrained("{main_job_plain}")' in card
    assert f'DiffusionPipeline.from_pretrained("{main_job_dir}", trust_remote_code=True)' in card
    for row in (
        "| super-resolution post-step | `sr_model`, sr_strength 0.5, upscales by default: False | left out |",
        "| classifier-free guidance | scale 3 for labelled calls | left out |",
        "| guidance interval | noise levels sigma in (0.3, 5] | left out |",
        "| autoguidance | guide model, scale 1.5 | left out |",
        "| sharpening | unsharp mask amount 0.3, radius 1 px | left out |",
        "| classes | 3 classes (disc, ring, square); unlabelled calls draw the auto-class mix | samples uncond",
    ):
        assert row in card, row
    assert "class_labels=3, guidance_scale=1.0, autoguidance_scale=1.0, upscale=False, sharpen_amount=0.0" in card
    assert "to float rounding" in card and "post_quant_conv" in card and "time_embedding.linear_2.bias" in card
    assert "Expected types for vqvae" in card, "the harmless LDMPipeline warning is explained"
    pixel_card = (pixel_plain / "README.md").read_text()
    assert "bit for bit" in pixel_card and "DDPMPipeline` defaults to 1000 steps" in pixel_card
    assert "| classes | none | left out |" in pixel_card


def test_crispdiff_push_takes_a_plain_folder_and_its_card_names_the_repo(pixel_dir, tmp_path, monkeypatch):
    """The upload itself needs the network: offline, push writes the plain card for the repo id, then fails clearly
    with nothing else in the folder changed."""
    from crispdiff.publish.hub import HubUploadError, files_to_upload, push_to_hub

    folder = export_plain(pixel_dir, tmp_path / "plain")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE=1"):
        push_to_hub(folder, "someone/tiny-plain", token="hf_dummy")
    card = (folder / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-plain")' in card and "# tiny-plain" in card
    assert "| super-resolution post-step |" in card, "the plain card, not the crispdiff pipeline's"
    assert "model_index.json" in files_to_upload(folder) and "README.md" in files_to_upload(folder)


# ---- the command and its refusals -----------------------------------------------------------------------------------


def test_crispdiff_export_plain_through_the_cli(pixel_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["export", "--plain", str(pixel_dir), "--output_dir", str(out)]) == 0
    assert "no trust_remote_code" in capsys.readouterr().out
    assert type(loads_with_stock_class(out)) is DDPMPipeline
    (out / "stale.txt").write_text("x")
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["export", str(pixel_dir), "--plain", "--output_dir", str(out), "--sampler", "ddpm"]) == 0
    assert not (out / "stale.txt").exists(), "an earlier plain export is replaced whole"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"say what to export: --plain"),
        (["--plain", "--sampler", "unipc"], r"--sampler unipc cannot be exported --plain: DDPMPipeline passes gen"),
        (["--plain", "--sampler", "ddim"], r"without use_clipped_model_output.*; pass --sampler dpmsolver\+\+ or ddpm"),
        (["--plain", "--class", "ring"], r"--class 'ring' given but .* holds an unconditional model"),
    ],
)
def test_the_cli_refuses_in_one_line(pixel_dir, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "plain"
    assert main(["export", str(pixel_dir), "--output_dir", str(out), *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crispdiff export")]
    assert len(errors) == 1 and errors[0].startswith("crispdiff export: error: ") and re.search(message, errors[0])
    assert not out.exists()


def test_refusals_name_the_folder_and_what_to_do(pixel_dir, main_job_dir, tmp_path):
    with pytest.raises(FlagError, match="is the pipeline folder itself"):
        export_plain(pixel_dir, pixel_dir)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"--output_dir .*mine exists and is not a plain export"):
        export_plain(pixel_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(FlagError, match=r"--class 'star' is not a class of .*\['disc', 'ring', 'square'\]"):
        export_plain(main_job_dir, tmp_path / "star", class_label="star")
    latent_ddpm = tmp_path / "latent-ddpm"
    with pytest.raises(FlagError, match=r"LDMPipeline passes no generator .* pass --sampler dpmsolver\+\+ or ddim"):
        export_plain(main_job_dir, latent_ddpm, sampler="ddpm")
    assert not latent_ddpm.exists()


def test_a_model_without_a_trained_null_class_needs_a_class(tmp_path):
    """Trained with --class_dropout_prob 0, the null class's embedding is its random initialisation."""
    source = save_pipeline(
        tmp_path / "no-null", unet=tiny_unet(num_class_embeds=NULL_ID + 1), scheduler_base_config=base_config(),
        beta_schedule="cosine", class_names=CLASSES, training_config={"class_dropout_prob": 0.0},
    )  # fmt: skip
    with pytest.raises(FlagError, match=r"--class_dropout_prob 0, .* pick one class with --class NAME"):
        export_plain(source, tmp_path / "plain")
    folder = export_plain(source, tmp_path / "plain", class_label="disc")
    expected = sample(load_pipeline(source), class_labels="disc", guidance_scale=1.0)
    np.testing.assert_allclose(sample(loads_with_stock_class(folder)), expected, rtol=0, atol=FOLD_ATOL)


def test_a_timm_encoder_unet_is_refused_before_loading(tmp_path):
    pytest.importorskip("timm")
    from crispdiff.pipelines.timm_unet import TimmEncoderUNet

    torch.manual_seed(0)
    unet = TimmEncoderUNet(
        encoder="resnet10t", sample_size=32, stem_channels=8, decoder_channels=None, layers_per_block=1,
        norm_num_groups=4,
    )  # fmt: skip
    source = save_pipeline(tmp_path / "timm", unet=unet, scheduler_base_config=base_config(), beta_schedule="cosine")
    with pytest.raises(UserError, match=r"timm.* cannot be exported --plain: its unet is a timm-encoder UNet"):
        export_plain(source, tmp_path / "plain")
    assert main(["export", "--plain", str(source), "--output_dir", str(tmp_path / "plain")]) == 2


# ---- a folder the main job's trainer wrote --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """18 unlabelled 16 px images: a red, green or blue field with a white square (three clusters for auto classes)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(18):
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[..., i % 3] = 200
        top, left = rng.integers(2, 10, size=2)
        image[top : top + 4, left : left + 4] = 255
        Image.fromarray(image).save(folder / f"img_{i:02d}.png")
    return folder


def test_a_folder_the_latent_trainer_wrote_on_auto_classes_exports_too(colour_folder, tmp_path):
    """The real trainer, not save_pipeline by hand: the embedded VAE (its stated scale and shift), auto classes with
    their mix, autoguidance's guide model and guidance interval, and the sharpening it saves by default."""
    from test_own_data import latent_config

    from crispdiff.latent.trainer import train_latent

    source = train_latent(latent_config(colour_folder, None, tmp_path / "run", adapt_vae="off", num_auto_classes=3))
    full = load_pipeline(source)
    assert full.guide_unet is not None and full.class_mix is not None and full.unet.config.num_class_embeds == 4
    assert full.config.sharpen_amount > 0 and full.latent_scaling()[1] != 0, "sharpening on, a shift to fold"
    folder = export_plain(source, tmp_path / "plain")
    plain = loads_with_stock_class(folder)
    assert type(plain) is LDMPipeline
    extras_off = json.loads((folder / EXPORT_RECORD_NAME).read_text())["extras_off_call"]
    assert extras_off["class_labels"] == 3 and extras_off["autoguidance_scale"] == 1.0
    expected = sample(full, class_labels=3, guidance_scale=1.0, autoguidance_scale=1.0, upscale=False,
                      sharpen_amount=0.0, gamma=1.0)  # fmt: skip
    np.testing.assert_allclose(sample(plain), expected, rtol=0, atol=FOLD_ATOL)
