"""Arrays that the kernels read over and over, placed on huge pages where the OS offers them.

A time loop reads its packed weights at every step, from the L2 cache when they fit. In
4 KiB pages a block of weights lies on physical pages the OS picks one by one, and their
addresses decide which cache sets the block falls into: when the spread is uneven, part of
the block can be evicted at every step, by an amount that depends on the pages a process
happened to get. A 2 MiB page is physically contiguous, so the block spreads evenly over
the sets, and takes one TLB entry instead of 512 (which of the two counts more was not
measured apart). Measured on an AMD EPYC Zen 4 (1 MiB L2 a core), LSTM(256, 256) over 150
steps of one row on two threads, ten processes each way, alternating: the forward took
1.28-1.54 ms (median 1.38; one process 2.0) with the workspace in plain memory and
1.19-1.33 ms (median 1.25) with its arrays of 1 MiB and more on huge pages; the training
step 3.97 -> 3.81 ms (medians of eight); medium, recog and large unchanged, and a stream's
step of one row, H = 256 (25 us).

:func:`empty` and :func:`zeros` give such an array on Linux with transparent huge pages
(``madvise`` or ``always``): an anonymous private mapping, advised ``MADV_HUGEPAGE``, the
array starting on a huge-page boundary. Elsewhere, or for arrays under :data:`MIN_BYTES`,
``np.empty`` and ``np.zeros``. The kernel may still back the mapping with small pages (no
free huge page): the array is then an ordinary array, only aligned.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_THP_PAGE_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


def _huge_page_bytes() -> int:
    """The transparent huge page size in bytes, or 0 when there are none to ask for."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    try:
        with open(_THP_ENABLED) as enabled:
            if "[never]" in enabled.read():
                return 0
        with open(_THP_PAGE_SIZE) as size:
            return int(size.read())
    except (OSError, ValueError):
        return 0


HUGE_PAGE_BYTES = _huge_page_bytes()
# From half a huge page on: a smaller array would leave most of its page unused (the
# kernel backs a touched huge page whole), and is less likely to crowd a cache set.
MIN_BYTES = HUGE_PAGE_BYTES // 2 if HUGE_PAGE_BYTES else 0


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, on huge pages when there are any and it takes
    at least :data:`MIN_BYTES`; else ``np.empty``. The mapping lives as long as the array
    (and its views): it is unmapped with them."""
    mapped = on_huge_pages(shape, dtype)
    return mapped if mapped is not None else np.empty(shape, dtype)


def zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """:func:`empty`, filled with zeros (a fresh mapping is zero already)."""
    mapped = on_huge_pages(shape, dtype)
    return mapped if mapped is not None else np.zeros(shape, dtype)


def on_huge_pages(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """A zeroed array in a fresh mapping advised to huge pages, starting on a huge-page
    boundary; None when there are no huge pages, the array is under MIN_BYTES or the OS
    refuses the mapping (callers with needs of their own, such as an alignment, then
    make their array themselves)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if not HUGE_PAGE_BYTES or nbytes < MIN_BYTES:
        return None
    page = HUGE_PAGE_BYTES
    span = -(-nbytes // page) * page
    # One page more than needed, so that a page boundary falls in the first page; the
    # part before it is never touched, so never backed by memory.
    try:
        region = mmap.mmap(-1, span + page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # (no mapping left, e.g. vm.max_map_count reached: NumPy's memory)
        return None
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # (a kernel built without huge pages: the array is only aligned)
        pass
    raw = np.frombuffer(region, np.uint8)
    skip = -raw.ctypes.data % page
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)
