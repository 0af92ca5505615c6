"""Masked batch norm: statistics over the positions a mask counts (padded sequences).

Sequence models batch sequences of unequal length as ``(N, C, L)`` with padding. Batch norm
over all of it counts the padding in every channel's mean and variance; with a boolean mask
``(N, *spatial)``, True where a value counts, the batch's statistics are those of the counted
positions only, ``m`` = the number of True entries (the same for every channel):

    mean = sum(mask * x) / m,    var = sum(mask * (x - mean)^2) / m

and the running variance moves towards ``m / (m - 1) * var``. Every position is normalized by
those statistics, padding included, so the output is defined everywhere; the padding's values
do not enter the statistics, so nothing of them reaches other positions' outputs or
gradients. With a
``process_group`` the sums and counts are added over the group's processes first
(``torch.distributed.nn``'s differentiable ``all_reduce``), as ``SyncBatchNorm`` does.

A call runs on its backend's phases (``batchnorm.kernels``): ``stats`` of the counted
values gathered into a ``(m, C)`` batch (merged across the group as ``SyncBatchNorm``'s),
``forward_eval`` of the whole input with those statistics, and in the backward ``grad_sums``
over every position and ``grad_input`` with the counted ``m``::

    dx = weight * rstd * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)   counted positions
    dx = weight * rstd * dy                                                  padding

The sums run over every position, padding included, since the padding's outputs are
normalized by the same statistics; the padding's values enter no statistic, so only the
direct term reaches their own gradient. ``train`` is the same computation in torch ops (its
gradients are autograd's): the definition the tests hold the phases to, and the path under
double backward, ``torch.func`` transforms and ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import _autograd, _seams
from batchnorm._ops import call, like_layout
from batchnorm.kernels import eager


def check_mask(mask, x: Tensor, training: bool, process_group) -> None:
    """A clear error for a mask that is not a bool tensor of ``x``'s shape without dim 1, on
    its device, or (in training) that counts fewer than 2 values per channel."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, True where a value counts; got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    expected = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != expected or mask.device != x.device:
        raise ValueError(f"mask must have the input's shape without the channel dim, "
                         f"{expected}, on {x.device}; got {tuple(mask.shape)} on {mask.device}")
    counted = int(mask.sum()) if training and process_group is None else 2
    if counted < 2:
        raise ValueError(f"the mask counts {counted} value(s) per channel, but training "
                         "needs at least 2 for a variance; unmask more positions, or call "
                         ".eval() to use the running statistics")


def train(x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
          process_group=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 over the counted positions: ``(y, mean, var, m)``, ``mean`` and ``var``
    (biased) detached, ``m`` the count, a 0-dim tensor.

    >>> x = torch.tensor([[[1.0, 3.0, 100.0]]])
    >>> y, mean, var, m = train(x, torch.tensor([[True, True, False]]), None, None, 0.0)
    >>> y.tolist(), mean.tolist(), var.tolist(), int(m)
    ([[[-1.0, 1.0, 98.0]]], [2.0], [1.0], 2)
    """
    acc = eager.acc_dtype(x.dtype)
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    if process_group is not None:
        from batchnorm._seams import _agree

        _agree(process_group, x)  # the ranks' channels and dtypes, before any collective
    w = mask.unsqueeze(1).to(acc)
    xs = x.to(acc)
    count, total = w.sum().reshape(1), (xs * w).sum(dims)
    if process_group is not None:
        count, total = _summed(torch.cat((count, total)), process_group).split((1, x.shape[1]))
    mean = total / count
    centered = xs - mean.view(shape)
    squares = (centered.square() * w).sum(dims)
    if process_group is not None:
        squares = _summed(squares, process_group)
    var = squares / count
    if process_group is not None and int(count) < 2:
        raise ValueError(f"the masks of the group count {int(count)} value(s) per channel, but "
                         "training needs at least 2 for a variance")
    y = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(x.dtype), mean.detach(), var.detach(), count.detach().reshape(())


def _summed(t: Tensor, group) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, group=group)


class MaskedTrain(torch.autograd.Function):
    """Masked training batch norm on a backend's phases: ``(y, mean, var, count)``, the
    statistics float64 and not differentiable, ``count`` a float64 0-dim tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, eps, backend, group):
        counted = x.movedim(1, -1)[mask]  # (m, C): the counted values, gathered
        count, mean, var = _seams.batch_statistics(counted, backend, group)
        if group is not None and float(count) < 2:
            raise ValueError(f"the masks of the group count {int(count)} value(s) per "
                             "channel, but training needs at least 2 for a variance")
        acc = eager.acc_dtype(x.dtype)
        rstd = torch.rsqrt(var + eps)
        # The pivot of the normalization (x - center is exact near it): a counted value.
        center = counted[0].to(acc) if counted.shape[0] else None
        scale, shift = eager.affine(weight, bias, mean, rstd, center)
        y = call("forward_eval")(x, scale.to(acc), shift.to(acc), None, center, False, backend)
        ctx.save_for_backward(x, weight, mean.to(acc), rstd.to(acc), mask, count)
        ctx.config = (eps, backend, group, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var, count)
        return _autograd._fresh(y), mean, var, count

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, rstd, mask, count = ctx.saved_tensors
        eps, backend, group, bias_dtype = ctx.config
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if _autograd._differentiable():  # double backward: autograd through the torch ops
            if group is not None:
                raise NotImplementedError("double backward through statistics merged across "
                                          "processes is not supported; differentiate once")
            inputs = [t for t in (x, weight) if t is not None]
            with torch.enable_grad():
                y = train(x, mask, weight, None, eps)[0]
                grads = torch.autograd.grad(y, inputs, dy, create_graph=True)
            dx, dweight = grads[0], (grads[1] if weight is not None else None)
            dbias = dy.sum((0, *range(2, dy.dim())))
        else:
            dy = like_layout(dy, x)
            s0, s1 = call("grad_sums")(dy, x, None, mean, rstd, backend)
            sums = torch.cat((s0, s1)).double()
            if group is not None:
                dist.all_reduce(sums, group=group)
            channels = mean.shape[0]
            mean_dz, mean_dz_x_hat = (sums / count).to(mean.dtype).split(channels)
            dx = None
            if need_dx:
                dx, _ = call("grad_input")(dy, x, None, mean, rstd, weight, mean_dz,
                                           mean_dz_x_hat, False, backend)
                # The padding: the direct term only (its values enter no statistic).
                gain = rstd if weight is None else rstd * weight.to(rstd.dtype)
                shape = (1, -1) + (1,) * (x.dim() - 2)
                direct = (dy.to(gain.dtype) * gain.view(shape)).to(dx.dtype)
                dx = torch.where(mask.unsqueeze(1), dx, direct)
            dweight, dbias = s1, s0
        return (dx if need_dx else None,
                dweight.to(weight.dtype) if need_dw else None,
                dbias.to(bias_dtype) if need_db else None, None, None, None, None)
