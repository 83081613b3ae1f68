"""A fully connected layer over the last axis, with torch.nn.Linear's names, shapes and init.

    y = x W^T + b        W: (out_features, in_features), b: (out_features,)

Plain NumPy: the work is one GEMM each way, which NumPy hands to the BLAS directly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastlstm._module import Module, check_positive_int, resolve_dtype, to_numpy


def _numeric_array(value: Any, what: str) -> np.ndarray:
    """Return ``value`` as a NumPy array of real numbers, else raise TypeError."""
    array = to_numpy(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be an array of real numbers, got dtype {array.dtype}")
    return array


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias`` over the last axis of ``x``.

    Parameters
    ----------
    in_features : int
        Size of the last axis of the input (>= 1).
    out_features : int
        Size of the last axis of the output (>= 1).
    bias : bool, default True
        Whether to add a learned bias.
    dtype : float32 or float64, default np.float32
        Dtype of the parameters, gradients and outputs; inputs are converted to it.
    seed : int, optional
        Seed of ``np.random.default_rng`` for the initial parameters.

    Attributes
    ----------
    params : dict of str to ndarray
        ``weight`` (out_features, in_features) and, with ``bias``, ``bias`` (out_features,):
        views into one flat buffer, so updating them in place updates the layer.
    grads : dict of str to ndarray
        Gradients with the same keys and shapes; ``backward`` adds into them.

    Notes
    -----
    Initialised as torch: every parameter is drawn from U(-k, k), k = 1/sqrt(in_features),
    weight first, in float64 and then rounded to ``dtype``, so a seed gives the same values
    (up to rounding) in both dtypes.

    In training mode (the default) each forward keeps its input for ``backward``, which
    consumes the most recent unconsumed forward (last in, first out). In eval mode nothing
    is kept.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if not isinstance(bias, bool | np.bool_):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        self.bias = bool(bias)
        self.dtype = resolve_dtype(dtype)
        layout = [("weight", (self.out_features, self.in_features))]
        if self.bias:
            layout.append(("bias", (self.out_features,)))
        self._init_buffers(layout)

        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        for array in self.params.values():  # weight first, then bias, as torch
            array[...] = rng.uniform(-bound, bound, size=array.shape)

    def __repr__(self) -> str:
        return (
            f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias}, dtype={self.dtype.name})"
        )

    def _config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "dtype": self.dtype.name,
        }

    def __call__(self, x: Any) -> np.ndarray:
        """Same as :meth:`forward`."""
        return self.forward(x)

    def forward(self, x: Any) -> np.ndarray:
        """Apply the layer to the last axis of ``x``.

        Parameters
        ----------
        x : array_like of real numbers, shape (..., in_features)
            Any number of leading axes, including none; converted to the layer's dtype.

        Returns
        -------
        y : ndarray, shape (..., out_features)
            A new array in the layer's dtype.

        Raises
        ------
        TypeError
            If ``x`` is not numeric.
        ValueError
            If the last axis of ``x`` is not ``in_features`` long.
        """
        raw = _numeric_array(x, "x")
        if raw.ndim == 0 or raw.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expected x of shape (..., {self.in_features}), got shape {raw.shape}"
            )
        # In training mode the cache must be our own copy: a caller editing x in place
        # before backward would otherwise change the weight gradient.
        x2 = np.array(raw, dtype=self.dtype, copy=self.training or None, order="C")
        x2 = x2.reshape(-1, self.in_features)
        y2 = x2 @ self.params["weight"].T
        if self.bias:
            y2 += self.params["bias"]
        y = y2.reshape(*raw.shape[:-1], self.out_features)
        if self.training:
            self._push_cache((x2, raw.shape, y.shape))
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Backpropagate ``dy`` through the most recent unconsumed forward.

        Adds ``dy^T x`` (summed over every leading axis) into ``grads["weight"]`` and the
        sum of ``dy`` into ``grads["bias"]``.

        Parameters
        ----------
        dy : array_like of real numbers
            Gradient of the loss with respect to that forward's output, in its shape.

        Returns
        -------
        dx : ndarray
            Gradient with respect to that forward's input, in its shape and the layer's dtype.

        Raises
        ------
        RuntimeError
            If there is no forward made in training mode left to backpropagate.
        TypeError, ValueError
            If ``dy`` is not numeric or not in the output's shape; the cache is kept.
        """
        x2, x_shape, y_shape = self._peek_cache()  # popped only once dy is accepted
        raw = _numeric_array(dy, "dy")
        if raw.shape != y_shape:
            raise ValueError(
                f"Linear.backward expected dy of the output's shape {y_shape}, "
                f"got shape {raw.shape}"
            )
        self._pop_cache()
        dy2 = np.asarray(raw, dtype=self.dtype).reshape(-1, self.out_features)
        # dW += dy^T x over all leading axes at once: one GEMM on the 2-D views.
        self.grads["weight"] += dy2.T @ x2
        if self.bias:
            # db += sum of dy over all leading axes
            self.grads["bias"] += dy2.sum(axis=0)
        # dx = dy W
        return (dy2 @ self.params["weight"]).reshape(x_shape)
