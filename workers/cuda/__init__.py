"""Thin, typed CUDA layer over cuda.bindings (driver API + NVRTC) for GPU workers.

Modules: errors (check, CudaError), context (eager-loading check, primary context), memory (pinned and
device buffers, async copies), stream (streams, events), module (NVRTC, module load, launch), graph
(capture, instantiate, launch), runtime (all of it as one injectable object). Importing this package
imports nothing from CUDA; the submodules do, and only they touch the driver.
"""
