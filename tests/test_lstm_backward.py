"""fl.LSTM.backward: every gradient vs torch autograd, accumulation, LIFO caches, refusals, dropout.

The gradients are those of the fake loss (out*dout).sum() + (h_n*dh_n).sum() + (c_n*dc_n).sum(),
so (dout, dh_n, dc_n) are the upstream gradients handed to ``backward``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_lstm_forward import (
    LENGTHS,
    B,
    H,
    I,
    P,
    T,
    padding_mask,
    random_state,
    reference_run,
    to_layout,
    torch_run,
    torch_twin,
)
from utils import assert_close

import fastlstm as fl
from fastlstm import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
directions = pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
layouts = pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
states = pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
lengths_cases = pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
projections = pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", "proj"])


def fake_loss(out, h_n, c_n, dout, dh_n, dc_n):
    """The scalar whose gradient wrt (out, h_n, c_n) is (dout, dh_n, dc_n)."""
    return (out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()


def upstream(rng, model, batch=B, lengths=None):
    """Random (dout, dh_n, dc_n) in the model's layouts; dout is NaN at padded steps."""
    D = 2 if model.bidirectional else 1
    dout = rng.standard_normal((T, batch, D * (model.proj_size or model.hidden_size)))
    if lengths is not None:
        dout[padding_mask(lengths, T)] = np.nan  # must be ignored
    dh_n, dc_n = random_state(rng, model, batch, dtype=np.float64)
    return to_layout(dout.astype(model.dtype), model.batch_first), dh_n, dc_n


def check_backward_against_torch(rng, model, lengths, with_state, *, batched=True):
    """Every gradient of the fake loss, fastlstm vs torch autograd, in the model's dtype."""
    dtype = model.dtype
    module = torch_twin(model)
    if batched:
        x = to_layout(rng.standard_normal((T, B, I)).astype(dtype), model.batch_first)
        h0, c0 = random_state(rng, model)
        dout, dh_n, dc_n = upstream(rng, model, lengths=lengths)
        dh_n, dc_n = dh_n.astype(dtype), dc_n.astype(dtype)
    else:
        x = rng.standard_normal((T, I)).astype(dtype)
        h0, c0 = random_state(rng, model, batch=None)
        D = 2 if model.bidirectional else 1
        dout = rng.standard_normal((T, D * (model.proj_size or H))).astype(dtype)
        dh_n, dc_n = random_state(rng, model, batch=None)
    if not with_state:  # torch gets explicit zeros so that dh0, dc0 are compared too
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)

    out, (h_n, c_n) = model(x, (h0, c0) if with_state else None, lengths)
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)
    assert len(model._caches) == 0

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_out, (t_h, t_c) = torch_run(module, tx, (th0, tc0), lengths)
    # torch's outputs at padded steps are constants (zeros): any finite dout there is ignored.
    t_dout = torch.from_numpy(np.nan_to_num(dout, nan=0.0))
    fake_loss(t_out, t_h, t_c, t_dout, torch.from_numpy(dh_n), torch.from_numpy(dc_n)).backward()

    assert_close(out, t_out, dtype, what="out")
    for name, got, want in [("dx", dx, tx), ("dh0", dh0, th0), ("dc0", dc0, tc0)]:
        assert_close(got, want.grad, dtype, what=name)
    named = dict(module.named_parameters())
    assert list(model.grads) == list(named)
    for name, p in named.items():
        assert_close(model.grads[name], p.grad, dtype, what=name)


@pytest.mark.parametrize("num_layers", [1, 2, 3], ids=["L1", "L2", "L3"])
@directions
@layouts
@lengths_cases
@states
@projections
def test_backward_matches_torch_f64(
    rng, num_layers, bidirectional, batch_first, lengths, with_state, proj_size
):
    model = fl.LSTM(
        I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first,
        proj_size=proj_size, dtype=np.float64, seed=20,
    )  # fmt: skip
    check_backward_against_torch(rng, model, lengths, with_state)


