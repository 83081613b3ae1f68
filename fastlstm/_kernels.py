"""Numba kernels: input projection, the time loops of one LSTM layer, and weight gradients.

Equations (one direction; gate order i, f, g, o as in PyTorch; row vectors, batch rows):

    a_t = x_t W_ih^T + h_{t-1} W_hh^T + (b_ih + b_hh)                      4H values
      diagonal peephole: a_i += p_i c_{t-1},  a_f += p_f c_{t-1},  a_o += p_o c_t
      full peephole:     a_ifg += c_{t-1} W_ch[ifg]^T,  a_o += c_t W_ch[o]^T  (b_ch is in the bias)
    i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
    c_t = f c_{t-1} + i g       m_t = o tanh(c_t)       h_t = m_t W_hr^T (projection) or m_t

Layout. Gate values are kept *gate-major*: ``xp[d, gate, t]`` is one contiguous vector of
B*H values (row b at b*H). So for any chunk of batch rows, each gate block of a step is a
single contiguous slice and the gate math is a few long flat loops per step (vectorised
after LLVM's runtime alias checks, paid once per step rather than per row, in gate-pass
functions of their own). Each step's recurrent product is one register-blocked product
for all four gates straight into the gate blocks (:mod:`fastlstm._packed`). Nothing is
allocated inside a time loop.

Conventions: kernels never validate; outputs first, then inputs, then sizes and flags.
Arrays are C-contiguous in the model's dtype; optional weights are empty arrays.
Sizes: T steps, B batch rows, H hidden, P = H_out (projection size or H), G = 4H, D directions.

    xp      (D, 4, T, B*H) forward: input projection + bias in (or made by the loop),
                           activated gates out; backward: overwritten with dL/da.
                           Inference with the projection in the loop: (D, 4, 1, B*H)
    out     (T, B, D*P)    layer output (zero at padded steps)
    h0, h_n (D, B, P)      c0, c_n (D, B, H)
    w_ih    (D, G, I)      w_hh (D, G, P)     w_hr (D, P, H) or (D, 0, 0)
    peep    (D, 3, H) or (D, 0, 0)   rows i, f, o        w_ch (D, G, H) or (D, 0, 0)
    lengths (B,) int64     steps t >= lengths[b] are padding: state carried, output zero
    xh      (D, T*B, I+P)  training: what each step read, row t*B + b = [x_t | h_{t-1}]
                           (the engine fills the x part, the loops the h part; for the
                           weight gradients, and the fused loop's product reads it)
    cstate  (D, T, B*H)    training: the cell after each step
    mstore  (D, T, B, H)   training with projection: m_t (for dW_hr)
    dhstore (D, T, B, P)   backward with projection: dL/dh_t (for dW_hr)

Direction d = 1 runs t = T-1 down to 0, each sequence over its own valid steps. Padded
rows are computed like the others (their inputs are zero) and then put back: the state is
carried, the output zeroed, and in backward their gradient is dropped.
"""

from __future__ import annotations

import numpy as np

from fastlstm._activations import fma, one, sigmoid, tanh, zero
from fastlstm._blas import gemm_ab, gemm_abt, gemm_atb
from fastlstm._config import MERGED_GRADIENT_MIN_ROWS, PROJECTION_BLOCK_ROWS, SMALL_ROW_MACS, jit
from fastlstm._packed import (
    ROWS,
    copy_rows,
    lanes_of,
    pack_unit_chunks,
    product_ab,
    product_abt,
    product_one_row,
    product_one_row_back,
    project_unit_chunks,
    tile,
)
from fastlstm._sync import arrive_and_wait

# ----------------------------------------------------------------------------- products


# Copies between arrays are explicit loops: Numba compiles every array-to-slice assignment
# with a formatted shape-mismatch error, whose string machinery cost about 10 s of the
# first call's compile time (measured with an empty cache).


@jit
def _copy1(dst, src):
    """dst[:] = src for 1-D arrays of one length."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@jit
def _copy2(dst, src):
    """dst[:, :] = src for 2-D arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] = src[r, j]


# The row-by-row loops below index arrays directly instead of slicing per row: every view
# made inside a loop costs reference-count updates that dwarf a tiny row's arithmetic.


@jit
def _matmul_atb(c, a, b):
    """c += a.T @ b for a (K, M), b (K, N): sums over rows; by hand when tiny per row."""
    k, m = a.shape
    n = b.shape[1]
    if m * n > SMALL_ROW_MACS:
        gemm_atb(c, a, b, 1.0)
        return
    for r in range(k):
        for i in range(m):
            coef = a[r, i]
            for col in range(n):
                c[i, col] += coef * b[r, col]


