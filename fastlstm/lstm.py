"""``LSTM`` and ``LSTMCell``: torch.nn.LSTM's interface and numbers on NumPy arrays.

These classes are thin: they check and lay out their inputs, hand time-major arrays to
:mod:`fastlstm._engine`, and return results in the caller's layout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastlstm import _engine
from fastlstm._engine import LayerArrays
from fastlstm._module import Module, check_positive_int, resolve_dtype
from fastlstm._validate import check_shape, lengths_array, real_array
from fastlstm.stream import CellStream, Stream

PEEPHOLES = (None, "diagonal", "full")

State = tuple[np.ndarray, np.ndarray]


def _check_peephole(peephole: Any) -> str | None:
    if peephole not in PEEPHOLES:
        raise ValueError(f"peephole must be one of {PEEPHOLES}, got {peephole!r}")
    return peephole


def _layer_layout(
    k: int, directions: int, width: int, hidden: int, out_size: int, *,
    bias: bool, proj: bool, peephole: str | None,
) -> list[tuple[str, tuple[int, ...]]]:  # fmt: skip
    """Stacked (both directions) buffer layout of layer k, keyed (kind, k)."""
    gates = 4 * hidden
    layout = [
        (("w_ih", k), (directions, gates, width)),
        (("w_hh", k), (directions, gates, out_size)),
    ]
    if bias:
        layout += [(("b_ih", k), (directions, gates)), (("b_hh", k), (directions, gates))]
    if proj:
        layout.append((("w_hr", k), (directions, out_size, hidden)))
    if peephole == "diagonal":
        layout.append((("peep", k), (directions, 3, hidden)))
    if peephole == "full":
        layout.append((("w_ch", k), (directions, gates, hidden)))
        if bias:
            layout.append((("b_ch", k), (directions, gates)))
    return layout


_TORCH_NAMES = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh",
                "w_hr": "weight_hr"}  # fmt: skip
_EXTRA_NAMES = {"peep": "peephole", "w_ch": "weight_ch", "b_ch": "bias_ch"}
_KINDS = tuple(LayerArrays.__dataclass_fields__)


def _layer_arrays(views: dict, k: int) -> LayerArrays:
    return LayerArrays(**{kind: views.get((kind, k)) for kind in _KINDS})


def _init_uniform(params: dict[str, np.ndarray], names: list[str], bound: float, rng) -> None:
    """torch's LSTM init: every parameter U(-bound, bound), drawn in ``names`` order."""
    for name in names:
        target = params[name]
        target[...] = rng.uniform(-bound, bound, size=target.shape)


@dataclass
class _ForwardCache:
    layers: list[_engine.LayerCache]
    lengths: np.ndarray
    batched: bool
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    state_shapes: tuple[tuple[int, ...], tuple[int, ...]]


