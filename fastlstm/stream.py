"""Streaming inference: step a model as data arrives, weights packed once, state kept inside.

``lstm.stream(batch_size)`` and ``cell.stream(batch_size)`` return a :class:`Stream` or
:class:`CellStream`: an inference session over a snapshot of the model's weights. Creating
one packs every layer's weights for the micro-kernels and lays out the state and all
scratch in one array; a step is then one compiled call for all layers
(:mod:`fastlstm._kernels.stream`) on the calling thread (a large step of many rows: its
rows in two parts, the second on fastlstm's helper thread; see PARALLEL_STEP_MACS), with
no packing and, with ``out=``, no array allocated.

Numbers: those of the model in eval mode over the whole sequence (within float rounding),
whether the sequence comes one step or a chunk of any size at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastlstm import _memory
from fastlstm._kernels import packing
from fastlstm._kernels import stream as stream_kernels
from fastlstm._kernels.stream import (
    _HEADER,
    _RECORD,
    M_BATCH,
    M_C,
    M_C_NEW,
    M_COPY_BIAS,
    M_H,
    M_HIDDEN,
    M_LAYERS,
    M_M,
    M_ONE_ROW,
    M_OUT,
    M_PEEPHOLE,
    M_PROJ,
    M_ROW_STRIDE,
    M_ROWS,
    R_BIAS,
    R_HR,
    R_IFG,
    R_MAIN,
    R_O,
    R_PEEP,
    R_WIDTH,
    R_XP,
)
from fastlstm._module import check_positive_int, to_numpy
from fastlstm._threads import get_num_threads, run_tasks
from fastlstm._validate import check_shape, real_array

State = tuple[np.ndarray, np.ndarray]
_PEEPHOLE_CODES = {None: 0, "diagonal": 1, "full": 2}
_LINE_BYTES = 64  # regions of the workspace start on a cache line
# A stream of at least PARALLEL_STEP_MIN_ROWS rows steps them as two parts on two threads
# (when fastlstm has two at its creation) from PARALLEL_STEP_MACS multiply-adds per step
# (None: never). Measured on an AMD EPYC Zen 4 (2 vCPUs), LSTM(H, H), one part against two,
# once the hand-off to the helper thread cost about 10 us (fastlstm._threads): B = 8,
# H = 256 (4.2 M) 86 -> 58-66 us; B = 16, H = 128 (2.1 M) 45 -> 35-41; B = 32, H = 96
# (2.4 M) 53 -> 38; B = 64, H = 64 (2.1 M) 51 -> 39; below about 2 M no gain (B = 16, H = 96:
# 27 -> 29 us); with 2 rows a part none either (B = 4, H = 512: 171 both: each part
# streams all the weights).
PARALLEL_STEP_MACS: int | None = 2_000_000
PARALLEL_STEP_MIN_ROWS = 8


def _one_row(batch: int, hidden: int, dtype: np.dtype) -> bool:
    """Whether a step's main product is the one-row kernel (pack_units panels) rather than
    the register tile (pack_columns panels).

    One row: the one-row kernel keeps many independent accumulator chains, but works on
    chunks of several vectors of hidden units per gate; when H fills at most half a chunk,
    most of its work is padding and the register tile (two vectors wide) is faster
    (measured, AVX-512, 128-unit chunks, per step: H = 64 one-row 4.0 us, tile 2.7; H = 100
    5.8 and 6.6; H = 256 25 and 35)."""
    chunk = packing.units_shape((1, 4, 1), np.dtype(dtype).itemsize)[4]
    return batch == 1 and 2 * hidden > chunk


def _aligned_zeros(size: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed 1-D array of ``size`` elements whose first element starts a cache line
    (a large one on huge pages: :mod:`fastlstm._memory`)."""
    itemsize = np.dtype(dtype).itemsize
    mapped = _memory.on_huge_pages((size,), dtype)  # (starts on a page)
    if mapped is not None:
        return mapped
    raw = np.zeros(size * itemsize + _LINE_BYTES, np.uint8)
    skip = -raw.ctypes.data % _LINE_BYTES
    return raw[skip : skip + size * itemsize].view(dtype)


