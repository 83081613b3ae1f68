"""Waiting without the GIL: a spin-then-yield barrier for the threads of one time loop (a
batch of one row), and the counters that hand tasks to fastlstm's helper threads.

A batch of one row cannot be split by rows; its two threads split the hidden units
instead, and every step each needs the whole new state from the other: one barrier per
step. Each thread adds 1 to a shared counter after its step and waits until the counter
reaches parties x steps done. The counter only grows, so no reset is needed. Waiting
spins briefly (a step takes microseconds) and then yields the CPU (``sched_yield``), so
that a waiting thread does not keep a core from the one it waits for when other
processes compete for the cores.

:func:`hand_off` is the helper threads' (:mod:`fastlstm._threads`): counters that only
grow, polled for a bounded time.

The atomics are LLVM instructions (``atomicrmw add``, ``load atomic acquire``) through
Numba intrinsics: the add publishes this thread's writes of the step (sequentially
consistent), the acquiring load makes the other's visible.
"""

from __future__ import annotations

import ctypes
import sys

import llvmlite.binding as llvm
from numba import types
from numba.extending import intrinsic

from fastlstm._config import jit

try:  # POSIX; elsewhere one_row_plan never splits and tasks go to a plain pool
    _libc = ctypes.CDLL(None)
    for _name in ("sched_yield", "clock_gettime"):
        _address = ctypes.cast(getattr(_libc, _name), ctypes.c_void_p).value
        llvm.add_symbol(f"fastlstm_{_name}", _address)
    AVAILABLE = True
except (OSError, AttributeError, TypeError):
    AVAILABLE = False
_sched_yield = types.ExternalFunction("fastlstm_sched_yield", types.int32())
_clock_gettime = types.ExternalFunction(
    "fastlstm_clock_gettime", types.int32(types.int32, types.voidptr)
)
_CLOCK_MONOTONIC = 1  # Linux's clockid (other systems number their clocks otherwise)
# The helper threads poll (hand_off) only on Linux; elsewhere they block at once.
POLLING = AVAILABLE and sys.platform.startswith("linux")

SPINS_BEFORE_YIELD = 4000  # about 2-4 microseconds of polling


@intrinsic
def _atomic_add(typingctx, counter, value):
    """counter[0] += value atomically (sequentially consistent); returns the old value."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, args[1], "seq_cst")

    return types.int64(counter, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, counter):
    """counter[0], read with acquire ordering."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.load_atomic(data, "acquire", 8)

    return types.int64(counter), codegen


def _arrive_and_wait(counter, target):
    """Count this thread's arrival, then wait until ``counter[0] >= target``."""
    _atomic_add(counter, 1)
    spins = 0
    while _atomic_load(counter) < target:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            _sched_yield()


def _arrive_and_spin(counter, target):
    """The same without yielding, where sched_yield is missing (never waits: the one-row
    loops are not split there, and kernels compiled with a call to an unregistered symbol
    would crash)."""
    _atomic_add(counter, 1)
    while _atomic_load(counter) < target:
        pass


arrive_and_wait = jit(_arrive_and_wait if AVAILABLE else _arrive_and_spin)


@jit(inline=True)
def _now(clock):
    """The monotonic clock in ns (``clock``: the struct timespec's two int64), -1 if none."""
    if _clock_gettime(_CLOCK_MONOTONIC, clock.ctypes) != 0:
        return -1
    return clock[0] * 1_000_000_000 + clock[1]


@jit
def hand_off(arrived, counter, target, step, nanoseconds, settle, clock):
    """Add 1 to arrived[0] (when ``arrived`` is not empty) and ``step`` to target[0], then
    poll until counter[0] >= target[0], for at most ``nanoseconds`` (monotonic clock);
    whether it got there. Once there, go on polling the clock for ``settle`` ns before
    returning. (The target lives in an array so that the Python calling in a loop makes
    no new integers: a stream's steps with out= leave nothing allocated.)

    The helper threads' hand-off (:mod:`fastlstm._threads`), one function for every use
    (one compilation): post a section (arrived = posted, a target of 0), wait for the
    tasks (no arrival), end a task and wait for the next (arrived = done, counter =
    posted, the helper's own section count as the target). ``clock`` (2,) int64 is the
    calling thread's own scratch for the time (no allocation per hand-off).
    Called from Python, it holds no GIL while it polls, so the thread it waits for runs
    on unhindered; after a few microseconds it yields the CPU between polls
    (sched_yield), as the barrier does. Only where POLLING (Linux)."""
    if arrived.shape[0] > 0:
        _atomic_add(arrived, 1)
    target[0] += step
    goal = target[0]
    start = _now(clock)
    if start < 0:  # no such clock: no polling
        return _atomic_load(counter) >= goal
    spins = 0
    while _atomic_load(counter) < goal:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            _sched_yield()
        if spins % 64 == 0 and _now(clock) - start >= nanoseconds:
            if _atomic_load(counter) < goal:
                return False
            break
    if settle > 0:
        seen = _now(clock)
        while _now(clock) - seen < settle:
            pass
    return True
