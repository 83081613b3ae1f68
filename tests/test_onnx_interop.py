"""ONNX in and out: ``LSTM.from_onnx`` and ``LSTM.to_onnx``.

The independent implementations are ONNX Runtime's LSTM operator, ``onnx.reference``'s,
ONNX's own operator test cases (``onnx.backend.test.case.node.lstm``: its inputs and its
expected outputs) and ``torch.onnx.export`` of ``nn.LSTM``. Graphs for the import tests are
also written by hand here, in ONNX's gate order, so that reading is not only checked
against fastlstm's own writing.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_lstm_forward import random_state
from utils import DifferenceLog, random_input

import fastlstm as fl

# Largest absolute difference seen per source (printed at the end of the module with -s).
DIFFERENCES = DifferenceLog()
_close = DIFFERENCES.close


@pytest.fixture(scope="module", autouse=True)
def _report_differences():
    yield
    DIFFERENCES.report()


def _model(input_size=3, hidden=4, *, seed=0, dtype=np.float32, **options):
    lstm = fl.LSTM(input_size, hidden, seed=seed, dtype=dtype, **options).eval()
    rng = np.random.default_rng(seed + 1)
    for name, value in lstm.params.items():
        if name.startswith("peephole"):  # large enough that a wrong row order shows
            value[...] = rng.uniform(-1, 1, value.shape)
    return lstm


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _same_params(a, b):
    assert list(a.params) == list(b.params)
    for name, value in a.params.items():
        assert value.dtype == b.params[name].dtype, name
        assert np.array_equal(value, b.params[name]), name


CONFIGS = {
    "standard": {},
    "bi-2-layers-diagonal": {"bidirectional": True, "num_layers": 2, "peephole": "diagonal"},
    "batch-first-bi": {"batch_first": True, "bidirectional": True},
    "no-bias-diagonal": {"bias": False, "peephole": "diagonal"},
    "3-layers-batch-first": {"num_layers": 3, "batch_first": True},
}


# ===================================================================================== export


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_to_onnx_runs_in_onnx_runtime_with_fastlstms_numbers(rng, options):
    lstm = _model(**options)
    model = lstm.to_onnx(state=True, lengths=True)
    assert [i.name for i in model.graph.input] == ["x", "h0", "c0", "lengths"]
    assert [o.name for o in model.graph.output] == ["out", "h_n", "c_n"]
    assert model.graph.input[3].type.tensor_type.elem_type == TensorProto.INT64
    nodes = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(nodes) == lstm.num_layers
    assert all(helper.get_attribute_value(a) == 0 for n in nodes for a in n.attribute
               if a.name == "layout")  # fmt: skip
    session = _session(model)
    # Batch and time axes are dynamic: one session, two shapes.
    for steps, batch, lengths in ((6, 3, [6, 2, 4]), (2, 1, [1])):
        x = random_input(rng, lstm, steps, batch)
        state = random_state(rng, lstm, batch)
        lens = np.array(lengths, dtype=np.int64)
        out, h_n, c_n = session.run(None, {"x": x, "h0": state[0], "c0": state[1], "lengths": lens})
        want_out, (want_h, want_c) = lstm(x, state, lens)
        _close(out, want_out, "ONNX Runtime (to_onnx)", what="out")
        _close(h_n, want_h, "ONNX Runtime (to_onnx)", what="h_n")
        _close(c_n, want_c, "ONNX Runtime (to_onnx)", what="c_n")


def test_to_onnx_default_inputs_are_x_only_and_zero_state(rng):
    lstm = _model(num_layers=2, bidirectional=True)
    model = lstm.to_onnx()
    assert [i.name for i in model.graph.input] == ["x"]
    x = random_input(rng, lstm, 5, 2)
    out, h_n, c_n = _session(model).run(None, {"x": x})
    want_out, (want_h, want_c) = lstm(x)
    _close(out, want_out, "ONNX Runtime (to_onnx)", what="out")
    _close(h_n, want_h, "ONNX Runtime (to_onnx)", what="h_n")
    _close(c_n, want_c, "ONNX Runtime (to_onnx)", what="c_n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_to_onnx_matches_onnx_reference_evaluator(rng, options, dtype):
    lstm = _model(dtype=dtype, **options)
    x = random_input(rng, lstm, 5, 2, dtype)
    state = random_state(rng, lstm, 2, dtype)
    got = ReferenceEvaluator(lstm.to_onnx(state=True)).run(
        None, {"x": x, "h0": state[0], "c0": state[1]}
    )
    want_out, (want_h, want_c) = lstm(x, state)
    source = f"onnx.reference ({np.dtype(dtype).name})"
    for value, expected, what in zip(
        got, (want_out, want_h, want_c), ("out", "h_n", "c_n"), strict=True
    ):
        assert value.dtype == dtype
        _close(value, expected, source, dtype, what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
def test_round_trip_has_the_exact_parameters(tmp_path, options, dtype):
    lstm = _model(dtype=dtype, seed=3, **options)
    path = tmp_path / "model.onnx"
    model = lstm.to_onnx(path, state=True, lengths=True)
    for source in (model, path, str(path)):
        again = fl.LSTM.from_onnx(source)
        _same_params(again, lstm)
        assert again.dtype == lstm.dtype and again.num_layers == lstm.num_layers
        assert again.bidirectional == lstm.bidirectional and again.peephole == lstm.peephole
        assert again.bias == lstm.bias
        # The graph's Transpose makes a batch-first model; the LSTM nodes are layout 0.
        assert again.batch_first is False
        assert not again.training


@pytest.mark.parametrize("options", [{"proj_size": 2}, {"peephole": "full"}], ids=str)
def test_to_onnx_refuses_what_the_operator_lacks_and_writes_nothing(tmp_path, options):
    lstm = _model(**options)
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="projection" if "proj_size" in options else "full"):
        lstm.to_onnx(path)
    assert not path.exists()


# ============================================================== import: hand-written graphs


def _onnx_weights(rng, directions, hidden, width, *, bias=True, peephole=False, dtype=np.float32):
    """Random W, R, B, P in ONNX's own layout and gate order (i, o, f, c)."""
    weights = {
        "W": rng.uniform(-0.6, 0.6, (directions, 4 * hidden, width)),
        "R": rng.uniform(-0.6, 0.6, (directions, 4 * hidden, hidden)),
    }
    if bias:
        weights["B"] = rng.uniform(-0.6, 0.6, (directions, 8 * hidden))
    if peephole:
        weights["P"] = rng.uniform(-1.0, 1.0, (directions, 3 * hidden))
    return {k: v.astype(dtype) for k, v in weights.items()}


