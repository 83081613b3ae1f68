"""The command line: ``fastlstm bench`` and ``fastlstm profile`` on tiny shapes.

Timings are never asserted (the machine is shared and noisy): only the structure of what
is printed and written, and that every number is positive and finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numba
import pytest

from fastlstm import bench, bench_conditions, cli, peers

TINY = "B4T3I5H8"
THREADS = str(min(2, numba.config.NUMBA_NUM_THREADS))
PHASES = (
    "input_gemm",
    "pack_weights",
    "time_loop",
    "dropout",
    "backward_time_loop",
    "weight_gradients",
)


def _run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("shape "))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_table_json_and_plot(capsys, tmp_path):
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    text = _run(
        capsys,
        "bench",
        "--shapes",
        f"seed,{TINY}",
        "--repeats",
        "3",
        "--mode",
        "both",
        "--threads",
        THREADS,
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
        "--settle",
        "0.01",
    )
    rows = _table_rows(text)
    expected = {
        (shape, mode, peer)
        for shape in ("seed", TINY)
        for mode in ("forward", "train")
        for peer in peers.available_peers()
        if not (peer == "onnxruntime" and mode == "train")
    }
    assert {(r[0], r[5], r[6]) for r in rows} == expected
    for row in rows:
        assert row[9].endswith("x") and float(row[9][:-1]) > 0, row  # the ratio
    assert "onnxruntime left out of train" in text
    assert "GEMM" in text

    result = json.loads(json_path.read_text())
    assert set(result) >= {"config", "machine", "gemm_gflops", "rows", "notes"}
    assert result["config"]["threads"] == int(THREADS)
    assert result["config"]["modes"] == ["forward", "train"]
    assert result["config"]["settle_s"] == 0.01
    assert _positive(result["gemm_gflops"])
    assert len(result["rows"]) == len(rows)
    for row in result["rows"]:
        for key in (
            "peer_s",
            "fastlstm_s",
            "ratio",
            "flops",
            "gflops",
            "gemm_share",
            "peer_setup_s",
        ):
            assert _positive(row[key]), (key, row)
        assert row["fastlstm_first_call_s"] >= 0 and row["peer_first_call_s"] >= 0
        assert row["peer_repeats"] == 3 == len(row["fastlstm_samples"]) == len(row["peer_samples"])
        assert row["ratio"] == pytest.approx(row["peer_s"] / row["fastlstm_s"])
        shape = bench.parse_shape(row["shape"])
        assert row["flops"] == bench.flops(shape, mode=row["mode"])
    seed_forward = bench.flops(bench.GRID["seed"])
    assert seed_forward == 2 * 4 * 8 * (5 + 8) * 100 * 10

    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_variant_leaves_out_peers_without_it(capsys):
    text = _run(
        capsys,
        "bench",
        "--shapes",
        TINY,
        "--repeats",
        "3",
        "--variant",
        "diagonal",
        "--threads",
        THREADS,
    )
    assert {r[6] for r in _table_rows(text)} == {"onnxruntime", "reference"}
    assert "torch left out of forward (diagonal, float32): torch.nn.LSTM has no diagonal" in text


def test_bench_missing_peer_is_left_out_with_a_note(capsys, monkeypatch):
    real = peers.available_peers()
    monkeypatch.setattr(
        peers, "available_peers", lambda: {k: v for k, v in real.items() if k != "onnxruntime"}
    )
    text = _run(
        capsys,
        "bench",
        "--shapes",
        TINY,
        "--repeats",
        "3",
        "--peers",
        "onnxruntime,reference",
        "--dtype",
        "float64",
        "--threads",
        THREADS,
    )
    assert {r[6] for r in _table_rows(text)} == {"reference"}
    assert "onnxruntime left out: not installed" in text


def test_bench_alone_and_bad_arguments(capsys):
    text = _run(
        capsys,
        "bench",
        "--shapes",
        TINY,
        "--repeats",
        "3",
        "--peers",
        "none",
        "--mode",
        "train",
        "--threads",
        THREADS,
    )
    rows = _table_rows(text)
    assert [(r[0], r[5], r[6]) for r in rows] == [(TINY, "train", "(none)")]
    busy = bench.cpu_busy(0.05)
    assert busy is None or 0 <= busy <= 1
    for argv in (
        ["bench", "--shapes", "huge"],
        ["bench", "--peers", "tensorflow"],
        ["bench", "--mode", "sideways"],
        ["bench", "--settle", "-1"],
        ["bench", "--settle", "nan"],
        ["profile", "--batch", "2"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_bench_under_load_and_cold_start(capsys, tmp_path):
    result = bench_conditions.under_load(
        bench.parse_shape(TINY),
        peer_names=("torch",),
        repeats=3,
        threads_n=int(THREADS),
        settle=0.01,
    )
    assert result["settle_s"] == 0.01
    assert set(result["sides"]) == {"fastlstm", "torch"}
    for side in result["sides"].values():
        assert all(_positive(side[k]) for k in ("alone_s", "loaded_s", "slowdown"))
    assert "slowdown" in bench_conditions.format_under_load(result)
    cold = bench_conditions.cold_start(
        bench.parse_shape(TINY), threads_n=int(THREADS), train=True, empty_cache=False
    )
    case = cold["cases"]["existing cache"]
    for key in (
        "import_s",
        "first_forward_s",
        "second_forward_s",
        "first_train_step_s",
        "process_s",
    ):
        assert _positive(case[key]), key
    assert "1st forward" in bench_conditions.format_cold_start(cold)


@pytest.mark.parametrize(
    "extra",
    [
        ["--train"],
        [],
        ["--train", "--layers", "2", "--bidirectional", "--dropout", "0.3"],
        ["--batch", "1"],
    ],
    ids=["train", "forward", "train-2-layers-bi-dropout", "forward-one-row"],
)
def test_profile_prints_every_phase_and_the_thread_config(capsys, tmp_path, extra):
    json_path = tmp_path / "profile.json"
    text = _run(
        capsys,
        "profile",
        "--batch",
        "8",
        "--seq",
        "10",
        "--input",
        "16",
        "--hidden",
        "128",
        "--repeats",
        "2",
        "--threads",
        THREADS,
        "--json",
        str(json_path),
        *extra,
    )
    for phase in PHASES:
        assert phase in text
    for label in (
        "matrix products",
        "gate math",
        "estimate",
        "first forward",
        "Numba threading layer",
        "numba.get_num_threads()",
        "threadpool_info",
        "time loops:",
        "total (public call)",
    ):
        assert label in text, label
    assert ("first backward" in text) == ("--train" in extra)
    result = json.loads(json_path.read_text())
    phases = result["phases_s"]
    # One row: each task of the loop projects its own units' inputs before its steps (timed
    # alone beside); more: each step's projection inside the loop.
    fused = result["plan"]["fused_input_projection"]
    one_row = result["plan"]["one_row"]
    assert fused == ("--batch" not in extra) == (not one_row)
    assert phases["input_gemm"] == 0 and _positive(phases["time_loop"])
    assert _positive(result["loop_inputs_s"]) == one_row
    assert ("inside time_loop: fused per step" in text) == fused
    assert ("inside time_loop: each task its own units" in text) == one_row
    assert ("inputs and packing *" in text) == one_row
    assert one_row == ("one-row micro-kernel" in text) == ("--batch" in extra)
    if "--train" in extra:
        assert _positive(phases["backward_time_loop"]) and _positive(phases["weight_gradients"])
    assert _positive(phases["dropout"]) == ("--dropout" in extra)
    assert _positive(result["recurrent_products_s"]) and _positive(result["public_s"])
    assert result["machine"]["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert result["machine"]["numba_threads"] == int(THREADS)
    assert any(pool["user_api"] == "blas" for pool in result["machine"]["threadpools"])


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "fastlstm", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("demo", "bench", "profile"):
        assert command in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "fastlstm", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--under-load" in done.stdout


def test_profile_times_the_hidden_unit_split_as_the_loop_runs_it(capsys, monkeypatch, tmp_path):
    """Weights beyond the fused limit (forced to 0 here): the loop splits hidden units over
    the two threads, and the profile's products-alone run the same split."""
    from fastlstm import _routes

    if THREADS != "2":
        pytest.fail("this machine has fewer than 2 cores; the suite expects at least 2")
    monkeypatch.setattr(_routes, "FUSED_MAX_WEIGHT_BYTES", 0)
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", 0)
    json_path = tmp_path / "profile.json"
    text = _run(capsys, "profile", "--batch", "5", "--seq", "5", "--input", "16", "--hidden",
                "64", "--repeats", "2", "--threads", "2", "--json", str(json_path))  # fmt: skip
    assert "packed micro-kernel, hidden units split" in text
    assert "direction 0 units 0..31, direction 0 units 32..63); no BLAS in the loop" in text
    result = json.loads(json_path.read_text())
    assert result["plan"]["units_split"] and not result["plan"]["fused_input_projection"]
    assert _positive(result["recurrent_products_s"]) and _positive(result["phases_s"]["input_gemm"])


