"""DreamBooth LoRA: crispdiff's train_dreambooth_lora.py vs diffusers' own, same SD-shaped model, data, batch, steps.

    python benchmarks/bench_sd_lora.py --resolution 256 --train_batch_size 2 --short_steps 2 --steps 12

No SD weights are reachable offline, so both scripts train a randomly initialised model with Stable Diffusion's
shape (four UNet levels with cross-attention, an f=8 VAE, a CLIP text encoder, a byte-level CLIP tokenizer) written
once into a diffusers folder; speed and memory depend on the shapes, not on the weights' values. Each script runs as
its own process (plain ``python``, one process, the same thread count), the two alternating round by round so machine
noise hits both. Each script runs twice, for --short_steps and --steps optimizer steps; measured per run: CPU
seconds (user + system, all threads), wall seconds and the peak resident set. Throughput is images per CPU-second:
of the training steps alone (the difference between the two runs, so start-up, caching and saving cancel) and of the
whole long run. CPU time rather than wall time because a busy machine's scheduler decides the wall time; on a GPU
run the wall clock instead (not done here).

The reference script is ../shared/reference/diffusers-examples/train_dreambooth_lora.py (diffusers' example,
unmodified), run as users run it: no --pre_compute_text_embeddings (a second row can add it with
--baseline_precompute).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, append_results, markdown_table, shared_dir

_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
sys.stdout.write(done.stdout + done.stderr)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = usage.ru_utime + usage.ru_stime
print(f"@@wall={wall:.3f} cpu={cpu:.3f} maxrss_kb={usage.ru_maxrss} rc={done.returncode}")
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instance_data_dir", default=None, help="subject folder (default: ../shared dreambooth/dog)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 128], help="UNet channels per level")
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="steps of the long run")
    p.add_argument("--short_steps", type=int, default=2, help="steps of the short run (its cost is subtracted)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--baseline_precompute", action="store_true", help="also run diffusers with cached prompts")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args()


def build_base(folder: Path, resolution: int, channels: list[int]) -> Path:
    """A Stable Diffusion-shaped diffusers folder with random weights (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the offline CLIP tokenizer the tests build tiny SD models with
    from tiny_models import offline_clip_vocab

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = offline_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        block_out_channels=tuple(channels),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / "sd")
    models = {"unet": unet, "vae": vae, "text": text}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    (folder / "params.json").write_text(json.dumps(params))
    return folder / "sd"


def run(command: list[str], threads: int) -> dict[str, float]:
    """Run one training process; its CPU seconds (user + system), wall seconds and peak resident memory."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env)
    output = done.stdout.replace("\r", "\n")
    facts = re.search(r"@@wall=([\d.]+) cpu=([\d.]+) maxrss_kb=(\d+) rc=(-?\d+)", output)
    if facts is None or facts.group(4) != "0":
        raise RuntimeError(f"{command[1]} failed:\n{output[-4000:]}\n{done.stderr[-2000:]}")
    return {"wall_s": float(facts.group(1)), "cpu_s": float(facts.group(2)), "rss_mb": int(facts.group(3)) / 1024}


def main() -> None:
    args = parse_args()
    data = Path(args.instance_data_dir or shared_dir() / "data" / "dreambooth" / "dog")
    work = Path(tempfile.mkdtemp(prefix="bench_sd_lora_"))
    base = build_base(work / "base", args.resolution, args.channels)
    common = [
        "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
        "--instance_prompt", "a photo of sks dog", "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", "1e-4", "--rank", str(args.rank), "--mixed_precision", args.mixed_precision,
        "--checkpointing_steps", "100000", "--seed", "0", "--center_crop",
    ]  # fmt: skip
    reference = shared_dir() / "reference" / "diffusers-examples" / "train_dreambooth_lora.py"
    variants = {
        "diffusers train_dreambooth_lora.py": [sys.executable, str(reference), *common, "--report_to", "tensorboard"],
        "crispdiff train_dreambooth_lora.py": [
            sys.executable,
            str(REPO_ROOT / "train_scripts" / "train_dreambooth_lora.py"),
            *common,
            "--report_to",
            "none",
            "--cpu_threads",
            str(args.threads),
            "--num_validation_images",
            "1",
            "--validation_inference_steps",
            "2",
        ],  # fmt: skip
    }
    if args.baseline_precompute:
        variants["diffusers, --pre_compute_text_embeddings"] = [
            *variants["diffusers train_dreambooth_lora.py"],
            "--pre_compute_text_embeddings",
        ]
    results: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in variants}
    for round_index in range(args.rounds):
        for steps in (args.short_steps, args.steps):
            for name, command in variants.items():
                out = work / f"out-{round_index}-{steps}-{abs(hash(name)) % 1000}"
                started = time.strftime("%H:%M:%S")
                own = ["--cache_dir", str(out / "cache")] if name.startswith("crispdiff") else []  # encode anew
                measured = run(
                    [*command, *own, "--max_train_steps", str(steps), "--output_dir", str(out)], args.threads
                )
                results[name].setdefault(steps, []).append(measured)
                print(f"[{started}] round {round_index}, {steps} steps, {name}: {measured}", flush=True)

    baseline = "diffusers train_dreambooth_lora.py"

    def median(name: str, steps: int, key: str) -> float:
        return statistics.median(r[key] for r in results[name][steps])

    def figures(name: str) -> tuple[float, float, float]:
        extra = (args.steps - args.short_steps) * args.train_batch_size
        per_step = extra / (median(name, args.steps, "cpu_s") - median(name, args.short_steps, "cpu_s"))
        whole = args.steps * args.train_batch_size / median(name, args.steps, "cpu_s")
        return per_step, whole, median(name, args.steps, "rss_mb")

    base_figures = figures(baseline)
    rows = []
    for name in variants:
        loop, whole, rss = figures(name)
        rows.append([name, loop, loop / base_figures[0], whole, whole / base_figures[1], rss, rss / base_figures[2]])
    header = [
        "script",
        "img per CPU-s, training steps",
        "ratio",
        "img per CPU-s, whole run",
        "ratio",
        "peak RSS MB",
        "ratio",
    ]
    params = json.loads((work / "base" / "params.json").read_text())
    notes = (
        f"SD-shaped model with random weights: UNet {params['unet'] / 1e6:.1f}M parameters (channels "
        f"{args.channels}, 2 layers per level, cross-attention dim 128), f=8 VAE {params['vae'] / 1e6:.1f}M, CLIP text "
        f"encoder {params['text'] / 1e6:.1f}M; {data.name} ({len(list(data.iterdir()))} images) at {args.resolution} "
        f"px, batch {args.train_batch_size}, LoRA rank {args.rank}, precision {args.mixed_precision}, "
        f"{args.threads} torch thread(s) per run, {args.rounds} round(s) of runs of {args.short_steps} and "
        f"{args.steps} steps, alternating between the scripts (medians). Throughput is per CPU-second (user + system "
        "time of the process), not per wall second: this machine runs a higher-priority job, so wall time measures "
        "the scheduler. 'Training steps' divides the extra images of the long run by its extra CPU time (start-up, "
        "caching and saving cancel); 'whole run' divides all images of the long run by all of its CPU time, "
        "crispdiff's one-off latent and prompt caching included. Peak memory is the process's maximum resident set."
    )
    table = markdown_table(header, rows)
    append_results(
        "DreamBooth LoRA on an SD-shaped model: crispdiff vs diffusers' script", table, notes, record=not args.no_record
    )


if __name__ == "__main__":
    main()
