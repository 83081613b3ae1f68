"""What the tests share: the assert helper (shape, then dtype, then values, dtype-scaled),
random inputs, and running tests again in a fresh interpreter under another setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# float32: within float32 rounding of exact math; float64: within float64 rounding.
TOLERANCES = {
    np.dtype(np.float32): {"rtol": 2e-4, "atol": 2e-5},
    np.dtype(np.float64): {"rtol": 1e-9, "atol": 1e-10},
}


def random_input(rng, lstm, steps: int, batch: int, dtype=np.float32) -> np.ndarray:
    """N(0, 1) input in the model's layout: (B, T, I) with ``batch_first``, else (T, B, I)."""
    shape = (batch, steps, lstm.input_size) if lstm.batch_first else (steps, batch, lstm.input_size)
    return rng.standard_normal(shape).astype(dtype)


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, check_dtype=True, what=""):
    """Assert shape, then dtype, then values; tolerance from ``dtype`` unless given."""
    actual = to_numpy(actual)
    expected = to_numpy(expected)
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {actual.shape} != {expected.shape}"
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    if check_dtype:
        assert actual.dtype == dtype, f"{label}dtype {actual.dtype} != {dtype}"
    tol = TOLERANCES.get(dtype, TOLERANCES[np.dtype(np.float32)])
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    np.testing.assert_allclose(
        actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol, err_msg=label
    )


class DifferenceLog:
    """assert_close against a named source that also keeps the largest absolute difference
    seen per source, for the interop tests' report (printed at the end of a module)."""

    def __init__(self) -> None:
        self.largest: dict[str, float] = {}

    def close(self, actual, expected, source, dtype=np.float32, what=""):
        actual, expected = np.asarray(actual), np.asarray(expected)
        assert_close(actual, expected, dtype, check_dtype=False, what=f"{source}: {what}")
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
        self.largest[source] = max(self.largest.get(source, 0.0), diff)

    def report(self) -> None:
        for source, value in sorted(self.largest.items()):
            print(f"\nmax |difference| vs {source}: {value:.3g}")


def pytest_in_fresh_interpreter(
    env: dict, probe: str, expected: str, pytest_args: list[str], timeout: int
) -> None:
    """Run the Python code ``probe`` under ``env`` and assert it printed ``expected`` (the
    setting really took), then pytest with ``pytest_args`` under ``env`` and assert that
    every selected test passed."""
    check = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == expected
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    tail = "\n".join(run.stdout.splitlines()[-15:])
    assert run.returncode == 0, f"{expected}:\n{tail}\n{run.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
