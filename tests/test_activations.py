"""The fast activations: within a few ulp of the exact functions in their own precision
(relative, in both tails of sigmoid), exact at saturation, NaN in NaN out."""

from __future__ import annotations

import numba
import numpy as np

from fastlstm._config import FASTMATH
from fastlstm._kernels.activations import sigmoid, tanh


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _apply(out_sigmoid, out_tanh, x):
    for j in range(x.size):
        out_sigmoid[j] = sigmoid(x[j])
        out_tanh[j] = tanh(x[j])


def _run(x):
    s, t = np.empty_like(x), np.empty_like(x)
    _apply(s, t, x)
    return s, t


def _ulps(got, exact):
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_float32_within_a_few_ulps_over_the_normal_range():
    x = np.linspace(-87.3, 87.3, 2_000_001, dtype=np.float32)
    s, t = _run(x)
    x64 = x.astype(np.float64)
    exact_sigmoid = 0.5 * (1 + np.tanh(0.5 * x64))  # no overflow; fine in float64
    exact_sigmoid = np.where(x64 < 0, np.exp(x64) / (1 + np.exp(x64)), exact_sigmoid)
    assert _ulps(s, exact_sigmoid).max() <= 4  # both tails keep relative accuracy
    exact_tanh = np.tanh(x64)
    big = np.abs(exact_tanh) > 1e-3
    assert _ulps(t[big], exact_tanh[big]).max() <= 4
    assert np.abs(t - exact_tanh).max() <= 3e-7


def test_float32_saturates_exactly_and_passes_nan():
    x = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 100.0, -100.0, 0.0], np.float32)
    s, t = _run(x)
    assert np.isnan(s[0]) and np.isnan(t[0])
    np.testing.assert_array_equal(s[1:], [1, 0, 1, 0, 1, 0, 0.5])
    np.testing.assert_array_equal(t[1:], [1, -1, 1, -1, 1, -1, 0])
    assert s.dtype == t.dtype == np.float32


def _ulps64(got, exact):
    nonzero = exact != 0
    return np.abs(got - exact)[nonzero] / np.spacing(np.abs(exact[nonzero]))


def test_float64_within_a_few_ulps_over_the_range():
    x = np.concatenate(
        [
            np.linspace(-708, 708, 1_000_001),
            np.linspace(-3, 3, 1_000_001),  # around tanh's switch at |x| = 0.625
            np.geomspace(1e-300, 1, 5001),
            -np.geomspace(1e-300, 1, 5001),
        ]
    )
    s, t = _run(x)
    e = np.exp(-np.abs(x))
    exact_sigmoid = np.where(x >= 0, 1 / (1 + e), e / (1 + e))  # no cancellation either side
    assert _ulps64(s, exact_sigmoid).max() <= 6
    assert _ulps64(t, np.tanh(x)).max() <= 6
    assert s.dtype == t.dtype == np.float64


def test_float64_saturates_exactly_and_passes_nan():
    x = np.array([np.nan, np.inf, -np.inf, 1e300, -1e300, 800.0, -800.0, 0.0])
    s, t = _run(x)
    assert np.isnan(s[0]) and np.isnan(t[0])
    np.testing.assert_array_equal(s[1:], [1, 0, 1, 0, 1, 0, 0.5])
    np.testing.assert_array_equal(t[1:], [1, -1, 1, -1, 1, -1, 0])
