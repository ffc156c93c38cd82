"""Regenerate the config reference table in README.md from orchestrator/common/config.py (run after
editing it).

tests/unit/test_readme.py fails when the README's table and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.common.config import reference  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{reference()}\n{END}{tail}")
    print("README.md config reference updated")


if __name__ == "__main__":
    main()