@jit(inline=True)
def _tile_rows(vector, rows):
    """(rows * len(vector),) with ``vector`` repeated: per-unit weights for flat loops."""
    size = vector.shape[0]
    tiled = np.empty(rows * size, dtype=vector.dtype)
    for r in range(rows):
        for j in range(size):
            tiled[r * size + j] = vector[j]
    return tiled


@jit(inline=True)
def _tiled_peepholes(peep, d, rows):
    """Direction d's diagonal peepholes tiled over ``rows`` (empty when there are none)."""
    if peep.shape[1] == 0:
        empty = np.empty(0, dtype=peep.dtype)
        return empty, empty, empty
    return _tile_rows(peep[d, 0], rows), _tile_rows(peep[d, 1], rows), _tile_rows(peep[d, 2], rows)


# ------------------------------------------------------------------------ gate passes
# Compiled as functions of their own, never inlined by Numba: LLVM vectorises each loop in
# its own function, with runtime checks that the arrays do not overlap; inlined into a time
# loop, where the blocks are slices of one array, the checks fail and the scalar loop runs
# (measured on a Zen 4: 1.7 ns per unit against 12-14).
# Flat loops over every unit of a batch chunk. Each gate block is its own 1-D view: one
# array indexed at j, H + j, ... while being written would defeat LLVM's dependence
# analysis and keep the loop scalar.


@jit
def _gates_forward(ai, af, ag, ao, c_prev, c_next, m):
    """Plain step: pre-activations in, gates out; c_next and m = o tanh(c_next).

    Two passes: five activations in one loop body outgrow the 16 vector registers, and
    the spills cost more than reading c_next back (measured: 10% faster, same bits)."""
    for j in range(c_prev.shape[0]):
        gi = sigmoid(ai[j])
        gf = sigmoid(af[j])
        gg = tanh(ag[j])
        c_next[j] = fma(gf, c_prev[j], gi * gg)
        ai[j] = gi
        af[j] = gf
        ag[j] = gg
    for j in range(c_prev.shape[0]):
        go = sigmoid(ao[j])
        m[j] = go * tanh(c_next[j])
        ao[j] = go


@jit
def _gates_forward_reset(ai, af, ag, ao, c_prev, c_next, m, reset):
    """:func:`_gates_forward` for inference with one slot of gates: instead of the gates
    (nobody reads them), each block gets the bias back (``reset`` (4, units), the tiled
    bias), ready for the next step's products to add into: no separate bias pass."""
    for j in range(c_prev.shape[0]):
        gi = sigmoid(ai[j])
        gf = sigmoid(af[j])
        gg = tanh(ag[j])
        c_next[j] = fma(gf, c_prev[j], gi * gg)
        ai[j] = reset[0, j]
        af[j] = reset[1, j]
        ag[j] = reset[2, j]
    for j in range(c_prev.shape[0]):
        m[j] = sigmoid(ao[j]) * tanh(c_next[j])
        ao[j] = reset[3, j]


@jit
def _gates_forward_diagonal(ai, af, ag, ao, c_prev, c_next, m, p_i, p_f, p_o):
    """Diagonal-peephole step (p_* tiled over the rows)."""
    for j in range(c_prev.shape[0]):
        cp = c_prev[j]
        gi = sigmoid(fma(p_i[j], cp, ai[j]))
        gf = sigmoid(fma(p_f[j], cp, af[j]))
        gg = tanh(ag[j])
        cc = fma(gf, cp, gi * gg)
        go = sigmoid(fma(p_o[j], cc, ao[j]))
        c_next[j] = cc
        m[j] = go * tanh(cc)
        ai[j] = gi
        af[j] = gf
        ag[j] = gg
        ao[j] = go


@jit
def _gates_forward_ifg(ai, af, ag, c_prev, c_next):
    """Full-peephole step, first half: i, f, g and the new cell (o needs c_t W_ch[o]^T)."""
    for j in range(c_prev.shape[0]):
        gi = sigmoid(ai[j])
        gf = sigmoid(af[j])
        gg = tanh(ag[j])
        c_next[j] = fma(gf, c_prev[j], gi * gg)
        ai[j] = gi
        af[j] = gf
        ag[j] = gg


@jit
def _gates_forward_o(ao, c_next, m):
    """Full-peephole step, second half: ao already holds its W_ch term; m = o tanh(c_t)."""
    for j in range(c_next.shape[0]):
        go = sigmoid(ao[j])
        m[j] = go * tanh(c_next[j])
        ao[j] = go


