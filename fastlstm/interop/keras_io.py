"""Keras LSTM layers, models and files into fastlstm: ``LSTM.from_keras``.

Keras's LSTM keeps ``kernel`` (I, 4H), ``recurrent_kernel`` (H, 4H) and one ``bias`` (4H,),
gate order i, f, c, o: torch's i, f, g, o. So ``weight_ih = kernel.T``,
``weight_hh = recurrent_kernel.T``, ``bias_ih = bias`` and ``bias_hh = 0`` (Keras has one
bias where torch has two; their sum is what the gates see). Keras's sequences are
batch-first, so the model is ``batch_first=True``.

Sources, all reduced to a list of layer descriptions (class name, config, arrays):

- live Keras objects: a layer (``LSTM``, ``Bidirectional``) or a model, whose config says
  how its layers connect and whose layers give their arrays (Keras is already imported by
  whoever made the object; fastlstm does not import it);
- ``.keras`` files (Keras 3): a zip holding ``config.json`` (the model's config) and
  ``model.weights.h5``, where layer arrays sit under ``layers/<snake-case class name>[_n]``
  in the order of the model's layers (``cell/vars/0, 1, 2``: kernel, recurrent kernel, bias;
  a Bidirectional's under ``forward_layer/`` and ``backward_layer/``);
- legacy ``.h5`` files (Keras 2, and Keras 3's ``model.save("x.h5")``): the attribute
  ``model_config`` (JSON) and the group ``model_weights/<layer name>``, whose attribute
  ``weight_names`` lists the layer's arrays in order.

Files are read with ``zipfile``, ``json`` and ``h5py`` only: nothing in a file is run (no
pickle, no Keras deserialisation), and Keras and TensorFlow need not be installed.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MAX_CONFIG_BYTES = 64 * 2**20  # config.json of a .keras file: JSON text, never this large
_MODEL_CLASSES = {"Sequential", "Functional", "Model"}
_LAYER_CLASSES = {"LSTM", "Bidirectional"}
_SNAKE = {"InputLayer": "input_layer", "LSTM": "lstm", "Bidirectional": "bidirectional"}


@dataclass
class _Entry:
    """One layer of the source: its class, its config and its arrays in Keras's order."""

    class_name: str
    config: dict
    arrays: list[np.ndarray]

    @property
    def name(self) -> str:
        return str(self.config.get("name", "?"))


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - the dev extra installs h5py
        raise ImportError(
            "reading Keras files needs h5py: pip install 'fastlstm[keras]' (or pip install h5py)"
        ) from exc
    return h5py


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ========================================================================== layer checks


def _activation_name(value: Any) -> str:
    """A Keras activation as a plain name ("tanh"), however it was serialised."""
    if isinstance(value, dict):
        config = value.get("config")
        value = config if isinstance(config, str) else value.get("class_name", value)
        if isinstance(value, dict):
            return repr(value)
    return _text(value).rsplit(".", 1)[-1].lower()


def _check_lstm_config(config: dict, where: str, *, backward: bool = False) -> None:
    """ValueError naming the layer and option for what fastlstm cannot run."""
    for option, wanted in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        given = _activation_name(config.get(option, wanted))
        if given != wanted:
            hint = (
                " (Keras 2's hard_sigmoid is a piecewise-linear sigmoid)" if "hard" in given else ""
            )
            raise ValueError(
                f"{where}: option {option}={given!r}; fastlstm runs {option}={wanted!r} only{hint}"
            )
    if bool(config.get("go_backwards", False)) != backward:
        raise ValueError(
            f"{where}: option go_backwards={config.get('go_backwards')!r}; fastlstm runs "
            f"sequences forward (use Bidirectional for both directions)"
        )
    if config.get("time_major", False):
        raise ValueError(
            f"{where}: option time_major=True; fastlstm reads Keras models batch-first"
        )


