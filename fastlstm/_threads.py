"""Thread control: Numba's pool and the BLAS libraries' pools, set together.

fastlstm runs on two kinds of threads: Numba's (the parallel time loops) and the BLAS's
(the large GEMMs NumPy and the kernels call). On a small machine they must not stack up:
while a parallel kernel runs, each of its tasks calls BLAS on its own rows, so BLAS is
held to one thread for that span and given back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None


def _blas_libraries() -> list:
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in Numba's parallel kernels and in every loaded BLAS library.

    Parameters
    ----------
    n : int
        Number of threads, from 1 to ``numba.config.NUMBA_NUM_THREADS`` (the cores Numba
        saw at start-up).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an integer, got {type(n).__name__} {n!r}")
    highest = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= highest:
        raise ValueError(f"n must be between 1 and {highest}, got {n}")
    numba.set_num_threads(n)
    for lib in _blas_libraries():
        lib.set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads Numba's parallel kernels use now."""
    return numba.get_num_threads()


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Hold every BLAS library to one thread inside the block, then restore each."""
    libraries = _blas_libraries()
    before = [lib.get_num_threads() for lib in libraries]
    for lib in libraries:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, count in zip(libraries, before, strict=True):
            lib.set_num_threads(count)
