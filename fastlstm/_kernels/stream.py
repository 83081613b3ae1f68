"""Numba kernels of streaming inference: one step (or a chunk of steps) of every layer.

Equations (gate order i, f, g, o as in PyTorch; row vectors, B batch rows, layer l):

    a = [x_t | h_{t-1}] [W_ih | W_hh]^T + (b_ih + b_hh (+ b_ch))          4H values per row
      diagonal peephole: a_i += p_i c_{t-1},  a_f += p_f c_{t-1},  a_o += p_o c_t
      full peephole:     a_ifg += c_{t-1} W_ch[ifg]^T,  a_o += c_t W_ch[o]^T
    i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
    c_t = f c_{t-1} + i g       m_t = o tanh(c_t)       h_t = m_t W_hr^T (projection) or m_t

Layer l > 0 reads layer l - 1's new h_t as its x_t. Everything a stream owns lives in
three arrays made once by :mod:`fastlstm.stream` (so that a call passes few arguments;
Numba's dispatch costs about 100 ns per array):

    ws      (N,) float   the state and work arrays: h (L, B, P), c (L, B, H), per layer the
                         gate block xp (4, B*H), the bias tiled over the rows (4, B*H) and
                         the diagonal peepholes tiled (3, B*H); c_new and m (B*H), the rows
                         [x_t | h_{t-1}] (B rows of max_l (I_l + P): a part's rows start
                         at its first row times that, packed at its layer's I_l + P)
    panels  (M,) float   every layer's weights packed once for the micro-kernels: [W_ih |
                         W_hh] along K (pack_units for a batch of one row, pack_columns
                         otherwise), W_hr and W_ch[ifg], W_ch[o] (pack_columns)
    meta    (K,) int64   sizes and offsets into ws and panels (layout in _HEADER, _RECORD)

A plain layer's gate pass writes the bias back into its gate block (the block then holds
the bias again, ready for the next step's product to add into: no bias pass per step);
peephole layers copy the bias in first, as the fused forward loop does, and so does every
layer of a stream whose rows are stepped in parts on two threads (M_COPY_BIAS: a part's
gate pass must not write another part's rows). With B > 1 the product, the bias and the
gate passes are those of the fused forward loop of :mod:`fastlstm._kernels.forward`, in the same
order, so a stream gives that loop's numbers (and each row's sums are the same whatever
rows share its register block, so parts change nothing either).

Conventions: kernels never validate and allocate nothing; outputs first, then inputs,
then sizes. x and out are C-contiguous, read and written through flat views with explicit
row and step strides (a batch-first chunk needs no transpose).
"""

from __future__ import annotations

from fastlstm._config import jit
from fastlstm._kernels.gates import (
    copy1,
    gates_forward,
    gates_forward_diagonal,
    gates_forward_ifg,
    gates_forward_o,
    gates_forward_reset,
)
from fastlstm._kernels.products import product_abt, product_one_row

# meta[0:_HEADER]: the stream's sizes and the offsets of the regions every layer shares.
(
    M_LAYERS,  # L
    M_BATCH,  # B
    M_HIDDEN,  # H
    M_OUT,  # P = H_out
    M_ONE_ROW,  # 1: the main product is the one-row kernel (pack_units panels)
    M_PEEPHOLE,  # 0 none, 1 diagonal, 2 full
    M_PROJ,  # 1 with projection
    M_H,  # ws offset of h (L, B, P)
    M_C,  # ws offset of c (L, B, H)
    M_C_NEW,  # ws offset of c_new (B*H)
    M_M,  # ws offset of m (B*H), the gate pass's output before the projection
    M_ROWS,  # ws offset of the rows [x_t | h_{t-1}] (B, I_l + P)
    M_ROW_STRIDE,  # max over layers of I_l + P: a part's rows start at M_ROWS + b0 * this
    M_COPY_BIAS,  # 1: every layer copies the bias into its gate block each step
) = range(14)
_HEADER = 14
# meta[_HEADER + l * _RECORD :][:_RECORD]: layer l.
(
    R_WIDTH,  # I_l: the layer's input width
    R_XP,  # ws offset of its gate block (4, B*H)
    R_BIAS,  # ws offset of its tiled bias (4, B*H)
    R_PEEP,  # ws offset of its tiled diagonal peepholes (3, B*H)
    R_MAIN,  # panels offset of [W_ih | W_hh], then 5 dims (4 used by pack_columns panels)
    R_MAIN_D0,
    R_MAIN_D1,
    R_MAIN_D2,
    R_MAIN_D3,
    R_MAIN_D4,
    R_HR,  # W_hr panels: offset and 4 dims
    R_HR_D0,
    R_HR_D1,
    R_HR_D2,
    R_HR_D3,
    R_IFG,  # W_ch[i, f, g] panels: offset and 4 dims
    R_IFG_D0,
    R_IFG_D1,
    R_IFG_D2,
    R_IFG_D3,
    R_O,  # W_ch[o] panels: offset and 4 dims
    R_O_D0,
    R_O_D1,
    R_O_D2,
    R_O_D3,
) = range(25)
_RECORD = 25


