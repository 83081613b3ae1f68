"""The recurrent products of the time loops, with W_hh packed once per call.

Every step multiplies the (rows, P) state by the same W_hh. A BLAS call repacks W_hh on
every step (for 32 x 256 x 1024 in float32, OpenBLAS reached about half of a Zen 3's
peak); here W_hh is packed once per layer call into *panels* of two SIMD vectors of
columns (k-major), and a register-blocked micro-kernel multiplies up to ROWS rows by one
panel: 2 ROWS vector accumulators held in registers, per k one load per vector of the
panel, one broadcast per row and 2 ROWS fused multiply-adds.

The vector width and ROWS come from the CPU (:mod:`fastlstm._cpu`): 64-byte vectors and
8 rows with AVX-512, 32 bytes and 6 rows with AVX2, 16 bytes on other CPUs. One
algorithm, one generator of LLVM IR, a tile per CPU.

The micro-kernel is written in LLVM IR through Numba intrinsics, with LLVM vector types:
loops written in Python keep their accumulators in memory (measured: at most 17 GFLOP/s).
The IR is generic (no x86 intrinsics); LLVM picks the instructions for the target.

Output addressing works for the gate-major layout directly: each of a panel's two
vectors has its own base offset, so a panel may span two gates (small H: one vector per
gate) and the forward product adds straight into ``xp[d, gate, t]`` with no scratch.
Columns are grouped per gate into vectors (padded with zero columns at a gate's end);
the lanes of a vector past a gate's end are masked (neither read nor written), so no
write touches a neighbouring row (which another thread may own).

Each row's sums run over k in the same order whatever the row block, so results do not
depend on how rows are split across threads.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from fastlstm._config import jit
from fastlstm._cpu import VARIANT

VECTOR_BYTES = VARIANT.vector_bytes  # one SIMD register
ROWS = VARIANT.rows  # rows of the register block: 2 ROWS accumulators + 2 panel vectors + 1
# One row (a batch of one): this many vectors at once, so that independent accumulator
# chains hide the multiply-add latency (2 per row would leave the FMA units idle).
ROW_VECTORS = VARIANT.row_vectors
# The fewest rows worth a thread's own chunk of a batch: a block of r rows keeps 2 r FMA
# chains, and two FMA units of 4-5 cycles' latency need about 10 (or ROWS, if fewer).
MIN_CHUNK_ROWS = min(ROWS, 5)


def _lane_mask(builder, lanes: int, valid):
    """<lanes x i1>: lane j is on when j < valid (an i64 value; any, even <= 0 or > lanes)."""
    i64 = ir.IntType(64)
    wide = ir.VectorType(i64, lanes)
    undef = ir.Constant(wide, ir.Undefined)
    first = builder.insert_element(undef, valid, ir.Constant(ir.IntType(32), 0))
    splat = builder.shuffle_vector(
        first, undef, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    )
    return builder.icmp_signed("<", ir.Constant(wide, list(range(lanes))), splat)


def _emit_tile(
    context, builder, sig, args, rows: int, vectors: int, prefetch: bool, valids: list
) -> None:
    """Emit C[r, vector v] += sum_k A[r, k] B[k, vector v] for r < rows at the builder's
    position (arguments as :func:`_tile_any`'s); the builder ends in the tile's last block.

    ``valids[v]`` (an i64 value) is how many lanes of C's vector v exist: the others are
    neither read nor written (masked loads and stores), so a vector past a gate's or a
    row's end never touches a neighbour, which another thread may own."""
    c_arr, c_off0, c_off1, ldc, a_arr, a_off, lda, b_arr, b_off, ldb, kc = args[:11]
    is64 = sig.args[0].dtype == types.float64
    scalar = ir.DoubleType() if is64 else ir.FloatType()
    lanes = VECTOR_BYTES // (8 if is64 else 4)
    vector = ir.VectorType(scalar, lanes)
    align = 8 if is64 else 4
    i64 = ir.IntType(64)
    fma = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vector, [vector] * 3),
        f"llvm.fma.v{lanes}f{64 if is64 else 32}",
    )

    def data(array_type, value):
        return context.make_array(array_type)(context, builder, value).data

    c_ptr, a_ptr, b_ptr = (
        data(sig.args[0], c_arr),
        data(sig.args[4], a_arr),
        data(sig.args[7], b_arr),
    )

    def const(value):
        return ir.Constant(i64, value)

    a_rows = [builder.gep(a_ptr, [builder.add(a_off, builder.mul(lda, const(r)))])
              for r in range(rows)]  # fmt: skip
    b_base = builder.gep(b_ptr, [b_off])
    zero = ir.Constant(vector, [0.0] * lanes)
    undef = ir.Constant(vector, ir.Undefined)
    splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    offsets = [c_off0] + [builder.add(c_off1, const((v - 1) * lanes)) for v in range(1, vectors)]
    entry = builder.block
    loop = builder.append_basic_block(f"tile{rows}x{vectors}.loop")
    done = builder.append_basic_block(f"tile{rows}x{vectors}.done")
    builder.cbranch(builder.icmp_signed(">", kc, const(0)), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(i64)
    acc = [[builder.phi(vector) for _ in range(vectors)] for _ in range(rows)]
    b_row = builder.gep(b_base, [builder.mul(k, ldb)])
    if prefetch:
        ahead = builder.gep(b_ptr, [builder.add(args[11], builder.mul(k, ldb))])
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [i32] * 3),
            "llvm.prefetch.p0",
        )
        # read, keep in every cache level, data cache
        builder.call(
            hint,
            [
                builder.bitcast(ahead, ir.IntType(8).as_pointer()),
                ir.Constant(i32, 0),
                ir.Constant(i32, 3),
                ir.Constant(i32, 1),
            ],
        )
    panel = [
        builder.load(
            builder.bitcast(builder.gep(b_row, [const(v * lanes)]), vector.as_pointer()),
            align=align,
        )
        for v in range(vectors)
    ]
    summed = []
    for r in range(rows):
        value = builder.load(builder.gep(a_rows[r], [k]))
        splat = builder.shuffle_vector(
            builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)),
            undef,
            splat_mask,
        )
        summed.append([builder.call(fma, [splat, panel[v], acc[r][v]])
                       for v in range(vectors)])  # fmt: skip
    k_next = builder.add(k, const(1))
    k.add_incoming(const(0), entry)
    k.add_incoming(k_next, loop)
    for r in range(rows):
        for v in range(vectors):
            acc[r][v].add_incoming(zero, entry)
            acc[r][v].add_incoming(summed[r][v], loop)
    builder.cbranch(builder.icmp_signed("<", k_next, kc), loop, done)

    builder.position_at_end(done)
    totals = [[builder.phi(vector) for _ in range(vectors)] for _ in range(rows)]
    for r in range(rows):  # every phi first: LLVM wants them at the block's top
        for v in range(vectors):
            totals[r][v].add_incoming(zero, entry)
            totals[r][v].add_incoming(summed[r][v], loop)
    bits = 64 if is64 else 32
    mask_type = ir.VectorType(ir.IntType(1), lanes)
    i32 = ir.IntType(32)
    masked_load = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vector, [vector.as_pointer(), i32, mask_type, vector]),
        f"llvm.masked.load.v{lanes}f{bits}.p0",
    )
    masked_store = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [vector, vector.as_pointer(), i32, mask_type]),
        f"llvm.masked.store.v{lanes}f{bits}.p0",
    )
    masks = [_lane_mask(builder, lanes, valids[v]) for v in range(vectors)]
    for r in range(rows):
        for v in range(vectors):
            where = builder.add(offsets[v], builder.mul(ldc, const(r)))
            pointer = builder.bitcast(builder.gep(c_ptr, [where]), vector.as_pointer())
            aligned = ir.Constant(i32, align)
            previous = builder.call(masked_load, [pointer, aligned, masks[v], zero])
            total = builder.fadd(previous, totals[r][v])
            builder.call(masked_store, [total, pointer, aligned, masks[v]])


