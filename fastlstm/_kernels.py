"""Numba kernels: the time loops of one LSTM layer, forward and backward, both directions.

Equations (one direction; gate order i, f, g, o as in PyTorch; row vectors, batch rows):

    a_t = x_t W_ih^T + h_{t-1} W_hh^T + (b_ih + b_hh)                      4H values
      diagonal peephole: a_i += p_i c_{t-1},  a_f += p_f c_{t-1},  a_o += p_o c_t
      full peephole:     a_ifg += c_{t-1} W_ch[ifg]^T,  a_o += c_t W_ch[o]^T  (b_ch is in the bias)
    i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
    c_t = f c_{t-1} + i g       m_t = o tanh(c_t)       h_t = m_t W_hr^T (projection) or m_t

The input part ``x_t W_ih^T`` of every step comes in precomputed (one large GEMM outside);
each step here does the recurrent GEMM straight into that block (``beta = 1``) and one
fused, vectorised pass over the gate math. Nothing is allocated inside a time loop.

Conventions: kernels never validate; outputs first, then inputs, then sizes and flags.
All arrays are C-contiguous in the model's dtype; optional weights are empty arrays.
Sizes: T steps, B batch rows, H hidden, P = H_out (projection size or H), G = 4H, D directions.

    xp      (T, B, D*G)  in: x_t W_ih^T per direction block; forward leaves the activated
                         gates there (training keeps them); backward overwrites it with dL/da
    out     (T, B, D*P)  layer output (zero at padded steps)
    h0, h_n (D, B, P)    c0, c_n (D, B, H)
    w_hh    (D, G, P)    w_hr (D, P, H) or (D, 0, 0)      bias (D, G), all biases summed
    peep    (D, 3, H)    rows i, f, o; zeros when the layer has no diagonal peephole
    w_ch    (D, G, H) or (D, 0, 0)
    lengths (B,) int64   steps t >= lengths[b] are padding: state carried, output zero
    hprev   (D, T, B, P) training: the state each step started from (for dW_hh)
    cstate  (D, T, B, H) training: the cell after each step
    mstore  (D, T, B, H) training with projection: m_t (for dW_hr)
    dhstore (D, T, B, P) backward with projection: dL/dh_t (for dW_hr)

Direction d = 1 runs t = T-1 down to 0, each sequence over its own valid steps.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastlstm._activations import one, sigmoid, tanh
from fastlstm._blas import gemm_ab, gemm_abt
from fastlstm._config import SMALL_RECURRENT_MACS, jit

# ----------------------------------------------------------------------------- products


@jit
def _matmul_abt(c, a, b, accumulate):
    """c = a @ b.T (+ c if accumulate); a hand-written loop when the product is tiny."""
    m, k = a.shape
    n = b.shape[0]
    if k * n > SMALL_RECURRENT_MACS:
        gemm_abt(c, a, b, 1.0 if accumulate else 0.0)
        return
    for r in range(m):
        for col in range(n):
            if not accumulate:
                c[r, col] = 0
            acc = c[r, col]
            for q in range(k):
                acc += a[r, q] * b[col, q]
            c[r, col] = acc


@jit
def _matmul_ab(c, a, b, accumulate):
    """c = a @ b (+ c if accumulate); a hand-written loop when the product is tiny."""
    m, k = a.shape
    n = b.shape[1]
    if k * n > SMALL_RECURRENT_MACS:
        gemm_ab(c, a, b, 1.0 if accumulate else 0.0)
        return
    for r in range(m):
        if not accumulate:
            for col in range(n):
                c[r, col] = 0
        for q in range(k):
            coef = a[r, q]
            for col in range(n):
                c[r, col] += coef * b[q, col]


@jit
def _add_into(dst, src):
    for j in range(dst.shape[0]):
        dst[j] += src[j]


# ------------------------------------------------------------------------ gate passes
# Each pass takes the four gate blocks of a row as separate 1-D views. Indexing one 4H
# array at j, H + j, 2H + j, 3H + j while writing it defeats LLVM's dependence analysis
# (the offsets are symbolic) and the loop stays scalar; separate views get runtime alias
# checks instead, and the loops become AVX2 code.


@jit
def _blocks(v, hidden):
    """The i, f, g, o blocks of a 4H vector as four views."""
    return v[:hidden], v[hidden : 2 * hidden], v[2 * hidden : 3 * hidden], v[3 * hidden :]


@jit
def _gates_forward(ai, af, ag, ao, c_prev, c_next, m, bi, bf, bg, bo, p_i, p_f, p_o):
    """Plain or diagonal-peephole step for one row: pre-activations in, gates out."""
    for j in range(c_prev.shape[0]):
        cp = c_prev[j]
        gi = sigmoid(ai[j] + bi[j] + p_i[j] * cp)
        gf = sigmoid(af[j] + bf[j] + p_f[j] * cp)
        gg = tanh(ag[j] + bg[j])
        cc = gf * cp + gi * gg
        go = sigmoid(ao[j] + bo[j] + p_o[j] * cc)
        c_next[j] = cc
        m[j] = go * tanh(cc)
        ai[j] = gi
        af[j] = gf
        ag[j] = gg
        ao[j] = go


@jit
def _gates_forward_ifg(ai, af, ag, c_prev, c_next, bi, bf, bg):
    """Full-peephole step, first half: i, f, g and the new cell (o needs W_ch c_t)."""
    for j in range(c_prev.shape[0]):
        gi = sigmoid(ai[j] + bi[j])
        gf = sigmoid(af[j] + bf[j])
        gg = tanh(ag[j] + bg[j])
        c_next[j] = gf * c_prev[j] + gi * gg
        ai[j] = gi
        af[j] = gf
        ag[j] = gg


@jit
def _gates_forward_o(ao, c_next, m, bo):
    """Full-peephole step, second half: ao already holds c_t W_ch[o]^T; m = o tanh(c_t)."""
    for j in range(c_next.shape[0]):
        go = sigmoid(ao[j] + bo[j])
        m[j] = go * tanh(c_next[j])
        ao[j] = go


@jit
def _gates_backward(ai, af, ag, ao, dc, dm, c_t, c_prev, p_i, p_f, p_o):
    """Plain or diagonal-peephole step backward for one row.

    In: the blocks hold the gates i, f, g, o; dc holds dL/dc_t from later steps; dm = dL/dm_t.
    Out: the blocks hold dL/da; dc holds dL/dc_{t-1}.
    """
    unit = one(ai[0])
    for j in range(c_t.shape[0]):
        gi = ai[j]
        gf = af[j]
        gg = ag[j]
        go = ao[j]
        tc = tanh(c_t[j])
        dmj = dm[j]
        da_o = dmj * tc * (go - go * go)  # m = o tanh(c): through o
        dct = dc[j] + dmj * go * (unit - tc * tc) + da_o * p_o[j]  # and through c_t
        da_i = dct * gg * (gi - gi * gi)
        da_f = dct * c_prev[j] * (gf - gf * gf)
        da_g = dct * gi * (unit - gg * gg)
        dc[j] = dct * gf + da_i * p_i[j] + da_f * p_f[j]  # c_{t-1} feeds c_t, i and f
        ai[j] = da_i
        af[j] = da_f
        ag[j] = da_g
        ao[j] = da_o


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


@jit
def _forward_rows(
    out, h_n, c_n, xp, hprev, cstate, mstore,
    h0, c0, w_hh, w_hr, peep, w_ch, bias, lengths, d, b0, b1, training,
):  # fmt: skip
    """Direction d of one layer for batch rows b0..b1, over all steps."""
    steps = xp.shape[0]
    hidden = c0.shape[2]
    out_size = h0.shape[2]
    gates = 4 * hidden
    rows = b1 - b0
    has_proj = w_hr.shape[1] > 0
    full = w_ch.shape[1] > 0
    col = d * gates
    ocol = d * out_size
    h = h0[d, b0:b1].copy()
    c = c0[d, b0:b1].copy()
    h_new = np.empty_like(h)
    c_new = np.empty_like(c)
    m_proj = np.empty((rows if has_proj else 0, hidden), dtype=c.dtype)
    w_hh_d = w_hh[d]
    bi, bf, bg, bo = _blocks(bias[d], hidden)
    p_i = peep[d, 0]
    p_f = peep[d, 1]
    p_o = peep[d, 2]
    for s in range(steps):
        t = steps - 1 - s if d == 1 else s
        m = m_proj if has_proj else h_new
        pre = xp[t, b0:b1, col : col + gates]
        _matmul_abt(pre, h, w_hh_d, True)
        if full:
            _matmul_abt(pre[:, : 3 * hidden], c, w_ch[d, : 3 * hidden], True)
        if training:
            hprev[d, t, b0:b1] = h
        for r in range(rows):
            if t < lengths[b0 + r]:
                ai, af, ag, ao = _blocks(xp[t, b0 + r, col : col + gates], hidden)
                if full:
                    _gates_forward_ifg(ai, af, ag, c[r], c_new[r], bi, bf, bg)
                else:
                    _gates_forward(
                        ai, af, ag, ao, c[r], c_new[r], m[r], bi, bf, bg, bo, p_i, p_f, p_o
                    )
            else:
                c_new[r] = c[r]
                m[r] = 0
        if full:
            _matmul_abt(pre[:, 3 * hidden :], c_new, w_ch[d, 3 * hidden :], True)
            for r in range(rows):
                if t < lengths[b0 + r]:
                    ao = xp[t, b0 + r, col + 3 * hidden : col + gates]
                    _gates_forward_o(ao, c_new[r], m[r], bo)
        if has_proj:
            _matmul_abt(h_new, m, w_hr[d], False)
        for r in range(rows):
            if t < lengths[b0 + r]:
                out[t, b0 + r, ocol : ocol + out_size] = h_new[r]
            else:
                h_new[r] = h[r]
                out[t, b0 + r, ocol : ocol + out_size] = 0
        if training:
            cstate[d, t, b0:b1] = c_new
            if has_proj:
                mstore[d, t, b0:b1] = m
        h, h_new = h_new, h
        c, c_new = c_new, c
    h_n[d, b0:b1] = h
    c_n[d, b0:b1] = c


@jit
def _backward_rows(
    xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
    w_hh, w_hr, peep, w_ch, lengths, d, b0, b1,
):  # fmt: skip
    """Direction d of one layer backward for rows b0..b1: dL/da into xp, dh0 and dc0."""
    steps = xp.shape[0]
    hidden = c0.shape[2]
    out_size = dh0.shape[2]
    gates = 4 * hidden
    rows = b1 - b0
    has_proj = w_hr.shape[1] > 0
    full = w_ch.shape[1] > 0
    col = d * gates
    ocol = d * out_size
    dh = dh_n[d, b0:b1].copy()
    dc = dc_n[d, b0:b1].copy()
    dh_next = np.empty_like(dh)
    dm_proj = np.empty((rows if has_proj else 0, hidden), dtype=dc.dtype)
    p_i = peep[d, 0]
    p_f = peep[d, 1]
    p_o = peep[d, 2]
    for s in range(steps - 1, -1, -1):
        t = steps - 1 - s if d == 1 else s
        t_prev = t + 1 if d == 1 else t - 1  # the step that ran before t
        for r in range(rows):
            if t < lengths[b0 + r]:  # padded steps' output gradients are ignored
                _add_into(dh[r], dout[t, b0 + r, ocol : ocol + out_size])
            elif has_proj:
                dhstore[d, t, b0 + r] = 0
        if has_proj:
            for r in range(rows):
                if t < lengths[b0 + r]:
                    dhstore[d, t, b0 + r] = dh[r]
            _matmul_ab(dm_proj, dh, w_hr[d], False)
            dm = dm_proj
        else:
            dm = dh
        for r in range(rows):
            a = xp[t, b0 + r, col : col + gates]
            if t < lengths[b0 + r]:
                ai, af, ag, ao = _blocks(a, hidden)
                c_t = cstate[d, t, b0 + r]
                if full:
                    _gates_backward_o(ao, dc[r], dm[r], c_t)
                else:
                    c_prev = cstate[d, t_prev, b0 + r] if 0 <= t_prev < steps else c0[d, b0 + r]
                    _gates_backward(ai, af, ag, ao, dc[r], dm[r], c_t, c_prev, p_i, p_f, p_o)
            else:
                a[:] = 0  # no gradient flows into a padded step
        pre = xp[t, b0:b1, col : col + gates]
        if full:
            _matmul_ab(dc, pre[:, 3 * hidden :], w_ch[d, 3 * hidden :], True)
            for r in range(rows):
                if t < lengths[b0 + r]:
                    ai, af, ag, _ = _blocks(xp[t, b0 + r, col : col + gates], hidden)
                    c_prev = cstate[d, t_prev, b0 + r] if 0 <= t_prev < steps else c0[d, b0 + r]
                    _gates_backward_ifg(ai, af, ag, dc[r], c_prev)
            _matmul_ab(dc, pre[:, : 3 * hidden], w_ch[d, : 3 * hidden], True)
        _matmul_ab(dh_next, pre, w_hh[d], False)
        for r in range(rows):
            if t >= lengths[b0 + r]:
                dh_next[r] = dh[r]  # the state was carried through a padded step
        dh, dh_next = dh_next, dh
    dh0[d, b0:b1] = dh
    dc0[d, b0:b1] = dc


# --------------------------------------------------------------------------- drivers


@jit
def layer_forward_serial(
    out, h_n, c_n, xp, hprev, cstate, mstore,
    h0, c0, w_hh, w_hr, peep, w_ch, bias, lengths, n_chunks, training,
):  # fmt: skip
    """One layer, all directions, on the calling thread (``n_chunks`` is ignored)."""
    for d in range(w_hh.shape[0]):
        _forward_rows(
            out, h_n, c_n, xp, hprev, cstate, mstore,
            h0, c0, w_hh, w_hr, peep, w_ch, bias, lengths, d, 0, xp.shape[1], training,
        )  # fmt: skip


@jit(parallel=True)
def layer_forward_parallel(
    out, h_n, c_n, xp, hprev, cstate, mstore,
    h0, c0, w_hh, w_hr, peep, w_ch, bias, lengths, n_chunks, training,
):  # fmt: skip
    """One layer: directions x batch chunks as parallel tasks, each over the whole time loop.

    One fork/join per layer call; the tasks share nothing but disjoint rows and columns.
    """
    batch = xp.shape[1]
    for task in prange(w_hh.shape[0] * n_chunks):
        d = task // n_chunks
        k = task - d * n_chunks
        _forward_rows(
            out, h_n, c_n, xp, hprev, cstate, mstore,
            h0, c0, w_hh, w_hr, peep, w_ch, bias, lengths,
            d, k * batch // n_chunks, (k + 1) * batch // n_chunks, training,
        )  # fmt: skip


@jit
def layer_backward_serial(
    xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
    w_hh, w_hr, peep, w_ch, lengths, n_chunks,
):  # fmt: skip
    """Backward of one layer, all directions, on the calling thread."""
    for d in range(w_hh.shape[0]):
        _backward_rows(
            xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
            w_hh, w_hr, peep, w_ch, lengths, d, 0, xp.shape[1],
        )  # fmt: skip


@jit(parallel=True)
def layer_backward_parallel(
    xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
    w_hh, w_hr, peep, w_ch, lengths, n_chunks,
):  # fmt: skip
    """Backward of one layer: directions x batch chunks as parallel tasks."""
    batch = xp.shape[1]
    for task in prange(w_hh.shape[0] * n_chunks):
        d = task // n_chunks
        k = task - d * n_chunks
        _backward_rows(
            xp, dh0, dc0, dhstore, dout, dh_n, dc_n, cstate, c0,
            w_hh, w_hr, peep, w_ch, lengths,
            d, k * batch // n_chunks, (k + 1) * batch // n_chunks,
        )  # fmt: skip


@jit
def recurrent_products_only(acc, h, w_hh, steps):
    """The forward time loop's recurrent products alone (for the profiler's phase split).

    acc (B, G) += h (B, P) @ w_hh (G, P)^T, ``steps`` times: the same calls, sizes and
    operands as one direction's time loop, without the gate math.
    """
    for _ in range(steps):
        _matmul_abt(acc, h, w_hh, True)
