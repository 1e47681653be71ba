"""The SR post-step: its quality against Lanczos and bicubic on held-out emoji, and its cost.

    python benchmarks/bench_sr.py --threads 2 quality --sr_model embedded
    python benchmarks/bench_sr.py --threads 2 speed --sr_model embedded
    python benchmarks/bench_sr.py --threads 1 cost --resolution 64 --batch_size 2

``quality``: SR x2 of 64 px inputs (made from the 128 px originals by crispdiff's data-pipeline resize, as the
diffusion side's training images are) against those originals: mean per-image PSNR, SSIM, and the hf / Laplacian
ratios of ``crispdiff evaluate``, beside Lanczos (what the pipeline returns without SR) and bicubic, and CPU ms per
image; on 1,000 held-out Noto emoji (``own_data.make_128_split``, never seen by the embedded SR) and 1,000 OpenMoji
(a design family it never saw; CC-BY-SA-4.0, credit "OpenMoji").

``generated``: what the issue is about: a trained pipeline's own 64 px samples (drawn once with ``upscale=False``
and no post-processing, cached), upscaled by each upscaler and then post-processed as ``pipe(upscale=True)`` does,
against held-out 128 px images of the family, beside the real-vs-real floor of two disjoint sets of the same size:
multi-scale SWD (levels 128 / 64 / 32 / 16), the hf / Laplacian ratios, and ms per image of the upscaler alone.

``cost``: the diffusion side is a CrispDiffPipeline around a UNet of the given size sampling with DPM-Solver++
(25 steps, ``upscale=False``); the SR side is the pipeline's real SR component (``SpandrelSRModel.upscale`` with
``sr_strength=0.5``: network + Lanczos blend) around networks built at the published sizes of common checkpoints
(random weights: only the cost is measured). Each SR model runs untiled and with ``--tile_size`` / ``--tile_overlap``
(tiles in input pixels), timed in alternation so machine noise hits both.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path

import torch
from common import append_results, markdown_table, shared_dir, timed
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from crispdiff.core.config import DataConfig, NoiseConfig
from crispdiff.diffusion.schedule import scheduler_base_config
from crispdiff.diffusion.unets import build_unet
from crispdiff.pipelines.sr_model import SpandrelSRModel, tile_starts
from crispdiff.publish.export import build_pipeline, load_pipeline
from crispdiff.superres.data import downscale
from crispdiff.superres.load import load_sr_model
from crispdiff.superres.metrics import compare_upscalers, lanczos_upscale


def sr_networks(include_rrdb_x4: bool) -> dict[str, torch.nn.Module]:
    """Networks at the sizes of well-known checkpoints (names say which), random weights."""
    nets: dict[str, torch.nn.Module] = {
        "Compact x4 (realesr-general-x4v3 size)": Compact(num_feat=64, num_conv=32, upscale=4),
        "ESRGAN x2 unshuffle (RealESRGAN_x2plus size)": ESRGAN(
            in_nc=12, num_filters=64, num_blocks=23, scale=4, shuffle_factor=2
        ),
        "SwinIR-S x2 (lightweight, 4x6 blocks)": SwinIR(
            img_size=64,
            embed_dim=60,
            depths=[6, 6, 6, 6],
            num_heads=[6, 6, 6, 6],
            window_size=8,
            mlp_ratio=2.0,
            upscale=2,
            upsampler="pixelshuffledirect",
        ),
    }
    if include_rrdb_x4:
        nets["ESRGAN x4 (RealESRGAN_x4plus size)"] = ESRGAN(num_filters=64, num_blocks=23, scale=4)
    return nets


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality", help="SR x2 vs Lanczos / bicubic on held-out Noto and OpenMoji at 128 px")
    q.add_argument("--sr_model", default="embedded", help="SR folder / file, or 'embedded'")
    q.add_argument("--splits", type=Path, default=Path("bench-own-data"), help="where own_data writes its splits")
    q.add_argument("--num_images", type=int, default=1000)
    q.add_argument("--timing_batch", type=int, default=16, help="64 px images per timed SR call")
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--cache_dir", default=None, help="crispdiff's decode cache (default ~/.cache/crispdiff)")
    g = sub.add_parser("generated", help="a pipeline's 64 px samples upscaled by each upscaler vs held-out 128 px")
    g.add_argument("--pipeline", type=Path, required=True, help="a saved crispdiff pipeline folder (64 px)")
    g.add_argument("--family", choices=["noto", "openmoji"], default="noto", help="whose held-out 128 px images")
    g.add_argument(
        "--sr_models", nargs="+", default=["today=embedded"], help="NAME=PATH pairs (PATH: an SR folder or 'embedded')"
    )
    g.add_argument("--splits", type=Path, default=Path(__file__).parent / "out" / "own-data-splits")
    g.add_argument("--num_images", type=int, default=1000)
    g.add_argument("--batch_size", type=int, default=50, help="images per pipeline call")
    g.add_argument("--seed", type=int, default=0, help="seeds the samples")
    g.add_argument("--samples_cache", type=Path, default=None, help="default: PIPELINE/../samples64-s{seed}-n{N}.pt")
    g.add_argument("--grid", type=Path, default=None, help="write a comparison grid (8 samples) here")
    g.add_argument(
        "--sharpen_amounts", type=float, nargs="*", default=None,
        help="also rows with these unsharp-mask amounts after the upscale (default: only the pipeline's own)",
    )
    g.add_argument("--label", default=None, help="row label (default: the pipeline folder's parent name)")
    g.add_argument("--cache_dir", default=None, help="crispdiff's decode cache (default ~/.cache/crispdiff)")
    v = sub.add_parser("speed", help="CPU/GPU ms per 64 px image of an SR x2 model beside Lanczos, by batch size")
    v.add_argument("--sr_model", default="embedded", help="SR folder / file, or 'embedded'")
    v.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    v.add_argument("--rounds", type=int, default=2, help="alternating rounds; each times every batch size")
    v.add_argument("--repeats", type=int, default=5, help="calls per timing (the median is kept)")
    c = sub.add_parser("cost", help="the SR step's cost against 25-step sampling, random weights")
    c.add_argument("--resolution", type=int, default=64, help="sampled image size (the SR input)")
    c.add_argument("--base_channels", type=int, default=32)
    c.add_argument("--channel_mults", type=int, nargs="+", default=[1, 2, 2, 4])
    c.add_argument("--attention_res", type=int, nargs="+", default=[16])
    c.add_argument("--layers_per_block", type=int, default=1)
    c.add_argument("--batch_size", type=int, default=2)
    c.add_argument("--steps", type=int, default=25, help="sampler steps")
    c.add_argument("--tile_size", type=int, default=32, help="tile side in input pixels for the tiled runs")
    c.add_argument("--tile_overlap", type=int, default=8)
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--include_rrdb_x4", action="store_true", help="also time the heavy RealESRGAN_x4plus-size net")
    return p.parse_args()


def originals_128(folder: Path, cache_dir: str | None, count: int) -> torch.Tensor:
    """uint8 [N, 3, 128, 128]: ``count`` seeded images of ``folder`` decoded by crispdiff's data pipeline."""
    from crispdiff.data.loading import load_images

    config = DataConfig(train_data_dir=str(folder), resolution=128, center_crop=True, cache_dir=cache_dir)
    images = load_images(config, show_progress=False).center_crops()
    keep = sorted(random.Random(0).sample(range(len(images)), min(count, len(images))))
    return images[keep]


