"""Real diffusers models small enough for CPU tests, shared by the test files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DModel

from crispdiff.core.config import NoiseConfig
from crispdiff.diffusion.schedule import scheduler_base_config

SIZE = 16  # pixels of the tiny pipelines' samples
RES = 16  # pixels of the tiny Stable Diffusion's images


def tiny_unet(seed: int = 0, in_channels: int = 3, sample_size: int = SIZE, **config) -> UNet2DModel:
    """A two-level UNet (8 and 16 channels) without attention in its blocks: a few thousand parameters, seeded weights;
    ``config`` overrides (e.g. ``num_class_embeds=3``, attention blocks, ``block_out_channels``)."""
    torch.manual_seed(seed)
    settings = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    return UNet2DModel(**{**settings, **config})


def tiny_vae(
    seed: int = 0, sample_size: int = SIZE, block_out_channels: tuple[int, ...] = (8, 16), **config
) -> AutoencoderKL:
    """An AutoencoderKL with one level per entry of ``block_out_channels`` (two by default: f=2, 8 and 16 channels),
    4 latent channels, seeded weights; ``config`` overrides (e.g. ``scaling_factor=1.0``, ``latent_channels=2``)."""
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
    )
    return AutoencoderKL(**{**settings, **config})


def base_config(prediction_type: str = "v_prediction", zero_snr: bool = False) -> dict:
    """The scheduler base config crispdiff saves for a cosine schedule (explicit betas)."""
    return scheduler_base_config(NoiseConfig(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr))


def cosine_betas() -> list[float]:
    return base_config()["trained_betas"]



def offline_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` + ``merges.txt`` of a CLIP tokenizer that needs no download: CLIP's byte-to-unicode table
    as the vocabulary (each byte, and each byte ending a word), no merges. For Stable Diffusion-shaped models built
    from configs (tests, ``benchmarks/bench_sd_lora.py``), whose text encoders are random anyway."""
    codes = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(codes)
    extra = 0
    for b in range(256):
        if b not in codes:
            codes.append(b)
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def make_tiny_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A saved Stable Diffusion 1.x-shaped pipeline (``folder/sd``) of a few thousand random parameters: a two-level
    cross-attention UNet, an f=2 ``AutoencoderKL``, a two-layer ``CLIPTextModel`` and the offline CLIP tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = offline_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RES // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=16,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "sd")
    return folder / "sd"

SDXL_RES = 32  # pixels of the tiny SDXL's images (an f=4 VAE: 8 x 8 latents)


def make_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """A saved SDXL-shaped pipeline (``folder/sdxl``) built from configs, as diffusers' own SDXL tests build theirs:
    a two-level ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (6 micro-conditioning numbers x 8
    channels + the 16-wide pooled text embedding), an f=4 ``AutoencoderKL``, a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` (hidden 16 each: cross-attention 32), two offline CLIP tokenizers (the second pads
    with "!", as SDXL's does) and SDXL's Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = offline_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    tokenizer_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=16, pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SDXL_RES // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SDXL_RES,
        scaling_factor=0.13025,
        force_upcast=True,
    )

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=16,
        )

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=CLIPTextModelWithProjection(text_config()),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder / "sdxl")
    return folder / "sdxl"


#: The opening of a ``python -I -c`` script that must not see crispdiff: it blocks the package (also through an
#: editable install's finder) and exits if crispdiff still imports, so a "loads without crispdiff" test cannot pass
#: by accident. Append the script's own body.
WITHOUT_CRISPDIFF = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("crispdiff", "pipelines"):
                raise ModuleNotFoundError(f"{name} is blocked here")
            return None

    sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    try:
        import crispdiff  # noqa: F401
        raise SystemExit("crispdiff is importable; the test would prove nothing")
    except ModuleNotFoundError:
        pass
    """
)