@jit
def _panels4(panels, meta, at):
    """The 4-D panels whose offset and dims are meta[at : at + 5]."""
    start = meta[at]
    shape = (meta[at + 1], meta[at + 2], meta[at + 3], meta[at + 4])
    return panels[start : start + shape[0] * shape[1] * shape[2] * shape[3]].reshape(shape)


@jit
def _panels5(panels, meta, at):
    """The 5-D panels whose offset and dims are meta[at : at + 6]."""
    start = meta[at]
    shape = (meta[at + 1], meta[at + 2], meta[at + 3], meta[at + 4], meta[at + 5])
    size = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    return panels[start : start + size].reshape(shape)


@jit
def _advance(out, o_base, o_row, x, x_base, x_row, ws, panels, meta, b0, b1):
    """One step of every layer for rows b0..b1: x rows at x[x_base + b x_row :], the top
    layer's h_t to out[o_base + b o_row :] (both flat); those rows' state in ws moves on
    by one step. Calls for disjoint rows may run at once on separate threads."""
    layers = meta[M_LAYERS]
    batch = meta[M_BATCH]
    hidden = meta[M_HIDDEN]
    out_size = meta[M_OUT]
    one_row = meta[M_ONE_ROW] == 1
    peephole = meta[M_PEEPHOLE]
    has_proj = meta[M_PROJ] == 1
    write_back = peephole == 0 and meta[M_COPY_BIAS] == 0
    units = batch * hidden
    count = b1 - b0
    lo = b0 * hidden
    hi = b1 * hidden
    c_new = ws[meta[M_C_NEW] + lo : meta[M_C_NEW] + hi]
    m_proj = ws[meta[M_M] + lo : meta[M_M] + hi]
    h_all = meta[M_H]
    below = 0  # ws offset of the layer below's new h (all rows)
    for layer in range(layers):
        rec = _HEADER + layer * _RECORD
        width = meta[rec + R_WIDTH]
        depth = width + out_size
        h_at = h_all + layer * batch * out_size
        h = ws[h_at + b0 * out_size : h_at + b1 * out_size]
        c_at = meta[M_C] + layer * units
        c = ws[c_at + lo : c_at + hi]
        xp = ws[meta[rec + R_XP] : meta[rec + R_XP] + 4 * units]
        # This part's rows [x_t | h_{t-1}], at this layer's depth, from b0 times the widest
        # layer's on: a part on another thread may be at another layer meanwhile, whose
        # rows of another depth must not overlap these.
        first_row = meta[M_ROWS] + b0 * meta[M_ROW_STRIDE]
        rows = ws[first_row : first_row + count * depth]
        # Copies are calls of copy1 (vectorised), as in the time loops: written inline over
        # offsets they stayed scalar (measured with the bias, cell and output copies
        # below: a step of B = 16 rows at H = 64 15.6 -> 13.8 us).
        for b in range(b0, b1):
            row = (b - b0) * depth
            if layer == 0:
                start = x_base + b * x_row
                copy1(rows[row : row + width], x[start : start + width])
            else:
                start = below + b * width
                copy1(rows[row : row + width], ws[start : start + width])
            copy1(rows[row + width : row + depth], h[(b - b0) * out_size : (b - b0 + 1) * out_size])
        bias = ws[meta[rec + R_BIAS] : meta[rec + R_BIAS] + 4 * units]
        if not write_back:  # (else the last gate pass left the bias in xp)
            for g in range(4):
                copy1(xp[g * units + lo : g * units + hi], bias[g * units + lo : g * units + hi])
        if one_row:
            main = _panels5(panels, meta, rec + R_MAIN)
            product_one_row(xp, 0, hidden, hidden, rows, main, 0, 0, main.shape[2])
        else:
            main = _panels4(panels, meta, rec + R_MAIN)
            product_abt(xp, lo, units, hidden, hidden, count, rows, 0, main, 0, 4)
        ai = xp[lo:hi]
        af = xp[units + lo : units + hi]
        ag = xp[2 * units + lo : 2 * units + hi]
        ao = xp[3 * units + lo : 3 * units + hi]
        m = m_proj if has_proj else h  # h_{t-1} is in rows already: h may take m
        if peephole == 2:
            product_abt(xp, lo, units, hidden, hidden, count, c, 0,
                        _panels4(panels, meta, rec + R_IFG), 0, 3)  # fmt: skip
            gates_forward_ifg(ai, af, ag, c, c_new)
            product_abt(xp, 3 * units + lo, 0, hidden, hidden, count, c_new, 0,
                        _panels4(panels, meta, rec + R_O), 0, 1)  # fmt: skip
            gates_forward_o(ao, c_new, m)
        elif peephole == 1:
            p_at = meta[rec + R_PEEP]
            p_i = ws[p_at + lo : p_at + hi]
            p_f = ws[p_at + units + lo : p_at + units + hi]
            p_o = ws[p_at + 2 * units + lo : p_at + 2 * units + hi]
            gates_forward_diagonal(ai, af, ag, ao, c, c_new, m, p_i, p_f, p_o)
        elif write_back:
            gates_forward_reset(ai, af, ag, ao, c, c_new, m, bias.reshape((4, units)))
        else:
            gates_forward(ai, af, ag, ao, c, c_new, m)
        copy1(c, c_new)
        if has_proj:
            for q in range(count * out_size):
                h[q] = 0
            product_abt(h, 0, 0, out_size, out_size, count, m_proj, 0,
                        _panels4(panels, meta, rec + R_HR), 0, 1)  # fmt: skip
        below = h_at
    for b in range(b0, b1):
        start = o_base + b * o_row
        copy1(out[start : start + out_size], ws[below + b * out_size : below + (b + 1) * out_size])


