"""The benchmark peers compute what fastlstm computes, from the same weights.

ONNX Runtime's LSTM operator is the independent implementation of the diagonal peephole
(Gers & Schmidhuber, ONNX's P): agreeing with it, with peepholes large enough to matter and
in every direction and length pattern, is what proves fastlstm's ``peephole="diagonal"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lstm_forward import random_state
from utils import assert_close, random_input

import fastlstm as fl
from fastlstm import peers


def _model(input_size=5, hidden=7, *, dtype=np.float32, seed=0, peephole_scale=None, **kw):
    lstm = fl.LSTM(input_size, hidden, dtype=dtype, seed=seed, **kw).eval()
    if peephole_scale is not None:
        # Peepholes as large as the other weights' whole range: their effect is far above
        # the tolerance, so a wrong row order or a wrong c_{t-1}/c_t cannot pass.
        rng = np.random.default_rng(seed + 1)
        for name, value in lstm.params.items():
            if name.startswith("peephole"):
                value[...] = rng.uniform(-peephole_scale, peephole_scale, value.shape)
    return lstm


def _assert_same(lstm, runner, x, state=None, lengths=None, dtype=np.float32):
    out, (h_n, c_n) = lstm(x, state, lengths)
    out_p, (h_p, c_p) = runner.forward(x, state, lengths)
    assert_close(out_p, out, dtype, what="out")
    assert_close(h_p, h_n, dtype, what="h_n")
    assert_close(c_p, c_n, dtype, what="c_n")
    return out_p


# ------------------------------------------------------------------------------ availability


def test_dev_peers_are_available():
    found = peers.available_peers()
    assert set(found) == {"torch", "onnxruntime", "reference"}
    assert peers.missing_peers() == {}


def test_unsupported_combinations_are_named():
    assert "peephole" in peers.unsupported("torch", _model(peephole="diagonal"))
    assert "peephole" in peers.unsupported("torch", _model(peephole="full"))
    assert peers.unsupported("torch", _model(proj_size=3)) is None
    assert "projection" in peers.unsupported("onnxruntime", _model(proj_size=3))
    assert "diagonal" in peers.unsupported("onnxruntime", _model(peephole="full"))
    assert "inference" in peers.unsupported("onnxruntime", _model(), "train")
    assert peers.unsupported("onnxruntime", _model(peephole="diagonal")) is None
    assert peers.unsupported("reference", _model(peephole="full"), "train") is None
    with pytest.raises(ValueError, match="peephole"):
        peers.TorchRunner(_model(peephole="diagonal"))
    with pytest.raises(ValueError, match="projection"):
        peers.OrtRunner(_model(proj_size=3))
    with pytest.raises(ValueError, match="peer must be"):
        peers.unsupported("tensorflow", _model())


def test_onnx_model_is_a_valid_opset_14_graph():
    import onnx

    model = peers.onnx_model(
        _model(peephole="diagonal", bidirectional=True, num_layers=2),
        with_state=True,
        with_lengths=True,
    )
    onnx.checker.check_model(model, full_check=True)
    assert [op.version for op in model.opset_import] == [peers.ONNX_OPSET]
    lstm_nodes = [node for node in model.graph.node if node.op_type == "LSTM"]
    assert len(lstm_nodes) == 2
    assert all(len(node.input) == 8 for node in lstm_nodes)  # X W R B lens h0 c0 P


# ------------------------------------------------------------------ ONNX Runtime == fastlstm


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("peephole", [None, "diagonal"], ids=["standard", "diagonal"])
def test_ort_forward(rng, bidirectional, peephole):
    lstm = _model(bidirectional=bidirectional, peephole=peephole, peephole_scale=1.0)
    _assert_same(lstm, peers.OrtRunner(lstm), random_input(rng, lstm, 9, 4))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("peephole", [None, "diagonal"], ids=["standard", "diagonal"])
def test_ort_forward_with_initial_state(rng, bidirectional, peephole):
    lstm = _model(bidirectional=bidirectional, peephole=peephole, peephole_scale=1.0)
    x = random_input(rng, lstm, 6, 3)
    _assert_same(lstm, peers.OrtRunner(lstm), x, random_state(rng, lstm, 3))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("peephole", [None, "diagonal"], ids=["standard", "diagonal"])
def test_ort_sequence_lens_match_packed_semantics(rng, bidirectional, peephole):
    """ORT's sequence_lens = torch's packed sequences: the reverse direction starts at each
    sequence's own last step, outputs past it are zero, h_n/c_n are taken there."""
    lstm = _model(bidirectional=bidirectional, peephole=peephole, peephole_scale=1.0)
    x = random_input(rng, lstm, 8, 5)
    lengths = np.array([8, 3, 5, 1, 7])
    state = random_state(rng, lstm, 5)
    runner = peers.OrtRunner(lstm)
    out = _assert_same(lstm, runner, x, state, lengths)
    valid = np.arange(8)[:, None] < lengths[None, :]
    assert np.all(out[~valid] == 0), "ORT's outputs at padded steps are zero"
    _assert_same(lstm, runner, x, None, lengths)
    if peephole is None:  # the same through torch's packed sequences: all three agree
        torch_out, (torch_h, _) = peers.TorchRunner(lstm).forward(x, state, lengths)
        ort_out, (ort_h, _) = runner.forward(x, state, lengths)
        assert_close(ort_out, torch_out, what="ORT vs torch, packed: out")
        assert_close(ort_h, torch_h, what="ORT vs torch, packed: h_n")


