"""In-place activated batch norm (Rota Bulò, Porzi and Kontschieder, CVPR 2018): less memory.

In a BN -> activation -> conv sequence, autograd keeps two full tensors for the backward: BN's
input ``x`` and the activation's output. In-place ABN keeps only the output ``z``: it writes
``y = gamma' * x_hat + beta`` and ``z = act(y + residual)`` over ``x``'s own memory, and its
backward gets ``y`` back from ``z`` by inverting the activation (``y = act^-1(z) -
residual``), so the gradients need neither ``x`` nor ``x_hat``. With ``x_hat = (y - beta) /
gamma'``, batch norm's closed-form backward reads::

    dy      = dz * act'(act^-1(z))                      (also the residual's gradient)
    dbias   = sum(dy),        dgamma' = sum(dy * x_hat)
    dx      = gamma' * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))     (training)
    dx      = gamma' * rstd * dy                                             (inference)

which is batch norm's own backward evaluated at the input ``y``, with ``beta`` for the mean,
``1 / gamma'`` for ``rstd`` (then ``(y - mean) * rstd`` is ``x_hat``) and ``gamma'**2 * rstd``
for the weight (then ``weight * rstd`` is ``gamma' * rstd``): every backend runs its own
``backward`` phase (or, across processes, ``grad_sums`` and ``grad_input``) on ``(dy, y)``,
after its ``invert_activation`` phase (``batchnorm.kernels``); numba fuses the two.
``batchnorm.reference.inplace_abn_backward`` writes the same in NumPy, from Algorithm 1's
closed form.

The activation must be invertible: leaky ReLU with a positive slope, ELU, or the identity
(plain ReLU loses its negative half; it is refused). So must the affine map: as in the
paper, the scale is ``gamma' = |gamma| + eps``, never 0, and ``dgamma = dgamma' * sign(gamma)``.
A layer is thus exactly ``BatchNorm`` with weight ``|gamma| + eps``, plus the residual, then
the activation.

The residual form, ``z = act(BN(x) + residual)``, is the end of a residual unit (the third BN
of a ResNet bottleneck, then ``out += identity`` and the activation): it saves the residual
for the backward, which is no extra memory where the residual is kept anyway (the unit's
input, saved by its first convolution; or a shortcut's own in-place ABN output).

What a user cannot do: the call overwrites its input, so the input must not be needed
afterwards (an in-place op on it, or a second use of it, invalidates the gradient; autograd
says so when it can, through the tensor's version counter), nor may the residual change
before the backward. The input must not be a leaf that requires grad. Statistics, running
estimates and their non-finite guard are those of ``batchnorm.functional.batch_norm``.
Double backward and ``torch.func`` transforms are not supported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import _seams
from batchnorm import functional as F
from batchnorm._ops import as_ncl, call, like_layout
from batchnorm.kernels import _ncl, eager, native, resolve
from batchnorm.kernels import backend as backend_module
from batchnorm.modules import _BatchNorm, fx_leaf

ACTIVATIONS = tuple(a for a in eager.INVERTIBLE if a != "identity") + ("identity",)


def _check_activation(activation: str, param: float) -> None:
    if activation not in ACTIVATIONS:
        hint = (" (plain ReLU is not invertible: use leaky_relu with a small slope)"
                if activation == "relu" else "")
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}{hint}")
    if activation in ("leaky_relu", "elu") and not param > 0:
        raise ValueError(f"{activation} must have a positive activation_param to be "
                         f"invertible, got {param}")


def _native_forward(x, scale, shift, running_mean, running_var, counter, training, momentum,
                    eps) -> Tensor:
    """``BN(x)`` (weight ``scale``) written over ``x`` by torch's own op, its running
    statistics under the guard of ``native.train``; returns ``rstd``."""
    if training:
        y, rstd = native.train_saved(x, scale, shift, running_mean, running_var, counter,
                                     momentum, eps)
    else:
        y = native.infer(x, scale, shift, running_mean, running_var, eps)
        rstd = torch.rsqrt(running_var.to(scale.dtype) + eps)
    x.copy_(y)
    return rstd


def _phased_statistics(x, running_mean, running_var, counter, training, momentum, eps, name,
                       group):
    """``(mean, rstd, center, count)`` of an inference call, or of a training call across a
    process group from the backend's phases: ``stats`` merged over ``group``, the running
    estimates updated; ``center`` the pivot the normalization subtracts first (a copy: the
    input is overwritten)."""
    acc = eager.acc_dtype(x.dtype)
    if not training:
        return running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps), None, None
    count, mean, var = _seams.batch_statistics(x, name, group)
    if float(count) < 2:
        raise ValueError(f"the group's batch has {int(count)} value(s) per channel; "
                         "training needs at least 2 for a variance")
    if running_mean is not None:
        call("update_running_stats")(running_mean, running_var, counter, mean, var, count,
                                     momentum, name)
    return mean, torch.rsqrt(var + eps), eager.pivot(as_ncl(x)).clone(), count


class _InPlaceABN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, counter, training,
                momentum, eps, activation, param, group, name):
        acc = eager.acc_dtype(x.dtype)
        work = F._canonical_layout(x)  # x itself, unless its layout is neither of the two
        channels = x.shape[1]
        scale = (weight.detach().abs().to(acc) + eps) if weight is not None else \
            torch.ones(channels, dtype=acc, device=x.device)
        shift = bias.detach().to(acc) if bias is not None else torch.zeros_like(scale)
        x3, residual3 = as_ncl(work), _ncl(None if residual is None else like_layout(residual,
                                                                                    work))
        backend = backend_module(name)
        count = None
        if name == "native":
            param_dtype = next((t.dtype for t in (weight, bias, running_mean) if t is not None),
                               x.dtype)  # one among them (F._takes)
            if momentum is None and training and running_mean is not None:
                momentum = 1.0 / (int(counter) + 1)  # the cumulative average, as torch
            rstd = _native_forward(work, scale.to(param_dtype), shift.to(param_dtype),
                                   running_mean, running_var, counter, training, momentum, eps)
        elif training and group is None:  # the backend's fused pass, into x itself
            _, mean, rstd, var = backend.forward_train(x3, scale, shift, eps, out=x3)
            if running_mean is not None:
                call("update_running_stats")(running_mean, running_var, counter, mean, var,
                                             x3.shape[0] * x3.shape[2], momentum, name)
        else:
            mean, rstd, center, count = _phased_statistics(
                work, running_mean, running_var, counter, training, momentum, eps, name, group)
            a, b = eager.affine(scale, shift, mean, rstd, center)
            backend.forward_eval(x3, a.to(acc), b.to(acc), None, False,
                                 None if center is None else center.to(x.dtype), out=x3)
        backend.activate(x3, residual3, activation, param)
        if work is not x:
            x.copy_(work)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, scale, shift, rstd.to(acc), residual)
        ctx.config = (training, activation, param, None if bias is None else bias.dtype,
                      group, count, name)
        return x

    @staticmethod
    def backward(ctx, dz):
        z, weight, scale, shift, rstd, residual = ctx.saved_tensors
        training, activation, param, _, group, count, name = ctx.config
        need_dx, need_dres = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        z = F._canonical_layout(z)
        backend = backend_module(name)
        z3, dz3 = as_ncl(z), as_ncl(like_layout(dz, z))
        residual3 = _ncl(None if residual is None else like_layout(residual, z))
        # Batch norm's backward at input y: x_hat = (y - shift) / scale (module docstring).
        mean, inv, gain = shift, scale.reciprocal(), scale * scale * rstd
        if group is None and hasattr(backend, "inplace_abn_backward"):  # y never written out
            dx, s1, s0, dy3 = backend.inplace_abn_backward(
                dz3, z3, residual3, activation, param, mean, inv, gain, training, need_dx,
                need_dres)
            return _InPlaceABN._gradients(ctx, z, dx, s1, s0, dy3, weight, residual)
        y3, dy3 = backend.invert_activation(z3, dz3, residual3, activation, param)
        if name == "native" and group is None:
            y, dy = y3.reshape(z.shape), dy3.reshape(z.shape)
            dx, s1, s0 = torch.ops.aten.native_batch_norm_backward(
                dy, y, gain, mean, scale.square(), mean, inv, training, 0.0,
                [need_dx, True, True])
        elif group is None:
            dx, s1, s0, _ = backend.backward(dy3, y3, None, mean, inv, gain, training, need_dx)
        else:
            dx, s1, s0, _ = _seams.backward(dy3, y3, None, mean, inv, gain, count, need_dx,
                                            False, name, group)
        return _InPlaceABN._gradients(ctx, z, dx, s1, s0, dy3, weight, residual)

    @staticmethod
    def _gradients(ctx, z, dx, s1, s0, dy3, weight, residual):
        """The inputs' gradients from the backward's results: ``dgamma = dgamma' *
        sign(gamma)``, the residual's is ``dy``."""
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        bias_dtype = ctx.config[3]
        dx = dx.reshape(z.shape).to(z.dtype) if need_dx else None
        dweight = (s1 * torch.sign(weight.detach().to(s1.dtype))).to(weight.dtype) \
            if need_dw else None
        dbias = s0.to(bias_dtype) if need_db else None
        dres = dy3.reshape(z.shape).to(residual.dtype) if need_dres else None
        return (dx, dweight, dbias, dres) + (None,) * 10


