"""One rule for flags: every flag a script accepts changes the run as its help says, or the script refuses it in one
line. The scripts and their flags are read from train_scripts/*.py and their parsers, never listed here, so a script
or flag added later is walked too."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crispdiff.core.config import build_parser, parse_config
from crispdiff.core.errors import FlagError

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