def quality(args: argparse.Namespace) -> None:
    from own_data import make_128_split

    model = load_sr_model(args.sr_model)
    sets = {
        "Noto, held out": make_128_split(args.splits)["heldout"],
        "OpenMoji (never seen)": shared_dir() / "data" / "openmoji-128" / "train",
    }
    rows = []
    for label, folder in sets.items():
        high = originals_128(folder, args.cache_dir, args.num_images)
        low = downscale(high, 2, "lanczos")
        metrics = compare_upscalers(lambda x: model.upscale(x, sr_strength=1.0), low, high)
        batch = low[: args.timing_batch].float() / 255.0
        calls = {"sr": lambda b=batch: model.upscale(b, 1.0), "lanczos": lambda b=batch: lanczos_upscale(b, 128)}
        seconds = {name: statistics.median(timed(call, 1) for _ in range(args.repeats)) for name, call in calls.items()}
        for name, m in metrics.items():
            ms = seconds[name] / len(batch) * 1000 if name in seconds else float("nan")
            rows.append(
                [label, name, len(high), m["psnr"], m["ssim"], m["hf_energy_ratio"], m["laplacian_var_ratio"], ms]
            )
            print(rows[-1])
    header = ["images", "upscaler", "n", "PSNR dB", "SSIM", "hf ratio", "Laplacian ratio", "ms / 64 px image"]
    notes = (
        f"SR = `{args.sr_model}` (`SpandrelSRModel.upscale(x, sr_strength=1.0)`); inputs are the 128 px originals "
        "downscaled by crispdiff's data-pipeline resize (Lanczos), so the 64 px side is what the diffusion models "
        "train on; PSNR is the mean of per-image PSNR; ratios as `crispdiff evaluate` computes them (1 = as sharp "
        f"as the originals); ms: median of {args.repeats} calls on {args.timing_batch} images. OpenMoji: CC-BY-SA-4.0."
    )
    append_results(
        "SR x2 quality on held-out emoji (bench_sr.py quality)",
        markdown_table(header, rows),
        notes,
        record=not args.no_record,
    )


