"""Pure-NumPy LSTM forward and backward: the correctness oracle and the benchmark baseline.

Written for reading, not speed: a plain Python loop over time steps, one batched step at a
time, the seeds' equations in PyTorch's gate order (i, f, g, o) and parameter names.
This module never imports numba or any other part of fastlstm.

One layer, one direction, one step (B sequences at once, rows of every array)::

    a   = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh               # (B, 4H): i, f, g, o
    a_i += p_i * c_{t-1};  a_f += p_f * c_{t-1}                   # peephole="diagonal"
    a_ifg += c_{t-1} W_ch[ifg]^T + b_ch[ifg]                      # peephole="full"
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    a_o += p_o * c_t   or   a_o += c_t W_ch[o]^T + b_ch[o]        # o sees the new cell state
    o = σ(a_o)
    m_t = o * tanh(c_t)
    h_t = m_t W_hr^T  (proj_size > 0)   else   h_t = m_t

Every computation runs in the dtype of the input ``x`` (float32 or float64; anything else is
computed in float64), with exact ``np.exp`` / ``np.tanh``.

Variable-length batches (``lengths``) follow ``torch.nn.utils.rnn.pack_padded_sequence``:
a step at ``t >= n_b`` leaves sequence b's state unchanged and outputs zeros. Masking always
selects (``np.where``) rather than multiplies, so NaN or inf in padding never leaks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["cell_backward", "cell_forward", "lstm_backward", "lstm_forward", "sigmoid"]

# Parameter names of one layer and direction, without the "_l{k}{sfx}" suffix (the cell's names).
_PARAM_NAMES = (
    "weight_ih",
    "weight_hh",
    "bias_ih",
    "bias_hh",
    "weight_hr",
    "peephole",
    "weight_ch",
    "bias_ch",
)
_PEEPHOLES = (None, "diagonal", "full")


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, exact to rounding, in the dtype of ``x``.

    Split on the sign so ``exp`` only ever sees non-positive arguments: no overflow warning for
    huge ``|x|`` (σ saturates to exactly 0 or 1), no cancellation for large negative ``x``,
    and NaN propagates (``NaN >= 0`` is False and the other branch is NaN too).
    """
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


def _working_dtype(x: np.ndarray) -> np.dtype:
    """float32 and float64 inputs keep their dtype; everything else is computed in float64."""
    if x.dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return x.dtype
    return np.dtype(np.float64)


def _select(valid: np.ndarray | None, new: Any, old: Any) -> Any:
    """``new`` where the row is a valid step, else ``old``; everything is valid without lengths."""
    if valid is None:
        return new
    return np.where(valid, new, old)


