"""The micro-kernel's packers against plain NumPy: every lane of the target written
(targets start as NaN), whole SIMD blocks (register transposes, vector moves) and the
scalar remainders (sizes that are not multiples of a vector), both dtypes."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from fastlstm._kernels import packing, products, tiles

DTYPES = [np.float32, np.float64]


def lanes(dtype) -> int:
    return tiles.VECTOR_BYTES // np.dtype(dtype).itemsize


def expected_columns(w: np.ndarray, blocks: int) -> np.ndarray:
    directions, total, inner = w.shape
    width = total // blocks
    per_block = -(-width // lanes(w.dtype))
    out = np.zeros(packing.columns_shape(w.shape, blocks, w.itemsize), w.dtype)
    if 0 < 2 * width <= lanes(w.dtype) and blocks % 4 == 0:  # two gates a vector
        for d in range(directions):
            for q in range(blocks // 2):
                half = (q % 2) * lanes(w.dtype)
                for part in range(2):
                    first = (2 * q + part) * width
                    lanes_at = half + part * width
                    out[d, q // 2, :, lanes_at : lanes_at + width] = w[d, first : first + width].T
        return out
    for d in range(directions):
        for q in range(blocks * per_block):
            block, col0 = divmod(q, per_block)
            col0 *= lanes(w.dtype)
            valid = min(lanes(w.dtype), width - col0)
            first = block * width + col0
            half = (q % 2) * lanes(w.dtype)
            out[d, q // 2, :, half : half + valid] = w[d, first : first + valid].T
    return out


def expected_units(w: np.ndarray) -> np.ndarray:
    directions, gates, _ = w.shape
    hidden = gates // 4
    out = np.zeros(packing.units_shape(w.shape, w.itemsize), w.dtype)
    width = out.shape[4]
    for d in range(directions):
        for g in range(4):
            for chunk in range(out.shape[2]):
                valid = min(width, hidden - chunk * width)
                first = g * hidden + chunk * width
                out[d, g, chunk, :, :valid] = w[d, first : first + valid].T
    return out


def expected_rows(w: np.ndarray) -> np.ndarray:
    out = np.zeros(packing.rows_shape(w.shape, w.itemsize), w.dtype)
    panel_width = out.shape[3]
    for p in range(out.shape[1]):
        valid = min(panel_width, w.shape[2] - p * panel_width)
        out[:, p, :, :valid] = w[:, :, p * panel_width : p * panel_width + valid]
    return out


def expected_units_rows(w: np.ndarray) -> np.ndarray:
    out = np.zeros(packing.units_rows_shape(w.shape, w.itemsize), w.dtype)
    width = out.shape[3]
    for chunk in range(out.shape[1]):
        valid = min(width, w.shape[2] - chunk * width)
        out[:, chunk, :, :valid] = w[:, :, chunk * width : chunk * width + valid]
    return out


def packed_by(pack, shape: tuple, w: np.ndarray, *extra) -> np.ndarray:
    target = np.full(shape, np.nan, w.dtype)  # every lane must be written
    pack(target, w, *extra)
    return target


# (directions, hidden, inner): tiny, a gate narrower than a vector, vector multiples with
# whole transposed blocks, odd remainders on both axes, and empty axes.
SIZES = [
    (1, 8, 5),
    (2, 13, 17),
    (1, 64, 24),
    (2, 7, 3),
    (1, 20, 16),
    (1, 72, 9),
    (1, 0, 4),
    (1, 5, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("directions", "hidden", "inner"), SIZES)
@pytest.mark.parametrize("blocks", [4, 3, 1])
def test_pack_columns_matches_numpy(dtype, directions, hidden, inner, blocks):
    rng = np.random.default_rng(hidden * 31 + inner)
    w = rng.standard_normal((directions, blocks * hidden, inner)).astype(dtype)
    shape = packing.columns_shape(w.shape, blocks, w.itemsize)
    assert np.array_equal(
        packed_by(packing.pack_columns, shape, w, blocks, 0), expected_columns(w, blocks)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hidden", "width", "out_size"), [(8, 5, 8), (13, 17, 13), (20, 16, 7)])
def test_stacked_panels_are_both_matrices_along_k(dtype, hidden, width, out_size):
    """[W_ih | W_hh] packed by two calls at k offsets 0 and I: the panels of the stacked
    matrix, every lane written."""
    rng = np.random.default_rng(hidden)
    w_ih = rng.standard_normal((2, 4 * hidden, width)).astype(dtype)
    w_hh = rng.standard_normal((2, 4 * hidden, out_size)).astype(dtype)
    stacked = np.concatenate([w_ih, w_hh], axis=2)
    shape = packing.columns_shape(stacked.shape, 4, stacked.itemsize)
    target = np.full(shape, np.nan, dtype)
    packing.pack_columns(target, w_ih, 4, 0)
    packing.pack_columns(target, w_hh, 4, width)
    assert np.array_equal(target, expected_columns(stacked, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("directions", "hidden", "inner"), SIZES)
def test_pack_units_matches_numpy(dtype, directions, hidden, inner):
    rng = np.random.default_rng(hidden * 7 + inner)
    w = rng.standard_normal((directions, 4 * hidden, inner)).astype(dtype)
    shape = packing.units_shape(w.shape, w.itemsize)
    assert np.array_equal(packed_by(packing.pack_units, shape, w), expected_units(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("directions", "hidden", "inner"), SIZES)
def test_pack_rows_match_numpy(dtype, directions, hidden, inner):
    rng = np.random.default_rng(hidden * 5 + inner)
    w = rng.standard_normal((directions, 4 * hidden, inner)).astype(dtype)
    rows = packed_by(packing.pack_rows, packing.rows_shape(w.shape, w.itemsize), w)
    assert np.array_equal(rows, expected_rows(w))
    shape = packing.units_rows_shape(w.shape, w.itemsize)
    assert np.array_equal(packed_by(packing.pack_units_rows, shape, w), expected_units_rows(w))


def chunk_width(dtype) -> int:
    return packing.units_shape((1, 4, 1), np.dtype(dtype).itemsize)[4]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unit_chunks_writes_only_its_direction_and_chunks(dtype):
    """A thread's share of pack_units: direction d, chunks first..end-1 (here the middle and
    the part-valid last of three), as pack_units packs them; nothing else touched."""
    rng = np.random.default_rng(3)
    hidden = 2 * chunk_width(dtype) + 3
    w = rng.standard_normal((2, 4 * hidden, 9)).astype(dtype)
    target = np.full(packing.units_shape(w.shape, w.itemsize), np.nan, dtype)
    packing.pack_unit_chunks(target, w, 1, 1, 3)
    expected = expected_units(w)
    assert np.array_equal(target[1, :, 1:3], expected[1, :, 1:3])
    assert np.isnan(target[0]).all() and np.isnan(target[1, :, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [1, 13, 40])
@pytest.mark.parametrize("some_steps", [False, True])
def test_project_unit_chunks_adds_the_input_projection_of_its_units(dtype, steps, some_steps):
    """xp[d, g, t, u] += x_t W[d, g H + u]^T for the units of the chunks asked (the second,
    part-valid one of two here) in direction d, for the steps asked (all, or a middle
    run: row blocks of every size), nothing else touched."""
    rng = np.random.default_rng(steps)
    t0, t1 = (steps // 3, steps - steps // 4) if some_steps else (0, steps)
    width = chunk_width(dtype)
    hidden, inner = width + 5, 21
    w = rng.standard_normal((2, 4 * hidden, inner)).astype(dtype)
    x = rng.standard_normal((steps, inner)).astype(dtype)
    packed = np.empty(packing.units_shape(w.shape, w.itemsize), dtype)
    packing.pack_units(packed, w)
    before = rng.standard_normal((2, 4, steps, hidden)).astype(dtype)
    xp = before.copy()
    products.project_unit_chunks(xp, x, packed, 1, 1, 2, t0, t1)
    units = slice(width, hidden)
    for g in range(4):
        rows = w[1, g * hidden + width : (g + 1) * hidden]
        expected = before[1, g, t0:t1, units] + x[t0:t1].astype(np.float64) @ rows.T.astype(
            np.float64
        )
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(xp[1, g, t0:t1, units], expected, rtol=tolerance, atol=tolerance)
    untouched = np.ones(xp.shape, bool)
    untouched[1, :, t0:t1, units] = False
    assert np.array_equal(xp[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vectors", [0.5, 1, 1.5, 2, 3.25])
def test_products_add_a_times_w_for_every_row_block_and_width(dtype, vectors):
    """C += A W through the register tile (pack_rows panels), for outputs narrower than one
    vector (the tile's one-vector loop), whole and part-valid panels, and every row count
    of a block; nothing past C's end is written."""
    rng = np.random.default_rng(int(vectors * 4))
    width = max(1, int(vectors * lanes(dtype)))
    inner = 11
    w = rng.standard_normal((1, inner, width)).astype(dtype)
    packed = np.empty(packing.rows_shape(w.shape, w.itemsize), dtype)
    packing.pack_rows(packed, w)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for rows in range(1, 2 * tiles.ROWS + 2):
        a = rng.standard_normal((rows, inner)).astype(dtype)
        buffer = rng.standard_normal(rows * width + 2 * lanes(dtype)).astype(dtype)
        guard = buffer[rows * width :].copy()
        c = buffer[: rows * width].reshape(rows, width)
        expected = c.astype(np.float64) + a.astype(np.float64) @ w[0].astype(np.float64)
        products.product_ab(c, rows, a, 0, 0, inner, inner, packed, 0, 0, 1)
        np.testing.assert_allclose(c, expected, rtol=tolerance, atol=tolerance)
        assert np.array_equal(buffer[rows * width :], guard)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fraction", [1 / 16, 0.25, 0.5, 0.5625, 1, 1.25])
def test_gate_major_products_touch_only_their_gates(dtype, fraction):
    """C += A W^T into four gate blocks (pack_columns panels; blocks of at most half a
    vector share vectors, wider ones do not), for every row count of a block: each gate's
    rows equal NumPy's, and the gaps between and after the blocks are not written."""
    rng = np.random.default_rng(int(fraction * 64))
    width = max(1, int(fraction * lanes(dtype)))
    assert tiles.shares_vectors(4, width, lanes(dtype)) == (2 * width <= lanes(dtype))
    inner = 9
    w = rng.standard_normal((1, 4 * width, inner)).astype(dtype)
    packed = np.empty(packing.columns_shape(w.shape, 4, w.itemsize), dtype)
    packing.pack_columns(packed, w, 4, 0)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for rows in range(1, 2 * tiles.ROWS + 2):
        a = rng.standard_normal((rows, inner)).astype(dtype)
        stride = rows * width + 3  # a gap of 3 after each gate block
        buffer = rng.standard_normal(4 * stride + 2 * lanes(dtype)).astype(dtype)
        before = buffer.copy()
        products.product_abt(buffer, 0, stride, width, width, rows, a, 0, packed, 0, 4)
        product = a.astype(np.float64) @ w[0].astype(np.float64).T
        touched = np.zeros(buffer.shape, bool)
        for g in range(4):
            block = slice(g * stride, g * stride + rows * width)
            expected = before[block].reshape(rows, width) + product[:, g * width : (g + 1) * width]
            np.testing.assert_allclose(
                buffer[block].reshape(rows, width), expected, rtol=tolerance, atol=tolerance
            )
            touched[block] = True
        assert np.array_equal(buffer[~touched], before[~touched])


@numba.njit
def _row_and_tile_apart(c, h, b, ldb, kc, valid, t_offs, ldt, x, x_off, ldx, w, w_off, ldw, kw,
                        valids):  # fmt: skip
    tiles.row_tile(c, 0, 0, h, 0, 0, b, 0, ldb, kc, valid)
    tiles.tile(c, t_offs[0], t_offs[1], ldt, x, x_off, ldx, w, w_off, ldw, kw, tiles.ROWS,
               valids[0], valids[1], w_off)  # fmt: skip


@numba.njit
def _row_and_tile_mixed(c, h, b, ldb, kc, valid, t_offs, ldt, x, x_off, ldx, w, w_off, ldw, kw,
                        valids, k_cuts, scratch):  # fmt: skip
    """The mixed tile over the tile's k cut at k_cuts, the row's product in the first call."""
    for i in range(k_cuts.shape[0] - 1):
        row_k, row_valid = (kc, valid) if i == 0 else (0, 0)
        tiles.row_tile_mixed(c, 0, h, b, 0, ldb, row_k, row_valid, t_offs[0], t_offs[1], ldt,
                             x, x_off, ldx, w, w_off, ldw, k_cuts[i], k_cuts[i + 1], kw,
                             valids[0], valids[1], scratch)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "inner, width_in, cuts",
    [(64, 64, []), (7, 50, [3, 20]), (50, 5, [2]), (0, 9, [4]), (33, 33, [1, 2, 31])],
)
@pytest.mark.parametrize("row_units", ["all but half a vector", "three vectors and two", "one"])
def test_row_tile_mixed_gives_the_bits_of_the_row_and_the_tile_apart(
    dtype, inner, width_in, cuts, row_units
):
    """One row by up to ROW_VECTORS vectors (inner k; each count of valid vectors has its
    own loop) and a ROWS-row tile (width_in k, cut into several calls whose sums wait in
    the scratch) in one loop: the same bits as row_tile and tile called apart, near the
    float64 product, masked lanes untouched."""
    rng = np.random.default_rng(inner + width_in)
    vec = lanes(dtype)
    width = tiles.ROW_VECTORS * vec
    h = rng.standard_normal(max(inner, 1)).astype(dtype)
    b = rng.standard_normal(max(inner, 1) * width).astype(dtype)
    x = rng.standard_normal(3 + tiles.ROWS * width_in).astype(dtype)
    w = rng.standard_normal(width_in * width).astype(dtype)
    ldt = 3 * vec + 5  # the tile's rows overlap none of the row's vectors
    t_offs = np.array([width + 1, width + 1 + vec])
    c = rng.standard_normal(width + 1 + tiles.ROWS * ldt + 2 * vec).astype(dtype)
    valid = {"all but half a vector": width - vec // 2, "three vectors and two": 3 * vec + 2,
             "one": 1}[row_units]  # fmt: skip
    valids = np.array([vec, vec - 3])
    common = (h, b, width, inner, valid, t_offs, ldt, x, 3, width_in, w, 2 * vec, width, width_in,
              valids)  # fmt: skip
    apart = c.copy()
    _row_and_tile_apart(apart, *common)
    mixed = c.copy()
    scratch = np.full(2 * tiles.ROWS * vec, np.nan, dtype)
    _row_and_tile_mixed(mixed, *common, np.array([0, *cuts, width_in]), scratch)
    assert np.array_equal(mixed, apart)
    expected = c.astype(np.float64)
    row = h[:inner].astype(np.float64) @ b[: inner * width].reshape(inner, width)
    expected[:valid] += row[:valid]
    rows = np.stack([x[3 + r * width_in : 3 + (r + 1) * width_in] for r in range(tiles.ROWS)])
    product = rows.astype(np.float64) @ w.reshape(width_in, width)[:, 2 * vec : 4 * vec]
    for r in range(tiles.ROWS):
        for v in range(2):
            start = t_offs[v] + r * ldt
            expected[start : start + valids[v]] += product[r, v * vec : v * vec + valids[v]]
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(mixed, expected, rtol=tolerance, atol=tolerance)
