"""Levers for recognisable samples, measured at equal training compute (issue 34's study).

    python benchmarks/studies/study_levers.py train NAME [--seed S] [--snapshots 100 175 ...] [train_latent.py flags]
    python benchmarks/studies/study_levers.py measure RUN_DIR [--family noto] [--seed S] [--guide STEP --ag 2 ...]

``train`` runs the main job in-process with the given flags (one torch thread: results do not depend on what else
the machine runs, and CPU time is the compute measure) and keeps EMA snapshots of the UNet at the listed steps
(candidate guide models for autoguidance). ``measure`` writes one quality row (``quality.py``) per guidance setting
into RUN_DIR/quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from post_hoc_ema import PowerEMA, combine_snapshots, gamma_from_sigma_rel, post_hoc_coefficients
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, quality
from common import BENCH_DIR  # noqa: E402
from quality import measure_pipeline  # noqa: E402

from crispdiff.core.flags import parse_config
from crispdiff.latent.trainer import LatentTrainConfig, train_latent
from crispdiff.train import unet_trainer

OUT = BENCH_DIR / "out" / "levers"


class SnapshotTrainer(unet_trainer.UNetTrainer):
    """The main job's trainer, also saving its EMA weights at the listed steps, two power-function EMAs every
    ``post_hoc_every`` steps (post-hoc EMA), and timing its own CPU use."""

    snapshot_steps: tuple[int, ...] = ()
    post_hoc_every: int = 0
    post_hoc_sigma_rels: tuple[float, ...] = (0.05, 0.10)

    use_muon: bool = False

    def setup_optimization(self, model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
        super().setup_optimization(model, trainable)
        if self.use_muon:  # the same LR schedule, over Muon (weight matrices) + AdamW (the rest)
            from diffusers.optimization import get_scheduler
            from muon_study import MuonAdamW

            from crispdiff.train.optimization import warmup_steps

            config = self.config
            self.optimizer = MuonAdamW(list(model.named_parameters()), config.learning_rate,
                                       (config.adam_beta1, config.adam_beta2))  # fmt: skip
            self.lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=self.optimizer,
                                              num_warmup_steps=warmup_steps(config, self.max_steps),
                                              num_training_steps=self.max_steps)  # fmt: skip
            self.accelerator.register_for_checkpointing(self.lr_scheduler)

    def periodic(self) -> None:
        super().periodic()
        if self.step in self.snapshot_steps:
            self.sampling_unet().save_pretrained(self.output_dir / f"snapshot-{self.step:06d}")
        if self.post_hoc_every:
            parameters = list(self.accelerator.unwrap_model(self.unet).parameters())
            if self.step == 1:
                self.power_ema = PowerEMA(parameters, self.post_hoc_sigma_rels)
            self.power_ema.step(parameters)
            if self.step % self.post_hoc_every == 0 or self.step == self.max_steps:
                folder = self.output_dir / "post_hoc_ema"
                folder.mkdir(exist_ok=True)
                names = [n for n, _ in self.accelerator.unwrap_model(self.unet).named_parameters()]
                for gamma, average in zip(self.power_ema.gammas, self.power_ema.averages):
                    state = {n: a.contiguous() for n, a in zip(names, average)}
                    save_file(state, str(folder / f"step{self.step:06d}-gamma{gamma:.4f}.safetensors"))

    def finish(self) -> Path:
        self.cpu_seconds = time.process_time() - self.cpu_start
        (self.output_dir / "train_cpu.json").write_text(
            json.dumps({"cpu_s": self.cpu_seconds, "steps": self.step, "wall_s": time.perf_counter() - self.wall_start})
        )
        return super().finish()

    def train_stage(self) -> Path | None:
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()
        return super().train_stage()


def train(args: argparse.Namespace) -> None:
    out = OUT / args.name
    flags = ["--output_dir", str(out), "--seed", str(args.seed), "--cpu_threads", "1", "--overwrite_output_dir",
             "--report_to", "none", *args.flags]  # fmt: skip
    config = parse_config(LatentTrainConfig, flags)
    SnapshotTrainer.snapshot_steps = tuple(args.snapshots)
    SnapshotTrainer.post_hoc_every = args.post_hoc_every
    SnapshotTrainer.use_muon = args.muon
    original = unet_trainer.UNetTrainer
    unet_trainer.UNetTrainer = SnapshotTrainer  # train() builds its UNet trainer by this name
    try:
        train_latent(config)
    finally:
        unet_trainer.UNetTrainer = original


def cost(args: argparse.Namespace) -> None:
    """CPU seconds per optimizer step (one thread) of each flag set, alternating the sets ``rounds`` times."""
    from crispdiff.latent.space import build_latent_space
    from crispdiff.latent.vae import load_vae
    from crispdiff.train.process import make_accelerator

    variants = [v.split() for v in args.variants]
    trainers, space = [], None
    for flags in variants:
        config = parse_config(LatentTrainConfig, ["--output_dir", str(OUT / "cost"), "--report_to", "none", *flags])
        if space is None:
            space = build_latent_space(config, load_vae(config.pretrained_vae_name_or_path), show_progress=False)
        trainer = unet_trainer.UNetTrainer(config, space, make_accelerator(config))
        for _ in range(3):
            trainer.optimizer_step()
        trainers.append(trainer)
    seconds = [[] for _ in variants]
    for _ in range(args.rounds):
        for k, trainer in enumerate(trainers):
            started = time.process_time()
            for _ in range(args.steps):
                trainer.optimizer_step()
            seconds[k].append((time.process_time() - started) / args.steps)
    base = min(seconds[0])
    for flags, values, trainer in zip(args.variants, seconds, trainers):
        print(json.dumps({"flags": flags, "cpu_s_per_step": min(values), "all": values, "ratio": min(values) / base,
                          "params": trainer.num_parameters}), flush=True)  # fmt: skip


def guide_with_snapshot(pipeline: Any, run: Path, step: int | None, scale: float) -> None:
    """Autoguide ``pipeline`` with the run's EMA snapshot of ``step`` at ``scale`` (step 0 / None: no guide)."""
    from diffusers import UNet2DModel

    guide = UNet2DModel.from_pretrained(run / f"snapshot-{step:06d}").eval() if step else None
    pipeline.register_modules(guide_unet=guide)
    pipeline.register_to_config(autoguidance_scale=scale if guide is not None else 1.0)


