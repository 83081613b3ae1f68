"""Weight gradients after the backward loop: large products over every step at once.

:func:`weight_gradients` (dW_ih, dW_hh, the bias and dL/dx: BLAS GEMMs, or the register
tile for tiny sizes) and :func:`extra_weight_gradients` (projection and peepholes, only
for models that have them). Layout and sizes: see :mod:`fastlstm._kernels`.
"""

from __future__ import annotations

import numpy as np

from fastlstm._config import MERGED_GRADIENT_MIN_ROWS, MERGED_GRADIENT_NARROW, SMALL_ROW_MACS, jit
from fastlstm._kernels.blas import gemm_ab, gemm_atb
from fastlstm._kernels.gates import add1
from fastlstm._kernels.tiles import ROWS, lanes_of, tile


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
    gradient in one (I + P + 1, 4H) block (padded to whole panels with zeros, then the
    valid part added into the gradients); W_ih^T times dL/da^T gives dx^T.
    """
    rows, width = dx.shape
    hidden = w_ih.shape[1] // 4
    gates = 4 * hidden
    out_size = xh.shape[2] - width
    lanes = lanes_of(dx)
    panel = 2 * lanes
    gates_pad = (gates + panel - 1) // panel * panel
    operands = width + out_size + 1
    da = np.empty((rows, gates_pad), dtype=xp.dtype)
    at = np.empty((operands, rows), dtype=xp.dtype)
    xh_d = xh[d]
    # Each gate's block (rows, H) into its columns, read through its own view: loops over
    # offsets into one flat array ran 8 times slower (38 against 5 us at the seed shape).
    for g in range(4):
        block = xp[d, g].reshape(rows * hidden)
        for row in range(rows):
            for j in range(hidden):
                da[row, g * hidden + j] = block[row * hidden + j]
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
    # dx^T = W_ih^T dL/da^T (direction 0 writes dx, direction 1 adds): the rows run along
    # the panels, all lanes used whatever I is (dL/da W_ih padded I to a whole panel: 32
    # columns for I = 5 at the seed shape, where it took 22 of this kernel's 77 us; with
    # the gather above, the kernel now takes 37). The tile's loads read whole panels, so
    # dL/da^T's rows are padded to them with zeros.
    rows_pad = (rows + panel - 1) // panel * panel
    da_t = np.empty((gates, rows_pad), dtype=xp.dtype)
    for g in range(4):
        block = xp[d, g].reshape(rows * hidden)
        for j in range(hidden):
            for row in range(rows):
                da_t[g * hidden + j, row] = block[row * hidden + j]
            for row in range(rows, rows_pad):
                da_t[g * hidden + j, row] = 0
    w_t = np.empty((width, gates), dtype=xp.dtype)
    for i in range(width):
        for col in range(gates):
            w_t[i, col] = w_ih[d, col, i]
    dx_t = np.zeros((width, rows_pad), dtype=xp.dtype)
    _product_whole_panels(dx_t, w_t, da_t)
    for row in range(rows):
        for i in range(width):
            dx[row, i] = dx_t[i, row] if d == 0 else dx[row, i] + dx_t[i, row]


@jit
def weight_gradients(dx, gw_ih, gw_hh, gbias, xp, x, xh, w_ih, part, parts):
    """After the backward loop: every weight gradient as large products over all steps.

    dW_ih and dW_hh of a gate come from one GEMM dL/da^T [x | h_{t-1}] over xh's rows
    (one wide product runs faster than two narrow ones: OpenBLAS at 3200 x 256 x 384,
    82 GFLOP/s, against 70 and 78 for the 128- and 256-wide halves), from
    MERGED_GRADIENT_MIN_ROWS rows on when x or h is narrower than MERGED_GRADIENT_NARROW.

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
    # Over many rows with x or h narrow: one GEMM per gate into a scratch, then added
    # into dW_ih and dW_hh. Over few rows (a one-row batch: T rows) the adds would cost
    # more than the wider GEMM saves (measured at 150 rows: 1.64 -> 1.74 ms), and with
    # both wide there is nothing to save: two GEMMs accumulate in place.
    merged = (
        not small
        and rows >= MERGED_GRADIENT_MIN_ROWS
        and min(width, out_size) < MERGED_GRADIENT_NARROW
    )
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
                            add1(gw_ih[d, g * hidden + u], both[u, :width])
                            add1(gw_hh[d, g * hidden + u], both[u, width:])
                    else:
                        gemm_atb(gw_ih[d, band], da, xh[d, :, :width], 1.0)  # da^T x
                        gemm_atb(gw_hh[d, band], da, xh[d, :, width:], 1.0)  # da^T h_{t-1}
                    # Row by row, as calls of add1: written inline over 2-D indices the
                    # sum stayed scalar (measured at 3200 x 256: 0.36 against 0.07 ms).
                    bias_band = gbias[d, band]
                    for r in range(rows):
                        add1(bias_band, da[r])
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
