"""``fastlstm demo``: the command's output and exit status, and its training loop against torch.

The demo's own pieces (make_problem, build_model, the trainers, train) are what the command
runs, so checking them step by step against torch checks the demo's loop itself.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from utils import assert_close

from fastlstm import demo

STEP_LINE = re.compile(r"^step +(\d+)/(\d+)  loss (\S+)", re.MULTILINE)
FINAL_LINE = re.compile(r"^final MSE +(\S+) after", re.MULTILINE)


def run_demo(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return demo.run(parser.parse_args(list(argv)))


def printed_losses(text: str) -> dict[int, float]:
    return {int(step): float(loss) for step, _, loss in STEP_LINE.findall(text)}


def final_mse(text: str) -> float:
    (value,) = FINAL_LINE.findall(text)
    return float(value)


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the timing table, keyed by peer: [warm-up, wall, per step, final MSE, ratio]."""
    block = text[text.index("peer/fastlstm") :].splitlines()[2:]
    rows = {}
    for line in block:
        match = re.match(r"^  (\S+(?: \S+)?) {2,}(.*)$", line)
        if match and "left out" not in line:
            cells = re.split(r" {2,}", match.group(2).strip())
            rows[match.group(1)] = cells
    return rows


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_short_run_prints_decreasing_losses_and_final_mse(capsys):
    assert run_demo("--steps", "30", "--print-every", "10", "--no-peers") == 0
    out, err = capsys.readouterr()
    assert err == ""  # stderr is not a terminal here: no progress bar
    losses = printed_losses(out)
    assert sorted(losses) == [1, 10, 20, 30]  # the first step, every 10, the last
    values = [losses[step] for step in sorted(losses)]
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))
    assert values[-1] < values[0] / 5
    # The final MSE is the trained model's (after the last update), far below the start.
    assert final_mse(out) < losses[1] / 5
    assert "checked on the default problem only" in out
    assert "held-out MSE" in out
    rows = table_rows(out)
    assert list(rows) == ["fastlstm"]
    assert rows["fastlstm"][-1] == "1.00"
    assert "peers: left out (--no-peers)" in out


def test_default_run_reaches_the_threshold(capsys):
    # The full default problem (1000 steps of the standard cell): about 2-3 s in fastlstm.
    assert run_demo("--no-peers", "--quiet") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert printed_losses(out) == {}  # --quiet: no loss lines
    assert final_mse(out) < demo.THRESHOLD
    assert "target reached" in out


def test_default_problem_that_misses_the_threshold_exits_1(capsys, monkeypatch):
    # Make 5 steps the default: the default problem then cannot reach 0.01, and says so.
    monkeypatch.setitem(demo.DEFAULTS, "steps", 5)
    assert run_demo("--no-peers", "--quiet") == 1
    out = capsys.readouterr().out
    assert final_mse(out) >= demo.THRESHOLD
    assert "target NOT reached" in out


def test_peers_table_has_reference_and_torch(capsys):
    threads_before = torch.get_num_threads()
    assert run_demo("--steps", "5", "--quiet") == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    torch_name = f"torch {torch.__version__}"
    assert list(rows) == ["fastlstm", "fastlstm.reference", torch_name]
    for cells in rows.values():
        warmup, wall, per_step, final, ratio = cells
        assert re.fullmatch(r"[\d.]+ m?s", warmup) and re.fullmatch(r"[\d.]+ m?s", wall)
        assert per_step.endswith(" ms") and float(ratio) > 0
    # Same initial weights, same 5 float32 steps: the same final MSE to float32 rounding.
    finals = {name: float(cells[3]) for name, cells in rows.items()}
    for name in ("fastlstm.reference", torch_name):
        assert finals[name] == pytest.approx(finals["fastlstm"], rel=1e-3)
    assert rows["fastlstm"][4] == "1.00"
    assert "left out" not in out
    assert torch.get_num_threads() == threads_before  # restored after the torch run


def test_seed_cell_runs_next_to_the_standard_cell(capsys):
    assert run_demo("--cell", "seed", "--steps", "20", "--print-every", "10") == 0
    out = capsys.readouterr().out
    assert "peephole='full'" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all("(standard cell " in line for line in lines)
    # Step 1 is the loss of the initial weights: the extra W_ch/b_ch make it differ.
    seed_first = float(STEP_LINE.search(lines[0]).group(3))
    standard_first = float(re.search(r"standard cell (\S+)\)", lines[0]).group(1))
    assert seed_first != standard_first
    assert re.search(r"^standard cell +\S+ after 20 steps", out, re.MULTILINE)
    assert list(table_rows(out)) == ["fastlstm", "fastlstm.reference"]
    assert "torch: left out (torch.nn.LSTM has no full-peephole cell)" in out


