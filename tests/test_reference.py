"""fastlstm.reference, the oracle, checked against torch, finite differences and the seeds.

torch.nn.LSTM / LSTMCell fix the standard model (forward and autograd); central finite
differences in float64 check every gradient of every variant, peepholes included, which torch
does not have; the seeds' own classes pin down the gate layout and the "full" peephole.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from seed_cell import CustomLSTMCell as SeedCustomLSTMCell
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from utils import assert_close

from fastlstm import reference as ref

# torch's own notice when it falls back from oneDNN for proj_size > 0: not ours to report.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}

# Sizes of the torch comparisons: P < H as torch requires, nothing a multiple of 8.
T, B, I, H, P = 5, 4, 3, 4, 3  # noqa: E741 (I is the input size, as everywhere in fastlstm)
LENGTHS = np.array([3, 0, 5, 1])  # unsorted, with an empty and a full sequence

# Finite-difference tolerance: float64 central differences with eps = 1e-6 are good to ~1e-9.
FD_EPS = 1e-6
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def torch_lstm(num_layers, bidirectional, proj_size, dtype, bias=True):
    torch.manual_seed(0)
    return torch.nn.LSTM(
        I,
        H,
        num_layers=num_layers,
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
        dtype=TORCH_DTYPES[dtype],
    )


def numpy_params(module):
    """Copy a torch module's parameters into a dict keyed by their torch names."""
    return {name: p.detach().numpy().copy() for name, p in module.named_parameters()}


def torch_forward(module, x, h0, c0, lengths):
    """torch.nn.LSTM on (x, (h0, c0)), packed when ``lengths`` is given.

    torch refuses zero lengths, so empty sequences are left out of the packed batch and filled
    in by the contract: zero outputs, h_n = h0, c_n = c0. Differentiable in x, h0, c0.
    """
    if lengths is None:
        return module(x, (h0, c0))
    keep = torch.as_tensor(np.flatnonzero(lengths > 0))
    packed = pack_padded_sequence(
        x[:, keep], torch.as_tensor(lengths[keep.numpy()]), enforce_sorted=False
    )
    out_packed, (h_kept, c_kept) = module(packed, (h0[:, keep], c0[:, keep]))
    out_kept, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
    out = x.new_zeros(x.shape[0], x.shape[1], out_kept.shape[-1]).index_copy(1, keep, out_kept)
    return out, (h0.index_copy(1, keep, h_kept), c0.index_copy(1, keep, c_kept))


def random_state(rng, num_layers, D, H_out, hidden, batch, dtype=np.float64):
    h0 = 0.5 * rng.standard_normal((num_layers * D, batch, H_out))
    c0 = 0.5 * rng.standard_normal((num_layers * D, batch, hidden))
    return h0.astype(dtype), c0.astype(dtype)


def make_params(rng, *, input_size, hidden, num_layers, D, proj, peephole, bias, bias_ch):
    """Random parameters by torch's names (plus the peephole ones), U(-0.6, 0.6)."""
    H_out = proj or hidden
    params = {}
    for k in range(num_layers):
        width = input_size if k == 0 else D * H_out
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            shapes = {"weight_ih": (4 * hidden, width), "weight_hh": (4 * hidden, H_out)}
            if bias:
                shapes |= {"bias_ih": (4 * hidden,), "bias_hh": (4 * hidden,)}
            if proj:
                shapes["weight_hr"] = (proj, hidden)
            if peephole == "diagonal":
                shapes["peephole"] = (3, hidden)
            if peephole == "full":
                shapes["weight_ch"] = (4 * hidden, hidden)
                if bias_ch:
                    shapes["bias_ch"] = (4 * hidden,)
            for short, shape in shapes.items():
                params[short + sfx] = rng.uniform(-0.6, 0.6, shape)
    return params


