"""fl.set_num_threads governs fastlstm's tasks, Numba and every loaded BLAS together."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import fastlstm as fl
from fastlstm._threads import blas_single_threaded, run_tasks


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


def test_run_tasks_waits_for_every_task_before_raising():
    finished = []

    def task(kind):
        if kind == "fail":
            raise RuntimeError("task failed")
        time.sleep(0.2)
        finished.append(kind)

    with pytest.raises(RuntimeError, match="task failed"):
        run_tasks(task, [("fail",), ("slow",)])
    assert finished == ["slow"]  # the other task ran to its end first


def test_run_tasks_waits_for_a_helper_that_fails_while_the_caller_is_slow():
    finished = []

    def task(kind):
        if kind == "fail":
            raise ValueError("helper failed")
        time.sleep(0.05)  # longer than the caller's poll: it naps and looks again
        finished.append(kind)

    with pytest.raises(ValueError, match="helper failed"):
        run_tasks(task, [("slow",), ("fail",)])
    assert finished == ["slow"]


@pytest.mark.parametrize("pause", [0.0, 0.01])
def test_run_tasks_hands_every_section_to_the_helpers_awake_or_asleep(pause):
    """Many sections in a row, with the helper still polling (no pause) or asleep (a pause
    longer than HELPER_SPIN_SECONDS): every task runs exactly once, on another thread."""
    from fastlstm import _threads

    assert pause == 0.0 or pause > _threads.HELPER_SPIN_SECONDS
    seen = []

    def task(section, part):
        seen.append((section, part, threading.get_ident()))

    for section in range(200 if pause == 0.0 else 20):
        run_tasks(task, [(section, 0), (section, 1)])
        time.sleep(pause)
    sections = 200 if pause == 0.0 else 20
    assert sorted((s, p) for s, p, _ in seen) == [(s, p) for s in range(sections) for p in (0, 1)]
    caller = threading.get_ident()
    assert all((ident == caller) == (part == 0) for _, part, ident in seen)


def test_run_tasks_with_more_tasks_than_helpers_starts_more():
    """Three tasks after two: a larger set of helpers replaces the first (which stops);
    two tasks after that run on the larger set, its extra helper idle."""
    from fastlstm import _threads

    seen = []

    def task(section, part):
        seen.append((section, part, threading.get_ident()))

    run_tasks(task, [(0, 0), (0, 1)])
    run_tasks(task, [(1, 0), (1, 1), (1, 2)])
    assert _threads._helpers.count >= 2
    run_tasks(task, [(2, 0), (2, 1)])
    assert sorted((s, p) for s, p, _ in seen) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)
    ]  # fmt: skip
    assert len({ident for s, _, ident in seen if s == 1}) == 3  # on three threads


def test_run_tasks_without_polling_takes_the_plain_pool(monkeypatch):
    """Where the helpers cannot poll (not Linux), tasks go to a plain pool: the same
    results, every task on its own thread, errors after every task."""
    from fastlstm._kernels import sync

    monkeypatch.setattr(sync, "POLLING", False)
    seen = []

    def task(part):
        if part == 2:
            raise KeyError("third")
        time.sleep(0.01)
        seen.append((part, threading.get_ident()))

    run_tasks(task, [(0,), (1,)])
    assert sorted(part for part, _ in seen) == [0, 1] and len({i for _, i in seen}) == 2
    seen.clear()
    with pytest.raises(KeyError, match="third"):
        run_tasks(task, [(0,), (1,), (2,)])
    assert sorted(part for part, _ in seen) == [0, 1]


def test_run_tasks_from_two_threads_at_once_runs_both():
    """A second calling thread finds the helpers busy and takes the plain pool."""
    results = {}

    def task(out, index):
        time.sleep(0.01)
        out[index] = threading.get_ident()

    def caller(name):
        out = [None, None]
        for _ in range(20):
            run_tasks(task, [(out, 0), (out, 1)])
        results[name] = out

    threads = [threading.Thread(target=caller, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(results) == {"a", "b"}
    assert all(None not in out and out[0] != out[1] for out in results.values())


def _child_forward(queue):
    fl.set_num_threads(2)
    model = fl.LSTM(16, 64, seed=0).eval()
    x = np.ones((50, 24, 16), np.float32)  # large enough for two row chunks
    queue.put(float(model(x)[0].sum()))


def test_a_forked_child_runs_parallel_loops(restore_threads):
    """The task pool is rebuilt in a forked child (it inherits no worker threads)."""
    fl.set_num_threads(2)
    model = fl.LSTM(16, 64, seed=0).eval()
    expected = float(model(np.ones((50, 24, 16), np.float32))[0].sum())  # pool started
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_forward, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


@pytest.mark.parametrize("batch", [1, 3])
def test_results_do_not_depend_on_the_thread_count_below_the_parallel_threshold(
    rng, restore_threads, batch
):
    """Small enough for one task and one part: the BLAS is still held to one thread, so
    float32 sums come out the same (a threaded BLAS rounded the input projection here)."""
    model = fl.LSTM(40, 30, seed=3)
    x = rng.standard_normal((300 // batch, batch, 40)).astype(np.float32)
    results = []
    for threads in (1, 2):
        fl.set_num_threads(threads)
        model.zero_grad()
        out, (h_n, c_n) = model(x)
        dx = model.backward(np.ones_like(out))[0]
        results.append([out, h_n, c_n, dx, *(g.copy() for g in model.grads.values())])
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_array_equal(got, want)
