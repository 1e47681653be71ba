"""Samplers: image quality and time per image against the number of sampler steps, on ONE trained model.

    python benchmarks/bench_samplers.py --train_steps 400                 # train a small model here, then sweep
    python benchmarks/bench_samplers.py --pipeline out/my-model/pipeline  # sweep an already trained pipeline

The default sweep is DPM-Solver++ 10/25/50, DDIM 50, UniPC 25 and DDPM 1000. Every sampler starts from the same
seeded noise, so the rows differ only in the sampler. Quality is measured without any downloaded network
(crispdiff.evaluate.metrics): multi-scale SWD, the generated / real sharpness ratios and the colour-blob indicator,
against one half of the reference data; the same metrics between the two disjoint halves (the real-vs-real floor) are
printed beside them, since that is what a perfect generator would read with this many images.

Writes into --out_dir (default benchmarks/out/samplers): samplers.md (table), samplers.json (all numbers),
samplers.png (curves; needs matplotlib), grids.png (one sample grid per sampler, side by side), grids/*.png; and
appends the table to benchmarks/RESULTS.md unless --no_record. The table and JSON are rewritten after every sampler,
so a run stopped by a timeout keeps the rows it finished.

The helpers here (training a model, the reference split, generating and measuring) are shared with bench_recipe.py.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import BENCH_DIR, REPO_ROOT, append_results, emoji_dir, machine, markdown_table, synchronize
from plots import labelled_side_by_side, plot_sampler_sweep, sampler_label

from crispdiff.core.config import TrainConfig
from crispdiff.core.io import write_text_atomic

DEFAULT_SWEEP = "dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddim:50,unipc:25,ddpm:1000"
QUALITY_HEADER = ["SWD avg x1e3", "SWD per level", "HF-energy ratio", "Laplacian-var ratio", "colour-blob"]
GRID_IMAGES = 16

# --------------------------------------------------------------------------------------------------------------------
# Flags shared by the quality benchmarks
# --------------------------------------------------------------------------------------------------------------------


def add_common_flags(parser: argparse.ArgumentParser, out_dir: str) -> None:
    """Data, model, training and evaluation flags that bench_samplers and bench_recipe share.

    The defaults are a small model that trains and samples in minutes on a CPU; benchmarks/gpu/run.sh passes a
    realistic one.
    """
    data = parser.add_argument_group("data and model")
    data.add_argument("--data_dir", default=None, help="image folder (default: ../shared emoji, else embedded subset)")
    data.add_argument("--resolution", type=int, default=32)
    data.add_argument("--base_channels", type=int, default=16)
    data.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2])
    data.add_argument("--attention_res", type=int, nargs="*", default=[8])
    data.add_argument("--layers_per_block", type=int, default=1)
    data.add_argument("--dropout", type=float, default=0.0, help="0 suits short runs; long runs may want 0.1")
    train = parser.add_argument_group("training (crispdiff's loop)")
    train.add_argument("--train_steps", type=int, default=400, help="optimizer steps per trained model")
    train.add_argument("--train_batch_size", type=int, default=32)
    train.add_argument("--learning_rate", type=float, default=2e-4)
    train.add_argument("--lr_warmup_steps", type=int, default=100, help="capped at half the training steps")
    train.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data order, sampling noise and metrics")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--num_images",
        type=int,
        default=64,
        help="samples per row; capped at half the reference set (the other half is the floor's second set)",
    )
    evaluation.add_argument("--sample_batch_size", type=int, default=64, help="images per pipeline call")
    evaluation.add_argument(
        "--sample_dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="UNet weights while sampling"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out_dir", default=str(BENCH_DIR / "out" / out_dir), help="where tables, plots, grids go")
    output.add_argument("--no_record", action="store_true", help="do not append to benchmarks/RESULTS.md")


def parse_sweep(text: str, flag: str = "--samplers") -> list[tuple[str, int]]:
    """'dpmsolver++:25,ddim:50' -> [('dpmsolver++', 25), ('ddim', 50)], with an error naming the flag."""
    from crispdiff.pipelines.pipeline_crispdiff import SAMPLERS

    sweep = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, steps = item.rpartition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(
                f"{flag}: {item!r} is not SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLERS)} and STEPS >= 1 "
                f"(example: {DEFAULT_SWEEP})"
            )
        sweep.append((name, int(steps)))
    if not sweep:
        raise SystemExit(f"{flag} is empty; example: {DEFAULT_SWEEP}")
    return sweep


def device() -> torch.device:
    """The GPU when there is one. TF32 is allowed for sampling there: it is what a user's pipeline call gets."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


