"""Sigmoid and tanh for the gate loops, chosen at compile time by precision.

Numba has no SVML, so ``np.tanh``/``np.exp`` inside a loop stay scalar library calls and
block vectorisation. For float32 the kernels use a rational approximation of tanh
(Eigen's ``generic_fast_tanh_float``: odd degree-13 over even degree-6 polynomial,
a few ulp from the exact value) built only from multiply, add, divide and select, which
LLVM turns into AVX2 code; sigmoid(x) = 0.5 tanh(x/2) + 0.5. Beyond |x| = 9 tanh rounds
to ±1 in float32, and the approximation returns exactly ±1 there, so sigmoid saturates
to exactly 0 and 1 and huge inputs never make NaN. Comparisons are written so that a NaN
input falls through every select and comes out NaN.

float64 keeps the exact functions: its contract is float64 rounding, and no fast
approximation meets it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

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
        return lambda x: math.tanh(x)
    return None


@overload(sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: fma(_HALF, tanh(_HALF * x), _HALF)
    if x == types.float64:
        # exp(-x) overflows to inf for x < -709 and 1/(1+inf) = 0: saturation, no NaN.
        return lambda x: 1.0 / (1.0 + math.exp(-x))
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
