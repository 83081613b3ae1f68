"""Side-by-side timing of fastlstm against its peers: the engine of ``fastlstm bench``.

Method (DESIGN.md, "Performance"): everything runs in one process, with the same weights
on every side (:mod:`fastlstm.peers` builds the peers from the fastlstm model) and the same
number of threads on each side (``fl.set_num_threads(n)``, ``torch.set_num_threads(n)``,
ONNX Runtime ``intra_op_num_threads=n``, ``inter_op_num_threads=1``; 2 by default).

For every shape, mode and peer:

1. build each side and time its first call apart ("first call": Numba compilation or
   loading from its cache for fastlstm, oneDNN set-up for torch, the session's first run
   for ONNX Runtime; building the ONNX session is "setup");
2. call each side once more (the warm-up, also used to size the run);
3. time alternating calls, fastlstm then the peer, ``repeats`` pairs (fewer, but at least
   3, when the peer would need more than ``budget`` seconds: the reference at the large
   shapes), and report the medians. ratio = median(peer) / median(fastlstm of those pairs);
   above 1 means fastlstm is faster. Before each timed call the same side runs untimed
   for ``settle`` seconds (0.25 by default; at least one call): thread pools that keep
   spinning after a call (ONNX Runtime's for tens of milliseconds, OpenMP's, OpenBLAS's
   for 2**28 TSC cycles, about 0.1 s) would otherwise take a core from whichever side
   runs next, and a side that has slept pays to wake its threads. Measured here at the
   medium shape: fastlstm right after an ONNX Runtime call ran 1.9x slower than alone,
   and after a 0.1 s sleep every side ran slower than warm (torch's seed forward 35x);
   settling runs each side as it runs alone. 0.1 s of settling was too short for
   OpenBLAS's threads after the reference's threaded GEMMs: fastlstm's samples that
   followed them (the torch rows') ran 7-15% slower than its others (medium forward,
   Zen 4, two runs each way; 1-3% with 0.25 s).

Modes: ``forward`` is inference (fastlstm ``eval()``, torch under ``inference_mode``, ONNX
Runtime ``session.run``); ``train`` is one training step, forward + backward and nothing
else (fastlstm ``zero_grad``, forward, ``backward(dout)``; torch ``zero_grad``, forward,
``out.backward(dout)`` with x requiring grad, since fastlstm's backward returns dx too;
the reference ``lstm_forward`` + ``lstm_backward``).

FLOPs (a multiply-add counts 2): a forward does 2 * G * (I_k + P) * B * T per layer and
direction, G = 4H, P = H (with projection P = proj_size and 2 * P * H more per row; with the
full peephole 2 * G * H more): 2 * 4H * (I + H) * B * T for the grid's standard LSTM. A
training step counts as 3 forwards. GFLOP/s and the share of the machine's GEMM rate
(``a @ b``, n = 2048, in the benchmark's dtype) are fastlstm's.

The functions here are also used by ``bench/`` (the pytest-benchmark suite) and
:mod:`fastlstm.cli`. matplotlib is imported only by :func:`plot`; torch and ONNX Runtime only
when a peer is built.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np
import threadpoolctl

import fastlstm as fl
from fastlstm import _cpu, peers
from fastlstm._blas_choice import BLAS

MODES = ("forward", "train")
VARIANTS = ("standard", "diagonal", "full", "proj")
SIDES = ("fastlstm", *peers.PEERS)
DEFAULT_THREADS = 2
DEFAULT_REPEATS = 20
DEFAULT_BUDGET = 10.0  # seconds of timed calls per peer and row, before repeats are cut
DEFAULT_SETTLE = 0.25  # seconds a side runs untimed before each of its timed calls


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: B sequences of T steps, I inputs, H hidden units."""

    name: str
    batch: int
    seq: int
    input: int
    hidden: int

    @property
    def label(self) -> str:
        return f"B{self.batch} T{self.seq} I{self.input} H{self.hidden}"