def speed(args: argparse.Namespace) -> None:
    """ms per 64 px image of ``upscale(x, 1.0)`` and of Lanczos, rounds alternating so machine noise hits both."""
    model = load_sr_model(args.sr_model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for batch in args.batch_sizes:
                images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch)).to(device)
                calls = {
                    "SR x2": lambda x=images: model.upscale(x, 1.0),
                    "Lanczos": lambda x=images: lanczos_upscale(x, 128),
                }
                for name, call in calls.items():
                    call()  # warm-up
                    per_call = statistics.median(timed(call, 1) for _ in range(args.repeats))
                    times.setdefault((batch, name), []).append(per_call / batch * 1000)
    rows = [[batch, name, min(v), max(v)] for (batch, name), v in times.items()]
    notes = (
        f"SR = `{args.sr_model}` (`SpandrelSRModel.upscale(x, sr_strength=1.0)`, channels-last convolutions), 64 px "
        f"inputs -> 128 px; each cell: the range over {args.rounds} alternating rounds of the median of "
        f"{args.repeats} calls; device {device}."
    )
    header = ["batch", "upscaler", "ms / image (best round)", "ms / image (worst round)"]
    append_results("SR x2 speed (bench_sr.py speed)", markdown_table(header, rows), notes, record=not args.no_record)


def sample_raw(
    pipeline_dir: Path, num_images: int, batch_size: int, seed: int, cache: Path, reference: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(samples, subset)``: float [N, 3, 64, 64] in [0, 1], the pipeline's decoded samples before any SR or
    post-processing, drawn as ``crispdiff evaluate`` draws them (DPM-Solver++ 25, image i seeded ``seed + i``; a
    labelled model in the class mix of ``reference``, whose images of classes it does not know are left out:
    ``subset`` then lists the ones kept); drawn once per seed and cached with the subset."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["samples"], saved.get("subset")
    from diffusers import DiffusionPipeline

    from crispdiff.core.io import write_atomic
    from crispdiff.evaluate.evaluation import load_reference_data
    from crispdiff.evaluate.sampling import NO_POSTPROCESS, conditioning_plan, generate_samples, training_setting

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), trust_remote_code=True)
    labels, subset = None, None
    if reference is not None and getattr(pipe.unet.config, "num_class_embeds", None) is not None:
        column = training_setting(pipeline_dir, "class_column")
        data = load_reference_data(str(reference), 128, class_column=column)
        labels, subset, described = conditioning_plan(pipe, pipeline_dir, data, num_images, None, seed)
        print(f"sampling: {described}", flush=True)
    raw = generate_samples(
        pipe, num_images, seed=seed, batch_size=batch_size, upscale=False, class_labels=labels,
        postprocess=NO_POSTPROCESS, log=print,
    )
    write_atomic(cache, lambda handle: torch.save({"samples": raw, "subset": subset}, handle), binary=True)
    return raw, subset