@jit
def _gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o):
    """Plain or diagonal-peephole step backward (p_* empty when there are no peepholes).

    In: the blocks hold the gates i, f, g, o; dc holds dL/dc_t from later steps; dm = dL/dm_t.
    Out: the blocks hold dL/da; dc holds dL/dc_{t-1}.
    """
    unit = one(ai[0])
    if p_i.shape[0] == 0:
        for j in range(c_t.shape[0]):
            gi = ai[j]
            gf = af[j]
            gg = ag[j]
            go = ao[j]
            tc = tanh(c_t[j])
            da_o = dm[j] * tc * (go - go * go)  # m = o tanh(c): through o
            dct = dc[j] + dm[j] * go * (unit - tc * tc)  # and through c_t
            ai[j] = dct * gg * (gi - gi * gi)
            af[j] = dct * c_prev[j] * (gf - gf * gf)
            ag[j] = dct * gi * (unit - gg * gg)
            ao[j] = da_o
            dc[j] = dct * gf  # c_{t-1} feeds c_t through f
        return
    for j in range(c_t.shape[0]):
        gi = ai[j]
        gf = af[j]
        gg = ag[j]
        go = ao[j]
        tc = tanh(c_t[j])
        da_o = dm[j] * tc * (go - go * go)
        dct = dc[j] + dm[j] * go * (unit - tc * tc) + da_o * p_o[j]  # o also sees c_t
        da_i = dct * gg * (gi - gi * gi)
        da_f = dct * c_prev[j] * (gf - gf * gf)
        ai[j] = da_i
        af[j] = da_f
        ag[j] = dct * gi * (unit - gg * gg)
        ao[j] = da_o
        dc[j] = dct * gf + da_i * p_i[j] + da_f * p_f[j]  # and i, f see c_{t-1}


@jit
def _gates_backward_o(ao, dc, dm, c_t):
    """Full-peephole backward, first half: dL/da_o, and dL/dc_t except via W_ch[o]."""
    unit = one(ao[0])
    for j in range(c_t.shape[0]):
        go = ao[j]
        tc = tanh(c_t[j])
        ao[j] = dm[j] * tc * (go - go * go)
        dc[j] += dm[j] * go * (unit - tc * tc)


@jit
def _gates_backward_ifg(ai, af, ag, dc, c_prev):
    """Full-peephole backward, second half: dL/da_ifg; dc becomes dL/dc_{t-1} but W_ch."""
    unit = one(ai[0])
    for j in range(c_prev.shape[0]):
        gi = ai[j]
        gf = af[j]
        gg = ag[j]
        dct = dc[j]
        ai[j] = dct * gg * (gi - gi * gi)
        af[j] = dct * c_prev[j] * (gf - gf * gf)
        ag[j] = dct * gi * (unit - gg * gg)
        dc[j] = dct * gf


# ------------------------------------------------------------------------- time loops


@jit(inline=True)
def _any_padded(lengths, b0, b1, steps):
    """Whether any of rows b0..b1 has padded steps (then the loops restore carried state)."""
    for b in range(b0, b1):
        if lengths[b] < steps:
            return True
    return False


