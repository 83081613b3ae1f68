"""Where fastlstm's time goes, phase by phase: the engine of ``fastlstm profile``.

The phases are the engine's own (:mod:`fastlstm._engine`, its ``timings`` argument):
``input_gemm`` (x W_ih^T for every step at once, when the loop does not project each
step's inputs itself), ``pack_weights`` (weights into the micro-kernel's panels, once per
layer call, forward and backward), ``time_loop`` (the kernel: matrix products and gate
math), ``dropout`` (masks between layers, training only), ``backward_time_loop`` and
``weight_gradients`` (the GEMMs over every step: dW_ih, dW_hh, dx). Each is averaged over
the repeats; "other" is what the engine spends outside them (allocation) and "API" what
the public call adds (validation, copies).

The forward time loop is split further by timing its products alone
(``_kernels.recurrent_products_only``) with the same sizes, dtype and threading as the
loop, following the engine's own plan (``_routes.row_plan``: the same tasks on its thread
pool, or serially; BLAS held to one thread or not): gate math is then estimated as
``time_loop - matrix products``. It is an estimate: inside the loop the two compete for
the same caches.

The first calls in the process are timed apart (Numba compiles, or loads from its cache,
each kernel then), with Numba's own count of cache hits and misses.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import statistics
import time
from dataclasses import asdict
from typing import Any

import numba
import numpy as np

import fastlstm as fl
from fastlstm import _config, _engine, _kernels, _memory, _routes
from fastlstm._kernels import packing
from fastlstm._kernels.products import projected_in_loop
from fastlstm._threads import blas_single_threaded, run_tasks
from fastlstm.bench import DEFAULT_THREADS, Shape, cpu_text, machine_info, threads

FORWARD_PHASES = ("input_gemm", "pack_weights", "time_loop", "dropout")
BACKWARD_PHASES = ("backward_time_loop", "weight_gradients")
PHASES = FORWARD_PHASES + BACKWARD_PHASES


def _dispatchers() -> list:
    found = []
    for info in pkgutil.iter_modules(_kernels.__path__):
        module = importlib.import_module(f"{_kernels.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, numba.core.registry.CPUDispatcher) and value not in found:
                found.append(value)
    return found


def _numba_counts() -> dict[str, int]:
    """Kernels in memory, and Numba's cache hits and misses so far, over fastlstm's kernels."""
    counts = {"signatures": 0, "cache_hits": 0, "cache_misses": 0}
    for dispatcher in _dispatchers():
        counts["signatures"] += len(dispatcher.signatures)
        stats = dispatcher.stats
        counts["cache_hits"] += sum(stats.cache_hits.values())
        counts["cache_misses"] += sum(stats.cache_misses.values())
    return counts


def _first_call(call) -> dict[str, Any]:
    before = _numba_counts()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    after = _numba_counts()
    return {
        "seconds": seconds,
        "new_kernels": after["signatures"] - before["signatures"],
        "cache_hits": after["cache_hits"] - before["cache_hits"],
        "compiled": after["cache_misses"] - before["cache_misses"],
    }


def phase_flops(
    shape: Shape, *, layers: int = 1, directions: int = 1, proj_size: int = 0, fused: bool = False
) -> dict[str, float]:
    """Floating-point operations of each phase's matrix products, summed over layers.

    The time loop counts its recurrent products (and projection) only, not the gate math;
    and the input projection too when it is ``fused`` into the loop (then input_gemm has
    none).
    """
    rows = shape.batch * shape.seq
    gates = 4 * shape.hidden
    out = proj_size or shape.hidden
    proj = 2.0 * rows * directions * out * shape.hidden if proj_size else 0.0
    counts = dict.fromkeys(PHASES, 0.0)
    width = shape.input
    for _ in range(layers):
        counts["time_loop" if fused else "input_gemm"] += 2.0 * rows * directions * gates * width
        counts["time_loop"] += 2.0 * rows * directions * gates * out + proj
        counts["backward_time_loop"] += 2.0 * rows * directions * gates * out + proj
        # dW_ih and dx over every step, dW_hh (and dW_hr) per direction
        counts["weight_gradients"] += 2.0 * rows * directions * gates * (2 * width + out) + proj
        width = directions * out
    return counts


def _recurrent_tasks(lstm: fl.LSTM, shape: Shape, plan: list, rng) -> list[list[tuple]]:
    """Per layer, the argument sets of ``recurrent_products_only``, one per task of the
    engine's plan (direction, first row, end row)."""
    dtype = lstm.dtype
    out = lstm.proj_size or lstm.hidden_size
    layers = []
    for layer in lstm._layers:
        tasks = []
        fused = _routes.loop_route(shape.seq, shape.batch, layer)[0]
        for d, first, end in plan:
            w_ih = np.ascontiguousarray(layer.w_ih[d : d + 1])
            w_hh = np.ascontiguousarray(layer.w_hh[d : d + 1])
            if fused:  # one product [x_t | h] [W_ih | W_hh]^T per step, as the loop does
                packed_ih = _engine.pack_stacked(w_ih, w_hh)
                packed_hh = _engine._pack_columns(w_hh, 0)
            else:
                packed_ih = _engine._pack_columns(w_ih, 0)
                packed_hh = _engine._pack_columns(w_hh, 4)
            rows = end - first
            x = (0.5 * rng.standard_normal((rows, packed_ih.shape[2]))).astype(dtype)
            h = (0.5 * rng.standard_normal((rows, out))).astype(dtype)
            xp = _memory.zeros((1, 4, 1, rows * lstm.hidden_size), dtype)
            tasks.append((xp, x, h, packed_ih, packed_hh, shape.seq))
        layers.append(tasks)
    return layers


