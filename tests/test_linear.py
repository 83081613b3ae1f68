"""Linear: forward/backward vs torch.nn.Linear autograd, init, caches, bad input, state dicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from utils import assert_close

from fastlstm.linear import Linear

DTYPES = [np.float32, np.float64]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
IN, OUT = 7, 5


def torch_twin(head: Linear) -> torch.nn.Linear:
    """A torch.nn.Linear with the same configuration and weights as ``head``."""
    layer = torch.nn.Linear(
        head.in_features, head.out_features, bias=head.bias, dtype=TORCH_DTYPES[head.dtype.type]
    )
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in head.state_dict().items()})
    return layer


def snapshot(head: Linear):
    return head.state_dict(), {k: v.copy() for k, v in head.grads.items()}, len(head._caches)


def assert_unchanged(head: Linear, before) -> None:
    params, grads, n_caches = before
    for name in params:
        np.testing.assert_array_equal(head.params[name], params[name])
        np.testing.assert_array_equal(head.grads[name], grads[name])
    assert len(head._caches) == n_caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (4,), (3, 2)], ids=lambda s: f"lead={s}")
@pytest.mark.parametrize("bias", [True, False], ids=lambda b: f"bias={b}")
def test_forward_backward_match_torch(rng, dtype, lead, bias):
    head = Linear(IN, OUT, bias=bias, dtype=dtype, seed=1)
    layer = torch_twin(head)
    x = rng.normal(size=(*lead, IN)).astype(dtype)
    dy = rng.normal(size=(*lead, OUT)).astype(dtype)

    y = head(x)
    dx = head.backward(dy)

    x_t = torch.from_numpy(x.copy()).requires_grad_()
    y_t = layer(x_t)
    (y_t * torch.from_numpy(dy)).sum().backward()  # fake loss whose gradient is dy
    assert_close(y, y_t, dtype, what="y")
    assert_close(dx, x_t.grad, dtype, what="dx")
    assert_close(head.grads["weight"], layer.weight.grad, dtype, what="dweight")
    if bias:
        assert_close(head.grads["bias"], layer.bias.grad, dtype, what="dbias")
    else:
        assert list(head.params) == ["weight"] and list(head.grads) == ["weight"]


def test_forward_is_call_and_eval_gives_same_numbers(rng):
    head = Linear(IN, OUT, seed=0)
    x = rng.normal(size=(2, IN))
    y_train = head.forward(x)
    head.eval()
    np.testing.assert_array_equal(head(x), y_train)


def test_empty_leading_axis(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    y = head(np.zeros((0, 3, IN)))
    assert y.shape == (0, 3, OUT)
    dx = head.backward(np.zeros((0, 3, OUT)))
    assert dx.shape == (0, 3, IN)
    assert not head.grads["weight"].any() and not head.grads["bias"].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_reproducible_bounded_and_drawn_as_documented(dtype):
    in_features, out_features, seed = 9, 4, 123
    head = Linear(in_features, out_features, dtype=dtype, seed=seed)
    again = Linear(in_features, out_features, dtype=dtype, seed=seed)
    other = Linear(in_features, out_features, dtype=dtype, seed=seed + 1)
    k = 1 / math.sqrt(in_features)
    for name in ("weight", "bias"):
        assert head.params[name].dtype == dtype
        np.testing.assert_array_equal(head.params[name], again.params[name])
        assert not np.array_equal(head.params[name], other.params[name])
        assert np.all(np.abs(head.params[name]) <= k)
    # weight first, then bias, from default_rng(seed) in float64, rounded to dtype
    draw = np.random.default_rng(seed)
    expected_weight = draw.uniform(-k, k, size=(out_features, in_features))
    expected_bias = draw.uniform(-k, k, size=out_features)
    np.testing.assert_array_equal(head.params["weight"], expected_weight.astype(dtype))
    np.testing.assert_array_equal(head.params["bias"], expected_bias.astype(dtype))
    assert head.params["weight"].shape == (out_features, in_features)


def test_init_spread_uses_the_whole_interval():
    head = Linear(100, 50, seed=0)
    k = 1 / math.sqrt(100)
    weight = head.params["weight"]
    assert weight.min() < -0.95 * k and weight.max() > 0.95 * k


def test_params_are_views_of_the_flat_buffer(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    x = rng.normal(size=(3, IN))
    head.params["weight"][...] = 0.0
    head.params["bias"][...] = 2.0
    np.testing.assert_array_equal(head(x), np.full((3, OUT), 2.0))
    assert np.shares_memory(head.params["weight"], head._flat_params)
    assert np.shares_memory(head.grads["bias"], head._flat_grads)


def test_grads_accumulate_until_zero_grad(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    x1, x2 = rng.normal(size=(2, 3, IN))
    dy1, dy2 = rng.normal(size=(2, 3, OUT))
    head(x1)
    head.backward(dy1)
    head(x2)
    head.backward(dy2)
    assert_close(head.grads["weight"], dy1.T @ x1 + dy2.T @ x2, what="dweight")
    assert_close(head.grads["bias"], dy1.sum(0) + dy2.sum(0), what="dbias")
    head.zero_grad()
    assert not head._flat_grads.any()


def test_backward_is_lifo(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    x1 = rng.normal(size=(2, IN))
    x2 = rng.normal(size=(4, 3, IN))  # a different shape, so a mix-up would show
    head(x1)
    head(x2)
    dy2 = rng.normal(size=(4, 3, OUT))
    dx2 = head.backward(dy2)
    assert dx2.shape == x2.shape
    assert_close(head.grads["weight"], dy2.reshape(-1, OUT).T @ x2.reshape(-1, IN))
    dy1 = rng.normal(size=(2, OUT))
    dx1 = head.backward(dy1)
    assert dx1.shape == x1.shape
    assert_close(dx1, dy1 @ head.params["weight"], what="dx1")
    with pytest.raises(RuntimeError, match="backward"):
        head.backward(dy1)


def test_cache_is_a_private_copy(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    x = rng.normal(size=(3, IN))
    original = x.copy()
    head(x)
    x[...] = 0.0  # the caller reuses its buffer before backward
    dy = rng.normal(size=(3, OUT))
    head.backward(dy)
    assert_close(head.grads["weight"], dy.T @ original)


def test_no_cache_raises_runtime_error(rng):
    head = Linear(IN, OUT, seed=0)
    with pytest.raises(RuntimeError, match="training mode"):
        head.backward(np.zeros(OUT))


def test_eval_keeps_no_cache_and_drops_pending_ones(rng):
    head = Linear(IN, OUT, seed=0)
    head(rng.normal(size=IN))
    head.eval()
    assert not head.training and head._caches == []
    head(rng.normal(size=IN))
    assert head._caches == []
    with pytest.raises(RuntimeError):
        head.backward(np.zeros(OUT))
    head.train()
    head(rng.normal(size=IN))
    head.zero_grad()  # also drops unconsumed caches
    with pytest.raises(RuntimeError):
        head.backward(np.zeros(OUT))


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_likes_are_converted(dtype):
    head = Linear(3, 2, dtype=dtype, seed=0)
    weight, bias = head.params["weight"], head.params["bias"]
    expected = np.array([[1, 2, 3]], dtype=dtype) @ weight.T + bias
    for x in ([[1, 2, 3]], np.array([[1, 2, 3]]), torch.tensor([[1.0, 2.0, 3.0]])):
        y = head(x)
        assert y.dtype == dtype
        assert_close(y, expected, dtype)
    head.eval()
    # a read-only, non-contiguous input in the other dtype
    x = np.arange(12, dtype=np.float64 if dtype == np.float32 else np.float32)
    x = x.reshape(2, 6)[:, ::2]
    x.flags.writeable = False
    assert_close(head(x), x.astype(dtype) @ weight.T + bias, dtype)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.zeros((2, IN + 1)), ValueError, rf"\(\.\.\., {IN}\).*\(2, {IN + 1}\)"),
        (np.zeros((IN, 1)), ValueError, rf"\({IN}, 1\)"),
        (np.float64(1.0), ValueError, r"\(\)"),
        (np.array(["a"] * IN), TypeError, "real numbers"),
        (np.zeros(IN, dtype=complex), TypeError, "real numbers"),
        (None, TypeError, "real numbers"),
    ],
    ids=["last-dim", "transposed", "scalar", "strings", "complex", "none"],
)
def test_bad_input_is_refused_without_side_effects(rng, x, error, match):
    head = Linear(IN, OUT, seed=0)
    head(rng.normal(size=IN))  # one pending cache that must survive
    before = snapshot(head)
    with pytest.raises(error, match=match):
        head(x)
    assert_unchanged(head, before)


@pytest.mark.parametrize(
    ("dy", "error", "match"),
    [
        (np.zeros((3, OUT)), ValueError, rf"\(2, {OUT}\).*\(3, {OUT}\)"),
        (np.zeros((2, OUT, 1)), ValueError, "shape"),
        (np.array([["x"] * OUT] * 2), TypeError, "real numbers"),
    ],
    ids=["batch", "rank", "strings"],
)
def test_bad_dy_is_refused_and_keeps_the_cache(rng, dy, error, match):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    x = rng.normal(size=(2, IN))
    head(x)
    before = snapshot(head)
    with pytest.raises(error, match=match):
        head.backward(dy)
    assert_unchanged(head, before)
    good = rng.normal(size=(2, OUT))
    head.backward(good)  # the cache is still there
    assert_close(head.grads["weight"], good.T @ x)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"in_features": 0}, ValueError),
        ({"out_features": -1}, ValueError),
        ({"in_features": 2.0}, TypeError),
        ({"dtype": np.int32}, TypeError),
        ({"dtype": np.float16}, TypeError),
        ({"bias": "yes"}, TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    args = {"in_features": IN, "out_features": OUT, **kwargs}
    in_features, out_features = args.pop("in_features"), args.pop("out_features")
    with pytest.raises(error):
        Linear(in_features, out_features, **args)


def test_repr():
    assert repr(Linear(3, 2, bias=False, dtype=np.float64)) == (
        "Linear(in_features=3, out_features=2, bias=False, dtype=float64)"
    )


def test_state_dict_round_trip_and_torch_tensors(rng):
    head = Linear(IN, OUT, dtype=np.float64, seed=0)
    state = head.state_dict()
    assert list(state) == ["weight", "bias"]
    state["weight"][...] = 0.0  # copies: editing them leaves the layer alone
    assert head.params["weight"].any()

    layer = torch.nn.Linear(IN, OUT, dtype=torch.float64)
    head.load_state_dict(layer.state_dict())  # torch tensors
    x = rng.normal(size=(3, IN))
    assert_close(head(x), layer(torch.from_numpy(x)))

    other = Linear(IN, OUT, dtype=np.float64, seed=5)
    other.load_state_dict(head.state_dict())
    for name in head.params:
        np.testing.assert_array_equal(other.params[name], head.params[name])
    assert np.shares_memory(other.params["weight"], other._flat_params)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda s: s.pop("bias"), KeyError, "missing keys \\['bias'\\]"),
        (lambda s: s.update(extra=np.zeros(1)), KeyError, "unexpected keys \\['extra'\\]"),
        (lambda s: s.update(weight=np.zeros((IN, OUT))), ValueError, "weight"),
        (lambda s: s.update(bias=torch.zeros(OUT + 1)), ValueError, "bias"),
        (lambda s: s.update(bias=np.array(["a"] * OUT)), TypeError, "bias"),
    ],
    ids=["missing", "unexpected", "weight-shape", "bias-shape-torch", "non-numeric"],
)
def test_load_state_dict_errors_leave_the_layer_unchanged(change, error, match):
    head = Linear(IN, OUT, seed=0)
    state = Linear(IN, OUT, seed=1).state_dict()
    change(state)
    before = snapshot(head)
    with pytest.raises(error, match=match):
        head.load_state_dict(state)
    assert_unchanged(head, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=lambda b: f"bias={b}")
def test_save_and_load_round_trip(tmp_path, rng, dtype, bias):
    head = Linear(IN, OUT, bias=bias, dtype=dtype, seed=3)
    path = tmp_path / "head.npz"
    head.save(path)
    loaded = Linear.load(path)
    assert repr(loaded) == repr(head)
    for name in head.params:
        np.testing.assert_array_equal(loaded.params[name], head.params[name])
    x = rng.normal(size=(2, IN))
    np.testing.assert_array_equal(loaded(x), head(x))