def test_ort_zero_length_sequence(rng):
    """A length of 0 (torch refuses it): outputs zero in ORT as in fastlstm, and every
    other sequence unaffected. The final state differs: fastlstm returns h0/c0 (nothing ran,
    DESIGN.md), ONNX Runtime returns zeros, whatever the initial state."""
    lstm = _model(bidirectional=True, peephole="diagonal", peephole_scale=1.0)
    x = random_input(rng, lstm, 6, 3)
    lengths = np.array([6, 0, 2])
    state = random_state(rng, lstm, 3)
    out, (h_n, c_n) = lstm(x, state, lengths)
    out_p, (h_p, c_p) = peers.OrtRunner(lstm).forward(x, state, lengths)
    assert_close(out_p, out, what="out")
    assert np.all(out_p[:, 1] == 0)
    keep = [0, 2]
    assert_close(h_p[:, keep], h_n[:, keep], what="h_n of the non-empty sequences")
    assert_close(c_p[:, keep], c_n[:, keep], what="c_n of the non-empty sequences")
    assert_close(h_n[:, 1], state[0][:, 1], what="fastlstm: h_n of the empty sequence is h0")
    ort_empty = (h_p[:, 1], c_p[:, 1])
    assert all(np.all(v == 0) for v in ort_empty) or (
        np.allclose(ort_empty[0], state[0][:, 1]) and np.allclose(ort_empty[1], state[1][:, 1])
    ), "ONNX Runtime's state of an empty sequence is neither zeros nor the initial state"


def test_ort_diagonal_peephole_rows_are_i_f_o_and_o_sees_the_new_cell(rng):
    """Each peephole row on its own, against ORT: a swapped row order (ONNX's i, o, f vs
    fastlstm's i, f, o) or o reading c_{t-1} would make one of these fail."""
    x = None
    for row in range(3):
        lstm = _model(hidden=6, peephole="diagonal")
        peep = lstm.params["peephole_l0"]
        peep[...] = 0
        peep[row] = np.linspace(-3, 3, 6)
        x = random_input(rng, lstm, 7, 4) if x is None else x
        state = random_state(rng, lstm, 4)
        out = _assert_same(lstm, peers.OrtRunner(lstm), x, state)
        # The row matters: dropping it changes the output far beyond the tolerance.
        peep[row] = 0
        plain, _ = lstm(x, state)
        assert np.max(np.abs(out - plain)) > 1e-2, f"peephole row {row} has no visible effect"


def test_ort_diagonal_peephole_single_step_by_hand(rng):
    """One step from a non-zero cell, written out with ONNX's equations, against both."""
    lstm = _model(input_size=3, hidden=4, peephole="diagonal", peephole_scale=2.0)
    x = random_input(rng, lstm, 1, 2)
    h0, c0 = random_state(rng, lstm, 2)
    p = {k: v.astype(np.float64) for k, v in lstm.params.items()}
    a = x[0] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h0[0] @ p["weight_hh_l0"].T + p["bias_hh_l0"]
    a_i, a_f, a_g, a_o = np.split(a, 4, axis=1)
    p_i, p_f, p_o = p["peephole_l0"]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i = sig(a_i + p_i * c0[0])
    f = sig(a_f + p_f * c0[0])
    c = f * c0[0] + i * np.tanh(a_g)
    o = sig(a_o + p_o * c)
    h = o * np.tanh(c)
    out_ort, (h_ort, c_ort) = peers.OrtRunner(lstm).forward(x, (h0, c0))
    out_fl, (h_fl, c_fl) = lstm(x, (h0, c0))
    for got, what in ((out_ort[0], "ORT"), (out_fl[0], "fastlstm")):
        assert_close(got, h.astype(np.float32), np.float32, what=what)
    assert_close(c_ort[0], c.astype(np.float32), np.float32, what="ORT c")


