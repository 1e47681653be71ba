"""Every saved folder says which crispdiff and which command made it (``crispdiff_provenance.json``), without the
credentials the command carried. The trainers' own folders are checked where their runs are tested (test_sd_lora,
test_sr_train, test_vae); here the rule itself and the pipeline writer every UNet trainer saves through."""

from __future__ import annotations

import json
import sys

from tiny_models import base_config, tiny_unet

import crispdiff
from crispdiff.core.provenance import PROVENANCE_NAME, public_command
from crispdiff.publish.export import save_pipeline


def test_the_recorded_command_leaves_out_every_credential_and_keeps_the_rest():
    argv = [
        "train_scripts/train_latent.py", "--hub_token", "hf_secret", "--tokenizer_name", "tok", "--token=hf_other",
        "--push_to_hub", "--hub_private_repo", "--seed", "3", "--hub-token", "hf_third", "--api_key", "k",
    ]  # fmt: skip
    command = public_command(argv)
    assert command == [
        "train_scripts/train_latent.py", "--tokenizer_name", "tok", "--push_to_hub", "--hub_private_repo",
        "--seed", "3",
    ]  # fmt: skip
    assert not any("hf_" in token for token in command)
    # a credential flag given without a value does not swallow the next flag
    assert public_command(["x", "--hub_token", "--seed", "1"]) == ["x", "--seed", "1"]


def test_a_saved_pipeline_records_the_version_and_the_command_that_saved_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_unconditional.py", "--hub_token", "hf_secret", "--seed", "1"])
    folder = save_pipeline(tmp_path / "p", unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="c")
    record = json.loads((folder / PROVENANCE_NAME).read_text())
    assert record["crispdiff_version"] == crispdiff.__version__
    assert record["command"] == ["train_unconditional.py", "--seed", "1"]
    assert {"python", "torch", "diffusers"} <= set(record["versions"])
    assert "hf_secret" not in "".join(p.read_text(errors="ignore") for p in folder.rglob("*.json"))

    # a later save describes itself: the record is replaced, not carried over like the folder's foreign files
    monkeypatch.setattr(sys, "argv", ["again.py"])
    save_pipeline(folder, unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="c")
    assert json.loads((folder / PROVENANCE_NAME).read_text())["command"] == ["again.py"]


def test_saved_configs_drop_credentials_but_keep_settings_that_merely_contain_the_word():
    """``to_dict`` used to drop every key containing "token", so a run's --tokenizer_name was lost from its saved
    config; credentials (hub_token, token, *_password, ...) must still go."""
    from crispdiff.core.config import without_secrets
    from crispdiff.sd.config import TextToImageLoRAConfig

    values = {"tokenizer_name": "openai/clip", "hub_token": "hf_x", "token": "t", "db_password": "p", "seed": 1}
    assert without_secrets(values) == {"tokenizer_name": "openai/clip", "seed": 1}
    config = TextToImageLoRAConfig(tokenizer_name="openai/clip", hub_token="hf_x")
    saved = config.to_dict()
    assert saved["tokenizer_name"] == "openai/clip" and "hub_token" not in saved
