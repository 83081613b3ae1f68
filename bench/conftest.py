"""Options and fixtures of the pytest-benchmark suite (see ``bench/test_bench.py``)."""

from __future__ import annotations

import pytest

from fastlstm import bench


def pytest_addoption(parser):
    group = parser.getgroup("fastlstm benchmarks")
    group.addoption(
        "--bench-threads",
        type=int,
        default=bench.DEFAULT_THREADS,
        help="threads on each side (fastlstm, torch, ONNX Runtime); default 2",
    )
    group.addoption(
        "--reference-large",
        action="store_true",
        help="also time fastlstm.reference on the recog and large shapes (seconds per call)",
    )


@pytest.fixture(scope="session", autouse=True)
def bench_threads(request):
    """Every benchmark runs with the same thread count on every side."""
    n = request.config.getoption("--bench-threads")
    with bench.threads(n):
        yield n
