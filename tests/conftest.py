"""Shared test fixtures: offline hub, few threads, and the path to ../shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """`../shared` beside the checkout, or wherever CRISPDIFF_SHARED points."""
    return Path(os.environ.get("CRISPDIFF_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    """The full Noto emoji 64 px train folder from ../shared; skips the test when it is absent."""
    path = shared_dir() / "data" / "noto-emoji-64" / "train"
    if not (path / "metadata.jsonl").exists():
        pytest.skip(f"real emoji data not found at {path} (set CRISPDIFF_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def openmoji_dir() -> Path:
    """OpenMoji 64 px from ../shared (another design family than the embedded Noto emoji); skips when absent."""
    path = shared_dir() / "data" / "openmoji-64" / "train"
    if not (path / "metadata.jsonl").exists():
        pytest.skip(f"OpenMoji data not found at {path} (set CRISPDIFF_SHARED to the shared/ folder)")
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test's runs build their own Accelerator (with their own
    precision), as a real training process does once (and hands to each of its stages)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(autouse=True)
def _few_threads():
    """Two cores on CI: keep torch from oversubscribing them."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, int(os.environ.get("CRISPDIFF_TEST_THREADS", "2"))))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def _private_modules_cache(tmp_path_factory):
    """diffusers copies trust_remote_code modules into HF_MODULES_CACHE; keep each test module's copies apart."""
    import sys

    from diffusers.utils import dynamic_modules_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        patch.setattr(sys, "path", list(sys.path))
        yield
