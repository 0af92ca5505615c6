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

The computation is in torch ops, in the accumulation dtype (float32 for half types, else the
input's), on every device and whatever the backend; its gradients are autograd's, exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
