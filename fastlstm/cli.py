"""The ``fastlstm`` command: ``fastlstm demo | bench | profile`` (also ``python -m fastlstm``).

Examples::

    fastlstm bench                                   # the grid, forward, float32, 2 threads
    fastlstm bench --mode both --json run.json --plot run.png
    fastlstm bench --shapes seed,medium --dtype float64 --mode train
    fastlstm bench --shapes B4T3I5H8 --variant diagonal --peers onnxruntime,reference
    fastlstm bench --under-load                      # medium forward next to 2 busy processes
    fastlstm bench --cold-start                      # import + first forward, fresh interpreter
    fastlstm profile --batch 32 --seq 100 --input 128 --hidden 256 --train

Each subcommand imports what it needs when it runs (``demo`` its module, ``bench`` the peers,
``--plot`` matplotlib), so ``fastlstm --help`` stays fast and works without any of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastlstm import __version__

_DEMO_MISSING = "fastlstm demo is not available in this installation (no fastlstm/demo.py)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="threads on each side (fastlstm, torch, ONNX Runtime); default 2 (1 on a "
        "one-CPU machine)",
    )


def _add_bench(sub) -> None:
    from fastlstm.bench import DEFAULT_BUDGET, DEFAULT_REPEATS, DEFAULT_SETTLE, GRID, VARIANTS

    parser = sub.add_parser(
        "bench",
        help="time fastlstm against torch, ONNX Runtime and the reference, side by side",
        description=(
            "Time fastlstm against its peers on the benchmark grid, in one process: medians "
            "of alternating runs (fastlstm, peer, fastlstm, ...) after a warm-up of each, the "
            "same weights and thread count on every side. Prints a table: peer time, fastlstm "
            "time, ratio peer/fastlstm, fastlstm's GFLOP/s and share of the machine's GEMM "
            "rate, and first-call (compile) times apart."
        ),
    )
    parser.add_argument(
        "--shapes",
        default="all",
        help=f"comma-separated grid names ({', '.join(GRID)}) or custom shapes like "
        "B4T3I5H8; default all",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--mode", choices=("forward", "train", "both"), default="forward")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="standard",
        help="fastlstm variant; peers that lack it are left out (torch has proj, ONNX "
        "Runtime diagonal peepholes, the reference all)",
    )
    parser.add_argument(
        "--peers",
        default="torch,onnxruntime,reference",
        help="comma-separated peers among torch, onnxruntime, reference ('none' for "
        "fastlstm alone); peers not installed are left out with a note",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=DEFAULT_REPEATS,
        help=f"alternating pairs per peer and row; default {DEFAULT_REPEATS}",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="seconds of timed calls per peer and row before the pairs are cut (to at least "
        f"3); default {DEFAULT_BUDGET:g}",
    )
    parser.add_argument(
        "--settle",
        type=_nonnegative_float,
        default=DEFAULT_SETTLE,
        help="seconds each side runs untimed before each of its timed calls (at least one "
        "call), so that the other side's spinning threads have stopped and its own are "
        f"awake; default {DEFAULT_SETTLE:g}",
    )
    _add_threads(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw ratios (needs matplotlib)")
    parser.add_argument(
        "--under-load",
        action="store_true",
        help="instead of the grid: forward of the first shape (default medium) for fastlstm "
        "and each peer, alone and next to 2 busy processes; prints slowdowns",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="instead of the grid: one step of a live stream (stream.step with out=) against "
        "ONNX Runtime's one-step call with state and torch.nn.LSTMCell, per step, float32, "
        "I = H, over --stream-hidden x --stream-batch; also splits fastlstm's step",
    )
    parser.add_argument("--stream-hidden", default="64,128,256", help="H values for --streaming")
    parser.add_argument("--stream-batch", default="1,16", help="B values for --streaming")
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="instead of the grid: import + first forward (+ first training step with "
        "--mode train/both) of the first shape (default medium) in a fresh interpreter, with "
        "Numba's cache as it is and with an empty one (NUMBA_CACHE_DIR)",
    )
    parser.set_defaults(run=_run_bench)


def _add_profile(sub) -> None:
    parser = sub.add_parser(
        "profile",
        help="where the time of one forward or training step goes, phase by phase",
        description=(
            "Profile one LSTM call phase by phase (input GEMM, time loop split into recurrent "
            "products and gate math, dropout, backward time loop, weight gradients) with "
            "GFLOP/s, first-call (compile) time apart, and the thread and BLAS configuration."
        ),
    )
    parser.add_argument("--batch", type=_positive_int, required=True, help="B")
    parser.add_argument("--seq", type=_positive_int, required=True, help="T")
    parser.add_argument("--input", type=_positive_int, required=True, help="I")
    parser.add_argument("--hidden", type=_positive_int, required=True, help="H")
    parser.add_argument("--train", action="store_true", help="a training step, not a forward")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--layers", type=_positive_int, default=1)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="between layers (needs --layers > 1)"
    )
    parser.add_argument("--repeats", type=_positive_int, default=10)
    _add_threads(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    parser.set_defaults(run=_run_profile)


def _add_info(sub) -> None:
    parser = sub.add_parser(
        "info",
        help="the CPU as fastlstm sees it, and the kernel variant and thresholds it chose",
        description=(
            "Print the CPU description fastlstm takes its kernels' shape from (model, the CPU "
            "LLVM compiles for, vector instruction set and registers, cache sizes, cores), the "
            "kernel variant in use and every variant this CPU can run (FASTLSTM_VARIANT "
            "forces one), the thresholds derived from the caches, and the thread set-up."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print it as JSON instead")
    parser.set_defaults(run=_run_info)


def _add_compile(sub) -> None:
    parser = sub.add_parser(
        "compile",
        help="compile the kernels for this CPU ahead of time (fills Numba's cache)",
        description=(
            "Compile fastlstm's kernels for this CPU and kernel variant now, so that the "
            "first real call starts at once (for container images, CI and new environments). "
            "Runs tiny calls down every route a real call may take, with a progress bar, "
            "then prints the seconds per kernel that compiled (none when all came from the "
            "cache)."
        ),
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="comma-separated dtypes among float32, float64 (default float32)",
    )
    parser.add_argument("--train", action="store_true", help="also the training kernels")
    parser.set_defaults(run=_run_compile)


def _add_demo(sub, load: bool) -> None:
    """The demo subcommand; its arguments come from fastlstm.demo, imported only if chosen."""
    parser = sub.add_parser("demo", help="train a small model end to end (fastlstm.demo)")
    parser.set_defaults(run=_run_demo)
    if load:
        try:
            from fastlstm import demo
        except ModuleNotFoundError as exc:
            if exc.name != "fastlstm.demo":
                raise
            parser.set_defaults(run=_demo_missing)
            return
        demo.add_arguments(parser)


def build_parser(*, load_demo: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlstm",
        description="fastlstm: a NumPy-native LSTM on Numba kernels. Subcommands: demo, "
        "bench, profile, info, compile.",
    )
    parser.add_argument("--version", action="version", version=f"fastlstm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,profile,info,compile}")
    sub.required = True
    _add_demo(sub, load_demo)
    _add_bench(sub)
    _add_profile(sub)
    _add_info(sub)
    _add_compile(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load_demo=command == "demo")
    args = parser.parse_args(argv)
    return int(args.run(args, parser) or 0)


# ---------------------------------------------------------------------------- subcommands


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastlstm import demo

    return demo.run(args)


def _run_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json
    import os

    import fastlstm
    from fastlstm import _blas_choice, _config, _cpu
    from fastlstm._blas_choice import BLAS

    report = _cpu.info()
    report["thresholds"] = {
        "fused_max_weight_bytes": _config.FUSED_MAX_WEIGHT_BYTES,
        "packed_projection_bytes": _config.PACKED_PROJECTION_BYTES,
        "parallel_min_macs": _config.PARALLEL_MIN_MACS,
    }
    report["threads"] = fastlstm.get_num_threads()
    report["kernel_blas"] = {"source": BLAS.source, "library": BLAS.description,
                             "integer_bits": BLAS.integer_bits}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    forced = os.environ.get(_cpu.ENV_VARIANT)
    how = f"forced by {_cpu.ENV_VARIANT}={forced}" if forced else "the widest this CPU runs"
    lines = [
        f"CPU: {_cpu.CPU.summary()}",
        f"kernel variant: {_cpu.VARIANT.label}, {how}",
        f"variants this CPU runs: {', '.join(report['runnable_variants'])}",
        f"fused input projection up to {_config.FUSED_MAX_WEIGHT_BYTES >> 20} MiB of weights "
        f"(a quarter of L3); packed input projection up to "
        f"{_config.PACKED_PROJECTION_BYTES >> 10} KiB of rows (half of L2)",
        f"threads: {report['threads']} (fastlstm.set_num_threads sets fastlstm's, Numba's "
        "and the BLAS's)",
        f"kernels call the BLAS of {BLAS.description}, {BLAS.integer_bits}-bit integers "
        f"({_blas_choice.ENV_BLAS}=numpy|scipy forces one)",
    ]
    print("\n".join(lines))
    return 0


def _run_compile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    from fastlstm import _cpu, _precompile

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    wrong = [d for d in dtypes if d not in ("float32", "float64")]
    if wrong or not dtypes:
        parser.error(f"--dtype: expected float32 and/or float64, got {args.dtype!r}")
    start = time.perf_counter()
    seconds = _precompile.precompile(dtypes, train=args.train)
    total = time.perf_counter() - start
    print(f"CPU: {_cpu.CPU.model} ({_cpu.CPU.llvm_name}); kernel variant {_cpu.VARIANT.name}")
    if not seconds:
        print(f"every kernel came from Numba's cache ({total:.1f} s)")
        return 0
    print(f"compiled in {total:.1f} s; seconds per kernel (what it compiled beneath it included):")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {value:7.2f}  {name}")
    return 0


def _demo_missing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(_DEMO_MISSING, file=sys.stderr)
    return 2


def _check_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve the default --threads and refuse more than Numba can use."""
    import numba

    highest = numba.config.NUMBA_NUM_THREADS
    if args.threads is None:
        args.threads = min(2, highest)
    if args.threads > highest:
        parser.error(f"--threads {args.threads}: this machine gives Numba at most {highest}")


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastlstm import bench

    _check_threads(parser, args)
    if args.streaming:
        return _run_bench_streaming(args, parser)
    try:
        shapes = bench.parse_shapes(args.shapes)
    except ValueError as exc:
        parser.error(str(exc))
    if not shapes:
        parser.error("--shapes: no shape given")
    names = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",")]
    unknown = [p for p in names if p not in bench.peers.PEERS]
    if unknown:
        parser.error(
            f"--peers: unknown {', '.join(unknown)} (expected torch, onnxruntime, "
            "reference or none)"
        )
    modes = bench.MODES if args.mode == "both" else (args.mode,)
    results = {}
    if args.under_load or args.cold_start:
        from fastlstm import bench_conditions

        shape = shapes[0] if args.shapes != "all" else bench.GRID["medium"]
        if args.under_load:
            result = bench_conditions.under_load(
                shape,
                peer_names=names,
                dtype=args.dtype,
                threads_n=args.threads,
                repeats=args.repeats,
                settle=args.settle,
            )
            print(bench_conditions.format_under_load(result), flush=True)
            results["under_load"] = result
        if args.cold_start:
            result = bench_conditions.cold_start(
                shape, dtype=args.dtype, threads_n=args.threads, train="train" in modes
            )
            print(bench_conditions.format_cold_start(result), flush=True)
            results["cold_start"] = result
        if args.json:
            bench.write_json(results, args.json)
        return 0
    result = bench.run_grid(
        shapes,
        modes=modes,
        peer_names=names,
        dtype=args.dtype,
        variant=args.variant,
        threads_n=args.threads,
        repeats=args.repeats,
        budget=args.budget,
        settle=args.settle,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(bench.format_table(result), flush=True)
    if args.json:
        bench.write_json(result, args.json)
    if args.plot:
        bench.plot(result, args.plot)
    return 0


def _run_bench_streaming(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from fastlstm import bench_streaming

    try:
        hidden = [int(v) for v in args.stream_hidden.split(",")]
        batches = [int(v) for v in args.stream_batch.split(",")]
    except ValueError:
        parser.error("--stream-hidden/--stream-batch: comma-separated positive integers")
    if min(hidden + batches) < 1:
        parser.error("--stream-hidden/--stream-batch: comma-separated positive integers")
    names = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",")]
    result = bench_streaming.run(
        hidden, batches, names, threads=args.threads, repeats=args.repeats, settle=args.settle
    )
    print(bench_streaming.format_table(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


def _run_profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastlstm import bench, profile

    _check_threads(parser, args)
    if args.dropout and args.layers == 1:
        parser.error("--dropout applies between layers: it needs --layers > 1")
    shape = bench.Shape(
        f"B{args.batch}T{args.seq}I{args.input}H{args.hidden}",
        args.batch,
        args.seq,
        args.input,
        args.hidden,
    )
    result = profile.profile(
        shape,
        train=args.train,
        dtype=args.dtype,
        threads_n=args.threads,
        layers=args.layers,
        bidirectional=args.bidirectional,
        dropout=args.dropout,
        repeats=args.repeats,
    )
    print(profile.format_profile(result), flush=True)
    if args.json:
        bench.write_json(result, args.json)
    return 0