GRID = {
    shape.name: shape
    for shape in (
        Shape("seed", 100, 10, 5, 8),
        Shape("latency", 1, 150, 256, 256),
        Shape("medium", 32, 100, 128, 256),
        Shape("recog", 64, 50, 500, 500),
        Shape("large", 64, 25, 1024, 1024),
    )
}

_CUSTOM = re.compile(r"^B(\d+)[\s,x_-]*T(\d+)[\s,x_-]*I(\d+)[\s,x_-]*H(\d+)$", re.IGNORECASE)


def parse_shape(text: str) -> Shape:
    """A grid name ("seed", "medium", ...) or a custom shape such as "B4T3I5H8"."""
    text = text.strip()
    if text in GRID:
        return GRID[text]
    match = _CUSTOM.match(text)
    if not match:
        raise ValueError(
            f"unknown shape {text!r}: expected one of {', '.join(GRID)} or a custom shape "
            "like B4T3I5H8"
        )
    batch, seq, width, hidden = (int(v) for v in match.groups())
    if min(batch, seq, width, hidden) < 1:
        raise ValueError(f"shape {text!r}: every size must be at least 1")
    return Shape(f"B{batch}T{seq}I{width}H{hidden}", batch, seq, width, hidden)


def parse_shapes(text: str) -> list[Shape]:
    """Comma-separated shapes (see :func:`parse_shape`); "all" is the whole grid."""
    if text.strip() == "all":
        return list(GRID.values())
    return [parse_shape(part) for part in text.split(",") if part.strip()]


# ----------------------------------------------------------------------------- models, FLOPs


def model_options(variant: str, hidden: int) -> dict[str, Any]:
    """LSTM keyword arguments of a variant; "proj" projects to H // 2."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "proj":
        if hidden < 2:
            raise ValueError("the proj variant needs hidden_size >= 2")
        return {"proj_size": hidden // 2}
    if variant in ("diagonal", "full"):
        return {"peephole": variant}
    return {}


def make_model(
    shape: Shape, dtype: Any = np.float32, variant: str = "standard", *, seed: int = 0, **kw
) -> fl.LSTM:
    """The fastlstm model of a benchmark row (1 layer, unidirectional unless ``kw`` says)."""
    return fl.LSTM(
        shape.input,
        shape.hidden,
        dtype=dtype,
        seed=seed,
        **model_options(variant, shape.hidden),
        **kw,
    )


def make_inputs(lstm: fl.LSTM, shape: Shape, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (T, B, I) and dout (T, B, D*H_out), standard normal in the model's dtype."""
    rng = np.random.default_rng(seed)
    directions = 2 if lstm.bidirectional else 1
    out_size = lstm.proj_size or lstm.hidden_size
    x = rng.standard_normal((shape.seq, shape.batch, shape.input)).astype(lstm.dtype)
    dout = rng.standard_normal((shape.seq, shape.batch, directions * out_size)).astype(lstm.dtype)
    return x, dout


def flops(
    shape: Shape,
    variant: str = "standard",
    mode: str = "forward",
    *,
    layers: int = 1,
    directions: int = 1,
) -> float:
    """Floating-point operations of one call (see the module docstring)."""
    hidden = shape.hidden
    gates = 4 * hidden
    out_size = model_options(variant, hidden).get("proj_size", hidden)
    total = 0.0
    width = shape.input
    for _ in range(layers):
        per_row = gates * (width + out_size)
        if variant == "proj":
            per_row += out_size * hidden
        if variant == "full":
            per_row += gates * hidden
        total += 2.0 * per_row * shape.batch * shape.seq * directions
        width = directions * out_size
    return total * (3 if mode == "train" else 1)


def _clone(lstm: fl.LSTM) -> fl.LSTM:
    """A separate fastlstm model with the same configuration and weights."""
    twin = fl.LSTM(**lstm._config())
    twin.load_state_dict(lstm.state_dict())
    return twin


