"""In-place activated batch norm (Rota Bulò, Porzi and Kontschieder, CVPR 2018): less memory.

In a BN -> activation -> conv sequence, autograd keeps two full tensors for the backward: BN's
input ``x`` and the activation's output. In-place ABN keeps only the output ``z``: it writes
``y = gamma' * x_hat + beta`` and ``z = act(y)`` over ``x``'s own memory, and its backward
gets ``y`` back from ``z`` by inverting the activation, then ``x_hat = (y - beta) / gamma'``,
so the gradients need neither ``x`` nor ``x_hat``:

    dy      = dz * act'(y)
    dbeta   = sum(dy),        dgamma' = sum(dy * x_hat)
    dx      = gamma' * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))     (training)
    dx      = gamma' * rstd * dy                                             (inference)

The activation must be invertible: leaky ReLU with a positive slope, ELU, or the identity
(plain ReLU loses its negative half; it is refused). So must the affine map: as in the
paper, the scale is ``gamma' = |gamma| + eps``, never 0, and ``dgamma = dgamma' * sign(gamma)``.
A layer is thus exactly ``BatchNorm`` with weight ``|gamma| + eps`` followed by the
activation.

What a user cannot do: the call overwrites its input, so the input must not be needed
afterwards (an in-place op on it, or a second use of it, invalidates the gradient; autograd
says so when it can, through the tensor's version counter). The input must not be a leaf
that requires grad. Statistics, running estimates and their non-finite guard are those of
``batchnorm.functional.batch_norm``; everything is torch ops, on every device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import functional as F
from batchnorm.kernels import eager
from batchnorm.modules import _BatchNorm

ACTIVATIONS = ("leaky_relu", "elu", "identity")


def _check_activation(activation: str, param: float) -> None:
    if activation not in ACTIVATIONS:
        hint = (" (plain ReLU is not invertible: use leaky_relu with a small slope)"
                if activation == "relu" else "")
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}{hint}")
    if activation in ("leaky_relu", "elu") and not param > 0:
        raise ValueError(f"{activation} must have a positive activation_param to be "
                         f"invertible, got {param}")


class _InPlaceABN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, counter, training, momentum,
                eps, activation, param, group):
        acc = eager.acc_dtype(x.dtype)
        dims = (0, *range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        channels = x.shape[1]
        m = x.numel() // channels
        if training and group is None:
            var, mean = torch.var_mean(x.detach().to(acc), dims, correction=0)
        elif training:
            xs = x.detach().to(acc)
            # The batch of every process of the group (SyncBatchNorm): sums, then the mean's
            # squared deviations, each added over the group.
            total, m = _summed_with_count(x, xs.sum(dims), m, group)
            mean = total / m
            squares = (xs - mean.view(shape)).square().sum(dims)
            dist.all_reduce(squares, group=group)
            var = squares / m
        if training:
            if running_mean is not None:
                eager.update_running_stats(running_mean, running_var, counter, mean, var, m,
                                           momentum)
        else:
            # Copies: a later training step moves the running estimates in place, which must
            # not change this call's backward.
            mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
        rstd = torch.rsqrt(var + eps)
        scale = (weight.detach().abs().to(acc) + eps) if weight is not None else \
            torch.ones(channels, dtype=acc, device=x.device)
        shift = bias.detach().to(acc) if bias is not None else torch.zeros_like(scale)
        # y = (x - mean) * rstd * scale + shift = x * a + b, written over x, then the activation.
        a = rstd * scale
        x.mul_(a.view(shape).to(x.dtype)).add_((shift - mean * a).view(shape).to(x.dtype))
        if activation == "leaky_relu":
            torch.nn.functional.leaky_relu_(x, param)
        elif activation == "elu":
            torch.nn.functional.elu_(x, param)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, scale, shift, rstd, mean)
        ctx.config = (training, activation, param, x.dtype,
                      None if bias is None else bias.dtype, group, m)
        return x

    @staticmethod
    def backward(ctx, dz):
        z, weight, scale, shift, rstd, mean = ctx.saved_tensors
        training, activation, param, x_dtype, bias_dtype, group, m = ctx.config
        acc = rstd.dtype
        dims = (0, *range(2, z.dim()))
        shape = (1, -1) + (1,) * (z.dim() - 2)
        z, dz = z.to(acc), dz.to(acc)
        positive = z >= 0
        if activation == "leaky_relu":  # y = z / slope below 0; dy/dy' = slope
            y = torch.where(positive, z, z / param)
            dy = torch.where(positive, dz, dz * param)
        elif activation == "elu":  # z = a (e^y - 1) below 0: y = log1p(z / a), dz/dy = z + a
            y = torch.where(positive, z, torch.log1p(z / param))
            dy = torch.where(positive, dz, dz * (z + param))
        else:
            y, dy = z, dz
        if group is None and x_dtype in (torch.float32, torch.float64):
            # torch's own batch-norm backward, on the input rebuilt from y for the moment:
            # x = (y - shift) / (scale * rstd) + mean.
            a = (scale * rstd).reciprocal()
            x = torch.addcmul((mean - shift * a).view(shape), y, a.view(shape))
            dx, dscale, dshift = torch.ops.aten.native_batch_norm_backward(
                dy, x, scale, mean, rstd.square().reciprocal(), mean, rstd, training, 0.0,
                [ctx.needs_input_grad[0], weight is not None, bias_dtype is not None])
            dweight = (dscale * torch.sign(weight.detach().to(acc))).to(weight.dtype) \
                if weight is not None and ctx.needs_input_grad[1] else None
            dbias = dshift.to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[2] \
                else None
            return dx, dweight, dbias, None, None, None, None, None, None, None, None, None
        x_hat = (y - shift.view(shape)) / scale.view(shape)
        sum_dy, sum_dy_x_hat = dy.sum(dims), (dy * x_hat).sum(dims)  # this process's: the
        dx = None                                                     # parameters' gradients
        if ctx.needs_input_grad[0]:
            coef = (scale * rstd).view(shape)
            if training:
                sums = torch.cat((sum_dy, sum_dy_x_hat))
                if group is not None:  # the means are over the group's whole batch
                    sums = sums.clone()
                    dist.all_reduce(sums, group=group)
                mean_dy, mean_dy_x_hat = (sums / m).view(2, *shape)
                dx = coef * (dy - mean_dy - x_hat * mean_dy_x_hat)
            else:
                dx = coef * dy
            dx = dx.to(x_dtype)
        dweight = (sum_dy_x_hat * torch.sign(weight.detach().to(acc))).to(weight.dtype) \
            if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[2] \
            else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


def _summed_with_count(x: Tensor, total: Tensor, m: int, group) -> tuple[Tensor, int]:
    """The per-channel sums and the count over the group, after its processes agree on
    ``x``'s channels and dtype."""
    from batchnorm._seams import _agree

    _agree(group, x)
    both = torch.cat((total, total.new_tensor([m])))
    dist.all_reduce(both, group=group)
    m = int(both[-1])
    if m < 2:
        raise ValueError(f"the group's batch has {m} value(s) per channel; training needs at "
                         "least 2 for a variance")
    return both[:-1], m