def inplace_abn(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", activation_param: float = 0.01, *,
                num_batches_tracked: Tensor | None = None, residual: Tensor | None = None,
                process_group=None, backend: str | None = None) -> Tensor:
    """``act(BatchNorm(input) + residual)`` written over ``input``, keeping only the result
    (and the residual) for backward.

    The arguments are those of ``batchnorm.functional.batch_norm``, with the scale
    ``|weight| + eps``; ``activation`` is ``"leaky_relu"`` (slope ``activation_param``),
    ``"elu"`` (alpha ``activation_param``) or ``"identity"``; ``residual`` (``None`` for none)
    a tensor of ``input``'s shape and dtype added before the activation, which must not change
    before the backward; in training, ``process_group`` takes the statistics (and the input
    gradient's means) over the batch of every process of a ``torch.distributed`` group, as
    ``SyncBatchNorm``; ``backend`` as for ``batch_norm``. Returns ``input`` itself.

    >>> x = torch.tensor([[-1.0], [1.0], [3.0]])
    >>> inplace_abn(x, None, None, training=True, eps=1e-12, activation="identity") is x
    True
    >>> [round(v, 4) for v in x.flatten().tolist()]
    [-1.2247, 0.0, 1.2247]
    """
    _check_activation(activation, activation_param)
    group = process_group if training else None
    momentum, eps = F._check(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, num_batches_tracked, None, residual, group, None,
                             None)
    if input.is_leaf and input.requires_grad:
        raise ValueError("inplace_abn overwrites its input, which is a leaf that requires "
                         "grad; pass the output of an earlier layer, or input.clone()")
    if residual is not None and residual.untyped_storage().data_ptr() == \
            input.untyped_storage().data_ptr():
        raise ValueError("the residual shares memory with the input, which inplace_abn "
                         "overwrites; pass a residual of its own (e.g. residual.clone())")
    if input.numel() == 0:
        name = "eager"
    else:
        name = resolve(backend, F._canonical_layout(input), None, False, training)
        if name == "native" and (group is not None or not F._takes(
                input, weight, bias, running_mean, running_var)):
            # The statistics merge between phases, which torch's op lacks; it takes one dtype
            # for all the per-channel tensors.
            name = "eager"
    return _InPlaceABN.apply(input, weight, bias, residual, running_mean, running_var,
                             num_batches_tracked, training, momentum, eps, activation,
                             float(activation_param), group, name)


