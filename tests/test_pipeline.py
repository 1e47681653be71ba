"""The saved diffusers pipeline: samplers, save/load bit-for-bit (also without crispdiff), latents, SR, post-processing,
the `crispdiff sample` command, atomic export and the image helpers. Tiny random models, CPU, a few steps."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from tiny_models import SIZE, base_config, cosine_betas, tiny_unet, tiny_vae

from crispdiff.core.config import NoiseConfig
from crispdiff.core.images import make_grid, save_image_atomic, to_pil_list, to_uint8
from crispdiff.diffusion.schedule import scheduler_base_config
from crispdiff.pipelines.pipeline_crispdiff import (
    SAMPLERS,
    CrispDiffPipeline,
    apply_gamma,
    check_step_count,
    dpm_lambda_clip,
    gaussian_blur,
    make_scheduler,
    unsharp_mask,
)
from crispdiff.publish.export import load_pipeline, save_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # divides T = 1000, as DDIM and PNDM require
SCHEDULER_CLASSES = {
    "dpmsolver++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
}


# ---- tiny real models -----------------------------------------------------------------------------------------------


def tiny_sr_model(seed: int = 0):
    """The real SR component around a 2x Compact (Real-ESRGAN compact) network of ~700 parameters."""
    pytest.importorskip("spandrel")
    from spandrel.architectures.Compact import Compact

    from crispdiff.pipelines.sr_model import SpandrelSRModel

    torch.manual_seed(seed)
    return SpandrelSRModel.from_state_dict(Compact(num_feat=4, num_conv=1, upscale=2).state_dict())


def quiet(pipe: CrispDiffPipeline) -> CrispDiffPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: CrispDiffPipeline, seed: int = 0, batch_size: int = 2, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", STEPS)
    generator = torch.Generator("cpu").manual_seed(seed)
    return quiet(pipe)(batch_size=batch_size, generator=generator, output_type="pt", **kwargs).images


def in_memory_pipeline(unet: UNet2DModel, **kwargs) -> CrispDiffPipeline:
    sampler = kwargs.pop("sampler", "dpmsolver++")
    scheduler = make_scheduler(sampler, base_config(), latent=kwargs.get("vae") is not None)
    return CrispDiffPipeline(unet=unet, scheduler=scheduler, sampler=sampler, beta_schedule="cosine", **kwargs)


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    """A saved pixel pipeline (cosine, v-prediction, DPM-Solver++), with a training config and sample grid."""
    out = tmp_path_factory.mktemp("pixel") / "pipeline"
    grid = PIL.Image.new("RGB", (32, 16), (10, 20, 30))
    return save_pipeline(
        out,
        unet=tiny_unet(),
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        training_config={"resolution": SIZE, "output_dir": Path("somewhere")},
        sample_grid=grid,
    )


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory) -> Path:
    """A saved pixel pipeline with the SR component."""
    out = tmp_path_factory.mktemp("sr") / "pipeline"
    return save_pipeline(
        out, unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine", sr_model=tiny_sr_model()
    )


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    """A saved latent pipeline: UNet on 4-channel latents + a tiny AutoencoderKL with measured-style scaling, and a
    guide model that calls autoguide by default."""
    out = tmp_path_factory.mktemp("latent") / "pipeline"
    return save_pipeline(
        out,
        unet=tiny_unet(seed=3, in_channels=4, sample_size=SIZE // 2),
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        vae=tiny_vae(block_out_channels=(8, 8)),
        latent_scaling_factor=0.7,
        latent_shift_factor=-0.2,
        guide_unet=tiny_unet(seed=4, in_channels=4, sample_size=SIZE // 2),
        autoguidance_scale=1.5,
    )


# ---- samplers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", [False, True])
def test_every_sampler_is_built_from_the_same_betas(latent):
    reference = None
    for sampler in SAMPLERS:
        scheduler = make_scheduler(sampler, base_config(), latent=latent)
        assert isinstance(scheduler, SCHEDULER_CLASSES[sampler])
        assert scheduler.config.timestep_spacing == "trailing"
        assert scheduler.config.prediction_type == "v_prediction"
        if reference is None:
            reference = scheduler.alphas_cumprod
        assert torch.equal(scheduler.alphas_cumprod, reference), sampler
        if sampler in ("ddim", "ddpm"):
            assert scheduler.config.clip_sample is (not latent)
    dpm = make_scheduler("dpmsolver++", base_config())
    assert dpm.config.lambda_min_clipped == -5.1
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.final_sigmas_type == "zero" and dpm.config.lower_order_final
    assert make_scheduler("ddim", base_config(), thresholding=True).config.thresholding


def schedule_base_config(schedule: str, zero_snr: bool = False) -> dict:
    return scheduler_base_config(NoiseConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr))


@pytest.mark.parametrize(
    "schedule, zero_snr, clipped",
    [("cosine", False, True), ("sigmoid", False, True), ("linear", False, False), ("cosine", True, False)],
)
def test_dpm_lambda_clip_follows_the_betas_log_snr(schedule, zero_snr, clipped):
    """Cosine and sigmoid both end near log-SNR -10 (capped last beta), so both get the clip; linear ends above it;
    zero SNR starts from pure noise on purpose. Decided from the betas, whatever the schedule is called."""
    base = schedule_base_config(schedule, zero_snr)
    dpm = make_scheduler("dpmsolver++", base)
    assert dpm.config.lambda_min_clipped == (-5.1 if clipped else -math.inf)
    if zero_snr:  # betas that are already rescaled (last beta 1) are recognised without the flag
        assert dpm_lambda_clip(cosine_betas()[:-1] + [1.0]) is None


SCHEDULES = {
    "cosine": {"beta_schedule": "cosine"},
    "shifted cosine": {"beta_schedule": "cosine", "snr_shift": -1.0},
    "sigmoid": {"beta_schedule": "sigmoid", "sigmoid_start": -2.0},
    "linear, own ends": {"beta_schedule": "linear", "beta_start": 5e-4, "beta_end": 0.03},
    "scaled linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine, zero SNR": {"beta_schedule": "cosine", "rescale_betas_zero_snr": True},
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_saved_scheduler_config_names_the_schedule_its_betas_follow(name, tmp_path):
    """diffusers ignores beta_schedule beside trained_betas, but a folder must not claim a schedule it does not use:
    a diffusers name must rebuild the very betas saved (checked by diffusers with the betas dropped), anything else
    must be a label diffusers cannot mistake for one of its own schedules."""
    noise = NoiseConfig(**SCHEDULES[name])
    folder = save_pipeline(
        tmp_path / "p", unet=tiny_unet(), scheduler_base_config=scheduler_base_config(noise), beta_schedule="x"
    )
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    without_betas = {k: v for k, v in saved.items() if k not in ("trained_betas", "rescale_betas_zero_snr")}
    try:
        rebuilt = DDPMScheduler.from_config(without_betas).betas.double()
    except NotImplementedError:  # not a diffusers schedule: it must say whose it is, and with what parameters
        assert name in ("shifted cosine", "sigmoid"), saved["beta_schedule"]
        assert saved["beta_schedule"] in ("crispdiff:cosine(snr_shift=-1)", "crispdiff:sigmoid(start=-2, end=3, tau=1)")
    else:
        betas = torch.tensor(saved["trained_betas"], dtype=torch.float64)
        torch.testing.assert_close(rebuilt, betas, rtol=1e-5, atol=0)
    for sampler in SAMPLERS[:3]:  # switching samplers keeps the name
        scheduler = CrispDiffPipeline.from_pretrained(folder).make_sampler(sampler)
        assert scheduler.config.beta_schedule == saved["beta_schedule"], sampler


def test_a_folder_that_says_linear_beside_cosine_betas_loads_samples_the_same_and_is_saved_truthfully(
    pixel_dir, tmp_path
):
    """Folders saved before the scheduler config named its schedule say "linear" whatever the betas: they still load
    and sample exactly as before, and a re-save names the schedule the betas follow."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(pixel_dir, old)
    config_path = old / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    config_path.write_text(json.dumps(config))
    expected = generate(CrispDiffPipeline.from_pretrained(pixel_dir), seed=3)
    pipe = CrispDiffPipeline.from_pretrained(old)
    assert torch.equal(generate(pipe, seed=3), expected)
    pipe.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "scheduler" / "scheduler_config.json").read_text())
    assert resaved["beta_schedule"] == "squaredcos_cap_v2" and resaved["trained_betas"] == config["trained_betas"]


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_fixed_stride_samplers_refuse_step_counts_that_do_not_divide_t(sampler):
    pipe = quiet(in_memory_pipeline(tiny_unet(), sampler=sampler))
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="divides num_train_timesteps=1000; 30 does not"):
        pipe(batch_size=1, num_inference_steps=30, generator=generator, output_type="pt")
    assert pipe(batch_size=1, num_inference_steps=25, generator=generator, output_type="pt").images.shape[0] == 1
    check_step_count("dpmsolver++", 1000, 30)  # samplers that follow their timestep list take any count


