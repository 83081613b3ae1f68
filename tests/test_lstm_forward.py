"""fl.LSTM forward: vs torch.nn.LSTM, vs fastlstm.reference on edge shapes and odd inputs,
the parallel kernels, and invariants (split runs, reverse direction, NaN, huge inputs, dtypes).

The helpers at the top (torch_twin, torch_run, reference_run, ...) are shared by the other
LSTM test files, which import them by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from utils import assert_close

import fastlstm as fl
from fastlstm import _engine, _kernels, _routes
from fastlstm import reference as ref
from fastlstm._kernels import tiles
from fastlstm._kernels.products import projected_in_loop

# torch's own notice when it falls back from oneDNN for proj_size > 0: not ours to report.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

# Sizes of the torch comparisons: P < H as torch requires, nothing a multiple of 8.
T, B, I, H, P = 5, 4, 3, 5, 3  # noqa: E741 (I is the input size, as everywhere in fastlstm)
LENGTHS = np.array([3, 0, 5, 1])  # unsorted, with an empty (0) and a full (T) sequence


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def torch_twin(model: fl.LSTM) -> torch.nn.LSTM:
    """A torch.nn.LSTM with the configuration and weights of ``model`` (no dropout)."""
    module = torch.nn.LSTM(
        model.input_size,
        model.hidden_size,
        model.num_layers,
        bias=model.bias,
        batch_first=model.batch_first,
        bidirectional=model.bidirectional,
        proj_size=model.proj_size,
        dtype=TORCH_DTYPES[model.dtype],
    )
    module.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return module


def torch_run(module: torch.nn.LSTM, x, state, lengths):
    """torch.nn.LSTM on tensors x (in the module's layout) and state = (h0, c0).

    With ``lengths``, the batch is packed (enforce_sorted=False). torch refuses zero lengths,
    so empty sequences are left out and filled in by the contract: zero outputs, h_n = h0,
    c_n = c0. Differentiable in x, h0 and c0.
    """
    if lengths is None:
        return module(x, state)
    lengths = np.asarray(lengths)
    batch_first = module.batch_first
    batch_axis = 0 if batch_first else 1
    steps = x.shape[1 if batch_first else 0]
    keep = torch.as_tensor(np.flatnonzero(lengths > 0))
    h0, c0 = state
    packed = pack_padded_sequence(
        x.index_select(batch_axis, keep),
        torch.as_tensor(lengths[keep.numpy()]),
        batch_first=batch_first,
        enforce_sorted=False,
    )
    out_packed, (h_kept, c_kept) = module(packed, (h0[:, keep], c0[:, keep]))
    out_kept, _ = pad_packed_sequence(out_packed, batch_first=batch_first, total_length=steps)
    shape = (*x.shape[:2], out_kept.shape[-1])
    out = x.new_zeros(shape).index_copy(batch_axis, keep, out_kept)
    return out, (h0.index_copy(1, keep, h_kept), c0.index_copy(1, keep, c_kept))


def random_state(rng, model: fl.LSTM, batch: int | None = B, dtype=None):
    """(h0, c0) of the model's shapes (unbatched when ``batch`` is None), N(0, 0.25)."""
    count = model.num_layers * (2 if model.bidirectional else 1)
    lead = (count,) if batch is None else (count, batch)
    h0 = 0.5 * rng.standard_normal((*lead, model.proj_size or model.hidden_size))
    c0 = 0.5 * rng.standard_normal((*lead, model.hidden_size))
    dtype = model.dtype if dtype is None else dtype
    return h0.astype(dtype), c0.astype(dtype)


def to_layout(x_time_major: np.ndarray, batch_first: bool) -> np.ndarray:
    """(T, B, F) to the caller's layout, as a fresh C-contiguous array."""
    return np.ascontiguousarray(x_time_major.transpose(1, 0, 2) if batch_first else x_time_major)


def reference_run(model, x_time_major, state=None, lengths=None, masks=None):
    """fastlstm.reference in float64 on the model's parameters; x time-major (T, B, I)."""
    params = {name: value.astype(np.float64) for name, value in model.params.items()}
    if state is not None:
        state = tuple(np.asarray(s, dtype=np.float64) for s in state)
    return ref.lstm_forward(
        np.asarray(x_time_major, dtype=np.float64),
        params,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        proj_size=model.proj_size,
        bidirectional=model.bidirectional,
        peephole=model.peephole,
        state=state,
        lengths=lengths,
        dropout_masks=masks,
    )


def padding_mask(lengths, steps: int) -> np.ndarray:
    """(T, B) True at padded steps t >= n."""
    return np.arange(steps)[:, None] >= np.asarray(lengths)[None, :]


dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
directions = pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
layouts = pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
states = pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
lengths_cases = pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])


# ----------------------------------------------------------------------------------------------
# vs torch.nn.LSTM
# ----------------------------------------------------------------------------------------------


def check_forward_against_torch(rng, model, lengths, with_state):
    """Forward in eval and in training mode (identical numbers) vs torch, in the model's layout."""
    dtype = model.dtype
    module = torch_twin(model)
    x = to_layout(rng.standard_normal((T, B, I)).astype(dtype), model.batch_first)
    h0, c0 = random_state(rng, model)
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    state = (h0, c0) if with_state else None

    model.eval()
    out, (h_n, c_n) = model(x, state, lengths)
    model.train()
    out_train, (h_train, c_train) = model(x, state, lengths)
    with torch.no_grad():
        t_out, (t_h, t_c) = torch_run(
            module, torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)), lengths
        )

    assert_close(out, t_out, dtype, what="out")
    assert_close(h_n, t_h, dtype, what="h_n")
    assert_close(c_n, t_c, dtype, what="c_n")
    # Training mode keeps a cache but computes the same numbers.
    np.testing.assert_array_equal(out_train, out)
    np.testing.assert_array_equal(h_train, h_n)
    np.testing.assert_array_equal(c_train, c_n)
    if lengths is not None:
        out_time_major = out.transpose(1, 0, 2) if model.batch_first else out
        assert np.all(out_time_major[padding_mask(lengths, T)] == 0)


