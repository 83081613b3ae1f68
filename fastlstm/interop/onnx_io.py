"""ONNX's ``LSTM`` operator in and out of fastlstm: ``LSTM.from_onnx`` and ``LSTM.to_onnx``.

ONNX's conventions, and how they map onto torch's (which fastlstm keeps):

- gate order i, o, f, c (torch: i, f, g, o): W (D, 4H, I), R (D, 4H, H) and both halves of
  B (D, 8H) = [W_b | R_b] are reordered block-wise; ``bias_ih`` is W_b, ``bias_hh`` is R_b;
- peepholes P (D, 3H) in the order i, o, f (fastlstm's ``peephole_l{k}`` rows are i, f, o),
  with the same meaning: i and f see c_{t-1}, o sees c_t;
- layout 0: X (T, B, I), Y (T, D, B, H), Y_h and Y_c (D, B, H); layout 1: X (B, T, I),
  Y (B, T, D, H), Y_h and Y_c (B, D, H). ``sequence_lens`` (int32, B) gives the lengths:
  ONNX Runtime runs the reverse direction over each sequence's own valid steps and zeroes
  the outputs past them, as fastlstm and torch's packed sequences do.

Reading takes weights from initializers and ``Constant`` nodes only; the initial states,
``sequence_lens`` and the ops around the node belong to the graph, not to the model.
Writing makes one LSTM node per layer (opset 14, IR version 8: read by any ONNX Runtime
of the last years). The ``onnx`` package is imported only inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

ONNX_OPSET = 14
ONNX_IR_VERSION = 8  # the IR of opset 14: older than the newest onnx writes, which any ORT reads

# ONNX's gate block j is torch's block _GATES[j] (torch i, f, g, o -> ONNX i, o, f, c).
_GATES = (0, 3, 1, 2)
# torch's gate block k is ONNX's block _GATES_BACK[k].
_GATES_BACK = tuple(_GATES.index(k) for k in range(4))
# ONNX's peephole row j is fastlstm's row _PEEPHOLES[j] (i, o, f <-> i, f, o; its own inverse).
_PEEPHOLES = (0, 2, 1)

# ONNX LSTM attributes fastlstm understands; any other one is refused by name.
_KNOWN_ATTRIBUTES = {
    "activation_alpha", "activation_beta", "activations", "clip", "direction",
    "hidden_size", "input_forget", "layout",
}  # fmt: skip
_STANDARD_ACTIVATIONS = ("sigmoid", "tanh", "tanh")
# Ops that only move or relabel values: followed between chained LSTM nodes.
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the dev extra installs onnx
        raise ImportError(
            "reading and writing ONNX models needs the onnx package: "
            "pip install 'fastlstm[onnx]' (or pip install onnx)"
        ) from exc
    return onnx


# ==================================================================================== export


@dataclass(frozen=True)
class OnnxSpec:
    """What the graph of a fastlstm ``LSTM`` depends on, besides its parameters."""

    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    peephole: str | None
    dtype: np.dtype

    @classmethod
    def of(cls, lstm: Any) -> OnnxSpec:
        return cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional,
            lstm.batch_first, lstm.bias, lstm.peephole, np.dtype(lstm.dtype),
        )  # fmt: skip


def export_refusal(lstm: Any) -> str | None:
    """Why ONNX's LSTM operator cannot express ``lstm``, or None if it can."""
    if lstm.proj_size:
        return "ONNX's LSTM operator has no projection (proj_size); it cannot be exported"
    if lstm.peephole == "full":
        return (
            "ONNX's LSTM operator has only diagonal peepholes (P); a model with "
            "peephole='full' cannot be exported"
        )
    return None


