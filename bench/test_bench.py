"""pytest-benchmark suite: the grid x {fastlstm, reference, torch, onnxruntime} x
{forward, train} x {float32, float64}.

Not collected by a plain ``pytest`` (``testpaths = ["tests"]`` in pyproject.toml); run it
from the repository root with the path::

    .venv/bin/pytest bench/ --benchmark-only                      # everything but reference-large
    .venv/bin/pytest bench/ --benchmark-only -k "medium and float32"          # one slice
    .venv/bin/pytest bench/ --benchmark-only --benchmark-group-by=param:case  # sides side by side
    .venv/bin/pytest bench/ --benchmark-only --reference-large    # + the reference on recog/large
    .venv/bin/pytest bench/ --benchmark-only --bench-threads 1    # 1 thread per side (default 2)

Compare two runs (e.g. before and after a change) with pytest-benchmark's storage
(``.benchmarks/`` in the working directory)::

    .venv/bin/pytest bench/ --benchmark-only --benchmark-save=before
    # ... change the code ...
    .venv/bin/pytest bench/ --benchmark-only --benchmark-save=after --benchmark-compare=0001
    .venv/bin/pytest-benchmark compare 0001 0002 --group-by=param:case --columns=median,iqr,rounds
    # --benchmark-compare-fail=median:10% makes the run fail on a 10 % slowdown

Ids read ``<shape>-<mode>-<dtype>-<side>``, e.g. ``medium-train-float32-torch``; the
``case`` parameter (shape-mode-dtype) groups the four sides of one problem together.
Each benchmark builds its side once, calls it once outside the timed body (Numba
compilation or cache load, torch's and ONNX Runtime's first-run set-up), then
pytest-benchmark times the calls.

Scope choices, each shown as a skip with its reason rather than hidden:

- the reference on recog and large is skipped unless ``--reference-large``: it takes
  seconds per call there and adds minutes to a run; ``fastlstm bench`` times it on every
  shape (with a time budget);
- ONNX Runtime has no training step, and its CPU LSTM has no float64 kernel (checked at
  run time: it runs if a later ONNX Runtime adds one);
- peers that are not installed are skipped, never replaced.

For the table of ratios, GFLOP/s and compile times use ``fastlstm bench`` instead: it
alternates fastlstm and each peer in one process, which is what the ratios need.
"""

from __future__ import annotations

import pytest

from fastlstm import bench, peers

SIDES = ("fastlstm", "reference", "torch", "onnxruntime")
DTYPES = ("float32", "float64")
SLOW_REFERENCE = ("recog", "large")


def _cases():
    for shape in bench.GRID.values():
        for mode in bench.MODES:
            for dtype in DTYPES:
                for side in SIDES:
                    if side == "onnxruntime" and mode == "train":
                        continue  # no such thing: ORT's LSTM is inference only
                    case = f"{shape.name}-{mode}-{dtype}"
                    yield pytest.param(shape, mode, dtype, side, case, id=f"{case}-{side}")


@pytest.mark.parametrize(("shape", "mode", "dtype", "side", "case"), list(_cases()))
def test_lstm(benchmark, request, bench_threads, shape, mode, dtype, side, case):
    if side != "fastlstm" and side not in peers.available_peers():
        pytest.skip(f"{side} is not installed")
    if side == "reference" and shape.name in SLOW_REFERENCE:
        if not request.config.getoption("--reference-large"):
            pytest.skip(
                f"reference on {shape.name} takes seconds per call: run with --reference-large"
            )
    lstm = bench.make_model(shape, dtype)
    reason = peers.unsupported(side, lstm, mode) if side != "fastlstm" else None
    if reason:
        pytest.skip(reason)
    x, dout = bench.make_inputs(lstm, shape)
    call = bench.make_call(side, lstm, x, dout, mode, threads=bench_threads)
    call()  # warm-up, outside the timed body: compilation, caches, first-run set-up
    benchmark.extra_info.update(
        shape=shape.label,
        gflop=bench.flops(shape, mode=mode) / 1e9,
        threads=bench_threads,
    )
    benchmark(call)