@dataclass
class _Layer:
    """One layer in fastlstm's terms: per direction (kernel, recurrent kernel, bias or None)."""

    name: str
    units: int
    width: int
    directions: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    return_sequences: bool


def _split_arrays(arrays: list[np.ndarray], use_bias: bool, where: str, count: int) -> list:
    per = 3 if use_bias else 2
    if len(arrays) != per * count:
        raise ValueError(
            f"{where}: expected {per * count} weight arrays (kernel, recurrent_kernel"
            f"{', bias' if use_bias else ''} per direction), found {len(arrays)}"
        )
    groups = []
    for d in range(count):
        part = arrays[d * per : (d + 1) * per]
        groups.append((part[0], part[1], part[2] if use_bias else None))
    return groups


def _layer(entry: _Entry) -> _Layer:
    """Check one LSTM or Bidirectional(LSTM) entry and take its arrays."""
    where = f"Keras layer {entry.name!r} ({entry.class_name})"
    config = entry.config
    if entry.class_name == "Bidirectional":
        merge_mode = config.get("merge_mode", "concat")
        if merge_mode != "concat":
            raise ValueError(
                f"{where}: option merge_mode={merge_mode!r}; fastlstm concatenates the two "
                f"directions (merge_mode='concat') only"
            )
        forward = config.get("layer") or {}
        backward = config.get("backward_layer")
        for part, role in ((forward, "forward"), (backward, "backward")):
            if part is not None and part.get("class_name") != "LSTM":
                raise ValueError(
                    f"{where}: its {role} layer is {part.get('class_name')!r}; fastlstm "
                    f"imports Bidirectional(LSTM) only"
                )
        inner = forward.get("config", {})
        _check_lstm_config(inner, f"{where}, forward layer {inner.get('name', '?')!r}")
        if backward is not None:
            back = backward.get("config", {})
            _check_lstm_config(
                back, f"{where}, backward layer {back.get('name', '?')!r}", backward=True
            )
            for option in ("units", "use_bias"):
                if back.get(option, inner.get(option)) != inner.get(option):
                    raise ValueError(
                        f"{where}: option {option} differs between its forward and backward "
                        f"layers; fastlstm's directions share one"
                    )
        lstm_config, count = inner, 2
        return_sequences = bool(inner.get("return_sequences", False))
    elif entry.class_name == "LSTM":
        _check_lstm_config(config, where)
        lstm_config, count = config, 1
        return_sequences = bool(config.get("return_sequences", False))
    else:
        raise ValueError(
            f"Keras layer {entry.name!r} is a {entry.class_name}; fastlstm imports models "
            f"made of LSTM and Bidirectional(LSTM) layers only (and their InputLayer)"
        )
    use_bias = bool(lstm_config.get("use_bias", True))
    arrays = [np.asarray(a) for a in entry.arrays]
    directions = _split_arrays(arrays, use_bias, where, count)
    units = directions[0][1].shape[0] if directions[0][1].ndim == 2 else -1
    if "units" in lstm_config and int(lstm_config["units"]) != units:
        raise ValueError(
            f"{where}: option units={lstm_config['units']} but the weights hold {units}"
        )
    width = directions[0][0].shape[0] if directions[0][0].ndim == 2 else -1
    for kernel, recurrent, bias in directions:
        shapes_ok = (
            kernel.shape == (width, 4 * units)
            and recurrent.shape == (units, 4 * units)
            and (bias is None or bias.shape == (4 * units,))
            and units > 0
            and width > 0
        )
        if not shapes_ok:
            shapes = [a.shape for a in (kernel, recurrent, bias) if a is not None]
            raise ValueError(
                f"{where}: weight shapes {shapes} are not kernel (I, 4H), "
                f"recurrent_kernel (H, 4H), bias (4H,)"
            )
    return _Layer(entry.name, units, width, directions, return_sequences)