@jit
def layer_forward_rows(
    out, h_n, c_n, xp, xh, cstate, mstore,
    h0, c0, x, bias, w_hh, packed, w_hr, peep, w_ch, lengths, d, b0, b1, training,
):  # fmt: skip
    """Direction d of one layer for batch rows b0..b1, all steps: the forward kernel.

    ``packed``: the panels of [W_ih | W_hh] (the loop projects its inputs: fused), W_hh
    (not fused), W_hr, W_ch[i, f, g] and W_ch[o] (pack_columns; empty when absent). Fused,
    the kernel projects x (T*B, I) itself, adding ``bias`` (D, 4H); else xp must already
    hold the projection. In training, xh's x part must hold x (the kernel adds h_{t-1}).

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
    padded = _any_padded(lengths, b0, b1, steps)
    h = h0[d, b0:b1].copy()
    h_new = np.empty_like(h)
    c = c0[d, b0:b1].copy().reshape(units)
    c_new = np.empty_like(c)
    m_proj = np.empty((rows if has_proj else 0, hidden), dtype=c.dtype)
    p_i, p_f, p_o = _tiled_peepholes(peep, d, rows)
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
                for j in range(hidden):
                    tiled_bias[g, r * hidden + j] = bias[d, g * hidden + j]
    for s in range(steps):
        t = steps - 1 - s if d == 1 else s
        slot = 0 if one_slot else t  # this step's gates in xp
        m = m_proj if has_proj else h_new
        ai = xp[d, 0, slot, lo:hi]
        af = xp[d, 1, slot, lo:hi]
        ag = xp[d, 2, slot, lo:hi]
        ao = xp[d, 3, slot, lo:hi]
        base = d * 4 * gate_stride + slot * xp.shape[3] + lo  # xp[d, 0, slot, lo] in xp.flat
        if training:  # h_{t-1} into its rows of xh (the x part is there)
            first_row = (d * steps + t) * batch + b0
            for r in range(rows):
                for q in range(out_size):
                    xh_rows[first_row + r, width_in + q] = h[r, q]
        if fused:  # bias + [x_t | h] [W_ih | W_hh]^T (bias there already after a reset)
            if not (bias_written_back and s > 0):
                for g in range(4):
                    _copy1(xp[d, g, slot, lo:hi], tiled_bias[g])
            a_base = ((d * steps + t) * batch + b0) * depth
            if not training:
                a_base = 0
                for r in range(rows):
                    for i in range(width_in):
                        stacked[r, i] = x[(t * batch + b0 + r), i]
                    for q in range(out_size):
                        stacked[r, width_in + q] = h[r, q]
            product_abt(xp, base, gate_stride, hidden, hidden, rows, xh_rows, a_base, pan_ih, d, 4)
        else:
            product_abt(xp, base, gate_stride, hidden, hidden, rows, h, 0, pan_hh, d, 4)
        if full:
            c2 = c.reshape((rows, hidden))
            product_abt(xp, base, gate_stride, hidden, hidden, rows, c2, 0, pan_ifg, d, 3)
        m_flat = m.reshape(units)
        if full:
            _gates_forward_ifg(ai, af, ag, c, c_new)
            c_new2 = c_new.reshape((rows, hidden))
            o_base = base + 3 * gate_stride
            product_abt(xp, o_base, 0, hidden, hidden, rows, c_new2, 0, pan_o, d, 1)
            _gates_forward_o(ao, c_new, m_flat)
        elif diagonal:
            _gates_forward_diagonal(ai, af, ag, ao, c, c_new, m_flat, p_i, p_f, p_o)
        elif bias_written_back:
            _gates_forward_reset(ai, af, ag, ao, c, c_new, m_flat, tiled_bias)
        else:
            _gates_forward(ai, af, ag, ao, c, c_new, m_flat)
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
        for r in range(rows):
            if t < lengths[b0 + r]:
                for j in range(out_size):
                    out[t, b0 + r, ocol + j] = h_new[r, j]
            else:
                for j in range(out_size):
                    out[t, b0 + r, ocol + j] = 0
        if training:
            _copy1(cstate[d, t, lo:hi], c_new)
            if has_proj:
                _copy2(mstore[d, t, b0:b1], m_proj)
        h, h_new = h_new, h
        c, c_new = c_new, c
    _copy2(h_n[d, b0:b1], h)
    _copy2(c_n[d, b0:b1], c.reshape((rows, hidden)))


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
    padded = _any_padded(lengths, b0, b1, steps)
    dh = dh_n[d, b0:b1].copy()
    dh_next = np.empty_like(dh)
    dc = dc_n[d, b0:b1].copy().reshape(units)
    dc_carry = np.empty(units if padded else 0, dtype=dc.dtype)
    dm_proj = np.empty((rows if has_proj else 0, hidden), dtype=dc.dtype)
    c0_rows = c0[d].reshape(c0.shape[1] * hidden)[lo:hi]
    p_i, p_f, p_o = _tiled_peepholes(peep, d, rows)
    pan_hh, pan_hr, pan_ch = packed
    gate_stride = steps * xp.shape[3]
    for s in range(steps - 1, -1, -1):
        t = steps - 1 - s if d == 1 else s
        t_prev = t + 1 if d == 1 else t - 1  # the step that ran before t
        for r in range(rows):
            if t < lengths[b0 + r]:  # padded steps' output gradients are ignored
                for j in range(out_size):
                    dh[r, j] += dout[t, b0 + r, ocol + j]
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
            _copy1(dc_carry, dc)
        base = d * 4 * gate_stride + t * xp.shape[3] + lo  # xp[d, 0, t, lo] in xp.flat
        if full:
            dc2 = dc.reshape((rows, hidden))
            _gates_backward_o(ao, dc, dm, c_t)
            o_base = base + 3 * gate_stride
            product_ab(dc2, rows, xp, o_base, 0, hidden, hidden, pan_ch, d, 3 * hidden, 1)
            _gates_backward_ifg(ai, af, ag, dc, c_prev)
            product_ab(dc2, rows, xp, base, gate_stride, hidden, hidden, pan_ch, d, 0, 3)
        else:
            _gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o)
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
    _copy2(dh0[d, b0:b1], dh)
    _copy2(dc0[d, b0:b1], dc.reshape((rows, hidden)))


# --------------------------------------------------------------------------- drivers


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
            for g in range(4):
                block = xp[d, g].reshape(rows * hidden)
                for r in range(part.shape[0]):
                    base = (t0 * batch + r) * hidden
                    for j in range(hidden):
                        block[base + j] = part[r, g * hidden + j] + bias[d, g * hidden + j]


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
                for j in range(hidden):
                    flat[base + r * hidden + j] = bias[d, g * hidden + j]
        product_abt(
            xp, d * 4 * gate_stride + first * hidden, gate_stride, hidden, hidden, end - first,
            x, first * width_in, packed, d, 4,
        )  # fmt: skip


@jit(inline=True)
def _peephole_units(peep, d, lo, hi):
    """Direction d's diagonal peepholes i, f, o for hidden units lo..hi-1 (empty without)."""
    if peep.shape[1] == 0:
        empty = np.empty(0, dtype=peep.dtype)
        return empty, empty, empty
    return peep[d, 0, lo:hi], peep[d, 1, lo:hi], peep[d, 2, lo:hi]


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
    p_i, p_f, p_o = _peephole_units(peep, d, first, end)
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
                for j in range(units):
                    xh[d, t * batch + r, width_in + first + j] = h[r, first + j]
            off = r * hidden
            ai = xp[d, 0, slot, off + first : off + end]
            af = xp[d, 1, slot, off + first : off + end]
            ag = xp[d, 2, slot, off + first : off + end]
            ao = xp[d, 3, slot, off + first : off + end]
            c_prev = c[r * units : (r + 1) * units]
            c_next = c_new[r * units : (r + 1) * units]
            m = h_next[r, first:end]
            if diagonal:
                _gates_forward_diagonal(ai, af, ag, ao, c_prev, c_next, m, p_i, p_f, p_o)
            else:
                _gates_forward(ai, af, ag, ao, c_prev, c_next, m)
            if t >= lengths[r]:  # a padded step carries the state; its output is zero
                for j in range(units):
                    c_next[j] = c_prev[j]
                    m[j] = h[r, first + j]
                    out[t, r, ocol + first + j] = 0
            else:
                for j in range(units):
                    out[t, r, ocol + first + j] = m[j]
            if training:
                _copy1(cstate[d, t, off + first : off + end], c_next)
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
def one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end):
    """What a thread of :func:`layer_forward_one_row` does before its loop, for its hidden
    chunks first..end-1 of direction d: pack its part of W_ih (into ``packed_ih``) and of
    W_hh (into ``packed``; both :func:`fastlstm._packed.units_shape`), and fill xp[d, g, t]
    for its units with bias + x_t W_ih^T for every step. inputs (T, I).

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
    for g in range(4):
        for t in range(steps):
            for j in range(lo, hi):
                xp[d, g, t, j] = bias[d, g * hidden + j]
    project_unit_chunks(xp, inputs, packed_ih, d, first, end)
    pack_unit_chunks(packed, w_hh, d, first, end)


@jit
def layer_forward_one_row(
    out, h_n, c_n, xp, xh, cstate, h0, c0, inputs, w_ih, w_hh, bias, packed_ih, packed, peep,
    lengths, d, first, end, state, counter, parties, training,
):  # fmt: skip
    """Direction d of one layer for a batch of one row, hidden chunks first..end-1.

    ``parties`` calls (one per thread) with disjoint chunk ranges run the direction
    together. Each first projects the inputs of its own units and packs its part of the
    weights (:func:`one_row_inputs`; packed_ih and packed are scratch of
    :func:`fastlstm._packed.units_shape`), then per step computes its units' gates, cell
    and output, and waits at a barrier (:mod:`fastlstm._sync`) until all have written
    their part of the new state, which every product needs whole. ``state`` (D, 2, P)
    holds h_{t-1} and h_t in turn, state[d, 0] set to h0 by the caller; ``counter`` (1,)
    int64 starts at 0. No projection, no full peephole (those take
    :func:`layer_forward_rows`); xp (D, 4, T, H) is overwritten. Steps past the row's
    length are padding: out is zero there, and in training the caches hold the carried
    state (and zero gates) so that backward and the weight gradients read defined numbers.
    """
    one_row_inputs(xp, inputs, w_ih, bias, packed_ih, w_hh, packed, d, first, end)
    steps = out.shape[0]
    hidden = c0.shape[2]
    width_in = xh.shape[2] - h0.shape[2]  # (training: xh rows are [x_t | h_{t-1}])
    out_size = h0.shape[2]
    width = packed.shape[4]
    lo = first * width
    hi = min(hidden, end * width)
    ocol = d * out_size
    diagonal = peep.shape[1] > 0
    run = min(steps, lengths[0])
    c = c0[d, 0, lo:hi].copy()
    c_new = np.empty_like(c)
    p_i, p_f, p_o = _peephole_units(peep, d, lo, hi)
    gate_stride = xp.shape[2] * xp.shape[3]
    current = 0
    for s in range(run):
        t = run - 1 - s if d == 1 else s  # the reverse direction runs over the row's steps
        h = state[d, current]
        h_next = state[d, 1 - current]
        base = d * 4 * gate_stride + t * xp.shape[3]
        product_one_row(xp, base, gate_stride, hidden, h, packed, d, first, end)
        if training:
            _copy1(xh[d, t, width_in + lo : width_in + hi], h[lo:hi])
        ai = xp[d, 0, t, lo:hi]
        af = xp[d, 1, t, lo:hi]
        ag = xp[d, 2, t, lo:hi]
        ao = xp[d, 3, t, lo:hi]
        m = h_next[lo:hi]
        if diagonal:
            _gates_forward_diagonal(ai, af, ag, ao, c, c_new, m, p_i, p_f, p_o)
        else:
            _gates_forward(ai, af, ag, ao, c, c_new, m)
        for j in range(hi - lo):
            out[t, 0, ocol + lo + j] = m[j]
        if training:
            _copy1(cstate[d, t, lo:hi], c_new)
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
            _copy1(xh[d, t, width_in + lo : width_in + hi], carried_h)
            _copy1(cstate[d, t, lo:hi], carried_c)
            for g in range(4):
                xp[d, g, t, lo:hi] = 0
    _copy1(h_n[d, 0, lo:hi], h[lo:hi])
    _copy1(c_n[d, 0, lo:hi], c)


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
    p_i, p_f, p_o = _peephole_units(peep, d, lo, hi)
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
        for j in range(hi - lo):
            dm[j] = dh[lo + j] + dout[t, 0, ocol + lo + j]
        ai = xp[d, 0, t, lo:hi]
        af = xp[d, 1, t, lo:hi]
        ag = xp[d, 2, t, lo:hi]
        ao = xp[d, 3, t, lo:hi]
        c_t = cstate[d, t, lo:hi]
        c_prev = cstate[d, t_prev, lo:hi] if 0 <= t_prev < steps else c0[d, 0, lo:hi]
        _gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o)
        if parties > 1:
            arrive_and_wait(counter, parties * (s + 1))
        base = d * 4 * gate_stride + t * xp.shape[3]
        product_one_row_back(dh_next, xp, base, gate_stride, hidden, packed, d, first, end, scratch)
        current = 1 - current
    dh = state[d, current]
    _copy1(dh0[d, 0, lo:hi], dh[lo:hi])
    _copy1(dc0[d, 0, lo:hi], dc)


@jit(inline=True)
def _product_whole_panels(c, a, b):
    """c += a b for C-contiguous c (M, N), a (M, K), b (K, N), N a whole number of panels
    (two SIMD vectors): the register tile straight over b's rows, no packing."""
    rows, inner = a.shape
    width = c.shape[1]
    lanes = lanes_of(c)
    c_flat = c.reshape(c.size)
    a_flat = a.reshape(a.size)
    b_flat = b.reshape(b.size)
    for col0 in range(0, width, 2 * lanes):
        for r0 in range(0, rows, ROWS):
            off = r0 * width + col0
            tile(c_flat, off, off + lanes, width, a_flat, r0 * inner, inner,
                 b_flat, col0, width, inner, min(ROWS, rows - r0), lanes, lanes, col0)  # fmt: skip


