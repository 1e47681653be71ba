"""`crispdiff evaluate`: from a tiny saved pipeline (with and without SR) and from an .npz of samples, against a folder
of reference images; the three outputs, resolution handling, determinism and errors. Tiny real models, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from tiny_models import SIZE, tiny_unet

from crispdiff.cli import main as cli_main
from crispdiff.core.config import NoiseConfig
from crispdiff.diffusion.schedule import scheduler_base_config
from crispdiff.evaluate.report import GRID_NAME, METRICS_NAME, REPORT_NAME
from crispdiff.evaluate.sampling import load_samples_npz
from crispdiff.evaluate.sharpen import SHARPEN_SWEEP_AMOUNTS
from crispdiff.publish.export import save_pipeline


def synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, size, size]: coloured blobs with some texture, so every metric has something to measure."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, 4, 4, generator=gen), size=size, mode="bicubic")
    fine = torch.rand(count, 3, size, size, generator=gen)
    return ((0.7 * coarse + 0.3 * fine).clamp(0, 1) * 255).round().to(torch.uint8)


def write_folder(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        PIL.Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """40 reference PNGs of 16 px."""
    return write_folder(tmp_path_factory.mktemp("reference") / "images", synthetic_images(40, SIZE, seed=7))


def tiny_sr_model():
    """The real SR component around a 2x Compact network of ~700 parameters."""
    pytest.importorskip("spandrel")
    from spandrel.architectures.Compact import Compact

    from crispdiff.pipelines.sr_model import SpandrelSRModel

    torch.manual_seed(0)
    return SpandrelSRModel.from_state_dict(Compact(num_feat=4, num_conv=1, upscale=2).state_dict())


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A saved 16 px pixel pipeline with a 2x SR component (upscale off by default in these tests' commands)."""
    return save_pipeline(
        tmp_path_factory.mktemp("pipe") / "pipeline",
        unet=tiny_unet(),
        scheduler_base_config=scheduler_base_config(NoiseConfig()),
        beta_schedule="cosine",
        sr_model=tiny_sr_model(),
        training_config={"resolution": SIZE},
    )


def evaluate(*argv: str) -> int:
    return cli_main(["evaluate", *argv])


def read_metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / METRICS_NAME).read_text())


def test_evaluate_a_tiny_pipeline_writes_all_outputs_and_is_deterministic(
    pipeline_dir, reference_dir, tmp_path, capsys
):
    common = ["--reference", str(reference_dir), "--num_images", "8", "--steps", "2", "--batch_size", "4"]
    common += ["--cache_dir", str(tmp_path / "cache"), "--no_upscale", "--no_fid", "--device", "cpu"]
    assert evaluate(str(pipeline_dir), *common, "--output_dir", str(tmp_path / "a")) == 0
    report = capsys.readouterr().out
    for name in (METRICS_NAME, GRID_NAME, REPORT_NAME):
        assert (tmp_path / "a" / name).is_file(), name
    assert "real-vs-real floor" in report and "| SWD x1e3" in report
    metrics = read_metrics(tmp_path / "a")
    assert set(metrics) == {"generated", "real_vs_real_floor", "settings"}
    assert set(metrics["generated"]) == set(metrics["real_vs_real_floor"])
    settings = metrics["settings"]
    assert settings["num_samples"] == 8 and settings["reference_subset_size"] == 8
    assert settings["compared_at_resolution"] == SIZE and settings["sample_resolution"] == SIZE
    assert settings["sampler"] == "dpmsolver++" and settings["upscale"] is False
    # untrained model -> noise: far from the data and much "sharper" than it
    assert metrics["generated"]["swd_avg"] > metrics["real_vs_real_floor"]["swd_avg"]
    assert metrics["generated"]["hf_energy_ratio"] > 1.0
    grid = PIL.Image.open(tmp_path / "a" / GRID_NAME)
    assert grid.size == (3 * SIZE + 4 * 2, 3 * SIZE + 4 * 2)  # 8 images -> 3x3 grid, 2 px padding

    # --out_dir is the old name of --output_dir, still accepted
    assert evaluate(str(pipeline_dir), *common, "--out_dir", str(tmp_path / "b"), "--sampler", "ddim") == 0
    assert evaluate(str(pipeline_dir), *common, "--out_dir", str(tmp_path / "c")) == 0
    first, again, other = (read_metrics(tmp_path / d) for d in "acb")
    assert first["generated"] == again["generated"] and first["real_vs_real_floor"] == again["real_vs_real_floor"]
    assert other["settings"]["sampler"] == "ddim" and other["generated"] != first["generated"]


