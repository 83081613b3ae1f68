"""Checks at the door: every public call converts and checks here before anything changes.

Errors name what was expected and what was given. Nothing in this module mutates state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastlstm._module import to_numpy


def real_array(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """``value`` as an array of ``dtype`` (any array-like of real numbers, or a torch tensor)."""
    if value is None:
        raise TypeError(f"{name} must be an array of real numbers, got None")
    try:
        array = to_numpy(value)
    except TypeError as exc:  # e.g. a torch tensor of a dtype NumPy lacks (bfloat16)
        raise TypeError(f"{name} must be an array of real numbers: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{name} must be a rectangular array of real numbers: {exc}") from exc
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be an array of real numbers (integer or float), got dtype {array.dtype}"
        )
    return array.astype(dtype, copy=False)


def check_shape(name: str, array: np.ndarray, expected: tuple[int, ...], meaning: str) -> None:
    if array.shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {meaning}, got {array.shape}")


def lengths_array(value: Any, steps: int, batch: int) -> np.ndarray:
    """Sequence lengths as int64 (B,), each 0 <= n <= T; None means every sequence is full."""
    if value is None:
        return np.full(batch, steps, dtype=np.int64)
    array = to_numpy(value)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {array.dtype}")
    if array.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), one per sequence, got {array.shape}")
    bad = (array < 0) | (array > steps)
    if bad.any():
        raise ValueError(
            f"lengths must lie in 0..{steps} (the sequence length T), got {array[bad].tolist()}"
        )
    return np.ascontiguousarray(array, dtype=np.int64)
