"""The CUPTI driver journal on a GPU (issue 16): each check runs scripts/probe_cupti.py's child in a fresh
process, because CUPTI's subscription is process-wide and must come before the process's first CUDA call.

- another library's calls: a side thread registers host memory through cuda-bindings, torch allocates on
  another thread; each shows up with its API name, thread, calling library and times that match the
  caller's own clock readings;
- lazy function loads are journaled where modules load lazily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workers import cupti_native

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    cupti_native.compiler() is None, reason="no C compiler here to build the CUPTI callback"
)


def _child(what: str, loading: str) -> dict[str, Any]:
    pytest.importorskip("cupti", reason="cupti-python not installed (orchestrator[gpu])")
    env = {**os.environ, "CUDA_MODULE_LOADING": loading}
    env.pop("ORCHESTRATOR_CUPTI_VARIANT", None)  # the default: the compiled callback
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "probe_cupti.py"), "--child", what],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_another_librarys_calls_are_journaled_with_thread_library_and_matching_times() -> None:
    out = _child("basic", "EAGER")
    assert out["mode"] == "cupti", out["note"]
    assert out["stats"]["variant"] == "callback" and out["stats"]["callback_dropped"] == 0
    assert out["stats"]["lazy_load_records"] is False  # EAGER: no activity records at all
    reg = out["alignment"]["register"]
    assert reg is not None, out["entries_after_ready"]
    assert reg["api"].startswith("cuMemHostRegister") and reg["thread"] == "library-register"
    assert reg["library"].startswith("cuda.bindings")
    # The callback's times are taken inside the caller's: start after it, end before it, within 1 ms
    assert 0 <= reg["cupti_start_minus_caller_us"] < 1000
    assert 0 <= reg["caller_end_minus_cupti_end_us"] < 1000
    unreg = out["alignment"]["unregister"]
    assert unreg is not None and unreg["api"].startswith("cuMemHostUnregister")
    torch_alloc = out["alignment"].get("torch_alloc")
    if "torch" not in out:  # torch installed: its allocation, named as torch's
        assert torch_alloc is not None, out["entries_after_ready"]
        assert torch_alloc["thread"] == "library-torch" and "torch" in torch_alloc["library"]
    assert out["faults"] >= 2


def test_lazy_function_loads_are_journaled_where_modules_load_lazily() -> None:
    out = _child("lazy", "LAZY")
    assert out["loading_mode"] == "LAZY"
    assert out["by_op"].get("lazy_load", 0) > 0, out["all"]
    assert out["by_op"].get("module_load", 0) >= 1