def kill_launcher(target: str, when: str = "True", *, before: bool = False, group: bool = False) -> str:
    """Source for ``python -c SOURCE SCRIPT FLAGS...`` (or a wrapper file for ``accelerate launch``) that runs a train
    script with the function ``target`` (``"module:name"``) wrapped: right after a call for which ``when`` holds (a
    Python expression over the call's ``args``), or instead of it with ``before``, the process is SIGKILLed, with
    ``group`` its whole process group (the launcher and every rank). A real crash: nothing after it runs, no atexit,
    no flush, so a test resumes from what a killed run really leaves."""
    module, name = target.split(":")
    kill = "os.killpg(os.getpgid(0), signal.SIGKILL)" if group else "os.kill(os.getpid(), signal.SIGKILL)"
    return textwrap.dedent(
        f"""
        import importlib, os, runpy, signal, sys
        from pathlib import Path

        owner = importlib.import_module({module!r})
        real = getattr(owner, {name!r})


        def wrapped(*args, **kwargs):
            if {before!r} and ({when}):
                {kill}
            result = real(*args, **kwargs)
            if {when}:
                {kill}
            return result


        setattr(owner, {name!r}, wrapped)
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )


def kill_after_checkpoint(folder_name: str, step: int) -> str:
    """:func:`kill_launcher` source that SIGKILLs a train script right after it has written checkpoint-``step`` into
    an output folder named ``folder_name`` (so a two-stage run can be killed in either stage)."""
    return kill_launcher(
        "crispdiff.train.loop:save_checkpoint", f"Path(args[1]).name == {folder_name!r} and args[2] == {step}"
    )


def record_launcher(record_dir: str) -> str:
    """Source of a wrapper file for ``accelerate launch WRAPPER SCRIPT FLAGS...`` that runs a train script and records
    what each process really trained on, in ``record_dir/rank-<RANK>.jsonl``: the dataset indices of every micro-batch
    the loop takes (``EpochBatches.indices``) and the first values of every noise tensor it draws (``sample_noise``).
    The real functions run; their results are only written down, so a test can check that the ranks saw different
    slices of the data and different noise (a bug giving every rank the same would still train and pass otherwise)."""
    return textwrap.dedent(
        f"""
        import json, os, runpy, sys
        from pathlib import Path

        import crispdiff.train.loop as loop
        import crispdiff.train.unet_trainer as unet_trainer

        record = Path({record_dir!r}) / f"rank-{{os.environ.get('RANK', '0')}}.jsonl"
        record.parent.mkdir(parents=True, exist_ok=True)


        def write(kind, values):
            with open(record, "a") as handle:
                handle.write(json.dumps({{"kind": kind, "values": values}}) + "\\n")


        real_indices, real_noise = loop.EpochBatches.indices, unet_trainer.sample_noise


        def indices(self, position):
            result = real_indices(self, position)
            write("indices", result.tolist())
            return result


        def sample_noise(*args, **kwargs):
            result = real_noise(*args, **kwargs)
            write("noise", result.flatten()[:8].tolist())
            return result


        loop.EpochBatches.indices, unet_trainer.sample_noise = indices, sample_noise
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """
    )


def read_records(record_dir, kind: str) -> dict[int, list]:
    """What :func:`record_launcher` wrote of ``kind`` ("indices" or "noise"), by rank, in order."""
    import json
    from pathlib import Path

    records = {}
    for path in sorted(Path(record_dir).glob("rank-*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        records[int(path.stem.split("-")[1])] = [r["values"] for r in lines if r["kind"] == kind]
    return records


def assert_ranks_saw_different_data_and_noise(record_dir, last_micro_steps: int | None = None) -> None:
    """Two ranks, micro-step by micro-step: disjoint slices of the data and different noise. ``last_micro_steps``:
    check only the data of the last ones (a stage before them may have fewer images than its global batch, which
    then repeats them)."""
    indices, noise = read_records(record_dir, "indices"), read_records(record_dir, "noise")
    assert sorted(indices) == [0, 1] and len(indices[0]) == len(indices[1]) > 0, indices
    checked = slice(-last_micro_steps if last_micro_steps else None, None)
    for step, (a, b) in enumerate(zip(indices[0][checked], indices[1][checked], strict=True)):
        assert a and b and not set(a) & set(b), f"micro-step {step}: both ranks trained on {set(a) & set(b)}"
    assert len(noise[0]) == len(noise[1]) > 0
    assert all(a != b for a, b in zip(noise[0], noise[1], strict=True)), "the ranks drew the same noise"
