"""Sigmoid and tanh for the gate loops, chosen at compile time by precision.

Numba has no SVML, so ``np.tanh``/``np.exp`` inside a loop stay scalar library calls and
block vectorisation. For float32 the kernels use a rational approximation of tanh
(Eigen's ``generic_fast_tanh_float``: odd degree-13 over even degree-6 polynomial,
a few ulp from the exact value) built only from multiply, add, divide and select, which
LLVM turns into AVX2 code. Beyond |x| = 9 tanh rounds to ±1 in float32 and the
approximation returns exactly ±1 there. Sigmoid uses a vectorisable exp (Cephes expf,
about 1 ulp; 2**n built from exponent bits) as 1/(1+e) or e/(1+e) with e = exp(-|x|), so
it keeps float32 relative accuracy in both tails and saturates to exactly 0 and 1; huge
inputs never make NaN. Comparisons are written so that a NaN input comes out NaN.

float64 does the same with Cephes' double-precision forms: exp as a Pade fraction
(Q + rP) / (Q - rP) after exact range reduction, kept as a fraction so that sigmoid and
tanh cost one division each; tanh below |x| = 0.625 by its odd rational x + x^3 P/Q (no
cancellation near 0). Both are within a few float64 ulp (tested), far inside the 1e-10
agreement with PyTorch that float64 promises, and saturate exactly.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

_F = np.float32
_CLAMP = _F(7.90531110763549805)
_SATURATE = _F(9.0)
_TINY = _F(0.0004)
_HALF = _F(0.5)
_ONE = _F(1.0)
_A1 = _F(4.89352455891786e-03)
_A3 = _F(6.37261928875436e-04)
_A5 = _F(1.48572235717979e-05)
_A7 = _F(5.12229709037114e-08)
_A9 = _F(-8.60467152213735e-11)
_A11 = _F(2.00018790482477e-13)
_A13 = _F(-2.76076847742355e-16)
_B0 = _F(4.89352518554385e-03)
_B2 = _F(2.26843463243900e-03)
_B4 = _F(1.18534705686654e-04)
_B6 = _F(1.19825839466702e-06)


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma): vector and scalar code give the same bits.

    Letting LLVM contract a * b + c on its own could fuse differently in a loop's vector
    body and its scalar remainder, so results would depend on how rows are split.
    """
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def _pow2(typingctx, n):
    """2**n for a whole n in the normal exponent range of its float type (float32: -126 to
    127, float64: -1022 to 1023), built from the exponent bits (vectorises)."""
    if n not in (types.float32, types.float64):
        return None
    wide = n == types.float64
    bits_type = ir.IntType(64 if wide else 32)
    bias, shift = (1023, 52) if wide else (127, 23)

    def codegen(context, builder, signature, args):
        if wide:
            # AVX2 has no packed float64 -> int64 conversion (LLVM would convert lane by
            # lane): adding 1.5 * 2**52 + 1023 puts n + 1023 in the low mantissa bits
            # instead (exact for whole |n| < 2**51), and the shift moves them to the
            # exponent field.
            magic = ir.Constant(ir.DoubleType(), 1.5 * 2.0**52 + bias)
            exponent = builder.bitcast(builder.fadd(args[0], magic), bits_type)
        else:
            exponent = builder.add(builder.fptosi(args[0], bits_type), ir.Constant(bits_type, bias))
        bits = builder.shl(exponent, ir.Constant(bits_type, shift))
        return builder.bitcast(bits, ir.DoubleType() if wide else ir.FloatType())

    return n(n), codegen


# exp for float32 (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial.
_LOG2E = _F(1.44269504088896341)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_EXP_LO = _F(-87.3)  # below: exp would leave the normal float32 range
_E1 = _F(1.9875691500e-4)
_E2 = _F(1.3981999507e-3)
_E3 = _F(8.3334519073e-3)
_E4 = _F(4.1665795894e-2)
_E5 = _F(1.6666665459e-1)
_E6 = _F(5.0000001201e-1)
_ZERO = _F(0.0)


@register_jitable(inline="never")
def _exp_nonpositive_f32(a):
    """exp(a) for a <= 0 and a >= -87.3 (callers clamp), about 1 ulp."""
    n = np.floor(fma(a, _LOG2E, _HALF))
    r = fma(n, -_LN2_HI, a)
    r = fma(n, -_LN2_LO, r)
    p = fma(_E1, r, _E2)
    p = fma(p, r, _E3)
    p = fma(p, r, _E4)
    p = fma(p, r, _E5)
    p = fma(p, r, _E6)
    p = fma(p, r * r, r) + _ONE
    return p * _pow2(n)


def _sigmoid_f32(x):
    # e = exp(-|x|) in (0, 1]: sigma = 1/(1+e) for x >= 0 and e/(1+e) for x < 0, both
    # without cancellation, so the left tail keeps its relative accuracy. Below -87.3 the
    # exact value is subnormal and flushes to 0; above 17, 1 + e rounds to 1: exact 1.
    a = -abs(x)
    safe = a if a > _EXP_LO else _EXP_LO  # NaN falls to the clamp here; restored below
    e = _exp_nonpositive_f32(safe)
    denominator = _ONE + e
    y = (_ONE if x >= _ZERO else e) / denominator
    y = _ZERO if x < _EXP_LO else y
    return x if x != x else y


