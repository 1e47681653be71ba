"""User errors end every script and `crispdiff` command with one `error:` line naming the flag or path, status 2.

The scripts run as real subprocesses (that is where a traceback would show); tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from crispdiff import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CRISPDIFF_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _assert_one_line_user_error(result: subprocess.CompletedProcess, prog: str, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr[-2000:]
    line = error_lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    """A folder whose only images are 6x6 icons: nothing usable at the default --min_image_size 16."""
    folder = tmp_path / "icons"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (6, 6), (i, 0, 0)).save(folder / f"icon{i}.png")
    return folder


def test_training_scripts_report_user_errors_in_one_line(tmp_path, tiny_images):
    missing = tmp_path / "no-such-folder"
    script = str(REPO_ROOT / "train_scripts" / "train_unconditional.py")
    result = _run([script, "--train_data_dir", str(missing), "--output_dir", "out"], tmp_path)
    _assert_one_line_user_error(result, "train_unconditional.py", "--train_data_dir", str(missing))

    result = _run([script, "--train_data_dir", str(tiny_images), "--output_dir", "out"], tmp_path)
    _assert_one_line_user_error(result, "train_unconditional.py", "--min_image_size 16", "icon0.png")

    result = _run([script, "--no_such_flag", "1"], tmp_path)
    _assert_one_line_user_error(result, "train_unconditional.py", "--no_such_flag")

    finished = tmp_path / "finished"
    (finished / "pipeline").mkdir(parents=True)
    (finished / "pipeline" / "model_index.json").write_text("{}")
    result = _run([script, "--output_dir", str(finished)], tmp_path)
    _assert_one_line_user_error(result, "train_unconditional.py", "--overwrite_output_dir", str(finished))


def test_vae_and_latent_scripts_report_user_errors_in_one_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    vae_script = str(REPO_ROOT / "train_scripts" / "train_vae.py")
    result = _run([vae_script, "--train_data_dir", str(missing), "--output_dir", "vae"], tmp_path)
    _assert_one_line_user_error(result, "train_vae.py", "--train_data_dir", str(missing))

    latent_script = str(REPO_ROOT / "train_scripts" / "train_latent.py")
    result = _run([latent_script, "--vae_trainable", "decoder", "--output_dir", "latent"], tmp_path)
    _assert_one_line_user_error(result, "train_latent.py", "--vae_trainable decoder")


def test_crispdiff_command_reports_a_folder_that_is_not_a_pipeline(tmp_path, tiny_images):
    result = _run(["-m", "crispdiff.cli", "sample", str(tiny_images), "--output_dir", "grids"], tmp_path)
    _assert_one_line_user_error(result, "crispdiff sample", str(tiny_images), "not a saved pipeline folder")
    result = _run(["-m", "crispdiff.cli", "evaluate", "--samples_npz", "missing.npz"], tmp_path)
    _assert_one_line_user_error(result, "crispdiff evaluate", "--samples_npz", "missing.npz")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sample", "{missing}"], "does not exist"),
        (["sample", "{other}"], "not a crispdiff"),
        (["sample", "{missing}", "--steps", "0"], "--steps"),
        (["sample", "{missing}", "--dtype", "fp8"], "--dtype"),
        (["evaluate"], "--samples_npz"),
        (["evaluate", "{missing}", "--output_dir", "x"], "does not exist"),
        (["add-sr", "{missing}", "--sr_model", "x.pth"], "was not changed"),
        (["push", "{missing}", "--repo_id", "me/model"], "does not exist"),
    ],
)
def test_every_crispdiff_command_returns_2_with_one_line(tmp_path, capsys, argv, expected):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    values = {"missing": str(tmp_path / "missing"), "other": str(other)}
    argv = [arg.format(**values) for arg in argv]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own flag errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"crispdiff {argv[0]}: error: ") and expected in lines[0], err


_HOOKED = """
import atexit, sys
from crispdiff.core.errors import PathError, install_user_error_hook
install_user_error_hook("prog")
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "user":
    raise PathError("--train_data_dir /nowhere does not exist")
open("/no/such/file/crispdiff-bug")  # a bug's FileNotFoundError, not a path the user gave
"""


def test_only_user_errors_become_one_line_and_atexit_still_runs(tmp_path):
    """A user error: one line, status 2, and the atexit handlers (trackers, process group) still run. A builtin
    FileNotFoundError from a bug keeps its traceback."""
    user = _run(["-c", _HOOKED, "user"], tmp_path)
    _assert_one_line_user_error(user, "prog", "--train_data_dir /nowhere")
    assert "atexit ran" in user.stdout
    bug = _run(["-c", _HOOKED, "bug"], tmp_path)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "FileNotFoundError" in bug.stderr
