"""Sample grids of the UNet trainers: what they hold, what they may cost, and that --num_validation_images 0 turns
them off (crispdiff.train.grids)."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image
from test_latent import image_dir, make_config, vae_dir  # noqa: F401 - fixtures
from test_training import image_folder, tiny_config  # noqa: F401 - fixture

from crispdiff.core.config import TrainConfig
from crispdiff.latent.trainer import train_latent
from crispdiff.publish.export import load_pipeline
from crispdiff.train.grids import GridPlan, affordable_grid, class_tiles, plan_grid
from crispdiff.train.unet_trainer import train


def test_a_grid_over_budget_loses_steps_then_images_down_to_the_floors():
    assert affordable_grid(16, 25, passes=1, budget=400) == (16, 25)  # within budget: as asked
    assert affordable_grid(16, 25, passes=2, budget=400) == (16, 12)  # 12 steps x 16 images x 2 passes = 384
    assert affordable_grid(16, 25, passes=2, budget=200) == (10, 10)  # steps at their floor, then images
    assert affordable_grid(40, 25, passes=2, budget=9.6) == (4, 10)  # the floors, even above the budget
    assert affordable_grid(2, 3, passes=2, budget=1) == (2, 3)  # never more than asked


def test_class_tiles_give_rows_per_class_or_classes_spread_over_the_ids():
    assert class_tiles(16, 3) == ([k for k in range(3) for _ in range(6)], 6)  # ceil(16 / 3) per row
    assert class_tiles(2, 3) == ([k for k in range(3) for _ in range(4)], 4)  # at least 4 per row
    assert class_tiles(16, 90) == (list(range(90)), None)  # many classes: one tile each, square
    assert class_tiles(10, 3, fit=True) == ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3)  # shrunk: at most 10 tiles
    assert class_tiles(4, 90, fit=True) == ([0, 30, 59, 89], None)
    assert class_tiles(1, 90, fit=True) == ([0], None)


def test_only_a_grid_the_user_did_not_size_is_shrunk():
    config = TrainConfig()
    assert plan_grid(config, None, 1e9) == GridPlan(16, 25)
    shrunk = plan_grid(config, None, 2 * 4 * 3)  # 2 steps of 4 images: a tenth of that is 2.4 evaluations
    assert (shrunk.count, shrunk.steps, shrunk.shrunk_from) == (4, 10, (16, 25))
    assert "shrunk from 16 x 25" in shrunk.describe()

    guided = plan_grid(config, ["a", "b", "c"], 2 * 4 * 3)  # 18 tiles -> 4 images: one row of three classes
    assert (guided.labels, guided.nrow, guided.guided) == ([0, 1, 2], None, True)
    assert guided.unet_evaluations == 3 * 10 * 2
    unguided = plan_grid(dataclasses.replace(config, guidance_scale=1.0), ["a", "b"], 1e9)
    assert not unguided.guided and unguided.labels == [0] * 8 + [1] * 8
    # autoguidance's guide model is one more pass a step, with or without classes (it used to go uncounted)
    autoguided = plan_grid(dataclasses.replace(config, autoguidance_scale=1.5), None, 1e9)
    assert autoguided.passes == 2 and "2 UNet passes a step" in autoguided.describe()
    both = plan_grid(dataclasses.replace(config, autoguidance_scale=1.5), ["a", "b"], 1e9)
    assert both.unet_evaluations == 16 * 25 * 3

    config.explicit_flags = frozenset({"num_validation_images"})  # --num_validation_images 16 was typed
    assert plan_grid(config, None, 24) == GridPlan(16, 25)
    assert plan_grid(dataclasses.replace(config, validation_inference_steps=5), None, 24).shrunk_from is None
    assert plan_grid(dataclasses.replace(config, num_validation_images=0), None, 1e9).count == 0


def test_a_short_run_shrinks_its_default_grid_and_says_so(image_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    config = tiny_config(
        image_folder, out, max_train_steps=2, checkpointing_steps=0, num_validation_images=None,
        validation_inference_steps=None,
    )  # fmt: skip
    train(config)
    log = capsys.readouterr().out
    assert "final sample grid: 4 images x 10 steps, shrunk from 16 x 25" in log, log
    assert Image.open(out / "pipeline" / "samples.png").size == (2 * 16, 2 * 16)


def test_num_validation_images_0_turns_every_grid_off(image_folder, tmp_path, capsys):  # noqa: F811
    """Pixel run, validation due on every step: no grid anywhere, a pipeline without samples.png that still loads."""
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, max_train_steps=2, validation_steps=1, num_validation_images=0))
    assert not (out / "samples").exists() and not (out / "pipeline" / "samples.png").exists()
    assert "## Samples" not in (out / "pipeline" / "README.md").read_text()
    assert "sample grid" not in capsys.readouterr().out
    pipe = load_pipeline(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("budget", [None, 0.2])
def test_latent_run_without_grids(image_dir, vae_dir, tmp_path, budget):  # noqa: F811
    """The latent trainer with --num_validation_images 0, also with --time_budget_minutes (which times the grid)."""
    config = make_config(
        image_dir, vae_dir, tmp_path, num_validation_images=0, validation_steps=1, time_budget_minutes=budget
    )
    config = config.resolve()
    folder = train_latent(config)
    assert folder is not None and (folder / "model_index.json").is_file()
    assert not (folder / "samples.png").exists() and not (tmp_path / "out" / "samples").exists()