def _tile_signature(c, a, b, *extra):
    """The tile intrinsics' signature for these arrays, or None (Numba: no match)."""
    if not (c.dtype == a.dtype == b.dtype and c.dtype in (types.float32, types.float64)):
        return None
    index = types.intp
    return types.void(c, index, index, index, a, index, index, b, index, index, index, *extra)


@intrinsic
def _tile_any(
    typingctx, c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1,
    pf_off,
):  # fmt: skip
    """C[r, vector v] += sum_k A[r, k] B[k, vector v] for r < rows (1..ROWS) and the panel's
    two vectors v: one register-blocked loop per row count, chosen by a switch.

    Offsets and strides are in elements of the arrays' own dtype: row r of vector v of C
    starts at c_off_v + r ldc, A[r, k] is at a_off + r lda + k, B[k] (a panel row of two
    SIMD vectors) at b_off + k ldb. Arrays C-contiguous. Only the first valid0 (valid1)
    lanes of C's first (second) vector are read and written: a vector past a gate's end,
    or a panel's absent second vector (valid1 = 0), needs no scratch. Each k also asks the
    cache for b[pf_off + k ldb] (the next panel, while this one is multiplied; pass b_off
    when there is none): weights streamed from memory are then near when their turn comes
    (measured on a Zen 3 at 32 rows x 1024 x 4096: 139 -> 153 GFLOP/s).
    """
    signature = _tile_signature(c, a, b, *(types.intp,) * 4)
    if signature is None:
        return None

    def codegen(context, builder, sig, args):
        after = builder.append_basic_block("tile.after")
        switch = builder.switch(args[11], after)
        tile_args = list(args[:11]) + [args[14]]
        for rows in range(1, ROWS + 1):
            case = builder.append_basic_block(f"tile.case{rows}")
            switch.add_case(ir.Constant(ir.IntType(64), rows), case)
            builder.position_at_end(case)
            _emit_tile(context, builder, sig, tile_args, rows, 2, True, [args[12], args[13]])
            builder.branch(after)
        builder.position_at_end(after)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _row_tile(typingctx, c, c_off0, ldc, a, a_off, lda, b, b_off, ldb, kc, valid):
    """One row by ROW_VECTORS contiguous vectors of C from c_off0 (the one-row kernel), of
    which the first ``valid`` elements exist (the rest neither read nor written); other
    arguments as :func:`_tile_any`'s, no prefetch."""
    if _tile_signature(c, a, b) is None:
        return None
    index = types.intp
    signature = types.void(c, index, index, a, index, index, b, index, index, index, index)

    def codegen(context, builder, sig, args):
        c_arr, c_off0, ldc, a_arr, a_off, lda, b_arr, b_off, ldb, kc, valid = args
        is64 = sig.args[0].dtype == types.float64
        lanes = VECTOR_BYTES // (8 if is64 else 4)
        i64 = ir.IntType(64)
        c_off1 = builder.add(c_off0, ir.Constant(i64, lanes))
        tile_args = [c_arr, c_off0, c_off1, ldc, a_arr, a_off, lda, b_arr, b_off, ldb, kc]
        valids = [builder.sub(valid, ir.Constant(i64, v * lanes)) for v in range(ROW_VECTORS)]
        as_tile = _tile_signature(sig.args[0], sig.args[3], sig.args[6])  # argument positions
        _emit_tile(context, builder, as_tile, tile_args, 1, ROW_VECTORS, False, valids)
        return context.get_dummy_value()

    return signature, codegen