def _graph_model(nodes, inputs, outputs, initializers, opset=14):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _one_node_model(weights, *, name="rnn", layout=0, direction="forward", as_constants=False,
                    extra_attributes=None, elem=TensorProto.FLOAT):  # fmt: skip
    """x (and h0, c0, lengths) -> one LSTM node -> Y, Y_h, Y_c; weights as initializers."""
    directions, hidden4, width = weights["W"].shape
    hidden = hidden4 // 4
    x_shape = ["B", "T", width] if layout else ["T", "B", width]
    state_shape = ["B", directions, hidden] if layout else [directions, "B", hidden]
    inputs = [
        helper.make_tensor_value_info("x", elem, x_shape),
        helper.make_tensor_value_info("lengths", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("h0", elem, state_shape),
        helper.make_tensor_value_info("c0", elem, state_shape),
    ]
    names = {key: f"{key}_weights" for key in weights}
    tensors = [numpy_helper.from_array(value, names[key]) for key, value in weights.items()]
    nodes = []
    if as_constants:  # Constant nodes, one of them behind an Identity
        for tensor in tensors:
            nodes.append(helper.make_node("Constant", [], [tensor.name + "_c"], value=tensor))
        nodes.append(helper.make_node("Identity", [names["W"] + "_c"], ["w_identity"]))
        names = {key: name + "_c" for key, name in names.items()}
        names["W"] = "w_identity"
        tensors = []
    op_inputs = ["x", names["W"], names["R"], names.get("B", ""), "lengths", "h0", "c0",
                 names.get("P", "")]  # fmt: skip
    while op_inputs[-1] == "":
        op_inputs.pop()
    nodes.append(
        helper.make_node(
            "LSTM",
            op_inputs,
            ["y", "y_h", "y_c"],
            name=name,
            hidden_size=hidden,
            direction=direction,
            layout=layout,
            **(extra_attributes or {}),
        )  # fmt: skip
    )
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in ("y", "y_h", "y_c")]
    return _graph_model(nodes, inputs, outputs, tensors)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("peephole", [False, True], ids=["standard", "peephole"])
