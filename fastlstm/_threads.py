"""Thread control: fastlstm's task pool and the BLAS libraries' pools, set together.

fastlstm runs its parallel work on its own threads: time loops as tasks (directions, batch
row chunks, or a one-row batch's hidden units), each a GIL-free Numba kernel over the whole
sequence, and the GEMMs outside the loops in parts. The BLAS is held to one thread
around every engine call into it: on two cores the pools must not stack up, and OpenBLAS's
threads keep spinning after a call and take a core from the tasks that follow.

The task pool is a plain thread pool whose idle workers block. Numba's OpenMP workers
spin for a while after each parallel region, which on two cores takes the CPU from
whatever runs next, and collapses when other processes want the cores.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
from threadpoolctl import ThreadpoolController

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
    # A forked child inherits the executor but not its worker threads: tasks submitted
    # there would never run. It starts a pool of its own on first use.
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


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


def run_tasks(function: Callable[..., None], tasks: Sequence[tuple]) -> None:
    """Run ``function(*task)`` for every task at once and return when all are done.

    The calling thread takes the first task, pool threads the others; an error in any
    task is raised here after all have finished.
    """
    global _pool, _pool_size
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