def _unit_tasks(lstm: fl.LSTM, shape: Shape, plan: list, rng) -> list[list[tuple]]:
    """Per layer, the argument sets of ``recurrent_products_only`` for the hidden-unit split
    (``_routes.units_plan``): each task multiplies every row by its units' part of W_hh
    (its block of gates written as if H were its unit count: the same products)."""
    dtype = lstm.dtype
    out = lstm.proj_size or lstm.hidden_size
    layers = []
    for layer in lstm._layers:
        tasks = []
        for d, first, end in plan:
            w_hh = np.ascontiguousarray(layer.w_hh[d : d + 1])
            units = end - first
            packed_hh = _memory.empty(
                packing.columns_shape((1, 4 * units, out), 4, dtype.itemsize), dtype
            )
            packing.pack_unit_columns(packed_hh, w_hh, first, units)
            h = (0.5 * rng.standard_normal((shape.batch, out))).astype(dtype)
            xp = _memory.zeros((1, 4, 1, shape.batch * units), dtype)
            empty = _engine._pack_columns(w_hh, 0)
            tasks.append((xp, h, h, empty, packed_hh, shape.seq))
        layers.append(tasks)
    return layers


def _one_row_tasks(lstm: fl.LSTM, shape: Shape, plan: list, rng) -> list[list[tuple]]:
    """Per layer, the argument sets of ``one_row_products_only``, one per task of the
    engine's one-row plan (direction, first chunk, end chunk)."""
    dtype = lstm.dtype
    layers = []
    for layer in lstm._layers:
        tasks = []
        for d, first, end in plan:
            packs = []
            for w in (layer.w_hh, layer.w_ih):
                w = np.ascontiguousarray(w[d : d + 1])
                packs.append(_memory.empty(packing.units_shape(w.shape, dtype.itemsize), dtype))
                packing.pack_units(packs[-1], w)
            h = (0.5 * rng.standard_normal(layer.w_hh.shape[2])).astype(dtype)
            x = rng.standard_normal((shape.seq, layer.w_ih.shape[2])).astype(dtype)
            xp = _memory.zeros((1, 4, shape.seq, lstm.hidden_size), dtype)
            tasks.append((xp, h, packs[0], x, packs[1], first, end))
        layers.append(tasks)
    return layers