@pytest.mark.parametrize("as_constants", [False, True], ids=["initializers", "constants"])
def test_hand_written_graph_gives_onnx_runtimes_numbers(rng, direction, peephole, as_constants):
    directions = 2 if direction == "bidirectional" else 1
    weights = _onnx_weights(rng, directions, 5, 3, peephole=peephole)
    model = _one_node_model(weights, direction=direction, as_constants=as_constants)
    lstm = fl.LSTM.from_onnx(model)
    assert lstm.bidirectional == (directions == 2) and lstm.hidden_size == 5
    assert lstm.peephole == ("diagonal" if peephole else None)
    x = rng.standard_normal((7, 4, 3)).astype(np.float32)
    h0, c0 = (rng.standard_normal((directions, 4, 5)).astype(np.float32) for _ in range(2))
    lengths = np.array([7, 3, 5, 1], dtype=np.int32)
    y, y_h, y_c = _session(model).run(None, {"x": x, "lengths": lengths, "h0": h0, "c0": c0})
    out, (h_n, c_n) = lstm(x, (h0, c0), lengths)
    # Y (T, D, B, H) -> fastlstm's (T, B, D*H).
    _close(out, y.transpose(0, 2, 1, 3).reshape(7, 4, -1), "ONNX Runtime (import)", what="out")
    _close(h_n, y_h, "ONNX Runtime (import)", what="h_n")
    _close(c_n, y_c, "ONNX Runtime (import)", what="c_n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_layout_1_node_imports_batch_first(rng, dtype):
    """ORT refuses layout=1, so onnx.reference computes the node; the model is batch-first."""
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    weights = _onnx_weights(rng, 2, 4, 3, peephole=True, dtype=dtype)
    model = _one_node_model(weights, layout=1, direction="bidirectional", elem=elem)
    lstm = fl.LSTM.from_onnx(model)
    assert lstm.batch_first and lstm.dtype == dtype
    x = rng.standard_normal((3, 6, 3)).astype(dtype)  # (B, T, I)
    h0, c0 = (rng.standard_normal((3, 2, 4)).astype(dtype) for _ in range(2))  # (B, D, H)
    lengths = np.full(3, 6, dtype=np.int32)
    y, y_h, y_c = ReferenceEvaluator(model).run(
        None, {"x": x, "lengths": lengths, "h0": h0, "c0": c0}
    )
    state = (h0.transpose(1, 0, 2), c0.transpose(1, 0, 2))
    out, (h_n, c_n) = lstm(x, state)
    source = f"onnx.reference ({np.dtype(dtype).name})"
    _close(out, y.reshape(3, 6, -1), source, dtype, "out")  # Y (B, T, D, H)
    _close(h_n, y_h.transpose(1, 0, 2), source, dtype, "h_n")  # Y_h (B, D, H)
    _close(c_n, y_c.transpose(1, 0, 2), source, dtype, "c_n")


def test_node_picks_one_layer_of_a_stack(rng):
    lstm = _model(num_layers=3, bidirectional=True)
    model = lstm.to_onnx()
    middle = fl.LSTM.from_onnx(model, node="lstm_l1")
    assert middle.num_layers == 1 and middle.input_size == 2 * lstm.hidden_size
    for name, value in middle.params.items():
        assert np.array_equal(value, lstm.params[name.replace("_l0", "_l1")]), name


def test_a_stack_with_one_layer_without_bias_gets_zero_biases(rng):
    first = _onnx_weights(rng, 1, 4, 3)
    second = _onnx_weights(rng, 1, 4, 4, bias=False)
    inits = [numpy_helper.from_array(v, f"{k}{i}") for i, w in enumerate((first, second))
             for k, v in w.items()]  # fmt: skip
    nodes = [
        helper.make_node("LSTM", ["x", "W0", "R0", "B0"], ["y0"], name="a", hidden_size=4),
        helper.make_node("Squeeze", ["y0", "axis1"], ["x1"]),
        helper.make_node("LSTM", ["x1", "W1", "R1"], ["y1"], name="b", hidden_size=4),
    ]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 3])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)],
        inits,
    )
    lstm = fl.LSTM.from_onnx(model)
    assert lstm.num_layers == 2 and lstm.bias
    assert np.all(lstm.params["bias_ih_l1"] == 0) and np.all(lstm.params["bias_hh_l1"] == 0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    (y1,) = _session(model).run(None, {"x": x})
    out, _ = lstm(x)
    _close(out, y1[:, 0], "ONNX Runtime (import)", what="out of a 2-node stack")


# ================================================================ ONNX's operator test cases


def _onnx_operator_cases():
    """ONNX's own LSTM test cases: (name, node, inputs, expected outputs)."""
    from onnx.backend.test.case.node import lstm as cases

    collected = []

    def expect(node, inputs, outputs, name, **_):
        collected.append((name, node, list(inputs), list(outputs)))

    original = cases.expect
    cases.expect = expect
    try:
        for attribute in sorted(vars(cases.LSTM)):
            if attribute.startswith("export"):
                getattr(cases.LSTM, attribute)()
    finally:
        cases.expect = original
    return collected


ONNX_CASES = _onnx_operator_cases()
WEIGHT_INPUTS = {"W", "R", "B", "P"}


def test_onnx_operator_cases_are_all_here():
    names = {case[0] for case in ONNX_CASES}
    assert {
        "test_lstm_defaults",
        "test_lstm_with_initial_bias",
        "test_lstm_with_peepholes",
        "test_lstm_batchwise",
        "test_lstm_bidirectional",
        "test_lstm_reverse",
    } <= names


def _case_model(node, inputs):
    """The case's node in a graph, its W, R, B, P bound as initializers, as a runtime has them."""
    positions = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    graph_inputs, initializers, feeds = [], [], {}
    for position, (name, value) in enumerate(zip(node.input, inputs, strict=False)):
        if not name:
            continue
        if positions[position] in WEIGHT_INPUTS:
            initializers.append(numpy_helper.from_array(value, name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, value.shape))
            feeds[positions[position]] = value
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output if n]
    named = helper.make_node(
        "LSTM", list(node.input), list(node.output), name="onnx_case", **{
            a.name: helper.get_attribute_value(a) for a in node.attribute
        }
    )  # fmt: skip
    return _graph_model([named], graph_inputs, outputs, initializers), feeds