@dtypes
@pytest.mark.parametrize("num_layers", [1, 2, 3], ids=["L1", "L2", "L3"])
@directions
@layouts
@lengths_cases
@states
def test_forward_matches_torch(
    rng, dtype, num_layers, bidirectional, batch_first, lengths, with_state
):
    model = fl.LSTM(
        I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype, seed=1
    )
    check_forward_against_torch(rng, model, lengths, with_state)


@dtypes
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@directions
@lengths_cases
@states
def test_forward_with_projection_matches_torch(
    rng, dtype, num_layers, bidirectional, lengths, with_state
):
    model = fl.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=P, dtype=dtype, seed=2)
    check_forward_against_torch(rng, model, lengths, with_state)


@dtypes
def test_forward_without_bias_matches_torch(rng, dtype):
    model = fl.LSTM(I, H, 2, bias=False, bidirectional=True, proj_size=P, dtype=dtype, seed=3)
    assert not any(name.startswith("bias") for name in model.params)
    check_forward_against_torch(rng, model, LENGTHS, True)


@dtypes
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@directions
@pytest.mark.parametrize("proj_size", [0, P], ids=["noproj", "proj"])
@states
def test_unbatched_forward_matches_torch(
    rng, dtype, num_layers, bidirectional, proj_size, with_state
):
    model = fl.LSTM(
        I, H, num_layers, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype, seed=4
    )
    module = torch_twin(model)
    x = rng.standard_normal((T, I)).astype(dtype)
    h0, c0 = random_state(rng, model, batch=None)
    state = (h0, c0) if with_state else None

    out, (h_n, c_n) = model(x, state)
    with torch.no_grad():
        args = (torch.from_numpy(h0), torch.from_numpy(c0)) if with_state else None
        t_out, (t_h, t_c) = module(torch.from_numpy(x), args)
    D = 2 if bidirectional else 1
    assert out.shape == (T, D * (proj_size or H))
    assert h_n.shape == (num_layers * D, proj_size or H)
    assert c_n.shape == (num_layers * D, H)
    assert_close(out, t_out, dtype, what="out")
    assert_close(h_n, t_h, dtype, what="h_n")
    assert_close(c_n, t_c, dtype, what="c_n")


@dtypes
def test_unbatched_input_ignores_batch_first(rng, dtype):
    """As in torch, batch_first only concerns 3-D input: (T, I) is one sequence either way."""
    model = fl.LSTM(I, H, 2, bidirectional=True, batch_first=True, dtype=dtype, seed=4)
    x = rng.standard_normal((T, I)).astype(dtype)
    h0, c0 = random_state(rng, model, batch=None)
    out, (h_n, c_n) = model(x, (h0, c0))
    with torch.no_grad():
        t_out, (t_h, t_c) = torch_twin(model)(
            torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0))
        )
    assert_close(out, t_out, dtype, what="out")
    assert_close(h_n, t_h, dtype, what="h_n")
    assert_close(c_n, t_c, dtype, what="c_n")
    dx, (dh0, dc0) = model.backward(np.ones_like(out))
    assert dx.shape == x.shape and dh0.shape == h0.shape and dc0.shape == c0.shape


FROM_TORCH_CASES = {
    "plain-f32": ({}, torch.float32),
    "bi-proj-f64": ({"num_layers": 2, "bidirectional": True, "proj_size": P}, torch.float64),
    "L3-batch_first-no-bias-f64": (
        {"num_layers": 3, "batch_first": True, "bias": False},
        torch.float64,
    ),
    "L2-dropout-f32": ({"num_layers": 2, "dropout": 0.25}, torch.float32),
}


