"""README's two set-up commands stay first, and CI runs the README's test command verbatim."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert first_block, "README must start with a code block of the two set-up commands"
    return [ln for ln in first_block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_starts_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert all(c.startswith("pip install torch==2.13.0 && ") for c in cmds)


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_commands()[1]
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f".ci/run must contain the README's test command verbatim: {test_cmd!r}"
