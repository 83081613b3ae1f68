"""Keras in: ``LSTM.from_keras`` against Keras 3 itself (torch backend).

Layers, Bidirectional layers, stacked Sequential and functional models, and their saved
``.keras`` and legacy ``.h5`` files (Keras 3 still writes the legacy format with
``model.save("x.h5")``). Files in the Keras 2 layout (``weight_names`` ending in ``:0``, the
``hard_sigmoid`` era) are written here with h5py, following Keras 2's HDF5 format, and
checked against Keras 3 running the same weights. Files are also read in a process where
Keras and TensorFlow cannot be imported.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported: no TensorFlow

import h5py
import keras
import numpy as np
import pytest
from utils import DifferenceLog

import fastlstm as fl

# Keras's torch backend converts its tensors with np.array(x) (NumPy 2 warns about it).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Largest absolute difference seen per source (printed at the end of the module with -s).
DIFFERENCES = DifferenceLog()
_close = DIFFERENCES.close


@pytest.fixture(scope="module", autouse=True)
def _report_differences():
    yield
    DIFFERENCES.report()


def _numpy(value):
    return keras.ops.convert_to_numpy(value)


def _x(rng, batch=3, steps=6, width=3, dtype=np.float32):
    return rng.standard_normal((batch, steps, width)).astype(dtype)


def _randomise(layer_or_model, rng):
    """Weights well away from Keras's initialisers (zero bias, orthogonal recurrence)."""
    layer_or_model.set_weights(
        [rng.uniform(-0.7, 0.7, w.shape).astype(w.dtype) for w in layer_or_model.get_weights()]
    )
    return layer_or_model


def _same_params(a, b):
    assert list(a.params) == list(b.params)
    for name, value in a.params.items():
        assert np.array_equal(value, b.params[name]), name


# ==================================================================================== layers


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_lstm_layer_gives_keras_numbers_and_states(rng, use_bias):
    layer = keras.layers.LSTM(5, return_sequences=True, return_state=True, use_bias=use_bias)
    x = _x(rng)
    layer(x)
    _randomise(layer, rng)
    y, h, c = (_numpy(v) for v in layer(x))
    lstm = fl.LSTM.from_keras(layer)
    assert lstm.batch_first and lstm.bias == use_bias and lstm.dtype == np.float32
    assert not lstm.training
    kernel = layer.get_weights()[0]
    assert np.array_equal(lstm.params["weight_ih_l0"], kernel.T)
    if use_bias:
        assert np.array_equal(lstm.params["bias_ih_l0"], layer.get_weights()[2])
        assert np.all(lstm.params["bias_hh_l0"] == 0)
    out, (h_n, c_n) = lstm(x)
    _close(out, y, "Keras layer", what="out")
    _close(h_n[0], h, "Keras layer", what="h_n")
    _close(c_n[0], c, "Keras layer", what="c_n")


def test_layer_returning_its_last_step_imports_as_out_last(rng):
    layer = keras.layers.LSTM(4)
    x = _x(rng)
    layer(x)
    _randomise(layer, rng)
    out, _ = fl.LSTM.from_keras(layer)(x)
    _close(out[:, -1], _numpy(layer(x)), "Keras layer", what="out[:, -1]")


def test_float64_layer_imports_as_float64(rng):
    layer = keras.layers.LSTM(4, return_sequences=True, dtype="float64")
    x = _x(rng, dtype=np.float64)
    layer(x)
    _randomise(layer, rng)
    lstm = fl.LSTM.from_keras(layer)
    assert lstm.dtype == np.float64
    out, _ = lstm(x)
    y = _numpy(layer(x))
    assert y.dtype == np.float64
    _close(out, y, "Keras layer (float64)", np.float64, "out")


@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "last"])
def test_bidirectional_concat(rng, return_sequences):
    layer = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=return_sequences))
    x = _x(rng)
    layer(x)
    _randomise(layer, rng)
    y = _numpy(layer(x))
    lstm = fl.LSTM.from_keras(layer)
    assert lstm.bidirectional and lstm.num_layers == 1
    out, (h_n, _) = lstm(x)
    if return_sequences:
        _close(out, y, "Keras layer", what="Bidirectional out")
    else:  # Keras's last step of each direction: h_n of both (the reverse one ends at t = 0)
        _close(np.concatenate([h_n[0], h_n[1]], axis=-1), y, "Keras layer", what="last")


# ==================================================================================== models