@jit(inline=True)
def _dense_gradients_small(dx, gw_ih, gw_hh, gbias, xp, xh, w_ih, d):
    """Tiny sizes: dW_ih, dW_hh, the bias and dx of direction d as two products over all
    rows through the register tile (per-gate BLAS calls cost microseconds each here, and
    row-by-row updates keep their sums in memory).

    dL/da is gathered row-major (rows, 4H, padded to whole panels). Then
    [x | h_{t-1} | 1]^T (I + P + 1, rows) times it gives dW_ih^T, dW_hh^T and the bias
    gradient in one (I + P + 1, 4H) block, and dL/da times W_ih gives dx (both padded to
    whole panels with zeros, then the valid part added into the gradients).
    """
    rows, width = dx.shape
    hidden = w_ih.shape[1] // 4
    gates = 4 * hidden
    out_size = xh.shape[2] - width
    lanes = lanes_of(dx)
    panel = 2 * lanes
    gates_pad = (gates + panel - 1) // panel * panel
    width_pad = (width + panel - 1) // panel * panel
    operands = width + out_size + 1
    da = np.empty((rows, gates_pad), dtype=xp.dtype)
    at = np.empty((operands, rows), dtype=xp.dtype)
    xh_d = xh[d]
    da_flat = da.reshape(da.size)
    xp_flat = xp.reshape(xp.size)
    for g in range(4):  # each gate's block (rows, H) into its columns, vector by vector
        source = (d * 4 + g) * rows * hidden
        copy_rows(
            da_flat, g * hidden, gates_pad, xp_flat, source, hidden, rows, hidden, hidden, lanes
        )
    for row in range(rows):
        for col in range(gates, gates_pad):
            da[row, col] = 0
        for i in range(width + out_size):
            at[i, row] = xh_d[row, i]
        at[operands - 1, row] = 1
    sums = np.zeros((operands, gates_pad), dtype=xp.dtype)
    _product_whole_panels(sums, at, da)
    for col in range(gates):
        for i in range(width):
            gw_ih[d, col, i] += sums[i, col]
        for q in range(out_size):
            gw_hh[d, col, q] += sums[width + q, col]
        gbias[d, col] += sums[operands - 1, col]
    # dx = dL/da W_ih (direction 0 writes, direction 1 adds), into whole panels first
    w_pad = np.zeros((gates_pad, width_pad), dtype=xp.dtype)
    for col in range(gates):
        for i in range(width):
            w_pad[col, i] = w_ih[d, col, i]
    dx_pad = np.zeros((rows, width_pad), dtype=xp.dtype)
    _product_whole_panels(dx_pad, da, w_pad)  # (zero padding adds exact zeros)
    for row in range(rows):
        for i in range(width):
            dx[row, i] = dx_pad[row, i] if d == 0 else dx[row, i] + dx_pad[row, i]


