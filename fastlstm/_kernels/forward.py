"""The forward time loops of one layer, and the input projection outside them.

- :func:`layer_forward_rows`: batch rows b0..b1 of one direction, all steps (the loop
  projects each step's inputs itself, or xp holds them);
- :func:`layer_forward_units`: a thread's hidden units of every row (weights beyond the
  cache), a barrier per step;
- :func:`layer_forward_one_row`: a batch of one row, a thread's hidden chunks, a barrier
  per step; :func:`one_row_inputs` is what each thread does before its steps;
- :func:`project_inputs` (BLAS GEMMs), :func:`project_inputs_packed` (the micro-kernel):
  every step's input projection before a loop that does not project its own.

Layout and sizes: see :mod:`fastlstm._kernels`.
"""

from __future__ import annotations

import numpy as np

from fastlstm._config import PROJECTION_BLOCK_ROWS, jit
from fastlstm._kernels.blas import gemm_abt
from fastlstm._kernels.gates import (
    any_padded,
    copy1,
    copy2,
    gates_forward,
    gates_forward_diagonal,
    gates_forward_ifg,
    gates_forward_o,
    gates_forward_reset,
    peephole_units,
    sum1,
    tiled_peepholes,
)
from fastlstm._kernels.packing import pack_unit_chunks
from fastlstm._kernels.products import (
    one_row_step_products,
    product_abt,
    project_unit_chunks,
    projected_in_loop,
)
from fastlstm._kernels.sync import arrive_and_wait
from fastlstm._kernels.tiles import ROWS, lanes_of


