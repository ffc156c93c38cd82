"""A client-only install (`pip install orchestrator`, no server extra) runs the CLI's client-side commands,
and a command that needs a package of the server extra says in one line what to install (exit 2), never a
traceback. A missing package is simulated in a fresh interpreter: `sys.modules[name] = None` makes every
import of it fail as if it were not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import commands
from orchestrator.common.config import parse_config
from orchestrator.common.errors import EngineError
from tests.conftest import DEMO_MODEL, ROOT, write_config

pytestmark = pytest.mark.timeout(120)

INSTALL = "pip install 'orchestrator[server]'"


def cli_without(missing: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in missing)
        + f"sys.argv[0] = 'orchestrator'\nfrom orchestrator.cli import main\nmain({list(args)!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def assert_one_line(p: subprocess.CompletedProcess, package: str) -> None:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"needs the {package} package" in lines[0] and INSTALL in lines[0], p.stderr


@pytest.fixture
def run_dir_config(short_tmp: Path) -> Path:
    """A synthetic CPU config in a temporary run directory (nothing runs there)."""
    return write_config(
        short_tmp,
        {
            "orchestrator": {"run_dir": str(short_tmp / "run")},
            "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 4},
        },
    )


def test_status_and_bench_without_rich(run_dir_config: Path) -> None:
    assert_one_line(cli_without(("rich",), "status", str(run_dir_config), "--once"), "rich")
    assert_one_line(cli_without(("rich",), "bench", str(run_dir_config)), "rich")
    # --json needs nothing of the server extra: the usual answer when nothing runs
    p = cli_without(("rich",), "status", str(run_dir_config), "--json")
    assert p.returncode == 1 and "no orchestrator is running" in p.stderr and "Traceback" not in p.stderr


def test_validate_and_start_an_onnx_config_without_onnxruntime() -> None:
    for command in ("validate", "start"):
        p = cli_without(("onnxruntime",), command, str(ROOT / "configs" / "cpu.toml"))
        assert_one_line(p, "onnxruntime")


def test_start_without_psutil_starts_nothing(run_dir_config: Path) -> None:
    for command in ("validate", "start"):
        assert_one_line(cli_without(("psutil",), command, str(run_dir_config)), "psutil")
    assert not (run_dir_config.parent / "run").exists()


def test_client_side_commands_need_no_server_package(short_tmp: Path) -> None:
    p = cli_without(commands.SERVER_PACKAGES, "keygen", str(short_tmp / "keys"))
    assert p.returncode == 0, p.stderr
    assert (short_tmp / "keys" / "server.key").exists()


def test_any_other_path_to_a_missing_server_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def needs_prometheus(args: object) -> int:
        raise ModuleNotFoundError("No module named 'prometheus_client'", name="prometheus_client.core")

    monkeypatch.setattr(commands, "cmd_keygen", needs_prometheus)
    with pytest.raises(SystemExit) as exit_:
        commands.main(["keygen", "/nonexistent"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"orchestrator: keygen needs the prometheus_client package, not installed here: {commands.SERVER_INSTALL}"
    ]


def test_an_onnx_worker_without_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.engines.onnx_cpu import OnnxCpuEngine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    cfg = parse_config({"model": {"kind": "onnx", "path": str(DEMO_MODEL)}}, check_files=False)
    with pytest.raises(EngineError, match=r"orchestrator\[server\]"):
        OnnxCpuEngine(cfg)
