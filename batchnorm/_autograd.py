"""Batch norm's autograd: the training and inference ops, with torch's whole autograd surface.

Three ``torch.autograd.Function`` s compose the phases of ``batchnorm.kernels``:

* ``BatchNormTrain``: plain training batch norm, on a backend's fused ``forward_train`` and
  ``backward``;
* ``BatchNormSeamed``: training batch norm with its two seams open, ``stats`` ->
  (merge across a process group) -> (Batch Renorm's corrections) -> ``forward_eval``, and
  ``grad_sums`` -> (sum across the group) -> ``grad_input`` (``batchnorm._seams``);
* ``BatchNormEval``: batch norm with fixed statistics (Algorithm 2).

Each has the closed-form backward; under ``create_graph=True`` (double backward) and inside
``torch.func`` transforms the same closed form runs as differentiable torch ops of the eager
specification on statistics recomputed from the input, so higher derivatives, batched
gradients (``is_grads_batched``) and ``vmap`` of the backward follow. Each also has a ``jvp``
(forward-mode AD, ``torch.func.jvp``/``jacfwd``) and a ``vmap`` rule, which folds the vmapped
dimension into the channels: every vmapped slice is a batch norm of its own, and a batch norm
over ``B * C`` channels computes ``B`` of them at once.

Outputs are never views of tensors made inside the op, so callers may modify them in place
(``relu_``, ``out += identity``), as torch's own batch norm allows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._functorch.autograd_function import custom_function_call
from torch._functorch.utils import unwrap_dead_wrappers

from batchnorm import _seams
from batchnorm._ops import as_ncl, call, like_layout
from batchnorm.kernels import eager

_functorch_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _fresh(y: Tensor) -> Tensor:
    # A view made here would refuse in-place ops outside ("Output 0 of ... is a view"): the
    # same memory as a tensor of its own. (A traced op's output is a fresh tensor already.)
    if torch.compiler.is_compiling():
        return y
    return y.detach() if y._is_view() else y


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (like.dim() - 2))


class _Op(torch.autograd.Function):
    """The cheap ``apply`` the ops share, and the backward's choice of implementation."""

    @classmethod
    def apply(cls, *args):
        # torch's apply binds the arguments to the signature on every call (about 20 us); the
        # ops are always called with every argument, positionally, so that is skipped.
        if _functorch_active():
            return custom_function_call(cls, *args)
        if _is_wrapped(args[0]):
            args = unwrap_dead_wrappers(args)
        return super(torch.autograd.Function, cls).apply(*args)


def _differentiable() -> bool:
    """Whether a backward must run as differentiable torch ops: under double backward, inside
    ``torch.func`` transforms, and for ``is_grads_batched``, which runs it under torch's legacy
    vmap (``VmapMode`` in the dispatcher's thread-local keys), where kernels cannot see the
    batched gradients."""
    return (torch.is_grad_enabled() or _functorch_active()
            or "VmapMode" in repr(torch._C._dispatch_tls_local_include_set()))