@jit
def layer_forward_rows(
    out, h_n, c_n, xp, xh, cstate, mstore,
    h0, c0, x, bias, w_hh, packed, w_hr, peep, w_ch, lengths, d, b0, b1, training,
):  # fmt: skip
    """Direction d of one layer for batch rows b0..b1, all steps: the forward kernel.

    ``packed``: the panels of [W_ih | W_hh] (the loop projects its inputs: fused), W_hh
    (not fused), W_hr, W_ch[i, f, g] and W_ch[o] (pack_columns; empty when absent). Fused,
    the kernel projects x (T*B, I) itself, adding ``bias`` (D, 4H); else xp must already
    hold the projection. In training the kernel fills its rows of xh with [x_t | h_{t-1}]
    (for the weight gradients; the fused product reads them there).

    Calls for different directions (or rows) share nothing but disjoint rows and columns of
    the outputs, so the engine may run them on separate threads (kernels release the GIL).
    """
    steps = out.shape[0]
    hidden = c0.shape[2]
    out_size = h0.shape[2]
    rows = b1 - b0
    units = rows * hidden
    lo = b0 * hidden
    hi = b1 * hidden
    has_proj = w_hr.shape[1] > 0
    diagonal = peep.shape[1] > 0
    full = w_ch.shape[1] > 0
    ocol = d * out_size
    padded = any_padded(lengths, b0, b1, steps)
    whole_rows = out.shape[2] == out_size  # one direction: out[t] rows are h's rows
    out_flat = out.reshape(out.size)
    h = h0[d, b0:b1].copy()
    h_new = np.empty_like(h)
    c = c0[d, b0:b1].copy().reshape(units)
    c_new = np.empty_like(c)
    m_proj = np.empty((rows if has_proj else 0, hidden), dtype=c.dtype)
    p_i, p_f, p_o = tiled_peepholes(peep, d, rows)
    pan_ih, pan_hh, pan_hr, pan_ifg, pan_o = packed  # (p_i, p_f, p_o are the peepholes)
    # With [W_ih | W_hh]'s panels (pan_ih), each step's input projection is done here, in
    # one product [x_t | h_{t-1}] [W_ih | W_hh]^T while that step's gate block is in cache
    # (xp is written once and read once per step; one pass over the gate block instead of
    # two: measured 173 -> 180 GFLOP/s at 16 x 384 x 1024); without, xp already holds it
    # (project_inputs) and pan_hh serves h_{t-1} W_hh^T.
    fused = pan_ih.shape[1] > 0
    batch = lengths.shape[0]
    width_in = x.shape[1]
    depth = width_in + out_size
    # [x_t | h_{t-1}] of this step's rows: in training the rows of xh (kept for the weight
    # gradients), in inference a scratch.
    stacked = np.empty((rows if fused and not training else 0, depth), dtype=c.dtype)
    xh_rows = xh.reshape((xh.shape[0] * xh.shape[1], depth)) if training else stacked
    gate_stride = xp.shape[2] * xp.shape[3]
    # Inference with the projection fused keeps one step of gates (xp (D, 4, 1, B*H)):
    # nothing needs them afterwards, and a small block stays in cache.
    one_slot = xp.shape[2] != steps
    # The bias tiled over the rows, gate by gate: copied into each step's gate blocks when
    # the loop projects its inputs, or (inference, plain cell) put back by the gate pass.
    bias_written_back = one_slot and fused and not (diagonal or full)
    tiled_bias = np.empty((4, units if fused else 0), dtype=c.dtype)
    if fused:
        for g in range(4):
            for r in range(rows):
                copy1(tiled_bias[g, r * hidden : (r + 1) * hidden],
                      bias[d, g * hidden : (g + 1) * hidden])  # fmt: skip
    for s in range(steps):
        t = steps - 1 - s if d == 1 else s
        slot = 0 if one_slot else t  # this step's gates in xp
        m = m_proj if has_proj else h_new
        ai = xp[d, 0, slot, lo:hi]
        af = xp[d, 1, slot, lo:hi]
        ag = xp[d, 2, slot, lo:hi]
        ao = xp[d, 3, slot, lo:hi]
        base = d * 4 * gate_stride + slot * xp.shape[3] + lo  # xp[d, 0, slot, lo] in xp.flat
        # [x_t | h_{t-1}] into this step's rows (xh's in training, the scratch's in
        # inference), just before the fused product reads them.
        first_row = (d * steps + t) * batch + b0 if training else 0
        if training or fused:
            for r in range(rows):
                copy1(xh_rows[first_row + r, :width_in], x[t * batch + b0 + r])
                copy1(xh_rows[first_row + r, width_in:], h[r])
        if fused:  # bias + [x_t | h] [W_ih | W_hh]^T (bias there already after a reset)
            if not (bias_written_back and s > 0):
                for g in range(4):
                    copy1(xp[d, g, slot, lo:hi], tiled_bias[g])
            a_base = first_row * depth
            product_abt(xp, base, gate_stride, hidden, hidden, rows, xh_rows, a_base, pan_ih, d, 4)
        else:
            product_abt(xp, base, gate_stride, hidden, hidden, rows, h, 0, pan_hh, d, 4)
        if full:
            c2 = c.reshape((rows, hidden))
            product_abt(xp, base, gate_stride, hidden, hidden, rows, c2, 0, pan_ifg, d, 3)
        m_flat = m.reshape(units)
        if full:
            gates_forward_ifg(ai, af, ag, c, c_new)
            c_new2 = c_new.reshape((rows, hidden))
            o_base = base + 3 * gate_stride
            product_abt(xp, o_base, 0, hidden, hidden, rows, c_new2, 0, pan_o, d, 1)
            gates_forward_o(ao, c_new, m_flat)
        elif diagonal:
            gates_forward_diagonal(ai, af, ag, ao, c, c_new, m_flat, p_i, p_f, p_o)
        elif bias_written_back:
            gates_forward_reset(ai, af, ag, ao, c, c_new, m_flat, tiled_bias)
        else:
            gates_forward(ai, af, ag, ao, c, c_new, m_flat)
        if has_proj:
            h_new[:] = 0
            product_abt(h_new, 0, 0, out_size, out_size, rows, m_proj, 0, pan_hr, d, 1)
        if padded:
            for r in range(rows):
                if t >= lengths[b0 + r]:  # carry the state through a padded step
                    for j in range(hidden):
                        c_new[r * hidden + j] = c[r * hidden + j]
                    for j in range(out_size):
                        h_new[r, j] = h[r, j]
        if whole_rows and not padded:  # out[t, b0:b1] is h_new's rows, in one block
            start = (t * batch + b0) * out_size
            copy1(out_flat[start : start + rows * out_size], h_new.reshape(rows * out_size))
        else:
            for r in range(rows):
                if t < lengths[b0 + r]:
                    copy1(out[t, b0 + r, ocol : ocol + out_size], h_new[r])
                else:
                    for j in range(out_size):
                        out[t, b0 + r, ocol + j] = 0
        if training:
            copy1(cstate[d, t, lo:hi], c_new)
            if has_proj:
                copy2(mstore[d, t, b0:b1], m_proj)
        h, h_new = h_new, h
        c, c_new = c_new, c
    copy2(h_n[d, b0:b1], h)
    copy2(c_n[d, b0:b1], c.reshape((rows, hidden)))