# fp32 is None: the weights as saved (fp32), without a cast that diffusers warns about.
SAMPLE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, data_dir: str, output_dir: Path, **recipe: Any) -> TrainConfig:
    """The TrainConfig for one benchmark model: the shared flags, plus `recipe` (noise schedule, objective ...).

    Checkpoints and intermediate validation are off (they would only cost time); the exported pipeline carries the
    EMA weights and a 16-image sample grid, as for any crispdiff run.
    """
    return TrainConfig(
        train_data_dir=data_dir,
        resolution=args.resolution,
        base_channels=args.base_channels,
        channel_mults=list(args.channel_mults),
        attention_res=list(args.attention_res),
        layers_per_block=args.layers_per_block,
        dropout=args.dropout,
        train_batch_size=args.train_batch_size,
        max_train_steps=args.train_steps,
        learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        report_to="none",
        checkpointing_steps=0,
        validation_steps=0,
        **recipe,
    )


@dataclass
class TrainedModel:
    pipeline_dir: Path
    seconds: float
    steps: int
    batch_size: int

    @property
    def images_per_second(self) -> float:
        """Training images per second over the whole run (data loading and the final export included)."""
        return self.steps * self.batch_size / max(self.seconds, 1e-9)


def train_model(config: TrainConfig) -> TrainedModel:
    """Train with crispdiff's own loop (crispdiff.train.unet_trainer.train) and time it."""
    from crispdiff.train.unet_trainer import train

    start = time.perf_counter()
    pipeline_dir = train(config)
    seconds = time.perf_counter() - start
    if pipeline_dir is None:
        raise RuntimeError(f"training into {config.output_dir} returned no pipeline folder")
    return TrainedModel(Path(pipeline_dir), seconds, int(config.max_train_steps or 0), config.train_batch_size)


# --------------------------------------------------------------------------------------------------------------------
# Reference data and the real-vs-real floor
# --------------------------------------------------------------------------------------------------------------------


def load_reference(data_dir: str, resolution: int) -> torch.Tensor:
    """All reference images as uint8 [N, 3, R, R]: crispdiff's own decoding (alpha composited onto white, resized
    like the training data), centre-cropped. Shares the decode cache with training, so it costs nothing twice."""
    from crispdiff.data.loading import load_images

    config = TrainConfig(train_data_dir=data_dir, resolution=resolution)
    return load_images(config, show_progress=False).center_crops()


@dataclass
class Reference:
    """The 'real' side of every comparison (half A of the reference data) and the floor (half B against half A)."""

    real: torch.Tensor
    floor: dict[str, Any]

    @property
    def num_images(self) -> int:
        return len(self.real)


