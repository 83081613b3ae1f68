"""SGD, Adam, AdamW and clip_grad_norm against torch.optim / torch.nn.utils on equal inputs."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from utils import assert_close

from fastlstm import optim
from fastlstm._module import Module
from fastlstm.linear import Linear

STEPS = 60
# float64 trajectories agree with torch to rounding; torch fuses some multiply-adds (FMA).
TRAJECTORY_TOL = {"rtol": 1e-12, "atol": 1e-13}


class TwoParams(Module):
    """Test-only module: two parameters of different shapes in one flat buffer."""

    def __init__(self, rng: np.random.Generator, dtype=np.float64) -> None:
        self.dtype = np.dtype(dtype)
        self._init_buffers([("a", (3, 4)), ("b", (5,))])
        self._flat_params[...] = rng.normal(size=self._flat_params.size)


def torch_params(modules) -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.from_numpy(array.copy()))
        for module in modules
        for array in module.params.values()
    ]


def set_gradients(rng, modules, tensors) -> None:
    """Give both sides the same noise plus a pull towards zero from their own parameters."""
    for array, grad in zip((a for m in modules for a in m.grads.values()), tensors, strict=True):
        noise = rng.normal(size=array.shape)
        array[...] = noise
        grad.grad = torch.from_numpy(noise.astype(array.dtype))
    for module in modules:
        for name, grad in module.grads.items():
            grad += 0.5 * module.params[name]
    for tensor in tensors:
        tensor.grad += 0.5 * tensor.detach()


def assert_same_parameters(modules, tensors, dtype=np.float64, what="", **tol) -> None:
    arrays = [a for m in modules for a in m.params.values()]
    for index, (array, tensor) in enumerate(zip(arrays, tensors, strict=True)):
        assert_close(array, tensor, dtype, what=f"{what} param {index}", **tol)


def run_against_torch(rng, make_ours, make_torch, *, dtype=np.float64, steps=STEPS, **tol):
    modules = [TwoParams(rng, dtype), Linear(3, 2, dtype=dtype, seed=0)]
    tensors = torch_params(modules)
    ours, theirs = make_ours(modules), make_torch(tensors)
    tol = tol or TRAJECTORY_TOL
    for step in range(steps):
        ours.zero_grad()
        theirs.zero_grad()
        set_gradients(rng, modules, tensors)
        ours.step()
        theirs.step()
        assert_same_parameters(modules, tensors, dtype, what=f"step {step}", **tol)
    return modules, ours


SGD_CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.1, "weight_decay": 0.05},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.7, "weight_decay": 0.02, "nesterov": True},
    {"lr": 0.0, "momentum": 0.5},
]
ADAM_CONFIGS = [
    {},
    {"lr": 0.05},
    {"lr": 0.05, "weight_decay": 0.1},
    {"lr": 0.02, "betas": (0.5, 0.9), "eps": 1e-3},  # lerp weight 0.5: torch's other formula
    {"lr": 0.02, "betas": (0.2, 0.5), "weight_decay": 0.01},
    {"lr": 0.02, "betas": (0.0, 0.0)},
]
ADAMW_CONFIGS = [
    {},
    {"lr": 0.05},
    {"lr": 0.05, "weight_decay": 0.2},
    {"lr": 0.02, "betas": (0.3, 0.99), "weight_decay": 0.0},
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch(rng, config):
    run_against_torch(
        rng,
        lambda modules: optim.SGD(modules, **config),
        lambda tensors: torch.optim.SGD(tensors, foreach=False, **config),
    )


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_matches_torch(rng, config):
    run_against_torch(
        rng,
        lambda modules: optim.Adam(modules, **config),
        lambda tensors: torch.optim.Adam(tensors, foreach=False, **config),
    )


@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=str)
def test_adamw_matches_torch(rng, config):
    run_against_torch(
        rng,
        lambda modules: optim.AdamW(modules, **config),
        lambda tensors: torch.optim.AdamW(tensors, foreach=False, **config),
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda m: optim.SGD(m, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
            lambda t: torch.optim.SGD(t, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
        ),
        (
            lambda m: optim.Adam(m, lr=0.01, weight_decay=0.01),
            lambda t: torch.optim.Adam(t, lr=0.01, weight_decay=0.01),
        ),
        (lambda m: optim.AdamW(m, lr=0.01), lambda t: torch.optim.AdamW(t, lr=0.01)),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_float32_matches_torch(rng, ours, theirs):
    # float32 rounding compounds over the steps: compare within float32 tolerance.
    run_against_torch(rng, ours, theirs, dtype=np.float32, steps=20, rtol=1e-4, atol=1e-5)


def test_defaults_match_torch():
    modules = [TwoParams(np.random.default_rng(0))]
    assert optim.SGD(modules).lr == torch.optim.SGD([torch.zeros(1)]).defaults["lr"]
    for ours, theirs in ((optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)):
        opt, defaults = ours(modules), theirs([torch.zeros(1)]).defaults
        assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (
            defaults["lr"],
            defaults["betas"],
            defaults["eps"],
            defaults["weight_decay"],
        )
    assert optim.AdamW(modules).weight_decay == 1e-2


def test_changing_lr_between_steps_matches_param_groups(rng):
    modules = [TwoParams(rng)]
    tensors = torch_params(modules)
    ours, theirs = optim.Adam(modules, lr=0.1), torch.optim.Adam(tensors, lr=0.1)
    for step in range(10):
        if step == 5:
            ours.lr = 0.01
            theirs.param_groups[0]["lr"] = 0.01
        set_gradients(rng, modules, tensors)
        ours.step()
        theirs.step()
    assert_same_parameters(modules, tensors, **TRAJECTORY_TOL)


class Big(Module):
    """Test-only module with one large parameter, so allocations would show."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.dtype = np.dtype(np.float64)
        self._init_buffers([("w", (200, 500))])
        self._flat_params[...] = rng.normal(size=self._flat_params.size)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: optim.SGD(m, lr=0.1, weight_decay=0.1),
        lambda m: optim.SGD(m, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
        lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda m: optim.Adam(m, weight_decay=0.1),
        lambda m: optim.AdamW(m),
    ],
    ids=["sgd", "momentum", "nesterov", "adam", "adamw"],
)
def test_step_is_in_place_and_allocation_free(rng, make):
    module = Big(rng)
    opt = make([module])
    flat, view = module._flat_params, module.params["w"]
    module._flat_grads[...] = rng.normal(size=module._flat_grads.size)
    grads = module._flat_grads.copy()
    before = flat.copy()
    opt.step()  # the first SGD step allocates the momentum buffer, as torch
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < flat.nbytes / 10, f"a step allocated {peak} bytes"
    assert module._flat_params is flat and module.params["w"] is view
    assert np.shares_memory(view, flat)
    assert not np.array_equal(view, before.reshape(view.shape))  # the view saw the update
    np.testing.assert_array_equal(module._flat_grads, grads)  # weight decay left grads alone


