"""Optimizers (SGD, Adam, AdamW) and gradient clipping with torch.optim's exact update rules.

Every fastlstm module keeps its parameters in one flat buffer (``_flat_params``) and its
gradients in another (``_flat_grads``), so an optimizer updates a whole module with a few
vectorised operations, in place: the ``params`` views see every update. Each step follows
torch's single-tensor implementation operation for operation (``torch/optim/sgd.py``,
``adam.py``), so float64 trajectories agree with torch to rounding. The only remaining
difference is that torch fuses some multiply-adds into FMAs, one rounding less per element.

State (momentum buffers, moments, step counts) is kept per module, in lists parallel to
``opt.modules``. Scratch buffers are allocated with the optimizer, so a step allocates
nothing (except SGD's first step, which creates the momentum buffers, as torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm"]


def _module_list(modules: Any, who: str, *, allow_empty: bool) -> list[Any]:
    """Return ``modules`` as a list of distinct modules with flat float buffers.

    A single module is accepted as shorthand for a one-element list.
    """
    if hasattr(modules, "_flat_params"):
        modules = [modules]
    elif isinstance(modules, Iterable) and not isinstance(modules, str | bytes | dict):
        modules = list(modules)
    else:
        raise TypeError(
            f"{who} takes a list of fastlstm modules (e.g. [lstm, head]), "
            f"got {type(modules).__name__}"
        )
    if not modules and not allow_empty:
        raise ValueError(f"{who} got an empty list of modules")
    for index, module in enumerate(modules):
        params = getattr(module, "_flat_params", None)
        grads = getattr(module, "_flat_grads", None)
        if not (
            isinstance(params, np.ndarray)
            and isinstance(grads, np.ndarray)
            and params.dtype.kind == "f"
            and params.shape == grads.shape
            and params.dtype == grads.dtype
        ):
            raise TypeError(
                f"{who}: item {index} ({type(module).__name__}) is not a fastlstm module "
                "(needs float _flat_params and _flat_grads of the same shape and dtype)"
            )
    if len({id(module) for module in modules}) != len(modules):
        # Stepping a module twice per step would silently double its update.
        raise ValueError(f"{who}: the same module appears more than once")
    return modules


def _real(name: str, value: Any) -> float:
    """Return ``value`` as a Python float, raising TypeError for non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_non_negative(name: str, value: Any) -> float:
    value = _real(name, value)
    if not 0.0 <= value:  # written so that NaN is refused too
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
    return value


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checked = []
    for index, beta in enumerate(betas):
        beta = _real(f"betas[{index}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {beta} (need 0 <= beta < 1)"
            )
        checked.append(beta)
    return checked[0], checked[1]


