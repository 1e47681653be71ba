"""Train at 128 px, or train at 64 px and upsample? Three ways to get 128 px emoji at an equal CPU budget.

    nice -n 5 python benchmarks/studies/bench_64_vs_128.py --minutes 10 --no_record       # ~1 hour on 2 cores
    python benchmarks/studies/bench_64_vs_128.py --resample_sr_only --sr_model NEW_SR --no_record   # row (a), other SR

Rows, all trained on ``diffusion_train`` of ``own_data.make_128_split`` (932 Noto emoji at 128 px, no metadata):

* ``a``: ``train_latent.py`` (the main job's defaults) at ``--resolution 64`` (the data pipeline resizes), its raw
  64 px samples upscaled x2 by an SR model (``--sr_model``; default: the embedded
  ``crispdiff/assets/sr-noto-x2`` once it ships, else Lanczos), then the pipeline's own
  post-processing, exactly what ``pipe(upscale=True)`` does after ``crispdiff add-sr``;
* ``b``: ``train_latent.py --resolution 128``: the embedded f=4 VAE gives 8x32x32 latents; the UNet keeps the main
  job's widths with self-attention at its lowest level (8x8, as the main job's is at 4x4 for 16x16 latents);
* ``c``: ``train_unconditional.py --resolution 128``: a small pixel UNet (base 32 x [1, 2, 2, 4], attention at
  16 px, batch 16, the CPU recipe of RESULTS' "Latent vs pixel at an equal wall-clock budget" plus one level and
  the 128 px ``--snr_shift``).

Equal budget, whatever else the machine is doing: wall clock is unfair on shared cores, so a probe first times each
config's real ``UNetTrainer.optimizer_step`` in *process CPU time* (all three back to back, ``--probe_rounds`` rounds,
median) and the export (the final sample grid: the library's ``sampling_seconds`` estimate x its
``EXPORT_MARGIN``), then each row trains a fixed ``--max_train_steps`` = (budget - export - validation grids) /
CPU-s per step. CPU time is measured with OpenMP's passive waits (``OMP_WAIT_POLICY=PASSIVE``, set here and inherited
by the trainers), else threads spinning for a descheduled partner would bill the load to the row. The budget covers
UNet optimizer steps (EMA included), validation grids and the export; VAE adaptation is off in both latent rows
(``--adapt_vae off``); image decoding and latent encoding (cached, done once per dataset) and the SR model's own
training are outside it. Every row also reports the CPU-minutes its training process really used, launch to saved
pipeline (``getrusage`` of the children): a probe taken on a heavily loaded machine overestimated the 128 px rows'
step cost (first run: they used 7.5-7.9 of 10 CPU-minutes, row a 9.9), so probe on a quiet machine when you can,
and read that column before the others.

Evaluation at 128 px against the split's ``heldout`` folder: the same ``--num_images`` for every row and the floor
(the ``floor`` folder vs ``heldout``), ``crispdiff.evaluate.metrics.compute_all`` (multi-scale SWD, sharpness ratios,
colour blob) on both. Sampling: DPM-Solver++ 25 steps (the SR step included for row a), timed as process CPU ms per
image (about twice the wall ms of an idle 2-core machine) and as the wall ms it took here (load-dependent). Row (a)
keeps its raw 64 px samples (``samples64.pt``, uint8), so ``--resample_sr_only`` re-applies a new SR model without
retraining. Each row writes ``result.json`` under ``--out_dir``; reruns skip finished rows.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: its threads then sleep instead of spinning while they wait. On cores shared with other
# jobs a spinning thread burns CPU time waiting for its descheduled partner (measured here: 4.4-6.5 CPU-s per step of
# row a's trainer against 0.55 with passive waits), which would make CPU time as unfair a budget as wall time.
# The trainers started from here inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, bench_own_data, own_data
from bench_own_data import LAUNCH, run  # noqa: E402
from common import BENCH_DIR, REPO_ROOT, append_results, machine, markdown_table  # noqa: E402
from own_data import make_128_split  # noqa: E402

#: The SR model row (a) uses when ``--sr_model`` is not given: the embedded emoji SR x2 once it ships, else Lanczos.
DEFAULT_SR = REPO_ROOT / "crispdiff" / "assets" / "sr-noto-x2"
LANCZOS = "lanczos"


def sr_tag(sr_model: str) -> str:
    """A short name of an SR model for file names and captions (a component folder ``X/sr_model`` is ``X``)."""
    path = Path(sr_model)
    return path.parent.name if path.name == "sr_model" else path.stem


@dataclass(frozen=True)
class Row:
    """One way to 128 px: a trainer script, its resolution and its flags (data, seed and steps are added)."""

    key: str
    label: str
    script: str
    resolution: int
    flags: list[str] = field(default_factory=list)
    sr: bool = False

    @property
    def latent(self) -> bool:
        return self.script.endswith("train_latent.py")


ROWS = {
    "a": Row("a", "latent 64 px + SR x2", "train_scripts/train_latent.py", 64, ["--adapt_vae", "off"], sr=True),
    "b": Row(
        "b", "latent 128 px", "train_scripts/train_latent.py", 128, ["--adapt_vae", "off", "--attention_res", "8"]
    ),
    "c": Row(
        "c",
        "pixel 128 px",
        "train_scripts/train_unconditional.py",
        128,
        [
            "--base_channels",
            "32",
            "--channel_mults",
            "1",
            "2",
            "2",
            "4",
            "--attention_res",
            "16",
            "--layers_per_block",
            "1",
            "--dropout",
            "0",
            "--train_batch_size",
            "16",
            "--learning_rate",
            "5e-4",
            "--lr_warmup_steps",
            "20",
            "--ema_power",
            "0.6667",
            "--snr_shift",
            "-1.386",
        ],
    ),
}


def row_flags(row: Row, data_dir: Path, threads: int, seed: int) -> list[str]:
    """The trainer flags of ``row`` without ``--max_train_steps`` and ``--output_dir``."""
    return [
        "--train_data_dir",
        str(data_dir),
        "--resolution",
        str(row.resolution),
        "--seed",
        str(seed),
        "--cpu_threads",
        str(threads),
        *row.flags,
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Probe: CPU seconds per optimizer step and per export, for every row


def build_trainer(row: Row, flags: list[str], output_dir: str) -> Any:
    """A throwaway trainer built as the row's training script builds it (a ``UNetTrainer`` on the same space)."""
    from crispdiff.core.config import TrainConfig
    from crispdiff.core.flags import parse_config
    from crispdiff.data.loading import load_images
    from crispdiff.latent.space import build_latent_space
    from crispdiff.latent.trainer import LatentTrainConfig
    from crispdiff.train.process import make_accelerator
    from crispdiff.train.spaces import PixelSpace
    from crispdiff.train.unet_trainer import UNetTrainer
    from crispdiff.vae.adapt import prepare_vae

    config = parse_config(LatentTrainConfig if row.latent else TrainConfig, [*flags, "--output_dir", output_dir])
    accelerator = make_accelerator(config)
    if row.latent:
        data = load_images(config, for_latents=True, show_progress=False)
        vae, _ = prepare_vae(config, data, accelerator)
        space = build_latent_space(config, vae, data=data, show_progress=False)  # also warms the latent cache
    else:
        space = PixelSpace(load_images(config, show_progress=False))
    torch.manual_seed(config.seed)
    return UNetTrainer(config, space, accelerator)


