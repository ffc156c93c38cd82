"""Supervisor-side monitor: NVML sampling, stall attribution, stall log, Prometheus metrics, the facade.

Runs in the supervisor process (its own sampler threads); never imports CUDA. Import submodules directly.
"""