@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@directions
@layouts
@lengths_cases
@projections
def test_backward_matches_torch_f32(
    rng, num_layers, bidirectional, batch_first, lengths, proj_size
):
    model = fl.LSTM(
        I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first,
        proj_size=proj_size, dtype=np.float32, seed=21,
    )  # fmt: skip
    check_backward_against_torch(rng, model, lengths, True)


@dtypes
def test_backward_without_bias_matches_torch(rng, dtype):
    model = fl.LSTM(I, H, 2, bias=False, bidirectional=True, proj_size=P, dtype=dtype, seed=22)
    check_backward_against_torch(rng, model, LENGTHS, False)


@dtypes
@directions
@projections
@states
def test_unbatched_backward_matches_torch(rng, dtype, bidirectional, proj_size, with_state):
    model = fl.LSTM(I, H, 2, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype, seed=23)
    check_backward_against_torch(rng, model, None, with_state, batched=False)


# ----------------------------------------------------------------------------------------------
# Accumulation and the LIFO cache
# ----------------------------------------------------------------------------------------------


def one_pair(model, x, state, lengths, upstream_grads):
    """zero_grad, forward, backward: (dx, dh0, dc0) and a copy of the grads."""
    model.zero_grad()
    model(x, state, lengths)
    dx, (dh0, dc0) = model.backward(*upstream_grads)
    return (dx, dh0, dc0), {name: value.copy() for name, value in model.grads.items()}


def inputs(rng, model, lengths):
    x = rng.standard_normal((T, B, I)).astype(model.dtype)
    return x, random_state(rng, model), lengths, upstream(rng, model, lengths=lengths)


@dtypes
def test_grads_accumulate_until_zero_grad(rng, dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=24)
    first = inputs(rng, model, LENGTHS)
    second = inputs(rng, model, None)
    _, grads1 = one_pair(model, *first)
    _, grads2 = one_pair(model, *second)

    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())
    for x, state, lengths, up in (first, second):
        model(x, state, lengths)
        model.backward(*up)
    for name, value in model.grads.items():
        assert_close(value, grads1[name] + grads2[name], dtype, what=name)
        assert np.abs(grads2[name]).max() > 0, name  # each call really contributes

    # The same forward/backward twice doubles every gradient.
    model.zero_grad()
    for _ in range(2):
        model(first[0], first[1], first[2])
        model.backward(*first[3])
    for name, value in model.grads.items():
        assert_close(value, 2 * grads1[name], dtype, what=name)

    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())


@dtypes
def test_backward_is_last_in_first_out(rng, dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=25)
    first = inputs(rng, model, LENGTHS)
    second = inputs(rng, model, np.array([5, 2, 0, 4]))
    (dx1, dh01, dc01), grads1 = one_pair(model, *first)
    (dx2, dh02, dc02), grads2 = one_pair(model, *second)

    model.zero_grad()
    model(*first[:3])
    model(*second[:3])
    assert len(model._caches) == 2
    got2 = model.backward(*second[3])  # the most recent forward first
    got1 = model.backward(*first[3])
    assert len(model._caches) == 0
    for got, (dx, dh0, dc0) in [(got1, (dx1, dh01, dc01)), (got2, (dx2, dh02, dc02))]:
        np.testing.assert_array_equal(got[0], dx)
        np.testing.assert_array_equal(got[1][0], dh0)
        np.testing.assert_array_equal(got[1][1], dc0)
    for name, value in model.grads.items():
        assert_close(value, grads1[name] + grads2[name], dtype, what=name)


def test_cache_does_not_see_later_edits_of_the_inputs(rng):
    model = fl.LSTM(I, H, 2, bidirectional=True, dtype=np.float64, seed=26)
    for lengths in (None, LENGTHS):
        x, state, _, up = inputs(rng, model, lengths)
        expected = one_pair(model, x, state, lengths, up)
        model.zero_grad()
        model(x, state, lengths)
        x[...] = 7.0  # the caller reuses its buffers before calling backward
        state[0][...] = 7.0
        state[1][...] = 7.0
        dx, (dh0, dc0) = model.backward(*up)
        np.testing.assert_array_equal(dx, expected[0][0])
        np.testing.assert_array_equal(dh0, expected[0][1])
        np.testing.assert_array_equal(dc0, expected[0][2])
        for name, value in model.grads.items():
            np.testing.assert_array_equal(value, expected[1][name], err_msg=name)