def test_trailing_spacing_starts_at_the_last_timestep():
    ddim = make_scheduler("ddim", base_config())
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]


def test_sampler_configuration_errors():
    zero_snr = base_config(zero_snr=True)
    with pytest.raises(ValueError, match="pndm"):
        make_scheduler("pndm", zero_snr)
    rescaled_betas = dict(base_config(), trained_betas=cosine_betas()[:-1] + [1.0])  # zero SNR without the flag
    with pytest.raises(ValueError, match="pndm"):
        make_scheduler("pndm", rescaled_betas)
    with pytest.raises(ValueError, match="epsilon"):
        make_scheduler("ddim", base_config("epsilon", zero_snr=True))
    with pytest.raises(ValueError, match="latent"):
        make_scheduler("ddim", base_config(), thresholding=True, latent=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler", base_config())
    with pytest.raises(ValueError, match="missing"):
        make_scheduler("ddim", {"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="sample"):
        make_scheduler("pndm", base_config("sample"))
    for sampler in ("dpmsolver++", "ddim", "unipc", "ddpm"):  # v-prediction + zero SNR is the supported combination
        assert make_scheduler(sampler, zero_snr).config.rescale_betas_zero_snr


def test_zero_snr_pipeline_samples_finite_images():
    scheduler = make_scheduler("dpmsolver++", base_config(zero_snr=True))
    pipe = CrispDiffPipeline(unet=tiny_unet(), scheduler=scheduler, beta_schedule="cosine")
    images = generate(pipe)
    assert torch.isfinite(images).all() and pipe.scheduler.timesteps[0] == 999


def test_every_sampler_runs_from_the_saved_folder(pixel_dir):
    pipe = quiet(CrispDiffPipeline.from_pretrained(pixel_dir))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    for sampler in SAMPLERS:
        pt = generate(pipe, sampler=sampler)
        assert pt.shape == (2, 3, SIZE, SIZE) and pt.dtype == torch.float32
        assert torch.isfinite(pt).all()  # the range is the pipeline's clamp; correctness: test_samplers_recover_*
        gen = torch.Generator().manual_seed(0)
        np_images = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen, sampler=sampler, output_type="np")
        assert isinstance(np_images.images, np.ndarray) and np_images.images.dtype == np.float32
        assert np_images.images.shape == (2, SIZE, SIZE, 3)
        np.testing.assert_array_equal(np_images.images, pt.permute(0, 2, 3, 1).numpy())
        gen = torch.Generator().manual_seed(0)
        pil = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen, sampler=sampler, output_type="pil").images
        assert len(pil) == 2 and all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in pil)
        np.testing.assert_array_equal(np.asarray(pil[1]), (np_images.images[1] * 255).round().astype(np.uint8))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler), "sampler= must not change the pipeline"
    (tuple_images,) = pipe(num_inference_steps=1, output_type="pt", return_dict=False)
    assert tuple_images.shape == (1, 3, SIZE, SIZE)