@pytest.mark.parametrize(
    "case", [c for c in ONNX_CASES if c[0] != "test_lstm_reverse"], ids=lambda c: c[0]
)
def test_onnx_operator_case(tmp_path, case):
    name, node, inputs, expected = case
    model, feeds = _case_model(node, inputs)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    lstm = fl.LSTM.from_onnx(path)
    x = feeds["X"]
    state = None
    if "initial_h" in feeds:
        h0, c0 = feeds["initial_h"], feeds["initial_c"]
        state = (h0, c0) if not lstm.batch_first else (h0.swapaxes(0, 1), c0.swapaxes(0, 1))
    lengths = feeds.get("sequence_lens")
    out, (h_n, c_n) = lstm(x, state, lengths)
    batch = x.shape[0] if lstm.batch_first else x.shape[1]
    ours = {"Y": out, "Y_h": h_n, "Y_c": c_n}
    if lstm.batch_first:  # layout 1: Y (B, T, D, H), Y_h and Y_c (B, D, H)
        ours["Y_h"], ours["Y_c"] = h_n.swapaxes(0, 1), c_n.swapaxes(0, 1)
    # ``expected`` lists the node's non-empty outputs, in order.
    kinds = [kind for kind, n in zip(("Y", "Y_h", "Y_c"), node.output, strict=False) if n]
    assert len(kinds) == len(expected) >= 1
    for kind, value in zip(kinds, expected, strict=True):
        if kind == "Y" and not lstm.batch_first:  # (T, D, B, H) -> (T, B, D*H)
            value = value.transpose(0, 2, 1, 3).reshape(-1, batch, value.shape[1] * value.shape[3])
        elif kind == "Y":
            value = value.reshape(batch, -1, value.shape[2] * value.shape[3])
        _close(ours[kind], value, "ONNX's operator test cases", what=f"{name} {kind}")


def test_onnx_operator_reverse_case_is_refused():
    (case,) = [c for c in ONNX_CASES if c[0] == "test_lstm_reverse"]
    model, _ = _case_model(case[1], case[2])
    with pytest.raises(ValueError, match="'onnx_case'.*'direction'.*reverse"):
        fl.LSTM.from_onnx(model)


# ========================================================================== torch.onnx.export


