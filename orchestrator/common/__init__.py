"""What every process of the orchestrator shares: the wire protocol and typed messages, errors and their
codes, the config, tensor shapes, CURVE security, the run directory, logging, process state, the
histograms workers send and the shared-memory arena's layout.

Imported by the supervisor, the workers, the client library and the CLI alike, so it imports none of them
(and nothing heavier than numpy, pyzmq and msgspec). Import submodules directly.
"""
