"""The workspace's large arrays on huge pages (fastlstm._memory) and their fallbacks."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import fastlstm
from fastlstm import _engine, _memory

HUGE = 2 << 20


@pytest.fixture
def huge_pages(monkeypatch):
    """The mapped path whatever the machine offers: 2 MiB pages, from 1 MiB arrays on."""
    monkeypatch.setattr(_memory, "HUGE_PAGE_BYTES", HUGE)
    monkeypatch.setattr(_memory, "MIN_BYTES", HUGE // 2)


@pytest.mark.parametrize("maker", [_memory.empty, _memory.zeros])
@pytest.mark.parametrize("shape", [(1 << 18,), (3, 700, 300), (2, 4, 1024, 33)])
def test_large_arrays_start_on_a_huge_page(huge_pages, maker, shape):
    array = maker(shape, np.float32)
    assert array.shape == shape and array.dtype == np.float32
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.ctypes.data % HUGE == 0
    if maker is _memory.zeros:
        assert not array.any()
    array[...] = 1.5  # every byte of it is usable
    assert array.sum(dtype=np.float64) == 1.5 * array.size


def test_small_arrays_are_plain(huge_pages):
    small = _memory.empty((1000,), np.float64)
    assert small.base is None  # np.empty's own memory, no mapping
    zeros = _memory.zeros((HUGE // 2 // 8 - 1,), np.float64)
    assert zeros.base is None and not zeros.any()


def test_a_view_keeps_the_mapping(huge_pages):
    view = _memory.zeros((1 << 19,), np.float32)[10:20]
    gc.collect()
    view[:] = 3
    assert view.tolist() == [3.0] * 10


def test_no_huge_pages_means_numpy_arrays(monkeypatch):
    monkeypatch.setattr(_memory, "HUGE_PAGE_BYTES", 0)
    monkeypatch.setattr(_memory, "MIN_BYTES", 0)
    big = _memory.empty((1 << 20,), np.float32)
    assert big.base is None and big.shape == (1 << 20,)
    zeros = _memory.zeros((1 << 20,), np.float32)
    assert zeros.base is None and not zeros.any()


@pytest.mark.parametrize(
    ("enabled", "expected"),
    [("always [madvise] never\n", HUGE), ("[always] madvise never\n", HUGE),
     ("always madvise [never]\n", 0)],
)  # fmt: skip
def test_huge_page_size_follows_the_os_setting(tmp_path, monkeypatch, enabled, expected):
    (tmp_path / "enabled").write_text(enabled)
    (tmp_path / "size").write_text(f"{HUGE}\n")
    monkeypatch.setattr(_memory, "_THP_ENABLED", str(tmp_path / "enabled"))
    monkeypatch.setattr(_memory, "_THP_PAGE_SIZE", str(tmp_path / "size"))
    assert _memory._huge_page_bytes() == expected
    monkeypatch.setattr(_memory, "_THP_ENABLED", str(tmp_path / "absent"))
    assert _memory._huge_page_bytes() == 0


def test_workspace_takes_large_arrays_on_huge_pages(huge_pages):
    shape = (1, 4, 150, 1024)  # 2.4 MB of float32: a fresh one, not from the pool
    array = _engine._take(shape, np.dtype(np.float32))
    assert array.shape == shape and array.ctypes.data % HUGE == 0
    _engine._give(array)
    assert _engine._take(shape, np.dtype(np.float32)) is array  # and is reused


@pytest.mark.parametrize("batch", [1, 4])
def test_results_on_huge_pages_match_plain_memory(monkeypatch, batch):
    """The same bits whichever memory the workspace and a stream's weights sit in."""
    rng = np.random.default_rng(5)
    model = fastlstm.LSTM(200, 256)
    x = rng.standard_normal((30, batch, 200)).astype(np.float32)
    dout = rng.standard_normal((30, batch, 256)).astype(np.float32)
    results = []
    for page in (0, HUGE):
        monkeypatch.setattr(_memory, "HUGE_PAGE_BYTES", page)
        monkeypatch.setattr(_memory, "MIN_BYTES", page // 2)
        monkeypatch.setattr(_engine._local, "free", None)  # a fresh workspace each way
        model.zero_grad()
        out, _ = model(x)
        model.backward(dout)
        stream = model.stream(batch)
        results.append((out, model.grads["weight_hh_l0"].copy(), stream.step(x[0])))
    for plain, mapped in zip(*results, strict=True):
        np.testing.assert_array_equal(plain, mapped)


def test_a_failed_mapping_falls_back_to_numpy(huge_pages, monkeypatch):
    monkeypatch.setattr(_memory.mmap, "mmap", _refuse)
    array = _memory.empty((1 << 20,), np.float32)
    assert array.base is None and array.shape == (1 << 20,)
    zeros = _memory.zeros((1 << 20,), np.float32)
    assert zeros.base is None and not zeros.any()


def test_a_streams_large_arrays_start_on_a_cache_line_whatever_the_memory(monkeypatch):
    from fastlstm import stream

    for page in (0, HUGE):
        monkeypatch.setattr(_memory, "HUGE_PAGE_BYTES", page)
        monkeypatch.setattr(_memory, "MIN_BYTES", page // 2)
        array = stream._aligned_zeros(1 << 20, np.float32)
        assert array.shape == (1 << 20,) and not array.any()
        assert array.ctypes.data % (page or 64) == 0
    monkeypatch.setattr(_memory.mmap, "mmap", _refuse)  # the OS refuses the mapping
    array = stream._aligned_zeros(1 << 20, np.float32)
    assert array.ctypes.data % 64 == 0 and not array.any()


def _refuse(*args, **kwargs):
    raise OSError(12, "Cannot allocate memory")
