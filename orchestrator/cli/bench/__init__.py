"""`orchestrator bench`: load any running orchestrator the way perf_analyzer does and report what it did.

Runs in the CLI process (the sweep, the telemetry snapshots, the report) and in the client processes it
spawns (the load). Modules:

- inputs:    the model as a client learns it, and the requests sent (random from its specs, or a .npz)
- check:     references (the engine run in-process, or a first reply) and the comparison of replies
- load:      closed-loop (concurrency) or open-loop (rate) load from spawned client processes
- telemetry: the workers' counters read from the supervisor's `status`, differenced over a point
- sweep:     one target's sweep: the points, each with its load figures and telemetry
- report:    the progress display, the table, JSON and CSV
- plot:      the figure (matplotlib, imported only for --plot)
"""