def _one_row_input_tasks(lstm: fl.LSTM, shape: Shape, plan: list, rng) -> list[list[tuple]]:
    """Per layer, the argument sets of ``_kernels.one_row_inputs`` (what each task of the
    one-row loop does before its steps: pack its part of the weights, project its units'
    inputs), one per task of the engine's one-row plan."""
    dtype = lstm.dtype
    layers = []
    for layer in lstm._layers:
        width = layer.w_ih.shape[2]
        inputs = rng.standard_normal((shape.seq, width)).astype(dtype)
        xp = _memory.zeros((layer.w_hh.shape[0], 4, shape.seq, lstm.hidden_size), dtype)
        bias = _engine._summed_bias(layer)
        packed_ih = _memory.empty(packing.units_shape(layer.w_ih.shape, dtype.itemsize), dtype)
        packed = _memory.empty(packing.units_shape(layer.w_hh.shape, dtype.itemsize), dtype)
        layers.append(
            [
                (xp, inputs, layer.w_ih, bias, packed_ih, layer.w_hh, packed, d, first, end,
                 *projected_in_loop(shape.seq, d))
                for d, first, end in plan
            ]
        )  # fmt: skip
    return layers


def _time_recurrent(
    layers: list[list[tuple]], parallel: bool, blas_single: bool, kernel=None
) -> float:
    """Seconds to run every layer's products as the engine runs its time loops: a layer's
    tasks at once on fastlstm's pool, or one by one; BLAS held to one thread or not."""
    kernel = kernel or _kernels.recurrent_products_only
    start = time.perf_counter()
    with blas_single_threaded() if blas_single else contextlib.nullcontext():
        for tasks in layers:
            if parallel:
                run_tasks(kernel, tasks)
            else:
                for task in tasks:
                    kernel(*task)
    return time.perf_counter() - start


def _plan_text(plan: dict[str, Any], threads_n: int) -> str:
    blas = "BLAS held to 1 thread" if plan["blas_single"] else f"BLAS on {threads_n} threads"
    if plan["one_row"] or plan.get("units_split"):
        blas = "no BLAS in the loop"
    unit = "hidden chunks" if plan["one_row"] else "units" if plan.get("units_split") else "rows"
    if plan["tasks"]:
        spans = ", ".join(f"direction {d} {unit} {a}..{b - 1}" for d, a, b in plan["tasks"])
        return f"{len(plan['tasks'])} parallel tasks on fastlstm's thread pool ({spans}); {blas}"
    if threads_n < 2:
        return f"serial on the calling thread (1 thread); {blas}"
    factor = _config.BARRIER_LOOP_MIN_FACTOR if plan["one_row"] else 1
    if plan["macs"] < factor * _config.PARALLEL_MIN_MACS:
        times = f"{factor} x " if factor > 1 else ""
        return (
            f"serial on the calling thread ({plan['macs']:,} recurrent multiply-adds, fewer "
            f"than {times}PARALLEL_MIN_MACS = {factor * _config.PARALLEL_MIN_MACS:,}); {blas}"
        )
    return f"serial on the calling thread; {blas}"


