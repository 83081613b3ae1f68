"""Thread control: fastlstm's task pool and the BLAS libraries' pools, set together.

fastlstm runs its parallel work on its own threads: time loops as tasks (directions, batch
row chunks, or a one-row batch's hidden units), each a GIL-free Numba kernel over the whole
sequence, and the GEMMs outside the loops in parts. The BLAS is held to one thread
around every engine call into it: on two cores the pools must not stack up, and OpenBLAS's
threads keep spinning after a call and take a core from the tasks that follow.

The task pool's helpers wait for work polling a counter, without the GIL, for
HELPER_SPIN_SECONDS after their last task, and then block; the caller, its own task done,
polls for theirs the same way. Handing tasks over through blocked threads cost 50-100 µs
per parallel section on a 2-vCPU VM (two wake-ups of a sleeping thread; measured on an
AMD EPYC Zen 4 VM: an empty fork/join took 64-70 µs through a ThreadPoolExecutor, 54 µs
as a lock ping-pong between two threads; 10-14 µs through these helpers). Sections
follow each other within microseconds in a training step or a loop of calls, so the
poll usually finds the helper awake. The wait is bounded and yields the CPU between
polls: Numba's OpenMP workers and OpenBLAS's threads spin far longer (up to 0.1 s after
a call), which on two cores takes the CPU from whatever runs next.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from fastlstm._kernels import sync

# How long an idle helper polls for its next task before it blocks, and how long the
# caller polls for the helpers' tasks before it blocks. Long enough for the Python
# between two parallel sections (tens of microseconds) and between calls in a loop;
# short enough that an idle process gives its cores back at once.
HELPER_SPIN_SECONDS = 0.002
JOIN_SPIN_SECONDS = 0.002
# Past JOIN_SPIN_SECONDS the caller naps this long between polls.
JOIN_NAP_SECONDS = 0.0002
# A helper that sees a new section polls this much longer before it takes the GIL: the
# caller that posted it holds the GIL until its own task's native code starts (a Numba
# dispatch, about a microsecond).
GIL_SETTLE_SECONDS = 0.000005

_controller: ThreadpoolController | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
# Calls from several Python threads may overlap (the kernels release the GIL): the pool
# and the BLAS hold are shared, so both change under this lock.
_lock = threading.Lock()
_hold_depth = 0
_held: list[tuple] = []  # (library, thread count before the hold) of the libraries held
_blas: list = []
_num_threads = max(1, min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS))


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pools but not their threads: tasks handed to them there
    # would never run. It starts pools of its own on first use.
    global _pool, _pool_size, _lock, _helpers
    _pool, _pool_size, _lock, _helpers = None, 0, threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _blas_libraries(refresh: bool = False) -> list:
    """The loaded BLAS libraries (looked up once; again with ``refresh``)."""
    global _controller, _blas
    if _controller is None or refresh:
        _controller = ThreadpoolController()
        _blas = [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]
    return _blas


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for fastlstm's parallel time loops, Numba and every loaded BLAS.

    Numba's count is set too (as DESIGN.md promises), so user code mixing Numba and
    fastlstm sees one setting; fastlstm's own kernels never open a Numba parallel region,
    so its pool stays idle.

    Parameters
    ----------
    n : int
        Number of threads, from 1 to ``numba.config.NUMBA_NUM_THREADS`` (the cores Numba
        saw at start-up).
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an integer, got {type(n).__name__} {n!r}")
    highest = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= highest:
        raise ValueError(f"n must be between 1 and {highest}, got {n}")
    numba.set_num_threads(n)
    for lib in _blas_libraries(refresh=True):
        lib.set_num_threads(n)
    _num_threads = n


def get_num_threads() -> int:
    """Number of threads fastlstm's parallel time loops use now."""
    return _num_threads


_STOP = object()
_NONE = np.zeros(0, np.int64)  # hand_off's "no arrival"