def test_dh0_dc0_are_returned_without_a_state(rng):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=np.float64, seed=27)
    x, _, _, up = inputs(rng, model, LENGTHS)
    model(x, None, LENGTHS)
    dx, (dh0, dc0) = model.backward(*up)
    zeros = tuple(np.zeros_like(s) for s in random_state(rng, model))
    model(x, zeros, LENGTHS)
    dx_z, (dh0_z, dc0_z) = model.backward(*up)
    assert dh0.shape == (4, B, P) and dc0.shape == (4, B, H)
    np.testing.assert_array_equal(dh0, dh0_z)
    np.testing.assert_array_equal(dc0, dc0_z)
    np.testing.assert_array_equal(dx, dx_z)
    assert np.abs(dh0).max() > 0 and np.abs(dc0).max() > 0


def test_dh_n_dc_n_default_to_zero(rng):
    model = fl.LSTM(I, H, 2, bidirectional=True, dtype=np.float64, seed=28)
    x, state, _, (dout, dh_n, dc_n) = inputs(rng, model, LENGTHS)
    _, grads = one_pair(model, x, state, LENGTHS, (dout, np.zeros_like(dh_n), np.zeros_like(dc_n)))
    model.zero_grad()
    model(x, state, LENGTHS)
    model.backward(dout)
    for name, value in model.grads.items():
        np.testing.assert_array_equal(value, grads[name], err_msg=name)


NO_CACHE_CASES = ["fresh", "eval-forward", "after-zero_grad", "after-eval", "already-consumed"]


@pytest.mark.parametrize("case", NO_CACHE_CASES)
def test_backward_without_cache_raises(rng, case):
    model = fl.LSTM(I, H, 2, dtype=np.float64, seed=29)
    x, state, _, up = inputs(rng, model, None)
    if case == "eval-forward":
        model.eval()
        model(x, state)
    elif case == "after-zero_grad":
        model(x, state)
        model.zero_grad()
    elif case == "after-eval":
        model(x, state)
        model.eval()
        model.train()
    elif case == "already-consumed":
        model(x, state)
        model.backward(*up)
    grads = {name: value.copy() for name, value in model.grads.items()}
    with pytest.raises(RuntimeError, match="needs a forward call made in training mode"):
        model.backward(*up)
    for name, value in model.grads.items():
        np.testing.assert_array_equal(value, grads[name], err_msg=name)


BAD_UPSTREAM = {
    "dout-short-T": lambda d, h, c: (d[:-1], h, c),
    "dout-wide": lambda d, h, c: (np.concatenate([d, d], axis=-1), h, c),
    "dout-unbatched": lambda d, h, c: (d[:, 0], h, c),
    "dh_n-shape": lambda d, h, c: (d, h[:-1], c),
    "dc_n-shape": lambda d, h, c: (d, h, c[..., :-1]),
}


@pytest.mark.parametrize("case", list(BAD_UPSTREAM))
def test_bad_upstream_shape_raises_and_keeps_the_cache(rng, case):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=np.float64, seed=30)
    x, state, lengths, up = inputs(rng, model, LENGTHS)
    expected = one_pair(model, x, state, lengths, up)
    model.zero_grad()
    model(x, state, lengths)
    bad = BAD_UPSTREAM[case](*up)
    name = case.split("-")[0]
    given = next(np.shape(b) for b, u in zip(bad, up, strict=True) if np.shape(b) != np.shape(u))
    wanted = next(np.shape(u) for b, u in zip(bad, up, strict=True) if np.shape(b) != np.shape(u))
    message = rf"{name}: expected shape {re.escape(str(wanted))}.*got {re.escape(str(given))}"
    with pytest.raises(ValueError, match=message):
        model.backward(*bad)
    assert len(model._caches) == 1
    assert all(not g.any() for g in model.grads.values())
    dx, (dh0, dc0) = model.backward(*up)  # the cache is still there and intact
    np.testing.assert_array_equal(dx, expected[0][0])
    np.testing.assert_array_equal(dh0, expected[0][1])
    np.testing.assert_array_equal(dc0, expected[0][2])
    for pname, value in model.grads.items():
        np.testing.assert_array_equal(value, expected[1][pname], err_msg=pname)


