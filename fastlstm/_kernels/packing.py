"""Weights into panels for the micro-kernel, once per layer call (or once per stream).

Panels are k-major: row k of a panel holds one SIMD vector (or two) of output columns of
W, so the tile loads whole vectors per k. Columns are grouped per gate into vectors,
zero-padded at a gate's end. The transposes run in registers (one lanes x lanes block at
a time, :func:`_transpose_block`); every lane of a target is written, so scratch arrays
may hold anything before.

- :func:`pack_columns` (``x W^T`` panels of two vectors; a block per gate),
  :func:`pack_unit_columns` (a thread's share of the hidden units);
- :func:`pack_rows` (``x W`` panels, for the backward loop);
- :func:`pack_units`, :func:`pack_unit_chunks` (a batch of one row: chunks of
  ROW_VECTORS vectors of hidden units) and :func:`pack_units_rows` (its backward).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, register_jitable

from fastlstm._config import jit
from fastlstm._kernels.tiles import ROW_VECTORS, VECTOR_BYTES, lanes_of, shares_vectors


def _shuffle_masks(lanes: int) -> list[list[tuple[int, int, list[int]]]]:
    """The stages of an in-register lanes x lanes transpose as two-input shuffles.

    Each stage maps the previous stage's vectors to new ones: (left, right, mask) picks
    lanes from the concatenation of vector ``left`` and vector ``right``. Eight lanes take
    the classic unpack / shuffle / 128-bit permute sequence and four unpack / 128-bit
    permute (AVX2 does each in one instruction, within 128-bit halves where it can); any
    other power of two takes log2(lanes) rounds of a perfect shuffle (vector i and vector
    i + lanes/2 interleaved, low then high halves), which AVX-512 does in one two-source
    permute each.
    """
    if lanes == 8:
        low, high = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        unpack = [(2 * (i // 2), 2 * (i // 2) + 1, low if i % 2 == 0 else high) for i in range(8)]
        even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        # from (t0, t2): u0 u1; (t1, t3): u2 u3; (t4, t6): u4 u5; (t5, t7): u6 u7
        pairs = [(0, 2), (0, 2), (1, 3), (1, 3), (4, 6), (4, 6), (5, 7), (5, 7)]
        shuffle = [(a, b, even if i % 2 == 0 else odd) for i, (a, b) in enumerate(pairs)]
        first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        # out k < 4 takes the low halves of u_k and u_{k+4}; out k + 4 their high halves
        permute = [(k % 4, k % 4 + 4, first if k < 4 else second) for k in range(8)]
        return [unpack, shuffle, permute]
    if lanes == 4:
        low, high = [0, 4, 2, 6], [1, 5, 3, 7]
        unpack = [(0, 1, low), (0, 1, high), (2, 3, low), (2, 3, high)]
        first, second = [0, 1, 4, 5], [2, 3, 6, 7]
        # out 0: (t0, t2) low halves; out 1: (t1, t3) low; out 2: (t0, t2) high; 3: (t1, t3)
        permute = [(0, 2, first), (1, 3, first), (0, 2, second), (1, 3, second)]
        return [unpack, permute]
    half = lanes // 2
    low = [x for j in range(half) for x in (j, lanes + j)]
    high = [x for j in range(half, lanes) for x in (j, lanes + j)]
    zipped = [(i // 2, i // 2 + half, low if i % 2 == 0 else high) for i in range(lanes)]
    return [zipped] * (lanes.bit_length() - 1)


@intrinsic
def _transpose_block(typingctx, dst, dst_off, ld_dst, src, src_off, ld_src):
    """dst[dst_off + i ld_dst + j] = src[src_off + j ld_src + i] for i, j < lanes: one
    SIMD-width square block transposed in registers (lanes loads, lanes stores)."""
    if not (dst.dtype == src.dtype and dst.dtype in (types.float32, types.float64)):
        return None
    index = types.intp
    signature = types.void(dst, index, index, src, index, index)

    def codegen(context, builder, sig, args):
        dst_arr, dst_off, ld_dst, src_arr, src_off, ld_src = args
        is64 = sig.args[0].dtype == types.float64
        lanes = VECTOR_BYTES // (8 if is64 else 4)
        vector = ir.VectorType(ir.DoubleType() if is64 else ir.FloatType(), lanes)
        align = 8 if is64 else 4
        i64 = ir.IntType(64)
        dst_ptr = context.make_array(sig.args[0])(context, builder, dst_arr).data
        src_ptr = context.make_array(sig.args[3])(context, builder, src_arr).data

        def at(pointer, offset, stride, row):
            where = builder.add(offset, builder.mul(stride, ir.Constant(i64, row)))
            return builder.bitcast(builder.gep(pointer, [where]), vector.as_pointer())

        values = [builder.load(at(src_ptr, src_off, ld_src, j), align=align) for j in range(lanes)]
        for stage in _shuffle_masks(lanes):
            values = [
                builder.shuffle_vector(
                    values[left],
                    values[right],
                    ir.Constant(ir.VectorType(ir.IntType(32), lanes), mask),
                )
                for left, right, mask in stage
            ]
        for i in range(lanes):
            builder.store(values[i], at(dst_ptr, dst_off, ld_dst, i), align=align)
        return context.get_dummy_value()

    return signature, codegen


@jit(inline=True)
def _transpose_rows(target, t_off, ld_target, source, s_off, ld_source, inner, valid, lanes):
    """target[t_off + k ld_target + j] = source[s_off + j ld_source + k] for k < inner and
    j < lanes (zero for j >= valid): ``valid`` rows of W, each ``inner`` long, become
    ``inner`` rows of one SIMD vector (or of its last ``lanes`` lanes). Whole rows of a
    whole vector go through the register transpose."""
    k0 = 0
    if valid == lanes and lanes == lanes_of(target):
        while k0 + lanes <= inner:
            _transpose_block(
                target, t_off + k0 * ld_target, ld_target, source, s_off + k0, ld_source
            )
            k0 += lanes
    for k in range(k0, inner):
        for j in range(valid):
            target[t_off + k * ld_target + j] = source[s_off + j * ld_source + k]
        for j in range(valid, lanes):
            target[t_off + k * ld_target + j] = 0


@intrinsic
def _move_vector(typingctx, dst, dst_off, src, src_off):
    """dst[dst_off : dst_off + lanes] = src[src_off : src_off + lanes]: one SIMD load and
    store (a copy loop of a runtime length gets LLVM's alias checks on every call)."""
    if not (dst.dtype == src.dtype and dst.dtype in (types.float32, types.float64)):
        return None
    signature = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, sig, args):
        dst_arr, dst_off, src_arr, src_off = args
        is64 = sig.args[0].dtype == types.float64
        vector = ir.VectorType(
            ir.DoubleType() if is64 else ir.FloatType(), VECTOR_BYTES // (8 if is64 else 4)
        )
        dst_ptr = context.make_array(sig.args[0])(context, builder, dst_arr).data
        src_ptr = context.make_array(sig.args[2])(context, builder, src_arr).data
        load = builder.bitcast(builder.gep(src_ptr, [src_off]), vector.as_pointer())
        store = builder.bitcast(builder.gep(dst_ptr, [dst_off]), vector.as_pointer())
        builder.store(builder.load(load, align=8 if is64 else 4), store, align=8 if is64 else 4)
        return context.get_dummy_value()

    return signature, codegen