def profile(
    shape: Shape,
    *,
    train: bool = False,
    dtype: Any = np.float32,
    threads_n: int = DEFAULT_THREADS,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    repeats: int = 10,
) -> dict[str, Any]:
    """Profile one forward (or training step) of an LSTM of ``shape``; JSON-ready result."""
    dtype = np.dtype(dtype)
    directions = 2 if bidirectional else 1
    with threads(threads_n, torch_too=False):
        lstm = fl.LSTM(
            shape.input,
            shape.hidden,
            layers,
            bidirectional=bidirectional,
            dropout=dropout,
            dtype=dtype,
            seed=0,
        )
        rng = np.random.default_rng(0)
        x = rng.standard_normal((shape.seq, shape.batch, shape.input)).astype(dtype)
        dout = rng.standard_normal((shape.seq, shape.batch, directions * shape.hidden)).astype(
            dtype
        )
        lstm.train(train)
        first = {"forward": _first_call(lambda: lstm(x))}
        if train:
            first["backward"] = _first_call(lambda: lstm.backward(dout))

        # Phases, through the engine exactly as the public call drives it.
        count = layers * directions
        h0 = np.zeros((count, shape.batch, shape.hidden), dtype)
        c0 = np.zeros_like(h0)
        lengths = np.full(shape.batch, shape.seq, dtype=np.int64)
        sums = dict.fromkeys(PHASES, 0.0)
        engine = {"forward": 0.0, "backward": 0.0}
        public_total = 0.0

        def public() -> None:
            if train:
                lstm.zero_grad()
                lstm(x)
                lstm.backward(dout)
            else:
                lstm(x)

        # Engine and public call in turn, so that drift hits both alike; round 0 warms up.
        def engine_call(timings: dict[str, float]) -> tuple[float, float]:
            start = time.perf_counter()
            _, h_n, c_n, caches = _engine.forward(
                lstm._layers, x, h0, c0, lengths, hidden=shape.hidden, training=train,
                dropout=lstm.dropout, rng=lstm._rng, timings=timings,
            )  # fmt: skip
            forward_s = time.perf_counter() - start
            if not train:
                return forward_s, 0.0
            start = time.perf_counter()
            _engine.backward(
                lstm._layers, lstm._layer_grads, caches, dout, np.zeros_like(h_n),
                np.zeros_like(c_n), lengths, hidden=shape.hidden, timings=timings,
            )  # fmt: skip
            return forward_s, time.perf_counter() - start

        # Engine and public call in turn, first one then the other, so that drift and
        # allocator state hit both alike; round 0 warms up.
        for round_ in range(repeats + 1):
            timings: dict[str, float] = {}
            if round_ % 2:
                public_s = _seconds(public)
                forward_s, backward_s = engine_call(timings)
            else:
                forward_s, backward_s = engine_call(timings)
                public_s = _seconds(public)
            if round_ == 0:
                continue
            engine["forward"] += forward_s
            engine["backward"] += backward_s
            public_total += public_s
            for name, seconds in timings.items():
                sums[name] += seconds
        phases = {name: total / repeats for name, total in sums.items()}
        engine = {name: total / repeats for name, total in engine.items()}
        public_s = public_total / repeats

        # Recurrent products alone, with the time loop's sizes and threading.
        gates = 4 * shape.hidden
        out_size = lstm.proj_size or shape.hidden
        # The engine's plan: tasks (direction, first row, end row), run in parallel or one
        # after another, BLAS held to one thread or not.
        one_row = shape.batch == 1  # the profiled models have no projection or peepholes
        unit_tasks = []
        if one_row:
            chunks = packing.units_shape(lstm._layers[0].w_hh.shape, dtype.itemsize)[2]
            plan, _, parallel = _routes.one_row_plan(shape.seq, directions, gates, out_size, chunks)
            blas_single, kernel = False, _kernels.one_row_products_only
            tasks = _one_row_tasks(lstm, shape, plan, rng)
        else:
            layer0 = lstm._layers[0]
            unit_tasks = _routes.loop_route(shape.seq, shape.batch, layer0)[1]
            kernel = _kernels.recurrent_products_only
            if unit_tasks:
                plan, parallel, blas_single = unit_tasks, True, False
                tasks = _unit_tasks(lstm, shape, plan, rng)
            else:
                plan, parallel = _routes.row_plan(
                    shape.seq, shape.batch, directions, gates, out_size
                )
                blas_single = False
                tasks = _recurrent_tasks(lstm, shape, plan, rng)
        recurrent_first = _first_call(lambda: _time_recurrent([tasks[0][:1]], False, False, kernel))
        _time_recurrent(tasks, parallel, blas_single, kernel)  # warm-up (pool, caches)
        recurrent_s = statistics.fmean(
            _time_recurrent(tasks, parallel, blas_single, kernel) for _ in range(repeats)
        )
        inputs_s = 0.0  # a one-row loop's own input projection and packing, timed alone
        if one_row:
            inputs = _one_row_input_tasks(lstm, shape, plan, rng)
            prologue = _kernels.one_row_inputs
            _time_recurrent(inputs, parallel, False, prologue)  # warm-up
            inputs_s = statistics.fmean(
                _time_recurrent(inputs, parallel, False, prologue) for _ in range(repeats)
            )
        machine = machine_info()
        machine["fastlstm_threads"] = fl.get_num_threads()

    fused = _routes.loop_route(shape.seq, shape.batch, lstm._layers[0])[0]
    work = phase_flops(shape, layers=layers, directions=directions, fused=fused)
    return {
        "config": {
            "shape": asdict(shape),
            "train": train,
            "dtype": dtype.name,
            "threads": threads_n,
            "layers": layers,
            "bidirectional": bidirectional,
            "dropout": dropout,
            "repeats": repeats,
        },
        "first_calls": first,
        "phases_s": phases,
        "engine_s": engine,
        "public_s": public_s,
        "recurrent_products_s": recurrent_s,
        "recurrent_first_call": recurrent_first,
        "loop_inputs_s": inputs_s,
        "gate_math_estimate_s": phases["time_loop"] - recurrent_s - inputs_s,
        "flops": work,
        "plan": {
            "tasks": [list(task) for task in plan] if parallel else None,
            "blas_single": bool(blas_single),
            "directions": directions,
            "macs": shape.seq * shape.batch * directions * gates * out_size,
            "recurrent_kernel": (
                "one-row micro-kernel, hidden units split"
                if one_row
                else "packed micro-kernel, hidden units split"
                if unit_tasks
                else "packed micro-kernel"
            ),
            "one_row": one_row,
            # steps whose input projection a one-row loop runs alongside its products
            "steps_projected_in_loop": _steps_projected_in_loop(shape.seq) if one_row else 0,
            "units_split": bool(unit_tasks),
            "fused_input_projection": fused,
            "numba_parallel_kernels": any(d.targetoptions.get("parallel") for d in _dispatchers()),
        },
        "machine": machine,
    }