def _tanh_f32(x):
    # NaN: every comparison below is False, so NaN flows through to the result.
    clamped = _CLAMP if x > _CLAMP else x
    clamped = -_CLAMP if clamped < -_CLAMP else clamped
    x2 = clamped * clamped
    p = fma(x2, _A13, _A11)
    p = fma(x2, p, _A9)
    p = fma(x2, p, _A7)
    p = fma(x2, p, _A5)
    p = fma(x2, p, _A3)
    p = fma(x2, p, _A1)
    p = clamped * p
    q = fma(x2, _B6, _B4)
    q = fma(x2, q, _B2)
    q = fma(x2, q, _B0)
    y = p / q
    y = x if abs(x) < _TINY else y
    y = _ONE if x > _SATURATE else y
    return -_ONE if x < -_SATURATE else y


# exp for float64 (Cephes exp): x = n ln2 + r, |r| <= ln2 / 2, exp(r) = (Q + rP) / (Q - rP)
# with P, Q polynomials in r^2 (a Pade form, about 1 ulp). Kept as a fraction so that
# sigmoid and tanh spend one division each.
_D_LOG2E = 1.4426950408889634
_D_LN2_HI = 6.93145751953125e-1
_D_LN2_LO = 1.42860682030941723212e-6
_D_P0 = 1.26177193074810590878e-4
_D_P1 = 3.02994407707441961300e-2
_D_P2 = 9.99999999999999999910e-1
_D_Q0 = 3.00198505138664455042e-6
_D_Q1 = 2.52448340349684104192e-3
_D_Q2 = 2.27265548208155028766e-1
_D_Q3 = 2.0
_D_EXP_LO = -708.0  # below: 2**n leaves the normal float64 range
# tanh for |x| < 0.625 (Cephes tanh): x + x^3 R(x^2), no cancellation near 0.
_D_T_SMALL = 0.625
_D_TP0 = -9.64399179425052238628e-1
_D_TP1 = -9.92877231001918586564e1
_D_TP2 = -1.61468768441708447952e3
_D_TQ1 = 1.12811678491632931402e2
_D_TQ2 = 2.23548839060100448583e3
_D_TQ3 = 4.84406305325125486048e3


@register_jitable(inline="never")
def _exp_fraction_f64(a):
    """(numerator, denominator) with exp(a) = numerator / denominator, for -708 <= a <= 0."""
    n = np.floor(fma(a, _D_LOG2E, 0.5))
    r = fma(n, -_D_LN2_HI, a)
    r = fma(n, -_D_LN2_LO, r)
    rr = r * r
    p = r * fma(fma(_D_P0, rr, _D_P1), rr, _D_P2)
    q = fma(fma(fma(_D_Q0, rr, _D_Q1), rr, _D_Q2), rr, _D_Q3)
    return _pow2(n) * (q + p), q - p


def _sigmoid_f64(x):
    # As in float32: e = exp(-|x|) = num / den, sigma = den / (den + num) for x >= 0 and
    # num / (den + num) for x < 0. Below -708 the exact value is under 1e-307: 0.
    a = -abs(x)
    safe = a if a > _D_EXP_LO else _D_EXP_LO  # NaN falls to the clamp; restored below
    num, den = _exp_fraction_f64(safe)
    y = (den if x >= 0.0 else num) / (den + num)
    y = 0.0 if x < _D_EXP_LO else y
    return x if x != x else y


def _tanh_f64(x):
    # |x| >= 0.625: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29 (no cancellation);
    # smaller |x|: the odd rational. Both are computed and one selected (vector code).
    ax = abs(x)
    a = -2.0 * ax
    safe = a if a > _D_EXP_LO else _D_EXP_LO
    num, den = _exp_fraction_f64(safe)
    big = (den - num) / (den + num)
    big = big if x >= 0.0 else -big
    x2 = x * x
    p = fma(fma(_D_TP0, x2, _D_TP1), x2, _D_TP2)
    q = fma(fma(x2 + _D_TQ1, x2, _D_TQ2), x2, _D_TQ3)
    small = fma(x * x2, p / q, x)
    y = small if ax < _D_T_SMALL else big
    return x if x != x else y


def tanh(x):
    """tanh in the precision of ``x`` (fast approximation for float32)."""
    return math.tanh(x)


def sigmoid(x):
    """Logistic sigmoid in the precision of ``x`` (fast approximation for float32)."""
    return 1.0 / (1.0 + math.exp(-x))


@overload(tanh)
def _tanh_overload(x):
    if x == types.float32:
        return _tanh_f32
    if x == types.float64:
        return _tanh_f64
    return None


@overload(sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return _sigmoid_f32
    if x == types.float64:
        return _sigmoid_f64
    return None


def one(x):
    """The number 1 in the precision of ``x`` (keeps float32 code free of float64 literals)."""
    return 1.0


@overload(one)
def _one_overload(x):
    scalar = x
    return lambda x: scalar(1)


def zero(x):
    """The number 0 in the precision of ``x`` (``x * 0`` would promote float32 to float64)."""
    return 0.0


@overload(zero)
def _zero_overload(x):
    scalar = x
    return lambda x: scalar(0)
