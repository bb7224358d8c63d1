"""Expected outputs, compared byte for byte.

After a deliberate change to an output, regenerate them and review the diff:

    JITGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/policy/test_lint.py \
        tests/policy/test_explain.py tests/cli/test_policy_cli.py
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
EXAMPLE = Path("deploy/example/policy.toml")
WIDENED = Path("deploy/example/policy-widened.toml")
BROKEN = Path("tests/policy/golden/broken.toml")
"""Paths relative to ROOT, so that the file names in outputs are the same everywhere."""


def check(name: str, actual: str) -> None:
    """Assert actual is the golden file name's text, or write it when regenerating."""
    path = HERE / name
    if os.environ.get("JITGATE_UPDATE_GOLDEN") == "1":
        path.write_text(actual, encoding="utf-8", newline="")
        return
    assert path.is_file(), f"{path} is missing; regenerate with JITGATE_UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, (
        f"{name} differs; if intended, regenerate with JITGATE_UPDATE_GOLDEN=1"
    )