def _build(cls: type, entries: list[_Entry]):
    """The fastlstm LSTM of a stack of checked layers."""
    layers = [_layer(entry) for entry in entries]
    if not layers:
        raise ValueError("the Keras model has no LSTM layer")
    first = layers[0]
    count = len(first.directions)
    for k, layer in enumerate(layers[1:], start=1):
        below = layers[k - 1]
        where = f"Keras layer {layer.name!r}"
        if not below.return_sequences:
            raise ValueError(
                f"Keras layer {below.name!r} returns only its last step "
                f"(return_sequences=False) but feeds another LSTM layer"
            )
        if layer.units != first.units:
            raise ValueError(
                f"{where}: {layer.units} units where {first.name!r} has {first.units}; "
                f"fastlstm's layers share one hidden size"
            )
        if len(layer.directions) != count:
            raise ValueError(
                f"{where}: {'bi' if len(layer.directions) == 2 else 'uni'}directional in a stack "
                f"whose first layer is not; fastlstm's layers share one direction setting"
            )
        if layer.width != count * below.units:
            raise ValueError(
                f"{where} reads {layer.width} features but {below.name!r} writes "
                f"{count * below.units}"
            )
    arrays = [a for layer in layers for d in layer.directions for a in d if a is not None]
    dtype = np.result_type(*arrays)
    dtype = np.float64 if dtype == np.float64 else np.float32
    lstm = cls(
        first.width,
        first.units,
        len(layers),
        bias=any(d[2] is not None for layer in layers for d in layer.directions),
        batch_first=True,
        bidirectional=count == 2,
        dtype=dtype,
    )
    for k, layer in enumerate(layers):
        for d, (kernel, recurrent, bias) in enumerate(layer.directions):
            sfx = "_reverse" if d == 1 else ""
            lstm.params[f"weight_ih_l{k}{sfx}"][...] = kernel.T
            lstm.params[f"weight_hh_l{k}{sfx}"][...] = recurrent.T
            if lstm.bias:
                lstm.params[f"bias_ih_l{k}{sfx}"][...] = 0 if bias is None else bias
                lstm.params[f"bias_hh_l{k}{sfx}"][...] = 0
    return lstm.eval()


# ================================================================ a model's config: the stack


def _inbound_names(inbound: Any) -> list[str]:
    """The layer names a layer's inbound nodes read (Keras 3 and Keras 2 formats)."""
    names: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            history = value.get("keras_history")
            if history is not None:
                names.append(str(history[0]))
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            # Keras 2: [[["name", node_index, tensor_index, {kwargs}], ...]]
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                names.append(value[0])
                return
            for item in value:
                walk(item)

    walk(inbound)
    return names


def _stack_of(model_config: Any, where: str) -> list[dict]:
    """The layer configs of a model config, in order, checked to form one chain."""
    config = model_config.get("config", model_config) if isinstance(model_config, dict) else None
    layers = config if isinstance(config, list) else (config or {}).get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"{where}: the model config has no list of layers")
    chain = []
    previous = None
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError(f"{where}: a layer config is not a mapping")
        class_name = layer.get("class_name")
        layer_config = layer.get("config") or {}
        name = layer.get("name", layer_config.get("name"))
        inbound = layer.get("inbound_nodes")
        if inbound is not None and class_name != "InputLayer":  # a functional model: check links
            sources = _inbound_names(inbound)
            if len(inbound) != 1 or sources != [previous]:
                raise ValueError(
                    f"{where}: Keras layer {name!r} reads {sources or 'nothing'}"
                    f"{' (called more than once)' if len(inbound) > 1 else ''}; fastlstm "
                    f"imports a plain stack, each layer reading the one before"
                )
        if class_name == "InputLayer":
            if chain or previous is not None:
                raise ValueError(f"{where}: more than one input; fastlstm imports a plain stack")
        elif class_name in _LAYER_CLASSES:
            chain.append(layer)
        else:
            raise ValueError(
                f"Keras layer {name!r} is a {class_name}; fastlstm imports models made of LSTM "
                f"and Bidirectional(LSTM) layers only (and their InputLayer)"
            )
        previous = name
    outputs = config.get("output_layers") if isinstance(config, dict) else None
    if outputs and _inbound_names([outputs]) != [previous]:
        raise ValueError(
            f"{where}: the model's output {_inbound_names([outputs])} is not its last layer "
            f"{previous!r}; fastlstm imports a plain stack"
        )
    return chain


