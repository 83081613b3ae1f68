"""How a layer's time loops run: the routes, planned from the shape, the thread count and
the CPU's thresholds (:mod:`fastlstm._config`), before any array is touched.

- :func:`row_plan`: row chunks (direction, first row, end row), one per thread, no
  synchronisation inside a loop; the default.
- :func:`one_row_plan`: a batch of one row, split by chunks of hidden units with a barrier
  per step.
- :func:`units_plan` and :func:`loop_route`: a thin batch (or one whose row chunks would
  be one register block each, with weights beyond half the L3) split by hidden units,
  its inputs projected before the loop.
- :func:`fuses_input_projection`: whether the loop projects each step's input itself.
- :func:`parts`: how many parts the phases outside the loops (input projection, weight
  gradients) are cut into.

The sums' order depends on the shape alone wherever it could depend on the thread count
(``parts``, ``loop_route``), so one thread and two give the same bits. Tests and
``fastlstm compile`` set this module's thresholds (PARALLEL_MIN_MACS, UNITS_STEP_MIN_MACS,
FUSED_MAX_WEIGHT_BYTES, UNITS_SPLIT_MIN_WEIGHT_BYTES) to force a route: they are read at
each call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastlstm._config import (
    BARRIER_LOOP_MIN_FACTOR,
    FUSED_MAX_WEIGHT_BYTES,
    PARALLEL_MIN_MACS,
    SPLIT_PARTS,
    UNITS_SPLIT_MIN_WEIGHT_BYTES,
    UNITS_STEP_MIN_MACS,
)
from fastlstm._kernels import sync, tiles
from fastlstm._threads import get_num_threads

if TYPE_CHECKING:
    from fastlstm._engine import LayerArrays


def row_plan(steps: int, batch: int, directions: int, gates: int, out_size: int):
    """How to run a layer's time loops: (tasks, run them in parallel).

    A task is (direction, first row, end row): rows never interact in a time loop, and the
    packed W_hh is shared read-only, so each task runs its whole loop with no
    synchronisation (one fork/join per layer call, as ONNX Runtime splits its batch).
    Each direction's batch is split into as many row chunks as there are threads per
    direction, keeping enough rows per chunk for a register block that keeps the FMA
    units busy (:data:`fastlstm._kernels.tiles.MIN_CHUNK_ROWS`; a batch of one row
    takes :func:`one_row_plan` unless it has a projection or full peepholes: then one
    task, its products through the register tile one row at a time). The loops call no
    BLAS.
    """
    threads = get_num_threads()
    step_macs = batch * gates * out_size
    serial = [(d, 0, batch) for d in range(directions)]
    if threads < 2 or steps * directions * step_macs < PARALLEL_MIN_MACS:
        return serial, False
    chunks = max(1, min(threads // directions, batch // tiles.MIN_CHUNK_ROWS))
    if directions * chunks < 2:
        return serial, False
    bounds = [batch * part // chunks for part in range(chunks + 1)]
    tasks = [(d, bounds[i], bounds[i + 1]) for d in range(directions) for i in range(chunks)]
    return tasks, True


def one_row_plan(steps: int, directions: int, gates: int, out_size: int, chunks: int):
    """How to run a one-row batch's forward loops: (tasks, parties, run in parallel).

    A task is (direction, first chunk, end chunk) of hidden units. One direction is split
    into ``parties`` = 2 chunk ranges on two threads (with a barrier per step) when the
    loop is large enough and has two chunks; two directions run as one task each.
    """
    threads = get_num_threads()
    whole = [(d, 0, chunks) for d in range(directions)]
    if threads < 2 or steps * directions * gates * out_size < barrier_min_macs():
        return whole, 1, False
    if directions == 1 and chunks >= 2 and sync.AVAILABLE:
        half = chunks // 2
        return [(0, 0, half), (0, half, chunks)], 2, True
    return whole, 1, directions > 1


def units_plan(steps: int, batch: int, layer: LayerArrays, fused: bool) -> list[tuple]:
    """Hidden-unit ranges (direction, first unit, end unit), one per thread with a barrier
    per step (layer_forward_units, layer_backward_units), or [] for the row chunks of
    :func:`row_plan`.

    Taken for the input projection outside the loop (``fused`` False), two threads and a
    shape that :func:`splits_units` allows, when the row chunks of :func:`row_plan` would not
    run in parallel (a thin batch: see :func:`loop_route`), or would leave a thread at most
    one register block of rows (tiles.ROWS) with a W_hh of UNITS_SPLIT_MIN_WEIGHT_BYTES or
    more (see there). The ranges split at a whole panel (two vectors of units, the tile's
    width), where the two threads' vectors are closest in number: a vector with some units
    valid costs as much as a full one, so at H = 500 in float64 (63 vectors of 8) 256 + 244
    units take 32 and 31 vectors, where cutting at half the units rounded down to a panel
    (240 + 260) gave 30 and 33.
    """
    directions, gates, out_size = layer.w_hh.shape
    hidden = gates // 4
    lanes = tiles.VECTOR_BYTES // layer.w_hh.itemsize
    panel = 2 * lanes
    if fused or get_num_threads() < 2 or not sync.AVAILABLE:
        return []
    if not splits_units(steps, batch, layer):
        return []
    row_tasks, rows_in_parallel = row_plan(steps, batch, directions, gates, out_size)
    widest = max(end - first for _, first, end in row_tasks)
    if rows_in_parallel and (
        widest > tiles.ROWS or layer.w_hh.nbytes < UNITS_SPLIT_MIN_WEIGHT_BYTES
    ):
        return []
    vectors = -(-hidden // lanes)
    panels = min(range(1, vectors // 2 + 1), key=lambda k: max(2 * k, vectors - 2 * k))
    return [(0, 0, panels * panel), (0, panels * panel, hidden)]


def loop_route(steps: int, batch: int, layer: LayerArrays) -> tuple[bool, list[tuple]]:
    """(the loop projects its inputs, hidden-unit ranges of :func:`units_plan` or []) for a
    layer's forward loop over a batch of several rows.

    The fused loop splits only by rows; a batch too thin for two row chunks (under
    2 MIN_CHUNK_ROWS rows) would run it on one thread. Where its loop is worth splitting by
    hidden units (:func:`splits_units`), such a batch projects its inputs first instead,
    on any thread count: the route, and with it every sum's order, depends on the shape
    alone, so one thread gives the same numbers as two.
    """
    fused = fuses_input_projection(batch, layer.w_ih, layer.w_hh)
    if fused and batch < 2 * tiles.MIN_CHUNK_ROWS and splits_units(steps, batch, layer):
        fused = False
    return fused, units_plan(steps, batch, layer, fused)


def splits_units(steps: int, batch: int, layer: LayerArrays) -> bool:
    """Whether the shape allows a loop split by hidden units (:func:`units_plan`) and makes
    it worth a barrier per step: one direction, several rows, no projection or full
    peephole, two panels of units or more, a loop above :func:`barrier_min_macs` and
    UNITS_STEP_MIN_MACS a step. The thread count is not asked."""
    directions, gates, out_size = layer.w_hh.shape
    panel = 2 * tiles.VECTOR_BYTES // layer.w_hh.itemsize
    return (
        directions == 1
        and batch >= 2
        and layer.w_hr is None
        and layer.w_ch is None
        and gates // 4 >= 2 * panel
        and steps * batch * gates * out_size >= barrier_min_macs()
        and batch * gates * out_size >= UNITS_STEP_MIN_MACS
    )


def barrier_min_macs() -> int:
    """From how many recurrent multiply-adds a loop split by hidden units (a barrier per
    step) runs on two threads: BARRIER_LOOP_MIN_FACTOR x PARALLEL_MIN_MACS, read at the
    call (tests and ``fastlstm compile`` set PARALLEL_MIN_MACS here to force a route)."""
    return BARRIER_LOOP_MIN_FACTOR * PARALLEL_MIN_MACS


def fuses_input_projection(batch: int, w_ih: np.ndarray, w_hh: np.ndarray) -> bool:
    """Whether the time loop projects each step's input itself (_kernels.layer_forward_rows).

    It does unless the batch is one row (the register tile would run one row at a time:
    the one-row loop's tasks project their units' inputs over all steps first, or with a
    projection or full peepholes :func:`fastlstm._engine._project_inputs` does) or W_ih
    and W_hh together outgrow the cache (each step would stream both from memory): then
    one GEMM over all steps first (project_inputs) is faster.
    """
    return batch > 1 and w_ih[0].nbytes + w_hh[0].nbytes <= FUSED_MAX_WEIGHT_BYTES


def parts(macs: int) -> int:
    """How many parts a phase of ``macs`` multiply-adds outside the time loops is cut into:
    SPLIT_PARTS from PARALLEL_MIN_MACS on, whatever the thread count, so that its
    arithmetic (BLAS calls of the same sizes) never depends on the thread count."""
    return SPLIT_PARTS if macs >= PARALLEL_MIN_MACS else 1
