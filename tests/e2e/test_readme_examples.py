"""The README's Python examples run as pasted: each block that talks to `configs/cpu.toml` runs in a fresh
interpreter against that config started in a temporary run directory (the only change: the config path).
And results are read-only, as the README says, on both data paths."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from orchestrator.client import Client
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)

BLOCKS = [
    b
    for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    if "configs/cpu.toml" in b
]


@pytest.fixture
def cpu_config(short_tmp: Path, orchestrator_factory) -> Path:
    raw = tomllib.loads((ROOT / "configs" / "cpu.toml").read_text())
    raw["orchestrator"]["run_dir"] = str(short_tmp / "run")
    raw["model"]["path"] = str(ROOT / "models" / "demo.onnx")
    path = short_tmp / "cpu.toml"
    path.write_text(tomli_w.dumps(raw))
    orchestrator_factory(path)
    return path


def test_the_readme_has_examples_to_run() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_as_pasted(cpu_config: Path, index: int) -> None:
    code = BLOCKS[index].replace("configs/cpu.toml", str(cpu_config))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"README example {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-2000:]}"


def test_results_are_read_only_on_both_paths(cpu_config: Path) -> None:
    x = np.random.rand(4, 64).astype(np.float32)
    for shm in (True, False):
        with Client(cpu_config, shm=shm) as c:
            for out in (c.infer(x), c.submit(x).result(30)):
                assert not any(a.flags.writeable for a in out.values()), shm
        with Client(cpu_config, shm=shm, copy_results=True) as c:
            assert all(a.flags.writeable for a in c.infer(x).values())
