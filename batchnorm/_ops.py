"""Batch norm's autograd functions and custom ops: one implementation, several backends.

``BatchNormTrain`` and ``BatchNormEval`` are ``torch.autograd.Function`` s with the closed-form
backward of ``_eager``; under ``create_graph=True`` the same closed form runs as differentiable
torch ops on statistics recomputed from the input, which is what double backward needs.
Their bodies are registered as ``torch.library`` custom ops (``batchnorm::forward_train``,
``forward_eval``, ``backward``, and ``update_running_stats``, the one that mutates), so
``torch.compile(fullgraph=True)`` traces each as a single node with known output shapes.

Each op takes the name of its backend, resolved by ``resolve_backend`` at call time, and hands
the canonical ``(N, C, L)`` view of its tensors to that backend's module.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch import Tensor

from batchnorm import _eager
from batchnorm.kernels import cpu as cpu_backend
from batchnorm.kernels import triton as triton_backend

BACKENDS = ("auto", "eager", "numba", "triton")
# The kernel modules import their libraries (numba, triton) only when a kernel first runs.
_MODULES = {"eager": _eager, "numba": cpu_backend, "triton": triton_backend}
_EXTRAS = {"numba": "pip install numba", "triton": "pip install triton"}


def backend_module(name: str) -> ModuleType:
    return _MODULES[name]


def resolve_backend(
    requested: str | None, x3: Tensor, residual3: Tensor | None, relu: bool
) -> str:
    """The backend that runs this call: the argument, else ``$BATCHNORM_BACKEND``, else auto.

    ``auto`` takes Triton for CUDA tensors and numba for CPU tensors when the library is
    installed and the backend supports the call, and the eager torch ops otherwise. A backend
    named explicitly must be able to run the call: no silent fallback.
    """
    name = requested if requested is not None else os.environ.get("BATCHNORM_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(
            f"unknown batch-norm backend {name!r}; expected one of {', '.join(BACKENDS)} "
            "(set by the backend= argument or the BATCHNORM_BACKEND environment variable)"
        )
    if name == "eager":
        return name
    if name == "auto":
        candidate = "triton" if x3.is_cuda else "numba"
        module = backend_module(candidate)
        if module.available() and module.supports(x3, residual3, relu):
            return candidate
        return "eager"
    module = backend_module(name)
    if not module.available():
        raise RuntimeError(
            f"batch-norm backend {name!r} was requested but cannot be imported; "
            f"install it ({_EXTRAS[name]}) or use backend='auto'"
        )
    if not module.supports(x3, residual3, relu):
        raise ValueError(
            f"batch-norm backend {name!r} cannot run {x3.dtype} input on {x3.device} "
            f"(residual={residual3 is not None}, relu={relu}); use backend='auto' or 'eager'"
        )
    return name


def as_ncl(t: Tensor) -> Tensor:
    """The ``(N, C, L)`` view of a tensor whose layout is contiguous or channels-last."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def from_ncl(t3: Tensor, x: Tensor) -> Tensor:
    """``t3`` back in the shape of ``x``, with exactly the strides of ``torch.empty_like(x)``."""
    return like_layout(t3.reshape(x.shape), x)


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides of ``x`` (gradients can arrive in any layout, even expanded)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _stat(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=_eager.acc_dtype(x.dtype))


def _none() -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "not computed".
    return torch.empty(0)


# --- the op bodies -----------------------------------------------------------------------------
# Plain functions, registered as custom ops below. Eager calls run them directly (the custom-op
# dispatcher costs tens of microseconds a call, as much as a small batch norm itself); under
# torch.compile the same functions run as the registered ops, so the graph holds one node each.

def _forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    eps: float, relu: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 on the batch's statistics; returns ``(y, mean, rstd, var)``."""
    res3 = None if residual is None else as_ncl(residual)
    y3, mean, rstd, var = backend_module(backend).forward_train(
        as_ncl(x), weight, bias, eps, res3, relu)
    return from_ncl(y3, x), mean, rstd, var


def _forward_eval(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
    running_var: Tensor, residual: Tensor | None, eps: float, relu: bool, backend: str,
) -> Tensor:
    """Algorithm 2's folded transform ``y = scale * x + shift`` with the running statistics."""
    scale, shift = _eager.inference_affine(weight, bias, running_mean, running_var, eps)
    res3 = None if residual is None else as_ncl(residual)
    y3 = backend_module(backend).forward_eval(as_ncl(x), scale, shift, res3, relu)
    return from_ncl(y3, x)


