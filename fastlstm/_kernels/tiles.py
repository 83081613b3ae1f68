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
# The fewest rows worth a thread's own chunk of a batch. A block of r rows keeps 2 r FMA
# chains, and a core's FMA units (two, of 4-5 cycles' latency) need about 10 to stay busy:
# two threads of r rows beat one thread of 2 r once their 4 r chains in all exceed those
# 10, from r = 3. Measured on an AMD EPYC Zen 4, forward, B = 6-9, H = 64-512 (float32 and
# float64): chunks of 3-5 rows 1.3-2.0x faster than one thread; of 2 rows (B = 4, 5)
# 0.84-1.5x.
MIN_CHUNK_ROWS = min(ROWS, 3)
# The one-row product takes a later block of steps' input projection along
# (:func:`row_tile_mixed`) where both sets of accumulators fit in the vector registers
# next to the panels and broadcasts: with AVX-512's 32 (8 + 16 + 3), not AVX2's 16.
MIXES_PROJECTION = VARIANT.registers >= ROW_VECTORS + 2 * ROWS + 3


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


def _switch_on_vectors(builder, valid, lanes: int, lowest: int, name: str, emit_case) -> None:
    """Branch on how many vectors ``valid`` elements fill (ceil(valid / lanes), held within
    lowest..ROW_VECTORS) and call ``emit_case(vectors)`` in each case's block (it must end
    with a branch to the block it is given); the builder ends in that joint block. Below
    ``lowest`` (0: valid <= 0) no case runs. The one-row kernels' loop per count of valid
    vectors: a part-valid chunk loads and multiplies only its own."""
    i64 = ir.IntType(64)
    count = builder.sdiv(builder.add(valid, ir.Constant(i64, lanes - 1)), ir.Constant(i64, lanes))
    if lowest > 0:
        low = builder.icmp_signed("<", count, ir.Constant(i64, lowest))
        count = builder.select(low, ir.Constant(i64, lowest), count)
    full = builder.icmp_signed(">", count, ir.Constant(i64, ROW_VECTORS))
    count = builder.select(full, ir.Constant(i64, ROW_VECTORS), count)
    after = builder.append_basic_block(f"{name}.after")
    switch = builder.switch(count, after)
    for vectors in range(max(1, lowest), ROW_VECTORS + 1):
        case = builder.append_basic_block(f"{name}.case{vectors}")
        switch.add_case(ir.Constant(i64, vectors), case)
        builder.position_at_end(case)
        emit_case(vectors, after)
    builder.position_at_end(after)


