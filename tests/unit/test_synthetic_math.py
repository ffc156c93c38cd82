"""The synthetic function: identity at work 0, deterministic, input-dependent, NaN for non-finite input."""

from __future__ import annotations

import numpy as np

from workers.engines.synthetic_math import reference


def test_work_zero_is_identity_copy() -> None:
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    y = reference(x, 0)
    np.testing.assert_array_equal(y, x)
    assert y is not x


def test_values_stay_in_unit_interval_and_depend_on_input() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    y = reference(x, 50)
    assert y.dtype == np.float32 and ((y >= 0) & (y < 1)).all()
    x2 = x.copy()
    x2[0, 0] = np.nextafter(x2[0, 0], np.float32(10))
    assert reference(x2, 50)[0, 0] != y[0, 0]  # chaotic: one ulp changes the result
    np.testing.assert_array_equal(reference(x, 50), y)  # deterministic


def test_out_parameter_and_nonfinite() -> None:
    x = np.array([[np.inf, np.nan, 0.25]], np.float32)
    out = np.full_like(x, 7)
    reference(x, 3, out=out)
    assert np.isnan(out[0, 0]) and np.isnan(out[0, 1]) and 0 <= out[0, 2] < 1