def make_call(
    side: str,
    lstm: fl.LSTM,
    x: np.ndarray,
    dout: np.ndarray,
    mode: str,
    *,
    threads: int | None = None,
) -> Callable[[], None]:
    """A no-argument call running one forward or training step of ``side``.

    Raises ValueError naming the reason when ``side`` cannot run this model in this mode.
    fastlstm runs on a copy of ``lstm`` (so modes do not interfere); peers copy its weights.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if side == "fastlstm":
        model = _clone(lstm)
        if mode == "forward":
            model.eval()
            return lambda: model(x)

        def step() -> None:
            model.zero_grad()
            model(x)
            model.backward(dout)

        return step
    if side not in peers.PEERS:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    reason = peers.unsupported(side, lstm, mode)
    if reason:
        raise ValueError(reason)
    if side == "torch":
        runner = peers.TorchRunner(lstm)
        return runner.forward_fn(x) if mode == "forward" else runner.train_step_fn(x, dout)
    if side == "onnxruntime":
        return peers.OrtRunner(lstm, threads=threads).forward_fn(x)
    if mode == "forward":
        return peers.reference_forward_fn(lstm, x)
    return peers.reference_train_step_fn(lstm, x, dout)


# ---------------------------------------------------------------------------------- threads


@contextlib.contextmanager
def threads(n: int, *, torch_too: bool = True) -> Iterator[None]:
    """``n`` threads on every side inside the block; the previous counts are restored after.

    fastlstm: ``fl.set_num_threads(n)`` (Numba and every BLAS); torch (imported here, if
    installed and ``torch_too``): ``torch.set_num_threads(n)``. ONNX Runtime's count is per
    session (``OrtRunner``).
    """
    torch = None
    if torch_too and "torch" in peers.available_peers():
        import torch
    numba_before = numba.get_num_threads()
    torch_before = torch.get_num_threads() if torch is not None else None
    with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
        fl.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            numba.set_num_threads(numba_before)
            if torch is not None:
                torch.set_num_threads(torch_before)


# ------------------------------------------------------------------------------------ timing


def time_call(call: Callable[[], None]) -> float:
    """Seconds one call of ``call`` takes (wall clock)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def gemm_rate(dtype: Any = np.float32, n: int = 2048, repeats: int = 5) -> float:
    """The machine's GEMM rate in GFLOP/s: median of ``a @ b`` with n x n matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b  # warm-up
    seconds = statistics.median(time_call(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n**3 / seconds / 1e9


@dataclass
class Row:
    """One line of the table: a shape, a mode, a peer (None: fastlstm alone)."""

    shape: str
    batch: int
    seq: int
    input: int
    hidden: int
    mode: str
    variant: str
    dtype: str
    threads: int
    peer: str | None
    peer_s: float | None
    fastlstm_s: float
    ratio: float | None
    flops: float
    gflops: float
    gemm_share: float
    fastlstm_first_call_s: float
    peer_first_call_s: float | None
    peer_setup_s: float | None
    peer_repeats: int
    fastlstm_samples: list[float]
    peer_samples: list[float]


def settle_call(call: Callable[[], None], seconds: float) -> None:
    """Run ``call`` untimed for ``seconds`` (at least once): the side's threads are awake and
    the other side's spinning threads have gone to sleep before the timed call."""
    end = time.perf_counter() + seconds
    call()
    while time.perf_counter() < end:
        call()


def _repeats_within(budget: float, estimate: float, repeats: int) -> int:
    if estimate <= 0:
        return repeats
    return max(3, min(repeats, math.floor(budget / estimate)))