@pytest.mark.parametrize(
    "options",
    [
        {"num_layers": 2},
        {"num_layers": 3, "bidirectional": True, "peephole": "diagonal"},
        {"batch_first": True, "bidirectional": True},
        {"bias": False, "peephole": "diagonal"},
        {"hidden": 1},
        {"hidden": 13, "input_size": 1},
    ],
    ids=["2-layers", "3-layers-bi-diagonal", "batch-first-bi", "no-bias-diagonal", "H1", "H13-I1"],
)
def test_ort_forward_configurations(rng, options):
    lstm = _model(peephole_scale=1.0, **options)
    runner = peers.OrtRunner(lstm)
    for steps, batch in ((1, 1), (5, 3)):
        x = random_input(rng, lstm, steps, batch)
        _assert_same(lstm, runner, x, random_state(rng, lstm, batch), np.arange(batch) % steps + 1)


def test_ort_float64_matches_or_is_reported_unsupported(rng):
    lstm = _model(dtype=np.float64, peephole="diagonal", peephole_scale=1.0, bidirectional=True)
    if peers.ort_supports_float64():
        x = random_input(rng, lstm, 6, 3, np.float64)
        _assert_same(
            lstm, peers.OrtRunner(lstm), x, random_state(rng, lstm, 3, np.float64), dtype=np.float64
        )
    else:
        assert "float32 only" in peers.unsupported("onnxruntime", lstm)


def test_ort_runner_takes_a_snapshot_of_the_weights(rng):
    lstm = _model()
    runner = peers.OrtRunner(lstm, threads=1)
    x = random_input(rng, lstm, 4, 2)
    before, _ = runner.forward(x)
    lstm.params["weight_hh_l0"][...] = 0
    after, _ = runner.forward(x)
    np.testing.assert_array_equal(after, before)
    runner.forward_fn(x)()  # the timed call runs


# ------------------------------------------------------------------------- torch == fastlstm


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "options",
    [{}, {"bidirectional": True, "num_layers": 2}, {"proj_size": 3}, {"batch_first": True}],
    ids=["standard", "2-layers-bi", "proj", "batch-first"],
)
def test_torch_forward(rng, dtype, options):
    lstm = _model(dtype=dtype, **options)
    runner = peers.TorchRunner(lstm)
    x = random_input(rng, lstm, 7, 4, dtype)
    _assert_same(lstm, runner, x, dtype=dtype)
    _assert_same(lstm, runner, x, random_state(rng, lstm, 4, dtype), np.array([7, 2, 5, 1]), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_torch_train_step_gives_fastlstm_gradients(rng, dtype):
    lstm = _model(dtype=dtype, bidirectional=True, proj_size=3)
    lstm.train()
    runner = peers.TorchRunner(lstm)
    x = random_input(rng, lstm, 6, 3, dtype)
    out, _ = lstm(x)
    dout = rng.standard_normal(out.shape).astype(dtype)
    lstm.zero_grad()
    lstm(x)
    lstm.backward(dout)
    step = runner.train_step_fn(x, dout)
    for _ in range(2):  # grads are zeroed before each step, not accumulated
        step()
    for name, param in runner.module.named_parameters():
        assert_close(param.grad, lstm.grads[name], dtype, what=name)
    assert runner.module.training


def test_torch_runner_is_built_lazily():
    """fastlstm itself never imports torch; peers imports it only inside a runner."""
    import subprocess
    import sys

    code = "import fastlstm, fastlstm.peers, sys; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert torch.get_num_threads() >= 1


# ---------------------------------------------------------------------------- reference calls


def test_reference_calls_run_every_variant(rng):
    for peephole in (None, "diagonal", "full"):
        lstm = _model(peephole=peephole, proj_size=3, batch_first=True)
        x = random_input(rng, lstm, 4, 2)
        out, _ = lstm(x)
        peers.reference_forward_fn(lstm, x)()
        peers.reference_train_step_fn(lstm, x, np.ones_like(out))()
