"""Build models/demo.onnx: a small 3-layer MLP (64 -> 128 -> 128 -> 16) with fixed-seed weights.

Run once by developers (needs the `onnx` package from the test extra); the committed file is the output.
Two outputs, `logits` and `probs` (softmax), so clients see a multi-output model.
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
        nodes, "demo_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", OUT]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", OUT])],
        inits,
    )
    model = helper.make_model(graph, producer_name="orchestrator-demo", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "demo.onnx")
    args = ap.parse_args()
    build(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