@jit(inline=True)
def copy_rows(target, t_off, ld_target, source, s_off, ld_source, rows, valid, width, lanes):
    """target[t_off + r ld_target + j] = source[s_off + r ld_source + j] for r < rows and
    j < width (zero for j >= valid); whole vectors of valid lanes are moved as vectors."""
    whole = valid // lanes * lanes
    for r in range(rows):
        t_row = t_off + r * ld_target
        s_row = s_off + r * ld_source
        for j in range(0, whole, lanes):
            _move_vector(target, t_row + j, source, s_row + j)
        for j in range(whole, valid):
            target[t_row + j] = source[s_row + j]
        for j in range(valid, width):
            target[t_row + j] = 0


def columns_shape(w_shape: tuple, blocks: int, itemsize: int) -> tuple:
    """The shape :func:`pack_columns` fills for W of ``w_shape`` (D, blocks*N, K)."""
    directions, total, inner = w_shape
    lanes = VECTOR_BYTES // itemsize
    width = total // blocks if blocks > 0 else 0
    return (directions, (vector_count(blocks, width, lanes) + 1) // 2, inner, 2 * lanes)


@register_jitable
def vector_count(blocks, width, lanes):
    """How many vectors x W^T panels hold for ``blocks`` blocks of ``width`` columns: two
    blocks a vector when :func:`shares_vectors`, else ceil(width / lanes) a block."""
    if shares_vectors(blocks, width, lanes):
        return blocks // 2
    return blocks * ((width + lanes - 1) // lanes)


def rows_shape(w_shape: tuple, itemsize: int) -> tuple:
    """The shape :func:`pack_rows` fills for W of ``w_shape`` (D, K, N)."""
    directions, inner, width = w_shape
    panel_width = 2 * (VECTOR_BYTES // itemsize)
    return (directions, (width + panel_width - 1) // panel_width, inner, panel_width)


@jit
def pack_columns(packed, w, blocks, k_first):
    """Fill ``packed`` (:func:`columns_shape`) with W (D, blocks*N, K) as panels
    (D, panels, K, 2 lanes) for products x W^T, at panel rows k_first..k_first+K-1 (so
    that [W_1 | W_2] along K are two calls on one array of depth K_1 + K_2).

    The N output columns of each block (a gate) are grouped into vectors of ``lanes``
    (per_block = ceil(N / lanes) vectors per block, the last one zero-padded); vector q
    holds block q // per_block, columns (q % per_block) * lanes onward; panel p holds
    vectors 2p and 2p + 1, its row k being W[., column, k]. Blocks of at most half a
    vector go two to a vector instead (:func:`fastlstm._kernels.tiles.shares_vectors`):
    vector q holds block 2q in lanes [0, N) and block 2q + 1 in [N, 2N). Empty W gives
    empty panels.
    Every lane is written (zero past a block's end and in an odd count's last vector), so
    ``packed`` may hold anything before.
    """
    total = w.shape[1]
    _pack_blocks(packed, w, blocks, k_first, 0, total // blocks if blocks > 0 else 0)


@jit
def pack_unit_columns(packed, w, first, units):
    """:func:`pack_columns` of the four gate blocks' columns first..first+units-1 only (a
    thread's share of the hidden units); ``packed`` shaped by :func:`columns_shape` of
    (D, 4 units, K)."""
    _pack_blocks(packed, w, 4, 0, first, units)


@jit(inline=True)
def _pack_blocks(packed, w, blocks, k_first, first, width):
    """Columns first..first+width-1 of each of the ``blocks`` blocks of W as panels."""
    directions, total, inner = w.shape
    block_width = total // blocks if blocks > 0 else 0
    lanes = lanes_of(w)
    panels = packed.shape[1]
    depth = packed.shape[2]
    panel_width = 2 * lanes
    target = packed.reshape(packed.size)
    source = w.reshape(w.size)
    paired = shares_vectors(blocks, width, lanes)
    # Vector q holds block q // per_block, or blocks 2q and 2q + 1 when paired.
    per_block = (width + lanes - 1) // lanes
    count = vector_count(blocks, width, lanes)
    for d in range(directions):
        for q in range(2 * panels):
            t_off = ((d * panels + q // 2) * depth + k_first) * panel_width + (q % 2) * lanes
            if paired:
                s_off = (d * total + 2 * q * block_width + first) * inner
                valid = width if q < count else 0
            else:
                block = q // per_block if per_block > 0 else 0
                col0 = (q - block * per_block) * lanes
                valid = min(lanes, width - col0) if q < count else 0
                s_off = (d * total + block * block_width + first + col0) * inner
            # Paired: the second block's rows go to lanes width onward, zeros after them
            # (one call site: the transposes are compiled once).
            for half in range(2 if paired else 1):
                _transpose_rows(
                    target, t_off + half * width, panel_width, source,
                    s_off + half * block_width * inner, inner, inner, valid, lanes - half * width,
                )  # fmt: skip


@jit
def pack_rows(packed, w):
    """Fill ``packed`` (:func:`rows_shape`) with W (D, K, N) as panels (D, panels, K,
    2 lanes) for products x W: vectors over N, zero past N."""
    directions, inner, width = w.shape
    panel_width = packed.shape[3]
    panels = packed.shape[1]
    lanes = lanes_of(w)
    target = packed.reshape(packed.size)
    source = w.reshape(w.size)
    rows_per_block = 64  # a block of W's rows is read once, each panel's part written once
    for d in range(directions):
        for k0 in range(0, inner, rows_per_block):
            rows = min(inner, k0 + rows_per_block) - k0
            for p in range(panels):
                col0 = p * panel_width
                valid = min(panel_width, width - col0)
                t_off = ((d * panels + p) * inner + k0) * panel_width
                s_off = (d * inner + k0) * width + col0
                copy_rows(target, t_off, panel_width, source, s_off, width, rows, valid,
                           panel_width, lanes)  # fmt: skip


def units_shape(w_shape: tuple, itemsize: int) -> tuple:
    """The shape :func:`pack_units` fills for W_hh of ``w_shape`` (D, 4H, P)."""
    directions, gates, inner = w_shape
    width = ROW_VECTORS * (VECTOR_BYTES // itemsize)
    hidden = gates // 4
    return (directions, 4, (hidden + width - 1) // width, inner, width)


@jit
def pack_units(packed, w):
    """Fill ``packed`` (:func:`units_shape`) with W (D, 4H, P) for the one-row product:
    packed[d, g, chunk, k, j] = W[d, g H + chunk width + j, k], zero past H. A chunk is
    ROW_VECTORS vectors of hidden units; threads of one direction own chunk ranges."""
    for d in range(w.shape[0]):
        pack_unit_chunks(packed, w, d, 0, packed.shape[2])


@jit
def pack_unit_chunks(packed, w, d, first, end):
    """:func:`pack_units` of direction d, chunks first..end-1 only: a thread packs the
    chunks it multiplies by, so they are in its own core's cache when the loop starts."""
    gates, inner = w.shape[1], w.shape[2]
    hidden = gates // 4
    chunks = packed.shape[2]
    width = packed.shape[4]
    lanes = lanes_of(w)
    target = packed.reshape(packed.size)
    source = w.reshape(w.size)
    for g in range(4):
        for chunk in range(first, end):
            base = ((d * 4 + g) * chunks + chunk) * inner * width
            for v in range(width // lanes):
                unit = chunk * width + v * lanes
                valid = max(0, min(lanes, hidden - unit))
                s_off = (d * gates + g * hidden + unit) * inner
                _transpose_rows(target, base + v * lanes, width, source, s_off, inner, inner,
                                valid, lanes)  # fmt: skip


def units_rows_shape(w_shape: tuple, itemsize: int) -> tuple:
    """The shape :func:`pack_units_rows` fills for W_hh of ``w_shape`` (D, 4H, P)."""
    directions, gates, inner = w_shape
    width = ROW_VECTORS * (VECTOR_BYTES // itemsize)
    return (directions, (inner + width - 1) // width, gates, width)


@jit
def pack_units_rows(packed, w):
    """Fill ``packed`` (:func:`units_rows_shape`) with W (D, 4H, P) for the one-row backward
    product dA W: packed[d, chunk, n, j] = W[d, n, chunk width + j], zero past P."""
    directions, gates, inner = w.shape
    chunks = packed.shape[1]
    width = packed.shape[3]
    lanes = lanes_of(w)
    target = packed.reshape(packed.size)
    source = w.reshape(w.size)
    for d in range(directions):
        for chunk in range(chunks):
            first = chunk * width
            t_off = (d * chunks + chunk) * gates * width
            copy_rows(target, t_off, width, source, d * gates * inner + first, inner, gates,
                       min(width, inner - first), width, lanes)  # fmt: skip
