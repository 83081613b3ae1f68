"""The peers fastlstm is measured against, built from a fastlstm model's own parameters.

Every runner takes a :class:`fastlstm.LSTM` and copies its configuration and weights, so
each side computes with identical numbers:

- :class:`TorchRunner`: a ``torch.nn.LSTM`` loaded from ``lstm.state_dict()``
  (standard LSTM and ``proj_size``; torch has no peepholes). Inference runs under
  ``torch.inference_mode()``; a training step is forward + ``out.backward(dout)``.
- :class:`OrtRunner`: an ONNX graph of one ``LSTM`` operator per layer (opset 14) run by
  ONNX Runtime (standard LSTM and diagonal peepholes; ONNX has no projection and no full
  peephole matrix). Inference only.
- :func:`reference_forward` / :func:`reference_train_step`: :mod:`fastlstm.reference`,
  the plain-NumPy oracle (every variant).

torch, onnx and onnxruntime are optional: they are imported inside the functions that need
them, never when fastlstm is imported. :func:`available_peers` and :func:`missing_peers`
say which are installed; :func:`unsupported` says why a peer cannot run a given model.

The ONNX graph is ``lstm.to_onnx()`` (:mod:`fastlstm.interop.onnx_io` describes how
torch's conventions map onto ONNX's). ONNX Runtime's CPU LSTM runs the reverse direction
over each sequence's own valid steps and zeroes the outputs at padded steps: torch's
packed-sequence semantics (``tests/test_peers.py``). Two differences:

- for a sequence of length 0 (which torch refuses) ONNX Runtime returns h_n = c_n = 0,
  where fastlstm returns h0 and c0 (DESIGN.md);
- ONNX Runtime's CPU LSTM has no float64 kernel ("does not support double yet" in 1.32):
  :func:`ort_supports_float64` asks the installed version.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

from fastlstm import reference
from fastlstm.interop import onnx_io

PEERS = ("torch", "onnxruntime", "reference")

ONNX_OPSET = onnx_io.ONNX_OPSET

State = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- availability


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def available_peers() -> dict[str, str]:
    """Installed peers: name -> version. ``reference`` is always there."""
    found = {}
    if importlib.util.find_spec("torch") is not None:
        found["torch"] = _version("torch")
    if all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")):
        found["onnxruntime"] = _version("onnxruntime")
    found["reference"] = _version("fastlstm")
    return found


def missing_peers() -> dict[str, str]:
    """Peers that are not installed: name -> what to install."""
    found = available_peers()
    needs = {"torch": "pip install torch", "onnxruntime": "pip install onnx onnxruntime"}
    return {name: f"not installed ({needs[name]})" for name in needs if name not in found}


def unsupported(peer: str, lstm: Any, mode: str = "forward") -> str | None:
    """Why ``peer`` cannot run ``lstm`` in ``mode`` ("forward" or "train"), or None if it can."""
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")
    if mode not in ("forward", "train"):
        raise ValueError(f"mode must be 'forward' or 'train', got {mode!r}")
    if peer == "torch":
        if lstm.peephole is not None:
            return f"torch.nn.LSTM has no {lstm.peephole} peephole"
    elif peer == "onnxruntime":
        if mode == "train":
            return "ONNX Runtime's LSTM operator is inference only"
        reason = _onnx_unsupported(lstm)
        if reason is None and lstm.dtype != np.float32 and not ort_supports_float64():
            reason = "ONNX Runtime's CPU LSTM runs float32 only"
        return reason
    return None


def _onnx_unsupported(lstm: Any) -> str | None:
    """Why ONNX's LSTM operator cannot express ``lstm``, or None."""
    return onnx_io.export_refusal(lstm)


_ORT_FLOAT64: bool | None = None


def ort_supports_float64() -> bool:
    """Whether this ONNX Runtime runs the LSTM operator in float64 (tried once, remembered)."""
    global _ORT_FLOAT64
    if _ORT_FLOAT64 is None:
        from fastlstm import LSTM

        try:
            probe = OrtRunner(LSTM(1, 1, dtype=np.float64, seed=0), threads=1)
            probe.log_severity_level = 4  # fatal only: the refusal is the answer, not an error
            probe.forward(np.zeros((1, 1, 1)))
            _ORT_FLOAT64 = True
        except Exception:  # not installed, or NOT_IMPLEMENTED: "does not support double yet"
            _ORT_FLOAT64 = False
    return _ORT_FLOAT64