class Stream:
    """Streaming inference over an :class:`fastlstm.LSTM`: made by ``lstm.stream()``.

    Parameters
    ----------
    model : fastlstm.LSTM
        A unidirectional model (any layers, projection, peepholes). Its weights are
        packed once here; later edits are invisible until :meth:`refresh`.
    batch_size : int, default 1
        B, the number of streams stepped together (rows); a positive integer.

    Notes
    -----
    Each step runs every layer in one compiled call on the calling thread (from
    PARALLEL_STEP_MIN_ROWS rows and PARALLEL_STEP_MACS multiply-adds a step, with two
    threads: the rows in two parts, the second on fastlstm's helper thread; the same
    bits). One stream serves one thread at a time; separate streams (of one model or
    several) may run in separate threads at once. A stream never changes its model and
    applies no dropout.
    """

    _cell = False

    def __init__(self, model: Any, batch_size: int = 1) -> None:
        if getattr(model, "bidirectional", False):
            raise ValueError(
                "a bidirectional LSTM cannot stream: its reverse direction needs the whole "
                "sequence (the future); use forward() on whole sequences instead"
            )
        self.batch_size = check_positive_int("batch_size", batch_size)
        self._model = model
        self.dtype = model.dtype
        self.input_size = model.input_size
        self.hidden_size = model.hidden_size
        self._out_size = getattr(model, "proj_size", 0) or model.hidden_size
        self._layers = len(model._layers)
        self._batch_first = bool(getattr(model, "batch_first", False)) and not self._cell
        self._layout()
        self.refresh()
        batch, inputs, out_size = self.batch_size, self.input_size, self._out_size
        # The step's fast path: an array of exactly this shape and dtype goes straight in.
        self._x_shape = (batch, inputs)
        self._y_shape = (batch, out_size)
        self._step_kernel = stream_kernels.stream_step
        self._chunk_kernel = stream_kernels.stream_chunk

    # ------------------------------------------------------------------ layout
    def _plan_parts(self, widths: list[int]) -> int:
        """1, or 2 when each step's rows are split over two threads (see PARALLEL_STEP_MACS)."""
        batch, hidden, out_size = self.batch_size, self.hidden_size, self._out_size
        macs = batch * 4 * hidden * sum(width + out_size for width in widths)
        threshold = PARALLEL_STEP_MACS
        if (
            threshold is not None
            and get_num_threads() >= 2
            and batch >= max(2, PARALLEL_STEP_MIN_ROWS)
            and macs >= threshold
        ):
            return 2
        return 1

    def _layout(self) -> None:
        """Size the workspace, the panels and meta (see fastlstm._kernels.stream) for this model."""
        dtype = self.dtype
        itemsize = dtype.itemsize
        batch, hidden, out_size, layers = (
            self.batch_size, self.hidden_size, self._out_size, self._layers,
        )  # fmt: skip
        units = batch * hidden
        model_layers = self._model._layers
        peephole = _PEEPHOLE_CODES[self._model.peephole]
        has_proj = model_layers[0].w_hr is not None
        one_row = _one_row(batch, hidden, dtype)
        align = max(1, _LINE_BYTES // itemsize)
        cursor = 0

        def region(size: int) -> int:
            nonlocal cursor
            start = -(-cursor // align) * align
            cursor = start + size
            return start

        meta = np.zeros(_HEADER + layers * _RECORD, np.int64)
        widths = [layer.w_ih.shape[2] for layer in model_layers]
        parts = self._plan_parts(widths)
        one_row = one_row and parts == 1
        depth = max(widths) + out_size
        meta[M_LAYERS], meta[M_BATCH], meta[M_HIDDEN], meta[M_OUT] = (
            layers, batch, hidden, out_size,
        )  # fmt: skip
        meta[M_ONE_ROW], meta[M_PEEPHOLE], meta[M_PROJ] = one_row, peephole, has_proj
        meta[M_H] = region(layers * batch * out_size)
        meta[M_C] = region(layers * units)
        meta[M_C_NEW] = region(units)
        meta[M_M] = region(units if has_proj else 0)
        meta[M_ROWS] = region(batch * depth)
        meta[M_ROW_STRIDE] = depth
        meta[M_COPY_BIAS] = parts > 1
        bounds = [batch * part // parts for part in range(parts + 1)]
        self._parts = [(bounds[p], bounds[p + 1]) for p in range(parts)]
        panel_cursor = 0

        def panels(at: int, shape: tuple) -> None:
            nonlocal panel_cursor
            start = -(-panel_cursor // align) * align
            panel_cursor = start + int(np.prod(shape))
            meta[at] = start
            meta[at + 1 : at + 1 + len(shape)] = shape

        for k, width in enumerate(widths):
            rec = _HEADER + k * _RECORD
            meta[rec + R_WIDTH] = width
            meta[rec + R_XP] = region(4 * units)
            meta[rec + R_BIAS] = region(4 * units)
            meta[rec + R_PEEP] = region(3 * units if peephole == 1 else 0)
            stacked = (1, 4 * hidden, width + out_size)
            if one_row:
                panels(rec + R_MAIN, packing.units_shape(stacked, itemsize))
            else:
                panels(rec + R_MAIN, packing.columns_shape(stacked, 4, itemsize))
            if has_proj:
                panels(rec + R_HR, packing.columns_shape((1, out_size, hidden), 1, itemsize))
            if peephole == 2:
                panels(rec + R_IFG, packing.columns_shape((1, 3 * hidden, hidden), 3, itemsize))
                panels(rec + R_O, packing.columns_shape((1, hidden, hidden), 1, itemsize))
        self._meta = meta
        self._ws = _aligned_zeros(cursor, dtype)
        self._panels = _aligned_zeros(panel_cursor, dtype)
        self._h = self._ws[meta[M_H] : meta[M_H] + layers * batch * out_size].reshape(
            layers, batch, out_size
        )
        self._c = self._ws[meta[M_C] : meta[M_C] + layers * units].reshape(layers, batch, hidden)

    def _region(self, at: int, shape: tuple) -> np.ndarray:
        start = int(at)
        return self._ws[start : start + int(np.prod(shape))].reshape(shape)

    def _panel_view(self, rec_at: int, ndim: int) -> np.ndarray:
        meta = self._meta
        start = int(meta[rec_at])
        shape = tuple(int(n) for n in meta[rec_at + 1 : rec_at + 1 + ndim])
        return self._panels[start : start + int(np.prod(shape))].reshape(shape)

    def refresh(self) -> None:
        """Re-read the model's current weights (pack them again); the state is kept."""
        meta = self._meta
        batch, hidden = self.batch_size, self.hidden_size
        units = batch * hidden
        peephole = int(meta[M_PEEPHOLE])
        for k, layer in enumerate(self._model._layers):
            rec = _HEADER + k * _RECORD
            width = layer.w_ih.shape[2]
            if meta[M_ONE_ROW]:
                both = np.concatenate([layer.w_ih, layer.w_hh], axis=2)
                packing.pack_units(self._panel_view(rec + R_MAIN, 5), both)
            else:
                main = self._panel_view(rec + R_MAIN, 4)
                packing.pack_columns(main, np.ascontiguousarray(layer.w_ih), 4, 0)
                packing.pack_columns(main, np.ascontiguousarray(layer.w_hh), 4, width)
            if layer.w_hr is not None:
                packing.pack_columns(
                    self._panel_view(rec + R_HR, 4), np.ascontiguousarray(layer.w_hr), 1, 0
                )
            if peephole == 2:
                ifg = np.ascontiguousarray(layer.w_ch[:, : 3 * hidden])
                o = np.ascontiguousarray(layer.w_ch[:, 3 * hidden :])
                packing.pack_columns(self._panel_view(rec + R_IFG, 4), ifg, 3, 0)
                packing.pack_columns(self._panel_view(rec + R_O, 4), o, 1, 0)
            bias = np.zeros(4 * hidden, self.dtype)
            for part in (layer.b_ih, layer.b_hh, layer.b_ch):
                if part is not None:
                    bias += part[0]
            tiled = np.tile(bias.reshape(4, 1, hidden), (1, batch, 1)).reshape(4, units)
            self._region(meta[rec + R_BIAS], (4, units))[...] = tiled
            # A plain layer's gate block holds the bias between steps (the gate pass
            # writes it back); peephole layers copy it in every step.
            self._region(meta[rec + R_XP], (4, units))[...] = tiled
            if peephole == 1:
                peep = np.tile(layer.peep[0].reshape(3, 1, hidden), (1, batch, 1))
                self._region(meta[rec + R_PEEP], (3, units))[...] = peep.reshape(3, units)

    # -------------------------------------------------------------------- steps
    def step(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Advance every stream (row) by one step.

        Parameters
        ----------
        x : array_like
            (B, I) in the model's dtype (any real array-like is converted), or (I,) when
            B = 1.
        out : ndarray, optional
            Where to write the result: C-contiguous, writeable, of the result's shape and
            the model's dtype. With it the step allocates nothing.

        Returns
        -------
        ndarray
            The top layer's h_t, (B, H_out), or (H_out,) for an (I,) input; ``out`` when
            given, else a new array.
        """
        if (
            type(x) is np.ndarray
            and x.dtype is self.dtype
            and x.shape == self._x_shape
            and x.flags.carray
        ):
            shape = self._y_shape
        else:
            x, shape = self._step_input(x)
        if out is None:
            out = np.empty(shape, self.dtype)
            result = out
        elif (
            type(out) is np.ndarray
            and out.dtype is self.dtype
            and out.shape == shape
            and out.flags.carray
        ):
            result = out
        else:
            self._check_out(out, shape)
            result = out
        if out.ndim == 1:  # unbatched: the kernel takes (1, I) -> (1, H_out)
            x, out = x.reshape(self._x_shape), out.reshape(self._y_shape)
        if len(self._parts) == 1:
            self._step_kernel(out, x, self._ws, self._panels, self._meta)
        else:
            self._step_parts(out, x)
        return result

    def _step_parts(self, out: np.ndarray, x: np.ndarray) -> None:
        """One step with the rows in parts on fastlstm's threads (the caller takes one)."""
        args = (out, x, self._ws, self._panels, self._meta)
        run_tasks(stream_kernels.stream_step_rows, [(*args, *part) for part in self._parts])

    def __call__(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Advance every stream by a chunk of T steps (T >= 0).

        Parameters
        ----------
        x : array_like
            (T, B, I), or (B, T, I) with the model's ``batch_first``, or (T, I) when B = 1.
        out : ndarray, optional
            Where to write the result, C-contiguous, of its shape and the model's dtype.

        Returns
        -------
        ndarray
            The top layer's outputs, (T, B, H_out) in the layout of x (as ``forward``).
        """
        x, shape, steps, strides = self._chunk_input(x)
        if out is None:
            out = np.empty(shape, self.dtype)
        elif not (
            type(out) is np.ndarray
            and out.dtype is self.dtype
            and out.shape == shape
            and out.flags.carray
        ):
            self._check_out(out, shape)
        if steps:
            self._chunk_kernel(
                out.reshape(out.size), x.reshape(x.size), self._ws, self._panels, self._meta,
                steps, *strides,
            )  # fmt: skip
        return out

    # ------------------------------------------------------------- state
    @property
    def state(self) -> State:
        """(h, c): copies of the state, (L, B, H_out) and (L, B, H) (B = 1 kept).

        Setting it takes the same shapes (or (L, H_out), (L, H) when B = 1) and copies them
        in; ``None`` sets zeros. A refused value changes nothing.
        """
        return self._h.copy(), self._c.copy()

    @state.setter
    def state(self, value: State | None) -> None:
        if value is None:
            self.reset()
            return
        h, c = self._state_arrays(value)
        layers, batch = self._layers, self.batch_size
        self._h[...] = h.reshape(layers, batch, self._out_size)
        self._c[...] = c.reshape(layers, batch, self.hidden_size)

    def reset(self, rows: Any = None) -> None:
        """Zero the state of every row, or only of ``rows`` (row indices 0..B-1, a sequence
        or one integer); the other rows continue unchanged."""
        if rows is None:
            self._h[...] = 0
            self._c[...] = 0
            return
        index = self._row_index(rows)
        self._h[:, index] = 0
        self._c[:, index] = 0

    # ----------------------------------------------------------- checks
    def _step_input(self, x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        array = real_array("x", x, self.dtype)
        batch, inputs = self._x_shape
        if array.shape == self._x_shape:
            shape = self._y_shape
        elif batch == 1 and array.shape == (inputs,):
            shape = (self._out_size,)
        else:
            one = f" or ({inputs},)" if batch == 1 else ""
            raise ValueError(
                f"x: expected shape (B, I) = {self._x_shape}{one} for one step of "
                f"{batch} stream(s), got {np.shape(array)}"
            )
        return self._kernel_ready(array), shape

    def _chunk_input(self, x: Any):
        """x as a C-contiguous array, the result's shape, T, and the kernel's strides
        (x per step, x per row, out per step, out per row)."""
        array = real_array("x", x, self.dtype)
        batch, inputs, out_size = self.batch_size, self.input_size, self._out_size
        if array.ndim == 3:
            steps = array.shape[0 if not self._batch_first else 1]
            layout = "(B, T, I)" if self._batch_first else "(T, B, I)"
            expected = (batch, steps, inputs) if self._batch_first else (steps, batch, inputs)
        elif array.ndim == 2 and batch == 1:
            steps = array.shape[0]
            layout = "(T, I)"
            expected = (steps, inputs)
        else:
            steps, layout, expected = None, "", None
        if expected is None or array.shape != expected:
            accepted = "(B, T, I)" if self._batch_first else "(T, B, I)"
            one = " or (T, I) for one stream" if batch == 1 else ""
            raise ValueError(
                f"x: expected a chunk {accepted} with B = {batch}, I = {inputs}{one}, "
                f"got shape {np.shape(array)}" + (f" (read as {layout})" if layout else "")
            )
        if array.ndim == 2:
            shape = (steps, out_size)
            strides = (inputs, 0, out_size, 0)
        elif self._batch_first:
            shape = (batch, steps, out_size)
            strides = (inputs, steps * inputs, out_size, steps * out_size)
        else:
            shape = (steps, batch, out_size)
            strides = (batch * inputs, inputs, batch * out_size, out_size)
        return self._kernel_ready(array), shape, steps, strides

    def _kernel_ready(self, array: np.ndarray) -> np.ndarray:
        """C-contiguous, aligned, writeable (the one array type the kernels compile for)."""
        return array if array.flags.carray else np.array(array, self.dtype, order="C")

    def _check_out(self, out: Any, shape: tuple[int, ...]) -> None:
        """Raise the error that says why ``out`` cannot take a result of ``shape`` (return if
        it can: the fast path compares dtypes by identity)."""
        if not isinstance(out, np.ndarray) or type(out) is not np.ndarray:
            raise TypeError(f"out must be a NumPy ndarray, got {type(out).__name__}")
        if out.dtype != self.dtype:
            raise TypeError(f"out: expected dtype {self.dtype}, got {out.dtype}")
        if out.shape != shape:
            raise ValueError(f"out: expected shape {shape}, got {out.shape}")
        if out.flags.carray:  # an equal dtype that is not the same object: fine
            return
        raise ValueError(
            "out must be C-contiguous, aligned and writeable (flags "
            f"c_contiguous={out.flags.c_contiguous}, aligned={out.flags.aligned}, "
            f"writeable={out.flags.writeable})"
        )

    def _state_arrays(self, value: Any) -> State:
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise TypeError(f"state must be a tuple (h, c), got {type(value).__name__}")
        h = real_array("h", value[0], self.dtype)
        c = real_array("c", value[1], self.dtype)
        layers, batch = self._layers, self.batch_size
        h_shape = (layers, batch, self._out_size)
        c_shape = (layers, batch, self.hidden_size)
        if batch == 1 and h.ndim == 2 and c.ndim == 2:
            h_shape, c_shape = (layers, self._out_size), (layers, self.hidden_size)
        check_shape("h", h, h_shape, "(layers, B, H_out)")
        check_shape("c", c, c_shape, "(layers, B, hidden)")
        return h, c

    def _row_index(self, rows: Any) -> np.ndarray:
        array = to_numpy(rows)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise TypeError(f"rows must be a sequence of integer row indices, got {rows!r}")
        bad = (array < 0) | (array >= self.batch_size)
        if bad.any():
            raise ValueError(
                f"rows must lie in 0..{self.batch_size - 1} (B = {self.batch_size}), "
                f"got {array[bad].tolist()}"
            )
        return array.astype(np.intp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, model={self._model!r})"


class CellStream(Stream):
    """Streaming inference over an :class:`fastlstm.LSTMCell`: made by ``cell.stream()``.

    As :class:`Stream` with one layer and no ``batch_first``: ``step`` maps (B, I) to
    (B, H), a chunk (T, B, I) to (T, B, H), and ``state`` is (h, c), each (B, H).
    """

    _cell = True

    @property
    def state(self) -> State:
        """(h, c): copies of the state, each (B, H) (B = 1 kept).

        Setting it takes the same shapes (or (H,), (H,) when B = 1) and copies them in;
        ``None`` sets zeros. A refused value changes nothing.
        """
        return self._h[0].copy(), self._c[0].copy()

    @state.setter
    def state(self, value: State | None) -> None:
        Stream.state.fset(self, value)

    def _state_arrays(self, value: Any) -> State:
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise TypeError(f"state must be a tuple (h, c), got {type(value).__name__}")
        h = real_array("h", value[0], self.dtype)
        c = real_array("c", value[1], self.dtype)
        shape = (self.batch_size, self.hidden_size)
        if self.batch_size == 1 and h.ndim == 1 and c.ndim == 1:
            shape = (self.hidden_size,)
        check_shape("h", h, shape, "(B, hidden)")
        check_shape("c", c, shape, "(B, hidden)")
        return h, c