@pytest.mark.parametrize("case", list(FROM_TORCH_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_from_torch(rng, case, training):
    options, torch_dtype = FROM_TORCH_CASES[case]
    torch.manual_seed(0)
    module = torch.nn.LSTM(I, H, dtype=torch_dtype, **options).train(training)
    model = fl.LSTM.from_torch(module)

    expected_config = {
        "input_size": I,
        "hidden_size": H,
        "num_layers": module.num_layers,
        "bias": module.bias,
        "batch_first": module.batch_first,
        "dropout": module.dropout,
        "bidirectional": module.bidirectional,
        "proj_size": module.proj_size,
        "peephole": None,
    }
    for name, value in expected_config.items():
        assert getattr(model, name) == value, name
    assert model.dtype == np.dtype(str(torch_dtype).removeprefix("torch."))
    assert model.training == training
    named = dict(module.named_parameters())
    assert list(model.params) == list(named)
    for name, p in named.items():
        np.testing.assert_array_equal(model.params[name], p.detach().numpy(), err_msg=name)

    model.eval()
    module.eval()
    x = rng.standard_normal((B, T, I) if module.batch_first else (T, B, I))
    x = x.astype(model.dtype)
    out, (h_n, c_n) = model(x)
    with torch.no_grad():
        t_out, (t_h, t_c) = module(torch.from_numpy(x))
    assert_close(out, t_out, model.dtype, what="out")
    assert_close(h_n, t_h, model.dtype, what="h_n")
    assert_close(c_n, t_c, model.dtype, what="c_n")

    # Copies, not views: editing the torch module afterwards leaves the model alone.
    before = model.state_dict()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    for name, value in before.items():
        np.testing.assert_array_equal(model.params[name], value, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Kernels vs fastlstm.reference on edge shapes (the product switches to BLAS at 4H*P > 4096)
# ----------------------------------------------------------------------------------------------

EDGE_SHAPES = {
    # name: (T, B, I, H, proj_size, num_layers, bidirectional, lengths)
    "B1": (5, 1, 3, 5, 0, 2, True, [4]),
    "T1": (1, 4, 3, 5, 0, 2, True, [1, 0, 1, 1]),
    "H1": (4, 3, 2, 1, 0, 2, True, [4, 1, 0]),
    "H13": (4, 3, 3, 13, 0, 1, True, [2, 4, 0]),
    "H13-proj5": (4, 3, 3, 13, 5, 2, False, [2, 4, 3]),
    "H32-last-hand-written": (3, 3, 4, 32, 0, 1, False, [3, 1, 2]),
    "H33-first-blas": (3, 3, 4, 33, 0, 1, False, [3, 1, 2]),
    "H40-blas": (4, 3, 5, 40, 0, 2, True, [4, 2, 0]),
    "H40-proj29-blas": (3, 2, 5, 40, 29, 1, True, [3, 1]),
}


@dtypes
@pytest.mark.parametrize("shape", list(EDGE_SHAPES))
def test_kernels_match_reference_on_edge_shapes(rng, dtype, shape):
    steps, batch, width, hidden, proj, layers, bidirectional, lengths = EDGE_SHAPES[shape]
    lengths = np.array(lengths)
    model = fl.LSTM(
        width, hidden, layers, bidirectional=bidirectional, proj_size=proj, dtype=dtype, seed=5
    )
    x = rng.standard_normal((steps, batch, width)).astype(dtype)
    state = random_state(rng, model, batch)
    for run_lengths in (None, lengths):
        model.zero_grad()
        out, (h_n, c_n) = model(x, state, run_lengths)
        r_out, (r_h, r_c), cache = reference_run(model, x, state, run_lengths)
        assert_close(out, r_out, dtype, what="out")
        assert_close(h_n, r_h, dtype, what="h_n")
        assert_close(c_n, r_c, dtype, what="c_n")

        dout = rng.standard_normal(out.shape).astype(dtype)
        dh_n, dc_n = random_state(rng, model, batch)
        dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)
        r_dx, (r_dh0, r_dc0), r_grads = ref.lstm_backward(dout, dh_n, dc_n, cache)
        assert_close(dx, r_dx, dtype, what="dx")
        assert_close(dh0, r_dh0, dtype, what="dh0")
        assert_close(dc0, r_dc0, dtype, what="dc0")
        for name in model.params:
            assert_close(model.grads[name], r_grads[name], dtype, what=name)


def input_variants(x: np.ndarray) -> dict[str, object]:
    """The same numbers as ``x`` in every form the API promises to accept."""
    holder = np.zeros((x.shape[0], 2 * x.shape[1], 3 * x.shape[2]), dtype=x.dtype)
    holder[:, ::2, 1::3] = x
    fortran = np.asfortranarray(x)
    read_only = x.copy()
    read_only.setflags(write=False)
    return {
        "strided-view": holder[:, ::2, 1::3],
        "fortran-order": fortran,
        "read-only": read_only,
        "list": x.tolist(),
        "torch-tensor": torch.from_numpy(x.copy()),
        "torch-requires-grad": torch.tensor(x, requires_grad=True),
        "other-float-dtype": x.astype(np.float32 if x.dtype == np.float64 else np.float64),
    }


@dtypes
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_forms_give_identical_results(rng, dtype, training):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=6).train(training)
    # Values exact in float32 so that every form holds the same numbers.
    x = rng.standard_normal((T, B, I)).astype(np.float32).astype(dtype)
    state = random_state(rng, model)
    for run_lengths in (None, LENGTHS):
        out, (h_n, c_n) = model(x, state, run_lengths)
        r_out, _, _ = reference_run(model, x, state, run_lengths)
        assert_close(out, r_out, dtype, what="out")
        for form, value in input_variants(x).items():
            got, (got_h, got_c) = model(value, state, run_lengths)
            assert got.dtype == dtype, form
            np.testing.assert_array_equal(got, out, err_msg=form)
            np.testing.assert_array_equal(got_h, h_n, err_msg=form)
            np.testing.assert_array_equal(got_c, c_n, err_msg=form)


@dtypes
def test_integer_input_is_converted(rng, dtype):
    model = fl.LSTM(I, H, 2, dtype=dtype, seed=7)
    x_int = rng.integers(-3, 4, size=(T, B, I))
    out, (h_n, c_n) = model(x_int)
    expected, (e_h, e_c) = model(x_int.astype(dtype))
    for got, want in [(out, expected), (h_n, e_h), (c_n, e_c)]:
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
    r_out, _, _ = reference_run(model, x_int)
    assert_close(out, r_out, dtype, what="out")


def transposed_copy(a: np.ndarray) -> np.ndarray:
    """The values of ``a`` as a non-contiguous view (axes reversed in memory)."""
    return np.ascontiguousarray(a.transpose(2, 1, 0)).transpose(2, 1, 0)


@dtypes
def test_state_and_lengths_forms_give_identical_results(rng, dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, dtype=dtype, seed=8)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0, c0 = random_state(rng, model)
    out, (h_n, c_n) = model(x, (h0, c0), LENGTHS)
    read_only = [h0.copy(), c0.copy()]
    for array in read_only:
        array.setflags(write=False)
    forms = {
        "list-state": ([h0, c0], LENGTHS),
        "torch-state-and-lengths": (
            (torch.from_numpy(h0), torch.from_numpy(c0)),
            torch.from_numpy(LENGTHS),
        ),
        "read-only-state": (tuple(read_only), LENGTHS),
        "strided-state": ((transposed_copy(h0), np.asfortranarray(c0)), LENGTHS.tolist()),
        "int32-lengths": ((h0, c0), LENGTHS.astype(np.int32)),
        "uint8-lengths": ((h0, c0), LENGTHS.astype(np.uint8)),
    }
    for form, (state, lengths) in forms.items():
        got, (got_h, got_c) = model(x, state, lengths)
        np.testing.assert_array_equal(got, out, err_msg=form)
        np.testing.assert_array_equal(got_h, h_n, err_msg=form)
        np.testing.assert_array_equal(got_c, c_n, err_msg=form)


# ----------------------------------------------------------------------------------------------
# The parallel kernels
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of the engine's serial and parallel time-loop dispatchers
    (the engine looks them up at call time)."""
    calls = {}
    for module, name in (
        (_engine, "layer_forward_serial"),
        (_engine, "layer_forward_parallel"),
        (_engine, "layer_backward_serial"),
        (_engine, "layer_backward_parallel"),
    ):
        original = getattr(module, name)
        calls[name] = 0

        def spy(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def restore_threads():
    previous = fl.get_num_threads()
    yield
    fl.set_num_threads(previous)


def run_forward_backward(model, x, state, lengths, dout, dh_n, dc_n):
    model.zero_grad()
    out, (h_n, c_n) = model(x, state, lengths)
    dx, (dh0, dc0) = model.backward(dout, dh_n, dc_n)
    results = {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    results |= {f"grad {name}": value.copy() for name, value in model.grads.items()}
    return results


def assert_matches_reference(results, model, args):
    """``results`` of run_forward_backward(model, *args) agree with fastlstm.reference."""
    x, state, lengths, dout, dh_n, dc_n = args
    r_out, (r_h, r_c), cache = reference_run(model, x, state, lengths)
    r_dx, (r_dh0, r_dc0), r_grads = ref.lstm_backward(dout, dh_n, dc_n, cache)
    expected = {"out": r_out, "h_n": r_h, "c_n": r_c, "dx": r_dx, "dh0": r_dh0, "dc0": r_dc0}
    expected |= {f"grad {name}": value for name, value in r_grads.items()}
    for name, value in expected.items():
        assert_close(results[name], value, model.dtype, what=name)


def compare_serial_and_parallel(rng, kernel_calls, model, batch, lengths, *, ulps=0):
    """One forward/backward with 1 thread, one with 2, and the parallel one vs the reference.

    The two runs agree to within ``ulps`` units in the last place of each array's largest
    entry (0: bit-identical).
    """
    dtype = model.dtype
    x = rng.standard_normal((T, batch, I)).astype(dtype)
    state = random_state(rng, model, batch)
    D = 2 if model.bidirectional else 1
    dout = rng.standard_normal((T, batch, D * (model.proj_size or model.hidden_size)))
    dout = dout.astype(dtype)
    dh_n, dc_n = random_state(rng, model, batch)
    args = (x, state, lengths, dout, dh_n, dc_n)

    fl.set_num_threads(1)
    serial = run_forward_backward(model, *args)
    assert kernel_calls["layer_forward_parallel"] == kernel_calls["layer_backward_parallel"] == 0
    assert kernel_calls["layer_forward_serial"] == kernel_calls["layer_backward_serial"] > 0
    fl.set_num_threads(2)
    parallel = run_forward_backward(model, *args)
    # Two directions run as one task each; one direction's batch is split into two row
    # chunks when each has enough rows for a busy register block, else it stays serial.
    split = model.bidirectional or batch >= 2 * tiles.MIN_CHUNK_ROWS
    tasks_per_call = model.num_layers if split else 0
    assert kernel_calls["layer_forward_parallel"] == tasks_per_call
    assert kernel_calls["layer_backward_parallel"] == tasks_per_call
    model.eval()  # the inference path of the parallel kernel keeps nothing, same numbers
    out_eval, (h_eval, c_eval) = model(x, state, lengths)
    model.train()
    assert kernel_calls["layer_forward_parallel"] == 2 * tasks_per_call
    np.testing.assert_array_equal(out_eval, parallel["out"])
    np.testing.assert_array_equal(h_eval, parallel["h_n"])
    np.testing.assert_array_equal(c_eval, parallel["c_n"])

    for name, value in serial.items():
        if ulps == 0:
            np.testing.assert_array_equal(parallel[name], value, err_msg=name)
        else:
            atol = ulps * np.finfo(dtype).eps * np.abs(value).max()
            np.testing.assert_allclose(parallel[name], value, rtol=0, atol=atol, err_msg=name)

    assert_matches_reference(parallel, model, args)


PARALLEL_CASES = {
    # name: (model options, batch, lengths). One direction: two row chunks from 12 rows on,
    # on the calling thread below; two directions: one task per direction.
    "uni-B4": ({}, 4, None),
    "uni-B13-two-row-chunks": ({}, 13, np.array([5, 0, 3, 5, 1, 2, 4, 5, 5, 1, 0, 3, 2])),
    "uni-B12-proj-full-peephole": ({"proj_size": P, "peephole": "full"}, 12, None),
    "uni-B5-lengths": ({}, 5, np.array([5, 0, 3, 5, 1])),
    "uni-proj-full-peephole": ({"proj_size": P, "peephole": "full"}, 5, np.array([5, 2, 0, 4, 1])),
    "bi-one-task-per-direction": ({"bidirectional": True}, 4, LENGTHS),
    "bi-proj": ({"bidirectional": True, "proj_size": P}, 4, LENGTHS),
    "bi-diagonal-peephole": (
        {"bidirectional": True, "peephole": "diagonal"},
        3,
        np.array([2, 5, 0]),
    ),
}


@dtypes
@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_parallel_kernels_match_serial_forced(
    rng, monkeypatch, kernel_calls, restore_threads, dtype, case
):
    """PARALLEL_MIN_MACS = 0 sends even tiny layers to the parallel kernels when 2 threads run.

    A row's arithmetic does not depend on which thread runs it, nor on which rows share its
    register block: bit-identical to one thread.
    """
    options, batch, lengths = PARALLEL_CASES[case]
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    model = fl.LSTM(I, H, 2, dtype=dtype, seed=9, **options)
    compare_serial_and_parallel(rng, kernel_calls, model, batch, lengths)


@dtypes
@pytest.mark.parametrize("peephole", [None, "diagonal", "full"])
def test_row_chunks_as_tasks_equal_one_pass(rng, restore_threads, dtype, peephole):
    """The kernels' row ranges: rows split into uneven tasks on two threads give exactly the
    numbers of one pass over all rows (forward and backward), whatever the chunking."""
    fl.set_num_threads(2)
    batch, hidden = 7, 37  # H = 37, P = 5: partly valid panel vectors (the scratch tile)
    model = fl.LSTM(I, hidden, proj_size=5, peephole=peephole, dtype=dtype, seed=12)
    layer = model._layers[0]
    x = rng.standard_normal((T * batch, I)).astype(dtype)
    lengths = np.array([5, 0, 3, 5, 1, 2, 4], dtype=np.int64)
    h0 = rng.standard_normal((1, batch, 5)).astype(dtype)
    c0 = rng.standard_normal((1, batch, hidden)).astype(dtype)
    optional = [_engine._optional(a, model.dtype) for a in (layer.w_hr, layer.peep, layer.w_ch)]
    dout = rng.standard_normal((T, batch, 5)).astype(dtype)
    results = []
    for tasks in ([(0, 0, batch)], [(0, 0, 2), (0, 2, batch)], [(0, 0, 5), (0, 5, 6), (0, 6, 7)]):
        xp = np.empty((1, 4, T, batch * hidden), dtype)  # the kernel projects x itself
        out = np.empty((T, batch, 5), dtype)
        h_n, c_n = np.empty_like(h0), np.empty_like(c0)
        xh = np.empty((1, T * batch, I + 5), dtype)  # rows [x_t | h_{t-1}]
        xh[0, :, :I] = x
        cstate = np.empty((1, T, batch * hidden), dtype)
        mstore = np.empty((1, T, batch, hidden), dtype)
        bias = _engine._summed_bias(layer)
        args = (out, h_n, c_n, xp, xh, cstate, mstore, h0, c0, x, bias, layer.w_hh,
                _engine.forward_panels(layer, True), *optional, lengths, True)  # fmt: skip
        _engine.layer_forward_parallel(args, tasks)
        dh0, dc0 = np.empty_like(h0), np.empty_like(c0)
        dhstore = np.empty((1, T, batch, 5), dtype)
        back = (xp, dh0, dc0, dhstore, dout, np.zeros_like(h0), np.zeros_like(c0), cstate, c0,
                layer.w_hh, _engine.backward_panels(layer), *optional, lengths)  # fmt: skip
        _engine.layer_backward_parallel(back, tasks)
        results.append([out, h_n, c_n, xp, xh, dh0, dc0, dhstore])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, want)


@dtypes
def test_parallel_kernels_above_the_natural_threshold(rng, kernel_calls, restore_threads, dtype):
    """T*B*D*4H*P = 5*4*2*640*160 >= 4e6: parallel without any patching, BLAS inside each task.

    The weight gradients run as the same BLAS calls on one BLAS thread either way (dx's rows
    split between the tasks): bit-identical.
    """
    hidden = 160
    model = fl.LSTM(I, hidden, 1, bidirectional=True, dtype=dtype, seed=10)
    assert T * 4 * 2 * 4 * hidden * hidden >= _routes.PARALLEL_MIN_MACS
    compare_serial_and_parallel(rng, kernel_calls, model, 4, LENGTHS)


@dtypes
def test_one_direction_split_into_row_chunks_above_the_threshold(
    rng, kernel_calls, restore_threads, dtype
):
    """T*B*4H*P = 5*24*512*128 >= 4e6: one direction's batch as two row chunks on two
    threads, weight gradients split too: bit-identical to one thread."""
    hidden, batch = 128, 24
    model = fl.LSTM(I, hidden, 1, dtype=dtype, seed=13)
    assert T * batch * 4 * hidden * hidden >= _routes.PARALLEL_MIN_MACS
    lengths = rng.integers(0, T + 1, batch)
    compare_serial_and_parallel(rng, kernel_calls, model, batch, lengths)


# Long enough for the one-row loop to project blocks of ROWS steps' inputs alongside its
# products (_kernels.products.projected_in_loop, where the registers allow it): three
# whole blocks and a part, the padded run two and a part.
LONG = 3 * tiles.ROWS + 3
LONG_RUN = 2 * tiles.ROWS + 5


@dtypes
@pytest.mark.parametrize(
    "options, steps, lengths",
    [
        ({}, T, None),
        ({"peephole": "diagonal"}, T, np.array([T - 2])),
        ({"bidirectional": True}, T, [3]),
        ({}, LONG, None),
        ({"bidirectional": True}, LONG, [LONG_RUN]),
        ({"peephole": "diagonal"}, LONG, [LONG_RUN]),
    ],
    ids=["plain", "diagonal-padded", "bidirectional-padded", "long", "long-bidirectional-padded",
         "long-diagonal-padded"],
)  # fmt: skip
def test_one_row_batch_splits_hidden_units_bit_identically(
    rng, monkeypatch, restore_threads, dtype, options, steps, lengths
):
    """A batch of one row: one direction's hidden units in two chunk ranges on two threads
    with a barrier per step (two directions: one task each), forward and backward loops,
    give the numbers of one thread and match the reference. H = 150: chunks of 64 (float32) or 32
    (float64) units, the last one part-valid. The long runs have inputs projected in the
    loop, forward and in reverse, on CPUs with the registers for it."""
    run = steps if lengths is None else lengths[0]
    assert (projected_in_loop(run, 0) != (0, 0)) == (tiles.MIXES_PROJECTION and steps == LONG)
    T = steps  # noqa: N806 (the module's T, longer here)
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    seen = []
    real = _engine._run_one_row

    def spy(kernel, calls, parties, parallel):
        seen.append((kernel.py_func.__name__, len(calls), parties, parallel))
        return real(kernel, calls, parties, parallel)

    monkeypatch.setattr(_engine, "_run_one_row", spy)
    model = fl.LSTM(I, 150, 2, dtype=dtype, seed=14, **options)
    lengths = None if lengths is None else np.asarray(lengths)
    D = 2 if model.bidirectional else 1
    x = rng.standard_normal((T, 1, I)).astype(dtype)
    state = random_state(rng, model, 1)
    dout = rng.standard_normal((T, 1, D * 150)).astype(dtype)
    dh_n, dc_n = random_state(rng, model, 1)
    args = (x, state, lengths, dout, dh_n, dc_n)
    fl.set_num_threads(1)
    serial = run_forward_backward(model, *args)
    loops = ["layer_forward_one_row"] * 2 + ["layer_backward_one_row"] * 2  # two layers
    assert seen == [(name, D, 1, False) for name in loops]
    fl.set_num_threads(2)
    parallel = run_forward_backward(model, *args)
    split = (2, 2, True) if D == 1 else (2, 1, True)
    assert seen[4:] == [(name, *split) for name in loops]
    for name, value in serial.items():
        np.testing.assert_array_equal(parallel[name], value, err_msg=name)
    assert_matches_reference(parallel, model, args)


# ----------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------


@dtypes
@lengths_cases
def test_two_halves_with_carried_state_equal_one_run(rng, dtype, lengths):
    model = fl.LSTM(I, H, 2, proj_size=P, dtype=dtype, seed=11).eval()
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(rng, model)
    split = 2
    out, (h_n, c_n) = model(x, state, lengths)
    first_lengths = None if lengths is None else np.minimum(lengths, split)
    second_lengths = None if lengths is None else np.maximum(lengths - split, 0)
    out1, state1 = model(x[:split], state, first_lengths)
    out2, (h2, c2) = model(x[split:], state1, second_lengths)
    assert_close(np.concatenate([out1, out2]), out, dtype, what="out")
    assert_close(h2, h_n, dtype, what="h_n")
    assert_close(c2, c_n, dtype, what="c_n")


@dtypes
def test_reverse_direction_runs_over_each_sequence_own_steps(rng, dtype):
    """The reverse half of out starts at each sequence's last valid step, as torch packs it."""
    model = fl.LSTM(I, H, 1, bidirectional=True, dtype=dtype, seed=12)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0, c0 = random_state(rng, model)
    out, (h_n, c_n) = model(x, (h0, c0), LENGTHS)

    with torch.no_grad():
        t_out, (t_h, t_c) = torch_run(
            torch_twin(model), torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)),
            LENGTHS,
        )  # fmt: skip
    assert_close(out[..., H:], t_out[..., H:], dtype, what="reverse out")
    assert_close(h_n[1], t_h[1], dtype, what="reverse h_n")
    assert_close(c_n[1], t_c[1], dtype, what="reverse c_n")

    # The same from a one-direction model with the reverse weights, run on each flipped sequence.
    backward_only = fl.LSTM(I, H, 1, dtype=dtype)
    for name in backward_only.params:
        backward_only.params[name][...] = model.params[name + "_reverse"]
    for b, n in enumerate(LENGTHS):
        if n == 0:
            assert np.all(out[:, b] == 0)
            np.testing.assert_array_equal(h_n[1, b], h0[1, b])
            continue
        r_out, (r_h, r_c) = backward_only(x[:n, b][::-1], (h0[1:, b], c0[1:, b]))
        assert_close(out[:n, b, H:], r_out[::-1], dtype, what=f"sequence {b}")
        assert np.all(out[n:, b] == 0)
        assert_close(h_n[1, b], r_h[0], dtype, what=f"h_n of sequence {b}")
        assert_close(c_n[1, b], r_c[0], dtype, what=f"c_n of sequence {b}")