@jit
def project_inputs(xp, x, w_ih, bias, first, end):
    """xp[d, g, t] = x_t W_ih[d, g]^T + bias[d, g] for steps first..end-1, every direction
    and gate: the input part of those steps at once, for loops that do not project their
    own inputs. x (T*B, I); bias (D, G); BLAS may use its own threads here.

    One wide GEMM (rows x 4H) per block of steps into a scratch, then one pass that adds
    the bias and spreads the columns to the gate-major blocks (four GEMMs of width H each
    would run far below the BLAS's speed).
    """
    directions, _, steps, _ = xp.shape
    rows, width = x.shape
    batch = rows // steps
    hidden = w_ih.shape[1] // 4
    gates = 4 * hidden
    block_steps = max(1, min(end - first, PROJECTION_BLOCK_ROWS // batch))
    scratch = np.empty((block_steps * batch, gates), dtype=xp.dtype)
    for d in range(directions):
        for t0 in range(first, end, block_steps):
            t1 = min(end, t0 + block_steps)
            part = scratch[: (t1 - t0) * batch]
            gemm_abt(part, x[t0 * batch : t1 * batch], w_ih[d], 0.0)
            # Row by row through sum1 (vectorised): inline over 2-D indices this pass
            # stayed scalar (measured at large, 12 steps: 68 against 65.5 ms with the GEMM).
            for g in range(4):
                block = xp[d, g].reshape(rows * hidden)
                gate_bias = bias[d, g * hidden : (g + 1) * hidden]
                for r in range(part.shape[0]):
                    base = (t0 * batch + r) * hidden
                    sum1(block[base : base + hidden], part[r, g * hidden : (g + 1) * hidden],
                         gate_bias)  # fmt: skip


@jit
def project_inputs_packed(xp, x, packed, bias, first, end):
    """xp[d, g] rows first..end-1 (row = t B + b) = bias[d, g] + x W_ih[d, g]^T through the
    packed micro-kernel (``packed``: W_ih's panels from pack_columns), every direction.

    For inputs of few rows (a one-row batch: T rows), where a BLAS GEMM runs far below
    its speed (at 150 x 256 x 1024: about 100 GFLOP/s on two threads) and the rows fit
    in cache next to one panel. Each row's sums do not depend on first and end.
    """
    directions, _, steps, step_width = xp.shape
    hidden = bias.shape[1] // 4
    width_in = x.shape[1]
    gate_stride = steps * step_width
    flat = xp.reshape(xp.size)
    for d in range(directions):
        for g in range(4):
            base = (d * 4 + g) * gate_stride
            for r in range(first, end):
                row = base + r * hidden
                copy1(flat[row : row + hidden], bias[d, g * hidden : (g + 1) * hidden])
        product_abt(
            xp, d * 4 * gate_stride + first * hidden, gate_stride, hidden, hidden, end - first,
            x, first * width_in, packed, d, 4,
        )  # fmt: skip


@jit
def layer_forward_units(
    out, h_n, c_n, xp, xh, cstate, h0, c0, packed, peep, lengths,
    d, first, end, state, counter, parties, training,
):  # fmt: skip
    """Direction d of one layer for every batch row, hidden units first..end-1.

    ``parties`` calls (one per thread) with disjoint unit ranges run the direction
    together, as :func:`layer_forward_one_row` does for one row: each multiplies all rows
    by its own part of W_hh (``packed``: pack_unit_columns of direction d alone), computes
    its units' gates, cells and outputs, and waits at a barrier until every part of the
    new state is written. For weights larger than the cache: each thread then streams
    half of W_hh per step, used by every row, instead of all of it for half the rows
    (measured at 64 x 1024 x 4096: 169 -> 179 GFLOP/s). ``state`` (2, B, P) holds h_{t-1}
    and h_t in turn, state[0] set to h0 by the caller; ``counter`` (1,) int64 starts at 0.
    No projection, no full peephole, xp holds the input projection. Results equal
    :func:`layer_forward_rows`' bit for bit (each row's and unit's sums in the same order).
    """
    steps = out.shape[0]
    batch = lengths.shape[0]
    hidden = c0.shape[2]
    out_size = h0.shape[2]
    units = end - first
    width_in = xh.shape[2] - out_size  # (training: xh rows are [x_t | h_{t-1}])
    ocol = d * out_size
    diagonal = peep.shape[1] > 0
    p_i, p_f, p_o = peephole_units(peep, d, first, end)
    c = np.empty(batch * units, dtype=c0.dtype)
    for r in range(batch):
        for j in range(units):
            c[r * units + j] = c0[d, r, first + j]
    c_new = np.empty_like(c)
    gate_stride = xp.shape[2] * xp.shape[3]
    one_slot = xp.shape[2] != steps
    current = 0
    for s in range(steps):
        t = steps - 1 - s if d == 1 else s
        slot = 0 if one_slot else t
        h = state[current]
        h_next = state[1 - current]
        base = d * 4 * gate_stride + slot * xp.shape[3] + first
        product_abt(xp, base, gate_stride, hidden, units, batch, h, 0, packed, 0, 4)
        for r in range(batch):
            if training:
                copy1(xh[d, t * batch + r, width_in + first : width_in + end], h[r, first:end])
            off = r * hidden
            ai = xp[d, 0, slot, off + first : off + end]
            af = xp[d, 1, slot, off + first : off + end]
            ag = xp[d, 2, slot, off + first : off + end]
            ao = xp[d, 3, slot, off + first : off + end]
            c_prev = c[r * units : (r + 1) * units]
            c_next = c_new[r * units : (r + 1) * units]
            m = h_next[r, first:end]
            if diagonal:
                gates_forward_diagonal(ai, af, ag, ao, c_prev, c_next, m, p_i, p_f, p_o)
            else:
                gates_forward(ai, af, ag, ao, c_prev, c_next, m)
            if t >= lengths[r]:  # a padded step carries the state; its output is zero
                for j in range(units):
                    c_next[j] = c_prev[j]
                    m[j] = h[r, first + j]
                    out[t, r, ocol + first + j] = 0
            else:
                copy1(out[t, r, ocol + first : ocol + end], m)
            if training:
                copy1(cstate[d, t, off + first : off + end], c_next)
        if parties > 1:
            arrive_and_wait(counter, parties * (s + 1))
        c, c_new = c_new, c
        current = 1 - current
    h = state[current]
    for r in range(batch):
        for j in range(units):
            h_n[d, r, first + j] = h[r, first + j]
            c_n[d, r, first + j] = c[r * units + j]


@jit
def one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end, t_lo, t_hi):
    """:func:`_one_row_inputs`, on its own (the profiler times it apart)."""
    _one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end, t_lo, t_hi)