def _torch_export(module, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module, (x,), path, dynamo=False, input_names=["x"],
                          output_names=["out", "h_n", "c_n"])  # fmt: skip
    return onnx.load_model(path)


@pytest.mark.parametrize(
    "options",
    [
        {"num_layers": 1},
        {"num_layers": 2},
        {"num_layers": 2, "bidirectional": True},
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
        {"num_layers": 1, "batch_first": True, "bias": False},
    ],
    ids=["1-layer", "2-layers", "2-layers-bi", "2-layers-bi-batch-first", "batch-first-no-bias"],
)
def test_torch_onnx_export_imports_as_the_same_model(tmp_path, rng, options):
    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 5, **options).eval()
    x = rng.standard_normal((2, 6, 3) if module.batch_first else (6, 2, 3)).astype(np.float32)
    model = _torch_export(module, torch.from_numpy(x), tmp_path / "torch.onnx")
    assert sum(n.op_type == "LSTM" for n in model.graph.node) == module.num_layers
    lstm = fl.LSTM.from_onnx(tmp_path / "torch.onnx")
    # The weights are torch's exactly; batch_first is the graph's Transpose, not the node's.
    _same_params(lstm, fl.LSTM.from_torch(module))
    assert lstm.num_layers == module.num_layers and lstm.batch_first is False
    x_tm = x.swapaxes(0, 1) if module.batch_first else x
    out, (h_n, c_n) = lstm(x_tm)
    ort_out, ort_h, ort_c = _session(model).run(None, {"x": x})
    ort_out = ort_out.swapaxes(0, 1) if module.batch_first else ort_out
    _close(out, ort_out, "ONNX Runtime (torch.onnx.export)", what="out")
    _close(h_n, ort_h, "ONNX Runtime (torch.onnx.export)", what="h_n")
    _close(c_n, ort_c, "ONNX Runtime (torch.onnx.export)", what="c_n")
    with torch.no_grad():
        torch_out, (torch_h, _) = module(torch.from_numpy(x))
    torch_out = torch_out.numpy().swapaxes(0, 1) if module.batch_first else torch_out.numpy()
    _close(out, torch_out, "torch (torch.onnx.export)", what="out")
    _close(h_n, torch_h.numpy(), "torch (torch.onnx.export)", what="h_n")


# ==================================================================================== refusals


@pytest.mark.parametrize(
    ("attributes", "pattern"),
    [
        ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "'activations'"),
        ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, "'activations'"),
        ({"clip": 3.0}, "'clip'"),
        ({"input_forget": 1}, "'input_forget'"),
        ({"direction": "reverse"}, "'direction'.*reverse"),
    ],
    ids=["relu", "hard-sigmoid", "clip", "input-forget", "reverse"],
)
def test_what_fastlstm_cannot_run_is_refused_naming_node_and_attribute(rng, attributes, pattern):
    weights = _onnx_weights(rng, 1, 4, 3)
    direction = attributes.pop("direction", "forward")
    model = _one_node_model(weights, name="my_rnn", direction=direction,
                            extra_attributes=attributes)  # fmt: skip
    with pytest.raises(ValueError, match=f"'my_rnn'.*{pattern}"):
        fl.LSTM.from_onnx(model)


def test_standard_activations_spelled_out_are_accepted(rng):
    weights = _onnx_weights(rng, 2, 4, 3)
    model = _one_node_model(weights, direction="bidirectional", extra_attributes={
        "activations": ["Sigmoid", "Tanh", "Tanh"] * 2, "input_forget": 0})  # fmt: skip
    assert fl.LSTM.from_onnx(model).bidirectional