@jit
def weight_gradients(dx, gw_ih, gw_hh, gbias, xp, x, xh, w_ih, part, parts):
    """After the backward loop: every weight gradient as large products over all steps.

    dW_ih and dW_hh of a gate come from one GEMM dL/da^T [x | h_{t-1}] over xh's rows
    (one wide product runs faster than two narrow ones: OpenBLAS at 3200 x 256 x 384,
    82 GFLOP/s, against 70 and 78 for the 128- and 256-wide halves), from
    MERGED_GRADIENT_MIN_ROWS rows on.

    Adds into the gradient arrays (gbias (D, G) collects the one bias gradient every bias
    shares); overwrites dx (T*B, I) with dL/dx. xp holds dL/da in the gate-major layout.

    Calls with part = 0..parts-1 (on separate threads) share the work without sharing an
    output: part k takes the (direction, gate) bands d*4 + g = k mod parts of dW_ih, dW_hh
    and the bias, and the k-th block of dx's rows (every gate, in the same order as one
    call); tiny sizes go to part 0. The rarer gradients (W_hr, peepholes) are
    :func:`extra_weight_gradients`'.
    """
    directions, _, steps, _ = xp.shape
    hidden = w_ih.shape[1] // 4
    rows, width = x.shape
    out_size = xh.shape[2] - width
    small = 4 * hidden * (width + out_size) <= SMALL_ROW_MACS
    r0 = rows * part // parts
    r1 = rows * (part + 1) // parts
    # Over many rows one GEMM per gate into a scratch, then added into dW_ih and dW_hh;
    # over few (a one-row batch: T rows) the adds would cost more than the wider GEMM
    # saves (measured at 150 rows: 1.64 -> 1.74 ms), so two GEMMs accumulate in place.
    merged = not small and rows >= MERGED_GRADIENT_MIN_ROWS
    both = np.empty((hidden if merged else 0, width + out_size), dtype=xp.dtype)
    for d in range(directions):
        if small:
            if part == 0:
                _dense_gradients_small(dx, gw_ih, gw_hh, gbias, xp, xh, w_ih, d)
        else:
            for g in range(4):
                da = xp[d, g].reshape((rows, hidden))
                band = slice(g * hidden, (g + 1) * hidden)
                if (d * 4 + g) % parts == part:
                    if merged:
                        gemm_atb(both, da, xh[d], 0.0)  # sum_t da_t^T [x_t | h_{t-1}]
                        for u in range(hidden):
                            for i in range(width):
                                gw_ih[d, g * hidden + u, i] += both[u, i]
                            for q in range(out_size):
                                gw_hh[d, g * hidden + u, q] += both[u, width + q]
                    else:
                        gemm_atb(gw_ih[d, band], da, xh[d, :, :width], 1.0)  # da^T x
                        gemm_atb(gw_hh[d, band], da, xh[d, :, width:], 1.0)  # da^T h_{t-1}
                    for r in range(rows):
                        for j in range(hidden):
                            gbias[d, g * hidden + j] += da[r, j]
                beta = 1.0 if d > 0 or g > 0 else 0.0
                gemm_ab(dx[r0:r1], da[r0:r1], w_ih[d, band], beta)  # dx = da W_ih


