"""Parts of the time loops run alone, for the profiler's split of a loop into phases."""

from __future__ import annotations

import numpy as np

from fastlstm._config import jit
from fastlstm._kernels.products import one_row_step_products, product_abt, projected_in_loop
from fastlstm._kernels.tiles import ROWS, lanes_of


@jit
def one_row_products_only(xp, h, packed, x, packed_ih, first, end):
    """The one-row loop's products alone (for the profiler): for each of T steps, what one
    task of :func:`layer_forward_one_row` multiplies, hidden chunks first..end-1 of
    direction 0, with the input projection it runs alongside (:func:`projected_in_loop`);
    xp (1, 4, T, H), h (P,), x (T, I), packed and packed_ih from pack_units of W_hh and
    W_ih."""
    steps, hidden = xp.shape[2], xp.shape[3]
    t_lo, t_hi = projected_in_loop(steps, 0)
    cursor = np.zeros(2, np.int64)
    tile_sums = np.empty(2 * ROWS * lanes_of(xp), dtype=xp.dtype)
    for s in range(steps):
        one_row_step_products(xp, s * hidden, steps * hidden, hidden, h, packed, 0, first, end,
                              x, packed_ih, s, t_lo, t_hi, cursor, tile_sums)  # fmt: skip


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
