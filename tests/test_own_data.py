"""A user's own, unlabelled images: auto classes (k-means clusters), the class mix and guidance interval the pipeline
samples with, VAE adaptation, and the time budget.

Every model is a real, tiny diffusers model; the pipeline checks compare whole sampling runs bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import SIZE, base_config, kill_after_checkpoint, tiny_vae

from crispdiff.core.config import TrainConfig
from crispdiff.data.auto_classes import class_names, cluster_images, default_num_classes, kmeans
from crispdiff.data.loading import load_images
from crispdiff.latent.trainer import LatentTrainConfig, train_latent
from crispdiff.latent.vae import embedded_vae_dir
from crispdiff.publish.export import build_pipeline, load_pipeline
from crispdiff.train.time_budget import MIN_STEPS, ModelRung, RungCost, affordable_steps, climb_ladder
from crispdiff.train.unet_trainer import model_ladder, train
from crispdiff.vae.adapt import ADAPTED_VAE_DIR, adapted_vae_dir, misses_bar

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220)]  # three groups the clustering must find
PER_COLOUR = 6


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """18 unlabelled 16 px images (no metadata): a red, green or blue field, a white disc of varied size and place."""
    folder = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(PER_COLOUR * len(COLOURS)):
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = COLOURS[i % len(COLOURS)]
        cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(2, 5)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
        Image.fromarray(image).save(folder / f"img_{i:02d}.png")
    return folder


def colour_of(index: int) -> int:
    return index % len(COLOURS)  # files sort as img_00, img_01, ...: the colour is the index mod 3


# ---- clustering ---------------------------------------------------------------------------------------------------


def test_kmeans_finds_separated_groups_with_every_id_used_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(25)
    points = centres[truth] + 0.5 * torch.randn(100, 2, generator=generator)
    ids = kmeans(points, 4, seed=0)
    # the same partition as the truth (ids may be permuted), every id used, largest cluster first
    pairs = {(int(a), int(b)) for a, b in zip(ids, truth)}
    assert len(pairs) == 4 and sorted(torch.bincount(ids).tolist()) == [25] * 4
    assert torch.equal(ids, kmeans(points, 4, seed=0))
    with pytest.raises(ValueError, match="cannot make 5 clusters of 4 images"):
        kmeans(points[:4], 5, seed=0)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_gives_each_empty_cluster_its_own_point(seed):
    """Duplicate images (three distinct thumbnails, four copies each) with more clusters than distinct points: k-means++
    seeds twin centres, so several clusters empty at once; each must be re-seeded at a point of its own, or twins
    re-form and an id is never used."""
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat_interleave(4, dim=0)
    ids = kmeans(points, 5, seed=seed)
    assert torch.bincount(ids, minlength=5).min() >= 1, torch.bincount(ids, minlength=5).tolist()


def test_cluster_images_groups_by_what_the_images_show_and_names_sort_in_id_order(colour_folder, tmp_path):
    config = TrainConfig(train_data_dir=str(colour_folder), resolution=SIZE, cache_dir=str(tmp_path / "cache"))
    data = load_images(config, show_progress=False)
    names, ids = cluster_images(data.center_crops, len(data), num_classes=3, seed=0)
    assert names == ["cluster-0", "cluster-1", "cluster-2"]
    groups = {colour_of(i): set() for i in range(len(data))}
    for i, cluster in enumerate(ids):
        groups[colour_of(i)].add(int(cluster))
    assert all(len(found) == 1 for found in groups.values()) and len(set.union(*groups.values())) == 3
    assert class_names(12)[:2] == ["cluster-00", "cluster-01"] and class_names(12) == sorted(class_names(12))
    assert default_num_classes(1000) == 125 and default_num_classes(16) == 2 and default_num_classes(10**6) == 256
    assert default_num_classes(15) == 0 and cluster_images(data.center_crops, 15) == (None, None)  # too few


def test_class_column_auto_labels_unlabelled_data_deterministically(colour_folder, tmp_path):
    def load(seed: int, **extra):
        config = TrainConfig(
            train_data_dir=str(colour_folder), resolution=SIZE, cache_dir=str(tmp_path / "cache"),
            class_column="auto", seed=seed, **extra,
        )  # fmt: skip
        return load_images(config, show_progress=False)

    data = load(0)
    assert data.class_names == class_names(2)  # 18 images: one cluster per 8
    assert np.array_equal(data.class_ids, load(0).class_ids)
    three = load(0, num_auto_classes=3)
    assert three.class_names == class_names(3) and len(set(three.class_ids.tolist())) == 3
    with pytest.raises(ValueError, match="--num_auto_classes must be >= 2"):
        TrainConfig(class_column="auto", num_auto_classes=1).resolve()
    with pytest.warns(UserWarning, match="too few to cluster"):
        few = load(0, max_train_samples=12)
    assert few.class_names is None and load(0, max_train_samples=12, num_auto_classes=2).class_names == class_names(2)


# ---- the pipeline: class mix and guidance interval -------------------------------------------------------------------


def mix_pipeline(class_mix=None, **kwargs):
    from test_guidance import tiny_class_unet

    pipe = build_pipeline(
        unet=tiny_class_unet(num_classes=3), scheduler_base_config=base_config(), beta_schedule="cosine",
        class_names=class_names(3), class_mix=class_mix, guidance_scale=3.0, **kwargs,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    return pipe(batch_size=3, num_inference_steps=4, generator=generators, output_type="pt", **kwargs).images


def test_a_pipeline_with_a_class_mix_samples_it_with_guidance_when_called_without_labels(tmp_path):
    only_two = mix_pipeline(class_mix=[0.0, 0.0, 1.0])
    unlabelled = sample(only_two)
    assert torch.equal(unlabelled, sample(only_two, class_labels=2))  # drawn from the mix, saved guidance 3
    assert not torch.equal(unlabelled, sample(only_two, class_labels=2, guidance_scale=1.0))
    assert not torch.equal(unlabelled, sample(mix_pipeline(class_mix=[1.0, 0.0, 0.0])))
    # without a mix: the null class, unguided, as before
    plain = mix_pipeline()
    assert torch.equal(sample(plain), sample(plain, class_labels=3, guidance_scale=1.0))
    # one draw per image's generator: image i's class does not depend on the batch it is in
    even = mix_pipeline(class_mix=[0.5, 0.25, 0.25])
    drawn = even.draw_class_labels(3, [torch.Generator().manual_seed(seed) for seed in range(3)])
    assert drawn.tolist() == [even.draw_class_labels(1, [torch.Generator().manual_seed(s)]).item() for s in range(3)]
    # stored in model_index.json and back
    even.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["class_mix"] == {
        "0": 0.5, "1": 0.25, "2": 0.25,
    }  # fmt: skip
    assert load_pipeline(tmp_path / "pipe").class_mix == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="class_mix of 2 classes needs a unet with num_class_embeds = 3"):
        mix_pipeline(class_mix=[0.5, 0.5])


def test_guidance_interval_guides_only_the_steps_whose_noise_level_is_inside_it(tmp_path):
    pipe = mix_pipeline()
    labels = dict(class_labels=[0, 1, 2])
    guided = sample(pipe, **labels)
    assert torch.equal(guided, sample(pipe, guidance_interval=(0.0, float("inf")), **labels))
    # an interval no step falls in: the conditional model alone
    assert torch.equal(sample(pipe, guidance_interval=(1e6, 1e7), **labels), sample(pipe, guidance_scale=1.0, **labels))
    partial = sample(pipe, guidance_interval=(0.28, 5.42), **labels)
    assert not torch.equal(partial, guided) and not torch.equal(partial, sample(pipe, guidance_scale=1.0, **labels))
    # saved as the pipeline's default
    saved = mix_pipeline(guidance_interval=[0.28, 5.42])
    assert saved.default_guidance_interval == (0.28, 5.42)
    assert torch.equal(sample(saved, **labels), partial)
    saved.save_pretrained(tmp_path / "pipe")
    assert torch.equal(sample(load_pipeline(tmp_path / "pipe"), **labels), partial)


# ---- VAE adaptation -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae(sample_size=SIZE, scaling_factor=1.0).save_pretrained(folder)
    return folder


def latent_config(folder: Path, vae_dir: Path | None, out: Path, **overrides) -> LatentTrainConfig:
    settings = dict(
        train_data_dir=str(folder), pretrained_vae_name_or_path=None if vae_dir is None else str(vae_dir),
        resolution=SIZE, cache_dir=str(out.parent / "cache"), output_dir=str(out), base_channels=8,
        channel_mults=[1, 2], attention_res=[4], train_batch_size=4, max_train_steps=2, lr_warmup_steps=1,
        checkpointing_steps=0, validation_steps=0, num_validation_images=2, validation_inference_steps=2,
        report_to="none",
    )  # fmt: skip
    settings.update(overrides)
    return LatentTrainConfig(**settings)


@pytest.fixture(scope="module")
def openmoji_sample(openmoji_dir, tmp_path_factory) -> Path:
    """48 OpenMoji emoji (a design family the embedded VAE never saw) in a folder of their own, without metadata."""
    folder = tmp_path_factory.mktemp("openmoji")
    for path in sorted(openmoji_dir.glob("*.png"))[::90][:48]:
        shutil.copyfile(path, folder / path.name)
    return folder


def test_vae_adaptation_improves_held_out_reconstructions_and_the_pipeline_carries_it(
    openmoji_sample, colour_folder, vae_dir, tmp_path, capsys
):
    """The embedded VAE on emoji of another design family: below the bar, so `auto` adapts it (real data, real VAE)."""
    out = tmp_path / "out"
    config = latent_config(openmoji_sample, None, out, resolution=64, adapt_vae_steps=30, num_auto_classes=2)
    config.explicit_flags = frozenset({"adapt_vae_steps"})  # as given on the command line: not capped to the run
    folder = train_latent(config)
    log = capsys.readouterr().out
    assert "adapting the VAE" in log and "below the bar" in log
    summary = json.loads((out / "vae-adapted" / "vae_summary.json").read_text())
    before = float(log.split("held-out PSNR ")[1].split(" dB")[0])
    assert summary["steps"] == 30 and summary["held_out"]["psnr"] > before + 1.0, (before, summary["held_out"])
    weights, name = "diffusion_pytorch_model.safetensors", "decoder.conv_out.weight"
    adapted = load_file(adapted_vae_dir(config) / weights)
    saved, original = load_file(folder / "vae" / weights), load_file(embedded_vae_dir() / weights)
    assert torch.equal(saved[name], adapted[name]) and not torch.equal(saved[name], original[name])
    assert json.loads((folder / "crispdiff_training.json").read_text())["adapt_vae_steps"] == 30

    # resumed: the finished adaptation is reused, not run again
    stamp = (adapted_vae_dir(config) / weights).stat().st_mtime_ns
    train_latent(latent_config(openmoji_sample, None, out, resolution=64, resume_from_checkpoint="latest"))
    assert "reusing the VAE adapted" in capsys.readouterr().out
    assert (adapted_vae_dir(config) / weights).stat().st_mtime_ns == stamp

    # off: the given VAE, untouched
    off = train_latent(latent_config(colour_folder, vae_dir, tmp_path / "off", adapt_vae="off"))
    assert "adapting" not in capsys.readouterr().out
    tiny = load_file(vae_dir / weights)
    assert torch.equal(load_file(off / "vae" / weights)[name], tiny[name])


def test_the_adaptation_is_sized_to_the_unets_run_unless_its_steps_are_given():
    """A fixed 150 adaptation steps would turn a 6-step smoke run into minutes of VAE training: without
    --adapt_vae_steps the adaptation sees at most one image for every 16 the UNet trains on; the main job's run keeps
    its 150; an explicit count runs as given."""
    from crispdiff.core.flags import parse_config
    from crispdiff.vae.adapt import adaptation_steps

    def sized(*flags: str, images: int = 1000, processes: int = 1) -> tuple[int, str]:
        return adaptation_steps(parse_config(LatentTrainConfig, list(flags)), images, processes)

    assert sized()[0] == 150 and "the default" in sized()[1]  # 700 steps of 64: up to 175 allowed
    steps, why = sized("--max_train_steps", "6")
    assert steps == 1 and "one image for every 16" in why and "6 steps of 64 images" in why
    assert sized("--max_train_steps", "100")[0] == 25  # 6,400 UNet images: 400 for the VAE
    assert sized("--max_train_steps", "100", processes=2)[0] == 25  # both sides scale with the processes
    assert sized("--num_epochs", "1")[0] == 3  # 15 batches of 64 of 1,000 images: 960 images
    assert sized("--max_train_steps", "6", "--adapt_vae_steps", "150") == (150, "--adapt_vae_steps")


def test_a_smoke_run_adapts_its_vae_for_a_step_not_150(colour_folder, vae_dir, tmp_path, capsys):
    out = tmp_path / "out"
    folder = train_latent(latent_config(colour_folder, vae_dir, out, adapt_vae="always"))  # 2 UNet steps of 4
    log = capsys.readouterr().out
    assert "adapting the VAE" in log and "for 1 step of 16 images (at most one image for every 16" in log
    assert json.loads((out / ADAPTED_VAE_DIR / "vae_summary.json").read_text())["steps"] == 1
    assert json.loads((folder / "crispdiff_training.json").read_text())["adapt_vae_steps"] == 1  # what it ran


def test_the_bar_adaptation_is_judged_by():
    assert misses_bar({"psnr": 27.9, "hf_energy_ratio": 0.95}) and misses_bar({"psnr": 33.0, "hf_energy_ratio": 0.8})
    assert not misses_bar({"psnr": 31.0, "hf_energy_ratio": 0.9})


def test_latent_trainer_on_unlabelled_data_trains_on_auto_classes_and_stores_their_mix(
    colour_folder, vae_dir, tmp_path
):
    config = latent_config(colour_folder, vae_dir, tmp_path / "out", adapt_vae="off", num_auto_classes=3)
    config = config.resolve()
    assert config.class_column == "auto" and config.guidance_interval == [0.28, 5.42]
    folder = train_latent(config)
    pipe = load_pipeline(folder)
    assert pipe.classes == class_names(3) and sum(pipe.class_mix) == pytest.approx(1.0)
    assert sorted(pipe.class_mix) == [pytest.approx(1 / 3)] * 3  # three colour groups of 6 images
    # clusters get autoguidance alone (no classifier-free guidance) by default; both in the interval
    assert pipe.default_guidance_interval == (0.28, 5.42) and pipe.config.guidance_scale == 1.0
    assert pipe.config.autoguidance_scale == 1.5 and pipe.guide_unet is not None
    assert sample(pipe).shape == (3, 3, SIZE, SIZE)


def test_latent_trainer_on_too_few_images_for_auto_classes_trains_unconditionally(colour_folder, vae_dir, tmp_path):
    config = latent_config(colour_folder, vae_dir, tmp_path / "out", adapt_vae="off", max_train_samples=12)
    with pytest.warns(UserWarning, match="too few to cluster"):
        folder = train_latent(config)
    pipe = load_pipeline(folder)
    assert pipe.classes is None and pipe.class_mix is None and pipe.unet.config.num_class_embeds is None
    assert sample(pipe).shape[1:] == (3, SIZE, SIZE)


# ---- time budget ----------------------------------------------------------------------------------------------------


def test_affordable_steps_fill_the_time_left_and_never_drop_below_the_minimum():
    assert affordable_steps(60.0, 0.5) == 120 and affordable_steps(59.9, 0.5) == 119
    assert affordable_steps(1.0, 0.5) == MIN_STEPS and affordable_steps(0.0, 0.0) == MIN_STEPS


def test_a_time_budget_sizes_the_run_and_saves_the_steps_that_repeat_it(colour_folder, tmp_path):
    """The budget sets --max_train_steps from a probe of this machine and saves it; a run given those steps repeats
    the budgeted one bit for bit. (How close runs end to their budget is measured in benchmarks, not here.)"""

    def config(out: str, **extra) -> TrainConfig:
        return TrainConfig(
            train_data_dir=str(colour_folder), resolution=SIZE, cache_dir=str(tmp_path / "cache"),
            output_dir=str(tmp_path / out), base_channels=8, channel_mults=[1, 2], attention_res=[8],
            layers_per_block=1, train_batch_size=4, learning_rate=1e-3, lr_warmup_steps=5, checkpointing_steps=0,
            validation_steps=0, num_validation_images=4, validation_inference_steps=2, report_to="none", **extra,
        )  # fmt: skip

    load_images(config("warm"), show_progress=False)  # the image cache, decoded outside the timed run
    folder = train(config("budget", time_budget_minutes=20 / 60))
    steps = json.loads((folder / "crispdiff_training.json").read_text())["max_train_steps"]
    assert isinstance(steps, int) and steps >= MIN_STEPS  # the budget chose it (without one: None, i.e. epochs)
    repeat = train(config("repeat", max_train_steps=steps))
    weights = "unet/diffusion_pytorch_model.safetensors"
    budgeted, repeated = load_file(folder / weights), load_file(repeat / weights)
    assert budgeted.keys() == repeated.keys() and all(torch.equal(budgeted[k], repeated[k]) for k in budgeted)


@dataclass
class LadderConfig(TrainConfig):
    """A tiny two-rung ladder: a base-8 UNet, and a base-16 one worth it from 50 of its steps (a third rung never)."""

    model_ladder: ClassVar[tuple[ModelRung, ...]] = (
        ModelRung("small", {"base_channels": 8}),
        ModelRung("bigger", {"base_channels": 16}, min_steps=50),
        ModelRung("never", {"base_channels": 32}, min_steps=10**9),
    )


def test_the_ladder_climbs_while_the_budget_affords_each_rungs_steps():
    """Probed costs (faked here: the timing itself is the time budget's own test) decide: each rung is taken while
    the seconds left buy at least its min_steps of its own steps; the climb stops at the first that does not."""
    rungs = list(LadderConfig.model_ladder)
    per_step = {"small": 0.01, "bigger": 0.1, "never": 1.0}
    probed = []

    def cost_of(rung):
        probed.append(rung.name)
        return RungCost(per_step[rung.name], 1.0, 0)

    assert climb_ladder(rungs, lambda: 4.0, cost_of)[:2] == (rungs[0], 300)  # bigger: 30 steps < 50
    assert probed == ["small", "bigger"]  # "never" is not probed once "bigger" failed
    rung, steps, cost = climb_ladder(rungs, lambda: 61.0, cost_of)
    assert (rung.name, steps, cost.per_step) == ("bigger", 600, 0.1)  # never: 60 steps < 10**9
    assert climb_ladder([], lambda: 11.0, lambda rung: RungCost(0.5, 1.0, 0))[:2] == (None, 20)


def test_a_tight_budget_keeps_the_small_unet_and_a_chosen_size_switches_the_ladder_off(colour_folder, tmp_path):
    config = LadderConfig(
        train_data_dir=str(colour_folder), resolution=SIZE, cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "tight"), channel_mults=[1, 2], attention_res=[8], layers_per_block=1,
        train_batch_size=4, checkpointing_steps=0, validation_steps=0, num_validation_images=0,
        report_to="none", time_budget_minutes=0.001,
    )  # fmt: skip
    saved = json.loads((train(config) / "crispdiff_training.json").read_text())
    assert saved["base_channels"] == 8 and saved["max_train_steps"] == MIN_STEPS
    chosen = LadderConfig(base_channels=24)
    chosen.explicit_flags = frozenset({"base_channels"})
    assert model_ladder(chosen) == [] and len(model_ladder(LadderConfig())) == 3


# ---- exact resume through both stages of an adapting run ------------------------------------------------------------


def adapting_flags(folder: Path, vae_dir: Path, out: Path) -> list[str]:
    """A tiny latent run that adapts its VAE first (4 steps, checkpoint at 2) and then trains the UNet (4 steps,
    accumulation 2, dropout, flips; checkpoint, validation grid and export all on step 2)."""
    return [
        "--train_data_dir", str(folder), "--pretrained_vae_name_or_path", str(vae_dir), "--resolution", str(SIZE),
        "--cache_dir", str(out.parent / f"{out.name}-cache"), "--output_dir", str(out), "--base_channels", "8",
        "--channel_mults", "1", "2", "--attention_res", "4", "--train_batch_size", "4", "--max_train_steps", "4",
        "--gradient_accumulation_steps", "2", "--dropout", "0.1", "--random_flip", "true", "--lr_warmup_steps", "1",
        "--checkpointing_steps", "2", "--validation_steps", "2", "--save_model_steps", "2",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--report_to", "none",
        "--adapt_vae", "always", "--adapt_vae_steps", "4", "--cpu_threads", "1",
    ]  # fmt: skip


def run_adapting(folder: Path, vae_dir: Path, out: Path, *extra: str) -> Path | None:
    from crispdiff.core.flags import parse_config

    return train_latent(parse_config(LatentTrainConfig, adapting_flags(folder, vae_dir, out) + list(extra)))


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted_adapting_run(colour_folder, vae_dir, tmp_path_factory) -> Path:
    """The adapting run never killed: its pipeline folder."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    folder = run_adapting(colour_folder, vae_dir, out)
    assert (out / ADAPTED_VAE_DIR / "checkpoint-2").is_dir() and (out / "checkpoint-2").is_dir()
    assert (out / "samples" / "step_0000002.png").is_file()  # the grid on the checkpoint's step was made
    return folder


@pytest.mark.parametrize("stage", [ADAPTED_VAE_DIR, "out"], ids=["killed-adapting-the-vae", "killed-training-the-unet"])
def test_an_adapting_run_killed_after_a_checkpoint_of_either_stage_resumes_exactly(
    uninterrupted_adapting_run, colour_folder, vae_dir, tmp_path, capsys, stage
):
    """SIGKILL right after checkpoint-2 of the VAE adaptation, or of the UNet (before that step's validation grid and
    export): ``--resume_from_checkpoint latest`` continues that stage and ends with the UNet and the VAE bit-identical
    to the run never killed."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    script = str(Path(__file__).resolve().parents[1] / "train_scripts" / "train_latent.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", kill_after_checkpoint(stage, 2), script]
    done = subprocess.run(command + adapting_flags(colour_folder, vae_dir, out), env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, (done.stdout + done.stderr)[-3000:]
    assert (out / ADAPTED_VAE_DIR / "checkpoint-2").is_dir() and not (out / "pipeline").exists()
    assert (out / ADAPTED_VAE_DIR / "vae" / "config.json").is_file() == (stage == "out")  # killed where asked
    assert (out / "checkpoint-2").is_dir() == (stage == "out")

    capsys.readouterr()
    folder = run_adapting(colour_folder, vae_dir, out, "--resume_from_checkpoint", "latest")
    log = capsys.readouterr().out
    stage_dir = out / stage if stage == ADAPTED_VAE_DIR else out
    assert f"Resumed from {stage_dir / 'checkpoint-2'} at step 2" in log, log[-2000:]  # not restarted from scratch
    assert ("reusing the VAE adapted" in log) == (stage == "out")
    for component in ("vae", "unet"):
        a, b = _weights(uninterrupted_adapting_run, component), _weights(folder, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"the {component} diverged"
    # the comparison can fail: each stage's weights moved on after its checkpoint-2
    norm = lambda tensors: sum(t.double().pow(2).sum().item() for t in tensors)  # noqa: E731
    for checkpoint, component in ((out / ADAPTED_VAE_DIR / "checkpoint-2", "vae"), (out / "checkpoint-2", "unet")):
        at_two = load_file(checkpoint / "ema.safetensors")
        assert len(at_two) == len(_weights(folder, component))
        assert norm(at_two.values()) != norm(_weights(folder, component).values()), component


def test_a_resumed_budgeted_run_keeps_its_first_parts_steps_unet_and_learning_rate(tmp_path):
    """A budgeted main job resumes with the steps and UNet rung its first part chose, and with the default learning
    rate those give (it used to keep the rate of the default run's steps, so the saved config misstated it)."""
    from accelerate import Accelerator

    from crispdiff.core.flags import parse_config
    from crispdiff.latent.trainer import MAIN_JOB_LADDER, main_job_learning_rate
    from crispdiff.train.checkpoint import STATE_FILE
    from crispdiff.train.unet_trainer import budgeted_values

    out = tmp_path / "out"
    medium = MAIN_JOB_LADDER[1].flags
    (out / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoint-100" / STATE_FILE).write_text("{}")
    (out / "crispdiff_training.json").write_text(json.dumps({**medium, "max_train_steps": 4000}))
    flags = ["--output_dir", str(out), "--time_budget_minutes", "30", "--resume_from_checkpoint", "latest"]
    decided = budgeted_values(parse_config(LatentTrainConfig, flags), None, Accelerator(cpu=True), None)
    assert decided == {**medium, "max_train_steps": 4000, "learning_rate": main_job_learning_rate(4000, 48)}
    chosen = parse_config(LatentTrainConfig, [*flags, "--learning_rate", "1e-3"])
    assert "learning_rate" not in budgeted_values(chosen, None, Accelerator(cpu=True), None)  # the user's rate stays