@jit(inline=True)
def _one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end, t_lo, t_hi):
    """What a thread of :func:`layer_forward_one_row` does before its loop, for its hidden
    chunks first..end-1 of direction d: pack its part of W_ih (into ``packed_ih``) and of
    W_hh (into ``packed``; both shaped by :func:`fastlstm._kernels.packing.units_shape`),
    and fill xp[d, g, t] for its units with the bias at every step, plus x_t W_ih^T at
    every step but t_lo..t_hi-1 (the loop projects those itself: :func:`projected_in_loop`).
    inputs (T, I).

    Each thread packs and projects its own units only, in the same task as its loop: no
    fork of its own, half the weights per core, and they land in the cache of the core
    that reads them (measured at 150 x 256 x 1024 on a Zen 4: the projection split by
    steps over two threads after one packing ran at 52 GFLOP/s per core).
    """
    steps = xp.shape[2]
    hidden = xp.shape[3]
    width = packed.shape[4]
    lo = first * width
    hi = min(hidden, end * width)
    pack_unit_chunks(packed_ih, w_ih, d, first, end)
    # Row copies through copy1 (vectorised): inline over 4-D indices this loop stayed
    # scalar (measured at the latency shape: 65 against 5 us per thread).
    for g in range(4):
        gate_bias = bias[d, g * hidden + lo : g * hidden + hi]
        for t in range(steps):
            copy1(xp[d, g, t, lo:hi], gate_bias)
    project_unit_chunks(xp, inputs, packed_ih, d, first, end, 0, min(t_lo, steps))
    project_unit_chunks(xp, inputs, packed_ih, d, first, end, max(t_hi, t_lo), steps)
    pack_unit_chunks(packed, w_hh, d, first, end)