def measure_row_set(
    shape: Shape,
    mode: str,
    peer_names: Sequence[str],
    *,
    dtype: Any = np.float32,
    variant: str = "standard",
    threads_n: int = DEFAULT_THREADS,
    repeats: int = DEFAULT_REPEATS,
    budget: float = DEFAULT_BUDGET,
    settle: float = DEFAULT_SETTLE,
    gemm_gflops: float = 0.0,
    notes: list[str] | None = None,
) -> list[Row]:
    """Time fastlstm against each peer on one shape and mode (threads already set).

    Peers that cannot run this model or mode are left out with a line in ``notes``.
    """
    notes = notes if notes is not None else []
    dtype = np.dtype(dtype)
    lstm = make_model(shape, dtype, variant)
    x, dout = make_inputs(lstm, shape)
    fl_call = make_call("fastlstm", lstm, x, dout, mode)
    fl_first = time_call(fl_call)
    fl_estimate = time_call(fl_call)
    peer_calls: dict[str, Callable[[], None]] = {}
    first: dict[str, float] = {}
    setup: dict[str, float] = {}
    estimate: dict[str, float] = {}
    for name in peer_names:
        reason = peers.unsupported(name, lstm, mode)
        if reason:
            notes.append(f"{name} left out of {mode} ({variant}, {dtype.name}): {reason}")
            continue
        start = time.perf_counter()
        call = make_call(name, lstm, x, dout, mode, threads=threads_n)
        setup[name] = time.perf_counter() - start
        first[name] = time_call(call)
        estimate[name] = time_call(call)
        peer_calls[name] = call
    counts = {
        name: _repeats_within(budget, estimate[name] + fl_estimate, repeats) for name in peer_calls
    }
    for name, count in counts.items():
        if count < repeats:
            notes.append(
                f"{name} {shape.name} {mode}: {count} pairs instead of {repeats} "
                f"(about {estimate[name]:.2f} s a call, budget {budget:g} s)"
            )
    fl_samples: dict[str | None, list[float]] = {name: [] for name in peer_calls}
    peer_samples: dict[str, list[float]] = {name: [] for name in peer_calls}
    if not peer_calls:
        fl_samples[None] = [time_call(fl_call) for _ in range(repeats)]
    for r in range(repeats):
        for name, call in peer_calls.items():  # alternating: fastlstm, peer, fastlstm, ...
            if r < counts[name]:
                settle_call(fl_call, settle)
                fl_samples[name].append(time_call(fl_call))
                settle_call(call, settle)
                peer_samples[name].append(time_call(call))
    work = flops(shape, variant, mode)
    rows = []
    for name, fl_times in fl_samples.items():
        fl_median = statistics.median(fl_times)
        peer_median = statistics.median(peer_samples[name]) if name else None
        rows.append(
            Row(
                shape=shape.name,
                batch=shape.batch,
                seq=shape.seq,
                input=shape.input,
                hidden=shape.hidden,
                mode=mode,
                variant=variant,
                dtype=dtype.name,
                threads=threads_n,
                peer=name,
                peer_s=peer_median,
                fastlstm_s=fl_median,
                ratio=peer_median / fl_median if name else None,
                flops=work,
                gflops=work / fl_median / 1e9,
                gemm_share=work / fl_median / 1e9 / gemm_gflops if gemm_gflops else math.nan,
                fastlstm_first_call_s=fl_first,
                peer_first_call_s=first.get(name),
                peer_setup_s=setup.get(name),
                peer_repeats=len(fl_times),
                fastlstm_samples=fl_times,
                peer_samples=peer_samples.get(name, []),
            )
        )
    return rows


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of the machine's CPU time spent busy over ``seconds`` (Linux; else None).

    Sampled while this process sleeps, so it measures the other work on the machine.
    """
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(seconds)
    after = _cpu_times()
    total = after[0] - before[0]
    return None if total <= 0 else 1.0 - (after[1] - before[1]) / total


def cpu_text(machine: dict[str, Any]) -> str:
    """One line: the CPU model, what LLVM compiles for, and the kernel variant that ran."""
    cpu = machine["cpu"]["cpu"]
    variant = _cpu.KernelVariant(**machine["cpu"]["variant"])
    return (
        f"{cpu['model']} ({cpu['llvm_name']}, {cpu['isa']}); L2 {cpu['l2_bytes'] >> 10} KiB, "
        f"L3 {cpu['l3_bytes'] >> 20} MiB; kernel variant {variant.label}"
    )


def machine_info() -> dict[str, Any]:
    """Versions and thread configuration of what is measured (JSON-ready)."""
    blas = [
        {
            key: lib.get(key)
            for key in (
                "user_api",
                "internal_api",
                "prefix",
                "version",
                "num_threads",
                "architecture",
                "threading_layer",
            )
        }
        for lib in threadpoolctl.threadpool_info()
    ]
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not started"
    return {
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": layer,
        "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu.info(),
        "peers": peers.available_peers(),
        "threadpools": blas,
        "kernel_blas": BLAS.description,
    }


def run_grid(
    shapes: Sequence[Shape],
    *,
    modes: Sequence[str] = ("forward",),
    peer_names: Sequence[str] = peers.PEERS,
    dtype: Any = np.float32,
    variant: str = "standard",
    threads_n: int = DEFAULT_THREADS,
    repeats: int = DEFAULT_REPEATS,
    budget: float = DEFAULT_BUDGET,
    settle: float = DEFAULT_SETTLE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every shape x mode against every installed peer; the JSON-ready result.

    Keys: "config", "machine", "gemm_gflops", "rows" (dicts of :class:`Row`), "notes".
    """
    dtype = np.dtype(dtype)
    busy_before = cpu_busy()
    notes: list[str] = []
    installed = peers.available_peers()
    missing = peers.missing_peers()
    chosen = []
    for name in peer_names:
        if name not in peers.PEERS:
            raise ValueError(f"unknown peer {name!r}: expected some of {', '.join(peers.PEERS)}")
        if name in installed:
            chosen.append(name)
        else:
            notes.append(f"{name} left out: {missing.get(name, 'not installed')}")
    rows: list[Row] = []
    with threads(threads_n, torch_too="torch" in chosen):
        gemm = gemm_rate(dtype)
        for shape in shapes:
            for mode in modes:
                if progress:
                    progress(f"{shape.name} {mode} ...")
                rows += measure_row_set(
                    shape,
                    mode,
                    chosen,
                    dtype=dtype,
                    variant=variant,
                    threads_n=threads_n,
                    repeats=repeats,
                    budget=budget,
                    settle=settle,
                    gemm_gflops=gemm,
                    notes=notes,
                )
        machine = machine_info()
    busy_after = cpu_busy()
    machine["cpu_busy_before"], machine["cpu_busy_after"] = busy_before, busy_after
    busy = [b for b in (busy_before, busy_after) if b is not None]
    if busy and max(busy) > 0.2:
        notes.append(
            f"other work kept the CPUs busy (a second before the run: "
            f"{100 * (busy_before or 0):.0f}%, after: {100 * (busy_after or 0):.0f}%): every "
            "side shares the cores with it, and spin-waiting thread pools (torch's OpenMP) "
            "suffer most; rerun on a quiet machine"
        )
    return {
        "config": {
            "shapes": [asdict(s) for s in shapes],
            "modes": list(modes),
            "peers": list(peer_names),
            "dtype": dtype.name,
            "variant": variant,
            "threads": threads_n,
            "repeats": repeats,
            "budget_s": budget,
            "settle_s": settle,
        },
        "machine": machine,
        "gemm_gflops": gemm,
        "rows": [asdict(row) for row in rows],
        "notes": list(dict.fromkeys(notes)),
    }


