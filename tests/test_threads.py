"""fl.set_num_threads governs fastlstm's tasks, Numba and every loaded BLAS together."""

from __future__ import annotations

import numba
import pytest
from threadpoolctl import threadpool_info

import fastlstm as fl
from fastlstm._threads import blas_single_threaded


@pytest.fixture
def restore_threads():
    previous = fl.get_num_threads()
    yield
    fl.set_num_threads(previous)


def blas_thread_counts() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


@pytest.mark.parametrize("n", [1, 2])
def test_set_num_threads_sets_numba_and_every_blas(restore_threads, n):
    if n > numba.config.NUMBA_NUM_THREADS:
        pytest.fail(f"this machine has fewer than {n} cores; the suite expects at least 2")
    fl.set_num_threads(n)
    assert fl.get_num_threads() == n
    assert numba.get_num_threads() == n
    counts = blas_thread_counts()
    assert counts and all(count == n for count in counts)


def test_blas_single_threaded_restores_each_library(restore_threads):
    fl.set_num_threads(2)
    with blas_single_threaded():
        assert all(count == 1 for count in blas_thread_counts())
    assert all(count == 2 for count in blas_thread_counts())


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "between 1 and"),
        (10_000, ValueError, "between 1 and"),
        (1.5, TypeError, "integer"),
        (True, TypeError, "integer"),
    ],
)
def test_bad_thread_counts_are_refused_and_change_nothing(restore_threads, value, error, match):
    before = (fl.get_num_threads(), numba.get_num_threads(), blas_thread_counts())
    with pytest.raises(error, match=match):
        fl.set_num_threads(value)
    assert (fl.get_num_threads(), numba.get_num_threads(), blas_thread_counts()) == before


def test_nested_holds_restore_once_and_other_threads_change_nothing(restore_threads):
    """Holds nest on the main thread (the outermost restores); a hold on another thread is a
    no-op, because OpenBLAS ignores thread-count changes made from non-main threads."""
    import threading

    fl.set_num_threads(2)
    with blas_single_threaded():
        with blas_single_threaded():
            assert all(count == 1 for count in blas_thread_counts())
        assert all(count == 1 for count in blas_thread_counts())
    assert all(count == 2 for count in blas_thread_counts())

    seen = []

    def other_thread():
        with blas_single_threaded():
            seen.append(blas_thread_counts())

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(10)
    assert seen and all(count == 2 for count in seen[0])
    assert all(count == 2 for count in blas_thread_counts())
