"""Products over packed weights: the register tile run over every panel and row block.

- :func:`product_abt`: C += A W^T, output in the time loops' gate-major layout (or a
  plain row-major array), W from :func:`fastlstm._kernels.packing.pack_columns`;
- :func:`product_ab`: C += A W with W from ``pack_rows`` (the backward loop);
- :func:`product_one_row`, :func:`product_one_row_back`: a batch of one row, a chunk of
  ROW_VECTORS vectors at a time (independent accumulator chains);
- :func:`project_unit_chunks`: a one-row batch's input projection over every step, for
  a thread's own hidden units.

The public helpers flatten their arrays and pass integers as np.intp, so that each
compiled product (``_product_*``) has one signature per dtype.
"""

from __future__ import annotations

import numpy as np

from fastlstm._config import jit
from fastlstm._kernels.packing import vector_count
from fastlstm._kernels.tiles import (
    MIXES_PROJECTION,
    ROWS,
    lanes_of,
    row_blocks,
    row_tile,
    row_tile_mixed,
    shares_vectors,
    tile,
    tile_paired,
)


@jit(inline=True)
def product_abt(c, c_base, c_block_stride, ldc, width, rows, a, a_base, packed, d, blocks):
    """C += A W_d^T; see :func:`_product_abt`."""
    _product_abt(
        c.reshape(c.size), np.intp(c_base), np.intp(c_block_stride), np.intp(ldc),
        np.intp(width), np.intp(rows), a.reshape(a.size), np.intp(a_base), packed, np.intp(d),
        np.intp(blocks),
    )  # fmt: skip


@jit
def _product_abt(flat, c_base, c_block_stride, ldc, width, rows, a_flat, a_base, packed, d, blocks):
    """C += A W_d^T with W packed by :func:`pack_columns` (``blocks`` blocks of ``width``).

    A's row r is a_flat[a_base + r K : a_base + (r + 1) K] (K = the panels' depth).
    Output block g's row r, column u is flat[c_base + g c_block_stride + r ldc + u]: the
    gate-major layout of the time loops (blocks are gates) or a plain row-major array (one
    block). Vectors past a block's end are masked in the tile: nothing else is touched.
    Blocks of at most half a vector share vectors (as packed; see
    :func:`fastlstm._kernels.tiles.shares_vectors`).
    """
    inner = packed.shape[2]
    lanes = lanes_of(a_flat)
    panel_width = 2 * lanes
    b_flat = packed.reshape(packed.size)
    panels = packed.shape[1]
    count, base, extra = row_blocks(rows)
    # Vector q holds block q // per_block, columns (q % per_block) lanes onward; or, when
    # blocks share vectors, blocks 2q (lanes [0, width)) and 2q + 1 (lanes [width,
    # 2 width), addressed from that block's start less width). One call of the tile
    # below for both (the tile is compiled into each caller: one copy, not two).
    paired = shares_vectors(blocks, width, lanes)
    per_block = (width + lanes - 1) // lanes
    count_vectors = vector_count(blocks, width, lanes)
    split = width if paired else 0
    for p in range(panels):
        q0 = 2 * p
        if paired:
            off0 = c_base + 2 * q0 * c_block_stride
            valid0 = width
        else:
            block0 = q0 // per_block
            col0 = (q0 - block0 * per_block) * lanes
            off0 = c_base + block0 * c_block_stride + col0
            valid0 = min(lanes, width - col0)
        off1 = off0
        valid1 = 0  # an odd count's last panel has one vector
        if q0 + 1 < count_vectors:
            if paired:
                off1 = off0 + 2 * c_block_stride
                valid1 = width
            else:
                block1 = (q0 + 1) // per_block
                col1 = (q0 + 1 - block1 * per_block) * lanes
                off1 = c_base + block1 * c_block_stride + col1
                valid1 = min(lanes, width - col1)
        b_off = (d * panels + p) * inner * panel_width
        ahead = b_off + inner * panel_width if p + 1 < panels else b_off
        for i in range(count):
            r0 = i * base + min(i, extra)
            block = base + (1 if i < extra else 0)
            shift = r0 * ldc
            tile_paired(
                flat, off0 + shift, off1 + shift, ldc, a_flat, a_base + r0 * inner, inner,
                b_flat, b_off, panel_width, inner, block, valid0, valid1, ahead, split,
                off0 + shift + c_block_stride - width, off1 + shift + c_block_stride - width,
            )  # fmt: skip


@jit(inline=True)
def product_ab(c, rows, a, a_base, a_block_stride, lda, kc, packed, d, k_first, blocks):
    """C += sum over blocks of A_g W_d[...]; see :func:`_product_ab`."""
    product_ab_panels(c, rows, a, a_base, a_block_stride, lda, kc, packed, d, k_first, blocks,
                      0, packed.shape[1])  # fmt: skip