def onnx_weights(spec: OnnxSpec, params: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Layer k's W, R, B and P in ONNX's layout and gate order, both directions stacked."""
    hidden = spec.hidden_size
    suffixes = ["", "_reverse"] if spec.bidirectional else [""]

    def gates(array: np.ndarray) -> np.ndarray:
        blocks = array.reshape(4, hidden, *array.shape[1:])
        return blocks[list(_GATES)].reshape(array.shape)

    weights = {
        "W": np.stack([gates(params[f"weight_ih_l{k}{s}"]) for s in suffixes]),
        "R": np.stack([gates(params[f"weight_hh_l{k}{s}"]) for s in suffixes]),
    }
    if spec.bias:
        weights["B"] = np.stack(
            [
                np.concatenate(
                    [gates(params[f"bias_ih_l{k}{s}"]), gates(params[f"bias_hh_l{k}{s}"])]
                )
                for s in suffixes
            ]
        )
    if spec.peephole == "diagonal":
        weights["P"] = np.stack(
            [params[f"peephole_l{k}{s}"][list(_PEEPHOLES)].reshape(-1) for s in suffixes]
        )
    return {name: np.ascontiguousarray(value, dtype=spec.dtype) for name, value in weights.items()}


def build_model(spec: OnnxSpec, params: dict[str, np.ndarray], *, state: bool, lengths: bool):
    """The ``onnx.ModelProto`` of a model with this spec and these (torch-named) parameters.

    Graph inputs: ``x`` in the model's layout, with ``state`` also ``h0`` (L*D, B, H) and
    ``c0`` (L*D, B, H), with ``lengths`` also ``lengths`` (B,) int64. Outputs ``out``,
    ``h_n``, ``c_n`` in fastlstm's layouts. One LSTM node per layer, in layout 0 (ONNX
    Runtime refuses layout 1), so a batch-first model is transposed around the stack.
    """
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    layers, hidden = spec.num_layers, spec.hidden_size
    directions = 2 if spec.bidirectional else 1
    elem = TensorProto.DOUBLE if spec.dtype == np.float64 else TensorProto.FLOAT
    batch, steps = "B", "T"

    def sequence_shape(width: int) -> list:
        return [batch, steps, width] if spec.batch_first else [steps, batch, width]

    state_shape = [layers * directions, batch, hidden]
    inputs = [helper.make_tensor_value_info("x", elem, sequence_shape(spec.input_size))]
    nodes, inits = [], []
    layer_in = "x"
    if spec.batch_first:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_tm"], perm=[1, 0, 2]))
        layer_in = "x_tm"
    if state:
        inputs += [helper.make_tensor_value_info(n, elem, state_shape) for n in ("h0", "c0")]
        if layers > 1:  # each layer's D rows of the stacked states
            inits.append(
                numpy_helper.from_array(np.full(layers, directions, np.int64), "state_split")
            )
            for kind in ("h0", "c0"):
                parts = [f"{kind}_l{k}" for k in range(layers)]
                nodes.append(helper.make_node("Split", [kind, "state_split"], parts, axis=0))
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, [batch]))
        # The operator's sequence_lens is int32.
        nodes.append(helper.make_node("Cast", ["lengths"], ["lengths_i32"], to=TensorProto.INT32))
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "flat_shape"))
    h_outs, c_outs = [], []
    for k in range(layers):
        weights = onnx_weights(spec, params, k)
        names = {key: f"{key}_l{k}" for key in weights}
        inits += [numpy_helper.from_array(value, names[key]) for key, value in weights.items()]
        h0 = ("h0" if layers == 1 else f"h0_l{k}") if state else ""
        c0 = ("c0" if layers == 1 else f"c0_l{k}") if state else ""
        # LSTM inputs by position: X, W, R, B, sequence_lens, initial_h, initial_c, P.
        op_inputs = [
            layer_in, names["W"], names["R"], names.get("B", ""),
            "lengths_i32" if lengths else "", h0, c0, names.get("P", ""),
        ]  # fmt: skip
        while op_inputs[-1] == "":
            op_inputs.pop()
        y, y_h, y_c = f"y_l{k}", f"h_n_l{k}", f"c_n_l{k}"
        nodes.append(
            helper.make_node(
                "LSTM",
                op_inputs,
                [y, y_h, y_c],
                name=f"lstm_l{k}",
                hidden_size=hidden,
                direction="bidirectional" if spec.bidirectional else "forward",
                layout=0,
            )  # fmt: skip
        )
        # Y (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H): torch's layout, the next layer's X.
        nodes.append(helper.make_node("Transpose", [y], [f"y_tb_l{k}"], perm=[0, 2, 1, 3]))
        last = k == layers - 1
        layer_out = ("out_tm" if spec.batch_first else "out") if last else f"layer_out_l{k}"
        nodes.append(helper.make_node("Reshape", [f"y_tb_l{k}", "flat_shape"], [layer_out]))
        layer_in = layer_out
        h_outs.append(y_h)
        c_outs.append(y_c)
    if spec.batch_first:
        nodes.append(helper.make_node("Transpose", ["out_tm"], ["out"], perm=[1, 0, 2]))
    for name, parts in (("h_n", h_outs), ("c_n", c_outs)):
        if layers == 1:
            nodes.append(helper.make_node("Identity", parts, [name]))
        else:
            nodes.append(helper.make_node("Concat", parts, [name], axis=0))
    outputs = [
        helper.make_tensor_value_info("out", elem, sequence_shape(directions * hidden)),
        helper.make_tensor_value_info("h_n", elem, state_shape),
        helper.make_tensor_value_info("c_n", elem, state_shape),
    ]
    graph = helper.make_graph(nodes, "fastlstm", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="fastlstm",
        ir_version=ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def to_onnx(lstm: Any, path: Any = None, *, state: bool = False, lengths: bool = False):
    """The ONNX model of ``lstm`` (see ``LSTM.to_onnx``); also written to ``path`` if given."""
    reason = export_refusal(lstm)
    if reason:
        raise ValueError(reason)
    onnx = _import_onnx()
    model = build_model(OnnxSpec.of(lstm), lstm.params, state=bool(state), lengths=bool(lengths))
    if path is not None:
        onnx.save_model(model, os.fspath(path))
    return model


# ==================================================================================== import


@dataclass
class _Layer:
    """One ONNX LSTM node's weights in fastlstm's terms."""

    label: str
    directions: int
    hidden: int
    width: int
    layout: int
    params: dict[str, np.ndarray]  # per direction suffix: weight_ih, weight_hh, bias_*, peephole
    bias: bool
    peephole: bool
    dtype: np.dtype


def _label(node: Any, index: int) -> str:
    if node.name:
        return f"LSTM node {node.name!r}"
    return f"LSTM node #{index} (unnamed, output {node.output[0]!r})"


def _load_model(model: Any):
    """An ``onnx.ModelProto`` from a ModelProto or a path; ValueError if it is not one."""
    onnx = _import_onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"model must be an onnx.ModelProto or a path to a .onnx file, "
            f"got {type(model).__name__}"
        )
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such ONNX file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an ONNX file")
    try:
        # Protocol buffers only: parsing runs no code from the file.
        loaded = onnx.load_model(path)
    except Exception as exc:  # DecodeError, truncated data, missing external data, ...
        raise ValueError(f"{path!r} is not a readable ONNX model: {exc}") from exc
    if not loaded.HasField("graph") or not loaded.opset_import:
        raise ValueError(f"{path!r} is not an ONNX model (no graph or no opset)")
    return loaded


class _Constants:
    """Values known without running the graph: initializers and ``Constant`` nodes."""

    def __init__(self, graph: Any) -> None:
        from onnx import helper, numpy_helper

        self._to_array = numpy_helper.to_array
        self.tensors = {t.name: t for t in graph.initializer}
        self.values: dict[str, np.ndarray] = {}
        self.identity: dict[str, str] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
                attribute = node.attribute[0]
                if attribute.name == "value":
                    self.tensors[node.output[0]] = attribute.t
                elif attribute.name != "sparse_value":
                    self.values[node.output[0]] = np.asarray(helper.get_attribute_value(attribute))
            elif node.op_type == "Identity" and node.input:
                self.identity[node.output[0]] = node.input[0]

    def get(self, name: str) -> np.ndarray | None:
        seen = set()
        while name in self.identity and name not in seen:  # an Identity of a constant
            seen.add(name)
            name = self.identity[name]
        if name in self.values:
            return self.values[name]
        if name in self.tensors:
            try:
                return self._to_array(self.tensors[name])
            except Exception as exc:
                raise ValueError(f"the tensor {name!r} cannot be read: {exc}") from exc
        return None


def _attributes(node: Any, label: str) -> dict[str, Any]:
    from onnx import helper

    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        values[attribute.name] = value
    unknown = sorted(set(values) - _KNOWN_ATTRIBUTES)
    if unknown:
        raise ValueError(f"{label}: attribute {unknown[0]!r} is not one fastlstm knows")
    return values


def _read_layer(node: Any, index: int, constants: _Constants) -> _Layer:
    """Check what fastlstm can run and read one node's weights; ValueError names what not."""
    label = _label(node, index)
    attrs = _attributes(node, label)
    direction = attrs.get("direction", "forward")
    if direction == "reverse":
        raise ValueError(
            f"{label}: attribute 'direction' is 'reverse'; fastlstm runs 'forward' and "
            f"'bidirectional' layers only"
        )
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"{label}: attribute 'direction' {direction!r} is not an ONNX direction")
    directions = 2 if direction == "bidirectional" else 1
    if "activations" in attrs:
        given = [str(a).lower() for a in attrs["activations"]]
        if given != list(_STANDARD_ACTIVATIONS) * directions:
            raise ValueError(
                f"{label}: attribute 'activations' is {attrs['activations']}; fastlstm runs "
                f"Sigmoid, Tanh, Tanh only"
            )
    if "clip" in attrs:
        raise ValueError(
            f"{label}: attribute 'clip' ({attrs['clip']}) clips the gate inputs, which "
            f"fastlstm does not do"
        )
    if attrs.get("input_forget", 0):
        raise ValueError(
            f"{label}: attribute 'input_forget' is 1 (coupled input and forget gates), which "
            f"fastlstm does not run"
        )
    layout = attrs.get("layout", 0)
    if layout not in (0, 1):
        raise ValueError(f"{label}: attribute 'layout' must be 0 or 1, got {layout}")

    def weight(position: int, what: str, required: bool) -> np.ndarray | None:
        name = node.input[position] if len(node.input) > position else ""
        if not name:
            if required:
                raise ValueError(f"{label}: input {what} is missing")
            return None
        value = constants.get(name)
        if value is None:
            raise ValueError(
                f"{label}: input {what} ({name!r}) is computed at run time; fastlstm reads "
                f"weights from initializers and Constant nodes only"
            )
        if value.dtype == np.float16:
            value = value.astype(np.float32)
        if value.dtype not in (np.float32, np.float64):
            raise ValueError(f"{label}: input {what} is {value.dtype}, not float32 or float64")
        return value

    w = weight(1, "W", True)
    r = weight(2, "R", True)
    b = weight(3, "B", False)
    p = weight(7, "P", False)
    if r.ndim != 3 or r.shape[0] != directions or r.shape[1] != 4 * r.shape[2] or r.shape[2] < 1:
        raise ValueError(
            f"{label}: input R must be ({directions}, 4H, H) for direction {direction!r}, "
            f"got {r.shape}"
        )
    hidden = r.shape[2]
    if "hidden_size" in attrs and attrs["hidden_size"] != hidden:
        raise ValueError(
            f"{label}: attribute 'hidden_size' is {attrs['hidden_size']} but R holds H = {hidden}"
        )
    if w.ndim != 3 or w.shape[:2] != (directions, 4 * hidden) or w.shape[2] < 1:
        raise ValueError(f"{label}: input W must be ({directions}, {4 * hidden}, I), got {w.shape}")
    if b is not None and b.shape != (directions, 8 * hidden):
        raise ValueError(f"{label}: input B must be ({directions}, {8 * hidden}), got {b.shape}")
    if p is not None and p.shape != (directions, 3 * hidden):
        raise ValueError(f"{label}: input P must be ({directions}, {3 * hidden}), got {p.shape}")
    dtype = np.result_type(*[v for v in (w, r, b, p) if v is not None])

    def torch_gates(array: np.ndarray) -> np.ndarray:
        blocks = array.reshape(4, hidden, *array.shape[1:])
        return blocks[list(_GATES_BACK)].reshape(array.shape)

    params = {}
    for d, sfx in enumerate(["", "_reverse"][:directions]):
        params[f"weight_ih{sfx}"] = torch_gates(w[d])
        params[f"weight_hh{sfx}"] = torch_gates(r[d])
        if b is not None:
            params[f"bias_ih{sfx}"] = torch_gates(b[d, : 4 * hidden])
            params[f"bias_hh{sfx}"] = torch_gates(b[d, 4 * hidden :])
        if p is not None:
            params[f"peephole{sfx}"] = p[d].reshape(3, hidden)[list(_PEEPHOLES)]
    return _Layer(
        label, directions, hidden, w.shape[2], layout, params,
        bias=b is not None, peephole=p is not None, dtype=np.dtype(dtype),
    )  # fmt: skip