def _sizes(lstm: Any) -> tuple[int, int, int]:
    """L, D and H of a fastlstm LSTM."""
    return lstm.num_layers, 2 if lstm.bidirectional else 1, lstm.hidden_size


# ------------------------------------------------------------------------------------ torch


class TorchRunner:
    """``torch.nn.LSTM`` with the configuration and weights of a fastlstm ``LSTM``.

    Parameters
    ----------
    lstm : fastlstm.LSTM
        Standard or with ``proj_size`` (torch has no peepholes). Its weights are copied now;
        later changes to ``lstm`` are not seen.
    """

    def __init__(self, lstm: Any) -> None:
        reason = unsupported("torch", lstm)
        if reason:
            raise ValueError(reason)
        import torch

        self.torch = torch
        self.dtype = lstm.dtype
        self.batch_first = lstm.batch_first
        self.module = torch.nn.LSTM(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout if lstm.num_layers > 1 else 0.0,
            bidirectional=lstm.bidirectional,
            proj_size=lstm.proj_size,
            dtype=getattr(torch, lstm.dtype.name),
        )
        state = {
            name: torch.from_numpy(np.array(value)) for name, value in lstm.state_dict().items()
        }
        self.module.load_state_dict(state)

    def _tensor(self, value: Any, *, grad: bool = False):
        tensor = self.torch.from_numpy(np.ascontiguousarray(value, dtype=self.dtype))
        return tensor.requires_grad_(grad)

    def forward(
        self, x: Any, state: State | None = None, lengths: Any = None
    ) -> tuple[np.ndarray, State]:
        """Inference (eval mode, no autograd) with NumPy in and out, as ``fastlstm.LSTM``.

        ``lengths`` packs the batch (``pack_padded_sequence(enforce_sorted=False)``) and pads
        the output back to T steps with zeros.
        """
        torch = self.torch
        self.module.eval()
        x_t = self._tensor(x)
        hx = None if state is None else tuple(self._tensor(s) for s in state)
        with torch.inference_mode():
            if lengths is None:
                out, (h_n, c_n) = self.module(x_t, hx)
            else:
                steps = x_t.shape[1 if self.batch_first else 0]
                packed = torch.nn.utils.rnn.pack_padded_sequence(
                    x_t,
                    torch.as_tensor(np.asarray(lengths), dtype=torch.int64),
                    batch_first=self.batch_first,
                    enforce_sorted=False,
                )
                out, (h_n, c_n) = self.module(packed, hx)
                out, _ = torch.nn.utils.rnn.pad_packed_sequence(
                    out, batch_first=self.batch_first, total_length=steps
                )
        return out.numpy(), (h_n.numpy(), c_n.numpy())

    def forward_fn(self, x: Any) -> Callable[[], None]:
        """A no-argument call running inference on ``x`` (converted once, here)."""
        torch = self.torch
        module = self.module.eval()
        x_t = self._tensor(x)

        def run() -> None:
            with torch.inference_mode():
                module(x_t)

        return run

    def train_step_fn(self, x: Any, dout: Any) -> Callable[[], None]:
        """A no-argument training step: zero the grads, forward, ``out.backward(dout)``.

        x requires grad, so dL/dx is computed as fastlstm's backward computes it.
        """
        module = self.module.train()
        x_t = self._tensor(x, grad=True)
        dout_t = self._tensor(dout)

        def run() -> None:
            module.zero_grad()
            x_t.grad = None
            out, _ = module(x_t)
            out.backward(dout_t)

        return run


# ------------------------------------------------------------------------------------- ONNX


def onnx_model(lstm: Any, *, with_state: bool = False, with_lengths: bool = False):
    """An ONNX ``ModelProto`` computing ``lstm``'s eval-mode forward: ``lstm.to_onnx``.

    Inputs: ``x`` in the model's layout; with ``with_state``, ``h0`` and ``c0``
    (L*D, B, H); with ``with_lengths``, ``lengths`` (B,) int64. Outputs ``out``, ``h_n``,
    ``c_n`` in fastlstm's layouts. One LSTM operator per layer (see
    :mod:`fastlstm.interop.onnx_io`).
    """
    return lstm.to_onnx(state=with_state, lengths=with_lengths)


