"""Every kernel variant this machine can execute, not only the one it picks.

The rest of the suite runs the variant fastlstm chooses here (``fastlstm._cpu.VARIANT``).
Each other variant runs the kernel tests again in a fresh interpreter with
``FASTLSTM_VARIANT`` set and Numba told to compile for a CPU of that kind
(``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``): the AVX2 variant as on a Haswell, the
128-bit one as on an x86-64 with SSE4.2 and no FMA (LLVM then computes each fused
multiply-add in software: slow, exact). So an AVX-512 machine also tests what an AVX2 or an
older machine runs, down to the instructions LLVM may emit. The tests inside compare
against the reference and torch in both dtypes and check 1 vs 2 threads bit for bit.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from utils import ROOT, pytest_in_fresh_interpreter

from fastlstm import _cpu

# What each variant's interpreter is told about the CPU (x86-64; ARM64 runs only v128).
_X86_TARGETS = {
    "avx512": None,  # the host itself (only reached when it is not the default)
    "avx2": ("haswell", "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,-avx512f"),
    "v128": ("x86-64-v2", "+sse4.2,+popcnt,-avx,-avx2,-fma,-avx512f"),
}

KERNEL_TESTS = [
    "tests/test_packed.py",
    "tests/test_activations.py",
    "tests/test_lstm_forward.py",
    "tests/test_lstm_backward.py",
    "tests/test_cell.py",
    "tests/test_variants.py",
    "tests/test_stream.py",
]

OTHER_VARIANTS = [name for name in _cpu.runnable_variants(_cpu.CPU) if name != _cpu.VARIANT.name]


def variant_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env[_cpu.ENV_VARIANT] = name
    target = _X86_TARGETS.get(name) if _cpu.CPU.architecture in ("x86_64", "amd64") else None
    if target is not None:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = target
    return env


def test_the_default_is_the_widest_runnable_variant():
    runnable = _cpu.runnable_variants(_cpu.CPU)
    assert os.environ.get(_cpu.ENV_VARIANT) or _cpu.VARIANT == next(iter(runnable.values()))
    assert "v128" in runnable
    assert _cpu.VARIANT.rows >= 1 and 2 * _cpu.VARIANT.rows + 3 <= _cpu.VARIANT.registers


def test_a_variant_the_cpu_cannot_run_is_refused():
    narrow = dataclasses.replace(_cpu.CPU, isa="sse", fma=False)
    with pytest.raises(RuntimeError, match="avx512.*runs only the variants v128"):
        _cpu.choose_variant(narrow, "avx512")
    assert _cpu.choose_variant(narrow).name == "v128"


@pytest.mark.parametrize("name", OTHER_VARIANTS)
def test_kernels_under_variant(name):
    """The kernel tests pass under ``name``, which really is the variant that ran."""
    tests = [path for path in KERNEL_TESTS if (ROOT / path).exists()]
    pytest_in_fresh_interpreter(
        variant_env(name), "from fastlstm import _cpu; print(_cpu.VARIANT.name)", name, tests,
        timeout=2400,
    )  # fmt: skip