class _Emitter:
    """The IR pieces every tile generator shares, for one dtype at one builder: the vector
    type, the LLVM intrinsics (fma, masked load and store, prefetch) and small helpers."""

    def __init__(self, context, builder, is64: bool):
        self.context = context
        self.builder = builder
        scalar = ir.DoubleType() if is64 else ir.FloatType()
        self.lanes = VECTOR_BYTES // (8 if is64 else 4)
        self.vector = vector = ir.VectorType(scalar, self.lanes)
        self.align = 8 if is64 else 4
        bits = 64 if is64 else 32
        module = builder.module
        i32 = ir.IntType(32)
        mask_type = ir.VectorType(ir.IntType(1), self.lanes)
        self.fma = cgutils.get_or_insert_function(
            module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{self.lanes}f{bits}"
        )
        self.masked_load = cgutils.get_or_insert_function(
            module,
            ir.FunctionType(vector, [vector.as_pointer(), i32, mask_type, vector]),
            f"llvm.masked.load.v{self.lanes}f{bits}.p0",
        )
        self.masked_store = cgutils.get_or_insert_function(
            module,
            ir.FunctionType(ir.VoidType(), [vector, vector.as_pointer(), i32, mask_type]),
            f"llvm.masked.store.v{self.lanes}f{bits}.p0",
        )
        self.zero = ir.Constant(vector, [0.0] * self.lanes)

    @staticmethod
    def const(value: int):
        return ir.Constant(ir.IntType(64), value)

    def data(self, array_type, value):
        """The data pointer of an array argument."""
        return self.context.make_array(array_type)(self.context, self.builder, value).data

    def rows_at(self, pointer, offset, stride, rows: int) -> list:
        """Pointers to rows 0..rows-1 of a matrix at ``offset``, ``stride`` apart."""
        b = self.builder
        return [b.gep(pointer, [b.add(offset, b.mul(stride, self.const(r)))]) for r in range(rows)]

    def vector_at(self, pointer):
        return self.builder.bitcast(pointer, self.vector.as_pointer())

    def prefetch(self, pointer) -> None:
        """Ask the cache for ``pointer`` (read, keep in every cache level, data cache)."""
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            self.builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [i32] * 3),
            "llvm.prefetch.p0",
        )
        i8 = self.builder.bitcast(pointer, ir.IntType(8).as_pointer())
        self.builder.call(hint, [i8, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])

    def panel_step(self, acc: list, a_rows: list, k, b_row) -> list:
        """acc[r][v] + A[r, k] B[k, vector v] for every row r and vector v: one load per
        vector of the panel row at b_row, one broadcast per row, a multiply-add each."""
        b = self.builder
        undef = ir.Constant(self.vector, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)
        panel = [
            b.load(self.vector_at(b.gep(b_row, [self.const(v * self.lanes)])), align=self.align)
            for v in range(len(acc[0]))
        ]
        summed = []
        for r, row in enumerate(acc):
            value = b.load(b.gep(a_rows[r], [k]))
            splat = b.shuffle_vector(
                b.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)), undef, splat_mask
            )
            summed.append([b.call(self.fma, [splat, panel[v], row[v]]) for v in range(len(row))])
        return summed

    def loop(self, name: str, count, initial: list, body) -> list:
        """``accs = body(i, accs)`` for i in 0..count-1 (an i64 value; none when <= 0):
        ``initial`` and the result are lists of groups of rows of vectors."""
        b = self.builder
        i64 = ir.IntType(64)
        entry = b.block
        loop = b.append_basic_block(f"{name}.loop")
        done = b.append_basic_block(f"{name}.done")
        b.cbranch(b.icmp_signed(">", count, self.const(0)), loop, done)
        b.position_at_end(loop)
        i = b.phi(i64)
        accs = [[[b.phi(self.vector) for _ in row] for row in group] for group in initial]
        summed = body(i, accs)
        i_next = b.add(i, self.const(1))
        i.add_incoming(self.const(0), entry)
        i.add_incoming(i_next, loop)
        for group, new_group, start_group in zip(accs, summed, initial, strict=True):
            for row, new_row, start_row in zip(group, new_group, start_group, strict=True):
                for phi, new, start in zip(row, new_row, start_row, strict=True):
                    phi.add_incoming(start, entry)
                    phi.add_incoming(new, loop)
        b.cbranch(b.icmp_signed("<", i_next, count), loop, done)
        b.position_at_end(done)
        totals = [[[b.phi(self.vector) for _ in row] for row in group] for group in initial]
        for group, new_group, start_group in zip(totals, summed, initial, strict=True):
            for row, new_row, start_row in zip(group, new_group, start_group, strict=True):
                for phi, new, start in zip(row, new_row, start_row, strict=True):
                    phi.add_incoming(start, entry)
                    phi.add_incoming(new, loop)
        return totals

    def add_into_c(self, c_ptr, ldc, totals: list, segments: list) -> None:
        """C += totals over ``segments`` [(offsets, masks)] of disjoint lanes (row r of
        vector v at offsets[v] + r ldc). Every load before any store: C's rows may be
        closer than a vector (H < lanes), and a load whose span overlaps a pending store's
        (even in masked-off lanes) waits for it (measured on a Zen 4 at H = 8: the seed
        shape's products 3.4 -> 2.4 us a step)."""
        b = self.builder
        aligned = ir.Constant(ir.IntType(32), self.align)

        def pointer_at(offset, r):
            return self.vector_at(b.gep(c_ptr, [b.add(offset, b.mul(ldc, self.const(r)))]))

        stores = []
        for r, row in enumerate(totals):
            for v, total in enumerate(row):
                pointers = [(pointer_at(offs[v], r), masks[v]) for offs, masks in segments]
                previous = None
                for pointer, mask in pointers:
                    value = b.call(self.masked_load, [pointer, aligned, mask, self.zero])
                    previous = value if previous is None else b.select(mask, value, previous)
                total = b.fadd(previous, total)
                stores.extend((total, pointer, mask) for pointer, mask in pointers)
        for total, pointer, mask in stores:
            b.call(self.masked_store, [total, pointer, aligned, mask])


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
    emit = _Emitter(context, builder, sig.args[0].dtype == types.float64)
    lanes, const = emit.lanes, emit.const
    c_ptr = emit.data(sig.args[0], c_arr)
    a_rows = emit.rows_at(emit.data(sig.args[4], a_arr), a_off, lda, rows)
    b_ptr = emit.data(sig.args[7], b_arr)
    b_base = builder.gep(b_ptr, [b_off])
    offsets = [c_off0] + [builder.add(c_off1, const((v - 1) * lanes)) for v in range(1, vectors)]

    def step(k, accs):
        b_row = builder.gep(b_base, [builder.mul(k, ldb)])
        if prefetch:
            emit.prefetch(builder.gep(b_ptr, [builder.add(args[11], builder.mul(k, ldb))]))
        return [emit.panel_step(accs[0], a_rows, k, b_row)]

    initial = [[[emit.zero] * vectors for _ in range(rows)]]
    (totals,) = emit.loop(f"tile{rows}x{vectors}", kc, initial, step)
    masks = [_lane_mask(builder, lanes, valids[v]) for v in range(vectors)]
    if pairs is None:
        emit.add_into_c(c_ptr, ldc, totals, [(offsets, masks)])
        return
    split, second = pairs
    plain = builder.append_basic_block(f"tile{rows}x{vectors}.plain")
    paired = builder.append_basic_block(f"tile{rows}x{vectors}.paired")
    end = builder.append_basic_block(f"tile{rows}x{vectors}.end")
    builder.cbranch(builder.icmp_signed(">", split, const(0)), paired, plain)
    builder.position_at_end(plain)
    emit.add_into_c(c_ptr, ldc, totals, [(offsets, masks)])
    builder.branch(end)
    builder.position_at_end(paired)
    # lanes [split, split + valid): on from split, off from split + valid
    upper = [_lane_range(builder, lanes, split, builder.add(split, valids[v]))
             for v in range(vectors)]  # fmt: skip
    emit.add_into_c(c_ptr, ldc, totals, [(offsets, masks), (second, upper)])
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
    arguments as :func:`_tile_any`'s, no prefetch.

    A loop per count of vectors with valid elements, chosen by a switch: a chunk with
    fewer units (a gate's last, or a thread's) loads and multiplies only its own vectors
    of the panel. One loop over all ROW_VECTORS cost a part-valid chunk as much as a full
    one (measured on a Zen 4, one row, T = 150: H = 256 2.7 ms, H = 264, one more chunk of
    8 units, 4.4 ms)."""
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

        def emit_case(vectors: int, after) -> None:
            _emit_tile(context, builder, as_tile, tile_args, 1, vectors, False, valids[:vectors])
            builder.branch(after)

        _switch_on_vectors(builder, valid, lanes, 0, "row_tile", emit_case)  # none at <= 0
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def row_tile_mixed(
    typingctx, c, c_off, h, b, b_off, ldb, kc, valid, t_off0, t_off1, ldt, x, x_off, ldx, w,
    w_off, ldw, k0, k1, kw, valid0, valid1, scratch,
):  # fmt: skip
    """:func:`row_tile` (C[c_off + j] += sum_k h[k] b[b_off + k ldb + j], j < valid, over
    k < kc) with k = k0..k1-1 of a ROWS-row register tile of another product in the same
    loop: C[t_off_v + r ldt, vector v] += sum_k x[x_off + r ldx + k] w[w_off + k ldw,
    vector v] for r < ROWS and two vectors (valid0, valid1 lanes), k < kw in all.

    Why: the one-row product streams its panel from the cache with one multiply-add per
    loaded vector, and the cache's bandwidth, not the multiply-add units, sets its pace;
    the tile's multiply-adds fill the idle units. So each loop iteration runs two of the
    row's k and one of the tile's between them, for as many iterations as both have;
    what is left of either runs alone after. Measured on a Zen 4, one core, one thread's
    share of a latency-shape step (H = I = 256): the row's products 4.9 us, the tile's
    2.3, both interleaved 6.3 (half the tile hidden; with the tile's k after both of the
    row's, a quarter or less). An intrinsic, inlined where it is used: a call per use
    cost a tenth more.

    The tile's sums may span calls: with k0 > 0 its accumulators start from ``scratch``
    (2 ROWS vectors), and with k1 < kw they are left there instead of added into C. Each
    sum still runs over k in order from zero, so C gets the same bits as from
    :func:`row_tile` and :func:`tile` called apart. kc = 0 (and valid = 0) runs the tile
    alone."""
    arrays = (c, h, b, x, w, scratch)
    same = all(isinstance(a, types.Array) and a.dtype == c.dtype for a in arrays)
    if not same or c.dtype not in (types.float32, types.float64):
        return None
    index = types.intp
    signature = types.void(
        c, index, h, b, index, index, index, index, index, index, index, x, index, index, w,
        index, index, index, index, index, index, index, scratch,
    )  # fmt: skip

    def codegen(context, builder, sig, args):
        (c_arr, c_off, h_arr, b_arr, b_off, ldb, kc, valid, t_off0, t_off1, ldt, x_arr, x_off,
         ldx, w_arr, w_off, ldw, k0, k1, kw, valid0, valid1, s_arr) = args  # fmt: skip
        emit = _Emitter(context, builder, sig.args[0].dtype == types.float64)
        lanes, const = emit.lanes, emit.const
        c_ptr = emit.data(sig.args[0], c_arr)
        h_row = [emit.data(sig.args[2], h_arr)]
        b_base = builder.gep(emit.data(sig.args[3], b_arr), [b_off])
        x_rows = emit.rows_at(emit.data(sig.args[11], x_arr), x_off, ldx, ROWS)
        w_base = builder.gep(emit.data(sig.args[14], w_arr), [w_off])
        s_ptr = emit.data(sig.args[22], s_arr)
        kept = [[emit.vector_at(builder.gep(s_ptr, [const((2 * r + v) * lanes)])) for v in range(2)]
                for r in range(ROWS)]  # fmt: skip
        fresh = builder.icmp_signed("<=", k0, const(0))
        tile_start = [[builder.select(fresh, emit.zero, builder.load(p, align=emit.align))
                       for p in row] for row in kept]  # fmt: skip

        def row_step(k, acc):
            return emit.panel_step(acc, h_row, k, builder.gep(b_base, [builder.mul(k, ldb)]))

        def tile_step(k, acc):
            return emit.panel_step(acc, x_rows, k, builder.gep(w_base, [builder.mul(k, ldw)]))

        half = builder.ashr(kc, const(1))
        span = builder.sub(k1, k0)
        both = builder.select(builder.icmp_signed("<", half, span), half, span)
        row_first = builder.shl(builder.select(builder.icmp_signed(">", both, const(0)), both,
                                               const(0)), const(1))  # fmt: skip
        tile_first = builder.add(k0, builder.select(builder.icmp_signed(">", both, const(0)),
                                                    both, const(0)))  # fmt: skip

        def emit_case(vectors: int, after) -> None:
            """The loops with ``vectors`` vectors of the row (its valid ones), ending at
            ``after``."""

            def mixed_step(i, accs):
                k = builder.shl(i, const(1))
                row = row_step(k, accs[0])
                tile = tile_step(builder.add(k0, i), accs[1])
                return [row_step(builder.add(k, const(1)), row), tile]

            row_start = [[emit.zero] * vectors]
            row_acc, tile_acc = emit.loop(
                f"mixed{vectors}", both, [row_start, tile_start], mixed_step
            )
            (row_acc,) = emit.loop(
                f"mixed{vectors}.row", builder.sub(kc, row_first), [row_acc],
                lambda i, accs: [row_step(builder.add(row_first, i), accs[0])],
            )  # fmt: skip
            (tile_acc,) = emit.loop(
                f"mixed{vectors}.tile", builder.sub(k1, tile_first), [tile_acc],
                lambda i, accs: [tile_step(builder.add(tile_first, i), accs[0])],
            )  # fmt: skip
            row_offsets = [builder.add(c_off, const(v * lanes)) for v in range(vectors)]
            row_masks = [_lane_mask(builder, lanes, builder.sub(valid, const(v * lanes)))
                         for v in range(vectors)]  # fmt: skip
            emit.add_into_c(c_ptr, const(0), row_acc, [(row_offsets, row_masks)])
            finish = builder.append_basic_block(f"mixed{vectors}.finish")
            keep = builder.append_basic_block(f"mixed{vectors}.keep")
            builder.cbranch(builder.icmp_signed(">=", k1, kw), finish, keep)
            builder.position_at_end(finish)
            tile_masks = [_lane_mask(builder, lanes, valid0), _lane_mask(builder, lanes, valid1)]
            emit.add_into_c(c_ptr, ldt, tile_acc, [([t_off0, t_off1], tile_masks)])
            builder.branch(after)
            builder.position_at_end(keep)
            for row, pointers in zip(tile_acc, kept, strict=True):
                for value, pointer in zip(row, pointers, strict=True):
                    builder.store(value, pointer, align=emit.align)
            builder.branch(after)

        # At least one vector: a tile alone (kc = valid = 0) still runs.
        _switch_on_vectors(builder, valid, lanes, 1, "mixed", emit_case)
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
