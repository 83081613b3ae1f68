"""Parts of the time loops run alone, for the profiler's split of a loop into phases."""

from __future__ import annotations

from fastlstm._config import jit
from fastlstm._kernels.products import product_abt, product_one_row


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
