"""fl.LSTM's API: parameter names and init, state dicts, save/load, and every refused input.

A refused call raises the documented error type with a message naming what was expected and
what was given, and changes nothing: parameters, gradients and pending caches stay as they were.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_lstm_forward import LENGTHS, B, H, I, P, T, random_state, reference_run
from utils import assert_close

import fastlstm as fl

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

CONFIGS = {
    "plain": {},
    "L3": {"num_layers": 3},
    "bi": {"bidirectional": True},
    "proj": {"proj_size": P},
    "L2-bi-proj": {"num_layers": 2, "bidirectional": True, "proj_size": P},
    "L2-bi-no-bias": {"num_layers": 2, "bidirectional": True, "bias": False},
    "L3-bi-proj-no-bias": {"num_layers": 3, "bidirectional": True, "proj_size": 2, "bias": False},
}


def snapshot(model):
    """Copies of everything a refused call must leave alone."""
    return (
        {name: value.copy() for name, value in model.params.items()},
        {name: value.copy() for name, value in model.grads.items()},
        len(model._caches),
    )


def assert_unchanged(model, before):
    params, grads, n_caches = before
    assert list(model.params) == list(params)
    for name, value in params.items():
        np.testing.assert_array_equal(model.params[name], value, err_msg=name)
        np.testing.assert_array_equal(model.grads[name], grads[name], err_msg=name)
    assert len(model._caches) == n_caches


# ----------------------------------------------------------------------------------------------
# Parameters: names, shapes, order, init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_params_match_torch_names_shapes_and_order(config):
    options = CONFIGS[config]
    model = fl.LSTM(I, H, **options)
    module = torch.nn.LSTM(I, H, **options)
    expected = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    assert [(name, value.shape) for name, value in model.params.items()] == expected
    assert [(name, value.shape) for name, value in model.grads.items()] == expected
    assert list(model.state_dict()) == [name for name, _ in expected]
    for name, value in model.params.items():
        assert value.dtype == np.float32, name
        assert not model.grads[name].any(), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_init_is_uniform_within_bound_and_reproducible(dtype):
    options = {"num_layers": 2, "bidirectional": True, "proj_size": P}
    hidden = 9
    model = fl.LSTM(I, hidden, dtype=dtype, seed=3, **options)
    bound = 1 / np.sqrt(hidden)
    values = np.concatenate([v.ravel() for v in model.params.values()])
    assert values.dtype == dtype
    assert np.all(np.abs(values) <= bound)
    # Spread over the whole interval, centred (about 2000 draws).
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.std() - bound / np.sqrt(3)) < 0.05 * bound
    for name, value in model.params.items():
        assert np.unique(value).size == value.size, name  # drawn, not filled

    same = fl.LSTM(I, hidden, dtype=dtype, seed=3, **options)
    other = fl.LSTM(I, hidden, dtype=dtype, seed=4, **options)
    unseeded = [fl.LSTM(I, hidden, dtype=dtype, **options) for _ in range(2)]
    for name, value in model.params.items():
        np.testing.assert_array_equal(same.params[name], value, err_msg=name)
        assert not np.any(other.params[name] == value), name
        assert not np.array_equal(unseeded[0].params[name], unseeded[1].params[name]), name


def test_in_place_param_update_changes_the_output(rng):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=np.float64, seed=5)
    x = rng.standard_normal((T, B, I))
    before, _ = model(x, None, LENGTHS)
    model.params["bias_hh_l1_reverse"] += 0.5
    model.params["weight_ih_l0"][3] *= -1
    after, _ = model(x, None, LENGTHS)
    assert not np.allclose(after, before)
    expected, _, _ = reference_run(model, x, None, LENGTHS)
    assert_close(after, expected, what="out after the update")


def test_state_dict_returns_copies(rng):
    model = fl.LSTM(I, H, 2, bidirectional=True, dtype=np.float64, seed=6)
    x = rng.standard_normal((T, B, I))
    out, _ = model(x)
    state = model.state_dict()
    assert list(state) == list(model.params)
    for name, value in state.items():
        np.testing.assert_array_equal(value, model.params[name], err_msg=name)
        assert not np.shares_memory(value, model.params[name]), name
        value[...] = 0
    assert all(np.abs(p).max() > 0 for p in model.params.values())
    np.testing.assert_array_equal(model(x)[0], out)


@pytest.mark.parametrize("source", ["numpy", "torch", "torch-float64-into-float32"])
def test_load_state_dict(rng, source):
    dtype = np.float32
    options = {"num_layers": 2, "bidirectional": True, "proj_size": P}
    torch.manual_seed(0)
    torch_dtype = torch.float64 if source == "torch-float64-into-float32" else torch.float32
    module = torch.nn.LSTM(I, H, dtype=torch_dtype, **options)
    model = fl.LSTM(I, H, dtype=dtype, seed=7, **options)
    if source == "numpy":
        model.load_state_dict(
            {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
        )
    else:
        model.load_state_dict(module.state_dict())
    for name, p in module.named_parameters():
        assert model.params[name].dtype == dtype
        np.testing.assert_array_equal(model.params[name], p.detach().numpy().astype(dtype))
    x = rng.standard_normal((T, B, I))
    out, (h_n, c_n) = model(x)
    with torch.no_grad():
        t_out, (t_h, t_c) = module.to(torch.float32)(torch.from_numpy(x.astype(dtype)))
    assert_close(out, t_out, dtype, what="out")
    assert_close(h_n, t_h, dtype, what="h_n")
    assert_close(c_n, t_c, dtype, what="c_n")


def new_values(model, scale=1.0):
    return {name: np.full(value.shape, scale) for name, value in model.params.items()}


BAD_STATE_DICTS = {
    "missing-key": (KeyError, lambda sd: sd.pop("bias_hh_l1"), r"missing keys \['bias_hh_l1'\]"),
    "unexpected-key": (
        KeyError,
        lambda sd: sd.update(weight_hr_l0=np.zeros((P, H))),
        r"unexpected keys \['weight_hr_l0'\]",
    ),
    "renamed-key": (
        KeyError,
        lambda sd: sd.update(weight_ih_l1_reverse=sd.pop("weight_ih_l1")),
        r"missing keys \['weight_ih_l1'\], unexpected keys \['weight_ih_l1_reverse'\]",
    ),
    "wrong-shape-last": (
        ValueError,
        lambda sd: sd.update(bias_hh_l1=np.zeros(4 * H + 1)),
        rf"bias_hh_l1: expected shape \({4 * H},\), got \({4 * H + 1},\)",
    ),
    "transposed": (
        ValueError,
        lambda sd: sd.update(weight_ih_l0=np.zeros((I, 4 * H))),
        rf"weight_ih_l0: expected shape \({4 * H}, {I}\), got \({I}, {4 * H}\)",
    ),
    "non-numeric": (
        TypeError,
        lambda sd: sd.update(bias_ih_l0=np.full(4 * H, "x")),
        r"bias_ih_l0: expected a real numeric array, got dtype <U1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_load_state_dict_refuses_and_changes_nothing(rng, case):
    error, edit, message = BAD_STATE_DICTS[case]
    model = fl.LSTM(I, H, 2, dtype=np.float64, seed=8)
    model(rng.standard_normal((T, B, I)))  # a pending cache, which must survive
    before = snapshot(model)
    state = new_values(model, 0.25)  # every other entry is valid and would change the model
    edit(state)
    with pytest.raises(error, match=message):
        model.load_state_dict(state)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------

SAVE_CONFIGS = {
    "plain-f32": {},
    "f64-bi-proj-batch_first": {
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": P,
        "batch_first": True,
        "dtype": np.float64,
    },
    "diagonal-dropout-no-bias": {
        "num_layers": 2,
        "peephole": "diagonal",
        "dropout": 0.3,
        "bias": False,
    },
    "full-proj-f64": {"peephole": "full", "proj_size": 2, "dtype": np.float64},
}
CONFIG_ATTRIBUTES = [
    "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
    "bidirectional", "proj_size", "peephole", "dtype",
]  # fmt: skip


@pytest.mark.parametrize("config", list(SAVE_CONFIGS))
def test_save_load_round_trip(rng, tmp_path, config):
    model = fl.LSTM(I, H, seed=9, **SAVE_CONFIGS[config])
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fl.LSTM.load(path)
    assert isinstance(loaded, fl.LSTM)
    for attribute in CONFIG_ATTRIBUTES:
        assert getattr(loaded, attribute) == getattr(model, attribute), attribute
    assert list(loaded.params) == list(model.params)
    for name, value in model.params.items():
        assert loaded.params[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.params[name], value, err_msg=name)
    model.eval()
    loaded.eval()
    x = rng.standard_normal((B, T, I) if model.batch_first else (T, B, I))
    out, (h_n, c_n) = model(x, None, LENGTHS)
    got, (got_h, got_c) = loaded(x, None, LENGTHS)
    np.testing.assert_array_equal(got, out)
    np.testing.assert_array_equal(got_h, h_n)
    np.testing.assert_array_equal(got_c, c_n)
    with np.load(path, allow_pickle=False) as archive:  # no pickle anywhere in the file
        assert all(archive[name].dtype != object for name in archive.files)


def valid_header():
    config = {
        "input_size": I, "hidden_size": H, "num_layers": 1, "bias": True, "batch_first": False,
        "dropout": 0.0, "bidirectional": False, "proj_size": 0, "peephole": None,
        "dtype": "float32",
    }  # fmt: skip
    return json.dumps({"format": "fastlstm-npz-1", "class": "LSTM", "config": config})


def test_load_refuses_pickled_objects(tmp_path):
    reference = fl.LSTM(I, H, seed=10)
    arrays = {f"param/{name}": value for name, value in reference.params.items()}
    pickled_param = tmp_path / "param.npz"
    np.savez(
        pickled_param,
        header=np.array(valid_header()),
        **(arrays | {"param/bias_hh_l0": np.array([{"evil": 1}] * (4 * H), dtype=object)}),
    )
    pickled_header = tmp_path / "header.npz"
    np.savez(pickled_header, header=np.array([{"format": "fastlstm-npz-1"}], dtype=object))
    for path in (pickled_param, pickled_header):
        with pytest.raises(ValueError, match="pickled objects"):
            fl.LSTM.load(path)
    # The valid part of that file loads: only the pickled entry was the problem.
    fine = tmp_path / "fine.npz"
    np.savez(fine, header=np.array(valid_header()), **arrays)
    loaded = fl.LSTM.load(fine)
    for name, value in reference.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)


def test_load_refuses_foreign_files(tmp_path):
    no_header = tmp_path / "random.npz"
    np.savez(no_header, weights=np.random.default_rng(0).standard_normal((4, 4)))
    with pytest.raises(ValueError, match="no header"):
        fl.LSTM.load(no_header)

    wrong_format = tmp_path / "format.npz"
    header = json.loads(valid_header()) | {"format": "something-else"}
    np.savez(wrong_format, header=np.array(json.dumps(header)))
    with pytest.raises(ValueError, match="expected format 'fastlstm-npz-1', got 'something-else'"):
        fl.LSTM.load(wrong_format)

    cell_file = tmp_path / "cell.npz"
    fl.LSTMCell(I, H).save(cell_file)
    with pytest.raises(ValueError, match="holds a LSTMCell, not a LSTM"):
        fl.LSTM.load(cell_file)


# ----------------------------------------------------------------------------------------------
# Refused inputs
# ----------------------------------------------------------------------------------------------


def api_model(**options):
    return fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=np.float64, seed=11, **options)


def good_state(rng, batch=B):
    return random_state(rng, api_model(), batch)


# name: (error, message, call(model, rng)): every call differs from a valid one in one thing.
BAD_CALLS = {
    "x-rank-1": (
        ValueError,
        r"x: expected a 3-D array \(T, B, I\) or a 2-D array \(T, I\).*got shape \(3,\)",
        lambda m, rng: m(np.zeros(I)),
    ),
    "x-rank-4": (
        ValueError,
        r"expected a 3-D array.*got shape \(5, 4, 3, 1\)",
        lambda m, rng: m(np.zeros((T, B, I, 1))),
    ),
    "x-input-size": (
        ValueError,
        rf"x: expected input size {I} in the last axis, got shape \({T}, {B}, {I + 1}\)",
        lambda m, rng: m(np.zeros((T, B, I + 1))),
    ),
    "x-input-size-unbatched": (
        ValueError,
        rf"x: expected input size {I} in the last axis, got shape \({T}, {I - 1}\)",
        lambda m, rng: m(np.zeros((T, I - 1))),
    ),
    "x-strings": (
        TypeError,
        r"x must be an array of real numbers \(integer or float\), got dtype <U1",
        lambda m, rng: m(np.full((T, B, I), "a")),
    ),
    "x-string-list": (
        TypeError,
        r"x must be an array of real numbers.*got dtype <U",
        lambda m, rng: m([[["1", "2", "3"]]]),
    ),
    "x-object": (
        TypeError,
        r"x must be an array of real numbers.*got dtype object",
        lambda m, rng: m(np.zeros((T, B, I)).astype(object)),
    ),
    "x-ragged": (
        ValueError,
        r"x must be a rectangular array of real numbers",
        lambda m, rng: m([[[1.0, 2.0, 3.0]], [[1.0, 2.0]]]),
    ),
    "x-complex": (
        TypeError,
        r"x must be an array of real numbers.*got dtype complex128",
        lambda m, rng: m(np.zeros((T, B, I), complex)),
    ),
    # Documented finding: booleans are not accepted as numbers (TypeError, dtype bool named).
    "x-bool": (
        TypeError,
        r"x must be an array of real numbers.*got dtype bool",
        lambda m, rng: m(np.zeros((T, B, I), bool)),
    ),
    "x-None": (TypeError, r"x must be an array of real numbers, got None", lambda m, rng: m(None)),
    "x-T0": (
        ValueError,
        rf"x: expected at least one step and one sequence, got shape \(0, {B}, {I}\)",
        lambda m, rng: m(np.zeros((0, B, I))),
    ),
    "x-B0": (
        ValueError,
        rf"x: expected at least one step and one sequence, got shape \({T}, 0, {I}\)",
        lambda m, rng: m(np.zeros((T, 0, I))),
    ),
    "x-T0-unbatched": (
        ValueError,
        rf"x: expected at least one step and one sequence, got shape \(0, {I}\)",
        lambda m, rng: m(np.zeros((0, I))),
    ),
    "h0-shape": (
        ValueError,
        rf"h0: expected shape \(4, {B}, {P}\).*got \(4, {B}, {H}\)",
        lambda m, rng: m(np.zeros((T, B, I)), (np.zeros((4, B, H)), good_state(rng)[1])),
    ),
    "h0-batch": (
        ValueError,
        rf"h0: expected shape \(4, {B}, {P}\).*got \(4, {B + 1}, {P}\)",
        lambda m, rng: m(np.zeros((T, B, I)), (np.zeros((4, B + 1, P)), good_state(rng)[1])),
    ),
    "c0-shape": (
        ValueError,
        rf"c0: expected shape \(4, {B}, {H}\).*got \(2, {B}, {H}\)",
        lambda m, rng: m(np.zeros((T, B, I)), (good_state(rng)[0], np.zeros((2, B, H)))),
    ),
    "c0-unbatched-shape": (
        ValueError,
        rf"c0: expected shape \(4, {H}\).*got \(4, 1, {H}\)",
        lambda m, rng: m(np.zeros((T, I)), (np.zeros((4, P)), np.zeros((4, 1, H)))),
    ),
    "c0-strings": (
        TypeError,
        r"c0 must be an array of real numbers.*got dtype <U1",
        lambda m, rng: m(np.zeros((T, B, I)), (good_state(rng)[0], np.full((4, B, H), "a"))),
    ),
    "state-array": (
        TypeError,
        r"state must be a tuple \(h0, c0\), got ndarray",
        lambda m, rng: m(np.zeros((T, B, I)), good_state(rng)[0]),
    ),
    "state-triple": (
        TypeError,
        r"state must be a tuple \(h0, c0\), got tuple",
        lambda m, rng: m(np.zeros((T, B, I)), (*good_state(rng), good_state(rng)[0])),
    ),
    "lengths-shape": (
        ValueError,
        rf"lengths: expected shape \({B},\), one per sequence, got \({B - 1},\)",
        lambda m, rng: m(np.zeros((T, B, I)), None, LENGTHS[:-1]),
    ),
    "lengths-2d": (
        ValueError,
        rf"lengths: expected shape \({B},\).*got \(1, {B}\)",
        lambda m, rng: m(np.zeros((T, B, I)), None, LENGTHS[None]),
    ),
    "lengths-negative": (
        ValueError,
        rf"lengths must lie in 0..{T} \(the sequence length T\), got \[-1\]",
        lambda m, rng: m(np.zeros((T, B, I)), None, np.array([3, -1, 5, 1])),
    ),
    "lengths-above-T": (
        ValueError,
        rf"lengths must lie in 0..{T}.*got \[{T + 1}, {T + 3}\]",
        lambda m, rng: m(np.zeros((T, B, I)), None, np.array([T + 1, 0, T + 3, 1])),
    ),
    "lengths-float": (
        TypeError,
        r"lengths must be integers, got dtype float64",
        lambda m, rng: m(np.zeros((T, B, I)), None, LENGTHS.astype(float)),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_call_raises_and_changes_nothing(rng, case, training):
    error, message, call = BAD_CALLS[case]
    model = api_model()
    x = rng.standard_normal((T, B, I))
    model(x, None, LENGTHS)  # one pending cache
    model.backward(np.ones((T, B, 2 * P)))  # and some gradients
    model(x, None, LENGTHS)
    model.train(training)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model, rng)
    assert_unchanged(model, before)
    if training:  # the pending cache is still the one backward consumes
        model.backward(np.ones((T, B, 2 * P)))
        assert len(model._caches) == 0


CONSTRUCTOR_ERRORS = {
    "hidden_size-0": (ValueError, r"hidden_size must be >= 1, got 0", {"hidden_size": 0}),
    "hidden_size-float": (
        TypeError,
        r"hidden_size must be an integer, got float 4.0",
        {"hidden_size": 4.0},
    ),
    "input_size-0": (ValueError, r"input_size must be >= 1, got 0", {"input_size": 0}),
    "num_layers-0": (ValueError, r"num_layers must be >= 1, got 0", {"num_layers": 0}),
    "num_layers-bool": (
        TypeError,
        r"num_layers must be an integer, got bool",
        {"num_layers": True},
    ),
    "proj_size-equal": (
        ValueError,
        rf"proj_size must be smaller than hidden_size \({H}\), got {H}",
        {"proj_size": H},
    ),
    "proj_size-above": (
        ValueError,
        rf"proj_size must be smaller than hidden_size \({H}\), got {H + 2}",
        {"proj_size": H + 2},
    ),
    "proj_size-negative": (ValueError, r"proj_size must be >= 0, got -1", {"proj_size": -1}),
    "dropout-negative": (
        ValueError,
        r"dropout must be a number in \[0, 1\], got -0.1",
        {"dropout": -0.1},
    ),
    "dropout-above-1": (
        ValueError,
        r"dropout must be a number in \[0, 1\], got 1.5",
        {"dropout": 1.5},
    ),
    "dropout-string": (
        ValueError,
        r"dropout must be a number in \[0, 1\], got '0.5'",
        {"dropout": "0.5"},
    ),
    "peephole-name": (
        ValueError,
        r"peephole must be one of \(None, 'diagonal', 'full'\), got 'diag'",
        {"peephole": "diag"},
    ),
    "dtype-float16": (
        TypeError,
        r"dtype must be float32 or float64, got float16",
        {"dtype": np.float16},
    ),
    "dtype-int": (TypeError, r"dtype must be float32 or float64, got int64", {"dtype": int}),
    "dtype-name": (
        TypeError,
        r"dtype must be float32 or float64, got 'double-ish'",
        {"dtype": "double-ish"},
    ),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_ERRORS))
def test_constructor_refuses_bad_arguments(case):
    error, message, change = CONSTRUCTOR_ERRORS[case]
    arguments = {"input_size": I, "hidden_size": H, "num_layers": 2} | change
    with pytest.raises(error, match=message):
        fl.LSTM(**arguments)


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match="num_layers=1"):
        model = fl.LSTM(I, H, 1, dropout=0.5)
    assert model.dropout == 0.5


@pytest.mark.parametrize("dropout", [0, 0.0, 1, 1.0], ids=["int0", "float0", "int1", "float1"])
def test_dropout_interval_is_closed(dropout):
    assert fl.LSTM(I, H, 2, dropout=dropout).dropout == float(dropout)


def test_load_state_dict_drops_unconsumed_caches():
    """A forward run with the old weights must not be backpropagated against the new ones."""
    model = fl.LSTM(3, 4, seed=1)
    out, _ = model(np.ones((2, 1, 3), np.float32))
    model.load_state_dict(fl.LSTM(3, 4, seed=2).state_dict())
    with pytest.raises(RuntimeError, match="needs a forward call"):
        model.backward(np.ones_like(out))


def test_a_torch_tensor_of_a_dtype_numpy_lacks_is_a_type_error():
    import torch

    model = fl.LSTM(3, 4, seed=1)
    with pytest.raises(TypeError, match="x must be an array of real numbers"):
        model(torch.ones((2, 1, 3), dtype=torch.bfloat16))
    assert not model._caches
