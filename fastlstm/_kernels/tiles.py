"""The micro-kernel: a register-blocked tile generated in LLVM IR for the CPU's vectors.

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
write touches a neighbouring row (which another thread may own). Gates of at most half a
vector share one, two to a vector (:func:`shares_vectors`; each half masked to its own
gate), so that a small H does not leave half of every multiply-add on zero lanes.

Each row's sums run over k in the same order whatever the row block, so results do not
depend on how rows are split across threads.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

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


def _splat_i64(builder, lanes: int, value):
    """<lanes x i64> of one i64 value."""
    wide = ir.VectorType(ir.IntType(64), lanes)
    undef = ir.Constant(wide, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        first, undef, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    )


def _lane_mask(builder, lanes: int, valid):
    """<lanes x i1>: lane j is on when j < valid (an i64 value; any, even <= 0 or > lanes)."""
    numbers = ir.Constant(ir.VectorType(ir.IntType(64), lanes), list(range(lanes)))
    return builder.icmp_signed("<", numbers, _splat_i64(builder, lanes, valid))


def _lane_range(builder, lanes: int, start, stop):
    """<lanes x i1>: lane j is on when start <= j < stop (i64 values)."""
    numbers = ir.Constant(ir.VectorType(ir.IntType(64), lanes), list(range(lanes)))
    return builder.and_(
        builder.icmp_signed(">=", numbers, _splat_i64(builder, lanes, start)),
        builder.icmp_signed("<", numbers, _splat_i64(builder, lanes, stop)),
    )


def _emit_tile(
    context, builder, sig, args, rows: int, vectors: int, prefetch: bool, valids: list,
    pairs: tuple | None = None,
) -> None:  # fmt: skip
    """Emit C[r, vector v] += sum_k A[r, k] B[k, vector v] for r < rows at the builder's
    position (arguments as :func:`_tile_any`'s); the builder ends in the tile's last block.

    ``valids[v]`` (an i64 value) is how many lanes of C's vector v exist: the others are
    neither read nor written (masked loads and stores), so a vector past a gate's or a
    row's end never touches a neighbour, which another thread may own.

    ``pairs`` = (split, [second offset of each vector]) (i64 values): when split > 0 each
    vector holds two blocks, lanes [0, valid) at its offset and [split, split + valid)
    at its second offset (an address for lane 0, so lane split lands on the second
    block's first column); see :func:`shares_vectors`."""
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
    aligned = ir.Constant(i32, align)

    def pointer_at(offset, r):
        where = builder.add(offset, builder.mul(ldc, const(r)))
        return builder.bitcast(builder.gep(c_ptr, [where]), vector.as_pointer())

    def add_into_c(segments):
        """C += totals over ``segments`` [(offsets, masks)] of disjoint lanes. Every load
        before any store: C's rows may be closer than a vector (H < lanes), and a load
        whose span overlaps a pending store's (even in masked-off lanes) waits for it
        (measured on a Zen 4 at H = 8: the seed shape's products 3.4 -> 2.4 us a step)."""
        stores = []
        for r in range(rows):
            for v in range(vectors):
                pointers = [(pointer_at(offs[v], r), seg_masks[v]) for offs, seg_masks in segments]
                previous = None
                for pointer, mask in pointers:
                    value = builder.call(masked_load, [pointer, aligned, mask, zero])
                    previous = value if previous is None else builder.select(mask, value, previous)
                total = builder.fadd(previous, totals[r][v])
                stores.extend((total, pointer, mask) for pointer, mask in pointers)
        for total, pointer, mask in stores:
            builder.call(masked_store, [total, pointer, aligned, mask])

    if pairs is None:
        add_into_c([(offsets, masks)])
        return
    split, second = pairs
    plain = builder.append_basic_block(f"tile{rows}x{vectors}.plain")
    paired = builder.append_basic_block(f"tile{rows}x{vectors}.paired")
    end = builder.append_basic_block(f"tile{rows}x{vectors}.end")
    builder.cbranch(builder.icmp_signed(">", split, const(0)), paired, plain)
    builder.position_at_end(plain)
    add_into_c([(offsets, masks)])
    builder.branch(end)
    builder.position_at_end(paired)
    # lanes [split, split + valid): on from split, off from split + valid
    upper = [_lane_range(builder, lanes, split, builder.add(split, valids[v]))
             for v in range(vectors)]  # fmt: skip
    add_into_c([(offsets, masks), (second, upper)])
    builder.branch(end)
    builder.position_at_end(end)


def _tile_signature(c, a, b, *extra):
    """The tile intrinsics' signature for these arrays, or None (Numba: no match)."""
    if not (c.dtype == a.dtype == b.dtype and c.dtype in (types.float32, types.float64)):
        return None
    index = types.intp
    return types.void(c, index, index, index, a, index, index, b, index, index, index, *extra)


@intrinsic
def _tile_any(
    typingctx, c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1,
    pf_off, split, c_off0b, c_off1b,
):  # fmt: skip
    """C[r, vector v] += sum_k A[r, k] B[k, vector v] for r < rows (1..ROWS) and the panel's
    two vectors v: one register-blocked loop per row count, chosen by a switch.

    Offsets and strides are in elements of the arrays' own dtype: row r of vector v of C
    starts at c_off_v + r ldc, A[r, k] is at a_off + r lda + k, B[k] (a panel row of two
    SIMD vectors) at b_off + k ldb. Arrays C-contiguous. Only the first valid0 (valid1)
    lanes of C's first (second) vector are read and written: a vector past a gate's end,
    or a panel's absent second vector (valid1 <= 0), needs no scratch; without a second
    vector the loop multiplies only the first (measured: the seed shape's backward, output
    P = 8, and its training step 230 -> 219 us on a Zen 4). Each k also asks the
    cache for b[pf_off + k ldb] (the next panel, while this one is multiplied; pass b_off
    when there is none): weights streamed from memory are then near when their turn comes
    (measured on a Zen 3 at 32 rows x 1024 x 4096: 139 -> 153 GFLOP/s).

    With split > 0, each vector v holds two blocks (:func:`shares_vectors`): lanes
    [0, valid_v) go to c_off_v as above, lanes [split, split + valid_v) to c_off_vb +
    split onward (c_off_vb addresses lane 0). Pass split = 0 (and any offsets) otherwise.
    """
    signature = _tile_signature(c, a, b, *(types.intp,) * 7)
    if signature is None:
        return None

    def codegen(context, builder, sig, args):
        no_second = builder.icmp_signed("<=", args[13], ir.Constant(ir.IntType(64), 0))
        after = builder.append_basic_block("tile.after")
        switch = builder.switch(args[11], after)
        tile_args = list(args[:11]) + [args[14]]
        for rows in range(1, ROWS + 1):
            case = builder.append_basic_block(f"tile.case{rows}")
            switch.add_case(ir.Constant(ir.IntType(64), rows), case)
            builder.position_at_end(case)
            # A panel without a second vector (an output narrower than one vector: the
            # backward product at P <= lanes) runs a one-vector loop: half the FMAs.
            one_vector = builder.append_basic_block(f"tile.case{rows}.one")
            two_vectors = builder.append_basic_block(f"tile.case{rows}.two")
            builder.cbranch(no_second, one_vector, two_vectors)
            builder.position_at_end(one_vector)
            _emit_tile(context, builder, sig, tile_args, rows, 1, True, [args[12]])
            builder.branch(after)
            builder.position_at_end(two_vectors)
            pairs = (args[15], [args[16], args[17]])
            _emit_tile(context, builder, sig, tile_args, rows, 2, True, [args[12], args[13]],
                       pairs)  # fmt: skip
            builder.branch(after)
        builder.position_at_end(after)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def row_tile(typingctx, c, c_off0, ldc, a, a_off, lda, b, b_off, ldb, kc, valid):
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
    tile_paired(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0,
                valid1, pf_off, 0, 0, 0)  # fmt: skip


@jit(inline=True)
def tile_paired(
    c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1, pf_off,
    split, c_off0b, c_off1b,
):  # fmt: skip
    """:func:`tile` whose vectors may each hold two blocks (split > 0; see :func:`_tile_any`)."""
    _tile(
        c, np.intp(c_off0), np.intp(c_off1), np.intp(ldc), a, np.intp(a_off), np.intp(lda),
        b, np.intp(b_off), np.intp(ldb), np.intp(kc), np.intp(rows), np.intp(valid0),
        np.intp(valid1), np.intp(pf_off), np.intp(split), np.intp(c_off0b), np.intp(c_off1b),
    )  # fmt: skip


@jit
def _tile(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1, pf_off,
          split, c_off0b, c_off1b):  # fmt: skip
    """:func:`tile`, compiled once per dtype: the tiles' IR is made and optimised once."""
    _tile_any(c, c_off0, c_off1, ldc, a, a_off, lda, b, b_off, ldb, kc, rows, valid0, valid1,
              pf_off, split, c_off0b, c_off1b)  # fmt: skip


@register_jitable
def shares_vectors(blocks, width, lanes):
    """Whether x W^T panels put two blocks (gates) of ``width`` columns in each vector,
    block 2j in lanes [0, width) and block 2j + 1 in [width, 2 width): blocks of at most
    half a vector, four of them (or a multiple: whole panels). Each would otherwise fill
    half a vector or less and the tile would spend its multiply-adds on zero lanes (the
    seed shape: H = 8 of 16 float32 lanes). Packers and products both ask this, so they
    agree."""
    return blocks % 4 == 0 and width > 0 and 2 * width <= lanes


@jit(inline=True)
def lanes_of(array):
    """Columns per SIMD vector for the array's dtype."""
    return VECTOR_BYTES // array.itemsize