def test_info_names_the_cpu_the_variant_and_the_thresholds(capsys):
    from fastlstm import _config, _cpu

    text = _run(capsys, "info")
    assert _cpu.CPU.model in text and _cpu.CPU.llvm_name in text
    assert f"kernel variant: {_cpu.VARIANT.label}" in text
    assert ", ".join(_cpu.runnable_variants(_cpu.CPU)) in text
    report = json.loads(_run(capsys, "info", "--json"))
    assert report["variant"]["name"] == _cpu.VARIANT.name
    assert report["variant"]["rows"] == _cpu.VARIANT.rows
    assert report["cpu"]["l2_bytes"] == _cpu.CPU.l2_bytes > 0
    assert report["thresholds"]["fused_max_weight_bytes"] == _config.FUSED_MAX_WEIGHT_BYTES
    assert _config.FUSED_MAX_WEIGHT_BYTES == _cpu.CPU.l3_bytes // 4
    assert _config.PACKED_PROJECTION_BYTES == _cpu.CPU.l2_bytes // 2


def test_a_variant_the_cpu_cannot_run_stops_the_import():
    done = subprocess.run(
        [sys.executable, "-c", "import fastlstm"],
        env={**os.environ, "FASTLSTM_VARIANT": "avx1024"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "FASTLSTM_VARIANT='avx1024'" in done.stderr and "runs only the variants" in done.stderr