def test_set_sampler_is_saved_and_reloaded(pixel_dir, tmp_path):
    pipe = quiet(CrispDiffPipeline.from_pretrained(pixel_dir))
    before = generate(pipe, sampler="ddim")
    pipe.set_sampler("ddim")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.sampler == "ddim"
    assert torch.equal(generate(pipe), before)
    pipe.save_pretrained(tmp_path / "ddim")
    index = json.loads((tmp_path / "ddim" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["sampler"] == "ddim"
    reloaded = CrispDiffPipeline.from_pretrained(tmp_path / "ddim")
    assert isinstance(reloaded.scheduler, DDIMScheduler)
    assert torch.equal(generate(reloaded), before)
    assert load_pipeline(pixel_dir, sampler="unipc").config.sampler == "unipc"


# ---- saving and loading ---------------------------------------------------------------------------------------------


def test_saved_folder_layout(pixel_dir, sr_dir):
    index = json.loads((pixel_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_crispdiff", "CrispDiffPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["vae"] == [None, None] and index["sr_model"] == [None, None]
    assert index["sampler"] == "dpmsolver++" and index["beta_schedule"] == "cosine" and index["upscale"] is False
    source = REPO_ROOT / "pipelines" / "pipeline_crispdiff.py"
    assert (pixel_dir / "pipeline_crispdiff.py").read_bytes() == source.read_bytes()
    assert (pixel_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler_config = json.loads((pixel_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["trained_betas"] == cosine_betas()
    assert scheduler_config["prediction_type"] == "v_prediction"
    assert json.loads((pixel_dir / "crispdiff_training.json").read_text()) == {
        "output_dir": "somewhere",
        "resolution": SIZE,
    }
    assert PIL.Image.open(pixel_dir / "samples.png").size == (32, 16)

    sr_index = json.loads((sr_dir / "model_index.json").read_text())
    assert sr_index["sr_model"] == ["sr_model", "SpandrelSRModel"] and sr_index["upscale"] is True
    sr_source = REPO_ROOT / "pipelines" / "sr_model.py"
    assert (sr_dir / "sr_model" / "sr_model.py").read_bytes() == sr_source.read_bytes()
    assert not list(pixel_dir.parent.glob(".pipeline.*")), "no temp folders may be left behind"


def test_save_load_is_bit_identical_in_process(tmp_path):
    unet = tiny_unet(seed=3)
    original = in_memory_pipeline(unet)
    expected = generate(original, seed=7)
    folder = save_pipeline(tmp_path / "p", unet=unet, scheduler_base_config=base_config(), beta_schedule="cosine")
    reloaded = CrispDiffPipeline.from_pretrained(folder)  # no trust_remote_code needed without an SR model
    assert type(reloaded) is CrispDiffPipeline
    assert torch.equal(generate(reloaded, seed=7), expected)
    assert torch.equal(generate(load_pipeline(folder), seed=7), expected)
    assert not torch.equal(generate(reloaded, seed=8), expected)


def test_pipeline_config_round_trips(tmp_path):
    pipe = in_memory_pipeline(
        tiny_unet(), sr_strength=0.25, sharpen_amount=0.7, sharpen_radius=0.8, sharpen_threshold=0.01, gamma=1.2
    )
    pipe.save_pretrained(tmp_path / "p")
    config = CrispDiffPipeline.from_pretrained(tmp_path / "p").config
    assert (config.sr_strength, config.sharpen_amount, config.sharpen_radius) == (0.25, 0.7, 0.8)
    assert (config.sharpen_threshold, config.gamma, config.upscale) == (0.01, 1.2, False)


_SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockCrispdiff(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("crispdiff", "pipelines"):
                raise ModuleNotFoundError(f"{name} is blocked in this test")
            return None

    sys.meta_path[:] = [BlockCrispdiff()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    repo = sys.argv[1]
    sys.path[:] = [p for p in sys.path if p.rstrip("/") not in (repo, repo + "/pipelines", "")]
    try:
        import crispdiff  # noqa: F401
        raise SystemExit("crispdiff is importable; the test would prove nothing")
    except ModuleNotFoundError:
        pass

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(int(sys.argv[2]))
    result = {}
    for job in json.loads(sys.argv[3]):
        pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(job["seed"])
        images = pipe(batch_size=2, num_inference_steps=job["steps"], generator=generator, output_type="np").images
        np.save(job["out"], images)
        result[job["folder"]] = [type(pipe).__module__, type(pipe.sr_model).__module__ if pipe.sr_model else None]
    print(json.dumps(result))
    """
)


def test_loads_without_crispdiff_bit_identical(tmp_path, pixel_dir, sr_dir, latent_dir):
    """DiffusionPipeline.from_pretrained(trust_remote_code=True) with crispdiff unimportable gives the same pixels."""
    jobs, expected = [], {}
    for name, folder in (("pixel", pixel_dir), ("sr", sr_dir), ("latent", latent_dir)):
        pipe = load_pipeline(folder)
        expected[name] = generate(pipe, seed=5).permute(0, 2, 3, 1).numpy()
        jobs.append({"folder": str(folder), "seed": 5, "steps": STEPS, "out": str(tmp_path / f"{name}.npy")})
    assert expected["sr"].shape == (2, 2 * SIZE, 2 * SIZE, 3), "the SR pipeline upscales by default"

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-I", "-c", _SUBPROCESS_SCRIPT, str(REPO_ROOT), str(torch.get_num_threads())]
    done = subprocess.run(
        [*command, json.dumps(jobs)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert modules[str(pixel_dir)] == ["diffusers_modules.local.pipeline_crispdiff", None]
    assert modules[str(sr_dir)] == ["diffusers_modules.local.pipeline_crispdiff", "diffusers_modules.local.sr_model"]
    assert modules[str(latent_dir)] == ["diffusers_modules.local.pipeline_crispdiff", None]
    assert expected["latent"].shape == (2, SIZE, SIZE, 3), "the latent pipeline decodes to pixels"
    for name in ("pixel", "sr", "latent"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), expected[name])


def test_autoguidance_steers_away_from_the_guide_model(latent_dir):
    """The saved scale is the default; 1 turns it off (the same images as a pipeline without a guide); the change is
    (w - 1) x (model - guide) at every step, so a guide equal to the model changes nothing; it needs a guide model."""
    pipe = load_pipeline(latent_dir)
    assert pipe.config.autoguidance_scale == 1.5 and pipe.guide_unet is not None
    guided, off = generate(pipe, seed=1), generate(pipe, seed=1, autoguidance_scale=1.0)
    assert not torch.equal(guided, off)
    torch.testing.assert_close(generate(pipe, seed=1, autoguidance_scale=1.5), guided, rtol=0, atol=0)
    plain = load_pipeline(latent_dir)
    plain.guide_unet = None
    torch.testing.assert_close(generate(plain, seed=1), off, rtol=0, atol=0)
    with pytest.raises(ValueError, match="guide_unet"):
        generate(plain, seed=1, autoguidance_scale=2.0)
    pipe.guide_unet = pipe.unet  # a guide as good as the model: nothing to steer away from
    torch.testing.assert_close(generate(pipe, seed=1, autoguidance_scale=3.0), off, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="num_class_embeds"):
        conditional = UNet2DModel.from_config(tiny_unet().config, num_class_embeds=3)
        CrispDiffPipeline(unet=tiny_unet(), scheduler=pipe.scheduler, guide_unet=conditional)


def test_sr_component_upscales_and_blends(sr_dir):
    pipe = load_pipeline(sr_dir)
    up = generate(pipe, seed=1)
    plain = generate(pipe, seed=1, upscale=False)
    assert up.shape == (2, 3, 2 * SIZE, 2 * SIZE) and plain.shape == (2, 3, SIZE, SIZE)
    exact = pipe.sr_model.upscale(plain, sr_strength=pipe.config.sr_strength)
    assert torch.equal(up, exact.clamp(0, 1))
    assert not torch.equal(generate(pipe, seed=1, sr_strength=1.0), up)
    assert generate(pipe, seed=1, output_size=24).shape == (2, 3, 24, 24)
    assert generate(pipe, seed=1, upscale=False, output_size=(20, 24)).shape == (2, 3, 20, 24)


def test_upscale_without_sr_model_is_an_error(pixel_dir):
    pipe = CrispDiffPipeline.from_pretrained(pixel_dir)
    with pytest.raises(ValueError, match="sr_model"):
        generate(pipe, upscale=True)


def test_latent_pipeline_decodes_to_pixels(tmp_path):
    unet, vae = tiny_unet(seed=1, in_channels=4, sample_size=SIZE // 2), tiny_vae(block_out_channels=(8, 8))
    folder = save_pipeline(
        tmp_path / "latent",
        unet=unet,
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        sampler="ddim",
        thresholding=True,  # pixel-only: dropped for a latent pipeline
        vae=vae,
        latent_scaling_factor=0.5,
        latent_shift_factor=0.1,
    )
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["latent_scaling_factor"] == 0.5
    assert index["thresholding"] is False
    pipe = CrispDiffPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.clip_sample is False, "latents must not be clipped to [-1, 1]"
    images = generate(pipe, seed=2)
    assert images.shape == (2, 3, SIZE, SIZE) and not torch.equal(images[0], images[1])

    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        manual = (vae.decode(latents / 0.5 + 0.1).sample / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(pipe.decode(latents), manual, atol=1e-6)
    # thresholding clips pixels: a latent pipeline ignores it (make_scheduler itself refuses it, tested above)
    assert (
        CrispDiffPipeline(unet=unet, scheduler=pipe.scheduler, vae=vae, thresholding=True).config.thresholding is False
    )


# ---- post-processing ------------------------------------------------------------------------------------------------


def _edge_image() -> torch.Tensor:
    """A slightly blurred vertical step (0.3 -> 0.7) across a 16x16 RGB image."""
    step = torch.full((1, 3, SIZE, SIZE), 0.3)
    step[..., SIZE // 2 :] = 0.7
    return gaussian_blur(step, 1.0)


def _detail(images: torch.Tensor) -> float:
    return (images - gaussian_blur(images, 1.0)).abs().mean().item()


def test_sharpening_and_gamma_directions():
    image = _edge_image()
    assert unsharp_mask(image, 0.0) is image and apply_gamma(image, 1.0) is image
    sharp = unsharp_mask(image, 1.0, radius=1.0)
    assert _detail(sharp) > _detail(image) * 1.3
    steepest = (image[..., 1:] - image[..., :-1]).max()
    assert (sharp[..., 1:] - sharp[..., :-1]).max() > steepest * 1.2, "the edge must get steeper"
    assert sharp.max() > image.max() and sharp.min() < image.min(), "unsharp masking overshoots at the edge"
    assert torch.allclose(sharp[..., :2], image[..., :2], atol=1e-3), "flat areas stay as they are"
    assert torch.equal(unsharp_mask(image, 1.0, threshold=1.0), image), "a threshold above every detail disables it"
    brighter, darker = apply_gamma(image, 2.0), apply_gamma(image, 0.5)
    assert (brighter > image).all() and (darker < image).all()
    ends = torch.tensor([[[[0.0, 1.0]]]])
    assert torch.equal(apply_gamma(ends, 2.0), ends)
    with pytest.raises(ValueError, match="gamma"):
        apply_gamma(image, 0.0)
    blurred = gaussian_blur(torch.full((1, 3, 4, 4), 0.25), 2.0)
    assert torch.allclose(blurred, torch.full_like(blurred, 0.25)), "blur keeps flat images (replicate padding)"


def test_pipeline_post_processing(pixel_dir, tmp_path):
    pipe = CrispDiffPipeline.from_pretrained(pixel_dir)
    plain = generate(pipe, seed=4)
    assert torch.equal(generate(pipe, seed=4, gamma=1.0, sharpen_amount=0.0), plain)
    middle = (plain > 0.05) & (plain < 0.95)
    assert (generate(pipe, seed=4, gamma=2.0)[middle] > plain[middle]).all()
    sharp = generate(pipe, seed=4, sharpen_amount=1.0, sharpen_radius=1.0)
    assert _detail(sharp) > _detail(plain)
    styled = in_memory_pipeline(pipe.unet, gamma=2.0, sharpen_amount=1.0)  # the same settings from the config
    styled.save_pretrained(tmp_path / "styled")
    reloaded = CrispDiffPipeline.from_pretrained(tmp_path / "styled")
    assert torch.equal(generate(reloaded, seed=4), pipe.postprocess(plain, 1.0, 1.0, 0.0, 2.0))


# ---- the sample command ---------------------------------------------------------------------------------------------


def sample_main(argv: list[str]) -> int:
    """`crispdiff sample ...` through the subcommand's own add_parser / run (independent of the other commands)."""
    from crispdiff.commands import sample

    parser = argparse.ArgumentParser(prog="crispdiff")
    sample.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_sample_command_writes_grid_and_images(pixel_dir, sr_dir, tmp_path, capsys):
    main = sample_main
    grid_path, singles = tmp_path / "grids" / "grid.png", tmp_path / "singles"
    common = ["--steps", "2", "--batch_size", "2", "--device", "cpu", "--seed", "3"]
    assert (
        main(
            ["sample", str(pixel_dir), "--num_images", "5", "--out", str(grid_path), "--out_dir", str(singles), *common]
        )
        == 0
    )
    assert str(grid_path) in capsys.readouterr().out
    assert PIL.Image.open(grid_path).size == (3 * SIZE, 2 * SIZE)  # 5 images -> 3 columns x 2 rows
    files = sorted(singles.glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    first, second = np.asarray(PIL.Image.open(files[0])), np.asarray(PIL.Image.open(files[1]))
    assert first.shape == (SIZE, SIZE, 3) and not np.array_equal(first, second)
    grid = np.asarray(PIL.Image.open(grid_path))
    np.testing.assert_array_equal(grid[:SIZE, SIZE : 2 * SIZE], second)

    sr_grid = tmp_path / "sr.png"
    assert main(["sample", str(sr_dir), "--num_images", "4", "--out", str(sr_grid), "--nrow", "4", *common]) == 0
    assert PIL.Image.open(sr_grid).size == (4 * 2 * SIZE, 2 * SIZE)
    assert main(["sample", str(sr_dir), "--num_images", "2", "--out", str(sr_grid), "--no_upscale", *common]) == 0
    assert PIL.Image.open(sr_grid).size == (2 * SIZE, SIZE)
    assert main(["sample", str(tmp_path / "missing"), "--out", str(sr_grid)]) == 2
    assert main(["sample", str(pixel_dir), "--upscale", "--out", str(sr_grid), *common]) == 2
    assert "no sr_model" in capsys.readouterr().err


def test_sample_command_output_dir_and_dtype(pixel_dir, tmp_path, capsys):
    """--output_dir (grid.png, images/ with --save_images) is the documented name; --dtype bf16 samples in bf16."""
    common = ["--num_images", "3", "--steps", "2", "--batch_size", "2", "--device", "cpu", "--seed", "3"]
    out = tmp_path / "samples"
    assert sample_main(["sample", str(pixel_dir), "--output_dir", str(out), "--save_images", *common]) == 0
    assert PIL.Image.open(out / "grid.png").size == (2 * SIZE, 2 * SIZE)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    fp32 = np.asarray(PIL.Image.open(out / "images" / "00000.png"), dtype=np.int16)
    bf16_out = tmp_path / "bf16"
    argv = ["sample", str(pixel_dir), "--output_dir", str(bf16_out), "--save_images", "--dtype", "bf16", *common]
    assert sample_main(argv) == 0
    bf16 = np.asarray(PIL.Image.open(bf16_out / "images" / "00000.png"), dtype=np.int16)
    assert not np.array_equal(bf16, fp32), "--dtype bf16 must change the arithmetic"
    assert np.abs(bf16 - fp32).mean() < 8, "bf16 samples must stay close to fp32 ones"
    assert load_pipeline(pixel_dir, dtype="bf16").unet.dtype == torch.bfloat16


def test_crispdiff_cli_runs_sample(pixel_dir, tmp_path):
    from crispdiff import cli

    out = tmp_path / "cli.png"
    argv = ["sample", str(pixel_dir), "--num_images", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    assert PIL.Image.open(out).size == (2 * SIZE, SIZE)


# ---- export ---------------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_replaces_atomically_and_keeps_foreign_files(tmp_path):
    target = tmp_path / "run"
    save_pipeline(target, unet=tiny_unet(seed=0), scheduler_base_config=base_config(), beta_schedule="cosine")
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "state.bin").write_bytes(b"resume me")
    before = _snapshot(target)

    with pytest.raises(TypeError, match="crispdiff_training.json"):
        save_pipeline(
            target,
            unet=tiny_unet(seed=1),
            scheduler_base_config=base_config(),
            beta_schedule="cosine",
            training_config={"unsaveable": object()},  # fails after the components were written
        )
    assert _snapshot(target) == before, "a failed save must leave the old folder untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no temp folders may be left behind"

    with pytest.raises(TypeError, match="unet"):
        save_pipeline(target, unet=object(), scheduler_base_config=base_config(), beta_schedule="cosine")
    assert _snapshot(target) == before

    save_pipeline(
        target, unet=tiny_unet(seed=1), scheduler_base_config=base_config(), beta_schedule="cosine", sampler="unipc"
    )
    after = _snapshot(target)
    assert after["checkpoint-10/state.bin"] == b"resume me", "entries that are not ours are carried over"
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert after[weights] != before[weights]
    assert isinstance(CrispDiffPipeline.from_pretrained(target).scheduler, UniPCMultistepScheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="not a crispdiff"):
        load_pipeline(tmp_path / "other")


# ---- image helpers --------------------------------------------------------------------------------------------------


def test_image_helpers(tmp_path):
    model_space = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(model_space).flatten().tolist() == [0, 64, 128, 255, 255]
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0]), value_range=(0, 1)).tolist() == [0, 128, 255]
    assert to_uint8(torch.tensor([0, 7, 255], dtype=torch.uint8)).tolist() == [0, 7, 255]

    images = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pils = to_pil_list(images)
    assert len(pils) == 5 and pils[0].size == (6, 8) and pils[0].mode == "RGB"
    assert to_pil_list(images[0, :1])[0].mode == "L" and len(to_pil_list(images[0])) == 1
    assert make_grid(images).size == (3 * 6, 2 * 8)
    assert make_grid(images, nrow=5).size == (5 * 6, 8)
    assert make_grid(pils, nrow=2).size == (2 * 6, 3 * 8)
    assert make_grid(images, nrow=2, padding=1).size == (2 * 6 + 3, 3 * 8 + 4)
    grid = np.asarray(make_grid(images, nrow=2))
    np.testing.assert_array_equal(grid[8:16, 6:12], np.asarray(pils[3]))

    path = save_image_atomic(make_grid(images), tmp_path / "a" / "grid.png")
    assert PIL.Image.open(path).size == (18, 16) and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="extension"):
        save_image_atomic(pils[0], tmp_path / "grid.unknown")
