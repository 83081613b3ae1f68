"""Stacked-LSTM forward and backward over validated arrays: the packing and the calls.

The public classes validate and lay out their inputs, then call :func:`forward` and
:func:`backward` here with time-major, C-contiguous arrays in the model's dtype. Per layer:
pack the weights for the micro-kernel (:mod:`fastlstm._kernels.packing`), take the route
:mod:`fastlstm._routes` plans (row chunks, directions, or hidden units: a one-row batch, a
thin batch, or weights beyond the cache), run the time loops (which project each step's
inputs themselves unless the weights are large: then one product over all steps first; a
one-row batch's tasks each project their own units' inputs over all steps before their
loop), and after the backward loop the weight gradients as GEMMs over all steps. Large
scratch arrays come from a per-thread workspace. The only Python loop is over layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fastlstm import _kernels, _memory, _routes
from fastlstm._config import PACKED_PROJECTION_BYTES, SMALL_ROW_MACS
from fastlstm._kernels import packing
from fastlstm._precompile import notice_first_compile
from fastlstm._threads import blas_single_threaded, get_num_threads, run_tasks


@dataclass
class LayerArrays:
    """One layer's parameters (or gradients), both directions stacked on the first axis.

    Absent options are ``None``; the kernels get empty or zero arrays in their place.
    """

    w_ih: np.ndarray  # (D, G, I_k)
    w_hh: np.ndarray  # (D, G, P)
    b_ih: np.ndarray | None  # (D, G)
    b_hh: np.ndarray | None  # (D, G)
    w_hr: np.ndarray | None  # (D, P, H)
    peep: np.ndarray | None  # (D, 3, H)
    w_ch: np.ndarray | None  # (D, G, H)
    b_ch: np.ndarray | None  # (D, G)


@dataclass
class LayerCache:
    inputs: np.ndarray  # (T*B, I_k) what the layer read (after dropout)
    xp: np.ndarray  # (D, 4, T, B*H) gates after forward, dL/da after backward
    xh: np.ndarray  # (D, T*B, I_k + P) rows [x_t | h_{t-1}]
    cstate: np.ndarray  # (D, T, B*H)
    mstore: np.ndarray  # (D, T, B, H) with projection, else empty
    h0: np.ndarray  # (D, B, P)
    c0: np.ndarray  # (D, B, H)
    mask: np.ndarray | None  # dropout mask applied to this layer's output


def _timed(timings: dict[str, float] | None, name: str, function, *args):
    """Call ``function(*args)``; when profiling, add its wall time to ``timings[name]``."""
    if timings is None:
        return function(*args)
    start = time.perf_counter()
    result = function(*args)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return result


@functools.cache
def _empty(dtype: np.dtype, ndim: int) -> np.ndarray:
    """A shared zero-size array: the stand-in kernels take for an absent option or store.

    Zero-size arrays hold nothing to write, so one per (dtype, ndim) serves every call.
    """
    return np.zeros((0,) * ndim, dtype)


# ------------------------------------------------------------------------ workspace
# Large scratch arrays (packed weights, the training caches) are reused across calls:
# a fresh block of memory costs a page fault per 4 KiB on first touch, every call (measured:
# packing a 16 MiB W_hh took 11 ms into fresh memory, 4.4 ms into a used block). Free
# arrays are kept per thread, shared by every model on it (calls from several threads
# never share one), at most _KEEP_PER_SHAPE per shape, _KEEP_SHAPES shapes and _KEEP_BYTES
# in all, least recently given back first out.
_KEEP_PER_SHAPE = 2
_KEEP_SHAPES = 16
_KEEP_BYTES = 1 << 30  # at most 1 GiB kept per thread (beyond one shape's arrays)
_MIN_POOLED_BYTES = 1 << 16  # smaller arrays are cheap to allocate
_local = threading.local()


def _free_lists() -> OrderedDict:
    free = getattr(_local, "free", None)
    if free is None:
        free = _local.free = OrderedDict()
    return free


def _take(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` with arbitrary contents: a reused one if free."""
    if math.prod(shape) * np.dtype(dtype).itemsize < _MIN_POOLED_BYTES:
        return np.empty(shape, dtype)  # never pooled (see _give)
    free = _free_lists()
    key = (tuple(shape), np.dtype(dtype).str)
    stack = free.get(key)
    if not stack:
        return _memory.empty(tuple(shape), dtype)  # large ones on huge pages
    array = stack.pop()
    if not stack:
        del free[key]
    return array