def generated(args: argparse.Namespace) -> None:
    """SWD / floor and sharpness of a pipeline's 128 px output with Lanczos and each SR model (see the docstring)."""
    from own_data import make_128_split, make_openmoji_128_split

    from crispdiff.core.images import make_grid, save_image_atomic
    from crispdiff.evaluate.distribution import sliced_wasserstein_distance
    from crispdiff.evaluate.sharpness import sharpness_ratios

    split = make_128_split(args.splits) if args.family == "noto" else make_openmoji_128_split(args.splits)
    cache = args.samples_cache or args.pipeline.parent / f"samples64-s{args.seed}-n{args.num_images}.pt"
    raw, subset = sample_raw(args.pipeline, args.num_images, args.batch_size, args.seed, cache, split["heldout"])
    real = originals_128(split["heldout"], args.cache_dir, args.num_images)
    if subset is not None:  # a labelled model is compared with the held-out images of the classes it knows
        real = real[subset]
    floor_set = originals_128(split["floor"], args.cache_dir, len(real))
    pipe = load_pipeline(args.pipeline)  # the installed class: folders saved before upscale_sharpen_amount work too
    strength = float(pipe.config.sr_strength)
    floor = sliced_wasserstein_distance(real, floor_set)
    upscalers = {"Lanczos": lambda x: lanczos_upscale(x, 128)}
    for pair in args.sr_models:
        name, _, path = pair.partition("=")
        model = load_sr_model(path or name)
        upscalers[f"SR {name}"] = lambda x, m=model: m.upscale(x, sr_strength=strength).float().clamp(0.0, 1.0)
    label = args.label or args.pipeline.parent.name
    rows, outputs = [], {}
    own = pipe.default_sharpen_amount(upscaled=True)  # what pipe(upscale=True) applies after SR
    amounts = [None] + [a for a in (args.sharpen_amounts or []) if a != own]
    with torch.inference_mode():
        for name, upscale in upscalers.items():
            up = torch.cat([upscale(raw[i : i + 64]) for i in range(0, len(raw), 64)])
            batch = raw[:16]
            ms = statistics.median(timed(lambda b=batch, f=upscale: f(b), 1) for _ in range(3)) / len(batch) * 1000
            for amount in amounts:
                final = pipe.postprocess(up, sharpen_amount=amount, upscaled=True).clamp(0.0, 1.0)
                row_name = name if amount is None else f"{name}, sharpen {amount:g}"
                if amount is None:
                    outputs[name] = final
                swd = sliced_wasserstein_distance(real, final)
                sharp = sharpness_ratios(real, final)
                rows.append(
                    [
                        label,
                        row_name,
                        len(final),
                        swd["swd_avg"],
                        floor["swd_avg"],
                        swd["swd_avg"] / floor["swd_avg"],
                        swd["swd_128"] / floor["swd_128"],
                        sharp["hf_energy_ratio"],
                        sharp["laplacian_var_ratio"],
                        ms,
                    ]
                )
                print(rows[-1], {k: round(v, 2) for k, v in swd.items()}, flush=True)
    if args.grid is not None:
        shown = torch.linspace(0, len(raw) - 1, 8).long()
        columns = [torch.nn.functional.interpolate(raw[shown], size=128, mode="nearest")]
        columns += [outputs[name][shown] for name in upscalers]
        grid = torch.stack(columns, dim=1).flatten(0, 1)
        save_image_atomic(make_grid(grid, nrow=len(columns), value_range=(0.0, 1.0), padding=2), args.grid)
        print(f"grid: {args.grid} (columns: 64 px nearest, {', '.join(upscalers)})")
    header = [
        "model",
        "upscaler",
        "n",
        "SWD x1e3",
        "floor",
        "SWD / floor",
        "128 px level / its floor",
        "hf",
        "Laplacian",
        "ms / image (upscaler)",
    ]
    notes = (
        f"`{args.pipeline}`: {args.num_images} samples (seed {args.seed}, the pipeline's defaults, DPM-Solver++ 25) "
        f"decoded at 64 px, upscaled (SR at the pipeline's sr_strength {strength}), then the pipeline's "
        f"post-processing (unsharp amount {own} unless the row says), as `pipe(upscale=True)`; "
        f"against {len(real)} held-out {args.family} images at 128 px; "
        f"floor: {len(floor_set)} other real images against the same ones. SR models: {', '.join(args.sr_models)}."
    )
    append_results(
        "128 px output of a trained pipeline (bench_sr.py generated)",
        markdown_table(header, rows),
        notes,
        record=not args.no_record,
    )