# ================================================================================ live objects


def _live_arrays(layer: Any, where: str) -> list[np.ndarray]:
    if not getattr(layer, "built", True) or not layer.weights:
        raise ValueError(f"{where} has no weights yet: build it (call it on data) first")
    return [np.asarray(a) for a in layer.get_weights()]


def _live_entries(source: Any) -> list[_Entry]:
    class_name = type(source).__name__
    if class_name in _LAYER_CLASSES:
        config = source.get_config()
        if class_name == "Bidirectional":  # the nested configs are objects' configs
            config = dict(config)
            config["layer"] = {"class_name": type(source.forward_layer).__name__,
                               "config": source.forward_layer.get_config()}  # fmt: skip
            config["backward_layer"] = {"class_name": type(source.backward_layer).__name__,
                                        "config": source.backward_layer.get_config()}  # fmt: skip
        where = f"Keras layer {config.get('name')!r}"
        return [_Entry(class_name, config, _live_arrays(source, where))]
    if hasattr(source, "layers") and hasattr(source, "get_layer"):
        try:
            model_config = source.get_config()
        except Exception as exc:
            raise ValueError(
                f"the Keras model {getattr(source, 'name', '?')!r} has no config (a subclassed "
                f"model?): pass its LSTM layers instead ({exc})"
            ) from exc
        where = f"Keras model {getattr(source, 'name', '?')!r}"
        entries = []
        for layer_config in _stack_of({"config": model_config}, where):
            name = layer_config.get("name") or layer_config["config"]["name"]
            entries += _live_entries(source.get_layer(name))
        return entries
    raise TypeError(
        "source must be a Keras LSTM or Bidirectional layer, a Keras model, or a path to a "
        f".keras / .h5 file, got {type(source).__module__}.{class_name}"
    )


# ======================================================================================= files


def _read_h5_group_arrays(group: Any) -> list[np.ndarray]:
    """A Keras 3 weights group's ``vars/0, 1, ...`` arrays, in index order."""
    if "vars" not in group:
        return []
    variables = group["vars"]
    keys = sorted((key for key in variables if key.isdigit()), key=int)
    return [np.asarray(variables[key][()]) for key in keys]


def _keras3_arrays(store: Any, class_name: str, path: str, where: str) -> list[np.ndarray]:
    """A layer's arrays from a ``model.weights.h5`` (Keras 3's layout)."""
    if path not in store:
        raise ValueError(f"{where}: its weights ({path}) are not in the file")
    if class_name == "Bidirectional":
        parts = [f"{path}/{role}_layer/cell" for role in ("forward", "backward")]
    else:
        parts = [f"{path}/cell"]
    arrays = []
    for part in parts:
        if part not in store:
            raise ValueError(f"{where}: its weights ({part}) are not in the file")
        arrays += _read_h5_group_arrays(store[part])
    return arrays