class _Helpers:
    """Threads that run the tasks after the first of a :func:`run_tasks` call.

    Hand-off through two counters that only grow: ``posted`` (sections handed out) and
    ``done`` (tasks finished), read and changed by native code that holds no GIL
    (:mod:`fastlstm._kernels.sync`). Whoever needs the GIL next must find it free: a
    thread asleep on the GIL is as slow to wake as one asleep on a lock. So a helper ends
    a task and starts polling for the next in one native call (the caller, polling
    ``done``, then finds the GIL free), and once it sees a new section it polls a few
    microseconds more (GIL_SETTLE_SECONDS) while the caller, which posted it holding the
    GIL, goes into its own task's native code. An idle helper blocks on its gate after
    HELPER_SPIN_SECONDS (the caller opens it when it posts); a caller still waiting after
    JOIN_SPIN_SECONDS naps between polls. One section at a time (``busy``).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.posted = np.zeros(1, np.int64)
        self.done = np.zeros(1, np.int64)
        # hand_off's targets: each helper's sections so far, the tasks the caller awaits,
        # and a target of 0 (posting waits for nothing).
        self.sections = np.zeros((count, 1), np.int64)
        self.awaited = np.zeros(1, np.int64)
        self.nothing = np.zeros(1, np.int64)
        # hand_off's clock scratch: one per helper, one for the caller (one at a time: busy)
        self.clocks = np.zeros((count + 1, 2), np.int64)
        self.caller_clock = self.clocks[count]
        # An asleep helper blocks on its gate (a lock held until the caller releases it);
        # ``guard`` orders "fall asleep" against "post": neither allocates, so a sleeping
        # pool never touches the Python heap (a timed wait would, every time it wakes).
        self.guard = threading.Lock()
        self.asleep = [False] * count
        self.gates = [threading.Lock() for _ in range(count)]
        for gate in self.gates:
            gate.acquire()
        # (bound once: a bound method made at the wait would be an allocation alive for as
        # long as the helper sleeps)
        self.gate_waits = [gate.acquire for gate in self.gates]
        self.busy = threading.Lock()
        self.stopped = False  # (under busy) a caller that finds it set uses the plain pool
        self.work: list = [None] * count
        self.errors: list = [None] * count
        for index in range(count):
            name = f"fastlstm-helper-{index}"
            threading.Thread(target=self._serve, args=(index,), name=name, daemon=True).start()

    def _sleep_until(self, index: int) -> None:
        with self.guard:
            if self.posted[0] >= self.sections[index, 0]:
                return
            self.asleep[index] = True
        self.gate_waits[index]()  # released by _post (after posted has grown)

    def _serve(self, index: int) -> None:
        spin = int(HELPER_SPIN_SECONDS * 1e9)
        settle = int(GIL_SETTLE_SECONDS * 1e9)
        sections, clock = self.sections[index], self.clocks[index]
        if not sync.hand_off(_NONE, self.posted, sections, 1, spin, settle, clock):
            self._sleep_until(index)
        while True:
            work = self.work[index]
            if work is _STOP:
                return
            if work is not None:
                function, task = work
                try:
                    function(*task)
                except BaseException as error:  # noqa: BLE001 (re-raised by the caller)
                    self.errors[index] = error
                # Hold nothing of the task while waiting: its arrays belong to the caller
                # (and a stream step with out= must leave nothing allocated behind).
                function = task = None
            work = None
            if not sync.hand_off(self.done, self.posted, sections, 1, spin, settle, clock):
                self._sleep_until(index)

    def _post(self) -> None:
        sync.hand_off(self.posted, self.posted, self.nothing, 0, 0, 0, self.caller_clock)
        with self.guard:
            for index, asleep in enumerate(self.asleep):
                if asleep:
                    self.asleep[index] = False
                    self.gates[index].release()

    def run(self, function: Callable[..., None], tasks: Sequence[tuple]) -> list:
        """Run the tasks (at most count + 1), the first on this thread; their errors."""
        extra = tasks[1:]
        for index in range(self.count):
            self.work[index] = (function, extra[index]) if index < len(extra) else None
            self.errors[index] = None
        self._post()
        try:
            function(*tasks[0])
        finally:
            # Every task must end before this returns or raises: a task still running
            # would go on writing into the caller's arrays.
            spin, count = int(JOIN_SPIN_SECONDS * 1e9), self.count
            clock = self.caller_clock
            while not sync.hand_off(_NONE, self.done, self.awaited, count, spin, 0, clock):
                spin, count = 0, 0
                time.sleep(JOIN_NAP_SECONDS)
            for index in range(self.count):
                self.work[index] = None
        errors = [error for error in self.errors if error is not None]
        for index in range(self.count):
            self.errors[index] = None
        return errors

    def stop(self) -> None:
        """End the helper threads (after the section in progress, if any)."""
        with self.busy:
            self.stopped = True
            self.work = [_STOP] * self.count
            self._post()


_helpers: _Helpers | None = None


def _run_on_helpers(function: Callable[..., None], tasks: Sequence[tuple]) -> bool:
    """Run the tasks on the polling helpers; False (nothing run) when they are busy with
    another thread's section or polling is unavailable (then the plain pool runs them)."""
    global _helpers
    if not sync.POLLING:
        return False
    with _lock:
        helpers = _helpers
        if helpers is None or helpers.count < len(tasks) - 1:
            if helpers is not None:
                helpers.stop()
            helpers = _helpers = _Helpers(len(tasks) - 1)
    if not helpers.busy.acquire(blocking=False):
        return False
    try:
        if helpers.stopped:  # replaced by a larger set since we looked
            return False
        errors = helpers.run(function, tasks)
    finally:
        helpers.busy.release()
    for error in errors:
        if error is not None:
            raise error
    return True


def run_tasks(function: Callable[..., None], tasks: Sequence[tuple]) -> None:
    """Run ``function(*task)`` for every task at once and return when all are done.

    The calling thread takes the first task, helper threads the others; an error in any
    task is raised here after all have finished.
    """
    global _pool, _pool_size
    if len(tasks) < 2:
        for task in tasks:
            function(*task)
        return
    if _run_on_helpers(function, tasks):
        return
    helpers = len(tasks) - 1
    with _lock:
        if helpers > _pool_size:
            _pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="fastlstm")
            _pool_size = helpers
        pool = _pool
    futures = [pool.submit(function, *task) for task in tasks[1:]]
    try:
        function(*tasks[0])
    finally:
        # Wait for every task before raising any error: a task still running would go on
        # writing into the caller's arrays.
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Hold every BLAS library to one thread inside the block, then restore each.

    Only the main thread holds: OpenBLAS ignores ``set_num_threads`` called from any other
    thread (measured), so a hold taken or released there could never be undone reliably.
    On other threads the block runs with the BLAS as it is (correct, possibly
    oversubscribed). Holds nest on the main thread; the outermost restores.
    """
    global _hold_depth, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _lock:
        if _hold_depth == 0:
            libraries = _blas_libraries()
            # Only libraries not already on one thread are set (each call costs about a
            # microsecond, and a forward holds once).
            _held = [(lib, lib.get_num_threads()) for lib in libraries]
            _held = [(lib, count) for lib, count in _held if count != 1]
            for lib, _ in _held:
                lib.set_num_threads(1)
        _hold_depth += 1
    try:
        yield
    finally:
        with _lock:
            _hold_depth -= 1
            if _hold_depth == 0:
                for lib, count in _held:
                    lib.set_num_threads(count)
