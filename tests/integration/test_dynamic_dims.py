"""Dynamic non-batch dimensions on CPU workers (models/demo-seq.onnx: input_ids and attention_mask int64
[batch, seq]): requests of mixed sequence lengths from several clients, over frames and shared memory,
give exactly what ONNX Runtime gives on each request alone; requests are grouped by padding bucket and
padded; sizes outside the range, and mismatched sizes, are typed errors naming the dimension; bad
[[model.dims]] configs are refused with one line."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from orchestrator.client import Client
from orchestrator.common.config import parse_config
from orchestrator.common.errors import ConfigError, EngineError, InvalidInputError
from tests.conftest import ROOT, cli, write_config
from workers.engines.onnx_cpu import OnnxCpuEngine
from workers.pipeline import Pipeline, Request

pytestmark = pytest.mark.timeout(300)

SEQ_MODEL = ROOT / "models" / "demo-seq.onnx"
SEQ_DIM = {
    "name": "seq",
    "min": 1,
    "max": 128,
    "buckets": [32, 64, 128],
    "pad": {"input_ids": 0, "attention_mask": 0},
}


def seq_config(tmp: Path, dims: list | None = None, count: int = 2) -> Path:
    model: dict = {"kind": "onnx", "path": str(SEQ_MODEL), "max_batch": 64}
    if dims is not None:
        model["dims"] = dims
    return write_config(
        tmp,
        {
            "workers": {"device": "cpu", "count": count},
            "model": model,
            "pipeline": {"depth": 2, "max_queue_delay_us": 5000},
            "transport": {"shm_mb": 16, "shm_max_lease_mb": 4},
        },
    )


def make_request(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 1000, (rows, length), dtype=np.int64)
    mask = np.ones((rows, length), np.int64)
    mask[:, int(rng.integers(1, length + 1)) :] = 0  # some trailing positions already masked by the caller
    return {"input_ids": ids, "attention_mask": mask}


def test_mixed_lengths_from_several_clients_match_onnx_runtime_alone(short_tmp, orchestrator_factory) -> None:
    config = seq_config(short_tmp, [SEQ_DIM])
    orchestrator_factory(config)
    session = ort.InferenceSession(str(SEQ_MODEL), providers=["CPUExecutionProvider"])
    failures: list[str] = []

    def client(seed: int, shm: bool) -> None:
        rng = np.random.default_rng(seed)
        with Client(config, shm=shm) as c:
            sent = []
            for _ in range(60):
                req = make_request(rng, int(rng.integers(1, 5)), int(rng.integers(1, 129)))
                sent.append((req, c.submit(req)))
            for req, fut in sent:
                got = fut.result(timeout=60)
                want = session.run(["last_hidden_state", "pooler_output"], req)
                for name, w in zip(("last_hidden_state", "pooler_output"), want, strict=True):
                    if got[name].shape != w.shape or not np.array_equal(got[name], w):
                        failures.append(f"seed {seed} shm {shm}: {name} {got[name].shape} vs {w.shape}")

    threads = [threading.Thread(target=client, args=(seed, seed % 2 == 0)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_sizes_outside_the_range_and_mismatched_sizes_are_typed_errors(
    short_tmp, orchestrator_factory
) -> None:
    config = seq_config(short_tmp, [SEQ_DIM], count=1)
    orchestrator_factory(config)
    for shm in (False, True):
        with Client(config, shm=shm) as c:
            with pytest.raises(InvalidInputError, match="dimension 'seq' is 129; the model takes 1 to 128"):
                c.infer(
                    {
                        "input_ids": np.zeros((1, 129), np.int64),
                        "attention_mask": np.zeros((1, 129), np.int64),
                    }
                )
            with pytest.raises(
                InvalidInputError, match="dimension 'seq' is 9 in tensor 'attention_mask' but 8"
            ):
                c.infer(
                    {"input_ids": np.zeros((1, 8), np.int64), "attention_mask": np.zeros((1, 9), np.int64)}
                )
            ok = c.infer(
                {"input_ids": np.zeros((2, 128), np.int64), "attention_mask": np.ones((2, 128), np.int64)}
            )
            assert ok["last_hidden_state"].shape == (2, 128, 16)


def _pipeline(dims: list) -> Pipeline:
    cfg = parse_config(
        {"model": {"kind": "onnx", "path": str(SEQ_MODEL), "max_batch": 8, "dims": dims}}, check_files=False
    )
    engine = OnnxCpuEngine(cfg)
    p = Pipeline(engine, depth=2, max_queue=64, max_queue_delay_us=0, buckets=(8,))
    engine.warmup(p.slots, p.buckets)
    return p


def _offer(p: Pipeline, rid: int, req: dict[str, np.ndarray]) -> None:
    rows = p.check(req)
    r = Request(None, rid, req, rows, 0)
    r.dims = p.bound
    r.key = p.key_of(r.dims)
    assert p.offer(r)


def test_requests_are_batched_by_bucket_padded_and_cut_back() -> None:
    p = _pipeline([SEQ_DIM])
    rng = np.random.default_rng(3)
    reqs = {rid: make_request(rng, 2, length) for rid, length in enumerate((10, 40, 20, 100, 30))}
    for rid, req in reqs.items():
        _offer(p, rid, req)
    expired: list = []
    batch = p.launch_next(0, expired.append)
    # The oldest request's bucket (32) picks the batch: 10 and 20 and 30 join it, 40 and 100 keep their place.
    assert [r.request_id for r, _ in batch.parts] == [0, 2, 4] and batch.slot.dims == (32,)
    assert [r.request_id for r in p.queue] == [1, 3]
    session = p.engine.session
    p.complete_oldest(lambda b: None)
    for req, off in batch.parts:
        want = session.run(["last_hidden_state"], reqs[req.request_id])[0]
        got = p.output_view(batch, "last_hidden_state", off, req)
        assert got.shape == want.shape and np.array_equal(got, want)
    # Padded positions hold the pad value (0) in the staged inputs.
    staged = batch.slot.inputs["input_ids"].reshape(-1)[: batch.padded * 32].reshape(batch.padded, 32)
    assert not staged[0:2, 10:].any()
    nxt = p.launch_next(0, expired.append)
    assert [r.request_id for r, _ in nxt.parts] == [1] and nxt.slot.dims == (64,)


def test_without_buckets_only_equal_sizes_share_a_batch() -> None:
    p = _pipeline([{"name": "seq", "max": 128}])
    rng = np.random.default_rng(4)
    for rid, length in enumerate((10, 11, 10)):
        _offer(p, rid, make_request(rng, 1, length))
    batch = p.launch_next(0, lambda r: None)
    assert [r.request_id for r, _ in batch.parts] == [0, 2] and batch.slot.dims == (10,)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (None, "dimension 'seq' with no upper bound"),
        ([{"name": "sequence", "max": 64}], "no dynamic input dimension 'sequence'"),
        ([{"name": "seq", "max": 64, "buckets": [16, 32]}], "the last bucket must equal max (64)"),
        ([{"name": "seq", "max": 64, "pad": {"token_type_ids": 0}}], "'token_type_ids' is not an input"),
        ([{"name": "seq", "max": 64, "follow": {"pooler_output": 2}}], "has no axis 2"),
    ],
)
def test_bad_dims_config_is_one_line_at_validate_and_start(short_tmp, dims, message) -> None:
    config = seq_config(short_tmp, dims)
    for command in ("validate", "start"):
        proc = cli(command, str(config))
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_dims_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "model": {
                    "kind": "onnx",
                    "path": "m.onnx",
                    "dims": [{"name": "seq", "max": 8, "min": 9}, {"name": "seq", "buckets": [4, 2]}],
                }
            },
            check_files=False,
        )
    text = str(err.value)
    assert "model.dims[0]: min 9 exceeds max 8" in text
    assert "model.dims[1].name: dimension 'seq' is configured twice" in text
    assert "model.dims[1].buckets: expected strictly increasing" in text
    with pytest.raises(ConfigError, match="synthetic model has no dynamic dimensions"):
        parse_config({"model": {"dims": [{"name": "seq", "max": 8}]}}, check_files=False)


def test_torch_without_torch_is_one_line_naming_the_extra(short_tmp) -> None:
    pt2 = short_tmp / "m.pt2"
    pt2.write_bytes(b"not used: torch is checked first")
    config = write_config(
        short_tmp, {"workers": {"device": "gpu"}, "model": {"kind": "torch", "path": str(pt2)}}
    )
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed here; the CI image has none")
    except ImportError:
        pass
    proc = cli("validate", str(config))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "orchestrator[torch]" in proc.stderr and "Traceback" not in proc.stderr and len(lines) == 2, (
        proc.stderr
    )


def test_engine_error_names_what_to_configure() -> None:
    cfg = parse_config({"model": {"kind": "onnx", "path": str(SEQ_MODEL)}}, check_files=False)
    with pytest.raises(EngineError, match=r"\[\[model.dims\]\] name = \"seq\", max = \.\.\."):
        OnnxCpuEngine(cfg)