def probe(rows: list[Row], data_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """CPU and wall seconds per optimizer step (median over rounds of all rows back to back) and per export."""
    from crispdiff.train.time_budget import EXPORT_MARGIN, PROBE_WARMUP_STEPS

    path = Path(args.out_dir) / "probe.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    todo = [row for row in rows if row.key not in saved]
    if not todo:
        return saved
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {row.key: build_trainer(row, row_flags(row, data_dir, args.threads, args.seed), tmp) for row in todo}
        for trainer in trainers.values():
            for _ in range(PROBE_WARMUP_STEPS):
                trainer.optimizer_step()
        cpu: dict[str, list[float]] = {key: [] for key in trainers}
        wall: dict[str, list[float]] = {key: [] for key in trainers}
        for _ in range(args.probe_rounds):
            for key, trainer in trainers.items():
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(args.probe_steps):
                    trainer.optimizer_step()
                cpu[key].append((time.process_time() - c0) / args.probe_steps)
                wall[key].append((time.perf_counter() - w0) / args.probe_steps)
        for key, trainer in trainers.items():
            c0, w0 = time.process_time(), time.perf_counter()
            grid_wall, _ = trainer.sampling_seconds()  # wall-clock estimate of the grid from 1- and 2-step calls
            cpu_per_wall = (time.process_time() - c0) / max(time.perf_counter() - w0, 1e-9)
            grid_cpu = grid_wall * cpu_per_wall
            saved[key] = {
                "cpu_s_per_step": statistics.median(cpu[key]),
                "wall_s_per_step": statistics.median(wall[key]),
                "cpu_s_per_step_rounds": cpu[key],
                "grid_cpu_s": grid_cpu,
                "export_cpu_s": EXPORT_MARGIN * grid_cpu,
                "validation_steps": trainer.config.validation_steps,
            }
            print(f"probe {key}: {saved[key]}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    return saved


def budget_steps(probed: dict[str, float], cpu_minutes: float) -> int:
    """UNet steps that fit ``cpu_minutes`` of process CPU time, export and validation grids included."""
    per_step = probed["cpu_s_per_step"]
    if probed["validation_steps"]:
        per_step += probed["grid_cpu_s"] / probed["validation_steps"]
    return max(10, int((60.0 * cpu_minutes - probed["export_cpu_s"]) / per_step))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling, SR and metrics


def children_cpu_s() -> float:
    """CPU seconds used so far by finished child processes (and their waited-for descendants)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def to_u8(images01: torch.Tensor) -> torch.Tensor:
    return images01.clamp(0, 1).mul(255).round().to(torch.uint8)


def sample(pipeline_dir: Path, num_images: int, raw: bool, batch_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """``num_images`` DPM-Solver++ 25-step samples (uint8) as ``crispdiff evaluate`` draws them (seed 0 + i, the
    class mix of an auto-class model); ``raw``: without the pipeline's post-processing (it follows the SR step)."""
    from crispdiff.evaluate.sampling import NO_POSTPROCESS, generate_samples
    from crispdiff.publish.export import load_pipeline

    pipeline = load_pipeline(pipeline_dir, sampler="dpmsolver++", device="cpu")
    c0, w0 = time.process_time(), time.perf_counter()
    images = generate_samples(
        pipeline,
        num_images,
        steps=25,
        seed=0,
        batch_size=batch_size,
        upscale=False,
        postprocess=NO_POSTPROCESS if raw else None,
    )
    timing = {
        "cpu_ms": 1e3 * (time.process_time() - c0) / num_images,
        "wall_ms": 1e3 * (time.perf_counter() - w0) / num_images,
    }
    return to_u8(images), timing


def upscale(raw64: torch.Tensor, pipeline_dir: Path, sr_model: str, strength: float) -> tuple[torch.Tensor, dict]:
    """SR x2 of raw 64 px samples (Lanczos for ``lanczos``), then the pipeline's post-processing: what
    ``pipe(upscale=True)`` returns once the SR model is attached."""
    from crispdiff.publish.export import load_pipeline
    from crispdiff.superres.load import load_sr_model
    from crispdiff.superres.metrics import lanczos_upscale

    pipeline = load_pipeline(pipeline_dir, device="cpu")
    model = None if sr_model == LANCZOS else load_sr_model(sr_model, tile_size=None, device="cpu").eval()
    out = []
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(raw64), 32):
            low = raw64[start : start + 32].float() / 255.0
            up = lanczos_upscale(low, 2 * low.shape[-1]) if model is None else model.upscale(low, strength)
            out.append(to_u8(pipeline.postprocess(up.float().clamp(0, 1))))
    timing = {
        "cpu_ms": 1e3 * (time.process_time() - c0) / len(raw64),
        "wall_ms": 1e3 * (time.perf_counter() - w0) / len(raw64),
    }
    return torch.cat(out), timing


def reference_sets(split: dict[str, Path], num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` held-out and ``num_images`` floor images at 128 px (seeded subsets when fewer than all)."""
    from crispdiff.evaluate.evaluation import load_reference

    sets = []
    for name in ("heldout", "floor"):
        images = load_reference(str(split[name]), 128)
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_images]
        sets.append(images[pick.sort().values])
    return sets[0], sets[1]


def measure(reference: torch.Tensor, images: torch.Tensor, seed: int) -> dict[str, float]:
    """crispdiff's metrics of ``images`` against ``reference`` (no memorisation, no FID: offline, like the others)."""
    from crispdiff.evaluate.metrics import compute_all

    return compute_all(reference, images, seed=seed)


def floor_metrics(reference: torch.Tensor, floor: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.out_dir) / f"floor-{args.num_images}.json"
    if path.is_file():
        return json.loads(path.read_text())
    metrics = measure(reference, floor, args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Rows


def row_dir(args: argparse.Namespace, row: Row, minutes: float) -> Path:
    return Path(args.out_dir) / f"{minutes:g}min" / row.key


def train(row: Row, minutes: float, steps: int, data_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """Train ``row`` for ``steps`` (resumed from a finished pipeline if there is one); returns its training figures."""
    info_path = out / "training.json"
    if info_path.is_file() and (out / "run" / "pipeline").is_dir():
        return json.loads(info_path.read_text())
    flags = [*row_flags(row, data_dir, args.threads, args.seed), "--max_train_steps", str(steps)]
    command = [*LAUNCH, row.script, *flags, "--output_dir", str(out / "run")]
    before = children_cpu_s()
    wall = run(command, out / "train.log")
    info = {
        "steps": steps,
        "cpu_min_used": (children_cpu_s() - before) / 60.0,
        "wall_min": wall / 60.0,
        "command": "accelerate launch " + " ".join([row.script, *flags]),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info


def evaluate_row(
    row: Row, out: Path, refs: tuple[torch.Tensor, torch.Tensor], floor: dict, args: argparse.Namespace
) -> dict:
    """Sample (or reuse the saved samples), upscale row (a), measure; the JSON-ready result of the row."""
    pipeline_dir = out / "run" / "pipeline"
    native = out / ("samples64.pt" if row.sr else "samples128.pt")
    timing_path = out / "sampling.json"
    saved = torch.load(native) if native.is_file() and timing_path.is_file() else None
    if saved is not None and len(saved) >= args.num_images:  # image i is seeded seed + i: the first N are a run of N
        images, timing = saved[: args.num_images], json.loads(timing_path.read_text())
    else:
        images, timing = sample(pipeline_dir, args.num_images, raw=row.sr, batch_size=args.batch_size)
        torch.save(images, native)
        timing_path.write_text(json.dumps(timing))
    result: dict[str, Any] = {"sampling_cpu_ms": timing["cpu_ms"], "sampling_wall_ms": timing["wall_ms"]}
    if row.sr:
        sr_model = args.sr_model or (str(DEFAULT_SR) if DEFAULT_SR.is_dir() else LANCZOS)
        images, sr_timing = upscale(images, pipeline_dir, sr_model, args.sr_strength)
        torch.save(images, out / "samples128.pt")
        result.update(
            sr_model=sr_model,
            sr_strength=args.sr_strength if sr_model != LANCZOS else None,
            sr_cpu_ms=sr_timing["cpu_ms"],
            sr_wall_ms=sr_timing["wall_ms"],
        )
        result["sampling_cpu_ms"] += sr_timing["cpu_ms"]
        result["sampling_wall_ms"] += sr_timing["wall_ms"]
    metrics = measure(refs[0], images, args.seed)
    result.update(
        num_images=len(images),
        swd=metrics["swd_avg"],
        floor=floor["swd_avg"],
        ratio=metrics["swd_avg"] / floor["swd_avg"],
        hf=metrics["hf_energy_ratio"],
        laplacian=metrics["laplacian_var_ratio"],
        blob=metrics["colour_blob"],
        swd_levels={k: v for k, v in metrics.items() if k.startswith("swd_")},
    )
    return result


def row_label(result: dict[str, Any]) -> str:
    """The row's label, naming row (a)'s upscaler."""
    sr_model = result.get("sr_model")
    return result["label"] if sr_model is None else f"latent 64 px + {sr_tag(sr_model)} x2"


def write_picture(rows: list[tuple[str, Path]], path: Path, count: int = 16) -> None:
    """The first ``count`` 128 px samples of every row as 4x4 grids side by side, captioned."""
    from plots import labelled_side_by_side

    from crispdiff.core.images import make_grid

    panels = [(label, make_grid(torch.load(p)[:count], nrow=4, value_range=(0, 255))) for label, p in rows]
    labelled_side_by_side(panels, path, min_width=512)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0], help="CPU-minute budgets")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--splits_dir", default="/work/bench/splits", help="root of make_128_split")
    p.add_argument("--out_dir", default="/work/bench/cmp")
    p.add_argument("--num_images", type=int, default=1000, help="samples per row, and floor images")
    p.add_argument("--batch_size", type=int, default=32, help="sampling batch")
    p.add_argument(
        "--sr_model",
        default=None,
        help="row (a)'s SR model (file or folder; 'lanczos'); default crispdiff/assets/sr-noto-x2 if it exists",
    )
    p.add_argument("--sr_strength", type=float, default=1.0, help="SR blend with Lanczos (1 = the network alone)")
    p.add_argument(
        "--resample_sr_only",
        action="store_true",
        help="re-apply --sr_model to row (a)'s saved 64 px samples and re-measure; no training",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads here and --cpu_threads of the trainers")
    p.add_argument("--probe_rounds", type=int, default=3)
    p.add_argument("--probe_steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", default=str(BENCH_DIR / "64-vs-128.png"))
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    split = make_128_split(Path(args.splits_dir))
    rows = [ROWS[key] for key in args.rows]
    refs = reference_sets(split, args.num_images, args.seed)
    floor = floor_metrics(*refs, args)
    probed = {} if args.resample_sr_only else probe(rows, split["diffusion_train"], args)
    results = []
    for minutes in args.minutes:
        for row in rows:
            out = row_dir(args, row, minutes)
            if args.resample_sr_only:
                if not row.sr or not (out / "result.json").is_file():
                    continue
                done = json.loads((out / "result.json").read_text())
                if not (out / "samples64.pt").is_file():
                    sys.exit(f"{out}: no saved 64 px samples to upscale again")
                done.update(evaluate_row(row, out, refs, floor, args))
            elif (out / "result.json").is_file():
                done = json.loads((out / "result.json").read_text())
            else:
                out.mkdir(parents=True, exist_ok=True)
                steps = budget_steps(probed[row.key], minutes)
                done = {
                    "row": row.key,
                    "label": row.label,
                    "minutes": minutes,
                    **probed[row.key],
                    **train(row, minutes, steps, split["diffusion_train"], out, args),
                }
                done.update(evaluate_row(row, out, refs, floor, args))
            (out / "result.json").write_text(json.dumps(done, indent=2))
            if done.get("sr_model"):  # kept per SR model, so that re-applying another one loses nothing
                (out / f"result-{sr_tag(done['sr_model'])}.json").write_text(json.dumps(done, indent=2))
            print(json.dumps(done), flush=True)
            results.append(done)
    header = [
        "row",
        "CPU-min budget",
        "steps",
        "CPU-min used",
        "SWD x1e3",
        "floor",
        "SWD / floor",
        "hf",
        "Laplacian",
        "sampling CPU-ms/img",
        "sampling wall ms/img here",
    ]
    table = markdown_table(
        header,
        [
            [
                f"({r['row']}) {row_label(r)}",
                f"{r['minutes']:g}",
                r["steps"],
                f"{r['cpu_min_used']:.1f}",
                f"{r['swd']:.1f}",
                f"{r['floor']:.1f}",
                f"{r['ratio']:.2f}x",
                f"{r['hf']:.2f}",
                f"{r['laplacian']:.2f}",
                f"{r['sampling_cpu_ms']:.0f}",
                f"{r['sampling_wall_ms']:.0f}",
            ]
            for r in results
        ],
    )
    sr = next((f"{r['sr_model']} (strength {r['sr_strength']})" for r in results if r.get("sr_model")), "-")
    notes = (
        f"{args.num_images} samples per row (DPM-Solver++ 25) and {args.num_images} floor images (`floor` vs "
        f"`heldout`), 128 px; row (a) SR: {sr}; {machine()}, `--cpu_threads {args.threads}`, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. CPU-minutes: process CPU time (all threads)."
    )
    append_results(
        "Train at 128 px or at 64 px + SR x2, equal CPU budget (bench_64_vs_128.py)",
        table,
        notes,
        record=not args.no_record,
    )
    last = max(args.minutes)  # every row of the largest budget that has samples, this run's or an earlier one's
    grids = []
    for row in ROWS.values():
        out = row_dir(args, row, last)
        if (out / "result.json").is_file() and (out / "samples128.pt").is_file():
            label = row_label(json.loads((out / "result.json").read_text()))
            grids.append((f"({row.key}) {label}, {last:g} CPU-min", out / "samples128.pt"))
    if grids:
        write_picture(grids, Path(args.picture))


if __name__ == "__main__":
    main()