def deep_run(model, x, lengths, dout):
    model.zero_grad()
    state = random_state(np.random.default_rng(1), model)
    out, (h_n, c_n) = model(x, state, lengths)
    dx, (dh0, dc0) = model.backward(dout, np.ones_like(h_n), np.ones_like(c_n))
    results = {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    return results, {name: value.copy() for name, value in model.grads.items()}


@dtypes
@lengths_cases
def test_nan_in_one_sequence_stays_in_that_sequence(rng, dtype, lengths):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=13)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dout = rng.standard_normal((T, B, 2 * P)).astype(dtype)
    clean, _ = deep_run(model, x, lengths, dout)
    bad = 2  # a full-length sequence
    x[1, bad, 0] = np.nan
    dirty, grads = deep_run(model, x, lengths, dout)
    others = np.arange(B) != bad
    for name, value in clean.items():  # batch on axis 1 everywhere
        np.testing.assert_array_equal(dirty[name][:, others], value[:, others], err_msg=name)
        assert np.isnan(dirty[name][:, bad]).any(), name
    for name in ["h_n", "c_n", "dh0", "dc0"]:
        assert np.isnan(dirty[name][:, bad]).all(), name
    # The parameters see every sequence, so their gradients are NaN: that is the true math.
    assert all(np.isnan(g).any() for g in grads.values())


