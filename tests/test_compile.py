"""Compilation: ahead of time (`fastlstm compile`), the first-call notice, and Numba's cache
when it cannot be written or when two processes fill it at once.

Each test runs fresh interpreters with their own NUMBA_CACHE_DIR, so what they compile
never touches the suite's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fastlstm as fl

ROOT = Path(__file__).resolve().parent.parent

# A forward in a fresh interpreter: prints its output's bytes (hex) and how many kernels
# Numba compiled and loaded from its cache.
FORWARD = """
import numpy as np, fastlstm as fl
from fastlstm import _kernels
m = fl.LSTM(3, 5, seed=0).eval()
out, _ = m(np.linspace(-2, 2, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3))
stats = _kernels.layer_forward_rows.stats
print(out.tobytes().hex(), sum(stats.cache_misses.values()), sum(stats.cache_hits.values()))
"""

NOTICE = "fastlstm: compiling its float32 forward kernels for this CPU"


def run(args: list[str], cache: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def expected_hex() -> str:
    m = fl.LSTM(3, 5, seed=0).eval()
    out, _ = m(np.linspace(-2, 2, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3))
    return out.tobytes().hex()


def test_two_processes_fill_one_empty_cache_at_once_then_a_third_loads_it(tmp_path):
    cache = str(tmp_path / "cache")
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: run([sys.executable, "-c", FORWARD], cache), range(2))
    want = expected_hex()
    for done in (first, second):
        assert done.returncode == 0, done.stderr
        data, misses, _ = done.stdout.split()
        assert data == want  # the same bits as this process's (cached or not) kernels
        assert int(misses) == 1  # each compiled: the cache was empty when it looked
    assert NOTICE in first.stderr and NOTICE in second.stderr
    third = run([sys.executable, "-c", FORWARD], cache)
    assert third.returncode == 0, third.stderr
    data, misses, hits = third.stdout.split()
    assert (data, int(misses), int(hits)) == (want, 0, 1)
    assert NOTICE not in third.stderr  # nothing to compile, nothing said


def test_an_unwritable_cache_folder_still_computes(tmp_path):
    """NUMBA_CACHE_DIR cannot be made (a file stands in its path): Numba falls back to its
    other cache folders, or compiles; the numbers are the same either way."""
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    done = run([sys.executable, "-c", FORWARD], str(blocker / "cache"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == expected_hex()
    assert blocker.read_text() == "not a folder"


def test_no_cache_folder_at_all_compiles_per_process(monkeypatch):
    """When Numba finds no folder to cache in, it refuses cache=True when decorating: the
    kernels then compile without a cache, with a warning, and still compute."""
    import numba

    from fastlstm import _config

    real = numba.njit

    def no_locator(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real(*args, **kwargs)

    monkeypatch.setattr(_config.numba, "njit", no_locator)

    def double(values):
        return values * 2

    with pytest.warns(UserWarning, match="compiling without cache"):
        kernel = _config.jit(double)
    assert kernel._cache.__class__.__name__ == "NullCache"
    np.testing.assert_array_equal(kernel(np.arange(3.0)), [0.0, 2.0, 4.0])


def test_compile_command_fills_the_cache_and_then_finds_everything_there(tmp_path):
    cache = str(tmp_path / "cache")
    command = [sys.executable, "-m", "fastlstm", "compile", "--dtype", "float32"]
    first = run(command, cache)
    assert first.returncode == 0, first.stderr
    assert "compiled in" in first.stdout
    for kernel in ("layer_forward_rows", "layer_forward_one_row", "layer_forward_units"):
        assert kernel in first.stdout
    assert "100%" in first.stderr  # the progress bar ran to the end
    assert NOTICE not in first.stderr  # the bar says what compiles; no notice on top
    again = run(command, cache)
    assert again.returncode == 0, again.stderr
    assert "every kernel came from Numba's cache" in again.stdout
    forward = run([sys.executable, "-c", FORWARD], cache)
    assert forward.stdout.split()[1:] == ["0", "1"]  # the real call compiled nothing
    assert NOTICE not in forward.stderr


@pytest.mark.parametrize("dtype", ["float16", "", "float32,int8"])
def test_compile_command_refuses_other_dtypes(dtype):
    done = subprocess.run(
        [sys.executable, "-m", "fastlstm", "compile", "--dtype", dtype],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "expected float32 and/or float64" in done.stderr