@jit(inline=True)
def product_ab_panels(
    c, rows, a, a_base, a_block_stride, lda, kc, packed, d, k_first, blocks, p_first, p_end
):  # fmt: skip
    """:func:`product_ab` for C's columns of panels p_first..p_end-1 alone (two vectors of
    columns each); the other columns are neither read nor written."""
    _product_ab(
        c.reshape(c.size), np.intp(c.shape[1]), np.intp(rows), a.reshape(a.size),
        np.intp(a_base), np.intp(a_block_stride), np.intp(lda), np.intp(kc), packed,
        np.intp(d), np.intp(k_first), np.intp(blocks), np.intp(p_first), np.intp(p_end),
    )  # fmt: skip


@jit
def _product_ab(c_flat, width, rows, a_flat, a_base, a_block_stride, lda, kc, packed, d, k_first,
                blocks, p_first, p_end):  # fmt: skip
    """C += sum over blocks g of A_g W_d[k_first + g kc : ..., :] with W packed by
    :func:`pack_rows`, for the columns of panels p_first..p_end-1.

    C (rows, width) C-contiguous, flat. A_g's row r, column u is a_flat[a_base + g
    a_block_stride + r lda + u] (u < kc): the gate-major dL/da of the time loops, block by
    block. Columns past C's width are masked in the tile.
    """
    lanes = lanes_of(c_flat)
    panel_width = 2 * lanes
    panels = packed.shape[1]
    inner = packed.shape[2]
    count, base, extra = row_blocks(rows)
    b_flat = packed.reshape(packed.size)
    for p in range(p_first, p_end):
        col0 = 2 * p * lanes
        valid0 = min(lanes, width - col0)
        valid1 = max(0, min(lanes, width - col0 - lanes))
        panel = (d * panels + p) * inner * panel_width
        following = panel + inner * panel_width if p + 1 < panels else panel
        for g in range(blocks):
            a_off = a_base + g * a_block_stride
            b_off = panel + (k_first + g * kc) * panel_width
            ahead = following + (k_first + g * kc) * panel_width
            for i in range(count):
                r0 = i * base + min(i, extra)
                block = base + (1 if i < extra else 0)
                c_off = r0 * width + col0
                tile(c_flat, c_off, c_off + lanes, width, a_flat, a_off + r0 * lda, lda,
                     b_flat, b_off, panel_width, kc, block, valid0, valid1, ahead)  # fmt: skip


@jit
def project_unit_chunks(xp, x, packed, d, first, end, t0, t1):
    """xp[d, g, t, u] += x[t] W[d, g H + u]^T for steps t0..t1-1 and every gate g, for the
    hidden units u of chunks first..end-1; x (T, K), xp (D, 4, T, H), W packed by
    :func:`pack_units` (the input projection of a batch of one row, a thread's own units).

    The register tile runs over the chunk's vectors two at a time (a panel whose rows are
    ``width`` apart), each over every block of steps while it is in the cache. Each
    element's sum runs over k in order, as in every product here.
    """
    steps, inner = x.shape
    hidden = xp.shape[3]
    chunks = packed.shape[2]
    width = packed.shape[4]
    lanes = lanes_of(x)
    vectors = width // lanes
    gate_stride = steps * hidden
    flat = xp.reshape(xp.size)
    a_flat = x.reshape(x.size)
    b_flat = packed.reshape(packed.size)
    count, base, extra = row_blocks(max(0, t1 - t0))
    for g in range(4):
        for chunk in range(first, end):
            for v in range(0, vectors, 2):
                off0, b_off, valid0, valid1 = _unit_tile(d, g, chunk, v, chunks, inner, width,
                                                         lanes, hidden, gate_stride)  # fmt: skip
                if valid0 <= 0:
                    break
                ahead = b_off + 2 * lanes if v + 2 < vectors else b_off
                for i in range(count):
                    r0 = t0 + i * base + min(i, extra)
                    block = base + (1 if i < extra else 0)
                    shift = r0 * hidden
                    tile(
                        flat, off0 + shift, off0 + lanes + shift, hidden, a_flat, r0 * inner,
                        inner, b_flat, b_off, width, inner, block, valid0, valid1, ahead,
                    )  # fmt: skip


@jit(inline=True)
def _unit_tile(d, g, chunk, v, chunks, inner, width, lanes, hidden, gate_stride):
    """A tile of a one-row batch's input projection (:func:`project_unit_chunks`, and the
    loop's own, :func:`_with_tile`): vectors v and v + 1 of gate g's chunk. Returns the
    offset of its first column in xp at step 0, of its panel in :func:`pack_units`' layout,
    and how many lanes of each vector are units of H (<= 0: none)."""
    col0 = chunk * width + v * lanes
    valid0 = min(lanes, hidden - col0)
    valid1 = max(0, min(lanes, hidden - col0 - lanes)) if v + 1 < width // lanes else 0
    b_off = ((d * 4 + g) * chunks + chunk) * inner * width + v * lanes
    return (d * 4 + g) * gate_stride + col0, b_off, valid0, valid1


