"""Build the committed demo models, with fixed-seed weights:
- models/demo.onnx: a small 3-layer MLP (64 -> 128 -> 128 -> 16); two outputs, `logits` and `probs`
  (softmax), so clients see a multi-output model.
- models/demo-seq.onnx: a BERT-shaped interface (`input_ids`, `attention_mask` int64 [batch, seq] ->
  `last_hidden_state` float [batch, seq, 16], `pooler_output` [batch, 16]) over per-token layers (an
  embedding, masking, a dense layer on each token; the pooler reads the first token), so padding a request
  to a longer sequence leaves its own positions' results exactly as they were.

Run once by developers (needs the `onnx` package from the test extra); the committed files are the output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

IN, HIDDEN, OUT = 64, 128, 16
SEED = 20261121


def build(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)

    def dense(name: str, n_in: int, n_out: int) -> list:
        w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
        return [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]

    inits = dense("fc1", IN, HIDDEN) + dense("fc2", HIDDEN, HIDDEN) + dense("fc3", HIDDEN, OUT)
    nodes = [
        helper.make_node("Gemm", ["features", "fc1_w", "fc1_b"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "fc2_w", "fc2_b"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "fc3_w", "fc3_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", IN])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", OUT]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", OUT]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, producer_name="orchestrator-demo", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


VOCAB, HID = 1000, 16


def build_seq(path: Path, seed: int = SEED) -> None:
    """The BERT-shaped demo (see the module docstring); dims named "batch" and "seq" in every tensor."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HID)).astype(np.float32)
    w = (rng.standard_normal((HID, HID)) / np.sqrt(HID)).astype(np.float32)
    wp = (rng.standard_normal((HID, HID)) / np.sqrt(HID)).astype(np.float32)
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(wp, "wp"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),  # [batch, seq, HID]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["last_hidden_state"]),
        helper.make_node("Slice", ["last_hidden_state", "zero", "one", "one"], ["first"]),  # [batch, 1, HID]
        helper.make_node("Squeeze", ["first", "one"], ["cls"]),
        helper.make_node("MatMul", ["cls", "wp"], ["pool"]),
        helper.make_node("Tanh", ["pool"], ["pooler_output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_seq",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HID]),
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", HID]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, producer_name="orchestrator-demo", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def main() -> None:
    models = Path(__file__).resolve().parent.parent / "models"
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=models / "demo.onnx")
    ap.add_argument("--seq-out", type=Path, default=models / "demo-seq.onnx")
    args = ap.parse_args()
    build(args.out)
    build_seq(args.seq_out)
    for p in (args.out, args.seq_out):
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