def test_weights_computed_at_run_time_are_refused(rng):
    weights = _onnx_weights(rng, 1, 4, 3)
    model = _one_node_model(weights, name="my_rnn")
    # R becomes a graph input: its value is known only when the graph runs.
    r = next(t for t in model.graph.initializer if t.name == "R_weights")
    model.graph.initializer.remove(r)
    model.graph.input.append(helper.make_tensor_value_info("R_weights", TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="'my_rnn'.*input R.*run time"):
        fl.LSTM.from_onnx(model)
    # W made by a node from a graph input: also refused.
    model = _one_node_model(weights, name="my_rnn")
    model.graph.node.insert(0, helper.make_node("Relu", ["h0"], ["W_weights"]))
    model.graph.initializer.remove(
        next(t for t in model.graph.initializer if t.name == "W_weights")
    )
    with pytest.raises(ValueError, match="'my_rnn'.*input W.*run time"):
        fl.LSTM.from_onnx(model)


def test_node_name_not_found_lists_the_lstm_nodes():
    model = _model(num_layers=2).to_onnx()
    with pytest.raises(ValueError, match="no LSTM node named 'nope'.*'lstm_l0', 'lstm_l1'"):
        fl.LSTM.from_onnx(model, node="nope")


def test_unrelated_lstm_nodes_need_a_name(rng):
    """Two LSTM nodes reading the same x are not a stack: the error names both."""
    a, b = _onnx_weights(rng, 1, 4, 3), _onnx_weights(rng, 1, 4, 3)
    inits = [numpy_helper.from_array(v, f"{k}_{n}") for n, w in (("a", a), ("b", b))
             for k, v in w.items()]  # fmt: skip
    nodes = [
        helper.make_node("LSTM", ["x", "W_a", "R_a", "B_a"], ["ya"], name="left", hidden_size=4),
        helper.make_node("LSTM", ["x", "W_b", "R_b", "B_b"], ["yb"], name="right", hidden_size=4),
    ]
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb")],
        inits,
    )
    with pytest.raises(ValueError, match="2 LSTM nodes.*'left'.*'right'.*node="):
        fl.LSTM.from_onnx(model)
    right = fl.LSTM.from_onnx(model, node="right")
    assert np.array_equal(right.params["weight_ih_l0"][:4], b["W"][0, :4])  # gate i first


def test_a_join_that_does_not_stack_is_refused(rng):
    """Y (T, 1, B, H) flattened batch-first into the next node is not a stacked layer."""
    first, second = _onnx_weights(rng, 1, 4, 3), _onnx_weights(rng, 1, 4, 4)
    inits = [numpy_helper.from_array(v, f"{k}{i}") for i, w in enumerate((first, second))
             for k, v in w.items()]  # fmt: skip
    nodes = [
        helper.make_node("LSTM", ["x", "W0", "R0", "B0"], ["y0"], name="a", hidden_size=4),
        helper.make_node("Transpose", ["y0"], ["y0t"], perm=[2, 1, 0, 3]),  # (B, 1, T, H)
        helper.make_node("Squeeze", ["y0t", "one"], ["x1"]),
        helper.make_node("LSTM", ["x1", "W1", "R1", "B1"], ["y1"], name="b", hidden_size=4),
    ]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 3])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)],
        inits,
    )
    with pytest.raises(ValueError, match="between LSTM node 'a' and LSTM node 'b'"):
        fl.LSTM.from_onnx(model)


def test_graph_without_lstm_is_refused(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    model = _graph_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [],
    )
    with pytest.raises(ValueError, match="no LSTM node"):
        fl.LSTM.from_onnx(model)
    onnx.save_model(model, tmp_path / "relu.onnx")
    with pytest.raises(ValueError, match="no LSTM node"):
        fl.LSTM.from_onnx(tmp_path / "relu.onnx")


class _Marker:
    """Unpickling this would create a file: proof that a reader ran code from the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_files_raise_a_clear_error_and_run_nothing(tmp_path):
    good = tmp_path / "good.onnx"
    _model(num_layers=2, bidirectional=True, peephole="diagonal").to_onnx(good)
    data = good.read_bytes()
    marker = tmp_path / "ran"
    files = {
        "garbage": os.urandom(2000),
        "text": b"this is not an ONNX model\n" * 20,
        "empty": b"",
        "pickle": pickle.dumps(_Marker(str(marker))),
    }
    files.update({f"truncated-{n}": data[: len(data) * n // 10] for n in (1, 3, 5, 9)})
    for name, content in files.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            fl.LSTM.from_onnx(path)
        message = str(info.value)
        assert "ONNX" in message or "LSTM" in message or "tensor" in message, (name, message)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        fl.LSTM.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="directory"):
        fl.LSTM.from_onnx(tmp_path)
    with pytest.raises(TypeError, match="ModelProto"):
        fl.LSTM.from_onnx(data)


def test_importing_fastlstm_needs_neither_onnx_nor_h5py():
    code = (
        "import sys, fastlstm, fastlstm.peers, fastlstm.interop.onnx_io, "
        "fastlstm.interop.keras_io; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'h5py', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
