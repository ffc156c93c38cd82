"""The README keeps the two set-up commands CI relies on, and its config reference matches the code."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import reference

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_matches_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert reference() in readme, "run: python scripts/update_readme_config.py"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_cmd.strip() in readme
    assert "orchestrator start configs/cpu.toml" in readme