def _give(*arrays: np.ndarray) -> None:
    """Hand arrays from :func:`_take` back for reuse; the caller must not touch them again."""
    free = _free_lists()
    for array in arrays:
        if array.nbytes < _MIN_POOLED_BYTES:
            continue
        key = (array.shape, array.dtype.str)
        stack = free.setdefault(key, [])
        free.move_to_end(key)
        if len(stack) < _KEEP_PER_SHAPE:
            stack.append(array)
        while len(free) > _KEEP_SHAPES or (
            len(free) > 1 and sum(a.nbytes for k in free for a in free[k]) > _KEEP_BYTES
        ):
            free.popitem(last=False)


def _pack_columns(w: np.ndarray, blocks: int) -> np.ndarray:
    packed = _take(packing.columns_shape(w.shape, blocks, w.itemsize), w.dtype)
    packing.pack_columns(packed, w, blocks, 0)
    return packed


def pack_stacked(w_ih: np.ndarray, w_hh: np.ndarray) -> np.ndarray:
    """[W_ih | W_hh] (D, 4H, I + P) as one set of panels: the fused loop's single product
    [x_t | h_{t-1}] [W_ih | W_hh]^T per step."""
    directions, gates, width = w_ih.shape
    shape = packing.columns_shape((directions, gates, width + w_hh.shape[2]), 4, w_ih.itemsize)
    packed = _take(shape, w_ih.dtype)
    packing.pack_columns(packed, w_ih, 4, 0)
    packing.pack_columns(packed, w_hh, 4, width)
    return packed


def _pack_units_rows(w: np.ndarray) -> np.ndarray:
    packed = _take(packing.units_rows_shape(w.shape, w.itemsize), w.dtype)
    packing.pack_units_rows(packed, w)
    return packed


def _pack_rows(w: np.ndarray) -> np.ndarray:
    packed = _take(packing.rows_shape(w.shape, w.itemsize), w.dtype)
    packing.pack_rows(packed, w)
    return packed


