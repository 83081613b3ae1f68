"""mse_loss vs torch.nn.functional.mse_loss (mean reduction) and its autograd gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from utils import assert_close

from fastlstm.loss import mse_loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5)], ids=lambda s: f"shape={s}")
def test_matches_torch(rng, dtype, shape):
    pred = np.asarray(rng.normal(size=shape), dtype=dtype)
    target = np.asarray(rng.normal(size=shape), dtype=dtype)
    loss, dpred = mse_loss(pred, target)

    pred_t = torch.from_numpy(pred.copy()).requires_grad_()
    loss_t = torch.nn.functional.mse_loss(pred_t, torch.from_numpy(target))
    loss_t.backward()
    assert type(loss) is float
    assert_close(loss, loss_t.detach(), dtype, check_dtype=False, what="loss")
    assert_close(dpred, pred_t.grad, dtype, what="dpred")


def test_large_float32_batch_keeps_precision(rng):
    pred = rng.normal(size=1_000_003).astype(np.float32)
    target = np.zeros_like(pred)
    loss, _ = mse_loss(pred, target)
    exact = float(np.mean(pred.astype(np.float64) ** 2))
    assert loss == pytest.approx(exact, rel=1e-6)


def test_torch_tensors_and_inputs_are_not_modified(rng):
    pred = rng.normal(size=(2, 3))
    target = rng.normal(size=(2, 3))
    saved = pred.copy(), target.copy()
    loss, dpred = mse_loss(torch.from_numpy(pred), torch.from_numpy(target))
    assert_close(loss, np.mean((pred - target) ** 2), np.float64, check_dtype=False)
    assert_close(dpred, 2 * (pred - target) / 6, what="dpred")
    np.testing.assert_array_equal(pred, saved[0])
    np.testing.assert_array_equal(target, saved[1])


@pytest.mark.parametrize(
    ("pred", "target", "dtype"),
    [
        ([1, 2, 3], [0.5, 2.0, 4.0], np.float64),  # lists: float64
        (np.array([1, 2, 3]), np.array([0, 0, 0]), np.float64),  # integers: float64
        (np.array([1, 2, 3], np.float16), [0.5, 2.0, 4.0], np.float64),  # float16: float64
        (np.array([1, 2, 3], np.float32), np.array([0.5, 2.0, 4.0]), np.float32),  # pred's
        (np.array([1, 2, 3], np.float64), np.array([0, 2, 4], np.float32), np.float64),
    ],
    ids=["lists", "ints", "float16", "float32-pred", "float64-pred"],
)
def test_working_dtype_follows_pred(pred, target, dtype):
    loss, dpred = mse_loss(pred, target)
    assert dpred.dtype == dtype
    diff = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    assert loss == pytest.approx(float(np.mean(diff**2)))
    assert_close(dpred, 2 * diff / 3, dtype, check_dtype=False)


def test_empty_gives_nan_as_torch():
    loss, dpred = mse_loss(np.zeros((0, 3)), np.zeros((0, 3)))
    assert math.isnan(loss)
    assert math.isnan(torch.nn.functional.mse_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item())
    assert dpred.shape == (0, 3)


@pytest.mark.parametrize(
    ("pred", "target", "error", "match"),
    [
        (np.zeros((3, 1)), np.zeros(3), ValueError, r"pred \(3, 1\) and target \(3,\)"),
        (np.zeros(3), np.zeros((1, 3)), ValueError, r"pred \(3,\) and target \(1, 3\)"),
        (np.zeros(()), np.zeros(1), ValueError, r"pred \(\) and target \(1,\)"),
        (np.array(["a", "b"]), np.zeros(2), TypeError, "pred"),
        (np.zeros(2), [None, 1.0], TypeError, "target"),
        (np.zeros(2, complex), np.zeros(2), TypeError, "pred"),
    ],
    ids=["trailing-1", "leading-1", "scalar", "strings", "object", "complex"],
)
def test_bad_input(pred, target, error, match):
    with pytest.raises(error, match=match):
        mse_loss(pred, target)
