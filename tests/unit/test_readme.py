"""The README keeps the two set-up commands CI relies on, and its config reference matches the code."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.common.config import reference

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


def test_the_quick_start_installs_the_server_extra() -> None:
    """The first command sets up a fresh machine to run the main job: the core install alone is a client."""
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[server]' && orchestrator start configs/cpu.toml" in readme


def test_paths_named_in_the_docs_exist() -> None:
    """Every repository path the README and docs/ name in backticks is there (e.g. after a module moved)."""
    pattern = r"`((?:orchestrator|workers|scripts|tests|configs|deploy|docs|models|benchmarks)/[^`\s*<>]*)`"
    missing = [
        f"{doc.name}: {path}"
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for path in re.findall(pattern, doc.read_text())
        if not (ROOT / path.rstrip(":,.")).exists()
    ]
    assert not missing, missing
