"""Small torch programs for the GPU tests, written once per test session: a BERT-shaped encoder (input_ids
and attention_mask int64 [batch, seq] -> last_hidden_state fp16 [batch, seq, 32], pooler_output fp16
[batch, 32]) as an ExportedProgram and as an AOTInductor package. Imported by tests in this folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_BATCH, MAX_SEQ, HID, VOCAB = 8, 32, 32, 1000
OUTPUTS = ["last_hidden_state", "pooler_output"]


def encoder() -> Any:
    import torch

    class TinyEncoder(torch.nn.Module):
        """Per-token layers and a first-token pooler: padding leaves a request's own results unchanged."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, HID)
            self.dense = torch.nn.Linear(HID, HID)
            self.pool = torch.nn.Linear(HID, HID)

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
            h = torch.tanh(self.dense(h))
            return h, torch.tanh(self.pool(h[:, 0]))

    torch.manual_seed(0)
    return TinyEncoder().half().cuda().eval()


def aoti_load_problem(path: Path) -> str | None:
    """Load an AOTInductor package in a child process: None if it loads, else why not (a crash included)."""
    import subprocess
    import sys

    code = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True)"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode == 0:
        return None
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    return f"this torch cannot load an AOTInductor CUDA package (exit {proc.returncode}: {tail[0][:200]})"


def export(model: Any, out: Path, aoti: bool) -> Path:
    """Write the program (ExportedProgram, or AOTInductor package) with its signature; returns its path."""
    import torch

    from workers.engines.torch_program import package_aoti, save_exported

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=1, max=MAX_SEQ)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    example = (
        torch.ones(2, 8, dtype=torch.int64, device="cuda"),
        torch.ones(2, 8, dtype=torch.int64, device="cuda"),
    )
    with torch.no_grad():
        ep = torch.export.export(model, example, dynamic_shapes=dyn)
    path = out / ("tiny.pt2" if aoti else "tiny.ep.pt2")
    if aoti:
        package_aoti(ep, path, dyn, OUTPUTS)
    else:
        save_exported(ep, path, dyn, OUTPUTS)
    return path