@jit
def layer_forward_one_row(
    out, h_n, c_n, xp, xh, cstate, h0, c0, inputs, w_ih, w_hh, bias, packed_ih, packed, peep,
    lengths, d, first, end, state, counter, parties, training,
):  # fmt: skip
    """Direction d of one layer for a batch of one row, hidden chunks first..end-1.

    ``parties`` calls (one per thread) with disjoint chunk ranges run the direction
    together. Each first packs its part of the weights and projects its own units' inputs
    (:func:`one_row_inputs`; packed_ih and packed are scratch of
    :func:`fastlstm._kernels.packing.units_shape`), but for the steps it projects during
    the loop, a block ahead, alongside its products (:func:`projected_in_loop`,
    :func:`one_row_step_products`); then per step it computes its units' gates, cell and
    output, and waits at a barrier (:mod:`fastlstm._kernels.sync`) until all have written
    their part of the new state, which every product needs whole. ``state`` (D, 2, P)
    holds h_{t-1} and h_t in turn, state[d, 0] set to h0 by the caller; ``counter`` (1,)
    int64 starts at 0. No projection, no full peephole (those take
    :func:`layer_forward_rows`); xp (D, 4, T, H) is overwritten. Steps past the row's
    length are padding: out is zero there, and in training the caches hold the carried
    state (and zero gates) so that backward and the weight gradients read defined numbers.
    """
    steps = out.shape[0]
    run = min(steps, lengths[0])
    t_lo, t_hi = projected_in_loop(run, d)
    _one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end, t_lo, t_hi)
    hidden = c0.shape[2]
    width_in = xh.shape[2] - h0.shape[2]  # (training: xh rows are [x_t | h_{t-1}])
    out_size = h0.shape[2]
    width = packed.shape[4]
    lo = first * width
    hi = min(hidden, end * width)
    ocol = d * out_size
    diagonal = peep.shape[1] > 0
    c = c0[d, 0, lo:hi].copy()
    c_new = np.empty_like(c)
    p_i, p_f, p_o = peephole_units(peep, d, lo, hi)
    gate_stride = xp.shape[2] * xp.shape[3]
    # For the projection of steps t_lo..t_hi-1 in the loop: where the next tile and its k
    # are, and a tile's sums between products.
    cursor = np.zeros(2, np.int64)
    tile_sums = np.empty(2 * ROWS * lanes_of(xp), dtype=xp.dtype)
    current = 0
    for s in range(run):
        t = run - 1 - s if d == 1 else s  # the reverse direction runs over the row's steps
        h = state[d, current]
        h_next = state[d, 1 - current]
        base = d * 4 * gate_stride + t * xp.shape[3]
        one_row_step_products(xp, base, gate_stride, hidden, h, packed, d, first, end, inputs,
                              packed_ih, s, t_lo, t_hi, cursor, tile_sums)  # fmt: skip
        if training:
            copy1(xh[d, t, width_in + lo : width_in + hi], h[lo:hi])
        ai = xp[d, 0, t, lo:hi]
        af = xp[d, 1, t, lo:hi]
        ag = xp[d, 2, t, lo:hi]
        ao = xp[d, 3, t, lo:hi]
        m = h_next[lo:hi]
        if diagonal:
            gates_forward_diagonal(ai, af, ag, ao, c, c_new, m, p_i, p_f, p_o)
        else:
            gates_forward(ai, af, ag, ao, c, c_new, m)
        copy1(out[t, 0, ocol + lo : ocol + hi], m)
        if training:
            copy1(cstate[d, t, lo:hi], c_new)
        if parties > 1:
            arrive_and_wait(counter, parties * (s + 1))
        c, c_new = c_new, c
        current = 1 - current
    h = state[d, current]
    # Padding carries the state: the final one forward, h0 and c0 in the reverse direction
    # (whose padded steps come before its first real one).
    carried_h = h0[d, 0, lo:hi] if d == 1 else h[lo:hi]
    carried_c = c0[d, 0, lo:hi] if d == 1 else c
    for t in range(run, steps):
        for j in range(lo, hi):
            out[t, 0, ocol + j] = 0
        if training:
            copy1(xh[d, t, width_in + lo : width_in + hi], carried_h)
            copy1(cstate[d, t, lo:hi], carried_c)
            for g in range(4):
                xp[d, g, t, lo:hi] = 0
    copy1(h_n[d, 0, lo:hi], h[lo:hi])
    copy1(c_n[d, 0, lo:hi], c)