def _backward(
    dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor, weight: Tensor | None,
    training: bool, need_dx: bool, need_dres: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form gradients ``(dx, dweight, dbias, dresidual)``; empty where not needed."""
    y3 = None if y is None else as_ncl(y)
    dx3, dweight, dbias, dres3 = backend_module(backend).backward(
        as_ncl(dy), as_ncl(x), y3, mean, rstd, weight, training, need_dx, need_dres)
    dx = _none() if dx3 is None else from_ncl(dx3, x)
    dres = _none() if dres3 is None else from_ncl(dres3, x)
    return dx, dweight, dbias, dres


def _update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, m: int, momentum: float | None, backend: str,
) -> None:
    """Fold a batch's statistics into the running estimates (see ``_eager``)."""
    module = backend_module(backend)
    update = getattr(module, "update_running_stats", _eager.update_running_stats)
    update(running_mean, running_var, num_batches_tracked, mean, var, m, momentum)


torch.library.custom_op("batchnorm::forward_train", _forward_train, mutates_args=())
torch.library.custom_op("batchnorm::forward_eval", _forward_eval, mutates_args=())
torch.library.custom_op("batchnorm::backward", _backward, mutates_args=())
torch.library.custom_op("batchnorm::update_running_stats", _update_running_stats,
                        mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@torch.library.register_fake("batchnorm::forward_train")
def _(x, weight, bias, residual, eps, relu, backend):
    return torch.empty_like(x), _stat(x), _stat(x), _stat(x)


@torch.library.register_fake("batchnorm::forward_eval")
def _(x, weight, bias, running_mean, running_var, residual, eps, relu, backend):
    return torch.empty_like(x)


@torch.library.register_fake("batchnorm::backward")
def _(dy, x, y, mean, rstd, weight, training, need_dx, need_dres, backend):
    dx = torch.empty_like(x) if need_dx else _none()
    dres = torch.empty_like(x) if need_dres else _none()
    return dx, torch.empty_like(mean), torch.empty_like(mean), dres


@torch.library.register_fake("batchnorm::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, mean, var, m, momentum, backend):
    return None


def _call(name: str, body):
    """The registered op while torch.compile traces, the plain function otherwise."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.batchnorm, name)
    return body


def update_running_stats(*args) -> None:
    _call("update_running_stats", _update_running_stats)(*args)


# --- autograd ---------------------------------------------------------------------------------

class BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm with the closed-form backward; returns ``(y, mean, var)``.

    ``mean`` and ``var`` (biased) are the batch statistics, not differentiable: they only feed
    the running estimates.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, backend):
        y, mean, rstd, var = _call("forward_train", _forward_train)(
            x, weight, bias, residual, eps, relu, backend)
        ctx.save_for_backward(x, weight, mean, rstd, y if relu else None)
        ctx.training, ctx.eps, ctx.backend = True, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _gradients(ctx, dy) + (None, None, None)


class BatchNormEval(torch.autograd.Function):
    """Inference-mode batch norm with fixed statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, eps, relu, backend):
        y = _call("forward_eval", _forward_eval)(
            x, weight, bias, running_mean, running_var, residual, eps, relu, backend)
        acc = torch.promote_types(_eager.acc_dtype(x.dtype), running_mean.dtype)
        # Constants of this call, copied: a later training step updates the running estimates
        # in place and must not change this call's gradient.
        mean = running_mean.to(acc, copy=True)
        rstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.save_for_backward(x, weight, mean, rstd, y if relu else None)
        ctx.training, ctx.eps, ctx.backend = False, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dweight, dbias, dres = _gradients(ctx, dy)
        return dx, dweight, dbias, None, None, dres, None, None, None


def _gradients(ctx, dy: Tensor) -> tuple:
    """Gradients for ``(x, weight, bias, residual)`` from either forward."""
    x, weight, mean, rstd, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2]
    need_dres = needs[3] if ctx.training else needs[5]
    if torch.is_grad_enabled():
        dx, dweight, dbias, dres = _differentiable_backward(ctx, dy, x, weight, mean, rstd, y,
                                                            need_dx, need_dres)
    else:
        dx, dweight, dbias, dres = _call("backward", _backward)(
            like_layout(dy, x), x, y, mean, rstd, weight, ctx.training, need_dx, need_dres,
            ctx.backend)
    return (
        dx if need_dx else None,
        dweight.to(weight.dtype) if need_dw else None,
        dbias.to(ctx.bias_dtype) if need_db else None,
        dres if need_dres else None,
    )


def _differentiable_backward(ctx, dy, x, weight, mean, rstd, y, need_dx, need_dres):
    """The closed form in differentiable torch ops, for ``create_graph=True``.

    In training the statistics are functions of ``x``, so they are recomputed from it here
    (the saved ones are detached results of the forward op); in inference they are constants.
    The ReLU mask is piecewise constant, so ``y`` enters without a gradient.
    """
    x3 = as_ncl(x)
    if ctx.training:
        mean, var, _ = _eager.batch_stats(x3)
        rstd = torch.rsqrt(var + ctx.eps)
    y3 = None if y is None else as_ncl(y).detach()
    dx3, dweight, dbias, dres3 = _eager.backward(
        as_ncl(dy), x3, y3, mean, rstd, weight, ctx.training, need_dx, need_dres)
    dx = None if dx3 is None else dx3.reshape(x.shape)
    dres = None if dres3 is None else dres3.reshape(x.shape)
    return dx, dweight, dbias, dres