def _sequential(rng, *, bidirectional=False, last_sequences=False):
    def lstm(**kw):
        layer = keras.layers.LSTM(4, **kw)
        return keras.layers.Bidirectional(layer) if bidirectional else layer

    model = keras.Sequential(
        [
            keras.Input((6, 3)),
            lstm(return_sequences=True, dropout=0.3, recurrent_dropout=0.2),
            lstm(return_sequences=True),
            lstm(return_sequences=last_sequences),
        ]
    )
    return _randomise(model, rng)


def _functional(rng):
    inputs = keras.Input((6, 3))
    a = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), name="a")(inputs)
    b = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True), name="b")(a)
    return _randomise(keras.Model(inputs, b), rng)


def _check_model(lstm, model, x, source):
    y = _numpy(model(x))
    out, (h_n, _) = lstm(x)
    if y.ndim == 3:
        _close(out, y, source, what="out")
    elif lstm.bidirectional:
        _close(np.concatenate([h_n[-2], h_n[-1]], axis=-1), y, source, what="last step")
    else:
        _close(out[:, -1], y, source, what="out[:, -1]")


@pytest.mark.parametrize(
    "options",
    [{}, {"last_sequences": True}, {"bidirectional": True, "last_sequences": True}],
    ids=["uni-last", "uni-sequences", "bi-sequences"],
)
def test_stacked_sequential(rng, options):
    model = _sequential(rng, **options)
    lstm = fl.LSTM.from_keras(model)
    assert lstm.num_layers == 3 and lstm.bidirectional == options.get("bidirectional", False)
    assert lstm.dropout == 0  # Keras's in-layer dropouts are training-time only
    _check_model(lstm, model, _x(rng), "Keras model")


def test_functional_model(rng):
    model = _functional(rng)
    lstm = fl.LSTM.from_keras(model)
    assert lstm.num_layers == 2 and lstm.bidirectional
    _check_model(lstm, model, _x(rng), "Keras model")


# ===================================================================================== files


@pytest.mark.parametrize("suffix", ["keras", "h5"])
@pytest.mark.parametrize("kind", ["sequential", "sequential-bi", "functional"])
def test_saved_files_give_the_live_models_parameters_and_numbers(tmp_path, rng, kind, suffix):
    if kind == "functional":
        model = _functional(rng)
    else:
        model = _sequential(rng, bidirectional=kind == "sequential-bi")
    path = tmp_path / f"model.{suffix}"
    model.save(path)
    lstm = fl.LSTM.from_keras(path)
    _same_params(lstm, fl.LSTM.from_keras(model))
    assert fl.LSTM.from_keras(str(path)).num_layers == lstm.num_layers
    _check_model(lstm, model, _x(rng), f".{suffix} file")


def test_files_are_read_without_keras_or_tensorflow(tmp_path, rng):
    """A fresh process where importing keras or tensorflow fails reads both kinds of file."""
    model = _sequential(rng, bidirectional=True, last_sequences=True)
    model.save(tmp_path / "model.keras")
    model.save(tmp_path / "model.h5")
    write_keras2_h5(tmp_path / "keras2.h5", [("LSTM", 4, model.layers[0].forward_layer)])
    code = f"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Blocker())
import numpy as np
import fastlstm as fl
for name in ("model.keras", "model.h5", "keras2.h5"):
    lstm = fl.LSTM.from_keras({str(tmp_path)!r} + "/" + name)
    np.savez({str(tmp_path)!r} + "/" + name + ".npz", **lstm.params)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow"))
print("loaded:", loaded)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    expected = fl.LSTM.from_keras(model).params
    for name in ("model.keras", "model.h5"):
        with np.load(tmp_path / f"{name}.npz") as saved:
            assert sorted(saved.files) == sorted(expected)
            for key in expected:
                assert np.array_equal(saved[key], expected[key]), (name, key)
    with np.load(tmp_path / "keras2.h5.npz") as saved:
        kernel = model.layers[0].forward_layer.get_weights()[0]
        assert np.array_equal(saved["weight_ih_l0"], kernel.T)


# -------------------------------------------------------- Keras 2's HDF5 layout, by hand


def _keras2_lstm_config(name, units, *, recurrent_activation="sigmoid", return_sequences=True,
                        **extra):  # fmt: skip
    return {
        "name": name,
        "trainable": True,
        "dtype": "float32",
        "return_sequences": return_sequences,
        "return_state": False,
        "go_backwards": False,
        "stateful": False,
        "unroll": False,
        "time_major": False,
        "units": units,
        "activation": "tanh",
        "recurrent_activation": recurrent_activation,
        "use_bias": True,
        "unit_forget_bias": True,
        "dropout": 0.0,
        "recurrent_dropout": 0.0,
        "implementation": 2,
        **extra,
    }


