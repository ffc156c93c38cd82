"""The synthetic engine's function, defined once: the numpy reference the GPU kernel must match bit for bit.

Used by the CPU synthetic engine, the GPU synthetic engine's tests and the benchmarks (any process).

    y = x
    repeat `work` times:  y = fract(y * 3 + x)        (fract(v) = v - floor(v))

Every step is one IEEE float32 operation rounded to nearest (multiply, add, floor, subtract), so numpy and
a CUDA kernel compiled with `--fmad=false` (no fused multiply-add contraction) give identical bits. The map
is chaotic on [0, 1), so the output depends on the input and on every iteration: a kernel that skips or
reorders work cannot match it by accident. work = 0 is the identity (the no-work engine of the CPU
benchmark). Inputs that are inf or NaN give NaN, on both sides.
"""

from __future__ import annotations

import numpy as np

DTYPE = np.dtype(np.float32)
MULTIPLIER = np.float32(3.0)

# The CUDA twin of `reference` below; `work` and `n` are runtime arguments so one module serves every
# configuration. Compile with --fmad=false (see workers/engines/synthetic_gpu.py).
CUDA_SOURCE = r"""
extern "C" __global__ void synthetic(const float* __restrict__ x, float* __restrict__ y,
                                     unsigned long long n, unsigned int work)
{
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float xi = x[i];
    float v = xi;
    for (unsigned int k = 0; k < work; ++k) {
        v = v * 3.0f + xi;
        v = v - floorf(v);
    }
    y[i] = v;
}
"""


def reference(x: np.ndarray, work: int, out: np.ndarray | None = None) -> np.ndarray:
    """The synthetic function on float32 `x`, elementwise; writes into `out` when given."""
    x = np.asarray(x, dtype=DTYPE)
    if out is None:
        y = x.copy()
    else:
        np.copyto(out, x)
        y = out
    if work:
        tmp = np.empty_like(y)
        with np.errstate(invalid="ignore", over="ignore"):
            for _ in range(work):
                np.multiply(y, MULTIPLIER, out=y)
                np.add(y, x, out=y)
                np.floor(y, out=tmp)
                np.subtract(y, tmp, out=y)
    return y