@pytest.mark.parametrize("value", ["text", "complex"])
def test_non_numeric_dout_raises_and_keeps_the_cache(rng, value):
    model = fl.LSTM(I, H, 1, dtype=np.float64, seed=31)
    x, state, _, (dout, dh_n, dc_n) = inputs(rng, model, None)
    model(x, state)
    bad = np.full(dout.shape, "a") if value == "text" else dout.astype(np.complex128)
    with pytest.raises(TypeError, match=r"dout must be an array of real numbers.*got dtype"):
        model.backward(bad)
    assert len(model._caches) == 1
    model.backward(dout, dh_n, dc_n)
    assert len(model._caches) == 0


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


def dropout_model(dtype=np.float64, seed=40, **options):
    options = {"bidirectional": True, "proj_size": P} | options
    return fl.LSTM(I, H, 2, dropout=0.5, dtype=dtype, seed=seed, **options)


@dtypes
def test_dropout_changes_training_output_not_eval_output(rng, dtype):
    model = dropout_model(dtype)
    plain = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    x = rng.standard_normal((T, B, I)).astype(dtype)
    train_out, _ = model(x)
    train_again, _ = model(x)  # a new mask each forward
    model.eval()
    eval_out, (h_n, c_n) = model(x)
    plain.eval()
    plain_out, (plain_h, plain_c) = plain(x)
    assert not np.allclose(train_out, eval_out)
    assert not np.allclose(train_again, train_out)
    # Eval mode applies no dropout at all: exactly the model without dropout.
    np.testing.assert_array_equal(eval_out, plain_out)
    np.testing.assert_array_equal(h_n, plain_h)
    np.testing.assert_array_equal(c_n, plain_c)
    np.testing.assert_array_equal(model(x)[0], eval_out)


def test_dropout_is_reproducible_from_the_seed(rng):
    x = rng.standard_normal((T, B, I))
    first, second, other = dropout_model(seed=41), dropout_model(seed=41), dropout_model(seed=42)
    for _ in range(2):
        out1, (h1, c1) = first(x, None, LENGTHS)
        out2, (h2, c2) = second(x, None, LENGTHS)
        np.testing.assert_array_equal(out1, out2)
        np.testing.assert_array_equal(h1, h2)
        np.testing.assert_array_equal(c1, c2)
    other.load_state_dict(first.state_dict())
    assert not np.allclose(other(x, None, LENGTHS)[0], out1)


@dtypes
@lengths_cases
@pytest.mark.parametrize("num_layers", [2, 3], ids=["L2", "L3"])
def test_dropout_backward_matches_reference_with_the_same_masks(rng, dtype, lengths, num_layers):
    model = fl.LSTM(
        I, H, num_layers, dropout=0.5, bidirectional=True, proj_size=P, dtype=dtype, seed=43
    )
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(rng, model)
    dout, dh_n, dc_n = upstream(rng, model, lengths=lengths)
    out, (h_n, c_n) = model(x, state, lengths)
    masks = [layer.mask for layer in model._caches[-1].layers[:-1]]
    assert len(masks) == num_layers - 1 and model._caches[-1].layers[-1].mask is None
    for mask in masks:
        assert mask.shape == (T, B, 2 * P)
        assert set(np.unique(mask)) == {0.0, 2.0}  # inverted dropout, p = 0.5
        assert 0.25 < np.mean(mask == 0) < 0.75
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)

    r_out, (r_h, r_c), cache = reference_run(model, x, state, lengths, masks=masks)
    r_dx, (r_dh0, r_dc0), r_grads = ref.lstm_backward(dout, dh_n, dc_n, cache)
    assert_close(out, r_out, dtype, what="out")
    assert_close(h_n, r_h, dtype, what="h_n")
    assert_close(c_n, r_c, dtype, what="c_n")
    assert_close(dx, r_dx, dtype, what="dx")
    assert_close(dh0, r_dh0, dtype, what="dh0")
    assert_close(dc0, r_dc0, dtype, what="dc0")
    for name, value in model.grads.items():
        assert_close(value, r_grads[name], dtype, what=name)


