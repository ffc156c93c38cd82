"""Config loading and validation: every error names its key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.common.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    parse_config,
    reference,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    return ei.value.errors


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg.workers.device == "cpu" and cfg.pipeline.depth == 2
    assert cfg.buckets == (1, 2, 4, 8, 16, 32, 64)


def test_wrong_type_names_key_and_expectation() -> None:
    assert errors_of({"model": {"max_batch": "big"}}) == [
        'model.max_batch: expected a positive integer, got "big"'
    ]


def test_out_of_range() -> None:
    assert errors_of({"pipeline": {"depth": 0}}) == [
        "pipeline.depth: expected an integer from 1 to 16, got 0"
    ]
    assert errors_of({"monitor": {"stall_factor": 0.5}}) == [
        "monitor.stall_factor: expected a number above 1, got 0.5"
    ]


def test_unknown_keys_and_sections_are_reported_together() -> None:
    errs = errors_of({"model": {"maxbatch": 3}, "pipelin": {}})
    assert any(e.startswith("model.maxbatch: unknown key") for e in errs)
    assert any(e.startswith("pipelin: unknown section") for e in errs)


def test_bool_is_not_an_int_and_literal_choices_listed() -> None:
    assert errors_of({"workers": {"count": True}}) == [
        "workers.count: expected an integer from 1 to 256, got true"
    ]
    (err,) = errors_of({"pipeline": {"sync": "busy"}})
    assert err.startswith("pipeline.sync: expected one of 'spin', 'blocking'")


def test_missing_model_file(tmp_path: Path) -> None:
    (err,) = errors_of({"model": {"kind": "onnx", "path": str(tmp_path / "nope.onnx")}})
    assert err == f"model.path: file not found: {tmp_path / 'nope.onnx'}"


def test_cross_checks() -> None:
    errs = errors_of({"model": {"max_batch": 8}, "pipeline": {"buckets": [1, 4], "cuda_graphs": True}})
    assert "pipeline.buckets: the last bucket must equal model.max_batch (8)" in errs
    assert 'workers.device: CUDA graphs and MPS need device = "gpu"' in errs


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nkind = 1")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_run_dir_too_long_for_ipc() -> None:
    (err,) = errors_of({"orchestrator": {"run_dir": "/tmp/" + "x" * 100}})
    assert err.startswith("orchestrator.run_dir:") and "ipc socket paths" in err


@pytest.mark.parametrize(
    "name",
    [
        "cpu.toml",
        "cpu-sync.toml",
        "cpu-synthetic.toml",
        "4gpu-synthetic.toml",
        "gpu-shm.toml",
        "gpu-shm-mps.toml",
    ],
)
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_4gpu_config_is_valid_except_for_the_plan_it_needs() -> None:
    cfg = load_config(ROOT / "configs" / "4gpu.toml", check_files=False)
    assert cfg.workers.gpus == (0, 1, 2, 3) and cfg.model.kind == "tensorrt"
    with pytest.raises(ConfigError) as ei:
        load_config(ROOT / "configs" / "4gpu.toml")
    assert ei.value.errors == [f"model.path: file not found: {ROOT / 'models' / 'demo.plan'}"]


def test_round_trip_through_plain_data() -> None:
    cfg = load_config(ROOT / "configs" / "cpu.toml")
    assert from_dict(to_dict(cfg)) == cfg


def test_reference_lists_every_key() -> None:
    ref = reference()
    assert "`model.max_batch`" in ref and "`pipeline.max_queue_delay_us`" in ref


def test_shm_lease_cannot_exceed_the_arena() -> None:
    (err,) = errors_of({"transport": {"shm_mb": 16, "shm_max_lease_mb": 32}})
    assert err.startswith("transport.shm_max_lease_mb:") and "shm_mb = 16" in err
    assert parse_config({"transport": {"shm_mb": 0, "shm_max_lease_mb": 32}}).transport.shm_mb == 0  # off


def test_configs_written_as_toml_round_trip_any_string(tmp_path: Path) -> None:
    """Tests and benchmark scripts write configs with tomli-w. The hand-written writer it replaced sent a
    character outside the BMP as a JSON surrogate-pair escape ("\\ud83d\\ude00"), which tomllib rejects."""
    import tomllib

    from tests.conftest import write_config

    texts = [
        "plain",
        "tab\there",
        'quote " and \\\\',
        "emoji \U0001f600 and é",
        "ctl \x00\x01\x1f del \x7f",
        "\u2028",
        "\U0010ffff",
    ]
    for i, text in enumerate(texts):
        path = write_config(tmp_path, {"s": {"v": text}}, name=f"{i}.toml")
        assert tomllib.loads(path.read_text(encoding="utf-8"))["s"]["v"] == text, repr(text)
    name = "bench \U0001f600 \U0001d11e"  # a config the orchestrator loads, with the name it was given
    assert load_config(write_config(tmp_path, {"orchestrator": {"name": name}})).orchestrator.name == name


def test_reference_defaults_are_toml() -> None:
    """The README's config reference shows each default as the TOML value to write (one line each)."""
    import tomllib

    rows = [line.split(" | ") for line in reference().splitlines()[2:]]
    for _, _, default, _ in rows:
        value = default.strip("`")
        if value:
            tomllib.loads(f"v = {value}")  # raises on anything that is not a TOML value
    assert any(d == "`[256]`" for _, _, d, _ in rows) and any(d == '`""`' for _, _, d, _ in rows)