def fake_loss(out, h_n, c_n, dout, dh_n, dc_n):
    """The scalar whose gradient wrt (out, h_n, c_n) is (dout, dh_n, dc_n)."""
    return (out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()


def numerical_grad(loss, arr, eps=FD_EPS):
    """Central differences of ``loss()`` wrt every entry of ``arr`` (perturbed in place)."""
    grad = np.zeros_like(arr)
    flat = arr.reshape(-1)  # a view: arr is C-contiguous
    for j in range(flat.size):
        orig = flat[j]
        flat[j] = orig + eps
        up = loss()
        flat[j] = orig - eps
        down = loss()
        flat[j] = orig
        grad.flat[j] = (up - down) / (2 * eps)
    return grad


# ----------------------------------------------------------------------------------------------
# Sequence model vs torch.nn.LSTM
# ----------------------------------------------------------------------------------------------

layers = pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
directions = pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
projections = pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", "proj"])
states = pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
lengths_cases = pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@layers
@directions
@projections
@states
@lengths_cases
def test_forward_matches_torch(
    rng, dtype, num_layers, bidirectional, proj_size, with_state, lengths
):
    D = 2 if bidirectional else 1
    module = torch_lstm(num_layers, bidirectional, proj_size, dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0, c0 = random_state(rng, num_layers, D, proj_size or H, H, B, dtype)
    state = (h0, c0) if with_state else None

    out, (h_n, c_n), _ = ref.lstm_forward(
        x,
        numpy_params(module),
        num_layers=num_layers,
        hidden_size=H,
        proj_size=proj_size,
        bidirectional=bidirectional,
        state=state,
        lengths=lengths,
    )
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    with torch.no_grad():
        t_out, (t_h, t_c) = torch_forward(
            module, torch.as_tensor(x), torch.as_tensor(h0), torch.as_tensor(c0), lengths
        )
    assert_close(out, t_out, dtype, what="out")
    assert_close(h_n, t_h, dtype, what="h_n")
    assert_close(c_n, t_c, dtype, what="c_n")


def check_backward_against_torch(
    rng, module, num_layers, bidirectional, proj_size, with_state, lengths
):
    """Every gradient of the fake loss, reference vs torch autograd, in float64."""
    D = 2 if bidirectional else 1
    H_out = proj_size or H
    x = rng.standard_normal((T, B, I))
    h0, c0 = random_state(rng, num_layers, D, H_out, H, B)
    state = (h0, c0) if with_state else None
    if not with_state:  # torch gets explicit zeros so that dh0, dc0 are compared too
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    # Random everywhere, padding included: dout at padded steps must be ignored.
    dout = rng.standard_normal((T, B, D * H_out))
    dh_n, dc_n = random_state(rng, num_layers, D, H_out, H, B)

    params = numpy_params(module)
    _, _, cache = ref.lstm_forward(
        x,
        params,
        num_layers=num_layers,
        hidden_size=H,
        proj_size=proj_size,
        bidirectional=bidirectional,
        state=state,
        lengths=lengths,
    )
    dx, (dh0, dc0), grads = ref.lstm_backward(dout, dh_n, dc_n, cache)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_out, (t_h, t_c) = torch_forward(module, tx, th0, tc0, lengths)
    fake_loss(t_out, t_h, t_c, *map(torch.as_tensor, (dout, dh_n, dc_n))).backward()

    assert set(grads) == set(params)
    assert_close(dx, tx.grad, what="dx")
    assert_close(dh0, th0.grad, what="dh0")
    assert_close(dc0, tc0.grad, what="dc0")
    for name, p in module.named_parameters():
        assert_close(grads[name], p.grad, what=name)


@layers
@directions
@projections
@states
@lengths_cases
def test_backward_matches_torch(rng, num_layers, bidirectional, proj_size, with_state, lengths):
    module = torch_lstm(num_layers, bidirectional, proj_size, np.float64)
    check_backward_against_torch(
        rng, module, num_layers, bidirectional, proj_size, with_state, lengths
    )


def test_backward_matches_torch_without_bias(rng):
    module = torch_lstm(2, True, P, np.float64, bias=False)
    check_backward_against_torch(rng, module, 2, True, P, True, LENGTHS)


# ----------------------------------------------------------------------------------------------
# Every variant vs central finite differences (float64, every entry, tiny sizes)
# ----------------------------------------------------------------------------------------------

FD_SIZES = {"T": 3, "B": 3, "I": 3, "H": 3, "P": 2}
FD_LENGTHS = np.array([2, 0, 3])  # unsorted, with an empty and a full sequence

FD_VARIANTS = {
    "plain": {},
    "no-bias": {"bias": False},
    "proj": {"proj": True},
    "diagonal": {"peephole": "diagonal"},
    "full": {"peephole": "full"},
    "full-no-bias_ch": {"peephole": "full", "bias_ch": False},
    "full-no-bias": {"peephole": "full", "bias": False, "bias_ch": False},
    "diagonal-proj": {"peephole": "diagonal", "proj": True},
    "lengths": {"lengths": True},
    "bidirectional": {"bidirectional": True, "lengths": True},
    "deep-full": {
        "num_layers": 2,
        "bidirectional": True,
        "proj": True,
        "peephole": "full",
        "lengths": True,
        "dropout": True,
    },
    "deep-diagonal": {
        "num_layers": 2,
        "peephole": "diagonal",
        "bias": False,
        "lengths": True,
        "dropout": True,
    },
}


@pytest.mark.parametrize("variant", list(FD_VARIANTS))
def test_backward_matches_finite_differences(rng, variant):
    opts = {
        "num_layers": 1,
        "bidirectional": False,
        "proj": False,
        "peephole": None,
        "bias": True,
        "bias_ch": True,
        "lengths": False,
        "dropout": False,
    } | FD_VARIANTS[variant]
    t, b, i, h = FD_SIZES["T"], FD_SIZES["B"], FD_SIZES["I"], FD_SIZES["H"]
    L, D = opts["num_layers"], 2 if opts["bidirectional"] else 1
    proj = FD_SIZES["P"] if opts["proj"] else 0
    H_out = proj or h
    params = make_params(
        rng,
        input_size=i,
        hidden=h,
        num_layers=L,
        D=D,
        proj=proj,
        peephole=opts["peephole"],
        bias=opts["bias"],
        bias_ch=opts["bias_ch"],
    )
    x = rng.standard_normal((t, b, i))
    h0, c0 = random_state(rng, L, D, H_out, h, b)
    masks = None
    if opts["dropout"]:
        # Inverted dropout with p = 0.5: entries 0 or 2.
        masks = [2.0 * (rng.random((t, b, D * H_out)) < 0.5) for _ in range(L - 1)]
    kwargs = {
        "num_layers": L,
        "hidden_size": h,
        "proj_size": proj,
        "bidirectional": opts["bidirectional"],
        "peephole": opts["peephole"],
        "lengths": FD_LENGTHS if opts["lengths"] else None,
        "dropout_masks": masks,
    }
    dout = rng.standard_normal((t, b, D * H_out))
    dh_n, dc_n = random_state(rng, L, D, H_out, h, b)

    def loss():
        out, (h_n, c_n), _ = ref.lstm_forward(x, params, state=(h0, c0), **kwargs)
        return fake_loss(out, h_n, c_n, dout, dh_n, dc_n)

    _, _, cache = ref.lstm_forward(x, params, state=(h0, c0), **kwargs)
    dx, (dh0, dc0), grads = ref.lstm_backward(dout, dh_n, dc_n, cache)

    assert set(grads) == set(params)
    assert_close(dx, numerical_grad(loss, x), what="dx", **FD_TOL)
    assert_close(dh0, numerical_grad(loss, h0), what="dh0", **FD_TOL)
    assert_close(dc0, numerical_grad(loss, c0), what="dc0", **FD_TOL)
    for name, value in params.items():
        assert_close(grads[name], numerical_grad(loss, value), what=name, **FD_TOL)


# ----------------------------------------------------------------------------------------------
# The cell
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@states
def test_cell_matches_torch(rng, dtype, bias, with_state):
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=TORCH_DTYPES[dtype])
    params = numpy_params(cell)
    x = rng.standard_normal((B, I)).astype(dtype)
    h0, c0 = (0.5 * rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    dh, dc = (rng.standard_normal((B, H)).astype(dtype) for _ in range(2))

    h, c, cache = ref.cell_forward(x, params, (h0, c0) if with_state else None)
    dx, (dh_prev, dc_prev), grads = ref.cell_backward(dh, dc, cache)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_h, t_c = cell(tx, (th0, tc0))
    ((t_h * torch.as_tensor(dh)).sum() + (t_c * torch.as_tensor(dc)).sum()).backward()

    assert_close(h, t_h, dtype, what="h")
    assert_close(c, t_c, dtype, what="c")
    assert set(grads) == set(params)
    assert_close(dx, tx.grad, dtype, what="dx")
    assert_close(dh_prev, th0.grad, dtype, what="dh_prev")
    assert_close(dc_prev, tc0.grad, dtype, what="dc_prev")
    for name, p in cell.named_parameters():
        assert_close(grads[name], p.grad, dtype, what=name)


def test_cell_full_peephole_matches_seed_custom_cell(rng):
    torch.manual_seed(0)
    seed_cell = SeedCustomLSTMCell(I, H)
    params = seed_cell.fastlstm_params()
    x, h0, c0, dh, dc = (rng.standard_normal((B, n)) for n in (I, H, H, H, H))

    h, c, cache = ref.cell_forward(x, params, (h0, c0), peephole="full")
    dx, (dh_prev, dc_prev), grads = ref.cell_backward(dh, dc, cache)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    t_h, t_c = seed_cell(tx, (th0, tc0))
    ((t_h * torch.as_tensor(dh)).sum() + (t_c * torch.as_tensor(dc)).sum()).backward()

    assert_close(h, t_h, what="h")
    assert_close(c, t_c, what="c")
    assert_close(dx, tx.grad, what="dx")
    assert_close(dh_prev, th0.grad, what="dh_prev")
    assert_close(dc_prev, tc0.grad, what="dc_prev")
    W, U = seed_cell.gates()
    expected = {
        "weight_ih": torch.cat([w.weight.grad[:, :I] for w in W]),
        "weight_hh": torch.cat([w.weight.grad[:, I:] for w in W]),
        "bias_ih": torch.cat([w.bias.grad for w in W]),
        # the seed has one bias per W_*; fastlstm's bias_hh is zero and adds to the same sum
        "bias_hh": torch.cat([w.bias.grad for w in W]),
        "weight_ch": torch.cat([u.weight.grad for u in U]),
        "bias_ch": torch.cat([u.bias.grad for u in U]),
    }
    assert set(grads) == set(expected)
    for name, value in expected.items():
        assert_close(grads[name], value, what=name)


CELL_PEEPHOLE_CASES = {
    "diagonal": ("diagonal", True, False),
    "diagonal-no-bias": ("diagonal", False, False),
    "full": ("full", True, True),
    "full-no-bias_ch": ("full", True, False),
}


@pytest.mark.parametrize("case", list(CELL_PEEPHOLE_CASES))
def test_cell_peephole_backward_matches_finite_differences(rng, case):
    peephole, bias, bias_ch = CELL_PEEPHOLE_CASES[case]
    h = 3
    layer = make_params(
        rng,
        input_size=I,
        hidden=h,
        num_layers=1,
        D=1,
        proj=0,
        peephole=peephole,
        bias=bias,
        bias_ch=bias_ch,
    )
    params = {name.removesuffix("_l0"): value for name, value in layer.items()}
    x, h0, c0, dh, dc = (rng.standard_normal((2, n)) for n in (I, h, h, h, h))

    def loss():
        h1, c1, _ = ref.cell_forward(x, params, (h0, c0), peephole=peephole)
        return (h1 * dh).sum() + (c1 * dc).sum()

    _, _, cache = ref.cell_forward(x, params, (h0, c0), peephole=peephole)
    dx, (dh_prev, dc_prev), grads = ref.cell_backward(dh, dc, cache)

    assert set(grads) == set(params)
    assert_close(dx, numerical_grad(loss, x), what="dx", **FD_TOL)
    assert_close(dh_prev, numerical_grad(loss, h0), what="dh_prev", **FD_TOL)
    assert_close(dc_prev, numerical_grad(loss, c0), what="dc_prev", **FD_TOL)
    for name, value in params.items():
        assert_close(grads[name], numerical_grad(loss, value), what=name, **FD_TOL)


def test_cell_backward_without_dc_equals_zero_dc(rng):
    torch.manual_seed(0)
    params = numpy_params(torch.nn.LSTMCell(I, H, dtype=torch.float64))
    x, dh = rng.standard_normal((B, I)), rng.standard_normal((B, H))
    _, _, cache = ref.cell_forward(x, params)
    dx, (dh_prev, dc_prev), grads = ref.cell_backward(dh, None, cache)
    dx0, (dh_prev0, dc_prev0), grads0 = ref.cell_backward(dh, np.zeros((B, H)), cache)
    for got, want in [(dx, dx0), (dh_prev, dh_prev0), (dc_prev, dc_prev0)]:
        assert_close(got, want)
    for name in params:
        assert_close(grads[name], grads0[name], what=name)


# ----------------------------------------------------------------------------------------------
# The seeds' NumPy LSTM and other equivalences
# ----------------------------------------------------------------------------------------------


class SeedNumpyLSTM:
    """The seeds' NumPy LSTM: one (H, H+I) matrix per gate acting on [h, x], zero biases."""

    def __init__(self, Wf, Wi, WC, Wo):
        self.hidden_size = Wf.shape[0]
        self.Wf, self.Wi, self.WC, self.Wo = Wf, Wi, WC, Wo
        self.bf = self.bi = self.bC = self.bo = np.zeros((self.hidden_size, 1))

    def sigmoid(self, z):
        return 1 / (1 + np.exp(-z))

    def forward(self, x, h_prev, C_prev):
        concat = np.vstack((h_prev, x))
        f_t = self.sigmoid(np.dot(self.Wf, concat) + self.bf)
        i_t = self.sigmoid(np.dot(self.Wi, concat) + self.bi)
        C_tilda = np.tanh(np.dot(self.WC, concat) + self.bC)
        C_t = f_t * C_prev + i_t * C_tilda
        o_t = self.sigmoid(np.dot(self.Wo, concat) + self.bo)
        h_t = o_t * np.tanh(C_t)
        return h_t, C_t

    def forward_sequence(self, X):
        h = np.zeros((self.hidden_size, 1))
        C = np.zeros((self.hidden_size, 1))
        outputs = []
        for x in X:
            h, C = self.forward(x.reshape(-1, 1), h, C)
            outputs.append(h)
        return np.hstack(outputs).T


def test_matches_seed_numpy_lstm(rng):
    hidden = 5
    Wf, Wi, WC, Wo = (rng.standard_normal((hidden, hidden + I)) for _ in range(4))
    seed = SeedNumpyLSTM(Wf, Wi, WC, Wo)
    # torch's gate order is i, f, g, o; the seed's concat puts h before x.
    params = {
        "weight_ih_l0": np.vstack([W[:, hidden:] for W in (Wi, Wf, WC, Wo)]),
        "weight_hh_l0": np.vstack([W[:, :hidden] for W in (Wi, Wf, WC, Wo)]),
    }
    x = rng.standard_normal((T, B, I))
    out, _, _ = ref.lstm_forward(x, params, num_layers=1, hidden_size=hidden)
    for b in range(B):
        assert_close(out[:, b], seed.forward_sequence(x[:, b]), what=f"sequence {b}")


def test_diagonal_peephole_is_full_peephole_with_diagonal_weights(rng):
    hidden = 3
    params = make_params(
        rng,
        input_size=I,
        hidden=hidden,
        num_layers=1,
        D=2,
        proj=2,
        peephole="diagonal",
        bias=True,
        bias_ch=False,
    )
    full = {name: value for name, value in params.items() if not name.startswith("peephole")}
    for sfx in ("_l0", "_l0_reverse"):
        p = params["peephole" + sfx]
        # Rows of W_ch per gate i, f, g, o: diag(p_i), diag(p_f), 0, diag(p_o).
        full["weight_ch" + sfx] = np.vstack(
            [np.diag(p[0]), np.diag(p[1]), np.zeros((hidden, hidden)), np.diag(p[2])]
        )
    x = rng.standard_normal((T, B, I))
    kwargs = {"num_layers": 1, "hidden_size": hidden, "proj_size": 2, "bidirectional": True}
    kwargs["lengths"] = LENGTHS
    out_d, (h_d, c_d), cache_d = ref.lstm_forward(x, params, peephole="diagonal", **kwargs)
    out_f, (h_f, c_f), cache_f = ref.lstm_forward(x, full, peephole="full", **kwargs)
    assert_close(out_d, out_f, what="out")
    assert_close(h_d, h_f, what="h_n")
    assert_close(c_d, c_f, what="c_n")

    dout = rng.standard_normal(out_d.shape)
    dx_d, _, grads_d = ref.lstm_backward(dout, None, None, cache_d)
    dx_f, _, grads_f = ref.lstm_backward(dout, None, None, cache_f)
    assert_close(dx_d, dx_f, what="dx")
    for sfx in ("_l0", "_l0_reverse"):
        W_grad = grads_f["weight_ch" + sfx]
        diagonals = [np.diag(W_grad[g * hidden : (g + 1) * hidden]) for g in (0, 1, 3)]
        assert_close(grads_d["peephole" + sfx], np.stack(diagonals), what="peephole" + sfx)


def test_two_halves_with_carried_state_equal_one_run(rng):
    module = torch_lstm(2, False, P, np.float64)  # unidirectional: the reverse pass sees all of T
    params = numpy_params(module)
    kwargs = {"num_layers": 2, "hidden_size": H, "proj_size": P}
    x = rng.standard_normal((T, B, I))
    out, (h_n, c_n), _ = ref.lstm_forward(x, params, **kwargs)
    out1, state1, _ = ref.lstm_forward(x[:2], params, **kwargs)
    out2, (h2, c2), _ = ref.lstm_forward(x[2:], params, state=state1, **kwargs)
    assert_close(np.concatenate([out1, out2]), out, what="out")
    assert_close(h2, h_n, what="h_n")
    assert_close(c2, c_n, what="c_n")


def test_dropout_masks_scale_the_input_of_the_next_layer(rng):
    module = torch_lstm(2, True, 0, np.float64)
    params = numpy_params(module)
    one_layer = {name.replace("_l1", "_l0"): v for name, v in params.items() if "_l1" in name}
    x = rng.standard_normal((T, B, I))
    mask = 2.0 * (rng.random((T, B, 2 * H)) < 0.5)
    kwargs = {"hidden_size": H, "bidirectional": True, "lengths": LENGTHS}
    out, _, _ = ref.lstm_forward(x, params, num_layers=2, dropout_masks=[mask], **kwargs)
    out0, _, _ = ref.lstm_forward(x, params, num_layers=1, **kwargs)
    out1, _, _ = ref.lstm_forward(out0 * mask, one_layer, num_layers=1, **kwargs)
    assert_close(out, out1)


def test_empty_sequence_outputs_zeros_and_returns_initial_state(rng):
    module = torch_lstm(2, True, P, np.float64)
    h0, c0 = random_state(rng, 2, 2, P, H, B)
    x = rng.standard_normal((T, B, I))
    kwargs = {"num_layers": 2, "hidden_size": H, "proj_size": P, "bidirectional": True}
    out, (h_n, c_n), cache = ref.lstm_forward(
        x, numpy_params(module), state=(h0, c0), lengths=LENGTHS, **kwargs
    )
    empty = LENGTHS == 0
    assert np.all(out[:, empty] == 0)
    assert np.array_equal(h_n[:, empty], h0[:, empty])
    assert np.array_equal(c_n[:, empty], c0[:, empty])
    dh_n, dc_n = random_state(rng, 2, 2, P, H, B)
    dx, (dh0, dc0), _ = ref.lstm_backward(rng.standard_normal(out.shape), dh_n, dc_n, cache)
    assert np.all(dx[:, empty] == 0)
    assert np.array_equal(dh0[:, empty], dh_n[:, empty])
    assert np.array_equal(dc0[:, empty], dc_n[:, empty])


@pytest.mark.parametrize("x_dtype", [np.float32, np.int64], ids=["f32", "int"])
def test_computes_in_the_dtype_of_x(rng, x_dtype):
    """float32 in gives float32 everywhere, even with float64 parameters; integers give float64."""
    module = torch_lstm(1, False, P, np.float64)
    x = (3 * rng.standard_normal((T, B, I))).astype(x_dtype)
    want = np.float64 if x_dtype == np.int64 else x_dtype
    out, (h_n, c_n), cache = ref.lstm_forward(
        x, numpy_params(module), num_layers=1, hidden_size=H, proj_size=P
    )
    dx, (dh0, dc0), grads = ref.lstm_backward(np.ones(out.shape), None, None, cache)
    for value in [out, h_n, c_n, dx, dh0, dc0, *grads.values()]:
        assert value.dtype == want


# ----------------------------------------------------------------------------------------------
# NaN, inf and huge inputs
# ----------------------------------------------------------------------------------------------


def deep_model_run(rng, x, lengths, dout=None):
    """Forward and backward of a 2-layer bidirectional projected model, fixed weights and state."""
    module = torch_lstm(2, True, P, np.float64)
    h0, c0 = random_state(np.random.default_rng(1), 2, 2, P, H, B)
    out, (h_n, c_n), cache = ref.lstm_forward(
        x,
        numpy_params(module),
        num_layers=2,
        hidden_size=H,
        proj_size=P,
        bidirectional=True,
        state=(h0, c0),
        lengths=lengths,
    )
    if dout is None:
        dout = np.random.default_rng(2).standard_normal(out.shape)
    dx, (dh0, dc0), grads = ref.lstm_backward(dout, np.ones_like(h_n), np.ones_like(c_n), cache)
    return {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}, grads


@lengths_cases
def test_nan_in_one_sequence_stays_in_that_sequence(rng, lengths):
    x = rng.standard_normal((T, B, I))
    clean, _ = deep_model_run(rng, x, lengths)
    bad = 2  # a full-length sequence
    x[1, bad, 0] = np.nan
    dirty, grads = deep_model_run(rng, x, lengths)
    others = np.arange(B) != bad
    for name in ["out", "dx"]:  # batch on axis 1
        assert_close(dirty[name][:, others], clean[name][:, others], what=name)
        assert np.isnan(dirty[name][:, bad]).any(), name
    for name in ["h_n", "c_n", "dh0", "dc0"]:
        assert_close(dirty[name][:, others], clean[name][:, others], what=name)
        assert np.isnan(dirty[name][:, bad]).all(), name
    # The parameters see every sequence, so their gradients are NaN: that is the true math.
    assert all(np.isnan(g).any() for g in grads.values())


# inf in the padding makes inf - inf in the input product: NumPy warns, the result is discarded.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_nan_and_inf_in_padding_are_ignored(rng):
    x = rng.standard_normal((T, B, I))
    padding = np.arange(T)[:, None] >= LENGTHS[None, :]
    x[padding] = 0.0
    dout = rng.standard_normal((T, B, 2 * P))
    clean, clean_grads = deep_model_run(rng, x, LENGTHS, dout)
    x[padding] = np.nan
    x[-1, 0] = np.inf
    dout[padding] = np.nan  # gradients at padded steps are ignored too
    dirty, dirty_grads = deep_model_run(rng, x, LENGTHS, dout)
    for name, value in clean.items():
        assert np.isfinite(dirty[name]).all(), name
        assert_close(dirty[name], value, what=name)
    for name, value in clean_grads.items():
        assert_close(dirty_grads[name], value, what=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_huge_inputs_saturate_without_nan_or_warnings(rng, dtype):
    module = torch_lstm(2, True, P, dtype)
    params = numpy_params(module)
    kwargs = {"num_layers": 2, "hidden_size": H, "proj_size": P, "bidirectional": True}
    signs = np.sign(rng.standard_normal((T, B, I))).astype(dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out, (h_n, c_n), cache = ref.lstm_forward(signs * dtype(1e30), params, **kwargs)
        dx, (dh0, dc0), grads = ref.lstm_backward(np.ones(out.shape, dtype), None, None, cache)
        out_bigger, _, _ = ref.lstm_forward(signs * dtype(1e32), params, **kwargs)
    for value in [out, h_n, c_n, dx, dh0, dc0, *grads.values()]:
        assert np.isfinite(value).all()
    # Saturated gates are exactly 0 or 1 (and tanh exactly ±1): a larger input changes nothing.
    assert np.array_equal(out, out_bigger)
    # σ'(a) = 0 at saturation: no gradient reaches the huge input of the first layer.
    assert np.all(dx == 0)


def test_sigmoid_is_exact_saturates_and_propagates_nan():
    x = np.array([-1e300, -800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0, 1e300, -np.inf, np.inf])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        s = ref.sigmoid(x)
        s32 = ref.sigmoid(np.clip(x, -3e38, 3e38).astype(np.float32))
    assert s32.dtype == np.float32
    assert s32[0] == 0 and s32[-3] == 1
    assert_close(s[2:7], 1 / (1 + np.exp(-x[2:7])), what="moderate")
    assert s[0] == 0 and s[-2] == 0 and s[-3] == 1 and s[-1] == 1
    assert np.isnan(ref.sigmoid(np.array([np.nan]))).all()