def tile_count(size: int, tile: int, overlap: int, align: int) -> int:
    """How many tiles an image of ``size`` x ``size`` is cut into."""
    if size <= tile:
        return 1
    return len(tile_starts(size, tile, overlap, align)) ** 2


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "quality":
        quality(args)
    elif args.mode == "generated":
        generated(args)
    elif args.mode == "speed":
        speed(args)
    else:
        cost(args)


def cost(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = build_unet(
        args.resolution,
        base_channels=args.base_channels,
        channel_mults=args.channel_mults,
        attention_res=args.attention_res,
        layers_per_block=args.layers_per_block,
    ).eval()
    pipe = build_pipeline(unet=unet, scheduler_base_config=scheduler_base_config(NoiseConfig()), beta_schedule="cosine")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu")

    def sample() -> torch.Tensor:
        return pipe(
            batch_size=args.batch_size,
            num_inference_steps=args.steps,
            generator=generator.manual_seed(0),
            upscale=False,
            output_type="pt",
        ).images

    images = sample()  # warm-up, and the SR input
    sampling = statistics.median(timed(sample, 1) for _ in range(args.repeats)) / args.batch_size
    unet_params = sum(p.numel() for p in unet.parameters())
    rows = [["UNet sampling (DPM-Solver++)", f"{unet_params / 1e6:.3g}M", f"{args.steps} steps", "-", sampling, 1.0]]
    print(f"sampling: {sampling:.3f} s/image ({args.resolution} px, {args.steps} steps)")
    for name, net in sr_networks(args.include_rrdb_x4).items():
        whole = SpandrelSRModel.from_state_dict(net.state_dict(), tile_size=0).to(device)
        tiled = SpandrelSRModel.from_state_dict(
            net.state_dict(), tile_size=args.tile_size, tile_overlap=args.tile_overlap
        ).to(device)
        params = sum(p.numel() for p in whole.parameters())
        whole.upscale(images, 0.5)
        tiled.upscale(images, 0.5)  # warm-up both
        times: dict[str, list[float]] = {"untiled": [], "tiled": []}
        for _ in range(args.repeats):
            times["untiled"].append(timed(lambda m=whole: m.upscale(images, 0.5), 1) / args.batch_size)
            times["tiled"].append(timed(lambda m=tiled: m.upscale(images, 0.5), 1) / args.batch_size)
        tiles = tile_count(args.resolution, args.tile_size, args.tile_overlap, tiled.config.size_multiple_of)
        out = args.resolution * whole.config.scale
        for mode, label in (("untiled", "untiled"), ("tiled", f"{tiles} tiles of {args.tile_size} px")):
            cost = statistics.median(times[mode])
            rows.append(
                [
                    f"{name} -> {out} px",
                    f"{params / 1e6:.3g}M",
                    label,
                    f"{args.tile_overlap} px" if mode == "tiled" else "-",
                    cost,
                    cost / sampling,
                ]
            )
            print(f"{name} {mode}: {cost:.3f} s/image = {cost / sampling:.2f} x sampling")
    header = ["step", "params", "tiling", "overlap", "s / image", "x sampling"]
    table = markdown_table(header, rows)
    notes = (
        f"{args.resolution} px samples, batch {args.batch_size}, UNet base {args.base_channels} x "
        f"{args.channel_mults}; SR = `SpandrelSRModel.upscale(images, sr_strength=0.5)` (network + Lanczos blend), "
        f"random weights at the named checkpoints' sizes; median of {args.repeats} repeats; device {device}."
    )
    append_results("SR post-step vs 25-step sampling (bench_sr.py)", table, notes, record=not args.no_record)
    assert math.isfinite(sampling)


if __name__ == "__main__":
    main()