def write_keras2_h5(path, layers, *, functional=False, recurrent_activation="sigmoid"):
    """A Keras 2 (tf.keras 2.x) ``model.save("x.h5")`` file of stacked layers, with h5py.

    ``layers``: (class name "LSTM" or "Bidirectional", units, a built Keras 3 layer whose
    weights to store). The layout is Keras 2's ``save_model_to_hdf5``: attributes
    ``keras_version``, ``backend``, ``model_config`` (JSON bytes), and ``model_weights``
    with ``layer_names`` and, per layer, ``weight_names`` like ``lstm/lstm_cell/kernel:0``.
    """
    configs, weights = [], []
    width = layers[0][2].get_weights()[0].shape[0]
    previous = "input_1"
    configs.append(
        {
            "class_name": "InputLayer",
            "config": {
                "batch_input_shape": [None, 6, width],
                "dtype": "float32",
                "sparse": False,
                "ragged": False,
                "name": "input_1",
            },  # fmt: skip
            **({"name": "input_1", "inbound_nodes": []} if functional else {}),
        }
    )
    for k, (class_name, units, source) in enumerate(layers):
        name = "lstm" if k == 0 else f"lstm_{k}"
        arrays = source.get_weights()
        inner = _keras2_lstm_config(name, units, recurrent_activation=recurrent_activation)
        if class_name == "Bidirectional":
            name = "bidirectional" if k == 0 else f"bidirectional_{k}"
            config = {"name": name, "trainable": True, "dtype": "float32", "merge_mode": "concat",
                      "layer": {"class_name": "LSTM", "config": inner}}  # fmt: skip
            names = [f"{name}/{role}_lstm/lstm_cell_{2 * k + i}/{w}:0"
                     for i, role in enumerate(("forward", "backward"))
                     for w in ("kernel", "recurrent_kernel", "bias")]  # fmt: skip
        else:
            config = inner
            names = [f"{name}/lstm_cell_{k}/{w}:0" for w in ("kernel", "recurrent_kernel", "bias")]
        entry = {"class_name": class_name, "config": config}
        if functional:
            entry.update(name=name, inbound_nodes=[[[previous, 0, 0, {}]]])
        configs.append(entry)
        weights.append((name, names, arrays))
        previous = name
    model_config = {"class_name": "Functional" if functional else "Sequential",
                    "config": {"name": "model", "layers": configs}}  # fmt: skip
    if functional:
        model_config["config"]["input_layers"] = [["input_1", 0, 0]]
        model_config["config"]["output_layers"] = [[previous, 0, 0]]
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.11.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(model_config).encode()
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [b"input_1"] + [n.encode() for n, _, _ in weights]
        group.create_group("input_1").attrs["weight_names"] = []
        for name, names, arrays in weights:
            layer_group = group.create_group(name)
            layer_group.attrs["weight_names"] = [n.encode() for n in names]
            for weight_name, array in zip(names, arrays, strict=True):
                layer_group.create_dataset(weight_name, data=array)


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_keras2_h5_layout(tmp_path, rng, functional):
    first = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))
    second = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))
    model = keras.Sequential([keras.Input((6, 3)), first, second])
    _randomise(model, rng)
    path = tmp_path / "keras2.h5"
    write_keras2_h5(path, [("Bidirectional", 4, first), ("Bidirectional", 4, second)],
                    functional=functional)  # fmt: skip
    lstm = fl.LSTM.from_keras(path)
    _same_params(lstm, fl.LSTM.from_keras(model))
    _check_model(lstm, model, _x(rng), "Keras 2 layout .h5 file")


def test_keras2_hard_sigmoid_is_refused(tmp_path, rng):
    layer = keras.layers.LSTM(4, return_sequences=True)
    layer(_x(rng))
    path = tmp_path / "old.h5"
    write_keras2_h5(path, [("LSTM", 4, layer)], recurrent_activation="hard_sigmoid")
    with pytest.raises(ValueError, match="'lstm'.*recurrent_activation='hard_sigmoid'"):
        fl.LSTM.from_keras(path)


# ================================================================================== refusals


def _built(layer, rng, width=3):
    layer(_x(rng, width=width))
    return layer


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: keras.layers.LSTM(4, activation="relu", name="r"), "'r'.*activation='relu'"),
        (
            lambda: keras.layers.LSTM(4, recurrent_activation="hard_sigmoid", name="h"),
            "'h'.*recurrent_activation='hard_sigmoid'",
        ),
        (lambda: keras.layers.LSTM(4, go_backwards=True, name="g"), "'g'.*go_backwards"),
        (
            lambda: keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode="sum", name="s"),
            "'s'.*merge_mode='sum'",
        ),
        (
            lambda: keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode="mul", name="m"),
            "'m'.*merge_mode='mul'",
        ),
        (
            lambda: keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode=None, name="n"),
            "'n'.*merge_mode=None",
        ),
        (
            lambda: keras.layers.Bidirectional(
                keras.layers.LSTM(4, activation="sigmoid"), name="b"
            ),
            "'b'.*forward layer.*activation='sigmoid'",
        ),
    ],
    ids=["relu", "hard-sigmoid", "go-backwards", "sum", "mul", "none", "bi-activation"],
)
def test_what_fastlstm_cannot_run_is_refused_naming_layer_and_option(rng, make, pattern):
    with pytest.raises(ValueError, match=pattern):
        fl.LSTM.from_keras(_built(make(), rng))


