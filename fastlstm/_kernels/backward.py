"""The backward time loops of one layer: dL/da into the gate array, step by step.

- :func:`layer_backward_rows`: batch rows b0..b1 of one direction;
- :func:`layer_backward_one_row`: a batch of one row, a thread's hidden chunks, a barrier
  per step;
- :func:`layer_backward_units`: every row of a batch, a thread's hidden units, a barrier
  per step (the backward of :func:`fastlstm._kernels.forward.layer_forward_units`).

The weight gradients follow in :mod:`fastlstm._kernels.gradients`. Layout and sizes: see
:mod:`fastlstm._kernels`.
"""

from __future__ import annotations

import numpy as np

from fastlstm._config import jit
from fastlstm._kernels.activations import zero
from fastlstm._kernels.gates import (
    add1,
    any_padded,
    copy1,
    copy2,
    gates_backward,
    gates_backward_ifg,
    gates_backward_o,
    peephole_units,
    sum1,
    tiled_peepholes,
)
from fastlstm._kernels.products import product_ab, product_ab_panels, product_one_row_back
from fastlstm._kernels.sync import arrive_and_wait
from fastlstm._kernels.tiles import lanes_of


@jit
def layer_backward_rows(
    xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
    w_hh, packed, w_hr, peep, w_ch, lengths, d, b0, b1,
):  # fmt: skip
    """Direction d of one layer backward for batch rows b0..b1 (dL/da into xp, dh0 and
    dc0): the backward kernel. ``packed``: the panels of W_hh, W_hr and W_ch (pack_rows;
    empty when absent)."""
    steps = xp.shape[2]
    hidden = c0.shape[2]
    out_size = dh0.shape[2]
    rows = b1 - b0
    units = rows * hidden
    lo = b0 * hidden
    hi = b1 * hidden
    has_proj = w_hr.shape[1] > 0
    full = w_ch.shape[1] > 0
    ocol = d * out_size
    padded = any_padded(lengths, b0, b1, steps)
    dh = dh_n[d, b0:b1].copy()
    dh_next = np.empty_like(dh)
    dc = dc_n[d, b0:b1].copy().reshape(units)
    dc_carry = np.empty(units if padded else 0, dtype=dc.dtype)
    dm_proj = np.empty((rows if has_proj else 0, hidden), dtype=dc.dtype)
    c0_rows = c0[d].reshape(c0.shape[1] * hidden)[lo:hi]
    p_i, p_f, p_o = tiled_peepholes(peep, d, rows)
    pan_hh, pan_hr, pan_ch = packed
    gate_stride = steps * xp.shape[3]
    for s in range(steps - 1, -1, -1):
        t = steps - 1 - s if d == 1 else s
        t_prev = t + 1 if d == 1 else t - 1  # the step that ran before t
        for r in range(rows):
            if t < lengths[b0 + r]:  # padded steps' output gradients are ignored
                add1(dh[r], dout[t, b0 + r, ocol : ocol + out_size])
        if has_proj:
            for r in range(rows):
                active = t < lengths[b0 + r]
                for j in range(out_size):
                    dhstore[d, t, b0 + r, j] = dh[r, j] if active else zero(dh[r, j])
            dm_proj[:] = 0
            product_ab(dm_proj, rows, dh, 0, 0, out_size, out_size, pan_hr, d, 0, 1)
            dm = dm_proj.reshape(units)
        else:
            dm = dh.reshape(units)
        ai = xp[d, 0, t, lo:hi]
        af = xp[d, 1, t, lo:hi]
        ag = xp[d, 2, t, lo:hi]
        ao = xp[d, 3, t, lo:hi]
        c_t = cstate[d, t, lo:hi]
        c_prev = cstate[d, t_prev, lo:hi] if 0 <= t_prev < steps else c0_rows
        if padded:
            copy1(dc_carry, dc)
        base = d * 4 * gate_stride + t * xp.shape[3] + lo  # xp[d, 0, t, lo] in xp.flat
        if full:
            dc2 = dc.reshape((rows, hidden))
            gates_backward_o(ao, dc, dm, c_t)
            o_base = base + 3 * gate_stride
            product_ab(dc2, rows, xp, o_base, 0, hidden, hidden, pan_ch, d, 3 * hidden, 1)
            gates_backward_ifg(ai, af, ag, dc, c_prev)
            product_ab(dc2, rows, xp, base, gate_stride, hidden, hidden, pan_ch, d, 0, 3)
        else:
            gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o)
        if padded:
            for r in range(rows):
                if t >= lengths[b0 + r]:  # no gradient flows into a padded step
                    for g in range(4):
                        for j in range(hidden):
                            xp[d, g, t, (b0 + r) * hidden + j] = 0
                    for j in range(hidden):
                        dc[r * hidden + j] = dc_carry[r * hidden + j]
        dh_next[:] = 0
        product_ab(dh_next, rows, xp, base, gate_stride, hidden, hidden, pan_hh, d, 0, 4)
        if padded:
            for r in range(rows):
                if t >= lengths[b0 + r]:  # the state was carried through a padded step
                    for j in range(out_size):
                        dh_next[r, j] = dh[r, j]
        dh, dh_next = dh_next, dh
    copy2(dh0[d, b0:b1], dh)
    copy2(dc0[d, b0:b1], dc.reshape((rows, hidden)))


