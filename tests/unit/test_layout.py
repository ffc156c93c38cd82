"""The package layout by role holds: each part imports only what its role allows, and nothing loops.

    orchestrator.common      <- every other part (wire protocol, messages, errors, config, ...)
    orchestrator.client      -> common                (the user's process)
    orchestrator.supervisor  -> common                (the supervisor process)
    workers                  -> common                (the worker processes)
    orchestrator.cli         -> anything              (the user's shell)

Checked twice: statically, from every import statement in the sources (lazy ones inside functions and
TYPE_CHECKING blocks included), and for real, by importing each part in a fresh interpreter and looking at
what it loaded (sys.modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("orchestrator", "workers")

#: The parts a part may import (besides itself).
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "supervisor": {"common"},
    "workers": {"common"},
    "cli": {"common", "client", "supervisor", "workers"},
}

#: Third-party packages of the server extra: never loaded by a client-only import.
SERVER_ONLY = ("rich", "prometheus_client", "onnxruntime", "psutil", "setproctitle", "tomli_w")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.with_suffix("").relative_to(ROOT).parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _part(module: str) -> str | None:
    """The role a module belongs to (None: the bare top-level package `orchestrator`)."""
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    return parts[1] if len(parts) > 1 else None


def _imports(module: str) -> set[str]:
    """The package modules `module` imports anywhere in its source: `from pkg import name` counts as the
    submodule pkg.name when there is one, else as pkg (its __init__)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:
                    out.add(sub)
                elif node.module in MODULES:
                    out.add(node.module)
    out.discard(module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_belongs_to_a_part() -> None:
    assert {_part(m) for m in MODULES} == {None, *ALLOWED}
    bare = [m for m in MODULES if _part(m) is None]
    assert bare == ["orchestrator"], "no module outside the parts (one way to import each thing)"
    assert not (ROOT / "orchestrator" / "__init__.py").read_text().strip(), (
        "orchestrator/__init__.py stays empty"
    )


def test_parts_import_only_what_their_role_allows() -> None:
    wrong = sorted(
        f"{m} -> {dep}"
        for m, deps in GRAPH.items()
        for dep in deps
        if _part(m) and _part(dep) != _part(m) and _part(dep) not in ALLOWED[_part(m) or ""]
    )
    assert not wrong, "imports across roles that the layout forbids:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*path[path.index(v) :], v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_loop_between_modules() -> None:
    """Neither at module level nor through a lazy import (control <-> supervisor and serve_loop -> worker
    were two)."""
    assert not _cycles(GRAPH), _cycles(GRAPH)


def test_no_import_loop_between_parts() -> None:
    parts: dict[str, set[str]] = {p: set() for p in ALLOWED}
    for m, deps in GRAPH.items():
        for dep in deps:
            a, b = _part(m), _part(dep)
            if a and b and a != b:
                parts[a].add(b)
    assert not _cycles(parts), parts
    assert parts["common"] == set()


def test_the_cycle_check_finds_a_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# --- for real: what importing each part loads --------------------------------------------------------


def _loaded(code: str) -> set[str]:
    """Top-level names and package modules in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    )
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _under(module: str, names: tuple[str, ...]) -> bool:
    """Whether `module` is one of `names` or inside one of them."""
    return any(module == n or module.startswith(n + ".") for n in names)


def _submodules(part: str) -> list[str]:
    return sorted(m for m in MODULES if (_part(m) == part) and not m.endswith("__main__"))


def test_a_client_import_loads_no_server_code() -> None:
    loaded = _loaded(
        "from orchestrator.client import AsyncClient, Client\n"
        + "\n".join(f"import {m}" for m in _submodules("client"))
    )
    assert "orchestrator.client.core" in loaded
    server = sorted(
        m
        for m in loaded
        if _under(m, ("orchestrator.supervisor", "orchestrator.cli", "workers", *SERVER_ONLY))
    )
    assert not server, f"a client-only import loaded {server}"


#: The supervisor never imports CUDA (nor the engines' libraries): it must outlive a wedged GPU stack.
CUDA_STACK = ("cuda", "tensorrt", "tensorrt_lean", "torch", "onnxruntime")


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        (
            "common",
            ("orchestrator.client", "orchestrator.supervisor", "orchestrator.cli", "workers", *SERVER_ONLY),
        ),
        ("supervisor", ("orchestrator.client", "orchestrator.cli", "workers", "rich", *CUDA_STACK)),
        ("workers", ("orchestrator.client", "orchestrator.supervisor", "orchestrator.cli", "rich")),
    ],
)
def test_each_part_loads_only_its_own_and_common(part: str, forbidden: tuple[str, ...]) -> None:
    mods = _submodules(part)
    if part == "workers":  # GPU engines load CUDA bindings: the CPU side, and the registry that picks them
        mods = [m for m in mods if not _under(m, ("workers.cuda", "workers.engines"))]
        mods += ["workers.engines.registry", "workers.engines.synthetic_cpu", "workers.engines.onnx_cpu"]
    loaded = _loaded("\n".join(f"import {m}" for m in mods))
    assert set(mods) <= loaded
    bad = sorted(m for m in loaded if _under(m, forbidden))
    assert not bad, f"importing {part} loaded {bad}"


def test_entry_points_resolve() -> None:
    """The console script `orchestrator.cli:main`, `python -m orchestrator.cli`, `python -m
    orchestrator.supervisor` (what `start --detach` runs) and `python -m workers.worker` (what the supervisor
    spawns)."""
    from orchestrator.cli import main
    from orchestrator.cli.commands import main as commands_main

    assert main is commands_main
    for module, usage in (
        ("orchestrator.cli", "usage: "),
        ("orchestrator.supervisor", "usage: python -m orchestrator.supervisor"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert proc.returncode == 2 and usage in proc.stderr, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "workers.worker"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 2 and "usage: python -m workers.worker" in proc.stderr, proc.stderr