@jit
def extra_weight_gradients(gw_hr, gpeep, gw_ch, xp, cstate, c0, mstore, dhstore):
    """After :func:`weight_gradients`: the gradients only projection and peepholes have
    (dW_hr, the diagonal peepholes, W_ch), added in. A kernel of its own, called only for
    models that have them, so a plain LSTM never compiles this code (compile time)."""
    directions, _, steps, _ = xp.shape
    hidden = c0.shape[2]
    batch = c0.shape[1]
    rows = steps * batch
    out_size = dhstore.shape[3]
    for d in range(directions):
        if gw_hr.shape[1] > 0:  # dW_hr = sum_t dh_t^T m_t
            _matmul_atb(gw_hr[d], dhstore[d].reshape((rows, out_size)),
                        mstore[d].reshape((rows, hidden)))  # fmt: skip
        if gpeep.shape[1] == 0 and gw_ch.shape[1] == 0:
            continue
        # c_{t-1} per step in the direction's own order: c0 before its first step.
        first = steps - 1 if d == 1 else 0
        shift = 1 if d == 1 else -1
        c_all = cstate[d].reshape((rows, hidden))
        c0_d = c0[d]
        for t in range(steps):
            c_prev = c0_d if t == first else cstate[d, t + shift].reshape((batch, hidden))
            c_now = c_all[t * batch : (t + 1) * batch]
            a_i = xp[d, 0, t].reshape((batch, hidden))
            a_f = xp[d, 1, t].reshape((batch, hidden))
            a_o = xp[d, 3, t].reshape((batch, hidden))
            if gpeep.shape[1] > 0:
                for b in range(batch):
                    for j in range(hidden):
                        gpeep[d, 0, j] += a_i[b, j] * c_prev[b, j]
                        gpeep[d, 1, j] += a_f[b, j] * c_prev[b, j]
                        gpeep[d, 2, j] += a_o[b, j] * c_now[b, j]
            if gw_ch.shape[1] > 0:
                for g in range(3):
                    _matmul_atb(gw_ch[d, g * hidden : (g + 1) * hidden],
                                xp[d, g, t].reshape((batch, hidden)), c_prev)  # fmt: skip
                _matmul_atb(gw_ch[d, 3 * hidden :], a_o, c_now)


