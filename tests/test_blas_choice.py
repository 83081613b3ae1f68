"""Which BLAS the compiled kernels call (fastlstm._blas_choice), and that the other usable
route gives the same gradients: the suite runs with the default, a fresh interpreter with
FASTLSTM_BLAS set runs the BLAS-heavy tests again with the other."""

from __future__ import annotations

import os

import numpy as np
import pytest
from utils import pytest_in_fresh_interpreter

from fastlstm import _blas_choice, _config
from fastlstm._blas_choice import BLAS, ENV_BLAS, choose


def usable_routes() -> list[str]:
    routes = ["scipy"]
    if _blas_choice._numpy_openblas(newest_only=False) is not None:
        routes.append("numpy")
    return routes


OTHER_ROUTES = [route for route in usable_routes() if route != BLAS.source]


def test_the_default_is_numpys_openblas_when_it_is_the_newest():
    """As the libraries loaded now stand (a later import may have loaded another since
    fastlstm chose at its own import, so the choice is asked again here)."""
    forced = os.environ.get(ENV_BLAS)
    newest = _blas_choice._numpy_openblas(newest_only=True)
    expected = forced or ("numpy" if newest is not None else "scipy")
    assert choose().source == expected
    assert BLAS.source in usable_routes()
    assert BLAS.integer_bits == (64 if BLAS.source == "numpy" else 32)
    assert sorted(BLAS.addresses) == sorted(_blas_choice.ROUTINES)
    assert all(address for address in BLAS.addresses.values())


def test_the_cache_key_holds_the_choice_not_the_addresses():
    text = repr(BLAS)
    assert BLAS.source in text and str(BLAS.integer_bits) in text
    assert str(BLAS.addresses["sgemm"]) not in text  # process-specific: not in the key
    assert _config.KERNEL_KEY == _config._kernel_key()


def test_scipy_can_always_be_chosen():
    scipy_blas = choose("scipy")
    assert (scipy_blas.source, scipy_blas.integer_bits) == ("scipy", 32)
    assert all(scipy_blas.addresses[name] for name in _blas_choice.ROUTINES)


def test_a_wrong_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="FASTLSTM_BLAS must be 'numpy' or 'scipy', got 'mkl'"):
        choose("mkl")


def test_older_numpy_openblas_is_not_the_default(monkeypatch):
    """With another OpenBLAS newer than NumPy's, the default falls back to SciPy's."""

    class FakeLib:
        def __init__(self, lib, version):
            self.internal_api, self.filepath, self.version = "openblas", lib.filepath, version

    from threadpoolctl import ThreadpoolController

    real = [lib for lib in ThreadpoolController().lib_controllers if lib.internal_api == "openblas"]
    if _blas_choice._numpy_openblas(newest_only=False) is None:
        pytest.fail("this test needs NumPy's bundled OpenBLAS (the dev install has it)")
    libs = [FakeLib(lib, "0.1.0") for lib in real] + [FakeLib(real[0], "99.0")]
    libs[-1].filepath = "/nonexistent/libopenblas.so"

    class FakeController:
        lib_controllers = libs

    monkeypatch.setattr("threadpoolctl.ThreadpoolController", FakeController)
    monkeypatch.delenv(ENV_BLAS, raising=False)
    assert _blas_choice._numpy_openblas(newest_only=True) is None
    assert choose().source == "scipy"
    assert choose("numpy").source == "numpy"  # forced: taken whatever its version


@pytest.mark.parametrize("route", OTHER_ROUTES)
def test_gradients_through_the_other_blas(route):
    """The BLAS-heavy gradient tests pass with the kernels calling the other library (its
    integer width compiled in), which really is the one that ran."""
    selection = "weight_gradients_over_many_rows or backward_matches_torch_f32 or unbatched"
    pytest_in_fresh_interpreter(
        dict(os.environ, **{ENV_BLAS: route}),
        "from fastlstm._blas_choice import BLAS; print(BLAS.source)", route,
        ["tests/test_lstm_backward.py", "-k", selection], timeout=1800,
    )  # fmt: skip


def test_a_gemm_through_the_chosen_blas_matches_numpy():
    """A product through the compiled call (whatever integer width) equals NumPy's."""
    from fastlstm._kernels.blas import gemm_ab, gemm_abt, gemm_atb

    rng = np.random.default_rng(3)
    a = rng.standard_normal((37, 29))
    b = rng.standard_normal((29, 41))
    c = rng.standard_normal((37, 41))
    expected = a @ b + c
    gemm_ab(c, a, b, 1.0)
    np.testing.assert_allclose(c, expected, rtol=1e-12, atol=1e-12)
    out = np.empty((37, 41))
    gemm_abt(out, a, np.ascontiguousarray(b.T), 0.0)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    square = np.empty((29, 41))
    gemm_atb(square, a, c, 0.0)
    np.testing.assert_allclose(square, a.T @ c, rtol=1e-12, atol=1e-12)
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-5)):  # one row: gemv
        row = a[:1].astype(dtype)
        one = np.ones((1, 41), dtype)
        gemm_ab(one, row, b.astype(dtype), 1.0)
        np.testing.assert_allclose(one, row @ b + 1, rtol=tolerance, atol=tolerance)
        gemm_abt(one, row, np.ascontiguousarray(b.T, dtype), 0.0)
        np.testing.assert_allclose(one, row @ b, rtol=tolerance, atol=tolerance)
