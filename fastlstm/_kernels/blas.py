"""Direct BLAS calls from @njit code, without copies or per-call allocation.

NumPy's ``np.dot`` inside Numba allocates its result (or needs contiguous operands) and
cannot accumulate. Here the ``sgemm``/``dgemm`` of the library :mod:`fastlstm._blas_choice`
picks (NumPy's bundled OpenBLAS, or what SciPy exports for Cython) are registered as LLVM
symbols, so compiled kernels call them by name: that keeps ``cache=True`` working (a raw
pointer would be baked into the cached code) and lets a kernel write a strided block (one
direction's columns) with ``beta=1``.

All helpers take row-major 2-D arrays whose last axis is contiguous; row strides may be
larger than the row length. BLAS is column-major, so C = A @ B^T is computed as
C^T = B A^T.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastlstm._blas_choice import BLAS
from fastlstm._config import jit

# The routines of the library fastlstm._blas_choice picked (NumPy's OpenBLAS or SciPy's),
# registered by name each process: cached code refers to the names, not the addresses.
for _name, _address in BLAS.addresses.items():
    llvm.add_symbol(f"fastlstm_{_name}", _address)
# BLAS takes every integer by reference, 64 bits wide for an ILP64 library.
_BLAS_INT = np.int64 if BLAS.integer_bits == 64 else np.int32
_GEMM_SIGNATURE = types.void(*([types.voidptr] * 13))
_sgemm = types.ExternalFunction("fastlstm_sgemm", _GEMM_SIGNATURE)
_dgemm = types.ExternalFunction("fastlstm_dgemm", _GEMM_SIGNATURE)
_GEMV_SIGNATURE = types.void(*([types.voidptr] * 11))
_sgemv = types.ExternalFunction("fastlstm_sgemv", _GEMV_SIGNATURE)
_dgemv = types.ExternalFunction("fastlstm_dgemv", _GEMV_SIGNATURE)

_TRANS = np.uint8(ord("T"))
_NO_TRANS = np.uint8(ord("N"))


@intrinsic
def _address_of(typingctx, value):
    """Pointer to a stack slot holding ``value`` (BLAS takes every scalar by reference).

    The slot is allocated once in the function's entry block, so calling this in a loop
    does not grow the stack.
    """

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, args[0].type)
        builder.store(args[0], slot)
        return builder.bitcast(slot, cgutils.voidptr_t)

    return types.voidptr(value), codegen


def _xgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Typed stub: column-major ``c = alpha op(a) op(b) + beta c`` in c's precision."""


@overload(_xgemm)
def _xgemm_impl(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    gemm = _sgemm if c.dtype == types.float32 else _dgemm
    scalar = c.dtype

    def impl(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        gemm(
            _address_of(transa),
            _address_of(transb),
            _address_of(_BLAS_INT(m)),
            _address_of(_BLAS_INT(n)),
            _address_of(_BLAS_INT(k)),
            _address_of(scalar(alpha)),
            a.ctypes,
            _address_of(_BLAS_INT(lda)),
            b.ctypes,
            _address_of(_BLAS_INT(ldb)),
            _address_of(scalar(beta)),
            c.ctypes,
            _address_of(_BLAS_INT(ldc)),
        )

    return impl


def _xgemv(trans, m, n, alpha, a, lda, x, beta, y):
    """Typed stub: column-major ``y = alpha op(a) x + beta y`` (unit strides) in y's precision."""


@overload(_xgemv)
def _xgemv_impl(trans, m, n, alpha, a, lda, x, beta, y):
    gemv = _sgemv if y.dtype == types.float32 else _dgemv
    scalar = y.dtype

    def impl(trans, m, n, alpha, a, lda, x, beta, y):
        gemv(
            _address_of(trans),
            _address_of(_BLAS_INT(m)),
            _address_of(_BLAS_INT(n)),
            _address_of(scalar(alpha)),
            a.ctypes,
            _address_of(_BLAS_INT(lda)),
            x.ctypes,
            _address_of(_BLAS_INT(1)),
            _address_of(scalar(beta)),
            y.ctypes,
            _address_of(_BLAS_INT(1)),
        )

    return impl


@jit
def _row_stride(a):
    # BLAS rejects a leading dimension of 0, which a (rows, 0) view can have.
    return max(a.strides[0] // a.itemsize, max(a.shape[1], 1))


@jit
def gemm_abt(c, a, b, beta):
    """c = a @ b.T + beta * c for a (M, K), b (N, K), c (M, N)."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    if m == 1:  # one row: gemv (this OpenBLAS's sgemm is ~7x slower for it)
        _xgemv(_TRANS, k, n, 1.0, b, _row_stride(b), a, beta, c)
        return
    _xgemm(
        _TRANS,
        _NO_TRANS,
        n,
        m,
        k,
        1.0,
        b,
        _row_stride(b),
        a,
        _row_stride(a),
        beta,
        c,
        _row_stride(c),
    )


@jit
def gemm_ab(c, a, b, beta):
    """c = a @ b + beta * c for a (M, K), b (K, N), c (M, N)."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    if m == 1:
        _xgemv(_NO_TRANS, n, k, 1.0, b, _row_stride(b), a, beta, c)
        return
    _xgemm(
        _NO_TRANS,
        _NO_TRANS,
        n,
        m,
        k,
        1.0,
        b,
        _row_stride(b),
        a,
        _row_stride(a),
        beta,
        c,
        _row_stride(c),
    )


@jit
def gemm_atb(c, a, b, beta):
    """c = a.T @ b + beta * c for a (K, M), b (K, N), c (M, N): sums over the rows of a and b."""
    k, m = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    _xgemm(
        _NO_TRANS,
        _TRANS,
        n,
        m,
        k,
        1.0,
        b,
        _row_stride(b),
        a,
        _row_stride(a),
        beta,
        c,
        _row_stride(c),
    )
