"""--help says what a flag does and its default, in words: measured figures live in benchmarks/RESULTS.md and the
guides, where they are dated and can be rerun; in help text they go stale. Internal labels ("Plan C") mean nothing
to a user."""

from __future__ import annotations

import argparse
import ast
import re

import pytest
from test_flag_walk import REPO_ROOT, SCRIPTS, flag_actions, script_entry

#: What a measurement looks like in prose: a pointer to the results file, a percentage, a duration, a ratio "1.7x the
#: floor" / "~50x smaller", or an internal plan label. Defaults and thresholds ("default 3e-3", "below 28 dB") pass.
MEASUREMENT = re.compile(
    r"RESULTS|benchmarks/|\bPlan [A-D]\b|\d ?%|\b\d+(\.\d+)? ?(ms|s|seconds|min|minutes)\b"
    r"|\d(\.\d+)?x (the|smaller|larger|faster|slower|more|less|fewer)\b|\bmeasured:"
)


def texts_of(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The parser's description and every flag's help, each with what it belongs to."""
    texts = [("description", parser.description or "")]
    texts += [("/".join(action.option_strings), action.help or "") for action in parser._actions if action.help]
    return texts


def test_the_pattern_catches_what_it_must():
    for figure in (
        "SWD 1.71x the real floor",
        "about 80 s on a 2-core CPU",
        "3% of the run",
        "about 3 minutes",
        "(benchmarks/RESULTS.md, 'x')",
        "(Plan C)",
        "~50x smaller",
    ):
        assert MEASUREMENT.search(figure), figure
    for fine in ("default 3e-3", "below 28 dB PSNR", "average-pooled 2x", "4 x 10 steps", "x2 or x4", "0 = off"):
        assert not MEASUREMENT.search(fine), fine


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_quotes_no_measurements(script):
    """The script's docstring (its --help description) and every flag's help."""
    config_cls, _ = script_entry(script)
    docstring = ast.get_docstring(ast.parse((REPO_ROOT / "train_scripts" / script).read_text())) or ""
    texts = [("docstring", docstring)]
    texts += [("/".join(action.option_strings), action.help or "") for action in flag_actions(config_cls)]
    offending = [f"{owner}: {m.group(0)!r} in {text!r}" for owner, text in texts if (m := MEASUREMENT.search(text))]
    assert not offending, "\n".join(offending)


def test_crispdiff_command_help_quotes_no_measurements():
    from crispdiff.cli import build_parser

    parser = build_parser()
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    offending = [
        f"{name} {owner}: {m.group(0)!r} in {text!r}"
        for name, sub in subparsers[0].choices.items()
        for owner, text in texts_of(sub)
        if (m := MEASUREMENT.search(text))
    ]
    assert not offending, "\n".join(offending)
