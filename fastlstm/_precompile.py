"""Compiling ahead of time, timing what compiles, and saying so before a long first call.

Numba compiles a kernel on its first call and caches the machine code per CPU, kernel
variant and source (:func:`fastlstm._config.jit`). Every new environment, container, CI job
and machine pays that once. This module:

- :func:`precompile`: runs tiny calls that take every route the engine has (a batch of
  rows with the input projection inside or before the loop, a batch of one row, the
  hidden-unit split of large weights; forward, and with ``train`` backward and the weight
  gradients), so that Numba compiles and caches each kernel a real call will use.
  ``fastlstm compile`` runs it with a progress bar.
- :class:`CompileTimer`: Numba's compile events, per top-level kernel (inclusive of what
  it compiles beneath it), for the progress bar and the per-kernel table.
- :func:`notice_first_compile`: a one-line notice on stderr before a call that is about to
  compile the main kernels (none of this CPU's cache entries exist yet).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numba.core import event
from numba.core.registry import cpu_target
from numba.np.numpy_support import from_dtype

from fastlstm import _config, _cpu

# What the notice says: measured on a Zen 4 (medium, float32, empty cache) 7 s for the
# forward kernels, 9 s for the training ones; other CPUs compile faster or slower.
_ROUGH_SECONDS = {"forward": "5-15", "backward": "5-15"}
_noticed: set[tuple[np.dtype, str, object]] = set()
_quiet = threading.local()  # set while precompile runs: its progress bar says it all


@dataclass
class CompileTimer(event.Listener):
    """Seconds per top-level kernel compiled while installed (callees counted in their caller)."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_kernel: Callable[[str], None] | None = None
    _stack: list[tuple[str, float]] = field(default_factory=list)

    def on_start(self, ev: event.Event) -> None:
        name = ev.data["dispatcher"].py_func.__qualname__
        if not self._stack and self.on_kernel is not None:
            self.on_kernel(name)
        self._stack.append((name, time.perf_counter()))

    def on_end(self, ev: event.Event) -> None:
        name, start = self._stack.pop()
        if not self._stack:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def installed(self) -> Iterator[CompileTimer]:
        with event.install_listener("numba:compile", self):
            yield self


@contextlib.contextmanager
def _every_route():
    """Thresholds set so that tiny calls take the routes of large ones (then restored):
    yields the modules that read them, (routes, engine)."""
    from fastlstm import _engine, _routes

    saved = [
        (module, name, getattr(module, name))
        for module, names in (
            (_routes, ("FUSED_MAX_WEIGHT_BYTES", "PARALLEL_MIN_MACS", "UNITS_STEP_MIN_MACS")),
            (_engine, ("PACKED_PROJECTION_BYTES",)),
        )
        for name in names
    ]
    try:
        yield _routes, _engine
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _tasks(dtypes: Sequence[str], train: bool) -> list[tuple[str, Callable[[], None]]]:
    """(label, call) for every route a real call of these dtypes may take."""
    import fastlstm as fl

    tasks = []
    for name in dtypes:
        dtype = np.dtype(name)
        rng = np.random.default_rng(0)
        # 256 hidden units: two chunks of the one-row kernel and two panels per thread, so
        # that the hidden-unit splits happen; 2 steps keep the arithmetic trivial.
        model = fl.LSTM(3, 256, dtype=dtype, seed=0)
        modes = ("forward", "training step") if train else ("forward",)
        # (label, batch, the loop projects its inputs, parallel plans)
        routes = [
            ("batch rows", 5, True, False),
            ("batch rows, input projection first, hidden units split", 5, False, True),
            ("one row", 1, False, False),
            ("one row, hidden units split", 1, False, True),
        ]
        for mode in modes:
            for label, batch, fused, parallel in routes:
                x = rng.standard_normal((2, batch, 3)).astype(dtype)

                def run(x=x, model=model, mode=mode, fused=fused, parallel=parallel) -> None:
                    with _every_route() as (routes, engine):
                        routes.FUSED_MAX_WEIGHT_BYTES = 1 << 40 if fused else 0
                        engine.PACKED_PROJECTION_BYTES = 1 << 40
                        routes.PARALLEL_MIN_MACS = 0 if parallel else 1 << 62
                        routes.UNITS_STEP_MIN_MACS = 0 if parallel else 1 << 62
                        model.train(mode != "forward")
                        out, _ = model(x)
                        if mode != "forward":
                            model.backward(np.ones_like(out))
                            model.zero_grad()

                tasks.append((f"{name} {mode}: {label}", run))
    return tasks


def precompile(
    dtypes: Sequence[str] = ("float32",),
    *,
    train: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Compile (or load from Numba's cache) every kernel that calls in these dtypes use.

    Returns seconds per top-level kernel that compiled (empty when all came from the cache).
    With ``progress``, a tqdm bar per route on stderr names the kernel compiling.
    """
    from tqdm import tqdm

    from fastlstm import _threads

    tasks = _tasks(dtypes, train)
    bar = tqdm(total=len(tasks), desc="fastlstm compile", unit="route", disable=not progress)
    timer = CompileTimer(on_kernel=lambda name: bar.set_postfix_str(name, refresh=True))
    previous = _threads.get_num_threads()
    _quiet.on = True
    try:
        _threads.set_num_threads(max(2, previous))  # the split routes need two threads
        with timer.installed():
            for label, run in tasks:
                bar.set_description_str(label)
                run()
                bar.update()
    finally:
        _quiet.on = False
        _threads.set_num_threads(previous)
        bar.close()
    return timer.seconds


def _cached_for_this_cpu(dispatcher, dtype: np.dtype) -> bool:
    """Whether Numba's cache holds ``dispatcher`` compiled for this CPU, variant, source and
    dtype (read from its index; no code is loaded)."""
    try:
        index = dispatcher._cache._cache_file._load_index()
    except Exception:  # no cache, an unreadable index: say nothing rather than guess
        return True
    magic = cpu_target.target_context.codegen().magic_tuple()
    wanted = from_dtype(dtype)
    for key in index:
        try:
            sig, key_magic, _, kernel_key = key
        except (TypeError, ValueError):
            continue
        if key_magic == magic and kernel_key == _config.KERNEL_KEY:
            first = sig[0] if len(sig) else None
            if getattr(first, "dtype", None) == wanted:
                return True
    return False


def notice_first_compile(dispatcher, dtype: np.dtype, phase: str) -> None:
    """Print one line to stderr when ``dispatcher`` is about to compile for ``dtype``: not
    compiled in this process and not in the cache for this CPU. Once per process, phase and
    kernel (the routes run different loop kernels: a thin batch's split its own)."""
    key = (np.dtype(dtype), phase, dispatcher)  # (not str(dtype): microseconds, every call)
    if key in _noticed or getattr(_quiet, "on", False):
        return
    _noticed.add(key)
    wanted = from_dtype(dtype)
    if any(getattr(sig[0], "dtype", None) == wanted for sig in dispatcher.signatures if sig):
        return
    if _cached_for_this_cpu(dispatcher, dtype):
        return
    print(
        f"fastlstm: compiling its {dtype} {phase} kernels for this CPU ({_cpu.CPU.llvm_name}, "
        f"{_cpu.VARIANT.name}), once: ~{_ROUGH_SECONDS[phase]} s "
        "(`fastlstm compile` does it ahead of time)",
        file=sys.stderr,
        flush=True,
    )
