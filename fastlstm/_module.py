"""The base every fastlstm module shares: parameters, gradients, modes, caches, state dicts.

Parameters live in one flat buffer per module and ``params`` holds named views into it,
in torch's names, shapes and order. Gradients mirror that in a second buffer. Keeping
one buffer lets optimizers update a whole module in a few vectorised operations, and
lets kernels read stacked weights (both directions of a layer, say) without copying.
Updating a ``params`` array in place updates the model; rebinding a dict entry does not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

_FORMAT = "fastlstm-npz-1"
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def resolve_dtype(dtype: Any) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is float32 or float64, else raise TypeError."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if resolved not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Return ``value`` as int if it is a (non-negative or positive) integer, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    lowest = 0 if allow_zero else 1
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return int(value)


def to_numpy(value: Any) -> np.ndarray:
    """Turn a NumPy array, array-like or torch tensor into a NumPy array (no torch import)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, duck-typed
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class Module:
    """Parameters, gradients, train/eval mode and LIFO forward caches.

    Subclasses call :meth:`_init_buffers` with an ordered list of ``(name, shape)``
    and then fill ``params`` (which are views into ``_flat_params``).
    """

    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    training: bool
    dtype: np.dtype

    def _init_buffers(self, layout: list[tuple[str, tuple[int, ...]]]) -> None:
        """Allocate the flat buffers and make ``params``/``grads`` views in ``layout`` order."""
        self.params, self.grads = self._allocate(layout)

    def _allocate(self, layout: list[tuple[str, tuple[int, ...]]]):
        """Allocate flat parameter and gradient buffers; return two dicts of views into them.

        Also starts the module in training mode with no caches.
        """
        sizes = [int(np.prod(shape)) for _, shape in layout]
        total = int(sum(sizes))
        self._flat_params = np.zeros(total, dtype=self.dtype)
        self._flat_grads = np.zeros(total, dtype=self.dtype)
        params, grads = {}, {}
        offset = 0
        for (name, shape), size in zip(layout, sizes, strict=True):
            params[name] = self._flat_params[offset : offset + size].reshape(shape)
            grads[name] = self._flat_grads[offset : offset + size].reshape(shape)
            offset += size
        self.training = True
        self._caches: list[Any] = []
        return params, grads

    # ----------------------------------------------------------------- modes, caches
    def train(self, mode: bool = True) -> Module:
        """Set training mode (the default); ``train(False)`` is ``eval()``. Returns self."""
        self.training = bool(mode)
        if not self.training:
            self._caches.clear()
        return self

    def eval(self) -> Module:
        """Set evaluation mode: forwards keep no cache; unconsumed caches are dropped."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every gradient to zero and drop forward caches not yet backpropagated."""
        self._flat_grads.fill(0)
        self._caches.clear()

    def _push_cache(self, cache: Any) -> None:
        self._caches.append(cache)

    def _pop_cache(self) -> Any:
        cache = self._peek_cache()
        self._caches.pop()
        return cache

    def _peek_cache(self) -> Any:
        """The cache the next backward would consume (it stays until popped)."""
        if not self._caches:
            raise RuntimeError(
                f"{type(self).__name__}.backward() needs a forward call made in training mode "
                "that has not been backpropagated yet; there is none (forwards in eval mode keep "
                "no cache, and zero_grad()/eval() drop unconsumed ones)"
            )
        return self._caches[-1]

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, np.ndarray]:
        """Return a copy of every parameter, keyed by torch's names, in torch's order."""
        return {name: array.copy() for name, array in self.params.items()}

    def load_state_dict(self, mapping: Mapping[str, Any]) -> None:
        """Copy parameters from ``mapping`` (NumPy arrays or torch tensors).

        Every key and shape is checked before anything is written: a missing or unexpected
        key raises KeyError, a wrong shape or non-numeric value ValueError/TypeError, and
        the module is left unchanged. A successful load drops unconsumed forward caches.
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"load_state_dict expects a mapping of name -> array, got {type(mapping).__name__}"
            )
        missing = [name for name in self.params if name not in mapping]
        unexpected = [name for name in mapping if name not in self.params]
        if missing or unexpected:
            raise KeyError(
                f"state dict does not match {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        converted = {}
        for name, target in self.params.items():
            value = to_numpy(mapping[name])
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{name}: expected a real numeric array, got dtype {value.dtype}")
            if value.shape != target.shape:
                raise ValueError(f"{name}: expected shape {target.shape}, got {value.shape}")
            converted[name] = value
        for name, value in converted.items():
            self.params[name][...] = value
        self._caches.clear()  # forwards run with the old weights must not be backpropagated

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (JSON-serialisable)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({options})"

    def save(self, path: str | os.PathLike) -> None:
        """Write configuration and parameters to one ``.npz`` file (no pickle inside).

        Parameters
        ----------
        path : str or os.PathLike
            Destination; NumPy appends ``.npz`` if the name lacks it.
        """
        header = {"format": _FORMAT, "class": type(self).__name__, "config": self._config()}
        arrays = {f"param/{name}": value for name, value in self.params.items()}
        np.savez(path, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Rebuild a module saved by :meth:`save`, reading with ``allow_pickle=False``.

        Raises
        ------
        ValueError
            If the file is not a fastlstm ``.npz``, holds a different class, or holds
            pickled objects.
        """
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "header" not in archive.files:
                    raise ValueError(f"{path}: not a fastlstm file (no header entry)")
                header = json.loads(str(archive["header"]))
                state = {
                    name.removeprefix("param/"): archive[name]
                    for name in archive.files
                    if name.startswith("param/")
                }
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                raise ValueError(
                    f"{path}: holds pickled objects, which fastlstm never loads"
                ) from exc
            raise
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: expected format {_FORMAT!r}, got {header.get('format')!r}")
        if header.get("class") != cls.__name__:
            raise ValueError(f"{path}: holds a {header.get('class')}, not a {cls.__name__}")
        module = cls(**header["config"])
        module.load_state_dict(state)
        return module