def _layout_path(producer: dict, start: str) -> tuple[Any, list]:
    """Follow ``start`` back through layout-only ops; the LSTM node whose Y it is, and the ops."""
    path = []
    name = start
    while name in producer:
        node, position = producer[name]
        if node.op_type == "LSTM" and position == 0:
            return node, path[::-1]
        if node.op_type not in _LAYOUT_OPS or not node.input:
            return None, []
        path.append(node)
        name = node.input[0]
    return None, []


def _apply_layout_ops(value: np.ndarray, ops: list, constants: _Constants) -> np.ndarray | None:
    """Run layout-only ops on ``value`` with NumPy; None if one needs a run-time value."""
    from onnx import helper

    for node in ops:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        second = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.input) > 1 and node.input[1] and second is None:
            return None
        try:
            if node.op_type == "Transpose":
                value = value.transpose(attrs.get("perm") or None)
            elif node.op_type == "Reshape":
                shape = [int(s) for s in second]
                if not attrs.get("allowzero", 0):
                    shape = [value.shape[i] if s == 0 else s for i, s in enumerate(shape)]
                value = value.reshape(shape)
            elif node.op_type in ("Squeeze", "Unsqueeze"):
                axes = attrs.get("axes", None if second is None else [int(a) for a in second])
                if node.op_type == "Squeeze":
                    value = np.squeeze(value, axis=None if axes is None else tuple(axes))
                else:
                    for axis in sorted(a % (value.ndim + len(axes)) for a in axes):
                        value = np.expand_dims(value, axis)
            elif node.op_type == "Flatten":
                axis = attrs.get("axis", 1) % max(value.ndim, 1)
                value = value.reshape(int(np.prod(value.shape[:axis])), -1)
        except (ValueError, TypeError, IndexError):
            return None
    return value


