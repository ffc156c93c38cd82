"""The supervisor process: spawns and watches the workers (core, worker_handle, restart_policy), places
them (devices, mps), serves the control socket (control) and runs the monitor (monitor/: NVML sampling,
stall attribution, Prometheus metrics, health probes).

Never imports CUDA, the client library or the CLI. `python -m orchestrator.supervisor CONFIG` runs it
detached (what `orchestrator start --detach` does). Import submodules directly.
"""