def _cast(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    return grad.to(like.dtype) if needed and like is not None else None


def _closed_form(dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor,
                 weight: Tensor | None, training: bool, eps: float, need_dx: bool,
                 need_dres: bool) -> tuple:
    """The closed-form gradients as differentiable torch ops (eager specification).

    In training the statistics are functions of ``x``, so they are recomputed from it here
    (the saved ones are detached results of the forward op); in inference they are constants.
    The ReLU mask is piecewise constant, so ``y`` enters without a gradient.
    """
    x3 = as_ncl(x)
    if training:
        mean, var, _ = eager.batch_stats(x3)
        rstd = torch.rsqrt(var + eps)
    y3 = None if y is None else as_ncl(y).detach()
    dx3, dweight, dbias, dres3 = eager.backward(as_ncl(dy), x3, y3, mean, rstd, weight,
                                                training, need_dx, need_dres)
    dx = None if dx3 is None else dx3.reshape(x.shape)
    dres = None if dres3 is None else dres3.reshape(x.shape)
    return dx, dweight, dbias, dres


def _x_hat_tangent(x_t: Tensor, x_hat: Tensor, rstd: Tensor, training: bool) -> Tensor:
    """Forward-mode derivative of ``x_hat``: ``rstd * (x_t - E[x_t] - x_hat * E[x_t x_hat])``
    in training (the statistics move with ``x``), ``rstd * x_t`` with fixed statistics."""
    r = _per_channel(rstd, x_t)
    if not training:
        return x_t * r
    dims = [0] + list(range(2, x_t.dim()))
    return (x_t - x_t.mean(dims, keepdim=True)
            - x_hat * (x_t * x_hat).mean(dims, keepdim=True)) * r


def _output_tangent(saved: tuple, training: bool, x_t, w_t, b_t, res_t, gain=None,
                    shift=None) -> Tensor:
    """The tangent of ``act(weight * (x_hat * gain + shift) + bias + residual)``; ``saved`` is
    ``(x, weight, mean, rstd, y)``, ``y`` only after a ReLU."""
    x, weight, mean, rstd, y = saved[:5]
    acc = mean.dtype
    x_hat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(rstd, x)
    w = torch.ones_like(rstd) if weight is None else weight.to(acc)
    if gain is not None:
        w = w * gain
    z_t = torch.zeros_like(x_hat)
    if x_t is not None:
        z_t = z_t + _x_hat_tangent(x_t.to(acc), x_hat, rstd, training) * _per_channel(w, x)
    if w_t is not None:
        u = x_hat if gain is None else x_hat * _per_channel(gain, x) + _per_channel(shift, x)
        z_t = z_t + u * _per_channel(w_t.to(acc), x)
    if b_t is not None:
        z_t = z_t + _per_channel(b_t.to(acc), x)
    if res_t is not None:
        z_t = z_t + res_t.to(acc)
    if y is not None:
        z_t = z_t.masked_fill(y <= 0, 0)
    return z_t.to(x.dtype)


# --- vmap: fold the vmapped dimension into the channels ----------------------------------------

def _fold(t: Tensor | None, dim: int | None, size: int, per_channel: bool) -> Tensor | None:
    """``t`` with its vmapped dim ``dim`` folded into the channels: ``(N, B*C, ...)`` for
    inputs, ``(B*C,)`` for per-channel vectors; an unbatched ``t`` is repeated ``size`` times."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    if per_channel:
        return t.reshape(-1)
    return t.movedim(0, 1).reshape(t.shape[1], -1, *t.shape[3:]).contiguous()


def _unfold(y: Tensor, size: int) -> Tensor:
    """``(N, B*C, ...)`` back to ``(N, B, C, ...)``, the vmapped dim at 1."""
    return y.reshape(y.shape[0], size, -1, *y.shape[2:])


class BatchNormTrain(_Op):
    """Training batch norm on the batch's own statistics: ``(y, mean, var, rstd)``.

    ``mean`` and ``var`` (biased) are the batch statistics, ``rstd = 1/sqrt(var + eps)``; they
    are not differentiable and only feed the running estimates.
    """

    @staticmethod
    def forward(x, weight, bias, residual, eps, relu, backend):
        y, mean, rstd, var = call("forward_train")(x, weight, bias, residual, eps, relu, backend)
        return _fresh(y), mean, var, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, eps, relu, backend = inputs
        y, mean, var, rstd = output
        saved = (x, weight, mean, rstd, y if relu else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(mean, var, rstd)
        ctx.training, ctx.eps, ctx.backend = True, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _drstd):
        x, weight, mean, rstd, y = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        if _differentiable():
            dx, dweight, dbias, dres = _closed_form(dy, x, y, mean, rstd, weight, True, ctx.eps,
                                                    need_dx, need_dres)
        else:
            dx, dweight, dbias, dres = call("backward")(
                like_layout(dy, x), x, y, mean, rstd, weight, True, need_dx, need_dres,
                ctx.backend)
        return (dx if need_dx else None, _cast(dweight, weight, need_dw),
                dbias.to(ctx.bias_dtype) if need_db else None, dres if need_dres else None,
                None, None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, res_t, *_):
        return _output_tangent(ctx.saved_tensors, True, x_t, w_t, b_t, res_t), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, residual, eps, relu, backend):
        b = info.batch_size
        x_dim, w_dim, b_dim, r_dim = in_dims[:4]
        y, mean, var, rstd = BatchNormTrain.apply(
            _fold(x, x_dim, b, False), _fold(weight, w_dim, b, True), _fold(bias, b_dim, b, True),
            _fold(residual, r_dim, b, False), eps, relu, backend)
        stats = tuple(v.view(b, -1) for v in (mean, var, rstd))
        return (_unfold(y, b), *stats), (1, 0, 0, 0)


class BatchNormEval(_Op):
    """Batch norm with fixed statistics: ``y = act(scale * x + shift + residual)``."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, residual, eps, relu, backend):
        scale, shift = eager.inference_affine(weight, bias, running_mean, running_var, eps)
        return _fresh(call("forward_eval")(x, scale, shift, residual, None, relu, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, residual, eps, relu, backend = inputs
        acc = torch.promote_types(eager.acc_dtype(x.dtype), running_mean.dtype)
        # Constants of this call, copied: a later training step updates the running estimates
        # in place and must not change this call's gradient.
        mean = running_mean.to(acc, copy=True)
        rstd = torch.rsqrt(running_var.to(acc) + eps)
        saved = (x, weight, mean, rstd, output if relu else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.training, ctx.eps, ctx.backend = False, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_dx, need_dw, need_db, need_dres = needs[0], needs[1], needs[2], needs[5]
        if _differentiable():
            dx, dweight, dbias, dres = _closed_form(dy, x, y, mean, rstd, weight, False, ctx.eps,
                                                    need_dx, need_dres)
        else:
            dx, dweight, dbias, dres = call("backward")(
                like_layout(dy, x), x, y, mean, rstd, weight, False, need_dx, need_dres,
                ctx.backend)
        return (dx if need_dx else None, _cast(dweight, weight, need_dw),
                dbias.to(ctx.bias_dtype) if need_db else None, None, None,
                dres if need_dres else None, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _rm_t, _rv_t, res_t, *_):
        return _output_tangent(ctx.saved_tensors, False, x_t, w_t, b_t, res_t)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, residual, eps, relu,
             backend):
        b = info.batch_size
        dims = in_dims
        y = BatchNormEval.apply(
            _fold(x, dims[0], b, False), _fold(weight, dims[1], b, True),
            _fold(bias, dims[2], b, True), _fold(running_mean, dims[3], b, True),
            _fold(running_var, dims[4], b, True), _fold(residual, dims[5], b, False), eps, relu,
            backend)
        return _unfold(y, b), 1


class BatchNormSeamed(_Op):
    """Training batch norm with its seams open: ``(y, mean, var, count)``.

    ``group`` (a ``torch.distributed`` process group, or ``None``) merges the statistics and
    the gradient sums of every process's slice; ``renorm`` (``None``, or ``(r_max, d_max,
    running_mean, running_var)``) applies Batch Renorm's corrections ``r`` and ``d``, constants
    for the gradient. ``mean`` and ``var`` (float64) are the statistics of the whole batch,
    ``count`` its number of values per channel (a float64 0-dim tensor).
    """

    @staticmethod
    def forward(x, weight, bias, residual, eps, relu, backend, group, renorm):
        count, mean, var = _seams.batch_statistics(x, backend, group)
        rstd = torch.rsqrt(var + eps)
        r, d = (None, None) if renorm is None else _seams.corrections(mean, var, eps, *renorm)
        gain, offset = _seams.effective_affine(weight, bias, r, d)
        if x.numel() == 0:
            y = torch.empty_like(x)
        else:
            center = eager.pivot(as_ncl(x))
            scale, shift = eager.affine(gain, offset, mean, rstd, center)
            y = _fresh(call("forward_eval")(x, scale, shift, residual, center, relu, backend))
        return y, mean, var, count, rstd, r, d

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, eps, relu, backend, group, renorm = inputs
        y, mean, var, count, rstd, r, d = output
        acc = eager.acc_dtype(x.dtype)
        saved = (x, weight, mean.to(acc), rstd.to(acc), y if relu else None, count, r, d)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        ctx.training, ctx.eps, ctx.backend, ctx.group = True, eps, backend, group
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, rstd, y, count, r, d = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        gain, _ = _seams.effective_affine(weight, None, r, d)
        if _differentiable():
            if ctx.group is not None:
                raise NotImplementedError(
                    "double backward and torch.func transforms through statistics merged "
                    "across processes (SyncBatchNorm) are not supported; differentiate once, "
                    "or use BatchNorm on each process")
            dx, s1, s0, dres = _closed_form(dy, x, y, mean, rstd, gain, True, ctx.eps, need_dx,
                                            need_dres)
        else:
            dx, s1, s0, dres = _seams.backward(like_layout(dy, x), x, y, mean, rstd, gain,
                                               count, need_dx, need_dres, ctx.backend, ctx.group)
        # y = weight * (x_hat * r + d) + bias: d(y)/d(weight) = x_hat * r + d
        dweight = s1 if r is None else s1 * r + s0 * d
        return (dx if need_dx else None, _cast(dweight, weight, need_dw),
                s0.to(ctx.bias_dtype) if need_db else None, dres if need_dres else None,
                None, None, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, res_t, *_):
        if ctx.group is not None:
            raise NotImplementedError("forward-mode AD through statistics merged across "
                                      "processes (SyncBatchNorm) is not supported")
        saved = ctx.saved_tensors
        y_t = _output_tangent(saved, True, x_t, w_t, b_t, res_t, *saved[6:])
        return y_t, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "vmap over SyncBatchNorm or Batch Renorm is not supported: their statistics span "
            "processes or depend on running estimates updated in place; vmap BatchNorm instead")


# torch.compile traces autograd functions without a custom jvp only: each op has a twin without
# one (forward-mode AD of a compiled graph is torch's business), which callers take while
# torch.compiler.is_compiling().

class TracedTrain(BatchNormTrain):
    jvp = torch.autograd.Function.jvp


class TracedEval(BatchNormEval):
    jvp = torch.autograd.Function.jvp


class TracedSeamed(BatchNormSeamed):
    jvp = torch.autograd.Function.jvp