@jit
def layer_backward_one_row(
    xp, dh0, dc0, dout, dh_n, dc_n, cstate, c0, packed, peep, lengths,
    d, first, end, state, counter, parties,
):  # fmt: skip
    """Direction d of one layer backward for a batch of one row, hidden chunks first..end-1
    (as :func:`layer_forward_one_row`): dL/da into xp, dh0 and dc0 for those units.

    Per step each party computes its units' dL/da, waits at the barrier until all have,
    then its units' dL/dh_{t-1} from every unit's dL/da. ``state`` (D, 2, P) holds dL/dh in
    turn, state[d, 0] set to dh_n by the caller; ``counter`` (1,) int64 starts at 0. No
    projection, no full peephole. Padded steps (past the row's length) pass dh and dc
    through unchanged and get zero dL/da.
    """
    steps = xp.shape[2]
    hidden = c0.shape[2]
    out_size = dh0.shape[2]
    width = packed.shape[3]
    lo = first * width
    hi = min(hidden, end * width)
    ocol = d * out_size
    run = min(steps, lengths[0])
    dc = dc_n[d, 0, lo:hi].copy()
    dm = np.empty_like(dc)
    p_i, p_f, p_o = peephole_units(peep, d, lo, hi)
    scratch = np.empty(width, dtype=dc.dtype)
    gate_stride = xp.shape[2] * xp.shape[3]
    for t in range(run, steps):  # padding: nothing flows in
        for g in range(4):
            for j in range(lo, hi):
                xp[d, g, t, j] = 0
    current = 0
    for s in range(run):
        t = s if d == 1 else run - 1 - s  # the forward order, reversed
        t_prev = t + 1 if d == 1 else t - 1
        dh = state[d, current]
        dh_next = state[d, 1 - current]
        sum1(dm, dh[lo:hi], dout[t, 0, ocol + lo : ocol + hi])
        ai = xp[d, 0, t, lo:hi]
        af = xp[d, 1, t, lo:hi]
        ag = xp[d, 2, t, lo:hi]
        ao = xp[d, 3, t, lo:hi]
        c_t = cstate[d, t, lo:hi]
        c_prev = cstate[d, t_prev, lo:hi] if 0 <= t_prev < steps else c0[d, 0, lo:hi]
        gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o)
        if parties > 1:
            arrive_and_wait(counter, parties * (s + 1))
        base = d * 4 * gate_stride + t * xp.shape[3]
        product_one_row_back(dh_next, xp, base, gate_stride, hidden, packed, d, first, end, scratch)
        current = 1 - current
    dh = state[d, current]
    copy1(dh0[d, 0, lo:hi], dh[lo:hi])
    copy1(dc0[d, 0, lo:hi], dc)


