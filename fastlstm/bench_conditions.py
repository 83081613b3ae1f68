"""``fastlstm bench`` under other conditions than the grid's: next to busy processes
(``--under-load``: :func:`under_load`) and in a fresh interpreter, with Numba's cache as
it is and empty (``--cold-start``: :func:`cold_start`). The same models, inputs, calls,
threads and settling as the grid (:mod:`fastlstm.bench`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from fastlstm import peers
from fastlstm.bench import (
    DEFAULT_REPEATS,
    DEFAULT_SETTLE,
    DEFAULT_THREADS,
    GRID,
    Shape,
    make_call,
    make_inputs,
    make_model,
    settle_call,
    threads,
    time_call,
)

# ------------------------------------------------------------------------------ under load


def _spin(seconds: float, ready: Any) -> None:
    """A busy loop for at most ``seconds`` (the child processes of :func:`busy_processes`)."""
    ready.set()
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


@contextlib.contextmanager
def busy_processes(count: int = 2, seconds: float = 300.0) -> Iterator[None]:
    """``count`` processes each spinning one CPU, for at most ``seconds``, always terminated."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(count)]
    procs = [context.Process(target=_spin, args=(seconds, r), daemon=True) for r in ready]
    try:
        for proc in procs:
            proc.start()
        for event in ready:
            event.wait(timeout=120)
        yield
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


def under_load(
    shape: Shape = GRID["medium"],
    *,
    peer_names: Sequence[str] = ("torch",),
    dtype: Any = np.float32,
    threads_n: int = DEFAULT_THREADS,
    repeats: int = DEFAULT_REPEATS,
    busy: int = 2,
    settle: float = DEFAULT_SETTLE,
) -> dict[str, Any]:
    """Forward time of fastlstm and each peer, alone and next to ``busy`` spinning processes.

    Alternating runs in both conditions, each timed call after the side settles (as in
    the grid); slowdown = loaded median / unloaded median.
    """
    chosen = [p for p in peer_names if p in peers.available_peers() and p != "reference"]
    with threads(threads_n, torch_too="torch" in chosen):
        lstm = make_model(shape, dtype)
        x, dout = make_inputs(lstm, shape)
        calls = {"fastlstm": make_call("fastlstm", lstm, x, dout, "forward")}
        for name in chosen:
            if not peers.unsupported(name, lstm):
                calls[name] = make_call(name, lstm, x, dout, "forward", threads=threads_n)
        for call in calls.values():
            call()
            call()
        medians = {}
        for condition in ("alone", "loaded"):
            samples: dict[str, list[float]] = {name: [] for name in calls}
            context = busy_processes(busy) if condition == "loaded" else contextlib.nullcontext()
            with context:
                for _ in range(repeats):
                    for name, call in calls.items():
                        settle_call(call, settle)
                        samples[name].append(time_call(call))
            medians[condition] = {name: statistics.median(s) for name, s in samples.items()}
    sides = {
        name: {
            "alone_s": medians["alone"][name],
            "loaded_s": medians["loaded"][name],
            "slowdown": medians["loaded"][name] / medians["alone"][name],
        }
        for name in calls
    }
    return {
        "shape": asdict(shape),
        "dtype": np.dtype(dtype).name,
        "threads": threads_n,
        "busy_processes": busy,
        "repeats": repeats,
        "settle_s": settle,
        "sides": sides,
    }


def format_under_load(result: dict[str, Any]) -> str:
    shape = Shape(**result["shape"])
    lines = [
        f"under load: {shape.name} ({shape.label}) forward, {result['dtype']}, "
        f"{result['threads']} threads per side, {result['busy_processes']} busy processes, "
        f"medians of {result['repeats']} alternating runs, each after {result['settle_s']:g} s "
        "of settling",
        f"{'side':<12} {'alone ms':>10} {'loaded ms':>10} {'slowdown':>9}",
    ]
    for name, side in result["sides"].items():
        lines.append(
            f"{name:<12} {side['alone_s'] * 1e3:>10.2f} {side['loaded_s'] * 1e3:>10.2f} "
            f"{side['slowdown']:>8.2f}x"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- cold start

_COLD_START = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import fastlstm as fl
imported = time.perf_counter()
B, T, I, H, threads, dtype, train = {args!r}
fl.set_num_threads(threads)
lstm = fl.LSTM(I, H, dtype=dtype, seed=0).eval()
x = np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)
t0 = time.perf_counter(); lstm(x); t1 = time.perf_counter(); lstm(x); t2 = time.perf_counter()
result = {{"import_s": imported - start, "first_forward_s": t1 - t0, "second_forward_s": t2 - t1}}
if train:
    lstm.train()
    dout = np.ones((T, B, H), dtype)
    t0 = time.perf_counter(); lstm(x); lstm.backward(dout); t1 = time.perf_counter()
    lstm.zero_grad(); lstm(x); lstm.backward(dout); t2 = time.perf_counter()
    result.update(first_train_step_s=t1 - t0, second_train_step_s=t2 - t1)
print(json.dumps(result))
"""


def cold_start(
    shape: Shape = GRID["medium"],
    *,
    dtype: Any = np.float32,
    threads_n: int = DEFAULT_THREADS,
    train: bool = False,
    empty_cache: bool = True,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Import + first calls in a fresh interpreter, with Numba's cache as it is and empty.

    "existing cache": the environment as given (the cache beside the package, in
    ``__pycache__``, or ``$NUMBA_CACHE_DIR``); "empty cache": ``NUMBA_CACHE_DIR`` set to a new
    temporary folder, so every kernel is compiled. "process_s" is the whole subprocess,
    interpreter start-up included.
    """
    args = (
        shape.batch,
        shape.seq,
        shape.input,
        shape.hidden,
        threads_n,
        np.dtype(dtype).name,
        train,
    )
    code = _COLD_START.format(args=args)
    cases = {}
    with tempfile.TemporaryDirectory(prefix="fastlstm-numba-cache-") as empty:
        cases_env = [("existing cache", {})]
        if empty_cache:
            cases_env.append(("empty cache", {"NUMBA_CACHE_DIR": empty}))
        for label, extra in cases_env:
            env = {**os.environ, **extra}
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", code],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"cold start ({label}) failed:\n{done.stderr[-2000:]}")
            case = json.loads(done.stdout.strip().splitlines()[-1])
            case["process_s"] = elapsed
            cases[label] = case
    return {
        "shape": asdict(shape),
        "dtype": np.dtype(dtype).name,
        "threads": threads_n,
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"),
        "cases": cases,
    }


def format_cold_start(result: dict[str, Any]) -> str:
    shape = Shape(**result["shape"])
    keys = (
        "import_s",
        "first_forward_s",
        "second_forward_s",
        "first_train_step_s",
        "second_train_step_s",
        "process_s",
    )
    titles = (
        "import",
        "1st forward",
        "2nd forward",
        "1st train step",
        "2nd train step",
        "whole process",
    )
    used = [
        (k, t)
        for k, t in zip(keys, titles, strict=True)
        if all(k in case for case in result["cases"].values())
    ]
    lines = [
        f"cold start: {shape.name} ({shape.label}), {result['dtype']}, {result['threads']} "
        "threads, seconds in a fresh interpreter",
        f"{'':<16}" + "".join(f"{t:>16}" for _, t in used),
    ]
    for label, case in result["cases"].items():
        lines.append(f"{label:<16}" + "".join(f"{case[k]:>16.3f}" for k, _ in used))
    return "\n".join(lines)
