"""Mean squared error with its gradient, as ``torch.nn.functional.mse_loss`` (mean reduction)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastlstm._module import SUPPORTED_DTYPES, to_numpy


def _numeric_array(value: Any, what: str) -> np.ndarray:
    array = to_numpy(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be an array of real numbers, got dtype {array.dtype}")
    return array


def mse_loss(pred: Any, target: Any) -> tuple[float, np.ndarray]:
    """Mean squared error ``mean((pred - target)**2)`` and its gradient with respect to ``pred``.

    Parameters
    ----------
    pred : array_like of real numbers
        Predictions. A float32 or float64 array (NumPy or torch) sets the working dtype;
        anything else (lists, integers, float16) is computed in float64.
    target : array_like of real numbers
        Targets, exactly ``pred``'s shape (no broadcasting); converted to the working dtype.

    Returns
    -------
    loss : float
        The mean over all N elements, as a Python float (NaN when N = 0, as torch).
    dpred : ndarray
        ``2 (pred - target) / N`` in the working dtype and ``pred``'s shape, ready to pass
        to the backward of whatever produced ``pred``.

    Raises
    ------
    TypeError
        If either argument is not numeric.
    ValueError
        If the shapes differ.
    """
    pred_arr = _numeric_array(pred, "pred")
    target_arr = _numeric_array(target, "target")
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"mse_loss needs pred and target of the same shape, got pred {pred_arr.shape} "
            f"and target {target_arr.shape}"
        )
    dtype = pred_arr.dtype if pred_arr.dtype in SUPPORTED_DTYPES else np.dtype(np.float64)
    diff = np.subtract(pred_arr, target_arr, dtype=dtype)
    n = diff.size
    if n == 0:
        return float("nan"), diff
    # The sum runs in float64 whatever the working dtype, so the loss of a large float32
    # batch keeps float32 precision instead of losing digits to the accumulation.
    loss = float(np.square(diff).sum(dtype=np.float64)) / n
    # As torch's mse_loss backward: the factor 2/N rounded to the dtype, times the difference.
    diff *= 2.0 / n
    return loss, diff
