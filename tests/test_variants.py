"""Peephole variants through the public API: vs fastlstm.reference, vs finite differences, names
and init, and the seeds' CustomLSTMCell (peephole="full") written in torch, vs torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seed_cell import CustomLSTMCell
from test_lstm_forward import LENGTHS, B, H, I, P, T, random_state, reference_run
from utils import assert_close

import fastlstm as fl
from fastlstm import reference as ref

dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
peepholes = pytest.mark.parametrize("peephole", ["diagonal", "full"])
lengths_cases = pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
projections = pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", "proj"])
STACKS = {"L1-uni": (1, False), "L2-bi": (2, True), "L3-uni": (3, False)}
stacks = pytest.mark.parametrize("stack", list(STACKS))


def fake_loss(out, h_n, c_n, dout, dh_n, dc_n):
    return (out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()


def upstream(rng, model, batch=B, steps=T):
    D = 2 if model.bidirectional else 1
    dout = rng.standard_normal((steps, batch, D * (model.proj_size or model.hidden_size)))
    dh_n, dc_n = random_state(rng, model, batch, dtype=np.float64)
    return dout.astype(model.dtype), dh_n.astype(model.dtype), dc_n.astype(model.dtype)


# ----------------------------------------------------------------------------------------------
# vs fastlstm.reference
# ----------------------------------------------------------------------------------------------


@dtypes
@peepholes
@projections
@stacks
@lengths_cases
def test_peephole_matches_reference(rng, dtype, peephole, proj_size, stack, lengths):
    num_layers, bidirectional = STACKS[stack]
    model = fl.LSTM(
        I, H, num_layers, bidirectional=bidirectional, proj_size=proj_size, peephole=peephole,
        dtype=dtype, seed=1,
    )  # fmt: skip
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(rng, model)
    dout, dh_n, dc_n = upstream(rng, model)

    out, (h_n, c_n) = model(x, state, lengths)
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)
    r_out, (r_h, r_c), cache = reference_run(model, x, state, lengths)
    r_dx, (r_dh0, r_dc0), r_grads = ref.lstm_backward(dout, dh_n, dc_n, cache)

    assert_close(out, r_out, dtype, what="out")
    assert_close(h_n, r_h, dtype, what="h_n")
    assert_close(c_n, r_c, dtype, what="c_n")
    assert_close(dx, r_dx, dtype, what="dx")
    assert_close(dh0, r_dh0, dtype, what="dh0")
    assert_close(dc0, r_dc0, dtype, what="dc0")
    assert set(model.grads) == set(r_grads)
    for name, value in model.grads.items():
        assert_close(value, r_grads[name], dtype, what=name)


@dtypes
@peepholes
def test_peephole_without_bias_matches_reference(rng, dtype, peephole):
    model = fl.LSTM(
        I, H, 2, bias=False, bidirectional=True, proj_size=P, peephole=peephole, dtype=dtype,
        seed=2,
    )  # fmt: skip
    x = rng.standard_normal((B, T, I)).astype(dtype)
    out, (h_n, c_n) = model(x.transpose(1, 0, 2), None, LENGTHS)
    dout, dh_n, dc_n = upstream(rng, model)
    dx, _ = model.backward(dout, dh_n, dc_n)
    r_out, (r_h, r_c), cache = reference_run(model, x.transpose(1, 0, 2), None, LENGTHS)
    r_dx, _, r_grads = ref.lstm_backward(dout, dh_n, dc_n, cache)
    assert_close(out, r_out, dtype, what="out")
    assert_close(c_n, r_c, dtype, what="c_n")
    assert_close(dx, r_dx, dtype, what="dx")
    for name, value in model.grads.items():
        assert_close(value, r_grads[name], dtype, what=name)


@dtypes
@peepholes
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cell_peephole_matches_reference(rng, dtype, peephole, bias):
    cell = fl.LSTMCell(I, H, bias=bias, peephole=peephole, dtype=dtype, seed=3)
    x = rng.standard_normal((B, I)).astype(dtype)
    h0, c0, dh, dc = (rng.standard_normal((B, H)).astype(dtype) for _ in range(4))
    h, c = cell(x, (h0, c0))
    dx, (dh_prev, dc_prev) = cell.backward(dh, dc)
    params64 = {name: value.astype(np.float64) for name, value in cell.params.items()}
    r_h, r_c, cache = ref.cell_forward(x.astype(np.float64), params64, (h0, c0), peephole)
    r_dx, (r_dh, r_dc), r_grads = ref.cell_backward(dh, dc, cache)
    for name, got, want in [
        ("h", h, r_h), ("c", c, r_c), ("dx", dx, r_dx), ("dh_prev", dh_prev, r_dh),
        ("dc_prev", dc_prev, r_dc),
    ]:  # fmt: skip
        assert_close(got, want, dtype, what=name)
    assert set(cell.grads) == set(r_grads)
    for name, value in cell.grads.items():
        assert_close(value, r_grads[name], dtype, what=name)


# ----------------------------------------------------------------------------------------------
# vs central finite differences, float64, through the public API
# ----------------------------------------------------------------------------------------------

FD_EPS = 1e-6
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}
FD_T, FD_B, FD_I, FD_H = 3, 3, 2, 3
FD_LENGTHS = np.array([2, 0, 3])
FD_VARIANTS = {
    "diagonal": {"peephole": "diagonal"},
    "full": {"peephole": "full"},
    "full-no-bias": {"peephole": "full", "bias": False},
    "diagonal-L2-bi-proj-lengths": {
        "peephole": "diagonal", "num_layers": 2, "bidirectional": True, "proj_size": 2,
        "lengths": True,
    },
    "full-L2-bi-proj-lengths": {
        "peephole": "full", "num_layers": 2, "bidirectional": True, "proj_size": 2,
        "lengths": True,
    },
}  # fmt: skip


def numerical_grad(loss, array):
    """Central differences of ``loss()`` wrt every entry of ``array``, perturbed in place."""
    grad = np.zeros(array.shape)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + FD_EPS
        up = loss()
        array[index] = original - FD_EPS
        down = loss()
        array[index] = original
        grad[index] = (up - down) / (2 * FD_EPS)
    return grad


@pytest.mark.parametrize("variant", list(FD_VARIANTS))
def test_peephole_backward_matches_finite_differences(rng, variant):
    options = dict(FD_VARIANTS[variant])
    lengths = FD_LENGTHS if options.pop("lengths", False) else None
    model = fl.LSTM(FD_I, FD_H, dtype=np.float64, seed=4, **options)
    for value in model.params.values():  # larger weights than the init: a harder test
        value[...] = rng.uniform(-0.8, 0.8, value.shape)
    x = rng.standard_normal((FD_T, FD_B, FD_I))
    h0, c0 = random_state(rng, model, FD_B)
    dout, dh_n, dc_n = upstream(rng, model, FD_B, FD_T)

    model.train()
    model(x, (h0, c0), lengths)
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)
    model.eval()  # the perturbed forwards keep no cache

    def loss():
        out, (h_n, c_n) = model(x, (h0, c0), lengths)
        return fake_loss(out, h_n, c_n, dout, dh_n, dc_n)

    assert_close(dx, numerical_grad(loss, x), what="dx", **FD_TOL)
    assert_close(dh0, numerical_grad(loss, h0), what="dh0", **FD_TOL)
    assert_close(dc0, numerical_grad(loss, c0), what="dc0", **FD_TOL)
    for name, value in model.params.items():
        assert_close(model.grads[name], numerical_grad(loss, value), what=name, **FD_TOL)
        assert np.abs(model.grads[name]).max() > 0, name


# ----------------------------------------------------------------------------------------------
# Names, shapes, init
# ----------------------------------------------------------------------------------------------

NAME_CONFIGS = {
    "diagonal": ({"peephole": "diagonal"}),
    "diagonal-L2-bi-proj": (
        {"peephole": "diagonal", "num_layers": 2, "bidirectional": True, "proj_size": P}
    ),
    "full": ({"peephole": "full"}),
    "full-no-bias": ({"peephole": "full", "bias": False}),
    "full-L2-bi-proj-no-bias": (
        {"peephole": "full", "num_layers": 2, "bidirectional": True, "proj_size": P, "bias": False}
    ),
    "full-L2-bi": ({"peephole": "full", "num_layers": 2, "bidirectional": True}),
}


def expected_extras(options):
    """Peephole parameter names and shapes of a config, as the contract states them."""
    extras = {}
    for k in range(options.get("num_layers", 1)):
        for sfx in ("", "_reverse") if options.get("bidirectional") else ("",):
            if options["peephole"] == "diagonal":
                extras[f"peephole_l{k}{sfx}"] = (3, H)
            else:
                extras[f"weight_ch_l{k}{sfx}"] = (4 * H, H)
                if options.get("bias", True):
                    extras[f"bias_ch_l{k}{sfx}"] = (4 * H,)
    return extras


@pytest.mark.parametrize("config", list(NAME_CONFIGS))
def test_peephole_param_names_shapes_and_init(config):
    options = NAME_CONFIGS[config]
    model = fl.LSTM(I, H, seed=5, **options)
    plain_options = {k: v for k, v in options.items() if k != "peephole"}
    plain = fl.LSTM(I, H, seed=5, **plain_options)
    module = torch.nn.LSTM(I, H, **plain_options)

    extras = expected_extras(options)
    standard = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    shapes = {name: value.shape for name, value in model.params.items()}
    assert shapes == dict(standard) | extras
    assert [n for n in model.params if n not in extras] == [n for n, _ in standard]  # torch order
    assert {n: g.shape for n, g in model.grads.items()} == shapes
    # The standard parameters are drawn first: the same as a plain model with the same seed.
    for name, _ in standard:
        np.testing.assert_array_equal(model.params[name], plain.params[name], err_msg=name)
    bound = 1 / np.sqrt(H)
    for name in extras:
        value = model.params[name]
        assert np.all(np.abs(value) <= bound), name
        assert np.unique(value).size == value.size, name
    extra_values = np.concatenate([model.params[name].ravel() for name in extras])
    assert extra_values.min() < -0.8 * bound and extra_values.max() > 0.8 * bound


@pytest.mark.parametrize(
    ("peephole", "bias", "expected"),
    [
        ("diagonal", True, {"peephole": (3, H)}),
        ("diagonal", False, {"peephole": (3, H)}),
        ("full", True, {"weight_ch": (4 * H, H), "bias_ch": (4 * H,)}),
        ("full", False, {"weight_ch": (4 * H, H)}),
    ],
    ids=["diagonal", "diagonal-no-bias", "full", "full-no-bias"],
)
def test_cell_peephole_param_names(peephole, bias, expected):
    cell = fl.LSTMCell(I, H, bias=bias, peephole=peephole, seed=6)
    plain = fl.LSTMCell(I, H, bias=bias, seed=6)
    standard = {name: value.shape for name, value in plain.params.items()}
    assert {name: value.shape for name, value in cell.params.items()} == standard | expected
    assert [name for name in cell.params if name not in expected] == list(standard)
    for name in standard:
        np.testing.assert_array_equal(cell.params[name], plain.params[name], err_msg=name)
    with pytest.raises(ValueError, match=r"peephole must be one of .*got 'Full'"):
        fl.LSTMCell(I, H, peephole="Full")


# ----------------------------------------------------------------------------------------------
# The seeds' CustomLSTMCell, written in torch as in the seed
# ----------------------------------------------------------------------------------------------


def seed_cell():
    torch.manual_seed(0)
    return CustomLSTMCell(I, H)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_full_peephole_is_the_seed_custom_cell(rng, batched):
    torch_cell = seed_cell()
    cell = fl.LSTMCell(I, H, peephole="full", dtype=np.float64)
    cell.load_state_dict(torch_cell.fastlstm_params())
    x, h0, c0, dh, dc = (rng.standard_normal((B, n)) for n in (I, H, H, H, H))

    args = (x, (h0, c0)) if batched else (x[0], (h0[0], c0[0]))
    h, c = cell(*args)
    dx, (dh_prev, dc_prev) = cell.backward(dh if batched else dh[0], dc if batched else dc[0])

    rows = B if batched else 1
    tx, th0, tc0 = (torch.tensor(a[:rows], requires_grad=True) for a in (x, h0, c0))
    t_h, t_c = torch_cell(tx, (th0, tc0))
    loss = (t_h * torch.from_numpy(dh[:rows])).sum() + (t_c * torch.from_numpy(dc[:rows])).sum()
    loss.backward()

    def lead(tensor):
        return tensor if batched else tensor[0]

    assert_close(h, lead(t_h), what="h")
    assert_close(c, lead(t_c), what="c")
    assert_close(dx, lead(tx.grad), what="dx")
    assert_close(dh_prev, lead(th0.grad), what="dh_prev")
    assert_close(dc_prev, lead(tc0.grad), what="dc_prev")
    expected = torch_cell.gradients()
    assert set(cell.grads) == set(expected)
    for name, value in expected.items():
        assert_close(cell.grads[name], value, what=name)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_lstm_full_peephole_is_the_seed_custom_lstm(rng, with_state):
    """fl.LSTM(peephole="full") over a sequence = the seeds' CustomLSTM loop of CustomLSTMCell."""
    torch_cell = seed_cell()
    model = fl.LSTM(I, H, peephole="full", batch_first=True, dtype=np.float64)
    model.load_state_dict(torch_cell.fastlstm_params("_l0"))
    x = rng.standard_normal((B, T, I))
    h0, c0 = (0.5 * rng.standard_normal((1, B, H)) for _ in range(2))
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    dout = rng.standard_normal((B, T, H))
    dh_n, dc_n = rng.standard_normal((1, B, H)), rng.standard_normal((1, B, H))

    out, (h_n, c_n) = model(x, (h0, c0) if with_state else None)
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    h_t, c_t = th0[0], tc0[0]
    outputs = []
    for t in range(T):  # the seed's CustomLSTM.forward
        h_t, c_t = torch_cell(tx[:, t, :], (h_t, c_t))
        outputs.append(h_t.unsqueeze(1))
    t_out = torch.cat(outputs, dim=1)
    up = [torch.from_numpy(a) for a in (dout, dh_n, dc_n)]
    fake_loss(t_out, h_t[None], c_t[None], *up).backward()

    assert_close(out, t_out, what="out")
    assert_close(h_n, h_t[None], what="h_n")
    assert_close(c_n, c_t[None], what="c_n")
    assert_close(dx, tx.grad, what="dx")
    assert_close(dh0, th0.grad, what="dh0")
    assert_close(dc0, tc0.grad, what="dc0")
    expected = torch_cell.gradients("_l0")
    assert set(model.grads) == set(expected)
    for name, value in expected.items():
        assert_close(model.grads[name], value, what=name)
