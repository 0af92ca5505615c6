"""The two seams of the batch-norm op, between its phases (``batchnorm._autograd``).

**Reduction**: the statistics of a batch split over the processes of a ``torch.distributed``
group. Each process reduces its slice to ``(count, mean, M2)`` per channel (phase ``stats``),
the processes exchange these ``2C + 1`` numbers with one ``all_gather``, and every one merges
them in the same order with Chan's parallel formula, weighted by count:

    n    = sum_i n_i
    mean = sum_i n_i * mean_i / n
    M2   = sum_i M2_i + sum_i n_i * (mean_i - mean)**2,      var = M2 / n   (biased)

so uneven slices, and a process whose slice is empty (``n_i = 0``, which contributes nothing
but still joins every collective), give exactly the statistics of the whole batch. The
backward needs two more global sums per channel, ``sum(dz)`` and ``sum(dz * x_hat)``: one
``all_reduce`` of ``2C`` numbers. Everything stays on the device (gloo for CPU tensors, NCCL
for CUDA ones); the exchanged numbers are float64 whatever the input dtype, so counts stay
exact past 2**24 values. Before the statistics, the processes exchange the channel count and
the dtype of their input, so a mismatch is an error that names it on every process rather than
a collective of mismatched sizes.

**Adjustment**: Batch Renorm (Ioffe, 2017) corrects the normalized batch towards the running
estimates, ``y = weight * (x_hat * r + d) + bias`` with

    r = clip(sigma_B / sigma, 1/r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max)

``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)``, ``mu`` the running mean,
all read before this batch updates them; ``r`` and ``d`` are constants for the gradient. It is
batch norm with the weight ``weight * r`` and the bias ``weight * d + bias``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm._ops import call

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def batch_statistics(x: Tensor, backend: str, group) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, var)`` of the batch, over every process of ``group`` when it is not
    ``None``: the count a float64 0-dim tensor, mean and biased variance float64 ``(C,)``."""
    channels, count = x.shape[1], x.numel() // max(x.shape[1], 1)
    if count > 0:
        mean, m2 = call("stats")(x, backend)
    else:
        mean = m2 = x.new_zeros((channels,), dtype=torch.float64)
    if group is None:
        n = torch.tensor(float(count), dtype=torch.float64, device=x.device)
        return n, mean, m2 / count
    n, mean, m2 = _merge_across(group, x, count, mean, m2)
    return n, mean, m2 / n


def _merge_across(group, x: Tensor, count: int, mean: Tensor,
                  m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    channels = mean.shape[0]
    _agree(group, x)
    local = torch.cat([mean.new_full((1,), float(count)), mean, m2])
    table = _gather(group, local)  # the same table on every process
    counts, means, m2s = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    total = counts.sum()
    merged = (counts * means).sum(0) / total
    return total, merged, m2s.sum(0) + (counts * (means - merged).square()).sum(0)


def _gather(group, local: Tensor) -> Tensor:
    """Every process's ``local`` (a vector of one size), one row each, in rank order."""
    rows = local.new_empty(dist.get_world_size(group) * local.numel())
    # all_gather_single in torch >= 2.13, which deprecates all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(rows, local, group=group)
    return rows.view(-1, local.numel())


def _agree(group, x: Tensor) -> None:
    """Raise on every process when the processes' channel counts or dtypes differ."""
    mine = torch.tensor([x.shape[1], _DTYPE_CODES.get(x.dtype, 0)], dtype=torch.float64,
                        device=x.device)
    seen = _gather(group, mine)
    if bool((seen != mine).any()):
        names = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
        ranks = ", ".join(f"rank {i}: {int(c)} channels, {names.get(int(k), 'other dtype')}"
                          for i, (c, k) in enumerate(seen.tolist()))
        raise ValueError(
            f"SyncBatchNorm's processes disagree on the input ({ranks}); every process must "
            "call the layer with the same number of channels and the same dtype")


def backward(dy: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, rstd: Tensor,
             gain: Tensor | None, count: Tensor, need_dx: bool, need_dres: bool, backend: str,
             group) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """``(dx, sum(dz * x_hat), sum(dz), dres)``: the input gradient through the statistics of
    the whole batch, and this process's own sums, which are its share of ``dweight`` and
    ``dbias``. Across a group: ``grad_sums``, summed by every process (each joins the
    ``all_reduce``, whatever gradients it needs itself), then ``grad_input``. Without one the
    statistics are this batch's alone: the fused ``backward`` on the effective weight."""
    if group is None:
        dx, s1, s0, dres = call("backward")(dy, x, y, mean, rstd, gain, True, need_dx,
                                            need_dres, backend)
        return (dx if need_dx else None), s1, s0, (dres if need_dres else None)
    if x.numel() > 0:
        s0, s1 = call("grad_sums")(dy, x, y, mean, rstd, backend)
    else:
        s0 = s1 = mean.new_zeros(mean.shape)
    sums = torch.cat([s0, s1]).double()
    dist.all_reduce(sums, group=group)
    if x.numel() == 0 or not (need_dx or need_dres):
        empty = torch.empty_like(x) if x.numel() == 0 else None
        return empty, s1, s0, (empty if need_dres else None)
    channels = mean.shape[0]
    mean_dz, mean_dz_x_hat = sums[:channels] / count, sums[channels:] / count
    dx, dres = call("grad_input")(dy, x, y, mean, rstd, gain, mean_dz.to(mean.dtype),
                                  mean_dz_x_hat.to(mean.dtype), need_dres, backend)
    return dx, s1, s0, (dres if need_dres else None)


def corrections(mean: Tensor, var: Tensor, eps: float, r_max, d_max, running_mean: Tensor,
                running_var: Tensor) -> tuple[Tensor, Tensor]:
    """Batch Renorm's clipped ``(r, d)`` per channel (float64), from the batch's statistics
    and the running estimates before this batch updates them."""
    sigma = torch.sqrt(running_var.double() + eps)
    r_max = torch.as_tensor(r_max, dtype=torch.float64, device=mean.device)
    d_max = torch.as_tensor(d_max, dtype=torch.float64, device=mean.device)
    r = torch.clamp(torch.sqrt(var + eps) / sigma, 1 / r_max, r_max)
    d = torch.clamp((mean - running_mean.double()) / sigma, -d_max, d_max)
    return r, d


def effective_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor | None,
                     d: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The weight and bias of plain batch norm that compute ``weight * (x_hat * r + d) +
    bias``: ``(weight * r, weight * d + bias)`` (just ``(weight, bias)`` without Renorm)."""
    if r is None:
        return weight, bias
    gain = r if weight is None else weight.to(r.dtype) * r
    offset = d if weight is None else weight.to(d.dtype) * d
    return gain, (offset if bias is None else offset + bias.to(d.dtype))