def test_zero_grad_zeros_every_module(rng):
    modules = [TwoParams(rng), Linear(3, 2, seed=0)]
    for module in modules:
        module._flat_grads[...] = 1.0
    modules[1](np.ones(3))  # a pending cache, dropped by the module's zero_grad
    optim.SGD(modules, lr=0.1).zero_grad()
    assert all(not module._flat_grads.any() for module in modules)
    assert modules[1]._caches == []


def test_single_module_is_accepted(rng):
    module = TwoParams(rng)
    twin = TwoParams(np.random.default_rng(0))
    twin._flat_params[...] = module._flat_params
    module._flat_grads[...] = twin._flat_grads[...] = 1.0
    optim.Adam(module, lr=0.1).step()
    optim.Adam([twin], lr=0.1).step()
    np.testing.assert_array_equal(module._flat_params, twin._flat_params)


@pytest.mark.parametrize(
    ("modules", "error", "match"),
    [
        (lambda m: [], ValueError, "empty"),
        (lambda m: [m, m], ValueError, "more than once"),
        (lambda m: m.params, TypeError, "list of fastlstm modules"),
        (lambda m: 3, TypeError, "list of fastlstm modules"),
        (lambda m: [m, object()], TypeError, "item 1"),
        (lambda m: [m.params["a"]], TypeError, "item 0"),
    ],
    ids=["empty", "duplicate", "dict", "int", "object", "array"],
)
@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_bad_module_lists(rng, modules, error, match, cls):
    with pytest.raises(error, match=match):
        cls(modules(TwoParams(rng)), lr=0.1)


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (optim.SGD, {"lr": -0.1}, ValueError, "learning rate"),
        (optim.SGD, {"lr": math.nan}, ValueError, "learning rate"),
        (optim.SGD, {"lr": "0.1"}, TypeError, "learning rate"),
        (optim.SGD, {"momentum": -0.5}, ValueError, "momentum"),
        (optim.SGD, {"weight_decay": -1e-4}, ValueError, "weight_decay"),
        (optim.SGD, {"nesterov": True}, ValueError, "Nesterov"),
        (optim.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "Nesterov"),
        (optim.Adam, {"lr": -1e-3}, ValueError, "learning rate"),
        (optim.Adam, {"eps": -1e-8}, ValueError, "epsilon"),
        (optim.Adam, {"betas": (1.0, 0.999)}, ValueError, "index 0"),
        (optim.Adam, {"betas": (0.9, -0.1)}, ValueError, "index 1"),
        (optim.Adam, {"betas": 0.9}, TypeError, "pair"),
        (optim.Adam, {"betas": (0.9, None)}, TypeError, "betas"),
        (optim.Adam, {"weight_decay": -0.1}, ValueError, "weight_decay"),
        (optim.AdamW, {"weight_decay": -0.1}, ValueError, "weight_decay"),
        (optim.AdamW, {"betas": (0.9, 1.0)}, ValueError, "index 1"),
    ],
)
def test_bad_hyper_parameters(rng, cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls([TwoParams(rng)], **kwargs)


# ------------------------------------------------------------------------ clip_grad_norm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0, "inf"], ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "no-clip"])
def test_clip_grad_norm_matches_torch(rng, dtype, norm_type, max_norm):
    modules = [TwoParams(rng, dtype), Linear(4, 3, dtype=dtype, seed=0)]
    tensors = torch_params(modules)
    set_gradients(rng, modules, tensors)
    total = optim.clip_grad_norm(modules, max_norm, norm_type)
    total_t = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type)
    assert type(total) is float
    assert_close(total, total_t, dtype, check_dtype=False, what="norm")
    grads = [g for m in modules for g in m.grads.values()]
    for index, (grad, tensor) in enumerate(zip(grads, tensors, strict=True)):
        assert_close(grad, tensor.grad, dtype, what=f"grad {index}")
    if max_norm == 1e3:
        assert total < max_norm  # the no-clip case really did not clip


