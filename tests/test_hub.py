"""Model cards and Hub upload: the card's metadata parses and says the right things, secrets stay out, checkpoints
and logs are not uploaded, and every way an upload can fail here (offline, no token, no network) fails clearly and
leaves the folder intact. No network is used: the upload is tested up to the failing call."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from spandrel.architectures.Compact import Compact
from tiny_models import base_config, tiny_unet

from crispdiff.commands import push
from crispdiff.publish.card import BASE_TAGS, write_model_card
from crispdiff.publish.export import save_pipeline
from crispdiff.publish.hub import (
    UPLOAD_IGNORE_PATTERNS,
    HubUploadError,
    files_to_upload,
    push_to_hub,
    upload_operations,
)
from crispdiff.superres.load import SpandrelSRModel

SECRET = "hf_thisIsNotARealTokenButMustNeverBePublished"


TRAINING = {
    "resolution": 16,
    "dataset_name": "someone/noto-emoji",
    "learning_rate": 2e-4,
    "hub_token": SECRET,
    "push_to_hub": True,
    "seed": 0,
}


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    """A saved pipeline folder used as a training output folder: with checkpoints, logs and a sample grid."""
    torch.manual_seed(1)
    sr = SpandrelSRModel.from_state_dict({"params": Compact(num_feat=4, num_conv=1, upscale=2).state_dict()})
    folder = save_pipeline(
        tmp_path / "run",
        unet=tiny_unet(),
        scheduler_base_config=base_config(),
        beta_schedule="cosine",
        sr_model=sr,
        training_config=TRAINING,
        sample_grid=PIL.Image.new("RGB", (32, 32), (200, 30, 30)),
    )
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(b"resumable state")
    (folder / "logs" / "train").mkdir(parents=True)
    (folder / "logs" / "train" / "events.out.tfevents.1").write_bytes(b"tensorboard")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_model_card_metadata_and_content(pipeline_dir):
    path = write_model_card(pipeline_dir, repo_id="someone/tiny-emoji", license="apache-2.0")
    assert path == pipeline_dir / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert set(BASE_TAGS) | {"pixel-diffusion", "super-resolution"} <= set(data["tags"])
    assert data["datasets"] == ["someone/noto-emoji"]
    text = path.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "diffusers" and "crispdiff" in front["tags"]

    body = card.text
    assert "# tiny-emoji" in body and "![samples](samples.png)" in body
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-emoji", trust_remote_code=True)' in body
    assert "spandrel" in body and "RealESRGAN Compact x2" in body
    config_block = body.split("```json\n")[1].split("\n```")[0]
    published = json.loads(config_block)
    assert published["learning_rate"] == 2e-4 and published["dataset_name"] == "someone/noto-emoji"
    assert "hub_token" not in published and SECRET not in text, "tokens are never written into the card"


def test_model_card_without_optional_files(tmp_path):
    """No training config, no sample grid, no SR model, a local dataset: the card still renders and parses."""
    folder = save_pipeline(
        tmp_path / "bare", unet=tiny_unet(), scheduler_base_config=base_config(), beta_schedule="cosine"
    )
    write_model_card(folder, {"train_data_dir": str(tmp_path), "dataset_name": str(tmp_path)})
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "other" and card.data.datasets is None
    assert "super-resolution" not in card.data.tags and "pixel-diffusion" in card.data.tags
    assert "samples.png" not in card.text and "spandrel" not in card.text
    write_model_card(folder)  # reads crispdiff_training.json when present, else says it was not recorded
    assert "Not recorded with this pipeline." in (folder / "README.md").read_text()


def test_the_cards_licence_is_the_one_asked_for_else_the_runs_else_other(pipeline_dir):
    """`crispdiff push --license` wins; without it the card keeps the --license the model was trained with (a push
    must not reset it to 'other'); with neither it is 'other', said in words."""
    training = dict(TRAINING, license="apache-2.0")
    assert ModelCard.load(write_model_card(pipeline_dir, training)).data.license == "apache-2.0"
    assert ModelCard.load(write_model_card(pipeline_dir, training, license="mit")).data.license == "mit"
    card = ModelCard.load(write_model_card(pipeline_dir, TRAINING))
    assert card.data.license == "other" and "License: not specified" in card.text


def test_the_card_shows_the_final_validation_figures_and_who_made_the_folder(pipeline_dir, monkeypatch):
    card = ModelCard.load(write_model_card(pipeline_dir)).text
    assert "## Quality" in card and "Not measured by the run" in card, "no figures: the card says so"
    assert "Made with crispdiff" in card and "crispdiff_provenance.json" in card
    quality = {"samples": "the final sample grid: 4 samples", "reference": "256 training images", "step": 700,
               "metrics": {"swd_avg": 12.345678, "hf_energy_ratio": 0.91}}  # fmt: skip
    (pipeline_dir / "crispdiff_quality.json").write_text(json.dumps(quality))
    card = ModelCard.load(write_model_card(pipeline_dir)).text
    assert "(step 700) on the final sample grid: 4 samples, against 256 training images" in card
    assert "| swd_avg | 12.35 |" in card and "| hf_energy_ratio | 0.91 | high-frequency energy" in card


def test_upload_leaves_out_checkpoints_logs_and_staging(pipeline_dir):
    (pipeline_dir / ".run.tmp-1234").mkdir()
    (pipeline_dir / ".run.tmp-1234" / "x").write_bytes(b"staging")
    files = files_to_upload(pipeline_dir)
    assert "model_index.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert "sr_model/sr_model.py" in files and "samples.png" in files and "pipeline_crispdiff.py" in files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/", "."))]
    assert "checkpoint-*" in UPLOAD_IGNORE_PATTERNS


def test_uploaded_training_config_has_no_secrets(pipeline_dir):
    """The local crispdiff_training.json keeps what the run was given; the uploaded copy drops the token."""
    local = json.loads((pipeline_dir / "crispdiff_training.json").read_text())
    assert local.get("hub_token") == SECRET, "export stores the config as given (this test needs the secret there)"
    operations = {op.path_in_repo: op.path_or_fileobj for op in upload_operations(pipeline_dir)}
    assert sorted(operations) == files_to_upload(pipeline_dir)
    uploaded = json.loads(operations["crispdiff_training.json"])
    assert "hub_token" not in uploaded and uploaded["learning_rate"] == 2e-4
    assert operations["model_index.json"] == str(pipeline_dir / "model_index.json")
    contents = [op if isinstance(op, bytes) else Path(op).read_bytes() for op in operations.values()]
    assert not [c for c in contents if SECRET.encode() in c], "no uploaded file carries the token"


def test_push_offline_fails_clearly_and_keeps_the_folder(pipeline_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(pipeline_dir)
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE=1") as info:
        push_to_hub(pipeline_dir, "someone/tiny-emoji", token="hf_dummy")
    assert "nothing was uploaded" in str(info.value) and str(pipeline_dir) in str(info.value)
    after = snapshot(pipeline_dir)
    assert after.pop("README.md") and after == before, "only the model card was (re)written"
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(pipeline_dir, "a/b/c", token="hf_dummy")


def run_push(*argv: str) -> int:
    """`crispdiff push ...` through the command module (the same parser and run() the console command uses)."""
    parser = argparse.ArgumentParser()
    push.add_parser(parser.add_subparsers(dest="command"))
    return push.run(parser.parse_args(["push", *argv]))


@pytest.fixture
def no_saved_token(tmp_path, monkeypatch):
    """No HF_TOKEN and no cached login, whatever the machine has (the token file path is redirected)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))


def test_push_without_token_fails_clearly(pipeline_dir, no_saved_token, capsys):
    before = snapshot(pipeline_dir)
    assert run_push(str(pipeline_dir), "--repo_id", "someone/tiny-emoji") == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "nothing was uploaded" in err
    after = snapshot(pipeline_dir)
    assert after.pop("README.md") and after == before


def test_push_without_network_fails_clearly(pipeline_dir, monkeypatch, capsys):
    """Online mode and a token, but an endpoint nobody listens on: the real create_repo call fails and is reported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    before = snapshot(pipeline_dir)
    assert run_push(str(pipeline_dir), "--repo_id", "someone/tiny-emoji", "--token", "hf_dummy", "--private") == 1
    err = capsys.readouterr().err
    assert "upload of" in err and "failed" in err and "is intact" in err
    after = snapshot(pipeline_dir)
    assert after.pop("README.md") and after == before


def test_push_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert run_push(str(tmp_path), "--repo_id", "someone/x", "--token", "hf_dummy") == 2
    assert "model_index.json" in capsys.readouterr().err