def test_reused_workspace_arrays_give_the_numbers_of_fresh_ones(rng):
    """Large scratch arrays (packed weights, training caches) are reused across calls. With
    every free array poisoned with NaN before reuse, two models (partly filled panel
    vectors: H = 61, P = 29) interleaved with LIFO backwards give exactly what each gives
    with an empty workspace, and the free lists stay bounded."""
    from fastlstm import _engine

    models = [fl.LSTM(40, 64, seed=1), fl.LSTM(40, 61, 2, proj_size=29, seed=2)]
    xs = [rng.standard_normal((7, 24, 40)).astype(np.float32) for _ in range(2)]

    def step(model, x):
        model.zero_grad()
        out, _ = model(x)
        dx = model.backward(np.ones_like(out))[0]
        return [out, dx, *(g.copy() for g in model.grads.values())]

    fresh = []
    for model, x in zip(models, xs, strict=True):
        _engine._local.free = None  # an empty workspace
        fresh.append(step(model, x))
    for _ in range(2):
        outs = [model(x)[0] for model, x in zip(models, xs, strict=True)]
        for model, out in zip(reversed(models), reversed(outs), strict=True):
            model.backward(np.zeros_like(out))  # pops each cache, gives its arrays back
        for stack in _engine._free_lists().values():
            for array in stack:
                array.fill(np.nan)
        for model, x, expected in zip(models, xs, fresh, strict=True):
            for got, want in zip(step(model, x), expected, strict=True):
                np.testing.assert_array_equal(got, want)
    free = _engine._free_lists()
    assert 0 < len(free) <= _engine._KEEP_SHAPES
    assert all(len(stack) <= _engine._KEEP_PER_SHAPE for stack in free.values())


@dtypes
@directions
@pytest.mark.parametrize("width, hidden", [(8, 32), (256, 256)], ids=["narrow-x", "wide"])
def test_weight_gradients_over_many_rows_match_torch(rng, dtype, bidirectional, width, hidden):
    """T*B >= MERGED_GRADIENT_MIN_ROWS with 4H(I+P) > SMALL_ROW_MACS, with lengths, against
    torch autograd: with a narrow x each gate's dW_ih and dW_hh come from one GEMM over
    [x | h_{t-1}]; with x and h both wide, from two GEMMs accumulating in place."""
    from fastlstm._config import MERGED_GRADIENT_MIN_ROWS, MERGED_GRADIENT_NARROW, SMALL_ROW_MACS

    steps, batch = 32, 32
    assert steps * batch >= MERGED_GRADIENT_MIN_ROWS
    assert 4 * hidden * (width + hidden) > SMALL_ROW_MACS
    assert (min(width, hidden) < MERGED_GRADIENT_NARROW) == (width == 8)
    model = fl.LSTM(width, hidden, bidirectional=bidirectional, dtype=dtype, seed=21)
    module = torch_twin(model)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((steps, batch, width)).astype(dtype)
    lengths = rng.integers(1, steps + 1, batch)
    dout = rng.standard_normal((steps, batch, D * hidden)).astype(dtype)
    dout[np.arange(steps)[:, None] >= lengths[None, :]] = 0  # torch's padding carries none
    out, _ = model(x, lengths=lengths)
    dx, _ = model.backward(dout)
    tx = torch.tensor(x, requires_grad=True)
    zeros = torch.zeros((D, batch, hidden), dtype=tx.dtype)
    t_out, _ = torch_run(module, tx, (zeros, zeros), lengths)
    (t_out * torch.tensor(dout)).sum().backward()
    assert_close(out, t_out, dtype, what="out")
    assert_close(dx, tx.grad, dtype, what="dx")
    for name, param in module.named_parameters():
        assert_close(model.grads[name], param.grad, dtype, what=name)