def measure(args: argparse.Namespace) -> None:
    from crispdiff.publish.export import load_pipeline

    run = Path(args.run)
    pipeline = load_pipeline(run / "pipeline")
    settings: list[dict[str, Any]] = []
    for guide in args.guide or [None]:
        for ag in args.ag:
            for cfg in args.cfg or [None]:
                for sharpen in args.sharpen or [None]:
                    settings.append({"guide": guide, "ag": ag, "cfg": cfg, "sharpen": sharpen})
    own_sharpen = pipeline.config.sharpen_amount
    for setting in settings:
        guide_with_snapshot(pipeline, run, setting["guide"], setting["ag"])
        pipeline.register_to_config(sharpen_amount=own_sharpen if setting["sharpen"] is None else setting["sharpen"])
        row = measure_pipeline(run / "pipeline", args.family, seed=args.seed, guidance_scale=setting["cfg"],
                               pipeline=pipeline, num_images=args.num_images, per_class=args.per_class)  # fmt: skip
        row.update(setting, run=run.name, seed=args.seed, num_images=args.num_images)
        print(json.dumps(row), flush=True)
        with (run / "quality.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def posthoc(args: argparse.Namespace) -> None:
    """One quality row per post-hoc EMA length: the UNet rebuilt from the run's power-EMA snapshots."""
    import re

    from safetensors.torch import load_file

    from crispdiff.publish.export import load_pipeline

    run = Path(args.run)
    pipeline = load_pipeline(run / "pipeline")
    files = sorted((run / "post_hoc_ema").glob("*.safetensors"))
    found = [re.match(r"step(\d+)-gamma([\d.]+)\.safetensors", f.name) for f in files]
    steps = [int(m.group(1)) for m in found]
    gammas = [float(m.group(2)) for m in found]
    snapshots = [load_file(str(f)) for f in files]
    final = max(steps)
    own = pipeline.unet.state_dict()
    for sigma_rel in args.sigma_rel:
        coefficients = post_hoc_coefficients(steps, gammas, final, gamma_from_sigma_rel(sigma_rel))
        weights = combine_snapshots(snapshots, coefficients)
        pipeline.unet.load_state_dict({**own, **weights})
        row = measure_pipeline(run / "pipeline", args.family, seed=args.seed, pipeline=pipeline,
                               num_images=args.num_images, per_class=args.per_class)  # fmt: skip
        row.update(run=run.name, seed=args.seed, sigma_rel=sigma_rel, num_images=args.num_images)
        print(json.dumps(row), flush=True)
        with (run / "quality.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def grid(args: argparse.Namespace) -> None:
    """A grid of the first ``--classes`` classes, one tile each, for each guide / autoguidance / CFG setting."""
    from crispdiff.core.images import make_grid, save_image_atomic
    from crispdiff.evaluate.sampling import generate_samples
    from crispdiff.publish.export import load_pipeline

    run = Path(args.run)
    pipeline = load_pipeline(run / "pipeline")
    rows = []
    for guide, ag, cfg in zip(args.guide, args.ag, args.cfg):
        guide_with_snapshot(pipeline, run, guide, ag)
        labels = list(range(args.classes)) if pipeline.classes else None
        rows.append(generate_samples(pipeline, args.classes, seed=args.seed, class_labels=labels,
                                     guidance_scale=cfg if cfg > 0 else None))  # fmt: skip
    path = run / f"grid-{args.name}.png"
    save_image_atomic(make_grid(torch.cat(rows), nrow=args.classes, value_range=(0, 1)), path)
    print(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--snapshots", type=int, nargs="*", default=[])
    t.add_argument("--post_hoc_every", type=int, default=0, help="save the two power EMAs every N steps (0: off)")
    t.add_argument("--muon", action="store_true", help="Muon for the weight matrices (muon_study.py)")
    c = sub.add_parser("cost")
    c.add_argument("variants", nargs="+", help="quoted flag sets; the first is the baseline of the ratios")
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--rounds", type=int, default=3)
    h = sub.add_parser("posthoc")
    h.add_argument("run")
    h.add_argument("--family", default="noto")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--sigma_rel", type=float, nargs="+", default=[0.03, 0.05, 0.08, 0.12, 0.18])
    h.add_argument("--num_images", type=int, default=1000)
    h.add_argument("--per_class", type=int, default=8)
    g = sub.add_parser("grid")
    g.add_argument("run")
    g.add_argument("name")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--classes", type=int, default=16)
    g.add_argument("--guide", type=int, nargs="+", default=[0], help="snapshot step per row (0: none)")
    g.add_argument("--ag", type=float, nargs="+", default=[1.0])
    g.add_argument("--cfg", type=float, nargs="+", default=[0.0], help="per row; 0: the pipeline's own")
    m = sub.add_parser("measure")
    m.add_argument("run")
    m.add_argument("--family", default="noto")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--guide", type=int, nargs="*", default=None, help="snapshot steps to guide with")
    m.add_argument("--ag", type=float, nargs="+", default=[1.0], help="autoguidance scales")
    m.add_argument("--cfg", type=float, nargs="*", default=None, help="classifier-free guidance scales")
    m.add_argument("--sharpen", type=float, nargs="*", default=None, help="unsharp amounts (default: the pipeline's)")
    m.add_argument("--num_images", type=int, default=1000, help="500 for a quick screen")
    m.add_argument("--per_class", type=int, default=8, help="4 for a quick screen")
    args, extra = p.parse_known_args()
    torch.set_num_threads(1)
    if args.command == "train":
        args.flags = [f for f in extra if f != "--"]
        train(args)
    elif extra:
        p.error(f"unrecognized arguments: {extra}")
    elif args.command == "grid":
        grid(args)
    elif args.command == "posthoc":
        posthoc(args)
    elif args.command == "cost":
        cost(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