class OrtRunner:
    """ONNX Runtime running the ONNX graph of a fastlstm ``LSTM`` (inference only).

    Parameters
    ----------
    lstm : fastlstm.LSTM
        Standard or with ``peephole="diagonal"`` (no projection, no full peephole).
    threads : int, optional
        ``intra_op_num_threads`` (default: ``fastlstm.get_num_threads()``);
        ``inter_op_num_threads`` is 1 and execution is sequential. Everything else keeps ONNX
        Runtime's defaults (all graph optimisations, spinning worker threads).
    """

    def __init__(self, lstm: Any, threads: int | None = None) -> None:
        reason = _onnx_unsupported(lstm)
        if reason:
            raise ValueError(reason)
        import onnxruntime as ort

        from fastlstm import get_num_threads

        self.ort = ort
        self.threads = threads if threads is not None else get_num_threads()
        self.layers, self.directions, self.hidden = _sizes(lstm)
        self.dtype = lstm.dtype
        self._spec = onnx_io.OnnxSpec.of(lstm)
        # A snapshot: later edits to lstm are not seen.
        self._params = {name: value.copy() for name, value in lstm.params.items()}
        self._sessions: dict[tuple[bool, bool], Any] = {}
        self.log_severity_level = 2  # ONNX Runtime's default: warnings and up

    def session(self, *, with_state: bool = False, with_lengths: bool = False):
        """The ``InferenceSession`` of the graph variant (created on first use)."""
        key = (with_state, with_lengths)
        if key not in self._sessions:
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = self.log_severity_level
            model = onnx_io.build_model(
                self._spec, self._params, state=with_state, lengths=with_lengths
            )
            self._sessions[key] = self.ort.InferenceSession(
                model.SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
            )
        return self._sessions[key]

    def feeds(self, x: Any, state: State | None = None, lengths: Any = None) -> dict:
        """The input dict of :meth:`session`'s ``run`` for these arguments."""
        feeds = {"x": np.ascontiguousarray(x, dtype=self.dtype)}
        if state is not None:
            feeds["h0"], feeds["c0"] = (np.ascontiguousarray(s, dtype=self.dtype) for s in state)
        if lengths is not None:
            feeds["lengths"] = np.ascontiguousarray(lengths, dtype=np.int64)
        return feeds

    def forward(
        self, x: Any, state: State | None = None, lengths: Any = None
    ) -> tuple[np.ndarray, State]:
        """Inference with NumPy in and out, as ``fastlstm.LSTM`` in eval mode."""
        session = self.session(with_state=state is not None, with_lengths=lengths is not None)
        out, h_n, c_n = session.run(None, self.feeds(x, state, lengths))
        return out, (h_n, c_n)

    def forward_fn(self, x: Any) -> Callable[[], None]:
        """A no-argument call running ``session.run`` on ``x`` (feeds built once, here)."""
        session = self.session()
        feeds = self.feeds(x)

        def run() -> None:
            session.run(None, feeds)

        return run


# -------------------------------------------------------------------------------- reference


def _reference_options(lstm: Any) -> dict[str, Any]:
    return {
        "num_layers": lstm.num_layers,
        "hidden_size": lstm.hidden_size,
        "proj_size": lstm.proj_size,
        "bidirectional": lstm.bidirectional,
        "peephole": lstm.peephole,
    }


def _time_major(lstm: Any, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=lstm.dtype)
    return array.transpose(1, 0, 2) if lstm.batch_first else array


def reference_forward_fn(lstm: Any, x: Any) -> Callable[[], None]:
    """A no-argument call of ``reference.lstm_forward`` with ``lstm``'s parameters."""
    params = {name: value.copy() for name, value in lstm.params.items()}
    x_tm = np.ascontiguousarray(_time_major(lstm, x))
    options = _reference_options(lstm)

    def run() -> None:
        reference.lstm_forward(x_tm, params, **options)

    return run


def reference_train_step_fn(lstm: Any, x: Any, dout: Any) -> Callable[[], None]:
    """A no-argument ``reference.lstm_forward`` + ``lstm_backward`` (no dropout masks)."""
    params = {name: value.copy() for name, value in lstm.params.items()}
    x_tm = np.ascontiguousarray(_time_major(lstm, x))
    dout_tm = np.ascontiguousarray(_time_major(lstm, dout))
    options = _reference_options(lstm)

    def run() -> None:
        _, _, cache = reference.lstm_forward(x_tm, params, **options)
        reference.lstm_backward(dout_tm, None, None, cache)

    return run
