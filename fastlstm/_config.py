"""Every tunable of fastlstm in one place: compiler flags, caching, and when to go parallel.

The fastmath sets keep NaN and inf semantics (no ``nnan``/``ninf``), so NaN inputs still
give NaN outputs and saturated activations stay exact.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numba
from numba.core.caching import FunctionCache

from fastlstm._blas_choice import BLAS
from fastlstm._cpu import CPU, VARIANT

FASTMATH = {"nsz"}
# Reductions (dot products) vectorise only if the sum may be reassociated; they get this set.
# Element-wise loops keep the stricter one above: with reassociation or reciprocal
# approximations LLVM may compile a loop's vector body and its scalar remainder
# differently, and results would then depend on how rows are split across threads.
FASTMATH_REDUCTIONS = FASTMATH | {"reassoc", "contract"}

# A layer's time loops use more than one thread (directions or batch row chunks as tasks),
# and the GEMMs outside them more than one part, only from this many multiply-adds in
# their recurrent products: below it, handing work to the helper thread costs more than it
# saves. Measured on an AMD EPYC Zen 4 (2 vCPUs) once a hand-off cost about 10 us
# (fastlstm._threads), serial against two tasks: 2.0-2.1 M multiply-adds 1.09-1.34x
# faster in two, 2.6-5.2 M 1.12-1.52x, 1.3-1.5 M 0.89-1.45x (4 M with the blocking pool).
PARALLEL_MIN_MACS = 2_000_000
# Loops split by hidden units (a batch of one row; weights beyond the cache) meet at a
# barrier every step, and go parallel only from this many times PARALLEL_MIN_MACS (one
# row, 3.1-3.7 M: 0.80-1.22x in two tasks).
BARRIER_LOOP_MIN_FACTOR = 2
# A batch of several rows split by hidden units meets at the barrier after every step's
# gates for all its rows; it goes parallel only from this many multiply-adds per step
# (B x 4H x H): below, the barrier and the per-row gate calls cost more than half the
# step saves. Measured on an AMD EPYC Zen 4, B = 2-5 rows (too few for two row chunks),
# serial against the split: H = 64 (16-82 K per step) 0.8-1.04x, H = 128 (131-328 K)
# 1.12-1.43x, H = 256 and 512 1.08-1.74x.
UNITS_STEP_MIN_MACS = 100_000

# A layer's time loop projects each step's inputs itself (x_t W_ih^T next to h W_hh^T,
# while the step's gate block is in cache) when one direction's W_ih and W_hh together
# take at most this many bytes: beyond, streaming both every step from memory costs more
# than one GEMM over all steps before the loop. A quarter of the last-level cache (the
# rest holds the gates, states and other tenants' data): 8 MiB on a Zen 3 with 32 MiB of
# L3, where 8 MiB was measured as the crossing point.
FUSED_MAX_WEIGHT_BYTES = CPU.l3_bytes // 4

# A batch whose weights are beyond FUSED_MAX_WEIGHT_BYTES runs its loops (forward and
# backward) split by hidden units (each thread streams half of W_hh every step for every
# row, a barrier per step) instead of by batch rows (all of W_hh for half the rows, no
# barrier) when the row split would leave a thread at most one register block of rows and
# one direction's W_hh takes at least this many bytes: then each step streams W_hh from
# beyond the L3 with little work per weight, and halving the stream pays for the barrier.
# Otherwise (more rows, or weights that stay in the L3) the barrier and the threads'
# exchange of h cost more. Measured on an AMD EPYC Zen 4 (32 MiB L3), forward, units
# against rows: float64 H = 1024 (W_hh 32 MiB) B = 10 and 16: 25% and 8% faster, B =
# 24-64: 1.4% faster to 6.5% slower; float32 H = 1024 (16 MiB) B = 10 and 16: 2-4% faster,
# B = 24-64: 1-3% slower; float64 H = 768 (18 MiB) B = 10, 16 and 64: within 1.5%, B = 24
# and 32: 7-10% slower; H = 500 and 512 (8 MiB) B = 10-64: 1-13% slower (recog, B = 64:
# 13% forward, 12% training).
UNITS_SPLIT_MIN_WEIGHT_BYTES = CPU.l3_bytes // 2

# The input projection (when not in the loop) and the weight gradients are cut into this
# many parts from PARALLEL_MIN_MACS on, run at once on fastlstm's threads with the BLAS on
# one thread each (a threaded OpenBLAS leaves threads spinning that take a core from the
# time loops that follow). A fixed count, not the thread count: the BLAS's float32 sums
# can depend on a product's size, and results must not depend on the thread count.
SPLIT_PARTS = 2

# Weight gradients whose work per row (4H x (I + P) multiply-adds) is at most this are
# done row by row by hand-written loops over all 4H gate columns at once, instead of
# per-gate BLAS calls: OpenBLAS spends microseconds per call on tiny matrices (measured
# at the seed shape: 114 against 78 us).
SMALL_ROW_MACS = 4096

# From this many rows (steps x batch) on, a gate's dW_ih and dW_hh come from one GEMM over
# [x | h_{t-1}] into a scratch that is then added into both (a wider product runs faster);
# below, the adds cost more than that gains, and two GEMMs accumulate in place.
MERGED_GRADIENT_MIN_ROWS = 1024
# That merge only while x or h is narrower than this many columns: a narrow product
# runs below the BLAS's speed (Zen 3, 3200 rows: 70 GFLOP/s 128 wide, 82 for the merged
# 384), while two wide ones lose nothing and the scratch's adds cost a pass over the
# gate's dW (Zen 4, large, 1600 x 1024 + 1024: the weight gradients took 216-224 ms
# unmerged, 228-238 merged; recog, 500 + 500: 109-110 against 110-114).
MERGED_GRADIENT_NARROW = 256


def _kernel_key() -> str:
    """What compiled kernels depend on beyond their own function's code: the kernel variant,
    the BLAS library they call and the package's private modules, the kernel layer's
    included (intrinsics, helpers and constants that kernels inline). Numba's cache checks
    only a function's own bytecode and its CPU."""
    # The BLAS's integer width is compiled into the calls (fastlstm._kernels.blas).
    digest = hashlib.sha256(repr((VARIANT, BLAS)).encode())
    root = Path(__file__).parent
    for path in sorted([*root.glob("_*.py"), *root.glob("_kernels/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


KERNEL_KEY = _kernel_key()


class _KernelCache(FunctionCache):
    """Numba's file cache, keyed also by :data:`KERNEL_KEY`: another variant, or an edit of a
    module a kernel inlines, compiles anew instead of loading stale machine code."""

    def _index_key(self, sig, codegen):
        return (*super()._index_key(sig, codegen), KERNEL_KEY)


def jit(*args, reductions: bool = False, inline: bool = False, **kwargs):
    """``numba.njit`` with fastlstm's flags and ``cache=True``, falling back to no cache.

    Numba raises at decoration time when it finds no writable cache folder (an installed
    package in a read-only location with no user cache dir); then we compile per process.
    The cache is keyed by the kernel variant too (:class:`_KernelCache`).

    ``inline=True`` (helpers that only kernels call) inlines the function into each caller
    before typing (Numba's ``inline="always"``): it is then not compiled on its own, nor
    linked into every caller and optimised and code-generated again there, which is how
    Numba compiles calls between jit functions (measured: most of a first call's compile
    time went to such wrappers and helpers). Literal integer arguments fold into the
    caller instead of making one specialisation per value.
    """

    def decorate(func):
        # error_model="numpy": float division without Python's ZeroDivisionError check,
        # which would otherwise keep every loop with a division from vectorising.
        options = {
            "fastmath": FASTMATH_REDUCTIONS if reductions else FASTMATH,
            "nogil": True,
            "error_model": "numpy",
            **kwargs,
        }
        if inline:
            return numba.njit(inline="always", **options)(func)
        try:
            dispatcher = numba.njit(cache=True, **options)(func)
            dispatcher._cache = _KernelCache(func)
            return dispatcher
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            warnings.warn(f"fastlstm: compiling without cache ({exc})", stacklevel=2)
            return numba.njit(cache=False, **options)(func)

    if args and callable(args[0]):
        return decorate(args[0])
    return decorate


# The input projection (when not in the time loop) goes through the packed micro-kernel
# instead of the BLAS when each part's rows of input take at most this many bytes: they
# then stay in cache while every panel of W_ih streams past once (a one-row batch: 150 x
# 256 rows against 1024 columns ran at about 100 GFLOP/s through OpenBLAS). Larger inputs
# want the BLAS's cache blocking. Half the core's L2 (the other half for the panels).
PACKED_PROJECTION_BYTES = CPU.l2_bytes // 2

# The input projection runs as GEMMs over blocks of about this many rows (steps x batch):
# wide enough for the BLAS to run near its best, small enough for the scratch to stay in cache.
PROJECTION_BLOCK_ROWS = 1024