def test_progress_bar_goes_to_stderr(capsys):
    config = demo.Config(steps=3)
    problem = demo.make_problem(config)
    trainer = demo.FastlstmTrainer(*demo.build_model(config, problem), problem.x, problem.y, 1e-2)
    demo.train(trainer, 3, label="bar-label", print_every=1, progress=True)
    out, err = capsys.readouterr()
    assert "bar-label" in err and "bar-label" not in out
    assert len(printed_losses(out)) == 3


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--lr", "0"], ["--dtype", "float16"], ["--cell", "lstm"], ["--seed", "-1"]],
)
def test_bad_options_are_refused(argv, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_defaults_are_the_seed_notebook_problem():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    config = demo.Config.from_args(parser.parse_args([]))
    assert config == demo.Config()
    assert (config.batch, config.seq, config.inputs, config.hidden, config.layers) == (
        100, 10, 5, 8, 2,
    )  # fmt: skip
    assert (config.steps, config.lr, config.cell) == (1000, 1e-2, "standard")
    assert config.is_default_problem()
    assert not demo.Config(steps=30).is_default_problem()
    assert not demo.Config(cell="seed").is_default_problem()
    assert demo.Config(seed=3, dtype="float64").is_default_problem()


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_problem_is_the_per_step_sum_and_reproducible(dtype):
    config = demo.Config(dtype=dtype, seed=7, batch=4, seq=3, inputs=2)
    problem = demo.make_problem(config)
    assert problem.x.shape == (4, 3, 2) and problem.y.shape == (4, 3, 1)
    assert problem.x.dtype == np.dtype(dtype) and problem.y.dtype == np.dtype(dtype)
    assert problem.x.min() >= 0 and problem.x.max() < 1
    np.testing.assert_array_equal(problem.y[..., 0], problem.x.sum(axis=-1))
    again = demo.make_problem(config)
    np.testing.assert_array_equal(again.x, problem.x)
    np.testing.assert_array_equal(again.x_test, problem.x_test)
    assert not np.array_equal(problem.x_test, problem.x)


def test_seed_cell_starts_from_the_standard_weights():
    config = demo.Config()
    problem = demo.make_problem(config)
    standard, _ = demo.build_model(config, problem)
    seed, _ = demo.build_model(config, problem, "full")
    assert "weight_ch_l0" in seed.params and "bias_ch_l1" in seed.params
    for name, value in standard.params.items():
        np.testing.assert_array_equal(seed.params[name], value)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [
        ("float64", 1e-9),  # float64 rounding, amplified over 20 steps: observed ~5e-16
        ("float32", 1e-4),  # float32 rounding, amplified over 20 steps: observed ~2e-7
    ],
)
def test_training_trajectory_follows_torch(dtype, rtol):
    """From the same initial weights, the demo's fastlstm loop gives torch's losses step by step.

    torch runs on one thread here: its spin-waiting OpenMP pool can take a second per step
    on a busy machine, and the numbers do not depend on the thread count.
    """
    steps = 20
    config = demo.Config(dtype=dtype, steps=steps)
    problem = demo.make_problem(config)
    lstm, head = demo.build_model(config, problem)
    theirs = demo.TorchTrainer(lstm, head, problem.x, problem.y, config.lr)  # copies the weights
    mine = demo.FastlstmTrainer(lstm, head, problem.x, problem.y, config.lr)
    my_losses = demo.train(mine, steps)
    with demo.torch_threads(1):
        their_losses = demo.train(theirs, steps)
    assert my_losses[-1] < my_losses[0] / 3  # training moved: the comparison is not vacuous
    assert_close(my_losses, their_losses, rtol=rtol, atol=0, what="losses")
    # And the parameters after the last update.
    for name, value in theirs.lstm.state_dict().items():
        assert_close(lstm.params[name], value, dtype, rtol=rtol, atol=rtol * 1e-2, what=name)
    for name, value in theirs.head.state_dict().items():
        assert_close(head.params[name], value, dtype, rtol=rtol, atol=rtol * 1e-2, what=name)
    assert mine.evaluate(problem.x, problem.y) == pytest.approx(
        theirs.evaluate(problem.x, problem.y), rel=rtol * 10
    )


@pytest.mark.parametrize("cell", ["standard", "seed"])
def test_reference_trajectory_equals_fastlstm_in_float64(cell):
    steps = 10
    config = demo.Config(dtype="float64", steps=steps, cell=cell)
    problem = demo.make_problem(config)
    lstm, head = demo.build_model(config, problem, config.peephole)
    ref = demo.ReferenceTrainer(lstm, head, problem.x, problem.y, config.lr)  # copies the weights
    mine = demo.FastlstmTrainer(lstm, head, problem.x, problem.y, config.lr)
    assert_close(demo.train(mine, steps), demo.train(ref, steps), rtol=1e-9, atol=0)
    for name, value in ref.lstm.params.items():
        assert_close(lstm.params[name], value, "float64", what=name)
    assert mine.evaluate(problem.x_test, problem.y_test) == pytest.approx(
        ref.evaluate(problem.x_test, problem.y_test), rel=1e-9
    )
