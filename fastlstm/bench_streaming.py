"""``fastlstm bench --streaming``: the cost of one step of a live stream, side by side.

Per step of a one-layer float32 model with I = H (DESIGN.md, "Performance"): fastlstm's
``stream.step(x, out=...)`` against ONNX Runtime running the model's LSTM graph for one
step with the state in and out (``peers.OrtRunner``'s graph with state inputs) and
``torch.nn.LSTMCell`` under ``no_grad``, all with the same weights, in one process, 2
threads per side for the peers. Each sample times a block of consecutive steps (per-step
time = block / steps); the sides alternate, each running untimed for ``settle`` seconds
before its sample (other sides' spinning threads stop, its own wake), and the table reports
medians.

It also splits fastlstm's step: the kernel's own time (a chunk of steps in one call, per
step), Numba's dispatch (a direct call of the step kernel minus that), and the Python of
``step`` (the method call and the fast-path checks: the whole call minus the direct one).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import fastlstm as fl
from fastlstm import peers
from fastlstm._kernels import stream as stream_kernels
from fastlstm.bench import settle_call

HIDDEN = (64, 128, 256)
BATCHES = (1, 16)
PEERS = ("onnxruntime", "torch")


def cpu_model() -> str:
    """The CPU's name (and, when fastlstm describes its CPU, what its kernels were built for)."""
    try:
        from fastlstm import _cpu
    except ImportError:
        _cpu = None
    if _cpu is not None and hasattr(_cpu, "CPU"):
        return f"{_cpu.CPU.summary()}; kernel variant {_cpu.VARIANT.label}"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _per_step(run: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / steps


def _block(step: Callable[[], Any], steps: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(steps):
            step()

    return run


def _fastlstm_side(model: fl.LSTM, x: np.ndarray) -> tuple[Callable[[], Any], np.ndarray]:
    stream = model.stream(x.shape[0])
    out = np.empty((x.shape[0], model.hidden_size), model.dtype)

    def step() -> np.ndarray:
        return stream.step(x, out=out)

    return step, out


def _ort_side(model: fl.LSTM, x: np.ndarray, threads: int) -> Callable[[], Any]:
    session = peers.OrtRunner(model, threads=threads).session(with_state=True)
    batch, hidden = x.shape[0], model.hidden_size
    feeds = {
        "x": x[None].copy(),
        "h0": np.zeros((1, batch, hidden), np.float32),
        "c0": np.zeros((1, batch, hidden), np.float32),
    }

    def step() -> np.ndarray:
        out, h_n, c_n = session.run(None, feeds)
        feeds["h0"], feeds["c0"] = h_n, c_n
        return out[0]

    return step


def _torch_side(model: fl.LSTM, x: np.ndarray, threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    cell = torch.nn.LSTMCell(model.input_size, model.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(torch.from_numpy(model.params[f"{name}_l0"]))
    x_t = torch.from_numpy(x)
    zeros = torch.zeros(x.shape[0], model.hidden_size)
    state = [zeros, zeros.clone()]

    def step() -> Any:
        with torch.no_grad():
            h, c = cell(x_t, (state[0], state[1]))
        state[0], state[1] = h, c
        return h

    return step


def _first_step_agrees(fastlstm_step, peer_step) -> None:
    """One step from zero state must give the same numbers on both sides (float32)."""
    ours = np.array(fastlstm_step())
    theirs = np.asarray(peer_step())
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-5)


def split(model: fl.LSTM, x: np.ndarray, steps: int, repeats: int) -> dict[str, float]:
    """fastlstm's step split into seconds: kernel, Numba dispatch, Python (method + checks)."""
    stream = model.stream(x.shape[0])
    out = np.empty((x.shape[0], model.hidden_size), model.dtype)
    chunk = np.ascontiguousarray(np.broadcast_to(x, (steps, *x.shape)))
    chunk_out = np.empty((steps, *out.shape), model.dtype)
    kernel = stream_kernels.stream_step
    ws, panels, meta = stream._ws, stream._panels, stream._meta

    def direct() -> None:
        kernel(out, x, ws, panels, meta)

    def whole() -> None:
        stream.step(x, out=out)

    def chunked() -> None:
        stream(chunk, out=chunk_out)

    samples: dict[str, list[float]] = {"kernel": [], "direct": [], "step": []}
    for _ in range(repeats):
        samples["kernel"].append(_per_step(chunked, steps))
        samples["direct"].append(_per_step(_block(direct, steps), steps))
        samples["step"].append(_per_step(_block(whole, steps), steps))
    kernel_s, direct_s, step_s = (statistics.median(samples[k]) for k in samples)
    # (medians of noisy samples: nested so that the three parts add up to the step)
    direct_s = min(direct_s, step_s)
    kernel_s = min(kernel_s, direct_s)
    return {
        "parts": len(stream._parts),
        "kernel_s": kernel_s,
        "dispatch_s": direct_s - kernel_s,
        "python_s": step_s - direct_s,
        "step_s": step_s,
    }


def run(
    hidden_sizes: Sequence[int] = HIDDEN,
    batches: Sequence[int] = BATCHES,
    peer_names: Sequence[str] = PEERS,
    *,
    threads: int = 2,
    repeats: int = 15,
    block_seconds: float = 0.01,
    settle: float = 0.05,
) -> dict[str, Any]:
    """Measure every (H, B) against every installed peer; returns a JSON-ready dict."""
    from fastlstm.bench import threads as thread_counts

    available = peers.available_peers()
    wanted = [name for name in peer_names if name in available and name in PEERS]
    missing = [name for name in peer_names if name in PEERS and name not in available]
    rows, splits = [], []
    with thread_counts(threads):
        for hidden in hidden_sizes:
            for batch in batches:
                model = fl.LSTM(hidden, hidden, seed=0).eval()
                x = np.random.default_rng(0).standard_normal((batch, hidden)).astype(np.float32)
                ours, _ = _fastlstm_side(model, x)
                # steps per sample: about block_seconds of fastlstm (at least 50)
                estimate = _per_step(_block(ours, 200), 200)
                steps = max(50, int(block_seconds / max(estimate, 1e-7)))
                times = split(model, x, steps, max(3, repeats // 3))
                parts = times.pop("parts")
                splits.append(
                    {
                        "hidden": hidden,
                        "batch": batch,
                        "parts": parts,
                        **{k: v * 1e6 for k, v in times.items()},
                    }
                )
                for name in wanted:
                    make = _ort_side if name == "onnxruntime" else _torch_side
                    peer = make(model, x, threads)
                    _first_step_agrees(_fastlstm_side(model, x)[0], peer)
                    ours, _ = _fastlstm_side(model, x)
                    mine, theirs = [], []
                    ours_block, peer_block = _block(ours, steps), _block(peer, steps)
                    for _ in range(repeats):
                        settle_call(ours_block, settle)
                        mine.append(_per_step(ours_block, steps))
                        settle_call(peer_block, settle)
                        theirs.append(_per_step(peer_block, steps))
                    fast, slow = statistics.median(mine), statistics.median(theirs)
                    rows.append(
                        {
                            "hidden": hidden,
                            "batch": batch,
                            "peer": name,
                            "peer_us": slow * 1e6,
                            "fastlstm_us": fast * 1e6,
                            "ratio": slow / fast,
                            "steps_per_sample": steps,
                            "repeats": repeats,
                        }
                    )
    return {
        "cpu": cpu_model(),
        "threads": threads,
        "versions": {name: available.get(name) for name in wanted},
        "missing": missing,
        "rows": rows,
        "split": splits,
    }


def format_table(result: dict[str, Any]) -> str:
    """The per-step table and, per (H, B), the split of fastlstm's step."""
    lines = [
        "fastlstm bench --streaming: one step of LSTM(I = H, H), float32, per step in us; "
        f"peers on {result['threads']} threads; medians of alternating samples",
        f"CPU: {result['cpu']}",
    ]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    if versions:
        lines.append(f"peers: {versions}")
    if result["missing"]:
        lines.append(f"left out (not installed): {', '.join(result['missing'])}")
    lines.append(f"{'H':>5} {'B':>4}  {'peer':<12} {'peer us':>9} {'fastlstm us':>12} {'ratio':>7}")
    for row in result["rows"]:
        lines.append(
            f"{row['hidden']:>5} {row['batch']:>4}  {row['peer']:<12} {row['peer_us']:>9.2f} "
            f"{row['fastlstm_us']:>12.2f} {row['ratio']:>6.2f}x"
        )
    lines.append("")
    lines.append(
        "fastlstm's step (us): Python (method, checks; with rows in 2 parts also the hand-off "
        "to a second thread) + Numba dispatch + kernel (one thread, per step of a chunk)"
    )
    lines.append(
        f"{'H':>5} {'B':>4}  {'step':>7} {'python':>7} {'dispatch':>9} {'kernel':>7} {'parts':>6}"
    )
    for row in result["split"]:
        lines.append(
            f"{row['hidden']:>5} {row['batch']:>4}  {row['step_s']:>7.2f} {row['python_s']:>7.2f} "
            f"{row['dispatch_s']:>9.2f} {row['kernel_s']:>7.2f} {row['parts']:>6}"
        )
    return "\n".join(lines)