def _gather(
    params: Mapping[str, Any],
    suffix: str,
    peephole: str | None,
    proj: bool,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """Pick one layer-direction's parameters out of ``params``, keyed by their short names.

    ``suffix`` is "" for a cell, else "_l{k}" or "_l{k}_reverse". Biases are optional (bias=False);
    the peephole and projection weights are required when their variant is on.
    """
    if peephole not in _PEEPHOLES:
        raise ValueError(f"peephole must be one of {_PEEPHOLES}, got {peephole!r}")
    required = ["weight_ih", "weight_hh"]
    optional = ["bias_ih", "bias_hh"]
    if proj:
        required.append("weight_hr")
    if peephole == "diagonal":
        required.append("peephole")
    elif peephole == "full":
        required.append("weight_ch")
        optional.append("bias_ch")
    p = {}
    for short in required + optional:
        name = short + suffix
        if name in params:
            p[short] = np.asarray(params[name]).astype(dtype, copy=False)
        elif short in required:
            raise KeyError(f"parameter {name!r} is missing")
    return p


# ----------------------------------------------------------------------------------------------
# One batched step: shared by the cell and by every layer and direction of the sequence model
# ----------------------------------------------------------------------------------------------


def _step_forward(
    x_t: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray, p: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One LSTM step for a batch: returns h_t, c_t and what the backward step needs."""
    H = c_prev.shape[1]
    a = x_t @ p["weight_ih"].T
    if "bias_ih" in p:
        a += p["bias_ih"]
    a += h_prev @ p["weight_hh"].T
    if "bias_hh" in p:
        a += p["bias_hh"]
    # Peepholes into i, f (and g for "full") look at the previous cell state.
    if "peephole" in p:
        a[:, 0:H] += p["peephole"][0] * c_prev
        a[:, H : 2 * H] += p["peephole"][1] * c_prev
    if "weight_ch" in p:
        a[:, : 3 * H] += c_prev @ p["weight_ch"][: 3 * H].T
        if "bias_ch" in p:
            a[:, : 3 * H] += p["bias_ch"][: 3 * H]
    i = sigmoid(a[:, 0:H])
    f = sigmoid(a[:, H : 2 * H])
    g = np.tanh(a[:, 2 * H : 3 * H])
    c = f * c_prev + i * g
    # The output gate's peephole looks at the new cell state c_t.
    a_o = a[:, 3 * H :]
    if "peephole" in p:
        a_o = a_o + p["peephole"][2] * c
    if "weight_ch" in p:
        a_o = a_o + c @ p["weight_ch"][3 * H :].T
        if "bias_ch" in p:
            a_o = a_o + p["bias_ch"][3 * H :]
    o = sigmoid(a_o)
    tanh_c = np.tanh(c)
    m = o * tanh_c
    h = m @ p["weight_hr"].T if "weight_hr" in p else m
    cache = {
        "x": x_t,
        "h_prev": h_prev,
        "c_prev": c_prev,
        "i": i,
        "f": f,
        "g": g,
        "o": o,
        "c": c,
        "tanh_c": tanh_c,
        "m": m,
    }
    return h, c, cache


def _step_backward(
    dh: np.ndarray,
    dc: np.ndarray,
    cache: Mapping[str, np.ndarray],
    p: Mapping[str, np.ndarray],
    grads: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of ``_step_forward``, given ``dh``, ``dc``: the gradients wrt h_t and c_t.

    Adds the parameter gradients into ``grads`` (same short keys as ``p``) and returns
    dx_t, dh_{t-1}, dc_{t-1}.
    """
    H = cache["c"].shape[1]
    x, h_prev, c_prev = cache["x"], cache["h_prev"], cache["c_prev"]
    i, f, g, o, c, tanh_c = (cache[k] for k in ("i", "f", "g", "o", "c", "tanh_c"))

    if "weight_hr" in p:
        grads["weight_hr"] += dh.T @ cache["m"]  # h = m W_hr^T
        dm = dh @ p["weight_hr"]
    else:
        dm = dh
    do = dm * tanh_c  # m = o * tanh(c)
    dc = dc + dm * o * (1 - tanh_c * tanh_c)
    da_o = do * o * (1 - o)  # o = σ(a_o)
    # a_o depends on c_t through the output peephole: more gradient into c_t.
    if "peephole" in p:
        dc = dc + da_o * p["peephole"][2]
        grads["peephole"][2] += (da_o * c).sum(axis=0)
    if "weight_ch" in p:
        dc = dc + da_o @ p["weight_ch"][3 * H :]
        grads["weight_ch"][3 * H :] += da_o.T @ c
        if "bias_ch" in p:
            grads["bias_ch"][3 * H :] += da_o.sum(axis=0)

    # c = f * c_prev + i * g
    da_i = dc * g * i * (1 - i)
    da_f = dc * c_prev * f * (1 - f)
    da_g = dc * i * (1 - g * g)
    dc_prev = dc * f
    da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)

    # i, f (and g for "full") depend on c_prev through the peepholes.
    if "peephole" in p:
        dc_prev = dc_prev + da_i * p["peephole"][0] + da_f * p["peephole"][1]
        grads["peephole"][0] += (da_i * c_prev).sum(axis=0)
        grads["peephole"][1] += (da_f * c_prev).sum(axis=0)
    if "weight_ch" in p:
        da_ifg = da[:, : 3 * H]
        dc_prev = dc_prev + da_ifg @ p["weight_ch"][: 3 * H]
        grads["weight_ch"][: 3 * H] += da_ifg.T @ c_prev
        if "bias_ch" in p:
            grads["bias_ch"][: 3 * H] += da_ifg.sum(axis=0)

    # a = x W_ih^T + b_ih + h_prev W_hh^T + b_hh
    grads["weight_ih"] += da.T @ x
    grads["weight_hh"] += da.T @ h_prev
    if "bias_ih" in p:
        grads["bias_ih"] += da.sum(axis=0)
    if "bias_hh" in p:
        grads["bias_hh"] += da.sum(axis=0)
    dx = da @ p["weight_ih"]
    dh_prev = da @ p["weight_hh"]
    return dx, dh_prev, dc_prev


# ----------------------------------------------------------------------------------------------
# One layer, one direction, the whole sequence
# ----------------------------------------------------------------------------------------------


def _direction_forward(
    x: np.ndarray,
    p: Mapping[str, np.ndarray],
    h0: np.ndarray,
    c0: np.ndarray,
    valid: np.ndarray | None,
    reverse: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """Run one direction over x (T, B, I); returns out (T, B, H_out), h_n, c_n, step caches.

    ``valid`` is None or a (T, B, 1) boolean mask of real steps. Padded steps keep the state and
    output zeros. Running the reverse direction over all T steps with that rule is the same as
    starting it at each sequence's own last step, as packed sequences do.
    """
    T = x.shape[0]
    h, c = h0, c0
    out = np.zeros((T, x.shape[1], h0.shape[1]), dtype=x.dtype)
    steps: list[dict[str, np.ndarray]] = [{}] * T
    for t in reversed(range(T)) if reverse else range(T):
        v = None if valid is None else valid[t]
        h_new, c_new, cache = _step_forward(x[t], h, c, p)
        out[t] = _select(v, h_new, 0)
        h = _select(v, h_new, h)
        c = _select(v, c_new, c)
        # Padded rows are cached as exact zeros, so the backward products over the batch
        # (da^T x and friends) see 0 * 0 there, never 0 * NaN from a NaN in the padding.
        steps[t] = {k: _select(v, val, 0) for k, val in cache.items()}
    return out, h, c, steps


def _direction_backward(
    dout: np.ndarray,
    dh_n: np.ndarray,
    dc_n: np.ndarray,
    steps: Sequence[Mapping[str, np.ndarray]],
    p: Mapping[str, np.ndarray],
    grads: dict[str, np.ndarray],
    valid: np.ndarray | None,
    reverse: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backpropagation through time for one direction; returns dx (T, B, I), dh0, dc0."""
    T = dout.shape[0]
    dh, dc = dh_n, dc_n  # gradients wrt the state carried out of the step being undone
    dx = np.zeros((T, dout.shape[1], p["weight_ih"].shape[1]), dtype=dout.dtype)
    for t in range(T) if reverse else reversed(range(T)):
        v = None if valid is None else valid[t]
        # A real step's h_t is both its output and the carried state; dout at padding is ignored.
        dh_t = _select(v, dh + dout[t], 0)
        dc_t = _select(v, dc, 0)
        dx[t], dh_prev, dc_prev = _step_backward(dh_t, dc_t, steps[t], p, grads)
        # A padded step passed the state through unchanged, so its gradient passes through too.
        dh = _select(v, dh_prev, dh)
        dc = _select(v, dc_prev, dc)
    return dx, dh, dc


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def lstm_forward(
    x: Any,
    params: Mapping[str, Any],
    *,
    num_layers: int,
    hidden_size: int,
    proj_size: int = 0,
    bidirectional: bool = False,
    peephole: str | None = None,
    state: tuple[Any, Any] | None = None,
    lengths: Any = None,
    dropout_masks: Sequence[Any] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """Multi-layer LSTM over a time-major batch, with torch.nn.LSTM's semantics.

    Parameters
    ----------
    x : array_like, shape (T, B, I)
        Input sequences, time-major. Its dtype (float32 or float64, else float64) is used
        for all the arithmetic; parameters and state are converted to it.
    params : mapping of str to array_like
        Torch's names: ``weight_ih_l{k}{sfx}`` (4H, I_k), ``weight_hh_l{k}{sfx}`` (4H, H_out),
        optional ``bias_ih_l{k}{sfx}``, ``bias_hh_l{k}{sfx}`` (4H,), ``weight_hr_l{k}{sfx}``
        (P, H) when ``proj_size`` > 0; ``peephole_l{k}{sfx}`` (3, H) (rows i, f, o) for the
        diagonal peephole; ``weight_ch_l{k}{sfx}`` (4H, H) and optional ``bias_ch_l{k}{sfx}``
        (4H,) for the full one. ``sfx`` is "" or "_reverse"; I_0 = I, I_k = D * H_out.
    num_layers, hidden_size, proj_size : int
        L, H and P (0 for no projection). H_out = P or H.
    bidirectional : bool
        D = 2 if True: the "_reverse" direction runs from the end of each sequence.
    peephole : {None, "diagonal", "full"}
        Peephole variant (see the module docstring).
    state : tuple of array_like, optional
        (h0 (L*D, B, H_out), c0 (L*D, B, H)), index k*D + d; zeros if None.
    lengths : array_like of int, shape (B,), optional
        Valid steps per sequence, 0 <= n <= T, with ``pack_padded_sequence`` semantics:
        outputs at t >= n are zero and h_n, c_n are the state after the last valid step
        (h0, c0 if n = 0).
    dropout_masks : sequence of array_like, optional
        num_layers - 1 arrays (T, B, D*H_out), already scaled by 1/(1-p), multiplied into
        layer k's output before it feeds layer k+1.

    Returns
    -------
    out : ndarray, shape (T, B, D*H_out)
    (h_n, c_n) : tuple of ndarray, shapes (L*D, B, H_out) and (L*D, B, H)
    cache : dict
        Everything ``lstm_backward`` needs.
    """
    x = np.asarray(x)
    dtype = _working_dtype(x)
    x = x.astype(dtype, copy=False)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (T, B, I), got shape {x.shape}")
    T, B, _ = x.shape
    L, H, P = num_layers, hidden_size, proj_size
    D = 2 if bidirectional else 1
    H_out = P or H

    if state is None:
        h0 = np.zeros((L * D, B, H_out), dtype=dtype)
        c0 = np.zeros((L * D, B, H), dtype=dtype)
    else:
        h0, c0 = (np.asarray(s).astype(dtype, copy=False) for s in state)
        if h0.shape != (L * D, B, H_out) or c0.shape != (L * D, B, H):
            raise ValueError(
                f"state must have shapes {(L * D, B, H_out)} and {(L * D, B, H)}, "
                f"got {h0.shape} and {c0.shape}"
            )
    valid = _valid_mask(lengths, T, B)
    masks = None
    if dropout_masks is not None:
        masks = [np.asarray(mk).astype(dtype, copy=False) for mk in dropout_masks]
        if len(masks) != L - 1:
            raise ValueError(f"expected {L - 1} dropout masks, got {len(masks)}")

    h_n = np.empty((L * D, B, H_out), dtype=dtype)
    c_n = np.empty((L * D, B, H), dtype=dtype)
    layer_params: list[list[dict[str, np.ndarray]]] = []
    layer_steps: list[list[list[dict[str, np.ndarray]]]] = []
    layer_in = x
    for k in range(L):
        outs, ps, steps = [], [], []
        for d in range(D):
            p = _gather(params, _suffix(k, d), peephole, P > 0, dtype)
            out_d, h_n[k * D + d], c_n[k * D + d], steps_d = _direction_forward(
                layer_in, p, h0[k * D + d], c0[k * D + d], valid, reverse=d == 1
            )
            outs.append(out_d)
            ps.append(p)
            steps.append(steps_d)
        layer_params.append(ps)
        layer_steps.append(steps)
        layer_out = np.concatenate(outs, axis=-1) if D == 2 else outs[0]
        if k < L - 1 and masks is not None:
            layer_out = layer_out * masks[k]
        layer_in = layer_out

    cache = {
        "config": {"L": L, "D": D, "H": H, "H_out": H_out, "peephole": peephole},
        "dtype": dtype,
        "x_shape": x.shape,
        "param_shapes": {name: np.shape(value) for name, value in params.items()},
        "params": layer_params,
        "steps": layer_steps,
        "valid": valid,
        "masks": masks,
    }
    return layer_in, (h_n, c_n), cache


def lstm_backward(
    dout: Any, dh_n: Any, dc_n: Any, cache: Mapping[str, Any]
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """Gradients of ``lstm_forward`` by backpropagation through time.

    Parameters
    ----------
    dout : array_like, shape (T, B, D*H_out)
        Gradient wrt ``out``; entries at padded steps (t >= n) are ignored.
    dh_n, dc_n : array_like or None
        Gradients wrt h_n (L*D, B, H_out) and c_n (L*D, B, H); None means zeros.
    cache : dict
        The third value returned by ``lstm_forward``.

    Returns
    -------
    dx : ndarray, shape (T, B, I)
    (dh0, dc0) : tuple of ndarray, shapes of h0 and c0
    grads : dict of str to ndarray
        One entry per key of the forward's ``params`` (zeros for keys it did not use).
    """
    cfg = cache["config"]
    L, D, H, H_out = cfg["L"], cfg["D"], cfg["H"], cfg["H_out"]
    dtype = cache["dtype"]
    T, B, _ = cache["x_shape"]
    dout = np.asarray(dout).astype(dtype, copy=False)
    if dout.shape != (T, B, D * H_out):
        raise ValueError(f"dout must have shape {(T, B, D * H_out)}, got {dout.shape}")
    dh_n = _zeros_if_none(dh_n, (L * D, B, H_out), dtype)
    dc_n = _zeros_if_none(dc_n, (L * D, B, H), dtype)

    grads = {name: np.zeros(shape, dtype=dtype) for name, shape in cache["param_shapes"].items()}
    dh0 = np.empty((L * D, B, H_out), dtype=dtype)
    dc0 = np.empty((L * D, B, H), dtype=dtype)
    d_layer_out = dout
    for k in reversed(range(L)):
        d_layer_in = None
        for d in range(D):
            p = cache["params"][k][d]
            # Views into ``grads``: the step backward adds into them in place.
            g = {short: grads[short + _suffix(k, d)] for short in p}
            dx_d, dh0[k * D + d], dc0[k * D + d] = _direction_backward(
                d_layer_out[..., d * H_out : (d + 1) * H_out],
                dh_n[k * D + d],
                dc_n[k * D + d],
                cache["steps"][k][d],
                p,
                g,
                cache["valid"],
                reverse=d == 1,
            )
            d_layer_in = dx_d if d_layer_in is None else d_layer_in + dx_d
        if k > 0 and cache["masks"] is not None:
            d_layer_in = d_layer_in * cache["masks"][k - 1]  # layer_in = layer_out * mask
        d_layer_out = d_layer_in
    return d_layer_out, (dh0, dc0), grads


def cell_forward(
    x: Any,
    params: Mapping[str, Any],
    state: tuple[Any, Any] | None = None,
    peephole: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One LSTM step for a batch, with torch.nn.LSTMCell's names and semantics.

    Parameters
    ----------
    x : array_like, shape (B, I)
        Input; its dtype (float32 or float64, else float64) is used for the arithmetic.
    params : mapping of str to array_like
        ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), optional ``bias_ih``, ``bias_hh`` (4H,);
        ``peephole`` (3, H) for ``peephole="diagonal"``; ``weight_ch`` (4H, H) and optional
        ``bias_ch`` (4H,) for ``peephole="full"``.
    state : tuple of array_like, optional
        (h_prev, c_prev), each (B, H); zeros if None.
    peephole : {None, "diagonal", "full"}

    Returns
    -------
    h, c : ndarray, shape (B, H)
    cache : dict
        Everything ``cell_backward`` needs.
    """
    x = np.asarray(x)
    dtype = _working_dtype(x)
    x = x.astype(dtype, copy=False)
    p = _gather(params, "", peephole, False, dtype)
    H = p["weight_hh"].shape[1]
    if state is None:
        h_prev = np.zeros((x.shape[0], H), dtype=dtype)
        c_prev = np.zeros((x.shape[0], H), dtype=dtype)
    else:
        h_prev, c_prev = (np.asarray(s).astype(dtype, copy=False) for s in state)
    h, c, step = _step_forward(x, h_prev, c_prev, p)
    cache = {
        "params": p,
        "step": step,
        "param_shapes": {name: np.shape(value) for name, value in params.items()},
    }
    return h, c, cache


def cell_backward(
    dh: Any, dc: Any, cache: Mapping[str, Any]
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """Gradients of ``cell_forward``.

    Parameters
    ----------
    dh : array_like, shape (B, H)
        Gradient wrt h.
    dc : array_like or None
        Gradient wrt c, (B, H); None means zeros.
    cache : dict
        The third value returned by ``cell_forward``.

    Returns
    -------
    dx : ndarray, shape (B, I)
    (dh_prev, dc_prev) : tuple of ndarray, shape (B, H)
    grads : dict of str to ndarray
        One entry per key of the forward's ``params`` (zeros for keys it did not use).
    """
    step = cache["step"]
    dtype = step["c"].dtype
    dh = np.asarray(dh).astype(dtype, copy=False)
    dc = _zeros_if_none(dc, step["c"].shape, dtype)
    grads = {name: np.zeros(shape, dtype=dtype) for name, shape in cache["param_shapes"].items()}
    dx, dh_prev, dc_prev = _step_backward(dh, dc, step, cache["params"], grads)
    return dx, (dh_prev, dc_prev), grads


# ----------------------------------------------------------------------------------------------
# Argument plumbing
# ----------------------------------------------------------------------------------------------


def _suffix(k: int, d: int) -> str:
    """Torch's name suffix of layer k, direction d."""
    return f"_l{k}" + ("_reverse" if d == 1 else "")


def _zeros_if_none(value: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if value is None:
        return np.zeros(shape, dtype=dtype)
    value = np.asarray(value).astype(dtype, copy=False)
    if value.shape != tuple(shape):
        raise ValueError(f"expected shape {tuple(shape)}, got {value.shape}")
    return value


def _valid_mask(lengths: Any, T: int, B: int) -> np.ndarray | None:
    """(T, B, 1) boolean mask of the real steps t < n_b, or None when every step is real."""
    if lengths is None:
        return None
    n = np.asarray(lengths)
    if n.shape != (B,) or not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"lengths must be {B} integers, got {n.dtype} array of shape {n.shape}")
    if np.any(n < 0) or np.any(n > T):
        raise ValueError(f"lengths must be in [0, {T}], got {n.tolist()}")
    return (np.arange(T)[:, None] < n[None, :])[:, :, None]