# ------------------------------------------------------------------------------------ output


def _ms(seconds: float | None) -> str:
    return (
        "-"
        if seconds is None
        else f"{seconds * 1e3:.3f}"
        if seconds < 0.01
        else (f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:.0f}")
    )


def _first(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def format_table(result: dict[str, Any]) -> str:
    """The grid result as a plain-text table, with its configuration and notes."""
    config = result["config"]
    machine = result["machine"]
    blas = [
        p
        for p in machine["threadpools"]
        if p.get("internal_api") in ("openblas", "mkl", "blis", "flexiblas")
    ]
    blas_text = ", ".join(
        f"{p['internal_api']} {p['version']} ({p.get('architecture') or '?'})" for p in blas
    )
    peer_text = ", ".join(f"{k} {v}" for k, v in machine["peers"].items() if k != "reference")
    lines = [
        f"fastlstm bench: {config['dtype']}, variant {config['variant']}, {config['threads']} "
        f"threads per side, medians of alternating runs (up to {config['repeats']} pairs)",
        f"CPU: {cpu_text(machine)}",
        f"machine: {machine['cpu_count']} CPUs; {config['dtype']} GEMM (a @ b, n=2048): "
        f"{result['gemm_gflops']:.1f} GFLOP/s; numba {machine['numba']}; "
        f"BLAS {blas_text or '?'}; peers {peer_text}",
        f"fastlstm's kernels call {machine.get('kernel_blas', '?')}",
        "ratio = peer time / fastlstm time (> 1: fastlstm faster); GFLOP/s and % GEMM are "
        "fastlstm's; 1st call = compile or cache load (fastlstm), set-up + first call (peer)",
        "",
    ]
    header = (
        "shape",
        "B",
        "T",
        "I",
        "H",
        "mode",
        "peer",
        "peer ms",
        "fastlstm ms",
        "ratio",
        "GFLOP/s",
        "% GEMM",
        "n",
        "1st call fl s",
        "1st call peer s",
    )
    table = [header]
    for row in result["rows"]:
        table.append(
            (
                row["shape"],
                str(row["batch"]),
                str(row["seq"]),
                str(row["input"]),
                str(row["hidden"]),
                row["mode"],
                row["peer"] or "(none)",
                _ms(row["peer_s"]),
                _ms(row["fastlstm_s"]),
                "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                f"{row['gflops']:.2f}",
                "-" if math.isnan(row["gemm_share"]) else f"{100 * row['gemm_share']:.1f}%",
                str(row["peer_repeats"]),
                _first(row["fastlstm_first_call_s"]),
                _first(
                    None
                    if row["peer_first_call_s"] is None
                    else row["peer_first_call_s"] + row["peer_setup_s"]
                ),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    left = {0, 5, 6}
    for line in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if result["notes"]:
        lines.append("")
        lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=_json_default)
        handle.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Grouped bars of ratio (peer / fastlstm) per shape, one panel per mode, line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if row["ratio"] is not None]
    modes = [m for m in MODES if any(row["mode"] == m for row in rows)] or ["forward"]
    shapes = {row["shape"]: f"{row['shape']}\nB{row['batch']} T{row['seq']} I{row['input']} "
              f"H{row['hidden']}" for row in result["rows"]}  # fmt: skip
    colors = {"torch": "#ee4c2c", "onnxruntime": "#4b8bbe", "reference": "#7f7f7f"}
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(6, 1.8 * len(shapes) + 2), 3.6 * len(modes)), squeeze=False
    )
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        ratios = {(r["shape"], r["peer"]): r["ratio"] for r in rows if r["mode"] == mode}
        names = [p for p in peers.PEERS if any(peer == p for _, peer in ratios)]
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            offset = (j - (len(names) - 1) / 2) * width
            points = [(i + offset, ratios[shape, name]) for i, shape in enumerate(shapes)
                      if (shape, name) in ratios]  # fmt: skip
            xs, ys = zip(*points, strict=True)
            bars = ax.bar(xs, ys, width, label=name, color=colors.get(name))
            ax.bar_label(
                bars,
                labels=[f"{y:.2f}x" if y < 10 else f"{y:.0f}x" for y in ys],
                fontsize=7,
                padding=1,
            )
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), list(shapes.values()), fontsize=8)
        ax.set_ylabel("peer time / fastlstm time")
        ax.set_title(f"{mode}: bars above the 1x line = fastlstm faster", fontsize=10)
        if names:
            ax.legend(fontsize=8, loc="best")
    config = result["config"]
    fig.suptitle(
        f"fastlstm vs peers: {config['dtype']}, {config['variant']}, "
        f"{config['threads']} threads each"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
