"""Which BLAS library the compiled kernels call: NumPy's own OpenBLAS or SciPy's.

Kernels call ``sgemm``/``dgemm``/``sgemv``/``dgemv`` by symbol from compiled code
(:mod:`fastlstm._kernels.blas`). SciPy exports its BLAS for Cython
(``scipy.linalg.cython_blas``, 32-bit integers): always there, whatever BLAS SciPy was
built with. NumPy's wheels bundle an OpenBLAS of their own (``libscipy_openblas64_``:
64-bit integers, symbols ``scipy_sgemm_64_`` ...), often a newer release than SciPy's. On
an AMD EPYC Zen 4, NumPy's 0.3.31 ran the weight gradients' GEMMs 2-9% faster than SciPy's
0.3.30 on one core (dL/da^T [x | h] at 3200 x 256 x 384: 94.8 against 88.6 GFLOP/s; 3200 x
500 x 1000: 102.1 against 95.1), and training steps took 2-7% less (medium, recog, large).

So the kernels call NumPy's OpenBLAS when threadpoolctl finds it loaded with those four
symbols and its version is at least that of every other OpenBLAS in the process;
otherwise SciPy's. ``FASTLSTM_BLAS=scipy`` (or ``numpy``) forces the choice (tests run
both). The integer width is part of the compiled code, so it keys Numba's cache
(:data:`fastlstm._config.KERNEL_KEY`).
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field

ENV_BLAS = "FASTLSTM_BLAS"
ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")


@dataclass(frozen=True)
class BlasRoutines:
    """The BLAS routines compiled kernels call.

    Attributes
    ----------
    source : str
        "numpy" (NumPy's bundled OpenBLAS) or "scipy" (``scipy.linalg.cython_blas``).
    integer_bits : int
        64 (ILP64) or 32: the width of every integer argument.
    description : str
        The library as reported (file and version), for ``fastlstm info`` and the bench.
    addresses : dict
        Routine name ("sgemm" ...) to its address in this process.
    """

    source: str
    integer_bits: int
    description: str
    addresses: dict = field(repr=False, compare=False)


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text or ""))


def _numpy_openblas(newest_only: bool) -> BlasRoutines | None:
    """NumPy's bundled ILP64 OpenBLAS if it is loaded (with ``newest_only``: and at least as
    new as every other OpenBLAS loaded), else None."""
    from threadpoolctl import ThreadpoolController

    openblas = [
        lib for lib in ThreadpoolController().lib_controllers if lib.internal_api == "openblas"
    ]
    newest = max((_version(lib.version) for lib in openblas), default=())
    for lib in openblas:
        try:
            handle = ctypes.CDLL(lib.filepath)  # already loaded: the same library
            functions = [getattr(handle, f"scipy_{name}_64_") for name in ROUTINES]
        except (OSError, AttributeError):
            continue
        if newest_only and _version(lib.version) < newest:
            return None
        addresses = {
            name: ctypes.cast(function, ctypes.c_void_p).value
            for name, function in zip(ROUTINES, functions, strict=True)
        }
        name = os.path.basename(lib.filepath)
        return BlasRoutines("numpy", 64, f"NumPy's OpenBLAS {lib.version} ({name})", addresses)
    return None


def _scipy_blas() -> BlasRoutines:
    from numba.extending import get_cython_function_address

    addresses = {
        name: get_cython_function_address("scipy.linalg.cython_blas", name) for name in ROUTINES
    }
    return BlasRoutines("scipy", 32, "SciPy's BLAS (scipy.linalg.cython_blas)", addresses)


def choose(forced: str | None = None) -> BlasRoutines:
    """The BLAS routines to call: NumPy's OpenBLAS when usable and newest, else SciPy's;
    ``forced`` ("numpy" or "scipy", default: ``$FASTLSTM_BLAS``) insists.

    Raises
    ------
    ValueError
        If ``forced`` names something else.
    RuntimeError
        If NumPy's OpenBLAS is forced but not usable here.
    """
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS: compared below)

    forced = forced if forced is not None else os.environ.get(ENV_BLAS) or None
    if forced not in (None, "numpy", "scipy"):
        raise ValueError(f"{ENV_BLAS} must be 'numpy' or 'scipy', got {forced!r}")
    if forced == "scipy":
        return _scipy_blas()
    if forced == "numpy":
        found = _numpy_openblas(newest_only=False)
        if found is None:
            raise RuntimeError(
                f"{ENV_BLAS}=numpy: NumPy's bundled OpenBLAS with 64-bit integer symbols "
                "(scipy_sgemm_64_ ...) is not loaded in this process"
            )
        return found
    return _numpy_openblas(newest_only=True) or _scipy_blas()


BLAS = choose()