def prepare_reference(images: torch.Tensor, num_images: int, seed: int) -> Reference:
    """Split the reference into disjoint halves A and B of `num_images` each (capped at half the set).

    Generated images are compared with A, and B with A gives the floor, so both read the same sample-size bias.
    """
    from crispdiff.evaluate.metrics import real_vs_real_floor, split_reference

    count = min(num_images, len(images) // 2)
    if count < num_images:
        print(f"--num_images {num_images} capped at {count}: half of the {len(images)} reference images")
    a_index, _ = split_reference(len(images), count, seed=seed)
    floor = real_vs_real_floor(images, num_images=count, seed=seed, memorisation=False)
    return Reference(images[a_index], floor)


def read_training_config(pipeline_dir: Path) -> dict[str, Any]:
    """The pipeline's crispdiff_training.json ({} for a pipeline saved without one)."""
    path = pipeline_dir / "crispdiff_training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def data_dir_for(args: argparse.Namespace, pipeline_dir: Path | None = None) -> str:
    """--data_dir, else the folder the pipeline was trained on (when it still exists), else the emoji set."""
    if args.data_dir:
        return args.data_dir
    if pipeline_dir is not None:
        trained_on = read_training_config(pipeline_dir).get("train_data_dir")
        if trained_on and Path(trained_on).is_dir():
            return trained_on
    return str(emoji_dir())


# --------------------------------------------------------------------------------------------------------------------
# Generating and measuring
# --------------------------------------------------------------------------------------------------------------------


def generate(
    call: Callable[[list[torch.Generator]], torch.Tensor], num_images: int, batch_size: int, seed: int
) -> tuple[torch.Tensor, float]:
    """`num_images` images in [0, 1] (CPU, NCHW) from `call(generators)` in batches, and milliseconds per image.

    Image i gets its own CPU generator seeded `seed + i` (as `crispdiff sample` and `crispdiff evaluate` do), so an
    image does not depend on the batch size or the device: every sampler, and a GPU run, starts from the same noise.
    The clock includes everything a user waits for (noise, every sampler step, decoding).
    """
    chunks = []
    synchronize()
    start = time.perf_counter()
    for first in range(0, num_images, batch_size):
        count = min(batch_size, num_images - first)
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
        chunks.append(call(generators).float().cpu())
    synchronize()
    milliseconds = (time.perf_counter() - start) * 1e3 / num_images
    return torch.cat(chunks), milliseconds


def pipeline_sampler(pipeline: Any, sampler: str, steps: int) -> Callable[[list[torch.Generator]], torch.Tensor]:
    """A `generate` callable: a CrispDiffPipeline call with `sampler` at `steps`, one generator per image."""

    def call(generators: list[torch.Generator]) -> torch.Tensor:
        return pipeline(
            batch_size=len(generators),
            num_inference_steps=steps,
            generator=generators,
            sampler=sampler,
            output_type="pt",
        ).images

    return call


def measure(reference: Reference, images01: torch.Tensor, seed: int) -> dict[str, Any]:
    """SWD (per level and mean), the sharpness ratios and the colour-blob indicator against half A."""
    from crispdiff.evaluate.metrics import compute_all

    return compute_all(reference.real, images01, seed=seed)


def quality_cells(metrics: dict[str, Any]) -> list[object]:
    """The QUALITY_HEADER columns of one row."""
    levels = sorted((k for k in metrics if k.startswith("swd_") and k[4:].isdigit()), key=lambda k: -int(k[4:]))
    per_level = " / ".join(f"{k[4:]}px {metrics[k]:.1f}" for k in levels)
    return [
        metrics["swd_avg"],
        per_level,
        metrics["hf_energy_ratio"],
        metrics["laplacian_var_ratio"],
        metrics["colour_blob"],
    ]


def save_grid(images01: torch.Tensor, path: Path) -> Any:
    """The first GRID_IMAGES images as one grid PNG (written atomically); returns the PIL image."""
    from crispdiff.core.images import make_grid, save_image_atomic

    grid = make_grid(images01[:GRID_IMAGES], value_range=(0.0, 1.0))
    save_image_atomic(grid, path)
    return grid


def display_path(path: Path) -> str:
    """`path` relative to the repository when inside it (RESULTS.md should not name one machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """Only plain numbers and strings (metrics may carry tensors)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


# --------------------------------------------------------------------------------------------------------------------
# The sampler sweep
# --------------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=None, help="a saved crispdiff pipeline folder (default: train one here)")
    p.add_argument("--samplers", default=DEFAULT_SWEEP, help="comma-separated SAMPLER:STEPS list, run in order")
    add_common_flags(p, out_dir="samplers")
    return p.parse_args()


def sweep_table(rows: list[dict[str, Any]], floor: dict[str, Any]) -> str:
    header = ["sampler", "steps", *QUALITY_HEADER, "ms / image"]
    body = [[sampler_label(r["sampler"]), r["steps"], *quality_cells(r), r["ms_per_image"]] for r in rows]
    body.append(["real vs real (floor)", "-", *quality_cells(floor), "-"])
    return markdown_table(header, body)


def obtain_pipeline(args: argparse.Namespace, out_dir: Path) -> tuple[Path, TrainedModel | None]:
    """--pipeline as given, or a model of crispdiff's default recipe trained here into OUT_DIR/model."""
    if args.pipeline:
        return Path(args.pipeline), None
    data_dir = data_dir_for(args)
    print(f"training crispdiff's recipe for {args.train_steps} steps on {data_dir} ...")
    trained = train_model(train_config(args, data_dir, out_dir / "model"))
    print(f"trained in {trained.seconds:.1f} s ({trained.images_per_second:.1f} img/s): {trained.pipeline_dir}")
    return trained.pipeline_dir, trained


def describe_model(pipeline: Any, pipeline_dir: Path) -> str:
    """'UNet 280.8K parameters, 32 px, cosine schedule, v_prediction, min-SNR 5.0, 400 steps of 32 images'."""
    from crispdiff.diffusion.unets import count_parameters, describe_parameters

    training = read_training_config(pipeline_dir)
    return (
        f"UNet {describe_parameters(count_parameters(pipeline.unet))}, {pipeline.unet.config.sample_size} px, "
        f"{training.get('beta_schedule', '?')} schedule, {training.get('prediction_type', '?')}, "
        f"min-SNR {training.get('snr_gamma', '?')}, {training.get('max_train_steps', '?')} steps of "
        f"{training.get('train_batch_size', '?')} images"
    )


def run_sweep(
    pipeline: Any, sweep: list[tuple[str, int]], reference: Reference, args: argparse.Namespace, info: dict[str, Any]
) -> list[dict[str, Any]]:
    """Sample and measure every SAMPLER:STEPS in order, rewriting samplers.md / samplers.json after each one, and
    finish with the side-by-side grids (real images first) and the curves."""
    out_dir = Path(args.out_dir)
    rows: list[dict[str, Any]] = []
    panels = [("real (reference half A)", save_grid(reference.real.float() / 255.0, out_dir / "grids" / "real.png"))]
    for sampler, steps in sweep:
        call = pipeline_sampler(pipeline, sampler, steps)
        images, ms = generate(call, reference.num_images, args.sample_batch_size, args.seed)
        metrics = measure(reference, images, args.seed)
        rows.append({"sampler": sampler, "steps": steps, "ms_per_image": ms, **json_ready(metrics)})
        label = sampler_label(sampler, steps)
        panels.append((label, save_grid(images, out_dir / "grids" / f"{sampler}-{steps}.png")))
        print(
            f"{label:>18}: SWD {metrics['swd_avg']:.2f}  HF {metrics['hf_energy_ratio']:.3f}  "
            f"LapVar {metrics['laplacian_var_ratio']:.3f}  blob {metrics['colour_blob']:.3f}  {ms:.2f} ms/image"
        )
        write_text_atomic(out_dir / "samplers.md", sweep_table(rows, reference.floor) + "\n")
        result = {**info, "floor": json_ready(reference.floor), "rows": rows}
        write_text_atomic(out_dir / "samplers.json", json.dumps(result, indent=2) + "\n")
    labelled_side_by_side(panels, out_dir / "grids.png")
    plot_sampler_sweep(rows, reference.floor, out_dir / "samplers.png")
    return rows


def main() -> None:
    args = parse_args()
    sweep = parse_sweep(args.samplers)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_device = device()
    pipeline_dir, trained = obtain_pipeline(args, out_dir)

    from crispdiff.publish.export import load_pipeline

    pipeline = load_pipeline(pipeline_dir, device=run_device, dtype=SAMPLE_DTYPES[args.sample_dtype])
    pipeline.set_progress_bar_config(disable=True)
    resolution = int(pipeline.unet.config.sample_size)
    data_dir = data_dir_for(args, pipeline_dir)
    reference = prepare_reference(load_reference(data_dir, resolution), args.num_images, args.seed)
    print(f"reference: {data_dir} at {resolution} px; {reference.num_images} samples per row")
    # One short call first, so that one-off start-up costs (allocations, kernel selection) are not billed to the
    # first sampler's time per image.
    pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")

    model_text = describe_model(pipeline, pipeline_dir)
    info = {
        "machine": machine(),
        "pipeline": str(pipeline_dir),
        "data_dir": data_dir,
        "model": model_text,
        "num_images": reference.num_images,
        "seed": args.seed,
        "sample_dtype": args.sample_dtype,
        "training_seconds": trained.seconds if trained else None,
        "training_images_per_second": trained.images_per_second if trained else None,
    }
    rows = run_sweep(pipeline, sweep, reference, args, info)
    table = sweep_table(rows, reference.floor)
    notes = (
        f"{model_text}; trained on {data_dir}"
        + (f" in {trained.seconds:.0f} s" if trained else "")
        + f". {reference.num_images} samples per sampler from the same seeded noise, {args.sample_dtype} UNet, "
        f"vs {reference.num_images} real images; the floor row compares two disjoint real halves of that size. "
        "SWD x1e3 (lower is better); sharpness ratios generated / real (1 = as sharp as the data, < 1 blurry, "
        "> 1 noisy); colour-blob 0 = like the data. "
        f"Grids and curves: {display_path(out_dir)}/grids.png, samplers.png."
    )
    append_results("Samplers: quality and time per image vs steps", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
