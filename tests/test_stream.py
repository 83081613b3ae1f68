"""Streaming inference (lstm.stream / cell.stream): the numbers of one eval-mode forward over
the whole sequence, whatever the chunking; state get/set/reset; weight snapshots; bad input;
no allocation per step; separate streams in separate threads; against torch."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
import torch
from numba.core.runtime import _nrt_python, rtsys
from utils import assert_close

import fastlstm as fl
from fastlstm._kernels.stream import M_ONE_ROW

I, H, P = 5, 7, 3  # noqa: E741
dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
# (num_layers, proj_size, peephole)
CONFIGS = {
    "L1": (1, 0, None),
    "L3": (3, 0, None),
    "L2-proj": (2, P, None),
    "L2-diagonal": (2, 0, "diagonal"),
    "L2-full": (2, 0, "full"),
    "L2-proj-diagonal": (2, P, "diagonal"),
    "L1-proj-full": (1, P, "full"),
}
configs = pytest.mark.parametrize("config", list(CONFIGS))


def tolerance(dtype) -> dict:
    """float64 to 1e-12 (DESIGN.md); float32 within float32 rounding."""
    return {"rtol": 1e-12, "atol": 1e-12} if np.dtype(dtype) == np.float64 else {}


def make(config, dtype, *, seed=0, batch_first=False, bias=True, hidden=H):
    layers, proj, peephole = CONFIGS[config]
    return fl.LSTM(I, hidden, layers, proj_size=proj, peephole=peephole, dtype=dtype, seed=seed,
                   batch_first=batch_first, bias=bias)  # fmt: skip


def whole(model, x, state=None):
    """One eval-mode forward over the whole sequence (the model's mode restored)."""
    training = model.training
    model.eval()
    try:
        return model(x, state)
    finally:
        model.train(training)


def chunks(steps, rng):
    """Random chunk boundaries over ``steps`` steps (empty chunks included)."""
    sizes = []
    while sum(sizes) < steps:
        sizes.append(int(rng.integers(0, 4)))
    sizes[-1] -= sum(sizes) - steps
    return np.cumsum([0, *sizes])


# ------------------------------------------------------------------------------ numbers


@dtypes
@configs
@pytest.mark.parametrize("batch", [1, 4])
def test_steps_and_chunks_equal_one_forward(rng, dtype, config, batch):
    model = make(config, dtype)
    steps = 9
    x = rng.standard_normal((steps, batch, I)).astype(dtype)
    expected, (h_n, c_n) = whole(model, x)
    stream = model.stream(batch)
    stepped = np.stack([stream.step(x[t]) for t in range(steps)])
    assert_close(stepped, expected, dtype, **tolerance(dtype), what="stepped outputs")
    h, c = stream.state
    assert_close(h, h_n, dtype, **tolerance(dtype), what="stepped h_n")
    assert_close(c, c_n, dtype, **tolerance(dtype), what="stepped c_n")

    stream.reset()
    bounds = chunks(steps, rng)
    parts = [stream(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert_close(np.concatenate(parts), expected, dtype, **tolerance(dtype), what="chunks")
    assert_close(stream.state[0], h_n, dtype, **tolerance(dtype), what="chunked h_n")
    assert_close(stream.state[1], c_n, dtype, **tolerance(dtype), what="chunked c_n")


@dtypes
@pytest.mark.parametrize("config", ["L3", "L2-proj-diagonal", "L2-full"])
def test_rows_bit_identical_to_fused_forward(rng, dtype, config):
    """With B > 1 a step runs the fused forward loop's product and gate passes in the same
    order (weights within its limit), so stream and forward agree to the bit."""
    model = make(config, dtype)
    x = rng.standard_normal((6, 3, I)).astype(dtype)
    expected, (h_n, c_n) = whole(model, x)
    stream = model.stream(3)
    got = np.concatenate([stream(x[:2]), np.stack([stream.step(x[t]) for t in range(2, 6)])])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(stream.state[0], h_n)
    np.testing.assert_array_equal(stream.state[1], c_n)


@dtypes
@pytest.mark.parametrize("config", ["L3", "L2-proj-diagonal", "L1-proj-full"])
def test_one_row_kernel_equals_one_forward(rng, dtype, config):
    """B = 1 with H beyond half a chunk of the one-row kernel takes that kernel (small H
    takes the register tile, as B > 1 does)."""
    model = make(config, dtype, hidden=70)
    x = rng.standard_normal((6, 1, I)).astype(dtype)
    expected, (h_n, c_n) = whole(model, x)
    stream = model.stream()
    assert stream._meta[M_ONE_ROW] == 1
    assert make(config, dtype).stream()._meta[M_ONE_ROW] == 0
    stepped = np.stack([stream.step(x[t]) for t in range(3)])
    rest = stream(x[3:])
    assert_close(np.concatenate([stepped, rest]), expected, dtype, **tolerance(dtype))
    assert_close(stream.state[0], h_n, dtype, **tolerance(dtype))
    assert_close(stream.state[1], c_n, dtype, **tolerance(dtype))


@dtypes
def test_batch_first_and_unbatched(rng, dtype):
    model = make("L2-proj", dtype, batch_first=True)
    x = rng.standard_normal((3, 8, I)).astype(dtype)  # (B, T, I)
    expected, (h_n, c_n) = whole(model, x)
    stream = model.stream(3)
    out = np.full((3, 8, P), np.nan, dtype)
    assert stream(x[:, :5], out=out[:, :5].copy()).shape == (3, 5, P)
    stream.reset()
    first = stream(x[:, :5])
    second = stream(x[:, 5:])
    assert_close(np.concatenate([first, second], axis=1), expected, dtype, **tolerance(dtype))
    assert_close(stream.state[1], c_n, dtype, **tolerance(dtype))
    assert stream(np.zeros((3, 0, I), dtype)).shape == (3, 0, P)  # T = 0: nothing changes
    assert_close(stream.state[1], c_n, dtype, **tolerance(dtype))
    # one step of a batch-first model takes (B, I), as a cell does
    stream.reset()
    assert_close(stream.step(x[:, 0]), expected[:, 0], dtype, **tolerance(dtype))

    one = model.stream()  # B = 1: (I,) -> (H_out,), (T, I) -> (T, H_out)
    seq = x[1]
    expected_one, (h_one, _) = whole(model, seq)
    y0 = one.step(seq[0])
    assert y0.shape == (P,)
    rest = one(seq[1:])
    assert rest.shape == (7, P)
    assert_close(np.concatenate([y0[None], rest]), expected_one, dtype, **tolerance(dtype))
    h, c = one.state
    assert h.shape == (2, 1, P) and c.shape == (2, 1, H)  # B = 1 kept
    assert_close(h[:, 0], h_one, dtype, **tolerance(dtype))


@dtypes
def test_cell_stream_equals_cell_calls(rng, dtype):
    cell = fl.LSTMCell(I, H, peephole="diagonal", dtype=dtype, seed=3)
    cell.eval()
    x = rng.standard_normal((6, 4, I)).astype(dtype)
    h, c = np.zeros((4, H), dtype), np.zeros((4, H), dtype)
    expected = []
    for t in range(6):
        h, c = cell(x[t], (h, c))
        expected.append(h)
    stream = cell.stream(4)
    assert_close(stream(x[:2]), np.stack(expected[:2]), dtype, **tolerance(dtype))
    for t in range(2, 6):
        assert_close(stream.step(x[t]), expected[t], dtype, **tolerance(dtype))
    got_h, got_c = stream.state
    assert got_h.shape == (4, H)
    assert_close(got_h, h, dtype, **tolerance(dtype))
    assert_close(got_c, c, dtype, **tolerance(dtype))
    single = cell.stream()
    assert single.step(x[0, 0]).shape == (H,)
    assert single.state[0].shape == (1, H)


# ----------------------------------------------------------------- state, reset, refresh


@dtypes
def test_reset_rows_starts_fresh_sequences_there(rng, dtype):
    model = make("L2-diagonal", dtype)
    x = rng.standard_normal((10, 3, I)).astype(dtype)
    expected, _ = whole(model, x)
    fresh, (h_fresh, _) = whole(model, x[4:, 1:2])  # row 1 restarted at step 4
    stream = model.stream(3)
    stream(x[:4])
    stream.reset([1])
    later = stream(x[4:])
    assert_close(later[:, [0, 2]], expected[4:, [0, 2]], dtype, **tolerance(dtype))
    assert_close(later[:, 1:2], fresh, dtype, **tolerance(dtype))
    assert_close(stream.state[0][:, 1], h_fresh[:, 0], dtype, **tolerance(dtype))
    stream.reset(np.array([0, 2]))
    assert not stream.state[0][:, [0, 2]].any() and not stream.state[1][:, [0, 2]].any()
    assert stream.state[1][:, 1].any()
    stream.reset()
    assert not stream.state[0].any() and not stream.state[1].any()


@dtypes
def test_state_setter_getter(rng, dtype):
    model = make("L2-proj", dtype)
    x = rng.standard_normal((5, 2, I)).astype(dtype)
    h0 = rng.standard_normal((2, 2, P)).astype(dtype)
    c0 = rng.standard_normal((2, 2, H)).astype(dtype)
    expected, (h_n, c_n) = whole(model, x, (h0, c0))
    stream = model.stream(2)
    stream.state = (h0.tolist(), c0)  # any array-like, copied in
    h0[...] = 0  # the caller's later edits are not seen
    assert_close(stream(x), expected, dtype, **tolerance(dtype))
    h, c = stream.state
    assert_close(h, h_n, dtype, **tolerance(dtype))
    h[...] = 7  # copies out: editing them changes nothing
    assert_close(stream.state[0], h_n, dtype, **tolerance(dtype))
    stream.state = None
    assert not stream.state[0].any()

    one = model.stream()
    h1 = rng.standard_normal((2, P)).astype(dtype)
    c1 = rng.standard_normal((2, H)).astype(dtype)
    one.state = (h1, c1)  # B = 1 also takes forward's unbatched state layout
    assert_close(one.state[0], h1[:, None], dtype, check_dtype=True)


def test_refresh_snapshot_and_model_untouched(rng):
    model = make("L2-full", np.float64)
    assert model.training
    params_before = model.state_dict()
    x = rng.standard_normal((6, 2, I))
    stream = model.stream(2)
    stream(x[:3])
    for value in model.params.values():
        value *= 1.5  # in-place edits: invisible until refresh
    old = make("L2-full", np.float64)
    assert_close(stream(x[3:4])[0], whole(old, x[:4])[0][3], np.float64, **tolerance(np.float64))
    state = stream.state
    stream.refresh()  # the new weights, the state kept
    expected_new, _ = whole(model, x[4:], state)
    assert_close(stream(x[4:]), expected_new, np.float64, **tolerance(np.float64))
    # the stream never changed the model: its mode, caches and parameters
    assert model.training and model._caches == []
    for name, value in params_before.items():
        np.testing.assert_array_equal(model.params[name], value * 1.5)
    with pytest.raises(RuntimeError):
        model.backward(np.zeros((1, 2, H)))


# ------------------------------------------------------------------------------- torch


def test_against_torch_lstm_and_cell(rng):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=2, proj_size=P).double().eval()
    model = fl.LSTM.from_torch(ref)
    stream = model.stream(3)
    x = rng.standard_normal((7, 3, I))
    state = None
    for t in range(7):
        with torch.no_grad():
            y, state = ref(torch.from_numpy(x[t : t + 1]), state)
        assert_close(stream.step(x[t]), y[0], np.float64, **tolerance(np.float64))
    assert_close(stream.state[0], state[0], np.float64, **tolerance(np.float64))
    assert_close(stream.state[1], state[1], np.float64, **tolerance(np.float64))

    ref_cell = torch.nn.LSTMCell(I, H)  # float32
    cell = fl.LSTMCell.from_torch(ref_cell)
    cell_stream = cell.stream(2)
    hc = None
    for t in range(7):
        with torch.no_grad():
            hc = ref_cell(torch.from_numpy(x[t, :2].astype(np.float32)), hc)
        assert_close(cell_stream.step(x[t, :2].astype(np.float32)), hc[0], np.float32)
    assert_close(cell_stream.state[1], hc[1], np.float32)


# ------------------------------------------------------------------ allocation, threads


def test_steps_in_two_parts_with_out_accumulate_nothing(rng):
    """A stream stepping its rows in two parts on two threads: the hand-off makes a few
    short-lived Python objects per step (the task tuples; the helper's call into its
    native wait, alive while it waits, or its wait on its gate if a step came late), but
    nothing accumulates: 2000 more steps leave the traced memory within what one step's
    objects in flight take (a leak of one small object a step would show as 56 KB)."""
    threads = fl.get_num_threads()
    try:
        fl.set_num_threads(2)
        stream = fl.LSTM(128, 128, seed=0).eval().stream(16)
        assert len(stream._parts) == 2
        x = rng.standard_normal((16, 128)).astype(np.float32)
        out = np.empty((16, 128), np.float32)
        for _ in range(5):
            stream.step(x, out=out)
        tracemalloc.start()
        try:
            for _ in range(100):
                stream.step(x, out=out)
            before = tracemalloc.take_snapshot()
            for _ in range(2000):
                stream.step(x, out=out)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    finally:
        fl.set_num_threads(threads)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    after, before = after.filter_traces(ignore), before.filter_traces(ignore)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 1024, f"2000 steps in two parts with out= left {grown} more bytes allocated"


@dtypes
@pytest.mark.parametrize("batch", [1, 3])
def test_step_with_out_allocates_nothing(rng, dtype, batch):
    model = make("L2-proj-diagonal", dtype)
    stream = model.stream(batch)
    x = rng.standard_normal((batch, I)).astype(dtype)
    out = np.empty((batch, P), dtype)
    for _ in range(5):  # warm up (compile, caches of the dispatcher)
        stream.step(x, out=out)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(200):
            result = stream.step(x, out=out)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the snapshots themselves
    after, before = after.filter_traces(ignore), before.filter_traces(ignore)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown == 0, f"200 steps with out= left {grown} bytes allocated"
    assert result is out


def nrt_allocations(call) -> int:
    """Numba runtime allocations made by ``call()``."""
    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats().alloc
        call()
        return rtsys.get_allocation_stats().alloc - before
    finally:
        _nrt_python.memsys_disable_stats()


@pytest.mark.parametrize("config", ["L2-proj-diagonal", "L1-proj-full"])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_allocates_nothing_per_step(rng, config, batch):
    """A chunk of 200 steps makes exactly the Numba allocations of a chunk of one step
    (the wrappers of its array arguments): none per step."""
    stream = make(config, np.float32).stream(batch)
    x = rng.standard_normal((200, batch, I)).astype(np.float32)
    out = np.empty((200, batch, P), np.float32)
    stream(x, out=out)
    one = nrt_allocations(lambda: stream(x[:1], out=out[:1]))
    many = nrt_allocations(lambda: stream(x, out=out))
    assert many == one, f"{many - one} kernel allocations over 199 more steps"


def test_without_out_each_call_returns_a_new_array(rng):
    stream = make("L1", np.float32).stream(2)
    x = rng.standard_normal((2, I)).astype(np.float32)
    first = stream.step(x)
    first_copy = first.copy()
    second = stream.step(x)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, first_copy)  # not overwritten by the next call
    chunk = rng.standard_normal((3, 2, I)).astype(np.float32)
    assert not np.shares_memory(stream(chunk), stream(chunk))


def test_out_of_an_equal_dtype_that_is_not_the_same_object_is_taken(rng):
    """The fast path compares dtypes by identity; an equal dtype (here with metadata) goes
    the slow way and is written all the same, by step and by a chunk."""
    model = make("L1", np.float32)
    x = rng.standard_normal((3, 2, I)).astype(np.float32)
    equal = np.dtype(np.float32, metadata={"tag": 1})
    assert equal == np.float32 and equal is not np.dtype(np.float32)
    plain, tagged = model.stream(2), model.stream(2)
    out = np.empty((2, H), equal)
    assert tagged.step(x[0], out=out) is out
    np.testing.assert_array_equal(out, plain.step(x[0]))
    chunk = np.empty((2, 2, H), equal)
    assert tagged(x[1:], out=chunk) is chunk
    np.testing.assert_array_equal(chunk, plain(x[1:]))


@dtypes
def test_streams_in_threads_equal_serial(rng, dtype):
    model = make("L3", dtype)
    inputs = [rng.standard_normal((60, 2, I)).astype(dtype) for _ in range(4)]
    serial = []
    for x in inputs:
        stream = model.stream(2)
        serial.append(np.stack([stream.step(x[t]) for t in range(len(x))]))
    results = [None] * 4
    barrier = threading.Barrier(4)

    def run(k):
        stream = model.stream(2)
        barrier.wait()
        results[k] = np.stack([stream.step(inputs[k][t]) for t in range(len(inputs[k]))])

    workers = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for got, expected in zip(results, serial, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("config", ["L3", "L2-proj-diagonal", "L2-full"])
def test_rows_in_two_parts_on_two_threads(rng, monkeypatch, config):
    """A step may run its rows as two parts on two threads: the same bits as one part, and
    chunks (one thread) and steps mixed on such a stream agree with forward."""
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MACS", 0)
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MIN_ROWS", 4)
    threads = fl.get_num_threads()
    fl.set_num_threads(2)
    try:
        model = make(config, np.float32)
        split = model.stream(5)
    finally:
        fl.set_num_threads(threads)
    assert [part[:2] for part in split._parts] == [(0, 2), (2, 5)]
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MACS", None)
    whole_rows = model.stream(5)
    assert len(whole_rows._parts) == 1
    x = rng.standard_normal((8, 5, I)).astype(np.float32)
    expected, (h_n, c_n) = whole(model, x)
    got = np.stack([split.step(x[t]) for t in range(4)] + list(split(x[4:6])))
    got = np.concatenate([got, np.stack([split.step(x[t]) for t in range(6, 8)])])
    np.testing.assert_array_equal(got, np.stack([whole_rows.step(x[t]) for t in range(8)]))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(split.state[1], c_n)


def test_large_steps_take_two_parts_by_default_with_the_same_bits(rng):
    """From PARALLEL_STEP_MACS multiply-adds a step and PARALLEL_STEP_MIN_ROWS rows, with two
    threads, a stream steps its rows in two parts; fewer rows, less work or one thread:
    one part. The parts give the bits of one part."""
    hidden = 128
    macs = 16 * 4 * hidden * (hidden + hidden)
    assert macs >= fl.stream.PARALLEL_STEP_MACS and fl.stream.PARALLEL_STEP_MIN_ROWS <= 16
    model = fl.LSTM(hidden, hidden, seed=0).eval()
    threads = fl.get_num_threads()
    try:
        fl.set_num_threads(2)
        split, few_rows = model.stream(16), model.stream(fl.stream.PARALLEL_STEP_MIN_ROWS - 1)
        small = fl.LSTM(hidden // 4, hidden // 4, seed=0).eval().stream(16)
        fl.set_num_threads(1)
        one_thread = model.stream(16)
    finally:
        fl.set_num_threads(threads)
    assert len(split._parts) == 2
    assert len(few_rows._parts) == len(small._parts) == len(one_thread._parts) == 1
    x = rng.standard_normal((20, 16, hidden)).astype(np.float32)
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(split.step(x[t]), one_thread.step(x[t]), err_msg=f"{t}")


def test_two_parts_never_share_rows_across_layers(rng, monkeypatch):
    """Parts run their rows through every layer without waiting for each other, so one may
    be at layer 0 (rows [x_t | h] of depth I + P) while the other is at layer 1 (depth
    H + P): their rows must not overlap in the shared scratch. Many steps, so that a race
    shows (with the rows at b * depth per layer, 7% of 8-step runs differed under v128)."""
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MACS", 0)
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MIN_ROWS", 4)
    threads = fl.get_num_threads()
    fl.set_num_threads(2)
    try:
        model = make("L3", np.float32)
        split = model.stream(5)
    finally:
        fl.set_num_threads(threads)
    monkeypatch.setattr(fl.stream, "PARALLEL_STEP_MACS", None)
    one_part = model.stream(5)
    assert len(split._parts) == 2 and len(one_part._parts) == 1
    assert I != H  # layers of different depths
    x = rng.standard_normal((1500, 5, I)).astype(np.float32)
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(split.step(x[t]), one_part.step(x[t]), err_msg=f"step {t}")


def test_nan_stays_in_its_row(rng):
    stream = make("L2-proj", np.float64).stream(3)
    x = rng.standard_normal((4, 3, I))
    x[1, 1, 2] = np.nan
    out = stream(x)
    assert np.isnan(out[1:, 1]).all()
    assert np.isfinite(out[:, [0, 2]]).all() and np.isfinite(out[0]).all()
    stream.reset([1])
    assert np.isfinite(stream.step(x[0])).all()


# ---------------------------------------------------------------------------- bad input


def test_bad_input_refused_state_unchanged(rng):
    model = make("L2-proj", np.float32)
    stream = model.stream(2)
    stream(rng.standard_normal((3, 2, I)))
    h, c = stream.state
    good = np.zeros((2, I), np.float32)
    cases = [
        (ValueError, lambda: stream.step(np.zeros((3, I)))),  # wrong rows
        (ValueError, lambda: stream.step(np.zeros((2, I + 1)))),  # wrong width
        (ValueError, lambda: stream.step(np.zeros(I))),  # unbatched needs B == 1
        (TypeError, lambda: stream.step(np.zeros((2, I), complex))),
        (TypeError, lambda: stream.step(np.array([["a"] * I] * 2))),
        (TypeError, lambda: stream.step(None)),
        (ValueError, lambda: stream(np.zeros((3, 3, I)))),
        (ValueError, lambda: stream(np.zeros((3, I)))),
        (ValueError, lambda: stream.step(good, out=np.empty((2, H), np.float32))),
        (TypeError, lambda: stream.step(good, out=np.empty((2, P), np.float64))),
        (TypeError, lambda: stream.step(good, out=[[0.0] * P] * 2)),
        (ValueError, lambda: stream.step(good, out=np.empty((P, 2), np.float32).T)),
        (ValueError, lambda: stream(np.zeros((3, 2, I)), out=np.empty((3, 2, H), np.float32))),
        (TypeError, lambda: setattr(stream, "state", np.zeros((2, 2, P)))),
        (ValueError, lambda: setattr(stream, "state", (np.zeros((2, 2, P)), np.zeros((2, 2, P))))),
        (ValueError, lambda: setattr(stream, "state", (np.zeros((1, 2, P)), np.zeros((2, 2, H))))),
        (ValueError, lambda: stream.reset([2])),
        (ValueError, lambda: stream.reset([-1])),
        (TypeError, lambda: stream.reset([0.5])),
        (TypeError, lambda: stream.reset([True])),
    ]
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert "expected" in str(info.value) or "must" in str(info.value), info.value
        np.testing.assert_array_equal(stream.state[0], h)
        np.testing.assert_array_equal(stream.state[1], c)
    with pytest.raises(ValueError, match=r"expected shape \(B, I\) = \(2, 5\).*got \(3, 5\)"):
        stream.step(np.zeros((3, I)))
    # what converts, runs: integers, lists, read-only and non-contiguous arrays
    wide = np.zeros((2, 2 * I), np.float32)[:, ::2]
    readonly = np.zeros((2, I), np.float32)
    readonly.flags.writeable = False
    for x in (np.zeros((2, I), np.int64), [[0] * I] * 2, wide, readonly):
        assert stream.step(x).shape == (2, P)


def test_stream_arguments_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        fl.LSTM(I, H, bidirectional=True).stream()
    model = make("L1", np.float32)
    for bad, error in ((0, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error):
            model.stream(bad)
    with pytest.raises(ValueError):
        fl.LSTMCell(I, H).stream(0)
    assert model.stream(np.int64(3)).batch_size == 3


def test_bench_streaming_cli(capsys):
    from fastlstm import cli

    argv = ["bench", "--streaming", "--stream-hidden", "8", "--stream-batch", "1,2"]
    assert cli.main([*argv, "--repeats", "3", "--settle", "0", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "CPU: " in text
    lines = text.splitlines()
    rows = [line.split() for line in lines if line.lstrip().startswith("8 ")]
    table = [row for row in rows if not row[2][0].isdigit()]  # H B peer peer_us fl_us ratio
    splits = [row for row in rows if row[2][0].isdigit()]  # H B step python dispatch kernel parts
    assert {row[2] for row in table} == {"torch", "onnxruntime"}, text
    assert len(table) == 4 and len(splits) == 2, text
    for row in table:
        assert float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith("x")
    for row in splits:
        step, parts = float(row[2]), [float(v) for v in row[3:6]]
        assert step > 0 and all(v >= 0 for v in parts) and abs(sum(parts) - step) < 0.02
    with pytest.raises(SystemExit):
        cli.main([*argv[:2], "--stream-hidden", "0"])
