"""fl.LSTMCell vs torch.nn.LSTMCell: one step forward and backward, and BPTT through a user's loop.

The loop test runs T cell calls in Python, then T backward calls in reverse order (the cell's
caches are last in, first out), and compares every gradient with torch autograd through the
same loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from utils import assert_close

import fastlstm as fl

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
B, I, H = 4, 3, 5  # noqa: E741

dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
biases = pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
states = pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
batching = pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])


def torch_twin(cell: fl.LSTMCell) -> torch.nn.LSTMCell:
    module = torch.nn.LSTMCell(
        cell.input_size, cell.hidden_size, bias=cell.bias, dtype=TORCH_DTYPES[cell.dtype]
    )
    module.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})
    return module


@dtypes
@biases
@states
@batching
def test_cell_matches_torch(rng, dtype, bias, with_state, batched):
    cell = fl.LSTMCell(I, H, bias=bias, dtype=dtype, seed=1)
    module = torch_twin(cell)
    lead = (B,) if batched else ()
    x = rng.standard_normal((*lead, I)).astype(dtype)
    h0, c0, dh, dc = (rng.standard_normal((*lead, H)).astype(dtype) for _ in range(4))
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)

    h, c = cell(x, (h0, c0) if with_state else None)
    dx, (dh_prev, dc_prev) = cell.backward(dh, dc)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_h, t_c = module(tx, (th0, tc0))
    ((t_h * torch.from_numpy(dh)).sum() + (t_c * torch.from_numpy(dc)).sum()).backward()

    assert_close(h, t_h, dtype, what="h")
    assert_close(c, t_c, dtype, what="c")
    assert_close(dx, tx.grad, dtype, what="dx")
    assert_close(dh_prev, th0.grad, dtype, what="dh_prev")
    assert_close(dc_prev, tc0.grad, dtype, what="dc_prev")
    named = dict(module.named_parameters())
    assert [(k, v.shape) for k, v in cell.grads.items()] == [
        (k, tuple(p.shape)) for k, p in named.items()
    ]
    for name, p in named.items():
        assert_close(cell.grads[name], p.grad, dtype, what=name)


@dtypes
def test_cell_backward_without_dc_equals_zero_dc(rng, dtype):
    cell = fl.LSTMCell(I, H, dtype=dtype, seed=2)
    x, dh = rng.standard_normal((B, I)), rng.standard_normal((B, H))
    cell(x)
    dx, (dh_prev, dc_prev) = cell.backward(dh)
    grads = {k: v.copy() for k, v in cell.grads.items()}
    cell.zero_grad()
    cell(x)
    dx0, (dh_prev0, dc_prev0) = cell.backward(dh, np.zeros((B, H)))
    for got, want in [(dx, dx0), (dh_prev, dh_prev0), (dc_prev, dc_prev0)]:
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
    for name, value in cell.grads.items():
        np.testing.assert_array_equal(value, grads[name], err_msg=name)


@dtypes
@biases
@pytest.mark.parametrize("steps", [1, 6], ids=["T1", "T6"])
def test_cell_loop_bptt_matches_torch(rng, dtype, bias, steps):
    """A Python loop of cell calls, backpropagated call by call in reverse order."""
    cell = fl.LSTMCell(I, H, bias=bias, dtype=dtype, seed=3)
    module = torch_twin(cell)
    xs = rng.standard_normal((steps, B, I)).astype(dtype)
    h0, c0 = (0.5 * rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    dhs = rng.standard_normal((steps, B, H)).astype(dtype)  # dL/dh_t of every step's output
    dc_last = rng.standard_normal((B, H)).astype(dtype)  # dL/dc of the last step

    state = (h0, c0)
    hs = []
    for t in range(steps):
        state = cell(xs[t], state)
        hs.append(state[0])
    assert len(cell._caches) == steps
    dxs = [None] * steps
    dh_carry, dc_carry = np.zeros((B, H), dtype), dc_last
    for t in reversed(range(steps)):
        dxs[t], (dh_carry, dc_carry) = cell.backward(dhs[t] + dh_carry, dc_carry)
    assert len(cell._caches) == 0

    txs, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (xs, h0, c0))
    t_state = (th0, tc0)
    loss = 0
    for t in range(steps):
        t_state = module(txs[t], t_state)
        assert_close(hs[t], t_state[0], dtype, what=f"h at step {t}")
        loss = loss + (t_state[0] * torch.from_numpy(dhs[t])).sum()
    loss = loss + (t_state[1] * torch.from_numpy(dc_last)).sum()
    loss.backward()

    assert_close(state[1], t_state[1], dtype, what="c at the last step")
    assert_close(np.stack(dxs), txs.grad, dtype, what="dx of every step")
    assert_close(dh_carry, th0.grad, dtype, what="dh0")
    assert_close(dc_carry, tc0.grad, dtype, what="dc0")
    for name, p in module.named_parameters():
        assert_close(cell.grads[name], p.grad, dtype, what=name)


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@biases
def test_cell_from_torch(rng, torch_dtype, bias):
    torch.manual_seed(0)
    module = torch.nn.LSTMCell(I, H, bias=bias, dtype=torch_dtype)
    cell = fl.LSTMCell.from_torch(module)
    dtype = np.dtype(str(torch_dtype).removeprefix("torch."))
    assert (cell.input_size, cell.hidden_size, cell.bias, cell.dtype) == (I, H, bias, dtype)
    assert cell.peephole is None
    named = dict(module.named_parameters())
    assert list(cell.params) == list(named)
    for name, p in named.items():
        np.testing.assert_array_equal(cell.params[name], p.detach().numpy(), err_msg=name)
    x = rng.standard_normal((B, I)).astype(dtype)
    h, c = cell(x)
    with torch.no_grad():
        t_h, t_c = module(torch.from_numpy(x))
    assert_close(h, t_h, dtype, what="h")
    assert_close(c, t_c, dtype, what="c")
    with torch.no_grad():  # copies, not views
        for p in module.parameters():
            p.add_(1.0)
    for name, p in named.items():
        assert not np.array_equal(cell.params[name], p.detach().numpy()), name


def test_cell_params_init_and_eval(rng):
    cell = fl.LSTMCell(I, H, dtype=np.float64, seed=4)
    bound = 1 / np.sqrt(H)
    for value in cell.params.values():
        assert np.all(np.abs(value) <= bound)
    same = fl.LSTMCell(I, H, dtype=np.float64, seed=4)
    for name, value in cell.params.items():
        np.testing.assert_array_equal(same.params[name], value)
    x = rng.standard_normal((B, I))
    h_train, c_train = cell(x)
    cell.eval()
    h_eval, c_eval = cell(x)
    np.testing.assert_array_equal(h_eval, h_train)
    np.testing.assert_array_equal(c_eval, c_train)
    assert len(cell._caches) == 0
    with pytest.raises(RuntimeError, match="needs a forward call made in training mode"):
        cell.backward(np.ones((B, H)))


BAD_CELL_CALLS = {
    "x-size": (ValueError, rf"x: expected shape \(B, {I}\) or \({I},\), got \({B}, {I + 1}\)",
               lambda c: c(np.zeros((B, I + 1)))),
    "x-rank-3": (ValueError, rf"x: expected shape \(B, {I}\) or \({I},\), got \(1, {B}, {I}\)",
                 lambda c: c(np.zeros((1, B, I)))),
    "x-empty-batch": (ValueError, rf"x: expected at least one row, got shape \(0, {I}\)",
                      lambda c: c(np.zeros((0, I)))),
    "x-strings": (TypeError, r"x must be an array of real numbers.*got dtype <U1",
                  lambda c: c(np.full((B, I), "a"))),
    "h-shape": (ValueError, rf"h: expected shape \({B}, {H}\).*got \({B}, {H + 1}\)",
                lambda c: c(np.zeros((B, I)), (np.zeros((B, H + 1)), np.zeros((B, H))))),
    "c-unbatched-shape": (ValueError, rf"c: expected shape \({H},\).*got \(1, {H}\)",
                          lambda c: c(np.zeros(I), (np.zeros(H), np.zeros((1, H))))),
    "state-not-pair": (TypeError, r"state must be a tuple \(h, c\), got ndarray",
                       lambda c: c(np.zeros((B, I)), np.zeros((B, H)))),
    "dh-shape": (ValueError, rf"dh: expected shape \({B}, {H}\).*got \({H},\)",
                 lambda c: c.backward(np.zeros(H))),
    "dc-shape": (ValueError, rf"dc: expected shape \({B}, {H}\).*got \({B}, 1\)",
                 lambda c: c.backward(np.zeros((B, H)), np.zeros((B, 1)))),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CELL_CALLS))
def test_cell_bad_call_raises_and_changes_nothing(rng, case):
    error, message, call = BAD_CELL_CALLS[case]
    cell = fl.LSTMCell(I, H, dtype=np.float64, seed=5)
    x = rng.standard_normal((B, I))
    cell(x)
    cell.backward(np.ones((B, H)))
    cell(x)  # one pending cache
    params = cell.state_dict()
    grads = {k: v.copy() for k, v in cell.grads.items()}
    with pytest.raises(error, match=message):
        call(cell)
    assert len(cell._caches) == 1
    for name in params:
        np.testing.assert_array_equal(cell.params[name], params[name])
        np.testing.assert_array_equal(cell.grads[name], grads[name])
    cell.backward(np.ones((B, H)))
    np.testing.assert_allclose(cell.grads["bias_ih"], 2 * grads["bias_ih"])