def _steps_projected_in_loop(steps: int) -> int:
    """How many of a one-row loop's steps have their inputs projected in the loop."""
    first, end = projected_in_loop(steps, 0)
    return int(end - first)


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def format_profile(result: dict[str, Any]) -> str:
    """The profile as text: first calls, phases with shares and GFLOP/s, threads and BLAS."""
    config = result["config"]
    shape = Shape(**config["shape"])
    layers = config["layers"]
    what = "training step (forward + backward)" if config["train"] else "forward (eval mode)"
    lines = [
        f"fastlstm profile: {shape.label}, {layers} layer{'s' if layers > 1 else ''}, "
        f"{'bidirectional' if config['bidirectional'] else 'unidirectional'}, "
        f"{config['dtype']}, {what}, {config['threads']} threads, "
        f"mean of {config['repeats']} repeats",
        "",
        "first calls in this process (compile, or load from Numba's cache), apart from run time:",
    ]
    for name, call in result["first_calls"].items():
        lines.append(
            f"  first {name:<9} {call['seconds']:8.3f} s   ({call['new_kernels']} kernels "
            f"brought in: {call['compiled']} compiled, {call['cache_hits']} from the cache)"
        )
    rec = result["recurrent_first_call"]
    lines.append(f"  recurrent_products_only {rec['seconds']:.3f} s (its own first call)")
    lines += ["", "run time per call:"]
    total = result["public_s"]
    flops = result["flops"]
    header = f"  {'phase':<28}{'ms':>10}{'share':>9}{'GFLOP/s':>10}"
    lines.append(header)

    def line(name: str, seconds: float | None, work: float | None = None, note: str = "") -> str:
        if seconds is None:
            return f"  {name:<28}{'-':>10}{'':>9}{'':>10}  {note}".rstrip()
        rate = f"{work / seconds / 1e9:.1f}" if work and seconds > 0 else ""
        share = f"{100 * seconds / total:.1f}%" if total > 0 else ""
        return f"  {name:<28}{seconds * 1e3:>10.3f}{share:>9}{rate:>10}  {note}".rstrip()

    phases = result["phases_s"]
    fused = result["plan"]["fused_input_projection"]
    one_row = result["plan"]["one_row"]
    loop_flops = flops["time_loop"]
    if fused:
        lines.append(line("input_gemm", None, None, "(inside time_loop: fused per step)"))
    elif one_row:
        lines.append(line("input_gemm", None, None, "(inside time_loop: each task its own units)"))
        loop_flops += flops["input_gemm"]
    else:
        lines.append(line("input_gemm", phases["input_gemm"], flops["input_gemm"]))
    if one_row and config["train"]:
        note = "backward's W_hh into panels (forward's: inside time_loop)"
        lines.append(line("pack_weights", phases["pack_weights"], None, note))
    elif one_row:
        lines.append(line("pack_weights", None, None, "(inside time_loop: each task its part)"))
    else:
        lines.append(
            line("pack_weights", phases["pack_weights"], None, "weights into panels, once per call")
        )
    lines.append(line("time_loop", phases["time_loop"], loop_flops))
    products_flops = flops["time_loop"]
    products_note = ": [x_t | h] [W_ih | W_hh]^T" if fused else ": h W_hh^T"
    if one_row:
        # The loop projects some steps' inputs alongside its products (projected_in_loop).
        share = result["plan"]["steps_projected_in_loop"] / config["shape"]["seq"]
        products_flops += share * flops["input_gemm"]
        if share:
            products_note += f" and x W_ih^T of {share:.0%} of the steps alongside"
        lines.append(
            line(
                "  inputs and packing *",
                result["loop_inputs_s"],
                (1 - share) * flops["input_gemm"],
                "timed alone: W_ih and W_hh into panels, x W_ih^T of the other steps"
                if share
                else "timed alone: x W_ih^T, W_ih and W_hh into panels",
            )
        )
    lines.append(
        line("  matrix products *", result["recurrent_products_s"], products_flops,
             "timed alone" + products_note)
    )  # fmt: skip
    lines.append(
        line(
            "  gate math *",
            result["gate_math_estimate_s"],
            None,
            "= time_loop - matrix products" + (" - inputs and packing" if one_row else ""),
        )
    )
    uses_dropout = config["train"] and layers > 1 and config["dropout"] > 0
    lines.append(
        line(
            "dropout",
            phases["dropout"] if uses_dropout else None,
            None,
            "" if uses_dropout else "(not run: needs --train, --layers > 1, --dropout)",
        )
    )
    for name in BACKWARD_PHASES:
        if config["train"]:
            lines.append(line(name, phases[name], flops[name]))
        else:
            lines.append(line(name, None, None, "(not run: forward only; add --train)"))
    engine = result["engine_s"]
    other = engine["forward"] + engine["backward"] - sum(phases.values())
    lines.append(line("other (engine)", other, None, "allocation, weight preparation"))
    api = total - engine["forward"] - engine["backward"]
    lines.append(line("API (public call)", api, None, "validation, copies, layout"))
    work_total = sum(flops[n] for n in ("input_gemm", "time_loop")) + (
        flops["backward_time_loop"] + flops["weight_gradients"] if config["train"] else 0.0
    )
    lines.append(line("total (public call)", total, work_total))
    lines.append(
        "  * an estimate: the loop's products timed alone (_kernels.recurrent_products_only,"
        " one_row_products_only" + (", one_row_inputs)" if one_row else ")")
    )
    lines.append("    (same sizes, dtype and threading as the loop); gate math is the remainder.")

    plan = result["plan"]
    machine = result["machine"]
    lines.append(f"    Recurrent products at this size: {plan['recurrent_kernel']}.")
    numba_use = (
        "used by fastlstm's parallel kernels"
        if plan["numba_parallel_kernels"]
        else "not used: fastlstm's time loops run on its own thread pool"
    )
    lines += [
        "",
        f"threads: fastlstm.get_num_threads() = {machine['fastlstm_threads']} during the run "
        f"(asked: {config['threads']}); numba.get_num_threads() = {machine['numba_threads']}; "
        f"CPUs: {machine['cpu_count']}",
        f"CPU: {cpu_text(machine)}",
        f"Numba threading layer: {machine['numba_threading_layer']} ({numba_use})",
        f"time loops: {_plan_text(plan, config['threads'])}",
        f"kernels' BLAS calls go to {machine.get('kernel_blas', '?')}",
        "thread pools (threadpoolctl.threadpool_info(), during the run):",
    ]
    for pool in machine["threadpools"]:
        lines.append(
            f"  {pool['internal_api']:<9} {pool['prefix']:<20} version {pool['version']}, "
            f"{pool['num_threads']} threads, architecture {pool.get('architecture') or '-'}"
            + (
                f", threading layer {pool['threading_layer']}"
                if pool.get("threading_layer")
                else ""
            )
        )
    return "\n".join(lines)