@jit
def one_row_products_only(xp, h, packed, first, end, steps):
    """The one-row loop's products alone (for the profiler): ``steps`` times, what one task
    of :func:`layer_forward_one_row` multiplies per step, hidden chunks first..end-1 of
    direction 0; xp (1, 4, 1, H), h (P,), packed from pack_units."""
    hidden = xp.shape[3]
    for _ in range(steps):
        product_one_row(xp, 0, hidden, hidden, h, packed, 0, first, end)


@jit
def recurrent_products_only(xp, x, h, packed_ih, packed_hh, steps):
    """The forward time loop's matrix products alone (for the profiler's phase split).

    ``steps`` times, what one task of the loop does per step: xp (1, 4, 1, rows*H) +=
    x (rows, I + P) [W_ih | W_hh]^T when ``packed_ih`` holds those panels (the loop
    projects its inputs itself; x stands for [x_t | h_{t-1}]), else += h (rows, P) W_hh^T
    (``packed_hh`` from pack_columns), through the packed micro-kernel.
    """
    rows = h.shape[0]
    hidden = xp.shape[3] // rows
    stride = rows * hidden
    for _ in range(steps):
        if packed_ih.shape[1] > 0:
            product_abt(xp, 0, stride, hidden, hidden, rows, x, 0, packed_ih, 0, 4)
        else:
            product_abt(xp, 0, stride, hidden, hidden, rows, h, 0, packed_hh, 0, 4)