def _optional(array: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """The array, or the empty 3-D stand-in kernels take for an absent option."""
    return array if array is not None else _empty(dtype, 3)


def _summed_bias(layer: LayerArrays) -> np.ndarray:
    """b_ih + b_hh (+ b_ch): every bias adds to the same pre-activation."""
    parts = [part for part in (layer.b_ih, layer.b_hh, layer.b_ch) if part is not None]
    if not parts:
        return np.zeros(layer.w_hh.shape[:2], layer.w_hh.dtype)
    bias = parts[0].copy()
    for part in parts[1:]:
        bias += part
    return bias


def _held_blas():
    """Every BLAS call of the engine runs inside this: the BLAS held to one thread (on the
    main thread; see :func:`fastlstm._threads.blas_single_threaded`). The engine's
    parallelism is its own tasks: a threaded BLAS would sum some products in another order
    than one thread (results must not depend on the thread count) and leave threads
    spinning that take a core from the time loops. Phases that call no BLAS (the packed
    products, tiny weight gradients) skip the hold, which costs a few microseconds."""
    return blas_single_threaded()


def _run_calls(function, calls: list[tuple]) -> None:
    """``function(*call)`` for every part, at once on fastlstm's threads when there are
    two or more, else one after another."""
    if get_num_threads() >= 2 and len(calls) > 1:
        run_tasks(function, calls)
    else:
        for call in calls:
            function(*call)


def _run_parts(function, calls: list[tuple]) -> None:
    """:func:`_run_calls` with the BLAS on one thread in each part."""
    with _held_blas():
        _run_calls(function, calls)


def _project_inputs(xp, inputs, w_ih, bias) -> None:
    """Every step's input projection before the time loop: for few rows (a small batch
    beyond the fused limit, or one row with a projection or full peepholes) through the
    packed micro-kernel, else BLAS GEMMs. Split over fastlstm's threads (BLAS
    on one thread each) when large, never on the BLAS's threads: an OpenBLAS thread
    left spinning after a threaded call takes a core from the time loop's tasks that
    follow (measured at the latency shape: the one-row loop on two threads took 3.1 ms
    after a threaded projection, 1.4 ms after a split one, which itself took 0.85 ms
    against 1.3)."""
    steps = xp.shape[2]
    rows, width = inputs.shape
    parts = max(1, min(_routes.parts(rows * width * w_ih.shape[0] * w_ih.shape[1]), steps))
    if -(-rows // parts) * inputs.strides[0] <= PACKED_PROJECTION_BYTES:
        # Few rows: the packed micro-kernel, rows cut anywhere.
        packed = _pack_columns(w_ih, 4)
        bounds = [rows * part // parts for part in range(parts + 1)]
        calls = [(xp, inputs, packed, bias, bounds[i], bounds[i + 1]) for i in range(parts)]
        _run_calls(_kernels.project_inputs_packed, calls)
        _give(packed)
        return
    if parts < 2:
        with _held_blas():
            _kernels.project_inputs(xp, inputs, w_ih, bias, 0, steps)
        return
    bounds = [steps * part // parts for part in range(parts + 1)]
    calls = [(xp, inputs, w_ih, bias, bounds[i], bounds[i + 1]) for i in range(parts)]
    _run_parts(_kernels.project_inputs, calls)


def forward_panels(layer: LayerArrays, fused: bool) -> tuple[np.ndarray, ...]:
    """The forward loop's weights packed for the micro-kernel, once per layer call:
    ([W_ih | W_hh] if ``fused``, else W_hh, W_hr, W_ch[i, f, g], W_ch[o]) as ``x W^T``
    panels (empty arrays when absent)."""
    dtype = layer.w_hh.dtype
    hidden = layer.w_hh.shape[1] // 4
    w_ih = pack_stacked(layer.w_ih, layer.w_hh) if fused else _empty(dtype, 4)
    w_hh = _pack_columns(layer.w_hh, 4) if not fused else _empty(dtype, 4)
    w_hr = _pack_columns(layer.w_hr, 1) if layer.w_hr is not None else _empty(dtype, 4)
    if layer.w_ch is None:
        return w_ih, w_hh, w_hr, _empty(dtype, 4), _empty(dtype, 4)
    ifg = np.ascontiguousarray(layer.w_ch[:, : 3 * hidden])
    o = np.ascontiguousarray(layer.w_ch[:, 3 * hidden :])
    return w_ih, w_hh, w_hr, _pack_columns(ifg, 3), _pack_columns(o, 1)


def backward_panels(layer: LayerArrays) -> tuple[np.ndarray, ...]:
    """The backward loop's weights packed for the micro-kernel, once per layer call:
    (W_hh, W_hr, W_ch) as ``x W`` panels (empty arrays when absent)."""
    dtype = layer.w_hh.dtype
    return tuple(
        _pack_rows(w) if w is not None else _empty(dtype, 4)
        for w in (layer.w_hh, layer.w_hr, layer.w_ch)
    )


def layer_forward_serial(args: tuple, tasks: list[tuple[int, int, int]]) -> None:
    """The forward time loops of one layer on the calling thread, task after task."""
    *arrays, training = args
    for task in tasks:
        _kernels.layer_forward_rows(*arrays, *task, training)


def layer_backward_serial(args: tuple, tasks: list[tuple[int, int, int]]) -> None:
    """The backward time loops of one layer on the calling thread, task after task."""
    for task in tasks:
        _kernels.layer_backward_rows(*args, *task)


def layer_forward_parallel(args: tuple, tasks: list[tuple[int, int, int]]) -> None:
    """The forward time loops of one layer as parallel tasks (direction, first row, end row)."""
    *arrays, training = args
    run_tasks(_kernels.layer_forward_rows, [(*arrays, *task, training) for task in tasks])


def layer_backward_parallel(args: tuple, tasks: list[tuple[int, int, int]]) -> None:
    """The backward time loops of one layer as parallel tasks (direction, first row, end row)."""
    run_tasks(_kernels.layer_backward_rows, [(*args, *task) for task in tasks])


def _time_loops(timings, name, serial, parallel, args, tasks, in_parallel):
    """Run one layer's time loops as planned: serially or as tasks."""
    _timed(timings, name, parallel if in_parallel else serial, args, tasks)


def _forward_kernel(one_row: bool, unit_tasks: list):
    """The forward loop kernel a layer's route runs (for the first-compile notice)."""
    if one_row:
        return _kernels.layer_forward_one_row
    return _kernels.layer_forward_units if unit_tasks else _kernels.layer_forward_rows


def _backward_kernel(one_row: bool, unit_tasks: list):
    """The backward loop kernel a layer's route runs (for the first-compile notice)."""
    if one_row:
        return _kernels.layer_backward_one_row
    return _kernels.layer_backward_units if unit_tasks else _kernels.layer_backward_rows


def forward(
    layers: list[LayerArrays],
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    lengths: np.ndarray,
    *,
    hidden: int,
    training: bool,
    dropout: float,
    rng: np.random.Generator,
    timings: dict[str, float] | None = None,
):
    """Run every layer. x (T, B, I); h0 (L*D, B, P); c0 (L*D, B, H); lengths (B,) int64.

    Returns out (T, B, D*P), h_n, c_n and, in training, the list of LayerCache.
    With a ``timings`` dict, adds seconds per phase: "input_gemm", "pack_weights", "time_loop",
    "dropout".
    """
    steps, batch, _ = x.shape
    directions, gates, out_size = layers[0].w_hh.shape
    dtype = x.dtype
    h_n = np.empty_like(h0)
    c_n = np.empty_like(c0)
    caches = []
    layer_in = x
    tasks, in_parallel = _routes.row_plan(steps, batch, directions, gates, out_size)
    for k, layer in enumerate(layers):
        width = layer_in.shape[2]
        inputs = layer_in.reshape(steps * batch, width)
        bias = _summed_bias(layer)
        fused, unit_tasks = _routes.loop_route(steps, batch, layer)
        # Training keeps every step's gates for backward; inference with the projection in
        # the loop needs one step's.
        slots = steps if training or not fused else 1
        xp = _take((directions, 4, slots, batch * hidden), dtype)
        one_row_layer = batch == 1 and layer.w_hr is None and layer.w_ch is None
        notice_first_compile(_forward_kernel(one_row_layer, unit_tasks), dtype, "forward")
        if not fused and not one_row_layer:  # (a one-row loop projects its own inputs)
            _timed(timings, "input_gemm", _project_inputs, xp, inputs, layer.w_ih, bias)
        out = np.empty((steps, batch, directions * out_size), dtype)
        if training:
            xh = _take((directions, steps * batch, width + out_size), dtype)
            if one_row_layer or unit_tasks:
                # These loops write each step's h_{t-1} beside x_t (split by units, no
                # thread owns a whole row); the row-chunk loop writes both, in its task.
                xh[:, :, :width] = inputs
            cstate = _take((directions, steps, batch * hidden), dtype)
            has_proj = layer.w_hr is not None
            mstore = _take((directions, steps, batch, hidden) if has_proj else (0,) * 4, dtype)
        else:
            xh, cstate, mstore = _empty(dtype, 3), _empty(dtype, 3), _empty(dtype, 4)
        rows = slice(k * directions, (k + 1) * directions)
        if one_row_layer:
            _forward_one_row(
                timings, layer, out, h_n[rows], c_n[rows], xp, xh, cstate,
                h0[rows], c0[rows], inputs, bias, lengths, training,
            )  # fmt: skip
        elif unit_tasks:
            _forward_units(
                timings, layer, unit_tasks, out, h_n[rows], c_n[rows], xp, xh, cstate,
                h0[rows], c0[rows], lengths, training,
            )  # fmt: skip
        else:
            packed = _timed(timings, "pack_weights", forward_panels, layer, fused)
            args = (
                out, h_n[rows], c_n[rows], xp, xh, cstate, mstore, h0[rows], c0[rows],
                inputs, bias, layer.w_hh, packed, _optional(layer.w_hr, dtype),
                _optional(layer.peep, dtype), _optional(layer.w_ch, dtype), lengths, training,
            )  # fmt: skip
            _time_loops(
                timings, "time_loop", layer_forward_serial, layer_forward_parallel,
                args, tasks, in_parallel,
            )  # fmt: skip
            _give(*packed)
        if not training:
            _give(xp)
        mask = None
        if training and dropout > 0 and k < len(layers) - 1:
            mask = _timed(timings, "dropout", _dropout_mask, rng, out.shape, dropout, dtype)
        if training:
            caches.append(LayerCache(inputs, xp, xh, cstate, mstore, h0[rows], c0[rows], mask))
        layer_in = out * mask if mask is not None else out
    return out, h_n, c_n, caches


def backward(
    layers: list[LayerArrays],
    grads: list[LayerArrays],
    caches: list[LayerCache],
    dout: np.ndarray,
    dh_n: np.ndarray,
    dc_n: np.ndarray,
    lengths: np.ndarray,
    *,
    hidden: int,
    timings: dict[str, float] | None = None,
):
    """Backpropagate through every layer, adding into ``grads``.

    dout (T, B, D*P); dh_n (L*D, B, P); dc_n (L*D, B, H). Returns dx (T, B, I), dh0, dc0.
    The caches' gate arrays are overwritten (a cache serves one backward).
    With a ``timings`` dict, adds seconds per phase: "pack_weights", "backward_time_loop",
    "weight_gradients".
    """
    steps, batch, _ = dout.shape
    directions, gates, out_size = layers[0].w_hh.shape
    dtype = dout.dtype
    dh0 = np.empty_like(dh_n)
    dc0 = np.empty_like(dc_n)
    tasks, in_parallel = _routes.row_plan(steps, batch, directions, gates, out_size)
    d_layer_out = dout
    for k in range(len(layers) - 1, -1, -1):
        layer, grad, cache = layers[k], grads[k], caches[k]
        has_proj = layer.w_hr is not None
        dhstore = _take((directions, steps, batch, out_size) if has_proj else (0,) * 4, dtype)
        rows = slice(k * directions, (k + 1) * directions)
        unit_tasks = _routes.units_plan(steps, batch, layer, False) if batch > 1 else []
        one_row = batch == 1 and not has_proj and layer.w_ch is None
        notice_first_compile(_backward_kernel(one_row, unit_tasks), dtype, "backward")
        if one_row:
            packed = _backward_one_row(
                timings, layer, cache, dh0[rows], dc0[rows], np.ascontiguousarray(d_layer_out),
                dh_n[rows], dc_n[rows], lengths,
            )  # fmt: skip
        elif unit_tasks:
            packed = _backward_units(
                timings, layer, unit_tasks, cache, dh0[rows], dc0[rows],
                np.ascontiguousarray(d_layer_out), dh_n[rows], dc_n[rows], lengths,
            )  # fmt: skip
        else:
            packed = _timed(timings, "pack_weights", backward_panels, layer)
            args = (
                cache.xp, dh0[rows], dc0[rows], dhstore, np.ascontiguousarray(d_layer_out),
                dh_n[rows], dc_n[rows], cache.cstate, cache.c0,
                layer.w_hh, packed, _optional(layer.w_hr, dtype), _optional(layer.peep, dtype),
                _optional(layer.w_ch, dtype), lengths,
            )  # fmt: skip
            _time_loops(
                timings, "backward_time_loop", layer_backward_serial, layer_backward_parallel,
                args, tasks, in_parallel,
            )  # fmt: skip
        d_layer_in = _timed(
            timings, "weight_gradients", _weight_gradients, layer, grad, cache, dhstore
        )
        # This cache serves one backward: its arrays go back to the workspace.
        _give(*packed, dhstore, cache.xp, cache.xh, cache.cstate, cache.mstore)
        cache.xp = cache.mstore = _empty(dtype, 4)
        cache.xh = cache.cstate = _empty(dtype, 3)
        if k > 0:
            below = caches[k - 1].mask
            d_layer_in = d_layer_in.reshape(steps, batch, -1)
            d_layer_out = d_layer_in * below if below is not None else d_layer_in
    return d_layer_in.reshape(steps, batch, -1), dh0, dc0


def _forward_units(
    timings, layer, tasks, out, h_n, c_n, xp, xh, cstate, h0, c0, lengths, training
) -> None:
    """One layer's forward loop split by hidden units (see _routes.units_plan)."""
    _, batch, out_size = h0.shape
    dtype = layer.w_hh.dtype
    packs = []
    for d, first, end in tasks:
        w = layer.w_hh[d : d + 1]
        packed = _take(
            packing.columns_shape((1, 4 * (end - first), w.shape[2]), 4, w.itemsize), dtype
        )
        _timed(timings, "pack_weights", packing.pack_unit_columns, packed, w, first, end - first)
        packs.append(packed)
    state = np.empty((2, batch, out_size), dtype)
    state[0] = h0[0]
    counter = np.zeros(1, np.int64)
    peep = _optional(layer.peep, dtype)
    calls = [
        (out, h_n, c_n, xp, xh, cstate, h0, c0, packed, peep, lengths, *task, state, counter,
         len(tasks), training)
        for packed, task in zip(packs, tasks, strict=True)
    ]  # fmt: skip
    _timed(timings, "time_loop", _run_one_row, _kernels.layer_forward_units, calls, len(tasks),
           True)  # fmt: skip
    _give(*packs)


def _forward_one_row(
    timings, layer, out, h_n, c_n, xp, xh, cstate, h0, c0, inputs, bias, lengths, training
) -> None:
    """One layer's forward loops for a batch of one row. Each task projects its own units'
    inputs and packs its part of the weights first (_kernels.one_row_inputs): the time
    loop phase includes both."""
    directions, gates, out_size = layer.w_hh.shape
    steps = out.shape[0]
    dtype = layer.w_hh.dtype
    packed_ih = _take(packing.units_shape(layer.w_ih.shape, dtype.itemsize), dtype)
    packed = _take(packing.units_shape(layer.w_hh.shape, dtype.itemsize), dtype)
    tasks, parties, parallel = _routes.one_row_plan(
        steps, directions, gates, out_size, packed.shape[2]
    )
    state = np.empty((directions, 2, out_size), dtype)
    state[:, 0] = h0[:, 0]
    counter = np.zeros(1, np.int64)
    args = (
        out, h_n, c_n, xp, xh, cstate, h0, c0, inputs, layer.w_ih, layer.w_hh, bias,
        packed_ih, packed, _optional(layer.peep, dtype), lengths,
    )  # fmt: skip
    calls = [(*args, *task, state, counter, parties, training) for task in tasks]
    _timed(timings, "time_loop", _run_one_row, _kernels.layer_forward_one_row,
           calls, parties, parallel)  # fmt: skip
    _give(packed_ih, packed)


def _backward_one_row(timings, layer, cache, dh0, dc0, dout, dh_n, dc_n, lengths) -> tuple:
    """One layer's backward loops for a batch of one row; returns the packed weights."""
    directions, gates, out_size = layer.w_hh.shape
    steps = dout.shape[0]
    packed = _timed(timings, "pack_weights", _pack_units_rows, layer.w_hh)
    tasks, parties, parallel = _routes.one_row_plan(
        steps, directions, gates, out_size, packed.shape[1]
    )
    state = np.empty((directions, 2, out_size), layer.w_hh.dtype)
    state[:, 0] = dh_n[:, 0]
    counter = np.zeros(1, np.int64)
    args = (
        cache.xp, dh0, dc0, dout, dh_n, dc_n, cache.cstate, cache.c0, packed,
        _optional(layer.peep, layer.w_hh.dtype), lengths,
    )  # fmt: skip
    calls = [(*args, *task, state, counter, parties) for task in tasks]
    _timed(timings, "backward_time_loop", _run_one_row, _kernels.layer_backward_one_row,
           calls, parties, parallel)  # fmt: skip
    return (packed,)


def _backward_units(timings, layer, tasks, cache, dh0, dc0, dout, dh_n, dc_n, lengths) -> tuple:
    """One layer's backward loop split by hidden units (_routes.units_plan; the forward's split need
    not be the same, the numbers are); returns the packed weights."""
    dtype = layer.w_hh.dtype
    packed = _timed(timings, "pack_weights", _pack_rows, layer.w_hh)
    state = np.empty((2, dout.shape[1], layer.w_hh.shape[2]), dtype)
    state[0] = dh_n[0]
    counter = np.zeros(1, np.int64)
    args = (
        cache.xp, dh0, dc0, dout, dh_n, dc_n, cache.cstate, cache.c0, packed,
        _optional(layer.peep, dtype), lengths,
    )  # fmt: skip
    calls = [(*args, *task, state, counter, len(tasks)) for task in tasks]
    _timed(timings, "backward_time_loop", _run_one_row, _kernels.layer_backward_units, calls,
           len(tasks), True)  # fmt: skip
    return (packed,)


def _run_one_row(kernel, calls: list[tuple], parties: int, parallel: bool) -> None:
    """Run a one-row batch's loop calls (see _routes.one_row_plan): at once on fastlstm's threads,
    or one after another."""
    if parties > 1 and (not parallel or len(calls) != parties):
        # Each party waits for the others every step: they must all run at once.
        raise ValueError(f"{parties} parties need {parties} parallel calls, got {len(calls)}")
    if parallel:
        run_tasks(kernel, calls)
    else:
        for call in calls:
            kernel(*call)


def _dropout_mask(rng, shape, dropout: float, dtype) -> np.ndarray:
    """Inverted dropout: 0 with probability ``dropout``, else 1 / (1 - dropout)."""
    keep = rng.random(shape) >= dropout
    scale = 0.0 if dropout >= 1 else 1.0 / (1.0 - dropout)
    return (keep * scale).astype(dtype)


def _weight_gradients(layer, grad, cache, dhstore):
    """All weight gradients of one layer, added into ``grad``; returns dL/dinput (T*B, I).

    Split over fastlstm's threads (BLAS on one thread each) when large, for the same
    reasons as the input projection."""
    directions, gates, _ = layer.w_hh.shape
    dtype = layer.w_hh.dtype
    inputs = cache.inputs
    d_inputs = np.empty_like(inputs)
    bias_grad = np.zeros((directions, gates), dtype)
    args = (d_inputs, grad.w_ih, grad.w_hh, bias_grad, cache.xp, inputs, cache.xh, layer.w_ih)
    rows, width = inputs.shape
    # (Also: a threaded BLAS may sum dW_hh in another order than one thread, and results
    # must not depend on the thread count.)
    parts = _routes.parts(rows * gates * directions * (2 * width + layer.w_hh.shape[2]))
    if parts < 2:
        # Tiny sizes take the kernel's own row loops (no BLAS, no hold to pay for).
        small = gates * (width + layer.w_hh.shape[2]) <= SMALL_ROW_MACS
        with _held_blas() if not small else contextlib.nullcontext():
            _kernels.weight_gradients(*args, 0, 1)
    else:
        _run_parts(_kernels.weight_gradients, [(*args, part, parts) for part in range(parts)])
    if grad.w_hr is not None or grad.peep is not None or grad.w_ch is not None:
        _kernels.extra_weight_gradients(
            _optional(grad.w_hr, dtype), _optional(grad.peep, dtype),
            _optional(grad.w_ch, dtype), cache.xp, cache.cstate, cache.c0, cache.mstore,
            dhstore,
        )  # fmt: skip
    for part in (grad.b_ih, grad.b_hh, grad.b_ch):
        if part is not None:
            part += bias_grad
    return d_inputs
