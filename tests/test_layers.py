"""The layer rule of docs/ARCHITECTURE.md: every crispdiff import (lazy ones inside functions included) goes to the
module's own package or to a lower layer, so packages never import each other both ways and there are no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crispdiff"

#: docs/ARCHITECTURE.md's table; a dotted key is a module placed below the rest of its package (a concept's loader).
LAYERS = {
    "pipelines": 0,
    "core": 1,
    "data": 2,
    "diffusion": 2,
    "latent.vae": 2,
    "publish": 3,
    "superres.load": 4,
    "evaluate": 4,
    "train": 5,
    "vae": 6,
    "transfer": 6,
    "latent": 7,
    "superres": 7,
    "sd": 8,
    "cli": 9,
    "commands": 9,
    "__init__": 9,
    "__main__": 9,
}


def layer_of(module: str) -> tuple[int, str]:
    """The layer of ``crispdiff.X.Y`` (longest key that prefixes it) and its package ``X``."""
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key], parts[0]
    raise KeyError(f"{module}: no layer in LAYERS (add its package to docs/ARCHITECTURE.md and here)")


def crispdiff_imports(path: Path) -> list[str]:
    """Every ``crispdiff.*`` module the file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("crispdiff.")]


def upward_imports(root: Path) -> list[str]:
    """``importer -> imported`` for each import that breaks the rule."""
    broken = []
    for path in sorted(root.rglob("*.py")):
        module = "crispdiff." + ".".join(path.relative_to(root).with_suffix("").parts)
        own_layer, own_package = layer_of(module)
        for target in crispdiff_imports(path):
            layer, package = layer_of(target)
            if layer > own_layer or (layer == own_layer and package != own_package):
                broken.append(f"{module} (layer {own_layer}) -> {target} (layer {layer})")
    return broken


def test_imports_only_go_down_the_layers():
    assert upward_imports(PACKAGE) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a low module importing a higher one (even lazily) is reported."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "io.py").write_text("def f():\n    from crispdiff.train.loop import LoopTrainer\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.py").write_text("from crispdiff.diffusion.schedule import NoiseSchedule\n")
    assert upward_imports(tmp_path) == [
        "crispdiff.core.io (layer 1) -> crispdiff.train.loop (layer 5)",
        "crispdiff.data.x (layer 2) -> crispdiff.diffusion.schedule (layer 2)",
    ]


@pytest.mark.parametrize("module", ["crispdiff.latent.vae", "crispdiff.superres.load"])
def test_the_loaders_below_their_package_are_imported_from_below(module):
    """The two loaders that sit below their package: the layer table says so (a move would need the docs too)."""
    assert layer_of(module)[0] < layer_of(module.rsplit(".", 1)[0] + ".trainer")[0]