@jit(inline=True)
def product_one_row(xp, base, gate_stride, hidden, h, packed, d, first, end):
    """xp.flat[base + g gate_stride + u] += sum_k h[k] W_hh[d, g H + u, k] for the hidden
    units u of chunks first..end-1 and every gate g; h (P,), packed from :func:`pack_units`.
    Flattens and passes on, as :func:`product_abt`."""
    _product_one_row(
        xp.reshape(xp.size), np.intp(base), np.intp(gate_stride), np.intp(hidden), h, packed,
        np.intp(d), np.intp(first), np.intp(end),
    )  # fmt: skip


@jit
def _product_one_row(flat, base, gate_stride, hidden, h, packed, d, first, end):
    """:func:`product_one_row` on the flat gate array."""
    inner = h.shape[0]
    width = packed.shape[4]
    chunks = packed.shape[2]
    b_flat = packed.reshape(packed.size)
    for g in range(4):
        for chunk in range(first, end):
            off = base + g * gate_stride + chunk * width
            b_off = ((d * 4 + g) * chunks + chunk) * inner * width
            valid = min(width, hidden - chunk * width)  # a part-valid chunk is masked
            row_tile(flat, off, 0, h, 0, 0, b_flat, b_off, width, inner, valid)


@jit(inline=True)
def projected_in_loop(run, d):
    """Steps t_lo..t_hi-1 whose input projection :func:`layer_forward_one_row` runs alongside
    its products, ROWS at a time (a block during the block before it in the loop's order),
    on CPUs whose registers hold both tiles (MIXES_PROJECTION): every whole block of the
    run's steps but the first, in the loop's order (the reverse direction's from the end).
    t_lo == t_hi when none."""
    blocks = run // ROWS if MIXES_PROJECTION else 0
    if blocks < 2:
        return 0, 0
    if d == 1:
        return run - blocks * ROWS, run - ROWS
    return ROWS, blocks * ROWS


@jit(inline=True)
def one_row_step_products(
    xp, base, gate_stride, hidden, h, packed, d, first, end, x, packed_ih, s, t_lo, t_hi,
    cursor, tile_sums,
):  # fmt: skip
    """Step s (in the loop's order) of :func:`fastlstm._kernels.layer_forward_one_row`'s
    products: :func:`product_one_row`, with the next block's projection alongside
    (:func:`product_one_row_projecting`) while that block lies in t_lo..t_hi-1
    (:func:`projected_in_loop`); its tiles are done by the block's last step."""
    block = s // ROWS + 1  # the next block, in the loop's order
    if block * ROWS >= t_hi - t_lo + ROWS:
        product_one_row(xp, base, gate_stride, hidden, h, packed, d, first, end)
        return
    if s % ROWS == 0:
        cursor[0] = 0
        cursor[1] = 0
    t0 = t_lo + (block - 1) * ROWS if d == 0 else t_hi - block * ROWS
    product_one_row_projecting(xp, base, gate_stride, hidden, h, packed, d, first, end, x,
                               packed_ih, t0, cursor, tile_sums, s % ROWS == ROWS - 1)  # fmt: skip


@jit(inline=True)
def product_one_row_projecting(
    xp, base, gate_stride, hidden, h, packed, d, first, end, x, packed_ih, t0, cursor, scratch,
    finish,
):  # fmt: skip
    """:func:`product_one_row`, and alongside it the next pieces of the input projection of
    steps t0..t0+ROWS-1 for the same units (:func:`project_unit_chunks`' sums, as register
    tiles of ROWS steps; packed_ih from :func:`pack_units` of W_ih; x (T, I)): each of the
    row's products takes up to half its length of one tile's k along
    (:func:`fastlstm._kernels.tiles.row_tile_mixed`). ``cursor`` (2,) int64 holds the
    next tile and its next k between calls (zero it for a new block); ``scratch`` (2 ROWS
    vectors) a tile's sums between calls. With ``finish``, the block's tiles still to go
    run alone after the products. The projection must be done before any product of
    those steps; the time loop runs one block's during the block before."""
    _product_one_row_projecting(
        xp.reshape(xp.size), np.intp(base), np.intp(gate_stride), np.intp(hidden), h, packed,
        np.intp(d), np.intp(first), np.intp(end), x.reshape(x.size), np.intp(x.shape[1]),
        packed_ih.reshape(packed_ih.size), np.intp(packed_ih.shape[2]), np.intp(t0), cursor,
        scratch, finish,
    )  # fmt: skip


