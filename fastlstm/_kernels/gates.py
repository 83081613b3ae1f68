"""The element-wise part of a step: the gate passes, and the small helpers of the loops.

Each gate pass is compiled as a function of its own, never inlined by Numba: LLVM
vectorises each loop in its own function, with runtime checks that the arrays do not
overlap; inlined into a time loop, where the blocks are slices of one array, the checks
fail and the scalar loop runs (measured on a Zen 4: 1.7 ns per unit against 12-14).
The passes are flat loops over every unit of a batch chunk; each gate block is its own
1-D view (one array indexed at j, H + j, ... while being written would defeat LLVM's
dependence analysis and keep the loop scalar). The activations are
:mod:`fastlstm._kernels.activations`'.
"""

from __future__ import annotations

import numpy as np

from fastlstm._config import jit
from fastlstm._kernels.activations import fma, one, sigmoid, tanh

# Copies between arrays are explicit loops: Numba compiles every array-to-slice assignment
# with a formatted shape-mismatch error, whose string machinery cost about 10 s of the
# first call's compile time (measured with an empty cache). They are functions of their
# own, as the gate passes are, and the time loops call them per row: written inline over
# 3-D indices the loops stayed scalar (the medium forward's output and [x_t | h] copies
# took 0.9 of 14 ms; the seed forward 84 -> 75 us with these calls, on a Zen 4).


@jit
def copy1(dst, src):
    """dst[:] = src for 1-D arrays of one length."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@jit
def add1(dst, src):
    """dst[:] += src for 1-D arrays of one length."""
    for j in range(src.shape[0]):
        dst[j] += src[j]


@jit
def sum1(dst, a, b):
    """dst[:] = a + b for 1-D arrays of one length."""
    for j in range(a.shape[0]):
        dst[j] = a[j] + b[j]


@jit
def copy2(dst, src):
    """dst[:, :] = src for 2-D arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] = src[r, j]


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
def tiled_peepholes(peep, d, rows):
    """Direction d's diagonal peepholes tiled over ``rows`` (empty when there are none)."""
    if peep.shape[1] == 0:
        empty = np.empty(0, dtype=peep.dtype)
        return empty, empty, empty
    return _tile_rows(peep[d, 0], rows), _tile_rows(peep[d, 1], rows), _tile_rows(peep[d, 2], rows)


@jit(inline=True)
def peephole_units(peep, d, lo, hi):
    """Direction d's diagonal peepholes i, f, o for hidden units lo..hi-1 (empty without)."""
    if peep.shape[1] == 0:
        empty = np.empty(0, dtype=peep.dtype)
        return empty, empty, empty
    return peep[d, 0, lo:hi], peep[d, 1, lo:hi], peep[d, 2, lo:hi]


@jit(inline=True)
def any_padded(lengths, b0, b1, steps):
    """Whether any of rows b0..b1 has padded steps (then the loops restore carried state)."""
    for b in range(b0, b1):
        if lengths[b] < steps:
            return True
    return False


@jit
def gates_forward(ai, af, ag, ao, c_prev, c_next, m):
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
def gates_forward_reset(ai, af, ag, ao, c_prev, c_next, m, reset):
    """:func:`gates_forward` for inference with one slot of gates: instead of the gates
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
def gates_forward_diagonal(ai, af, ag, ao, c_prev, c_next, m, p_i, p_f, p_o):
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
def gates_forward_ifg(ai, af, ag, c_prev, c_next):
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
def gates_forward_o(ao, c_next, m):
    """Full-peephole step, second half: ao already holds its W_ch term; m = o tanh(c_t)."""
    for j in range(c_next.shape[0]):
        go = sigmoid(ao[j])
        m[j] = go * tanh(c_next[j])
        ao[j] = go


@jit
def gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o):
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
def gates_backward_o(ao, dc, dm, c_t):
    """Full-peephole backward, first half: dL/da_o, and dL/dc_t except via W_ch[o]."""
    unit = one(ao[0])
    for j in range(c_t.shape[0]):
        go = ao[j]
        tc = tanh(c_t[j])
        ao[j] = dm[j] * tc * (go - go * go)
        dc[j] += dm[j] * go * (unit - tc * tc)


@jit
def gates_backward_ifg(ai, af, ag, dc, c_prev):
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