class Optimizer:
    """Base class: the modules to update and ``zero_grad``; subclasses define ``step``.

    Hyper-parameters are plain attributes (``opt.lr`` and so on); changing one between
    steps takes effect at the next step, like editing a torch ``param_group``.
    """

    def __init__(self, modules: Any) -> None:
        self.modules = _module_list(modules, type(self).__name__, allow_empty=False)

    def zero_grad(self) -> None:
        """Call ``zero_grad()`` of every module (zeroing its gradients, dropping its caches)."""
        for module in self.modules:
            module.zero_grad()

    def step(self) -> None:
        """Update every module's parameters in place from its current gradients."""
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Parameters
    ----------
    modules : list of modules
        The modules to update (a single module is accepted too).
    lr : float, default 1e-3
        Learning rate (>= 0); torch's default.
    momentum : float, default 0.0
        Momentum factor (>= 0).
    dampening : float, default 0.0
        Dampening for momentum.
    weight_decay : float, default 0.0
        L2 penalty (>= 0), added to the gradient (not to the stored ``grads``).
    nesterov : bool, default False
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    Attributes
    ----------
    modules : list of modules
        The modules updated, in the order given.
    momentum_buffers : list of ndarray or None
        One flat buffer per module (None until the first step with momentum).

    Notes
    -----
    With g the gradient (plus ``weight_decay * p``) and b the momentum buffer (set to g at
    the first step, as torch)::

        b = momentum * b + (1 - dampening) * g
        g = g + momentum * b  if nesterov else  b
        p = p - lr * g
    """

    def __init__(
        self,
        modules: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(modules)
        self.lr = _check_non_negative("learning rate", lr)
        self.momentum = _check_non_negative("momentum", momentum)
        self.dampening = _real("dampening", dampening)
        self.weight_decay = _check_non_negative("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        # None until the first step, when torch sets the buffer to a copy of the gradient.
        self.momentum_buffers: list[np.ndarray | None] = [None] * len(self.modules)
        self._scratch = [
            (np.empty_like(m._flat_params), np.empty_like(m._flat_params)) for m in self.modules
        ]

    def step(self) -> None:
        """Apply one SGD update to every module, in place."""
        lr, momentum, dampening = self.lr, self.momentum, self.dampening
        weight_decay = self.weight_decay
        for index, module in enumerate(self.modules):
            param, grad = module._flat_params, module._flat_grads
            decayed, work = self._scratch[index]
            if weight_decay != 0:
                # grad = grad + weight_decay * param, leaving the module's grads untouched
                np.multiply(param, weight_decay, out=decayed)
                decayed += grad
                grad = decayed
            if momentum != 0:
                buf = self.momentum_buffers[index]
                if buf is None:
                    buf = self.momentum_buffers[index] = grad.copy()
                else:
                    # buf = momentum * buf + (1 - dampening) * grad
                    buf *= momentum
                    if dampening == 0:
                        buf += grad  # times 1 - 0 = 1, exact: skip the multiply
                    else:
                        np.multiply(grad, 1 - dampening, out=work)
                        buf += work
                if self.nesterov:
                    # grad = grad + momentum * buf
                    np.multiply(buf, momentum, out=work)
                    work += grad
                    grad = work
                else:
                    grad = buf
            # param = param + (-lr) * grad
            np.multiply(grad, -lr, out=work)
            param += work


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``amsgrad=False``).

    Parameters
    ----------
    modules : list of modules
        The modules to update (a single module is accepted too).
    lr : float, default 1e-3
        Learning rate (>= 0).
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator (>= 0).
    weight_decay : float, default 0.0
        L2 penalty (>= 0) added to the gradient (not to the stored ``grads``).

    Attributes
    ----------
    modules : list of modules
        The modules updated, in the order given.
    steps : list of int
        Steps taken, per module.
    exp_avgs, exp_avg_sqs : list of ndarray
        First and second moment estimates, one flat buffer per module.

    Notes
    -----
    At step t, with g the gradient (plus ``weight_decay * p``)::

        m = m + (1 - beta1) (g - m)                    # torch's lerp
        v = beta2 v + (1 - beta2) g g
        p = p + (-lr / (1 - beta1**t)) m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    # AdamW shrinks the parameters instead of adding the decay to the gradient.
    _decoupled = False

    def __init__(
        self,
        modules: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(modules)
        self.lr = _check_non_negative("learning rate", lr)
        self.betas = _check_betas(betas)
        self.eps = _check_non_negative("epsilon value", eps)
        self.weight_decay = _check_non_negative("weight_decay", weight_decay)
        self.steps = [0] * len(self.modules)
        self.exp_avgs = [np.zeros_like(m._flat_params) for m in self.modules]
        self.exp_avg_sqs = [np.zeros_like(m._flat_params) for m in self.modules]
        self._scratch = [
            (np.empty_like(m._flat_params), np.empty_like(m._flat_params)) for m in self.modules
        ]

    def step(self) -> None:
        """Apply one update to every module, in place."""
        lr, eps, weight_decay = self.lr, self.eps, self.weight_decay
        beta1, beta2 = self.betas
        weight = 1 - beta1
        for index, module in enumerate(self.modules):
            param, grad = module._flat_params, module._flat_grads
            exp_avg, exp_avg_sq = self.exp_avgs[index], self.exp_avg_sqs[index]
            first, second = self._scratch[index]
            self.steps[index] += 1
            step = float(self.steps[index])  # torch keeps the count as a float tensor

            if weight_decay != 0:
                if self._decoupled:
                    param *= 1 - lr * weight_decay
                else:
                    # grad = grad + weight_decay * param, leaving the module's grads untouched
                    np.multiply(param, weight_decay, out=first)
                    first += grad
                    grad = first

            # exp_avg.lerp_(grad, 1 - beta1), with torch's two formulas for small and
            # large weights (each exact at its end of the interval)
            np.subtract(grad, exp_avg, out=second)
            if abs(weight) < 0.5:
                second *= weight
                exp_avg += second
            else:
                second *= weight - 1
                np.add(grad, second, out=exp_avg)

            # exp_avg_sq = beta2 * exp_avg_sq + ((1 - beta2) * grad) * grad
            exp_avg_sq *= beta2
            np.multiply(grad, 1 - beta2, out=second)
            second *= grad
            exp_avg_sq += second

            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5

            # denom = sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps
            denom = second
            np.sqrt(exp_avg_sq, out=denom)
            denom /= bias_correction2_sqrt
            denom += eps
            # param.addcdiv_(exp_avg, denom, value=-step_size): (value * exp_avg) / denom
            # (``first`` is free again: the decayed gradient is no longer needed)
            np.multiply(exp_avg, -step_size, out=first)
            first /= denom
            param += first


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    Parameters
    ----------
    modules : list of modules
        The modules to update (a single module is accepted too).
    lr : float, default 1e-3
        Learning rate (>= 0).
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator (>= 0).
    weight_decay : float, default 1e-2
        Decoupled decay (>= 0): each step first multiplies the parameters by
        ``1 - lr * weight_decay``, then applies the Adam update without decay.
    """

    _decoupled = True

    def __init__(
        self,
        modules: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(modules, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _grad_norm_power(grad: np.ndarray, norm_type: float) -> float:
    """``sum(|grad|**norm_type)`` of one flat gradient buffer, accumulated in float64."""
    if norm_type == 2.0:
        if grad.dtype == np.float64:
            return float(np.dot(grad, grad))
        # Accumulate float32 squares in float64 (buffered, no full-size copy): a float32
        # sum of squares would overflow for exploding gradients, exactly when clipping matters.
        return float(np.einsum("i,i->", grad, grad, dtype=np.float64))
    if norm_type == 1.0:
        return float(np.abs(grad).sum(dtype=np.float64))
    return float((np.abs(grad).astype(np.float64) ** norm_type).sum())


def clip_grad_norm(modules: Any, max_norm: float, norm_type: float = 2.0) -> float:
    """Scale all gradients of ``modules`` so that their total norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the norm is taken over the gradients of all
    modules together, as one vector, and every gradient is multiplied in place by
    ``min(max_norm / (total_norm + 1e-6), 1)``.

    Parameters
    ----------
    modules : list of modules
        The modules whose ``grads`` to clip (a single module is accepted too; an empty
        list gives 0.0).
    max_norm : float
        Largest allowed total norm (>= 0; torch does not check, but a negative value
        would flip the gradients).
    norm_type : float, default 2.0
        Order of the norm: any p > 0, or ``inf`` / ``"inf"`` (the largest absolute value).

    Returns
    -------
    float
        The total norm before clipping, computed in float64. A NaN or inf norm is returned
        as such and, as in torch, the gradients are still scaled (by NaN, or by 0 for inf).
    """
    modules = _module_list(modules, "clip_grad_norm", allow_empty=True)
    max_norm = _check_non_negative("max_norm", max_norm)
    # torch also takes the string "inf"
    norm_type = float(norm_type) if isinstance(norm_type, str) else _real("norm_type", norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    grads = [module._flat_grads for module in modules if module._flat_grads.size]
    if not grads:
        return 0.0
    if math.isinf(norm_type):
        # max(g.max(), -g.min()) is max |g| without an |g| temporary; np.maximum and
        # np.max keep a NaN, as torch does.
        total = float(np.max([np.maximum(g.max(), -g.min()) for g in grads]))
    else:
        total = sum(_grad_norm_power(g, norm_type) for g in grads) ** (1.0 / norm_type)
    clip_coef = max_norm / (total + 1e-6)
    # torch clamps with max=1.0, which keeps a NaN coefficient (Python's min would not).
    clip_coef_clamped = clip_coef if math.isnan(clip_coef) else min(clip_coef, 1.0)
    for grad in grads:
        grad *= clip_coef_clamped
    return float(total)
