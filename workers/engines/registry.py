"""Maps a validated config to an engine instance. Runs in the worker process before READY.

Imports are lazy so that a CPU worker never imports CUDA, TensorRT or NVML.
"""

from __future__ import annotations

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from workers.engines.base import Engine


def create_engine(cfg: Config) -> Engine:
    kind, device = cfg.model.kind, cfg.workers.device
    if device == "cpu":
        if kind == "synthetic":
            from workers.engines.synthetic_cpu import SyntheticCpuEngine

            return SyntheticCpuEngine(cfg)
        if kind == "onnx":
            from workers.engines.onnx_cpu import OnnxCpuEngine

            return OnnxCpuEngine(cfg)
    else:
        if kind == "synthetic":
            from workers.engines.synthetic_gpu import SyntheticGpuEngine

            return SyntheticGpuEngine(cfg)
        if kind == "tensorrt":
            from workers.engines.tensorrt_engine import TensorRTEngine

            return TensorRTEngine(cfg)
        if kind == "torch":
            from workers.engines.torch_engine import TorchEngine

            return TorchEngine(cfg)
    raise EngineError(f'model.kind = "{kind}" is not supported on workers.device = "{device}"')