@jit
def layer_backward_units(
    xp, dh0, dc0, dout, dh_n, dc_n, cstate, c0, packed, peep, lengths,
    d, first, end, state, counter, parties,
):  # fmt: skip
    """Direction d of one layer backward for every batch row, hidden units first..end-1:
    dL/da into xp, dh0 and dc0 for those units.

    ``parties`` calls (one per thread) with disjoint unit ranges that start at whole panels
    run the direction together, as :func:`layer_backward_one_row` does for one row: per
    step each computes its units' dL/da for every row, waits at the barrier until all
    have, then every row's dL/dh_{t-1} for its own units' columns from all units' dL/da
    (``packed``: the panels of W_hh, pack_rows). ``state`` (2, B, P) holds dL/dh in turn,
    state[0] set to dh_n[d] by the caller; each party reads and writes its own columns of
    it alone. ``counter`` (1,) int64 starts at 0. No projection, no full peephole. Results
    equal :func:`layer_backward_rows`' bit for bit (the same sums in the same order).
    """
    steps = xp.shape[2]
    batch = lengths.shape[0]
    hidden = c0.shape[2]
    out_size = dh0.shape[2]
    units = end - first
    ocol = d * out_size
    p_i, p_f, p_o = peephole_units(peep, d, first, end)
    dc = np.empty(batch * units, dtype=c0.dtype)
    for r in range(batch):
        copy1(dc[r * units : (r + 1) * units], dc_n[d, r, first:end])
    dm = np.empty(units, dtype=c0.dtype)
    gate_stride = steps * xp.shape[3]
    width = 2 * lanes_of(dc)  # columns per panel
    p_first = first // width
    p_end = (end + width - 1) // width
    current = 0
    for s in range(steps):
        t = s if d == 1 else steps - 1 - s  # the forward order, reversed
        t_prev = t + 1 if d == 1 else t - 1
        dh = state[current]
        dh_next = state[1 - current]
        for r in range(batch):
            off = r * hidden
            ai = xp[d, 0, t, off + first : off + end]
            af = xp[d, 1, t, off + first : off + end]
            ag = xp[d, 2, t, off + first : off + end]
            ao = xp[d, 3, t, off + first : off + end]
            if t < lengths[r]:
                sum1(dm, dh[r, first:end], dout[t, r, ocol + first : ocol + end])
                c_t = cstate[d, t, off + first : off + end]
                if 0 <= t_prev < steps:
                    c_prev = cstate[d, t_prev, off + first : off + end]
                else:
                    c_prev = c0[d, r, first:end]
                dc_row = dc[r * units : (r + 1) * units]
                gates_backward(ai, af, ag, ao, dc_row, dm, c_t, c_prev, p_i, p_f, p_o)
            else:  # no gradient flows into a padded step; dc passes through
                for j in range(units):
                    ai[j] = 0
                    af[j] = 0
                    ag[j] = 0
                    ao[j] = 0
        if parties > 1:
            arrive_and_wait(counter, parties * (s + 1))
        for r in range(batch):
            for j in range(first, end):
                dh_next[r, j] = 0
        base = d * 4 * gate_stride + t * xp.shape[3]
        product_ab_panels(dh_next, batch, xp, base, gate_stride, hidden, hidden, packed, d, 0, 4,
                          p_first, p_end)  # fmt: skip
        for r in range(batch):
            if t >= lengths[r]:  # the state was carried through a padded step
                copy1(dh_next[r, first:end], dh[r, first:end])
        current = 1 - current
    dh = state[current]
    for r in range(batch):
        copy1(dh0[d, r, first:end], dh[r, first:end])
        copy1(dc0[d, r, first:end], dc[r * units : (r + 1) * units])