def test_upscaled_samples_are_compared_at_the_reference_resolution(pipeline_dir, reference_dir, tmp_path):
    out = tmp_path / "up"
    code = evaluate(
        str(pipeline_dir),
        *["--reference", str(reference_dir), "--num_images", "4", "--steps", "2", "--upscale", "--no_fid"],
        *["--cache_dir", str(tmp_path / "cache"), "--out_dir", str(out), "--device", "cpu", "--save_samples"],
    )
    assert code == 0
    metrics = read_metrics(out)
    assert metrics["settings"]["compared_at_resolution"] == SIZE  # from crispdiff_training.json
    assert metrics["settings"]["sample_resolution"] == 2 * SIZE
    assert metrics["generated"]["resolution"] == SIZE and "swd_16" in metrics["generated"]
    at_output = metrics["output_resolution"]
    assert at_output["resolution"] == 2 * SIZE and at_output["hf_energy_ratio"] > 0
    assert "bicubic" in (out / REPORT_NAME).read_text()
    saved = load_samples_npz(out / "samples.npz")
    assert saved.shape == (4, 3, 2 * SIZE, 2 * SIZE)


def test_evaluate_a_samples_file_against_a_folder(tmp_path, capsys):
    reference = synthetic_images(60, 32, seed=1)
    folder = write_folder(tmp_path / "ref", reference)
    copies = reference[:10].permute(0, 2, 3, 1).numpy()  # NHWC uint8, as np.savez(file, x) writes it
    np.savez(tmp_path / "samples.npz", copies)
    out = tmp_path / "out"
    code = evaluate(
        *["--samples_npz", str(tmp_path / "samples.npz"), "--reference", str(folder)],
        *["--out_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--no_fid"],
    )
    assert code == 0, capsys.readouterr().err
    metrics = read_metrics(out)
    assert metrics["settings"]["samples_npz"].endswith("samples.npz")
    assert metrics["generated"]["near_copy_fraction"] == 1.0  # every sample is a training image
    assert metrics["real_vs_real_floor"]["near_copy_fraction"] < 0.5
    assert "FID/KID skipped" not in (out / REPORT_NAME).read_text()  # --no_fid: not asked, not mentioned


def test_load_samples_npz_formats(tmp_path):
    images = synthetic_images(3, 16)
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    np.savez(tmp_path / "float.npz", samples=images.float().numpy() / 255)
    np.savez(tmp_path / "two.npz", a=images.numpy(), b=images.numpy())
    expected = images.float() / 255
    assert torch.equal(load_samples_npz(tmp_path / "nchw.npz"), expected)
    assert torch.allclose(load_samples_npz(tmp_path / "float.npz"), expected)
    with pytest.raises(ValueError, match="'images'"):
        load_samples_npz(tmp_path / "two.npz")
    np.savez(tmp_path / "bad.npz", images=images.float().numpy() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"bad.npz.*\[-1, 1\]|bad.npz.*\(x \+ 1\)"):
        load_samples_npz(tmp_path / "bad.npz")


def test_sharpen_sweep_measures_every_amount_on_the_same_samples_and_saves_the_best(reference_dir, tmp_path, capsys):
    from crispdiff.publish.export import load_pipeline

    folder = save_pipeline(
        tmp_path / "pipeline",
        unet=tiny_unet(),
        scheduler_base_config=scheduler_base_config(NoiseConfig()),
        beta_schedule="cosine",
        sharpen_amount=1.0,  # far too much for an untrained model's noise: the sweep must find less
        training_config={"resolution": SIZE},
    )
    common = ["--reference", str(reference_dir), "--num_images", "8", "--steps", "2", "--no_fid", "--device", "cpu"]
    common += ["--cache_dir", str(tmp_path / "cache")]
    assert evaluate(str(folder), *common, "--output_dir", str(tmp_path / "plain")) == 0
    assert evaluate(str(folder), *common, "--output_dir", str(tmp_path / "swept"), "--sharpen_sweep") == 0
    plain, swept = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "swept")
    # the evaluated samples are still the pipeline's own: sharpening after sampling is what the pipeline does
    for key in ("swd_avg", "hf_energy_ratio", "laplacian_var_ratio"):
        assert swept["generated"][key] == pytest.approx(plain["generated"][key], rel=1e-5), key
    sweep = swept["sharpen_sweep"]
    rows = sweep["rows"]
    assert [row["amount"] for row in rows] == list(SHARPEN_SWEEP_AMOUNTS) and sweep["pipeline_amount"] == 1.0
    own = next(row for row in rows if row["amount"] == 1.0)
    assert own["hf_energy_ratio"] == pytest.approx(swept["generated"]["hf_energy_ratio"], rel=1e-5)
    hf = [row["hf_energy_ratio"] for row in rows]
    assert all(later >= earlier for earlier, later in zip(hf, hf[1:])) and hf[-1] > hf[0]  # more amount, more detail

    def distance(row: dict) -> float:
        return max(abs(row["hf_energy_ratio"] - 1), abs(row["laplacian_var_ratio"] - 1))

    assert sweep["best_amount"] == min(rows, key=distance)["amount"] < 1.0
    assert "Unsharp-mask sweep" in capsys.readouterr().out
    assert load_pipeline(folder).config.sharpen_amount == 1.0  # reporting alone changes nothing

    out = str(tmp_path / "saved")
    assert evaluate(str(folder), *common, "--output_dir", out, "--sharpen_sweep", "--save_sharpen_amount") == 0
    assert load_pipeline(folder).config.sharpen_amount == sweep["best_amount"]