class _InPlaceABNLayer(_BatchNorm):
    """``BatchNorm`` with torch's state_dict layout, then an invertible activation, in place."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01, **kwargs):
        _check_activation(activation, activation_param)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.inplace_activation, self.activation_param = activation, activation_param

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(input) + residual)`` over ``input``'s memory; ``residual`` optional."""
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input) if residual is None else fx_leaf(self, input, residual)
        self._check_input_dim(input)
        self._check_channels(input)
        use_batch_stats, running_mean, running_var, counter = self._statistics()
        return inplace_abn(input, running_mean, running_var, self.weight, self.bias,
                           use_batch_stats, self.momentum, self.eps, self.inplace_activation,
                           self.activation_param, num_batches_tracked=counter,
                           residual=residual,
                           process_group=self._group() if self.training else None)

    def _group(self):
        return None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, activation={self.inplace_activation!r}, "
                f"activation_param={self.activation_param}")


class InPlaceABN1d(_InPlaceABNLayer):
    """In-place ABN over ``(N, C)`` or ``(N, C, L)`` input; see ``batchnorm.inplace_abn``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class InPlaceABN2d(_InPlaceABNLayer):
    """In-place ABN over ``(N, C, H, W)`` input; see ``batchnorm.inplace_abn``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class InPlaceABN3d(_InPlaceABNLayer):
    """In-place ABN over ``(N, C, D, H, W)`` input; see ``batchnorm.inplace_abn``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")




class SyncInPlaceABN(_InPlaceABNLayer):
    """In-place ABN with statistics over a ``torch.distributed`` group, as ``SyncBatchNorm``:
    any input of rank >= 2; ``process_group=None`` for the default group. A single process
    (or none initialized) is plain in-place ABN."""

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