def test_clip_grad_norm_single_module_empty_list_and_zero_grads(rng):
    module = TwoParams(rng)
    module._flat_grads[...] = 3.0
    total = optim.clip_grad_norm(module, 1.0)
    assert total == pytest.approx(3.0 * math.sqrt(17))
    assert np.linalg.norm(module._flat_grads) == pytest.approx(1.0, rel=1e-5)
    assert optim.clip_grad_norm([], 1.0) == 0.0
    module.zero_grad()
    assert optim.clip_grad_norm([module], 1.0) == 0.0
    assert not module._flat_grads.any()


def test_clip_grad_norm_float32_does_not_overflow():
    # torch's float32 norm overflows to inf here (and then zeroes the gradients).
    module = TwoParams(np.random.default_rng(0), np.float32)
    module._flat_grads[...] = 1e20
    total = optim.clip_grad_norm([module], 1.0)
    assert total == pytest.approx(1e20 * math.sqrt(17), rel=1e-6)
    assert np.linalg.norm(module._flat_grads.astype(np.float64)) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_nan_propagates_as_torch(rng):
    module = TwoParams(rng)
    module._flat_grads[...] = 1.0
    module._flat_grads[3] = math.nan
    for norm_type in (2.0, math.inf):
        assert math.isnan(optim.clip_grad_norm([module], 1.0, norm_type))
    assert np.isnan(module._flat_grads).all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_norm": -1.0}, ValueError),
        ({"max_norm": math.nan}, ValueError),
        ({"norm_type": 0.0}, ValueError),
        ({"norm_type": -math.inf}, ValueError),
        ({"norm_type": "two"}, ValueError),
        ({"norm_type": None}, TypeError),
    ],
)
def test_clip_grad_norm_bad_arguments(rng, kwargs, error):
    module = TwoParams(rng)
    module._flat_grads[...] = 1.0
    with pytest.raises(error):
        optim.clip_grad_norm([module], **{"max_norm": 1.0, **kwargs})
    assert (module._flat_grads == 1.0).all()
