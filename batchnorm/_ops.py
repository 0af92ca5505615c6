"""The phases of ``batchnorm.kernels`` as ``torch.library`` custom ops, on full-shape tensors.

Each op takes the name of its backend (resolved per call by ``batchnorm.kernels.resolve``),
hands the canonical ``(N, C, L)`` view of its tensors to that backend's module and returns its
results in the shape and memory layout of the input. Registered as custom ops
(``batchnorm::stats``, ``forward_train``, ...; ``update_running_stats`` is the one that
mutates), a ``torch.compile`` graph holds each as one node with known output shapes; eager
calls skip the dispatcher and run the same functions directly (``call``), since it costs tens
of microseconds a call, as much as a small batch norm itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.kernels import (  # noqa: F401  (as_ncl: used here and by the callers of _ops)
    _ncl,
    as_ncl,
    eager,
)
from batchnorm.kernels import backend as _backend


def from_ncl(t3: Tensor, x: Tensor) -> Tensor:
    """``t3`` in the shape of ``x``, with exactly the strides of ``torch.empty_like(x)``."""
    t = t3.reshape(x.shape)
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides of ``x`` (gradients can arrive in any layout, even expanded)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _none() -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "not computed".
    return torch.empty(0)


def _stat(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype or eager.acc_dtype(x.dtype))


# --- the op bodies -----------------------------------------------------------------------------

def _stats(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Phase ``stats``: the per-channel ``(mean, M2)`` (float64); the count is ``N * L``."""
    _, mean, m2 = _backend(backend).stats(as_ncl(x))
    return mean, m2


def _forward_eval(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                  center: Tensor | None, relu: bool, backend: str) -> Tensor:
    """Phase ``forward_eval``: ``act((x - center) * scale + shift + residual)``."""
    y3 = _backend(backend).forward_eval(as_ncl(x), scale, shift, _ncl(residual), relu, center)
    return from_ncl(y3, x)


def _grad_sums(dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor,
               backend: str) -> tuple[Tensor, Tensor]:
    """Phase ``grad_sums``: ``(sum(dz), sum(dz * x_hat))``."""
    return _backend(backend).grad_sums(as_ncl(dy), as_ncl(x), _ncl(y), mean, rstd)


def _grad_input(dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor,
                weight: Tensor | None, mean_dz: Tensor, mean_dz_x_hat: Tensor, need_dres: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    """Phase ``grad_input``: ``(dx, dres)`` (``dres`` empty unless ``need_dres``)."""
    dx3, dres3 = _backend(backend).grad_input(as_ncl(dy), as_ncl(x), _ncl(y), mean, rstd,
                                              weight, mean_dz, mean_dz_x_hat, need_dres)
    return from_ncl(dx3, x), (_none() if dres3 is None else from_ncl(dres3, x))


def _forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   residual: Tensor | None, eps: float, relu: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused Algorithm 1 on the batch's statistics: ``(y, mean, rstd, var)``."""
    y3, mean, rstd, var = _backend(backend).forward_train(as_ncl(x), weight, bias, eps,
                                                          _ncl(residual), relu)
    return from_ncl(y3, x), mean, rstd, var


def _backward(dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor,
              weight: Tensor | None, training: bool, need_dx: bool, need_dres: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused closed-form gradients ``(dx, dweight, dbias, dres)``; empty where not needed."""
    dx3, dweight, dbias, dres3 = _backend(backend).backward(
        as_ncl(dy), as_ncl(x), _ncl(y), mean, rstd, weight, training, need_dx, need_dres)
    dx = _none() if dx3 is None else from_ncl(dx3, x)
    dres = _none() if dres3 is None else from_ncl(dres3, x)
    return dx, dweight, dbias, dres


def _update_running_stats(running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                          m: Tensor, momentum: float | None, backend: str) -> None:
    """Phase ``update_running_stats``; ``m`` the count (an int in eager calls)."""
    _backend(backend).update_running_stats(running_mean, running_var, num_batches_tracked,
                                           mean, var, m, momentum)


_BODIES = {"stats": _stats, "forward_eval": _forward_eval, "grad_sums": _grad_sums,
           "grad_input": _grad_input, "forward_train": _forward_train, "backward": _backward,
           "update_running_stats": _update_running_stats}

for _name, _body in _BODIES.items():
    _mutates = (("running_mean", "running_var", "num_batches_tracked")
                if _name == "update_running_stats" else ())
    torch.library.custom_op(f"batchnorm::{_name}", _body, mutates_args=_mutates)


@torch.library.register_fake("batchnorm::stats")
def _(x, backend):
    return _stat(x, torch.float64), _stat(x, torch.float64)


@torch.library.register_fake("batchnorm::forward_eval")
def _(x, scale, shift, residual, center, relu, backend):
    return torch.empty_like(x)


@torch.library.register_fake("batchnorm::grad_sums")
def _(dy, x, y, mean, rstd, backend):
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("batchnorm::grad_input")
def _(dy, x, y, mean, rstd, weight, mean_dz, mean_dz_x_hat, need_dres, backend):
    return torch.empty_like(x), (torch.empty_like(x) if need_dres else _none())


@torch.library.register_fake("batchnorm::forward_train")
def _(x, weight, bias, residual, eps, relu, backend):
    return torch.empty_like(x), _stat(x), _stat(x), _stat(x)


@torch.library.register_fake("batchnorm::backward")
def _(dy, x, y, mean, rstd, weight, training, need_dx, need_dres, backend):
    dx = torch.empty_like(x) if need_dx else _none()
    dres = torch.empty_like(x) if need_dres else _none()
    return dx, torch.empty_like(mean), torch.empty_like(mean), dres


@torch.library.register_fake("batchnorm::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, mean, var, m, momentum, backend):
    return None


def call(name: str):
    """Phase ``name``: the registered op while torch.compile traces, the plain function
    otherwise."""
    if torch.compiler.is_compiling():
        op = getattr(torch.ops.batchnorm, name)
        if name == "update_running_stats":
            return _with_tensor_count(op)
        return op
    return _BODIES[name]


def _with_tensor_count(op):
    # The op's schema takes the count as a tensor (a device tensor after a cross-process merge);
    # a count known from the shape becomes one while tracing only.
    def update(running_mean, running_var, counter, mean, var, m, momentum, backend):
        if not isinstance(m, Tensor):
            m = torch.tensor(m, dtype=torch.float64, device=mean.device)
        op(running_mean, running_var, counter, mean, var, m, momentum, backend)

    return update