def _read_keras_zip(path: str) -> list[_Entry]:
    h5py = _import_h5py()
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise ValueError(f"{path!r} is a zip file but not a .keras model (no config.json)")
            if "model.weights.h5" not in names:
                raise ValueError(
                    f"{path!r}: no model.weights.h5 inside (sharded or other weight formats "
                    f"are not read)"
                )
            if archive.getinfo("config.json").file_size > _MAX_CONFIG_BYTES:
                raise ValueError(f"{path!r}: config.json is implausibly large")
            config = json.loads(archive.read("config.json"))
            weights = io.BytesIO(archive.read("model.weights.h5"))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path!r} is not a readable .keras file: {exc}") from exc
    where = f"the .keras file {path!r}"
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json is not a model config")
    class_name = config.get("class_name")
    if class_name not in _MODEL_CLASSES:
        raise ValueError(f"{where}: holds a {class_name!r}, not a Sequential or functional model")
    stack = _stack_of(config, where)
    # Keras 3 names each layer's group after its class in snake case, numbered in the
    # model's layer order: layers/lstm, layers/lstm_1, layers/bidirectional, ...
    counts: dict[str, int] = {}
    groups = {}
    for layer in (config.get("config") or {}).get("layers", []):
        snake = _SNAKE.get(layer.get("class_name"), "")
        n = counts.get(snake, 0)
        counts[snake] = n + 1
        groups[id(layer)] = f"layers/{snake}" + (f"_{n}" if n else "")
    paths = [groups[id(layer)] for layer in stack]
    entries = []
    try:
        with h5py.File(weights, "r") as store:
            for layer, group in zip(stack, paths, strict=True):
                layer_config = layer.get("config") or {}
                name = layer_config.get("name", "?")
                where_layer = f"Keras layer {name!r} in {path!r}"
                arrays = _keras3_arrays(store, layer["class_name"], group, where_layer)
                entries.append(_Entry(layer["class_name"], layer_config, arrays))
    except (OSError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: model.weights.h5 is not readable HDF5: {exc}") from exc
    return entries


def _read_legacy_h5(path: str) -> list[_Entry]:
    h5py = _import_h5py()
    try:
        with h5py.File(path, "r") as store:
            if "model_config" not in store.attrs:
                raise ValueError(
                    f"{path!r} has no model_config: a weights-only HDF5 file holds no "
                    f"architecture; build the model in Keras, load the weights, and pass the model"
                )
            try:
                config = json.loads(_text(store.attrs["model_config"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path!r}: model_config is not JSON: {exc}") from exc
            where = f"the .h5 file {path!r}"
            if not isinstance(config, dict) or config.get("class_name") not in _MODEL_CLASSES:
                raise ValueError(f"{where}: model_config is not a Sequential or functional model")
            stack = _stack_of(config, where)
            weights = store["model_weights"] if "model_weights" in store else store
            entries = []
            for layer in stack:
                layer_config = layer.get("config") or {}
                name = layer_config.get("name") or layer.get("name")
                if name not in weights:
                    raise ValueError(f"Keras layer {name!r}: its weights are not in {path!r}")
                group = weights[name]
                names = [_text(n) for n in group.attrs.get("weight_names", [])]
                try:
                    arrays = [np.asarray(group[n][()]) for n in names]
                except KeyError as exc:
                    raise ValueError(f"Keras layer {name!r}: weight missing in {path!r}") from exc
                entries.append(_Entry(layer["class_name"], layer_config, arrays))
            return entries
    except (OSError, KeyError, TypeError) as exc:
        raise ValueError(f"{path!r} is not a readable Keras HDF5 file: {exc}") from exc


def _read_file(source: Any) -> list[_Entry]:
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such Keras file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(
            f"{path!r} is a directory (a TensorFlow SavedModel?); fastlstm reads .keras and "
            f".h5 files"
        )
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] == _ZIP_MAGIC:
        return _read_keras_zip(path)
    if head == _HDF5_MAGIC or _import_h5py().is_hdf5(path):
        return _read_legacy_h5(path)
    raise ValueError(f"{path!r} is neither a .keras file (zip) nor a Keras .h5 file (HDF5)")


def from_keras(cls: type, source: Any):
    """Build a ``cls`` (fastlstm's LSTM) from a Keras object or file (see ``LSTM.from_keras``)."""
    if isinstance(source, str | os.PathLike):
        entries = _read_file(source)
    else:
        entries = _live_entries(source)
    return _build(cls, entries)
