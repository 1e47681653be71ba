"""One rule for flags: every flag a script accepts changes the run as its help says, or the script refuses it in one
line. The scripts and their flags are read from train_scripts/*.py and their parsers, never listed here, so a script
or flag added later is walked too."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from crispdiff.core.config import resolve_mixed_precision
from crispdiff.core.diffusers_flags import VALUE_ALIASES, RefusedFlag
from crispdiff.core.errors import FlagError, UserError
from crispdiff.core.flags import build_parser, parse_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.name for path in (REPO_ROOT / "train_scripts").glob("*.py"))


def script_entry(script: str) -> tuple[type, Callable[[Any], Any]]:
    """The config class a script hands ``parse_config`` and the library function it hands the config to, read from
    the script's own source (``train(parse_config(TrainConfig, ...))``)."""
    path = REPO_ROOT / "train_scripts" / script
    spec = importlib.util.spec_from_file_location(f"walked_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Call):
            inner = node.args[0]
            if isinstance(inner.func, ast.Name) and inner.func.id == "parse_config":
                return getattr(module, inner.args[0].id), getattr(module, node.func.id)
    raise AssertionError(f"{script} hands no parse_config(...) result to a function")


def test_every_script_is_found():
    assert len(SCRIPTS) >= 7
    assert {script_entry(script)[0].__name__ for script in SCRIPTS} >= {"TrainConfig", "TransferConfig"}


# ----------------------------------------------------------------------------------------------------------------------
# No abbreviations
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_abbreviated_flags_are_refused(script, capsys):
    """`--lr_warmup_step 600 --num_epoch 3` parsed as `--lr_warmup_steps` / `--num_epochs` while the set of flags the
    user gave stayed empty, so the warm-up was capped as a default and the epochs lost to the default step count."""
    config_cls, _ = script_entry(script)
    for abbreviation in (["--lr_warmup_step", "600"], ["--num_epoch", "3"], ["--learning", "1e-3"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(config_cls, abbreviation)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {' '.join(abbreviation)}" in capsys.readouterr().err


def test_abbreviated_flags_of_the_crispdiff_command_are_refused(capsys):
    from crispdiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "pipeline", "--num_image", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --num_image 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Architecture flags that the UNet being built would not use
# ----------------------------------------------------------------------------------------------------------------------

UNET_CONFIG_SCRIPTS = [script for script in SCRIPTS if "model_config_name_or_path" in {
    action.dest for action in build_parser(script_entry(script)[0])._actions if action.option_strings
}]  # fmt: skip


@pytest.mark.parametrize("script", UNET_CONFIG_SCRIPTS)
@pytest.mark.parametrize("builder_flag", [["--base_channels", "8"], ["--dropout", "0.2"], ["--channel_mults", "1"]])
def test_a_unet_config_file_refuses_the_builder_flags_it_would_override(script, builder_flag):
    """--model_config_name_or_path used to win silently over --base_channels, --dropout ...: refused by name."""
    config_cls, _ = script_entry(script)
    with pytest.raises(FlagError, match=rf"{builder_flag[0]} would be ignored"):
        parse_config(config_cls, ["--model_config_name_or_path", "unet.json", *builder_flag])
    assert parse_config(config_cls, ["--model_config_name_or_path", "unet.json"]).model_config_name_or_path


@pytest.mark.parametrize("script", UNET_CONFIG_SCRIPTS)
def test_timm_encoder_flags_go_with_the_encoder_only(script):
    config_cls, _ = script_entry(script)
    with pytest.raises(FlagError, match="--channel_mults, --attention_res: not used by the timm-encoder UNet"):
        parse_config(config_cls, ["--encoder", "timm:resnet18", "--channel_mults", "1", "2", "--attention_res", "8"])
    with pytest.raises(FlagError, match="--encoder_norm: for a timm encoder only"):
        parse_config(config_cls, ["--encoder_norm", "batch"])
    config = parse_config(config_cls, ["--encoder", "timm:resnet18", "--encoder_norm", "batch", "--dropout", "0.2"])
    assert (config.encoder_norm, config.dropout) == ("batch", 0.2)


# ----------------------------------------------------------------------------------------------------------------------
# Flags that would change nothing, and pairs in which one flag would win
# ----------------------------------------------------------------------------------------------------------------------

SD = ["--pretrained_model_name_or_path", "sd"]
DREAMBOOTH = [*SD, "--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog"]


@pytest.mark.parametrize(
    "script, argv, refusal",
    [
        ("train_unconditional.py", ["--hub_model_id", "me/model"], "--hub_model_id: no effect without --push_to_hub"),
        ("train_unconditional.py", ["--use_ema", "false", "--ema_power", "0.5"], "--ema_power: no effect without"),
        ("train_unconditional.py", ["--guidance_scale", "3"], "--guidance_scale: no effect without --class_column"),
        ("train_unconditional.py", ["--max_train_steps", "9", "--num_epochs", "2"], "not both"),
        ("train_latent.py", ["--time_budget_minutes", "5", "--max_train_steps", "9"], "not both"),
        ("train_latent.py", ["--adapt_vae", "off", "--adapt_vae_steps", "9"], "--adapt_vae_steps: no effect without"),
        ("train_latent.py", ["--center_crop", "--random_crop_positions", "2"], "--random_crop_positions: no effect"),
        ("train_unconditional.py", ["--random_crop_positions", "2"], "--random_crop_positions is not supported here"),
        ("train_vae.py", ["--caption_column", "text"], "--caption_column is not supported here"),
        ("train_vae.py", ["--disc_weight", "0.1"], "--disc_weight: no effect without --disc_start"),
        ("train_sr.py", ["--vae_latent_noise", "0.3"], "--vae_latent_noise: no effect without --vae_roundtrip_prob"),
        ("train_sr.py", ["--unpaired_data_dir", "samples"], "--unpaired_data_dir: no effect without --gan_weight"),
        ("train_transfer.py", ["--pretrained_model_name_or_path", "m", "--rank", "4"], "--lora_rank: no effect"),
        ("train_transfer.py", ["--pretrained_model_name_or_path", "m", "--time_budget_minutes", "5"], "not supported"),
        ("train_text_to_image_lora.py", [*SD, "--scale_lr", "false", "--lr_reference_batch", "64"], "--scale_lr"),
        ("train_text_to_image_lora.py", [*SD, "--image_column", "img"], "--image_column: no effect without"),
        ("train_dreambooth_lora.py", [*DREAMBOOTH, "--class_data_dir", "dogs"], "without --with_prior_preservation"),
    ],
)
def test_flags_that_would_change_nothing_are_refused_by_name(script, argv, refusal):
    """Each was accepted and then ignored (or silently overridden by the other flag of the pair)."""
    config_cls, _ = script_entry(script)
    with pytest.raises(FlagError, match=re.escape(refusal)):
        parse_config(config_cls, argv)


# ----------------------------------------------------------------------------------------------------------------------
# The walk: every flag of every script, given alone on a small base command line
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """What the scripts' base command lines read: 12 captioned 16 x 20 px images in two kinds (wider than high, so
    random crops have room), a tiny VAE, a tiny DDPMPipeline, a tiny Stable Diffusion and a tiny SDXL, all real
    folders."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from test_transfer import tiny_attention_unet
    from tiny_models import make_tiny_sd, make_tiny_sdxl, tiny_vae

    root = tmp_path_factory.mktemp("walk")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        pixels = np.full((16, 20, 3), 255, np.uint8)
        top, left = rng.integers(0, 8, 2)
        pixels[top : top + 8, left : left + 8] = rng.integers(0, 200, 3)
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"a square {i}", "kind": "ab"[i % 2]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tiny_vae(sample_size=16).save_pretrained(root / "vae")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=tiny_attention_unet(), scheduler=scheduler).save_pretrained(root / "ddpm")
    return {
        "root": root,
        "images": images,
        "vae": root / "vae",
        "ddpm": root / "ddpm",
        "sd": make_tiny_sd(root),
        "sdxl": make_tiny_sdxl(root),
    }


def loop_flags(out: Path) -> list[str]:
    """A run of two optimizer steps that checkpoints, validates and logs at each, so that those paths run."""
    return [
        "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), "--max_train_steps", "2",
        "--train_batch_size", "4", "--checkpointing_steps", "1", "--validation_steps", "1", "--report_to",
        "tensorboard", "--cpu_threads", "1",
    ]  # fmt: skip


UNET = ["--resolution", "16", "--base_channels", "8", "--channel_mults", "1", "2", "--attention_res", "8"]
GRIDS = ["--num_validation_images", "2", "--validation_inference_steps", "1"]


def base_argv(config_cls: type, inputs: dict[str, Path], out: Path) -> list[str]:
    """Each script's small run: tiny models, two steps, with a class column where the script takes one."""
    images, name = str(inputs["images"]), config_cls.__name__
    sd = ["--pretrained_model_name_or_path", str(inputs["sd"]), "--resolution", "16", "--vae_batch_size", "4",
          "--validation_prompt", "a square", *GRIDS]  # fmt: skip
    sdxl = [*sd[:1], str(inputs["sdxl"]), *sd[2:]]
    per_script = {
        "TrainConfig": ["--train_data_dir", images, "--class_column", "kind", *UNET, *GRIDS],
        "LatentTrainConfig": [
            "--train_data_dir", images, "--class_column", "kind", "--pretrained_vae_name_or_path",
            str(inputs["vae"]), "--vae_batch_size", "4", "--adapt_vae", "off", *UNET[:-1], "4", *GRIDS,
        ],
        "TransferConfig": [
            "--pretrained_model_name_or_path", str(inputs["ddpm"]), "--train_data_dir", images, "--class_column",
            "kind", "--resolution", "16", *GRIDS,
        ],
        "VAETrainConfig": [
            "--train_data_dir", images, "--resolution", "16", "--block_out_channels", "8", "16",
            "--layers_per_block", "1", "--validation_fraction", "0.25", "--scaling_samples", "4",
            "--num_validation_images", "2",
        ],
        "SRTrainConfig": [
            "--train_data_dir", images, "--resolution", "16", "--crop_size", "8", "--num_feat", "8",
            "--num_blocks", "1", "--validation_fraction", "0.25", "--num_validation_images", "2",
        ],
        "TextToImageLoRAConfig": [*sd, "--train_data_dir", images, "--caption_column", "text"],
        "DreamBoothLoRAConfig": [*sd, "--instance_data_dir", images, "--instance_prompt", "a photo of sks square"],
        "SDXLTextToImageLoRAConfig": [*sdxl, "--train_data_dir", images, "--caption_column", "text"],
        "SDXLDreamBoothLoRAConfig": [
            *sdxl, "--instance_data_dir", images, "--instance_prompt", "a photo of sks square",
        ],
    }  # fmt: skip
    assert name in per_script, f"{name}: give its script a small base command line here"
    return [*loop_flags(out), *per_script[name]]


class ReadLog:
    """The config fields a run reads, leaving out the reads that only check or save the config (its ``resolve``,
    ``fill_and_check``, ``resolve_given_flags``, ``check_*`` and ``to_dict`` methods, dataclasses' own functions, the
    defaults note)."""

    BOOKKEEPING = ("resolve", "fill_and_check", "resolve_given_flags", "to_dict", "save_json", "defaults_note")

    def __init__(self, config: Any):
        self.fields = {f.name for f in dataclasses.fields(config)}
        self.config_classes = {cls.__qualname__ for cls in type(config).__mro__}
        self.read: set[str] = set()
        log = self

        class Tracked(type(config)):
            def __getattribute__(self, name: str) -> Any:
                if name in log.fields and log.counts(sys._getframe(1)):
                    log.read.add(name)
                return object.__getattribute__(self, name)

        object.__setattr__(config, "__class__", Tracked)  # a resolved config is read-only

    def counts(self, frame: Any) -> bool:
        while frame is not None:
            code = frame.f_code
            owner, _, method = code.co_qualname.rpartition(".")
            if code.co_filename == dataclasses.__file__ or code.co_filename == "<string>":
                return False
            if method == "defaults_note" or (
                owner in self.config_classes and (method in self.BOOKKEEPING or method.startswith("check_"))
            ):
                return False
            frame = frame.f_back
        return True


def run_reads(script: str, inputs: dict[str, Path], out: Path) -> set[str]:
    """The config fields the script's run reads, from its base command line."""
    config_cls, entry = script_entry(script)
    config = parse_config(config_cls, base_argv(config_cls, inputs, out))
    log = ReadLog(config)
    entry(config)
    return log.read


#: Flags a script accepts that its small CPU run may leave unread, each with why, and the test that covers it.
UNREAD_ALLOWED = {
    "allow_tf32": (
        "sets TF32 for CUDA matmuls only, so a CPU run never reads it",
        "tests/test_training.py::test_tf32_follows_allow_tf32_and_deterministic_turns_it_off",
    ),
    "license": (
        "saved with the run's config and read from there by the model card (at the run's end, --push_to_hub or "
        "crispdiff push), not through the config object the walk watches",
        "tests/test_hub.py::test_the_cards_licence_is_the_one_asked_for_else_the_runs_else_other",
    ),
    "upscale_calibration_images": (
        "read at the end of a run whose pipeline carries an SR step; the latent default (the embedded SR x2) is for "
        "64 px models, and the walk's runs are 16 px",
        "tests/test_sr_train.py::test_the_unsharp_amount_after_sr_is_calibrated_against_the_training_images_at_the_"
        "output_size",
    ),
    "overwrite_output_dir": (
        "read only when --output_dir already holds a finished result",
        "tests/test_training.py::test_existing_pipeline_is_not_overwritten_silently",
    ),
    "dataloader_num_workers": (
        "accepted for diffusers' command lines, and its help says it has no effect (images are decoded once)",
        "tests/test_diffusers_commands.py::test_common_unconditional_flags_validate_and_save_per_epoch",
    ),
    "local_rank": (
        "accepted for diffusers' command lines, and its help says it has no effect (accelerate sets the rank)",
        "tests/test_diffusers_flags.py::test_diffusers_names_set_crispdiff_flags",
    ),
    "pre_compute_text_embeddings": (
        "accepted for diffusers' command lines: its help says crispdiff always encodes the prompts once with a frozen "
        "text encoder, and it is refused with --train_text_encoder as in diffusers",
        "tests/test_sd_lora.py::test_refusals_are_one_line",
    ),
}


def flag_actions(config_cls: type) -> list[argparse.Action]:
    """Every flag of the script's parser but --help (refused flags included)."""
    parser = build_parser(config_cls)
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


def tokens(value: Any) -> list[str]:
    """A field value as command-line tokens."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


#: Values for the few fields whose type alone gives none that their checks accept.
VALID_VALUES = {
    "guidance_interval": [[0.5, 8.0]],
    "block_out_channels": [[8, 32]],
    "holdout_values": [["b"]],
    "lora_target_modules": [["time"], ["ff"]],
    "encoder": [["timm:resnet18"]],
}


def other_values(action: argparse.Action, current: Any) -> list[list[str]]:
    """Command-line values of a flag other than the base run's ``current`` one: every other choice, the other
    boolean, or a nearby number, string or list."""
    if action.dest in VALID_VALUES:
        return [tokens(value) for value in VALID_VALUES[action.dest] if value != current]
    if action.choices:  # diffusers' spelling of a value (squaredcos_cap_v2 for cosine) is that value
        spelled = VALUE_ALIASES.get(action.dest, {})
        if action.dest == "mixed_precision":  # "auto" is this machine's choice: the same run as that value
            spelled = {**spelled, "auto": resolve_mixed_precision("auto")}
        return [[choice] for choice in action.choices if spelled.get(choice, choice) != current]
    if action.const is True:  # a boolean flag
        return [tokens(not current)]
    if action.nargs == "+":
        if current is None:
            return [["2", "4"]] if action.type is int else [["x"]]
        return [tokens(current[:-1] if len(current) > 1 else [*current, current[-1] * 2])]
    if action.type is int:
        return [["2" if current is None else str(current + 1)]]
    if action.type is float:
        return [["0.5" if current is None else str(current / 2 if current else 0.1)]]
    return [["x" if current is None else f"{current}-other"]]


def outcome(config_cls: type, argv: list[str]) -> Any:
    """The validated config of a command line, or the user error that refused it."""
    try:
        return parse_config(config_cls, argv)
    except UserError as error:
        return error


def forms(action: argparse.Action, value: list[str], first: bool) -> list[list[str]]:
    """How to give a flag a value: the first value in every spelling (each alias, and ``--name=value``), the others in
    the flag's own name only."""
    names = action.option_strings if first else action.option_strings[:1]
    written = [[name, *value] for name in names]
    return written + ([[f"{names[0]}={value[0]}"]] if first and len(value) == 1 else [])


def judge(action: argparse.Action, form: list[str], result: Any, resolved: dict[str, Any]) -> list[str]:
    """What breaks the rule in one parse: a refusal that does not name the flag; an accepted value missing from the
    flags the user gave, accepted where the base run's own value was refused, or leaving the resolved config as it
    was."""
    shown, spelling = " ".join(form), form[0].split("=")[0]
    if isinstance(result, UserError):
        named = f"--{action.dest}" in str(result) or spelling in str(result)
        return [] if named else [f"{shown}: refused without naming the flag: {result}"]
    problems = []
    if action.dest not in result.explicit_flags:
        problems.append(f"{shown}: missing from the flags the user gave")
    if dataclasses.asdict(result)[action.dest] == resolved[action.dest]:
        problems.append(f"{shown}: accepted, and the resolved config did not change")
    return problems


def walk(config_cls: type, base: list[str]) -> dict[str, dict[str, Any]]:
    """Every flag of ``config_cls``, each spelling and each other value, given alone on the base command line.

    Returns field -> {"conditional": refused even at the base run's own value (a flag refused by this script, or one
    that acts only with another flag), "landed": the command lines that changed the resolved config, "problems":
    what broke the rule}.
    """
    reference = parse_config(config_cls, base)
    resolved = dataclasses.asdict(reference)  # to_dict() without its secrets filter, which drops tokenizer_name
    results: dict[str, dict[str, Any]] = {}
    for action in flag_actions(config_cls):
        result = results.setdefault(action.dest, {"conditional": False, "landed": [], "problems": []})
        if isinstance(action, RefusedFlag):
            refused = outcome(config_cls, [*base, action.option_strings[0]])
            result["conditional"] = True
            if not (isinstance(refused, FlagError) and action.option_strings[0] in str(refused)):
                result["problems"].append(f"{action.option_strings[0]}: a refused flag was not refused by name")
            continue
        current = getattr(reference, action.dest)
        if current is not None:
            same = outcome(config_cls, [*base, action.option_strings[0], *tokens(current)])
            result["conditional"] = isinstance(same, UserError)
        for index, value in enumerate(other_values(action, current)):
            for form in forms(action, value, first=index == 0):
                parsed = outcome(config_cls, [*base, *form])
                result["problems"] += judge(action, form, parsed, resolved)
                if not isinstance(parsed, UserError):
                    if result["conditional"]:
                        result["problems"].append(f"{' '.join(form)}: accepted, but the base run's own value was not")
                    result["landed"].append(" ".join(form))
    return results


WALKS: dict[tuple[str, Path], dict[str, dict[str, Any]]] = {}


def walked(script: str, inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The walk of one script (computed once per test session)."""
    key = (script, inputs["root"])
    if key not in WALKS:
        config_cls, _ = script_entry(script)
        WALKS[key] = walk(config_cls, base_argv(config_cls, inputs, inputs["root"] / "walk-out"))
    return WALKS[key]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_changes_the_resolved_run_or_is_refused(script, inputs):
    """Each flag, in each of its spellings (aliases, --name=value) and with each other value, either lands in the
    validated config (and in the flags the user gave) or is refused in one line naming it; a flag refused even at
    the base run's own value (one that acts only with another flag) is refused at every value."""
    results = walked(script, inputs)
    assert len(results) > 40
    problems = [problem for result in results.values() for problem in result["problems"]]
    assert problems == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_a_run_accepts_is_read_by_the_run(script, inputs, tmp_path):
    """A flag the walk accepted with a new value must be read by the script's run (outside the config's own checks):
    one that nothing reads has no effect, whatever its help says. Runs the script's small base run."""
    results = walked(script, inputs)
    accepted = {name for name, result in results.items() if result["landed"]}
    read = run_reads(script, inputs, tmp_path / "out")
    unread = sorted(accepted - read - set(UNREAD_ALLOWED))
    assert unread == [], f"{script} accepts these flags but its run never reads them: refuse them or use them"