@dtypes
def test_nan_in_padding_is_ignored(rng, dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=14)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dout = rng.standard_normal((T, B, 2 * P)).astype(dtype)
    padding = padding_mask(LENGTHS, T)
    clean, clean_grads = deep_run(model, x, LENGTHS, dout)
    x[padding] = np.nan
    x[-1, 0] = np.inf
    dout[padding] = np.nan
    dirty, dirty_grads = deep_run(model, x, LENGTHS, dout)
    for name, value in (clean | clean_grads).items():
        got = (dirty | dirty_grads)[name]
        assert np.isfinite(got).all(), name
        np.testing.assert_array_equal(got, value, err_msg=name)


@dtypes
def test_huge_inputs_saturate_without_nan(rng, dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=15)
    signs = np.sign(rng.standard_normal((T, B, I))).astype(dtype)
    dout = np.ones((T, B, 2 * P), dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        huge, _ = deep_run(model, signs * dtype(1e30), LENGTHS, dout)
        huger, _ = deep_run(model, signs * dtype(1e32), LENGTHS, dout)
        grads = {name: value.copy() for name, value in model.grads.items()}
    for name, value in (huge | grads).items():
        assert np.isfinite(value).all(), name
    # Saturated gates are exactly 0 or 1 (tanh exactly ±1): a larger input changes nothing.
    for name in ["out", "h_n", "c_n"]:
        np.testing.assert_array_equal(huger[name], huge[name], err_msg=name)
    # σ' = 0 and tanh' = 0 at saturation: no gradient reaches the huge input of the first layer.
    assert np.all(huge["dx"] == 0)
    r_out, (r_h, r_c), _ = reference_run(
        model, signs * 1e30, random_state(np.random.default_rng(1), model), LENGTHS
    )
    assert_close(huge["out"], r_out, dtype, what="out")
    assert_close(huge["c_n"], r_c, dtype, what="c_n")


@dtypes
@pytest.mark.parametrize(
    "x_dtype", [np.float32, np.float64, np.int64, np.uint8], ids=["f32", "f64", "i64", "u8"]
)
def test_outputs_have_the_model_dtype(rng, dtype, x_dtype):
    model = fl.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=dtype, seed=16)
    x = (3 * np.abs(rng.standard_normal((T, B, I)))).astype(x_dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    state = random_state(rng, model, dtype=other)
    out, (h_n, c_n) = model(x, state, LENGTHS)
    dx, (dh0, dc0) = model.backward(np.ones(out.shape, other))
    values = {"out": out, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    values |= {f"param {k}": v for k, v in model.params.items()}
    values |= {f"grad {k}": v for k, v in model.grads.items()}
    for name, value in values.items():
        assert value.dtype == dtype, name
    model.eval()
    out, (h_n, c_n) = model(x.tolist())
    assert out.dtype == h_n.dtype == c_n.dtype == dtype


# Every layer's input projection takes one of three routes: in the time loop (batch > 1,
# weights up to FUSED_MAX_WEIGHT_BYTES; a one-row batch always, each task its own units),
# the packed micro-kernel before the loop (few rows: PACKED_PROJECTION_BYTES) or BLAS
# GEMMs before the loop. The limits, set to 0 or left, force each route; every one agrees
# with the reference and with itself on 1 and 2 threads (split into parts from
# PARALLEL_MIN_MACS = 0 on).
PROJECTION_ROUTES = {
    "in-loop": {},
    "packed": {"FUSED_MAX_WEIGHT_BYTES": 0},
    "blas": {"FUSED_MAX_WEIGHT_BYTES": 0, "PACKED_PROJECTION_BYTES": 0},
}


@dtypes
@pytest.mark.parametrize("route", list(PROJECTION_ROUTES))
@pytest.mark.parametrize(("bidirectional", "batch"), [(False, 13), (True, 4), (False, 1)])
def test_every_input_projection_route_matches_the_reference(
    rng, monkeypatch, restore_threads, dtype, route, bidirectional, batch
):
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    for name, value in PROJECTION_ROUTES[route].items():
        monkeypatch.setattr(_routes if hasattr(_routes, name) else _engine, name, value)
    calls = {"project_inputs": 0, "project_inputs_packed": 0}
    for kernel in calls:
        original = getattr(_engine._kernels, kernel)

        def counted(*args, _original=original, _kernel=kernel):
            calls[_kernel] += 1
            return _original(*args)

        monkeypatch.setattr(_engine._kernels, kernel, counted)
    model = fl.LSTM(I, H, 2, bidirectional=bidirectional, dtype=dtype, seed=4)
    D = 2 if bidirectional else 1
    lengths = None if batch == 1 else rng.integers(0, T + 1, batch)
    x = rng.standard_normal((T, batch, I)).astype(dtype)
    dout = rng.standard_normal((T, batch, D * H)).astype(dtype)
    args = (x, random_state(rng, model, batch), lengths, dout, *random_state(rng, model, batch))
    fl.set_num_threads(1)
    serial = run_forward_backward(model, *args)
    fl.set_num_threads(2)
    parallel = run_forward_backward(model, *args)
    for name, value in serial.items():
        np.testing.assert_array_equal(parallel[name], value, err_msg=name)
    assert_matches_reference(parallel, model, args)
    # (a one-row batch's loop projects its own units' inputs on every route:
    # _kernels.one_row_inputs, inside the loop's tasks)
    taken = "in-loop" if batch == 1 else route
    expected_calls = {"in-loop": (False, False), "packed": (False, True), "blas": (True, False)}
    used = (calls["project_inputs"] > 0, calls["project_inputs_packed"] > 0)
    assert used == expected_calls[taken]


@dtypes
def test_hidden_unit_split_balances_vectors(monkeypatch, restore_threads, dtype):
    """The two threads of a loop split by hidden units get whole panels of the first
    units and the rest, with vector counts (a part-valid vector counting whole, as the
    tile computes it) at most one panel apart: at H = 500 in float64 with 512-bit
    vectors, 256 + 244 units (32 and 31 vectors), not 240 + 260 (30 and 33)."""
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", 0)
    fl.set_num_threads(2)
    lanes = tiles.VECTOR_BYTES // np.dtype(dtype).itemsize
    panel = 2 * lanes
    thin = 2 * tiles.MIN_CHUNK_ROWS - 1
    for hidden in range(2 * panel, 6 * panel + 1):
        layer = fl.LSTM(I, hidden, dtype=dtype, seed=0)._layers[0]
        (d0, first0, end0), (d1, first1, end1) = _routes.units_plan(T, thin, layer, False)
        assert (d0, first0, d1, end1) == (0, 0, 0, hidden)
        assert end0 == first1 and end0 % panel == 0 and 0 < end0 < hidden
        vectors = (end0 // lanes, -(-(hidden - end0) // lanes))
        assert abs(vectors[0] - vectors[1]) <= 2, (hidden, end0, vectors)


@dtypes
def test_hidden_unit_split_only_where_row_chunks_are_thin(monkeypatch, restore_threads, dtype):
    """Two threads: the loop splits hidden units where the row chunks would not run in
    parallel (a batch under two chunks of MIN_CHUNK_ROWS; within the fused limit too,
    leaving the fused loop), or would give a thread at most one register block of rows
    with W_hh of at least UNITS_SPLIT_MIN_WEIGHT_BYTES, and a step has UNITS_STEP_MIN_MACS
    multiply-adds; otherwise it splits rows (no barrier per step) or runs on one thread."""
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", 0)
    fl.set_num_threads(2)
    hidden = 4 * tiles.VECTOR_BYTES // np.dtype(dtype).itemsize
    layer = fl.LSTM(I, hidden, dtype=dtype, seed=0)._layers[0]
    thin = 2 * tiles.ROWS  # two chunks of ROWS rows
    thick = 2 * tiles.ROWS + 2
    too_few = 2 * tiles.MIN_CHUNK_ROWS - 1  # one chunk: the row loop runs on one thread
    monkeypatch.setattr(_routes, "UNITS_SPLIT_MIN_WEIGHT_BYTES", layer.w_hh.nbytes)
    assert _routes.units_plan(T, thin, layer, False)
    assert _routes.units_plan(T, too_few, layer, False)
    assert _routes.units_plan(T, thick, layer, False) == []
    monkeypatch.setattr(_routes, "UNITS_SPLIT_MIN_WEIGHT_BYTES", layer.w_hh.nbytes + 1)
    assert _routes.units_plan(T, thin, layer, False) == []
    assert _routes.units_plan(T, too_few, layer, False)
    assert _routes.units_plan(T, thick, layer, True) == []  # fused: never
    step = too_few * layer.w_hh.shape[1] * layer.w_hh.shape[2]  # multiply-adds a step
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", step + 1)
    assert _routes.units_plan(T, too_few, layer, False) == []
    assert _routes.loop_route(T, too_few, layer) == (True, [])  # the fused loop, one thread
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", step)
    assert _routes.units_plan(T, too_few, layer, False)
    # Within the fused limit a thin batch leaves the fused loop for the split; two row
    # chunks keep it.
    fused, tasks = _routes.loop_route(T, too_few, layer)
    assert not fused and tasks == _routes.units_plan(T, too_few, layer, False)
    assert _routes.loop_route(T, 2 * tiles.MIN_CHUNK_ROWS, layer) == (True, [])
    fl.set_num_threads(1)  # one thread: no split, but the same route (the same sums)
    assert _routes.units_plan(T, thin, layer, False) == []
    assert _routes.loop_route(T, too_few, layer) == (False, [])


@dtypes
@pytest.mark.parametrize("peephole", [None, "diagonal"])
@pytest.mark.parametrize("weights", ["beyond the fused limit", "within it"])
def test_hidden_unit_split_equals_row_loop(
    rng, monkeypatch, restore_threads, dtype, peephole, weights
):
    """A batch too thin for two row chunks, one direction, two threads: the forward loop
    projects its inputs first (within the fused limit too: :func:`_routes.loop_route`),
    the forward and backward loops split the hidden units (a barrier per step) and give the
    row loops' numbers bit for bit (one thread), with lengths, in training (then backward,
    gradients included) and inference."""
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", 0)
    if weights == "beyond the fused limit":
        monkeypatch.setattr(_routes, "FUSED_MAX_WEIGHT_BYTES", 0)
    seen = []
    real = _engine._forward_units
    real_backward = _engine._backward_units

    def spy(*args):
        seen.append(args[2])
        return real(*args)

    def spy_backward(*args):
        seen.append(("backward", args[2]))
        return real_backward(*args)

    monkeypatch.setattr(_engine, "_forward_units", spy)
    monkeypatch.setattr(_engine, "_backward_units", spy_backward)
    # Two panels and half a vector of units: the split gives the first thread one panel and
    # the second the rest, a part-valid vector included.
    lanes = tiles.VECTOR_BYTES // np.dtype(dtype).itemsize
    panel = 2 * lanes
    batch, hidden = 2 * tiles.MIN_CHUNK_ROWS - 1, 2 * panel + lanes // 2
    model = fl.LSTM(I, hidden, 2, peephole=peephole, dtype=dtype, seed=31)
    lengths = np.array([5, 0, 3, 5, 1, 2, 4, 3, 2])[:batch]
    x = rng.standard_normal((T, batch, I)).astype(dtype)
    dout = rng.standard_normal((T, batch, hidden)).astype(dtype)
    args = (x, random_state(rng, model, batch), lengths, dout, *random_state(rng, model, batch))
    fl.set_num_threads(1)
    serial = run_forward_backward(model, *args)
    assert seen == []
    fl.set_num_threads(2)
    split = run_forward_backward(model, *args)
    tasks = [(0, 0, panel), (0, panel, hidden)]
    assert seen == [tasks] * 2 + [("backward", tasks)] * 2  # both layers, forward and back
    for name, value in serial.items():
        np.testing.assert_array_equal(split[name], value, err_msg=name)
    model.eval()
    out, (h_n, c_n) = model(x, args[1], lengths)
    np.testing.assert_array_equal(out, serial["out"])
    np.testing.assert_array_equal(h_n, serial["h_n"])
    np.testing.assert_array_equal(c_n, serial["c_n"])
    assert_matches_reference(split, model, args)


@dtypes
def test_first_compile_notice_checks_the_kernel_each_route_runs(
    rng, monkeypatch, restore_threads, dtype
):
    """The first-compile notice asks about the loop kernel a layer's route will run (one
    row, a thin batch's hidden-unit split, row chunks), forward and backward, so that a
    route whose kernel is not compiled yet is announced even when another route's is."""
    monkeypatch.setattr(_routes, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_routes, "UNITS_STEP_MIN_MACS", 0)
    asked = []
    monkeypatch.setattr(
        _engine, "notice_first_compile", lambda kernel, dt, phase: asked.append((kernel, phase))
    )
    fl.set_num_threads(2)
    hidden = 4 * tiles.VECTOR_BYTES // np.dtype(dtype).itemsize
    model = fl.LSTM(I, hidden, dtype=dtype, seed=0)
    thin = 2 * tiles.MIN_CHUNK_ROWS - 1
    assert _routes.loop_route(T, thin, model._layers[0])[1]  # the split, as set up
    for batch, forward_kernel, backward_kernel in [
        (1, _kernels.layer_forward_one_row, _kernels.layer_backward_one_row),
        (thin, _kernels.layer_forward_units, _kernels.layer_backward_units),
        (2 * tiles.MIN_CHUNK_ROWS, _kernels.layer_forward_rows, _kernels.layer_backward_rows),
    ]:
        asked.clear()
        x = rng.standard_normal((T, batch, I)).astype(dtype)
        out, _ = model(x)
        model.backward(np.ones_like(out))
        assert asked == [(forward_kernel, "forward"), (backward_kernel, "backward")], batch