def test_other_layers_and_mixed_stacks_are_refused(tmp_path, rng):
    dense = keras.Sequential([keras.Input((6, 3)), keras.layers.LSTM(4, return_sequences=True),
                              keras.layers.Dense(2, name="head")])  # fmt: skip
    with pytest.raises(ValueError, match="'head' is a Dense.*LSTM"):
        fl.LSTM.from_keras(dense)
    dense.save(tmp_path / "dense.keras")
    with pytest.raises(ValueError, match="'head' is a Dense"):
        fl.LSTM.from_keras(tmp_path / "dense.keras")
    sizes = keras.Sequential([keras.Input((6, 3)), keras.layers.LSTM(4, return_sequences=True),
                              keras.layers.LSTM(5, name="wider")])  # fmt: skip
    with pytest.raises(ValueError, match="'wider'.*5 units.*one hidden size"):
        fl.LSTM.from_keras(sizes)
    mixed = keras.Sequential(
        [
            keras.Input((6, 3)),
            keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True)),
            keras.layers.LSTM(4, name="single"),
        ]
    )
    with pytest.raises(ValueError, match="'single'.*direction"):
        fl.LSTM.from_keras(mixed)
    inputs = keras.Input((6, 3))
    a = keras.layers.LSTM(4, return_sequences=True, name="a")(inputs)
    b = keras.layers.LSTM(4, return_sequences=True, name="b")(inputs)
    branched = keras.Model(inputs, keras.layers.Concatenate(name="join")([a, b]))
    with pytest.raises(ValueError, match="plain stack|Concatenate"):
        fl.LSTM.from_keras(branched)
    with pytest.raises(ValueError, match="no weights yet"):
        fl.LSTM.from_keras(keras.layers.LSTM(4))
    with pytest.raises(TypeError, match="Keras LSTM"):
        fl.LSTM.from_keras(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="Keras LSTM"):
        fl.LSTM.from_keras(42)


class _Marker:
    """Unpickling this would create a file: proof that a reader ran code from the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_files_raise_a_clear_error_and_run_nothing(tmp_path, rng):
    model = _sequential(rng, bidirectional=True)
    model.save(tmp_path / "good.keras")
    model.save(tmp_path / "good.h5")
    model.save_weights(tmp_path / "only.weights.h5")
    marker = tmp_path / "ran"
    zipped = (tmp_path / "good.keras").read_bytes()
    hdf5 = (tmp_path / "good.h5").read_bytes()
    files = {
        "garbage.keras": os.urandom(3000),
        "empty.h5": b"",
        "pickle.keras": pickle.dumps(_Marker(str(marker))),
        "pickle.h5": pickle.dumps(_Marker(str(marker))),
        "truncated.keras": zipped[: len(zipped) // 2],
        "truncated.h5": hdf5[: len(hdf5) // 2],
        "truncated-more.h5": hdf5[:600],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as archive:
        archive.writestr("model.weights.h5", b"")
    with zipfile.ZipFile(tmp_path / "badjson.keras", "w") as archive:
        archive.writestr("config.json", b"{not json")
        archive.writestr("model.weights.h5", b"")
    with zipfile.ZipFile(tmp_path / "good.keras") as good:
        config, weights = good.read("config.json"), good.read("model.weights.h5")
    with zipfile.ZipFile(tmp_path / "badweights.keras", "w") as archive:
        archive.writestr("config.json", config)
        archive.writestr("model.weights.h5", weights[: len(weights) // 2])
    extra = ["noconfig.keras", "badjson.keras", "badweights.keras", "only.weights.h5"]
    for name in [*files, *extra]:
        with pytest.raises(ValueError) as info:
            fl.LSTM.from_keras(tmp_path / name)
        assert name in str(info.value) or "Keras" in str(info.value), str(info.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="model_config"):
        fl.LSTM.from_keras(tmp_path / "only.weights.h5")
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        fl.LSTM.from_keras(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="directory"):
        fl.LSTM.from_keras(tmp_path)