@jit(inline=True)
def row_blocks(rows):
    """(count, base, extra): ``rows`` rows as ``count`` = ceil(rows / ROWS) register blocks,
    the first ``extra`` of base + 1 rows, the rest of ``base``: spread evenly (32 rows, 6 per
    block: 6, 6, 5, 5, 5, 5) rather than full blocks and a small last one (6 x 5 + 2). A
    block of r rows keeps 2r multiply-add chains going, and the FMA units need about 10 to
    stay busy (measured on a Zen 3, two threads: 32 x 1024 x 2048 181 -> 193 GFLOP/s,
    16 x 384 x 1024 173 -> 180). Each row's sums are the same in any block."""
    count = (rows + ROWS - 1) // ROWS
    base = rows // count if count > 0 else 0
    return count, base, rows - base * count


@jit(inline=True)
def tile(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1, pf_off):
    """C[r, v] += A[r, :kc] B[:kc, v] for r < rows (at most ROWS) and a panel's two vectors,
    valid0 and valid1 lanes of them; see :func:`_tile_any`. Integers pass through np.intp
    (see the products below)."""
    _tile(
        c, np.intp(c_off0), np.intp(c_off1), np.intp(ldc), a, np.intp(a_off), np.intp(lda),
        b, np.intp(b_off), np.intp(ldb), np.intp(kc), np.intp(rows), np.intp(valid0),
        np.intp(valid1), np.intp(pf_off),
    )  # fmt: skip


@jit
def _tile(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1, pf_off):
    """:func:`tile`, compiled once per dtype: the tiles' IR is made and optimised once."""
    _tile_any(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1,
              pf_off)  # fmt: skip


@jit(inline=True)
def lanes_of(array):
    """Columns per SIMD vector for the array's dtype."""
    return VECTOR_BYTES // array.itemsize