@jit
def stream_step(out, x, ws, panels, meta):
    """One step: x (B, I) or (I,) when B = 1, C-contiguous; out (B, P) or (P,)."""
    _advance(out.reshape(out.size), 0, meta[M_OUT], x.reshape(x.size), 0, x.shape[x.ndim - 1],
             ws, panels, meta, 0, meta[M_BATCH])  # fmt: skip


@jit
def stream_step_rows(out, x, ws, panels, meta, b0, b1):
    """:func:`stream_step` for rows b0..b1 only (a thread's share; the stream's meta must
    say M_COPY_BIAS)."""
    _advance(out.reshape(out.size), 0, meta[M_OUT], x.reshape(x.size), 0, x.shape[x.ndim - 1],
             ws, panels, meta, b0, b1)  # fmt: skip


@jit
def stream_chunk(out, x, ws, panels, meta, steps, x_step, x_row, o_step, o_row):
    """``steps`` steps: row b of step t at x.flat[t x_step + b x_row], its output at
    out.flat[t o_step + b o_row] (time-major, batch-first or one sequence alike)."""
    x_flat = x.reshape(x.size)
    o_flat = out.reshape(out.size)
    for t in range(steps):
        _advance(o_flat, t * o_step, o_row, x_flat, t * x_step, x_row, ws, panels, meta,
                 0, meta[M_BATCH])  # fmt: skip