def _joins(first: _Layer, second: _Layer, ops: list, constants: _Constants) -> bool:
    """Whether ``ops`` turn ``first``'s Y into ``second``'s X as stacked layers read it."""
    steps, batch = 2, 3  # distinct sizes, so any mixed-up axis shows
    d, h = first.directions, first.hidden
    y = np.arange(steps * d * batch * h, dtype=np.float64).reshape(steps, d, batch, h)
    expected = y.transpose(0, 2, 1, 3).reshape(steps, batch, d * h)
    if first.layout == 1:
        y = y.transpose(2, 0, 1, 3)  # (B, T, D, H)
    if second.layout == 1:
        expected = expected.transpose(1, 0, 2)
    got = _apply_layout_ops(y, ops, constants)
    return got is not None and got.shape == expected.shape and np.array_equal(got, expected)


def _chain(nodes: list, labels: dict, graph: Any, constants: _Constants) -> list:
    """The LSTM nodes as one stack, first layer first; ValueError if they are not one."""
    producer = _producers(graph)
    previous = {}
    for node in nodes:
        before, _ = _layout_path(producer, node.input[0] if node.input else "")
        if before is not None:
            previous[id(node)] = before
    roots = [n for n in nodes if id(n) not in previous]
    following = {}
    for node in nodes:
        if id(node) in previous:
            following.setdefault(id(previous[id(node)]), []).append(node)
    order = roots[:1]
    while len(roots) == 1 and len(following.get(id(order[-1]), [])) == 1:
        order.append(following[id(order[-1])][0])
    if len(roots) != 1 or len(order) != len(nodes):
        names = ", ".join(labels[id(n)] for n in nodes)
        raise ValueError(
            f"the graph holds {len(nodes)} LSTM nodes that are not one stack of layers "
            f"({names}); pass node=<name> to import one of them"
        )
    return order