@jit
def _product_one_row_projecting(
    flat, base, gate_stride, hidden, h, packed, d, first, end, x_flat, width_in, ih_flat,
    chunks, t0, cursor, scratch, finish,
):  # fmt: skip
    """:func:`product_one_row_projecting` on flat arrays."""
    inner = h.shape[0]
    width = packed.shape[4]
    lanes = lanes_of(h)
    pairs = (width // lanes + 1) // 2  # a tile is two vectors of a chunk's ROW_VECTORS
    tiles = 4 * (end - first) * pairs
    b_flat = packed.reshape(packed.size)
    job = (x_flat, width_in, ih_flat, chunks, t0, gate_stride, hidden, d, first, end, scratch)
    rows = 4 * (end - first)  # the row's products: gate-major, then chunk
    j = 0
    # One call site of the mixed tile (each is inlined): the row's products, then with
    # ``finish`` the tiles left, alone (inner = 0).
    while j < rows or finish:
        q = _next_tile(cursor, tiles, first, end, pairs, lanes, width, hidden)
        if j >= rows and q < 0:
            break
        # (past the row's products, j's offsets go unused: the tile runs with inner = 0)
        g, chunk = j // (end - first), first + j % (end - first)
        off = base + g * gate_stride + chunk * width
        b_off = ((d * 4 + g) * chunks + chunk) * inner * width
        valid = min(width, hidden - chunk * width)
        if q < 0:
            row_tile(flat, off, 0, h, 0, 0, b_flat, b_off, width, inner, valid)
        else:
            alone = j >= rows
            k1 = width_in if alone else min(width_in, cursor[1] + inner // 2)
            _with_tile(flat, off, h, b_flat, b_off, width, 0 if alone else inner,
                       0 if alone else valid, job, q, cursor[1], k1)  # fmt: skip
            if k1 < width_in:
                cursor[1] = k1
            else:
                cursor[0] = q + 1
                cursor[1] = 0
        j += 1


@jit(inline=True)
def _next_tile(cursor, tiles, first, end, pairs, lanes, width, hidden):
    """The cursor's projection tile, or the next one with columns inside H (its k from
    zero); -1 when none is left. Tile q is gate q // (chunks x pairs), then chunk, then
    vector pair."""
    q = cursor[0]
    while q < tiles:
        chunk = first + (q // pairs) % (end - first)
        if chunk * width + (q % pairs) * 2 * lanes < hidden:
            return q
        q += 1
        cursor[0] = q
        cursor[1] = 0
    return -1


@jit(inline=True)
def _with_tile(flat, off, h, b_flat, b_off, width, inner, valid, job, q, k0, k1):
    """The row's product (``inner`` = 0: none) with k0..k1-1 of projection tile q of ``job``
    (see :func:`_product_one_row_projecting`)."""
    x_flat, width_in, ih_flat, chunks, t0, gate_stride, hidden, d, first, end, scratch = job
    lanes = lanes_of(h)
    pairs = (width // lanes + 1) // 2
    g = q // ((end - first) * pairs)
    chunk = first + (q // pairs) % (end - first)
    c_off, w_off, valid0, valid1 = _unit_tile(d, g, chunk, 2 * (q % pairs), chunks, width_in,
                                              width, lanes, hidden, gate_stride)  # fmt: skip
    t_off = c_off + t0 * hidden
    row_tile_mixed(
        flat, off, h, b_flat, b_off, width, inner, valid, t_off, t_off + lanes, hidden,
        x_flat, t0 * width_in, width_in, ih_flat, w_off, width, k0, k1, width_in, valid0,
        valid1, scratch,
    )  # fmt: skip


@jit(inline=True)
def product_one_row_back(dh, xp, base, gate_stride, hidden, packed, d, first, end, scratch):
    """dh[q] = sum_g sum_u xp.flat[base + g gate_stride + u] W_hh[d, g H + u, q] for the
    columns q of chunks first..end-1 (overwritten); packed from :func:`pack_units_rows`,
    scratch (one chunk,)."""
    width = packed.shape[3]
    chunks = packed.shape[1]
    gates = packed.shape[2]
    inner = dh.shape[0]
    flat = xp.reshape(xp.size)
    b_flat = packed.reshape(packed.size)
    for chunk in range(first, end):
        col0 = chunk * width
        scratch[:] = 0
        valid = min(width, inner - col0)  # a part-valid chunk: only its own vectors
        for g in range(4):
            b_off = ((d * chunks + chunk) * gates + g * hidden) * width
            a_off = base + g * gate_stride
            row_tile(scratch, 0, 0, flat, a_off, 0, b_flat, b_off, width, hidden, valid)
        for j in range(valid):
            dh[col0 + j] = scratch[j]