def test_the_best_amount_centres_both_ratios_in_the_band():
    """Rows as an OpenMoji run's sweep after SR gave them: the high-frequency share runs high while the Laplacian runs
    low. The chosen amount keeps both inside 1 +- 0.15 (a log distance picked 0.1, whose hf ratio is at the edge)."""
    from crispdiff.evaluate.sharpen import best_sharpen_amount

    rows = [
        {"amount": 0.0, "hf_energy_ratio": 1.015, "laplacian_var_ratio": 0.816},
        {"amount": 0.05, "hf_energy_ratio": 1.078, "laplacian_var_ratio": 0.870},
        {"amount": 0.1, "hf_energy_ratio": 1.139, "laplacian_var_ratio": 0.922},
        {"amount": 0.15, "hf_energy_ratio": 1.195, "laplacian_var_ratio": 0.972},
    ]
    assert best_sharpen_amount(rows) == 0.05
    assert best_sharpen_amount(rows[2:]) == 0.1


def test_a_sweep_of_upscaled_samples_measures_them_at_their_size_and_saves_the_amount_after_sr(
    reference_dir, tmp_path, capsys
):
    """--upscale --sharpen_sweep: at the pipeline's 16 px the sweep would judge the SR output after downscaling it,
    so it is refused with the --resolution to pass; at 32 px --save_sharpen_amount writes upscale_sharpen_amount,
    which pipe(upscale=True) uses, and leaves the 16 px amount alone."""
    from crispdiff.publish.export import load_pipeline

    folder = save_pipeline(
        tmp_path / "pipeline",
        unet=tiny_unet(),
        scheduler_base_config=scheduler_base_config(NoiseConfig()),
        beta_schedule="cosine",
        sr_model=tiny_sr_model(),
        upscale=False,
        sharpen_amount=1.0,
        training_config={"resolution": SIZE},
    )
    common = ["--reference", str(reference_dir), "--num_images", "8", "--steps", "2", "--no_fid", "--device", "cpu"]
    common += ["--cache_dir", str(tmp_path / "cache"), "--upscale", "--sharpen_sweep", "--save_sharpen_amount"]
    assert evaluate(str(folder), *common, "--output_dir", str(tmp_path / "at16")) == 2
    assert f"pass --resolution {2 * SIZE}" in capsys.readouterr().err
    assert evaluate(str(folder), *common, "--resolution", str(2 * SIZE), "--output_dir", str(tmp_path / "at32")) == 0
    sweep = read_metrics(tmp_path / "at32")["sharpen_sweep"]
    assert sweep["pipeline_amount"] == 1.0  # no amount of its own yet: the 16 px one applied after SR
    pipe = load_pipeline(folder)
    assert pipe.config.upscale_sharpen_amount == sweep["best_amount"] and pipe.config.sharpen_amount == 1.0

    def sample(**kwargs):
        return pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **kwargs).images  # fmt: skip

    pipe.set_progress_bar_config(disable=True)
    raw = sample(upscale=True, sharpen_amount=0.0)
    assert torch.equal(sample(upscale=True), pipe.postprocess(raw, sharpen_amount=sweep["best_amount"]))
    assert torch.equal(sample(), sample(sharpen_amount=1.0))  # 16 px output keeps its own amount


def test_cli_errors_are_messages(tmp_path, reference_dir, capsys):
    assert evaluate("--reference", str(reference_dir)) == 2
    assert "exactly one" in capsys.readouterr().err
    assert evaluate("--samples_npz", str(tmp_path / "missing.npz")) == 2
    assert "missing.npz does not exist" in capsys.readouterr().err
    np.savez(tmp_path / "s.npz", images=synthetic_images(4, SIZE).numpy())
    empty = tmp_path / "empty"
    empty.mkdir()
    code = evaluate(
        "--samples_npz", str(tmp_path / "s.npz"), "--reference", str(empty), "--out_dir", str(tmp_path / "x")
    )
    assert code == 2
    assert "no images found" in capsys.readouterr().err
    assert evaluate(str(tmp_path / "not_a_pipeline"), "--reference", str(reference_dir)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert evaluate("--samples_npz", str(tmp_path / "s.npz"), "--sharpen_sweep") == 2
    assert "--samples_npz has no pipeline" in capsys.readouterr().err
    assert evaluate(str(tmp_path / "s.npz"), "--save_sharpen_amount") == 2
    assert "pass both" in capsys.readouterr().err