# ------------------------------------------------------------------------------ packing


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
    ``inner`` rows of one SIMD vector. Whole rows go through the register transpose."""
    k0 = 0
    if valid == lanes:
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
    count = blocks * ((width + lanes - 1) // lanes)
    return (directions, (count + 1) // 2, inner, 2 * lanes)


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
    vectors 2p and 2p + 1, its row k being W[., column, k]. Empty W gives empty panels.
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
    per_block = (width + lanes - 1) // lanes
    count = blocks * per_block
    panels = packed.shape[1]
    depth = packed.shape[2]
    panel_width = 2 * lanes
    target = packed.reshape(packed.size)
    source = w.reshape(w.size)
    for d in range(directions):
        for q in range(2 * panels):
            block = q // per_block if per_block > 0 else 0
            col0 = (q - block * per_block) * lanes
            valid = min(lanes, width - col0) if q < count else 0
            t_off = ((d * panels + q // 2) * depth + k_first) * panel_width + (q % 2) * lanes
            s_off = (d * total + block * block_width + first + col0) * inner
            _transpose_rows(target, t_off, panel_width, source, s_off, inner, inner, valid, lanes)


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


# ----------------------------------------------------------------------------- products


# The public products are inlined wrappers: they flatten the arrays and pass every integer
# through np.intp, so each product is compiled once per dtype whatever its callers pass
# (Numba compiles a jit function once per distinct array type and literal integer, and
# links and optimises it again into every caller: measured, five specialisations of the
# forward product took 15 of a first forward's 40 s of compilation).


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
    """
    inner = packed.shape[2]
    lanes = lanes_of(a_flat)
    panel_width = 2 * lanes
    per_block = (width + lanes - 1) // lanes
    b_flat = packed.reshape(packed.size)
    count_vectors = blocks * per_block
    panels = packed.shape[1]
    count, base, extra = row_blocks(rows)
    for p in range(panels):
        q0 = 2 * p
        block0 = q0 // per_block
        col0 = (q0 - block0 * per_block) * lanes
        off0 = c_base + block0 * c_block_stride + col0
        valid0 = min(lanes, width - col0)
        off1 = off0
        valid1 = 0  # an odd count's last panel has one vector
        if q0 + 1 < count_vectors:
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
            tile(flat, off0 + shift, off1 + shift, ldc, a_flat, a_base + r0 * inner, inner,
                 b_flat, b_off, panel_width, inner, block, valid0, valid1, ahead)  # fmt: skip


@jit(inline=True)
def product_ab(c, rows, a, a_base, a_block_stride, lda, kc, packed, d, k_first, blocks):
    """C += sum over blocks of A_g W_d[...]; see :func:`_product_ab`."""
    _product_ab(
        c.reshape(c.size), np.intp(c.shape[1]), np.intp(rows), a.reshape(a.size),
        np.intp(a_base), np.intp(a_block_stride), np.intp(lda), np.intp(kc), packed,
        np.intp(d), np.intp(k_first), np.intp(blocks),
    )  # fmt: skip


@jit
def _product_ab(c_flat, width, rows, a_flat, a_base, a_block_stride, lda, kc, packed, d, k_first,
                blocks):  # fmt: skip
    """C += sum over blocks g of A_g W_d[k_first + g kc : ..., :] with W packed by
    :func:`pack_rows`.

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
    for p in range(panels):
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


# ----------------------------------------------------------------- batch of one row


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


@jit
def project_unit_chunks(xp, x, packed, d, first, end):
    """xp[d, g, t, u] += x[t] W[d, g H + u]^T for every step t and gate g, for the hidden
    units u of chunks first..end-1; x (T, K), xp (D, 4, T, H), W packed by
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
    count, base, extra = row_blocks(steps)
    for g in range(4):
        for chunk in range(first, end):
            b_chunk = ((d * 4 + g) * chunks + chunk) * inner * width
            for v in range(0, vectors, 2):
                col0 = chunk * width + v * lanes
                valid0 = min(lanes, hidden - col0)
                if valid0 <= 0:
                    break
                valid1 = max(0, min(lanes, hidden - col0 - lanes)) if v + 1 < vectors else 0
                off0 = (d * 4 + g) * gate_stride + col0
                b_off = b_chunk + v * lanes
                ahead = b_off + 2 * lanes if v + 2 < vectors else b_off
                for i in range(count):
                    r0 = i * base + min(i, extra)
                    block = base + (1 if i < extra else 0)
                    shift = r0 * hidden
                    tile(
                        flat, off0 + shift, off0 + lanes + shift, hidden, a_flat, r0 * inner,
                        inner, b_flat, b_off, width, inner, block, valid0, valid1, ahead,
                    )  # fmt: skip


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
            _row_tile(flat, off, 0, h, 0, 0, b_flat, b_off, width, inner, valid)


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
        for g in range(4):
            b_off = ((d * chunks + chunk) * gates + g * hidden) * width
            a_off = base + g * gate_stride
            _row_tile(scratch, 0, 0, flat, a_off, 0, b_flat, b_off, width, hidden, width)
        for j in range(min(width, inner - col0)):
            dh[col0 + j] = scratch[j]