def from_onnx(cls: type, model: Any, node: str | None = None):
    """Build a ``cls`` (fastlstm's LSTM) from an ONNX model (see ``LSTM.from_onnx``)."""
    model = _load_model(model)
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "LSTM" and n.domain in ("", "ai.onnx")]
    if not nodes:
        raise ValueError("the ONNX graph has no LSTM node")
    labels = {id(n): _label(n, i) for i, n in enumerate(nodes)}
    constants = _Constants(graph)
    if node is not None:
        if not isinstance(node, str):
            raise TypeError(f"node must be a node name (str) or None, got {type(node).__name__}")
        chosen = [n for n in nodes if n.name == node]
        if not chosen:
            names = ", ".join(repr(n.name) for n in nodes)
            raise ValueError(f"no LSTM node named {node!r}; the graph's LSTM nodes: {names}")
        order = chosen[:1]
    elif len(nodes) == 1:
        order = nodes
    else:
        order = _chain(nodes, labels, graph, constants)
    layers = [_read_layer(n, nodes.index(n), constants) for n in order]
    first = layers[0]
    for k, (below, layer) in enumerate(zip(layers, layers[1:], strict=False), start=1):
        for what, a, b in (
            ("hidden size", below.hidden, layer.hidden),
            ("direction", below.directions, layer.directions),
            ("layout", below.layout, layer.layout),
        ):
            if a != b:
                raise ValueError(
                    f"{layer.label} (layer {k}) differs from {below.label} in its {what} "
                    f"({b} vs {a}); fastlstm's layers share one"
                )
        if layer.width != below.directions * below.hidden:
            raise ValueError(
                f"{layer.label} (layer {k}) reads {layer.width} features, but {below.label} "
                f"writes {below.directions * below.hidden}"
            )
        _, ops = _layout_path(_producers(graph), order[k].input[0])
        if not _joins(below, layer, ops, constants):
            raise ValueError(
                f"the ops between {below.label} and {layer.label} do not lay out its output "
                f"as stacked layers read it; pass node=<name> to import one of them"
            )
    dtype = np.result_type(*[layer.dtype for layer in layers])
    lstm = cls(
        first.width, first.hidden, len(layers),
        bias=any(layer.bias for layer in layers),
        batch_first=first.layout == 1,
        bidirectional=first.directions == 2,
        peephole="diagonal" if any(layer.peephole for layer in layers) else None,
        dtype=dtype,
    )  # fmt: skip
    for name, target in lstm.params.items():
        base, _, rest = name.rpartition("_l")
        k, _, reverse = rest.partition("_")
        key = f"{base}_{reverse}" if reverse else base  # e.g. weight_ih_reverse
        # A layer without B (or P) in a stack whose other layers have it: zeros, as ONNX's default.
        target[...] = layers[int(k)].params.get(key, 0)
    return lstm.eval()


def _producers(graph: Any) -> dict:
    producer = {}
    for node in graph.node:
        for position, output in enumerate(node.output):
            if output:
                producer[output] = (node, position)
    return producer