def inplace_abn(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", activation_param: float = 0.01, *,
                num_batches_tracked: Tensor | None = None, process_group=None) -> Tensor:
    """``act(BatchNorm(input))`` written over ``input``, keeping only the result for backward.

    The arguments are those of ``batchnorm.functional.batch_norm``, with the scale
    ``|weight| + eps``; ``activation`` is ``"leaky_relu"`` (slope ``activation_param``),
    ``"elu"`` (alpha ``activation_param``) or ``"identity"``; in training, ``process_group``
    takes the statistics (and the input gradient's means) over the batch of every process of
    a ``torch.distributed`` group, as ``SyncBatchNorm``. Returns ``input`` itself.

    >>> x = torch.tensor([[-1.0], [1.0], [3.0]])
    >>> inplace_abn(x, None, None, training=True, eps=1e-12, activation="identity") is x
    True
    >>> [round(v, 4) for v in x.flatten().tolist()]
    [-1.2247, 0.0, 1.2247]
    """
    _check_activation(activation, activation_param)
    momentum, eps = F._check(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, num_batches_tracked, None, None,
                             process_group if training else None, None, None)
    if input.is_leaf and input.requires_grad:
        raise ValueError("inplace_abn overwrites its input, which is a leaf that requires "
                         "grad; pass the output of an earlier layer, or input.clone()")
    return _InPlaceABN.apply(input, weight, bias, running_mean, running_var,
                             num_batches_tracked, training, momentum, eps, activation,
                             float(activation_param), process_group if training else None)


class _InPlaceABNLayer(_BatchNorm):
    """``BatchNorm`` with torch's state_dict layout, then an invertible activation, in place."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01, **kwargs):
        _check_activation(activation, activation_param)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.inplace_activation, self.activation_param = activation, activation_param

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_channels(input)
        use_batch_stats, running_mean, running_var, counter = self._statistics()
        return inplace_abn(input, running_mean, running_var, self.weight, self.bias,
                           use_batch_stats, self.momentum, self.eps, self.inplace_activation,
                           self.activation_param, num_batches_tracked=counter,
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