class LSTM(Module):
    """A multi-layer LSTM with torch.nn.LSTM's interface, parameters and numbers.

    Parameters
    ----------
    input_size : int
        Features per step of the input, I.
    hidden_size : int
        Features of the cell state, H.
    num_layers : int, default 1
        Stacked layers; layer k > 0 reads layer k-1's output.
    bias : bool, default True
        Whether the layers have ``bias_ih``/``bias_hh`` (and ``bias_ch`` with full peepholes).
    batch_first : bool, default False
        Input and output as (B, T, features) instead of (T, B, features). States are
        always (layers * directions, B, features), as in torch.
    dropout : float, default 0.0
        Inverted dropout on the output of every layer but the last, in training mode.
    bidirectional : bool, default False
        Run a second, reversed direction per layer and concatenate the outputs.
    proj_size : int, default 0
        If > 0, project h_t to this size with ``weight_hr`` (LSTMP); must be < hidden_size.
    peephole : {None, "diagonal", "full"}, default None
        Gates that also read the cell state: "diagonal" adds ``peephole_l{k}`` (3, H),
        rows i, f, o (i and f see c_{t-1}, o sees c_t); "full" adds ``weight_ch_l{k}``
        (4H, H) and ``bias_ch_l{k}`` (4H,), in gate order i, f, g, o.
    dtype : float32 or float64, default float32
        Precision of parameters, computation and results.
    seed : int or None
        Seed of the model's generator: initial weights (U(-k, k), k = 1/sqrt(H), in torch's
        parameter order, peephole parameters after all others) and then dropout masks.

    Attributes
    ----------
    params, grads : dict of str to ndarray
        torch's names, shapes and order (``weight_ih_l0``, ..., ``_reverse`` suffixes).
        Writing into a params array in place changes the model.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        peephole: str | None = None,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.proj_size = check_positive_int("proj_size", proj_size, allow_zero=True)
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}"
            )
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not (0 <= dropout <= 1)
        ):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout applies between layers; with num_layers=1 it has no effect",
                stacklevel=2,
            )
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.peephole = _check_peephole(peephole)
        self.dtype = resolve_dtype(dtype)

        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size or self.hidden_size
        self._directions = directions
        self._out_size = out_size
        layout = []
        for k in range(self.num_layers):
            width = self.input_size if k == 0 else directions * out_size
            layout += _layer_layout(
                k, directions, width, self.hidden_size, out_size,
                bias=self.bias, proj=self.proj_size > 0, peephole=self.peephole,
            )  # fmt: skip
        stacked_params, stacked_grads = self._allocate(layout)
        self._layers = [_layer_arrays(stacked_params, k) for k in range(self.num_layers)]
        self._layer_grads = [_layer_arrays(stacked_grads, k) for k in range(self.num_layers)]

        # Public dicts: per-direction views, torch's order, then this layer's extras.
        self.params, self.grads = {}, {}
        standard, extra = [], []
        for k in range(self.num_layers):
            for d in range(directions):
                sfx = "_reverse" if d == 1 else ""
                for kind, base in (*_TORCH_NAMES.items(), *_EXTRA_NAMES.items()):
                    if (kind, k) not in stacked_params:
                        continue
                    name = f"{base}_l{k}{sfx}"
                    self.params[name] = stacked_params[(kind, k)][d]
                    self.grads[name] = stacked_grads[(kind, k)][d]
                    (standard if kind in _TORCH_NAMES else extra).append(name)
        self._rng = np.random.default_rng(seed)
        _init_uniform(self.params, standard + extra, 1.0 / np.sqrt(self.hidden_size), self._rng)

    def _config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
            "proj_size": self.proj_size,
            "peephole": self.peephole,
            "dtype": self.dtype.name,
        }

    @classmethod
    def from_torch(cls, module: Any) -> LSTM:
        """Build an LSTM with the configuration and weights of a ``torch.nn.LSTM``.

        The dtype follows the module's parameters (float32 or float64).
        """
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
        lstm = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=float(module.dropout) if module.num_layers > 1 else 0.0,
            bidirectional=module.bidirectional,
            proj_size=module.proj_size,
            dtype=dtype,
        )
        lstm.load_state_dict(module.state_dict())
        if not module.training:
            lstm.eval()
        return lstm

    @classmethod
    def from_onnx(cls, model: Any, node: str | None = None) -> LSTM:
        """Build an LSTM from the ``LSTM`` operator(s) of an ONNX model (needs ``onnx``).

        Parameters
        ----------
        model : onnx.ModelProto or str or os.PathLike
            The model, or the path of a ``.onnx`` file (parsed as protocol buffers only).
        node : str, optional
            The name of the LSTM node to import. By default the graph's only LSTM node, or
            its LSTM nodes chained as ``torch.onnx.export`` writes a stacked ``nn.LSTM``,
            imported as one multi-layer model.

        Returns
        -------
        LSTM
            In eval mode, with the dtype of the node's weights; ``batch_first`` follows the
            node's ``layout``, ``peephole="diagonal"`` if it has peepholes (P), ``bias=False``
            if it has no B.

        Raises
        ------
        ValueError
            If the file is not an ONNX model or holds no LSTM node, if ``node`` names none,
            if several LSTM nodes are not one stack, or if a node uses what fastlstm cannot
            run (other activations, ``clip``, ``input_forget=1``, ``direction="reverse"``,
            weights computed at run time): the message names the node and the attribute.
        FileNotFoundError
            If the path does not exist.
        """
        from fastlstm.interop import onnx_io

        return onnx_io.from_onnx(cls, model, node)

    def to_onnx(self, path: Any = None, *, state: bool = False, lengths: bool = False) -> Any:
        """Export this model's inference as an ONNX graph (needs ``onnx``).

        One ONNX ``LSTM`` node per layer (opset 14), with this model's current weights; a
        batch-first model is transposed around the nodes, since ONNX Runtime refuses
        ``layout=1``. Dropout, a training-time operation, is not in the graph.

        Parameters
        ----------
        path : str or os.PathLike, optional
            Also write the model to this file.
        state : bool, default False
            Add graph inputs ``h0`` (L*D, B, H) and ``c0`` (L*D, B, H); zeros otherwise.
        lengths : bool, default False
            Add a graph input ``lengths`` (B,) int64: fastlstm's packed-sequence semantics.

        Returns
        -------
        onnx.ModelProto
            Input ``x`` in this model's layout (batch and time axes dynamic); outputs
            ``out``, ``h_n``, ``c_n`` in the layouts of :meth:`forward`.

        Raises
        ------
        ValueError
            For ``proj_size`` and ``peephole="full"``, which ONNX's operator lacks (nothing
            is written).
        """
        from fastlstm.interop import onnx_io

        return onnx_io.to_onnx(self, path, state=state, lengths=lengths)

    @classmethod
    def from_keras(cls, source: Any) -> LSTM:
        """Build an LSTM from a Keras LSTM layer, model or saved file.

        Parameters
        ----------
        source : keras layer or model, or str or os.PathLike
            A ``keras.layers.LSTM``, a ``Bidirectional(LSTM)`` with ``merge_mode="concat"``,
            a model (Sequential or functional) of stacked LSTM layers, or the path of a
            ``.keras`` file or a legacy ``.h5`` file. Files are read with ``h5py`` (the
            ``keras`` extra) and a zip reader only: neither Keras nor TensorFlow is imported,
            and nothing in the file is run.

        Returns
        -------
        LSTM
            In eval mode, ``batch_first=True``, float32 (float64 for float64 weights).
            Keras's ``kernel`` and ``recurrent_kernel`` (gate order i, f, c, o) become
            ``weight_ih`` and ``weight_hh`` transposed; its one ``bias`` becomes ``bias_ih``
            (``bias_hh`` zero). A layer that returns only its last step gives ``out[:, -1]``.

        Raises
        ------
        ValueError
            For what fastlstm cannot run, naming the layer and the option: activations other
            than tanh and sigmoid (Keras 2's ``hard_sigmoid``), ``go_backwards``, merge modes
            other than ``concat``, layers other than LSTM, unequal layer sizes; and for files
            that are not Keras models.
        FileNotFoundError
            If the path does not exist.
        """
        from fastlstm.interop import keras_io

        return keras_io.from_keras(cls, source)

    # ---------------------------------------------------------------- forward
    def __call__(self, x: Any, state: State | None = None, lengths: Any = None):
        return self.forward(x, state, lengths)

    def forward(self, x: Any, state: State | None = None, lengths: Any = None):
        """Run the LSTM over a batch of sequences.

        Parameters
        ----------
        x : array_like
            (T, B, I), or (B, T, I) with ``batch_first``, or (T, I) for one sequence.
        state : tuple (h0, c0), optional
            Initial states, (L*D, B, H_out) and (L*D, B, H) ((L*D, H_out), (L*D, H) for
            unbatched input). Zeros by default.
        lengths : array_like of int, optional
            Valid steps per sequence, 0 <= n <= T, in any order: outputs at t >= n are zero,
            h_n/c_n are each sequence's state after its own last step, and the reverse
            direction starts at step n - 1 (torch's packed-sequence semantics).

        Returns
        -------
        out : ndarray
            (T, B, D*H_out) in the layout of x.
        (h_n, c_n) : tuple of ndarray
            Final states, shaped like ``state``.
        """
        x_time_major, batched = self._check_input(x)
        steps, batch, _ = x_time_major.shape
        given_lengths = lengths is not None
        lengths = lengths_array(lengths, steps, batch)
        h0, c0 = self._check_state(state, batch, batched)
        if self.training and given_lengths and (lengths < steps).any():
            # Zero the padding so nothing in it (NaN included) can reach any gradient.
            # (Inference needs no copy: padded steps' results are discarded row by row.)
            valid = np.arange(steps)[:, None] < lengths[None, :]
            x_time_major = np.where(valid[:, :, None], x_time_major, 0).astype(self.dtype)
        elif self.training:
            x_time_major = x_time_major.copy()  # the cache must not see later edits to x
        x_time_major = np.ascontiguousarray(x_time_major)
        out, h_n, c_n, caches = _engine.forward(
            self._layers, x_time_major, h0, c0, lengths,
            hidden=self.hidden_size, training=self.training,
            dropout=self.dropout, rng=self._rng,
        )  # fmt: skip
        out = self._to_caller_layout(out, batched)
        h_n, c_n = (h_n, c_n) if batched else (h_n[:, 0], c_n[:, 0])
        if self.training:
            self._push_cache(
                _ForwardCache(caches, lengths, batched, np.shape(x), out.shape,
                              (h_n.shape, c_n.shape))
            )  # fmt: skip
        return out, (h_n, c_n)

    def _check_input(self, x: Any) -> tuple[np.ndarray, bool]:
        array = real_array("x", x, self.dtype)
        if array.ndim not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(
                f"x: expected a 3-D array {layout} or a 2-D array (T, I) for one sequence, "
                f"got shape {array.shape}"
            )
        batched = array.ndim == 3
        if not batched:
            array = array[:, None, :]
        elif self.batch_first:
            array = array.transpose(1, 0, 2)
        steps, batch, width = array.shape
        if width != self.input_size:
            raise ValueError(
                f"x: expected input size {self.input_size} in the last axis, got shape "
                f"{np.shape(x)}"
            )
        if steps == 0 or batch == 0:
            raise ValueError(
                f"x: expected at least one step and one sequence, got shape {np.shape(x)}"
            )
        return array, batched

    def _check_state(self, state: Any, batch: int, batched: bool) -> State:
        count = self.num_layers * self._directions
        h_shape = (count, batch, self._out_size)
        c_shape = (count, batch, self.hidden_size)
        if state is None:
            return np.zeros(h_shape, self.dtype), np.zeros(c_shape, self.dtype)
        if not isinstance(state, tuple | list) or len(state) != 2:
            raise TypeError(f"state must be a tuple (h0, c0), got {type(state).__name__}")
        h0 = real_array("h0", state[0], self.dtype)
        c0 = real_array("c0", state[1], self.dtype)
        if batched:
            check_shape("h0", h0, h_shape, "(layers*directions, batch, H_out)")
            check_shape("c0", c0, c_shape, "(layers*directions, batch, hidden)")
        else:
            check_shape("h0", h0, (count, self._out_size), "(layers*directions, H_out)")
            check_shape("c0", c0, (count, self.hidden_size), "(layers*directions, hidden)")
            h0, c0 = h0[:, None, :], c0[:, None, :]
        # Private copies: a training cache must not see the caller's later edits.
        return np.array(h0, order="C"), np.array(c0, order="C")

    def _to_caller_layout(self, out: np.ndarray, batched: bool) -> np.ndarray:
        if not batched:
            return out[:, 0]
        if self.batch_first:
            return np.ascontiguousarray(out.transpose(1, 0, 2))
        return out

    # --------------------------------------------------------------- streaming
    def stream(self, batch_size: int = 1) -> Stream:
        """Start streaming inference: step the model as data arrives (see :class:`Stream`).

        Parameters
        ----------
        batch_size : int, default 1
            B, the number of sequences stepped together (rows); a positive integer.

        Returns
        -------
        Stream
            A session over a snapshot of the current weights (packed once; ``refresh()``
            re-reads them) with zero state. Eval-mode numbers, no dropout; the model is
            never changed.

        Raises
        ------
        ValueError
            If the model is bidirectional (its reverse direction needs the future).
        """
        return Stream(self, batch_size)

    # --------------------------------------------------------------- backward
    def backward(self, dout: Any, dh_n: Any = None, dc_n: Any = None):
        """Backpropagate the most recent training-mode forward not yet backpropagated.

        Parameters
        ----------
        dout : array_like
            dL/dout, shaped like that forward's ``out``.
        dh_n, dc_n : array_like, optional
            dL/dh_n and dL/dc_n, shaped like its ``h_n`` and ``c_n``; zeros by default.

        Returns
        -------
        dx : ndarray
            dL/dx in the layout of x.
        (dh0, dc0) : tuple of ndarray
            dL/dh0 and dL/dc0 in the layout of the state (also when no state was given).

        Gradients are added into ``grads``. Output gradients at padded steps are ignored.
        """
        cache: _ForwardCache = self._peek_cache()
        dout = real_array("dout", dout, self.dtype)
        check_shape("dout", dout, cache.out_shape, "(the shape of that forward's out)")
        h_shape, c_shape = cache.state_shapes
        dh_n = self._state_grad("dh_n", dh_n, h_shape)
        dc_n = self._state_grad("dc_n", dc_n, c_shape)
        self._pop_cache()
        if not cache.batched:
            dout, dh_n, dc_n = dout[:, None], dh_n[:, None], dc_n[:, None]
        elif self.batch_first:
            dout = dout.transpose(1, 0, 2)
        dx, dh0, dc0 = _engine.backward(
            self._layers, self._layer_grads, cache.layers, np.ascontiguousarray(dout),
            np.ascontiguousarray(dh_n), np.ascontiguousarray(dc_n), cache.lengths,
            hidden=self.hidden_size,
        )  # fmt: skip
        if not cache.batched:
            return dx[:, 0], (dh0[:, 0], dc0[:, 0])
        if self.batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, (dh0, dc0)

    def _state_grad(self, name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        if value is None:
            return np.zeros(shape, self.dtype)
        array = real_array(name, value, self.dtype)
        check_shape(name, array, shape, "(the shape of that forward's state)")
        return array


class LSTMCell(Module):
    """One LSTM step, torch.nn.LSTMCell's interface, with backward for a user's own loop.

    Parameters
    ----------
    input_size, hidden_size : int
        I and H.
    bias : bool, default True
        Whether there are ``bias_ih``/``bias_hh`` (and ``bias_ch`` with full peepholes).
    peephole : {None, "diagonal", "full"}, default None
        As in :class:`LSTM`; the parameters are named ``peephole``, ``weight_ch``, ``bias_ch``.
    dtype : float32 or float64, default float32
    seed : int or None
        Seed of the initial weights (U(-k, k), k = 1/sqrt(H), torch's order).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        bias: bool = True,
        peephole: str | None = None,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> None:
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.peephole = _check_peephole(peephole)
        self.dtype = resolve_dtype(dtype)
        layout = _layer_layout(
            0, 1, self.input_size, self.hidden_size, self.hidden_size,
            bias=self.bias, proj=False, peephole=self.peephole,
        )  # fmt: skip
        stacked_params, stacked_grads = self._allocate(layout)
        self._layers = [_layer_arrays(stacked_params, 0)]
        self._layer_grads = [_layer_arrays(stacked_grads, 0)]
        self.params, self.grads = {}, {}
        for kind, base in (*_TORCH_NAMES.items(), *_EXTRA_NAMES.items()):
            if (kind, 0) in stacked_params:
                self.params[base] = stacked_params[(kind, 0)][0]
                self.grads[base] = stacked_grads[(kind, 0)][0]
        rng = np.random.default_rng(seed)
        _init_uniform(self.params, list(self.params), 1.0 / np.sqrt(self.hidden_size), rng)

    def _config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "bias": self.bias,
            "peephole": self.peephole,
            "dtype": self.dtype.name,
        }

    @classmethod
    def from_torch(cls, module: Any) -> LSTMCell:
        """Build an LSTMCell with the configuration and weights of a ``torch.nn.LSTMCell``."""
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
        cell = cls(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype)
        cell.load_state_dict(module.state_dict())
        return cell

    def __call__(self, x: Any, state: State | None = None) -> State:
        return self.forward(x, state)

    def stream(self, batch_size: int = 1) -> CellStream:
        """Start streaming inference: step the cell as data arrives (see :class:`CellStream`).

        Parameters
        ----------
        batch_size : int, default 1
            B, the number of sequences stepped together (rows); a positive integer.

        Returns
        -------
        CellStream
            A session over a snapshot of the current weights (``refresh()`` re-reads them)
            with zero state; the cell is never changed.
        """
        return CellStream(self, batch_size)

    def forward(self, x: Any, state: State | None = None) -> State:
        """One step: x (B, I) or (I,); state (h, c), each (B, H) or (H,). Returns (h, c)."""
        array = real_array("x", x, self.dtype)
        if array.ndim not in (1, 2) or array.shape[-1] != self.input_size:
            raise ValueError(
                f"x: expected shape (B, {self.input_size}) or ({self.input_size},), "
                f"got {array.shape}"
            )
        batched = array.ndim == 2
        rows = array if batched else array[None]
        if rows.shape[0] == 0:
            raise ValueError(f"x: expected at least one row, got shape {array.shape}")
        batch = rows.shape[0]
        shape = (batch, self.hidden_size) if batched else (self.hidden_size,)
        if state is None:
            h0 = np.zeros((1, batch, self.hidden_size), self.dtype)
            c0 = np.zeros_like(h0)
        else:
            if not isinstance(state, tuple | list) or len(state) != 2:
                raise TypeError(f"state must be a tuple (h, c), got {type(state).__name__}")
            h0 = real_array("h", state[0], self.dtype)
            c0 = real_array("c", state[1], self.dtype)
            check_shape("h", h0, shape, "(batch, hidden)" if batched else "(hidden,)")
            check_shape("c", c0, shape, "(batch, hidden)" if batched else "(hidden,)")
            h0 = np.array(h0.reshape(1, batch, self.hidden_size), order="C")
            c0 = np.array(c0.reshape(1, batch, self.hidden_size), order="C")
        steps_x = np.array(rows[None], dtype=self.dtype)  # (1, B, I), a private copy
        lengths = np.ones(batch, dtype=np.int64)
        _, h_n, c_n, caches = _engine.forward(
            self._layers, steps_x, h0, c0, lengths,
            hidden=self.hidden_size, training=self.training, dropout=0.0, rng=None,
        )  # fmt: skip
        if self.training:
            self._push_cache((caches, lengths, batched, array.shape))
        h, c = h_n[0], c_n[0]
        return (h, c) if batched else (h[0], c[0])

    def backward(self, dh: Any, dc: Any = None):
        """Backpropagate the most recent training-mode call not yet backpropagated.

        Parameters
        ----------
        dh, dc : array_like
            dL/dh and dL/dc of that call's outputs (dc defaults to zeros).

        Returns
        -------
        dx : ndarray
            dL/dx, shaped like that call's x.
        (dh_prev, dc_prev) : tuple of ndarray
            dL/dh and dL/dc of the state it was given (zeros state included).
        """
        caches, lengths, batched, x_shape = self._peek_cache()
        batch = lengths.shape[0]
        shape = (batch, self.hidden_size) if batched else (self.hidden_size,)
        dh = real_array("dh", dh, self.dtype)
        check_shape("dh", dh, shape, "(the shape of that call's h)")
        if dc is None:
            dc = np.zeros(shape, self.dtype)
        dc = real_array("dc", dc, self.dtype)
        check_shape("dc", dc, shape, "(the shape of that call's c)")
        self._pop_cache()
        dout = np.ascontiguousarray(dh.reshape(1, batch, self.hidden_size))
        dc_n = np.ascontiguousarray(dc.reshape(1, batch, self.hidden_size))
        dx, dh0, dc0 = _engine.backward(
            self._layers, self._layer_grads, caches, dout, np.zeros_like(dc_n), dc_n, lengths,
            hidden=self.hidden_size,
        )  # fmt: skip
        dx = dx[0].reshape(x_shape)
        if batched:
            return dx, (dh0[0], dc0[0])
        return dx, (dh0[0, 0], dc0[0, 0])
