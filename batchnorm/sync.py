"""``SyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group.

Each rank reduces its own slice of the batch to ``(count, mean, M2)`` per channel (``M2`` the
sum of squared deviations from the rank's mean), the ranks exchange these ``2C + 1`` numbers
with one ``all_gather``, and every rank merges them in the same order with Chan's parallel
formula, weighted by count:

    n    = sum_i n_i
    mean = sum_i n_i * mean_i / n
    M2   = sum_i M2_i + sum_i n_i * (mean_i - mean)**2,      var = M2 / n   (biased)

so uneven slices, and a rank whose slice is empty (``n_i = 0``, which contributes nothing but
still joins every collective), give exactly the statistics of the whole batch. The backward
needs two more global sums per channel, ``sum(dy)`` and ``sum(dy * x_hat)``: one
``all_reduce`` of a ``2C`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from batchnorm import _eager, _ops
from batchnorm import functional as F
from batchnorm.convert import _take_over
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                BatchNorm1d, BatchNorm2d, BatchNorm3d)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose training statistics span a whole process group.

    In training under an initialized ``torch.distributed`` group of more than one process,
    every rank normalizes its slice of the batch with the mean and biased variance of the
    *global* batch (the concatenation of all ranks' slices), exactly as ``BatchNorm`` on
    that batch would; the input gradient goes through the global statistics too, and the
    running estimates, updated from the global statistics with the unbiased variance
    ``m/(m-1) * var`` (``m`` the global count), come out identical on every rank. Weight
    and bias gradients are each rank's own contribution: summed over the ranks (as
    ``DistributedDataParallel`` does, up to its averaging) they are the whole batch's.

    * Slices may differ in size, and may be empty: every rank must call the layer (and its
      backward) the same number of times, as with every collective.
    * Outside training, without ``torch.distributed``, or in a group of one process, the
      layer is a plain ``BatchNorm`` (no error, no communication).
    * The local work runs on this package's backends (numba on the CPU, Triton on CUDA when
      installed), and nothing is read back to the host: the counts live on the device.
      Collectives use the group's backend: gloo for CPU tensors, NCCL for CUDA ones.
    * A global batch whose statistics are not finite (or hold a single value per channel)
      leaves the running estimates unchanged, decided on the device; torch would raise for
      the single value, which would need a host synchronization here.
    * Double backward is not supported.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running estimates, or ``None`` for the
            cumulative average. Default: ``0.1``.
        affine: learn a per-channel ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``. Default: ``True``.
        process_group: the group whose processes share statistics; ``None`` for the default
            group. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters and buffers. Default: ``None``.
        bias: with ``affine``, learn the shift ``bias`` too (keyword only). Default: ``True``.

    Shape:
        - Input: ``(N, C, *)``, any rank >= 2; ``N`` may differ between ranks, even be 0.
        - Output: the same shape, dtype and memory layout.

    Examples::

        >>> import torch
        >>> from batchnorm.sync import SyncBatchNorm
        >>> bn = SyncBatchNorm(3)   # not distributed here: plain batch norm
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2D (got {input.dim()}D input); "
                             "SyncBatchNorm takes (N, C, *)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _world_size(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        self._check_channels(input)
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {input.dtype}; convert it "
                            "with input.float()")
        x = F._canonical_layout(input)
        mean, var, count = _global_stats(_ncl(x), self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                # m is a device tensor (the global count), so no value comes to the host.
                _eager.update_running_stats(self.running_mean, self.running_var,
                                            self.num_batches_tracked, mean, var, count,
                                            self.momentum)
        acc = _eager.acc_dtype(x.dtype)
        return _SyncNormalize.apply(x, self.weight, self.bias, mean.to(acc), var.to(acc), count,
                                    self.eps, self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module,
                               process_group: dist.ProcessGroup | None = None) -> nn.Module:
        """Replace every ``BatchNorm1d/2d/3d`` (torch's or this package's) and torch's
        ``SyncBatchNorm`` by this package's ``SyncBatchNorm``.

        The new layers take over the old ones' parameter and buffer tensors themselves (an
        optimizer built before still updates them), their hyperparameters and training mode.
        Other layers (subclasses, Batch Renorm, frozen ones) are left alone.

        Args:
            module: a model, or a single batch-norm layer.
            process_group: the group to synchronize over; ``None`` for the default group.
                Default: ``None``.

        Returns:
            The model with the layers replaced, in place (a new layer if ``module`` was one).

        Example::

            >>> import torch
            >>> from batchnorm.sync import SyncBatchNorm
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> model = SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model[1]).__name__
            'SyncBatchNorm'
        """
        if type(module) in _CONVERTIBLE:
            if getattr(module, "virtual_batch_size", None) is not None:
                raise ValueError(
                    f"cannot convert {module!r}: SyncBatchNorm has no virtual batches; "
                    "construct the layer without virtual_batch_size first")
            new = _take_over(module, cls)
            new.process_group = process_group
            return new
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(module, name, new)
        return module


def _ncl(t: Tensor) -> Tensor:
    """The ``(N, C, L)`` view, also of an empty slice (``-1`` cannot be inferred when N = 0)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _world_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _global_stats(x3: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance (float64, ``(C,)``) and count (float64, 0-dim) of the global batch."""
    channels, n = x3.shape[1], x3.shape[0] * x3.shape[2]
    # float64 keeps the counts exact past 2**24 values and the merge free of cancellation;
    # these are 2C + 1 numbers per rank.
    local = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x3.device)
    if n > 0:
        # One fused reduction (Welford in torch): accurate when |mean| >> std, no temporaries.
        var, mean = torch.var_mean(x3.to(_eager.acc_dtype(x3.dtype)), dim=_eager.REDUCE_DIMS,
                                   correction=0)
        local[0] = n
        local[1:channels + 1] = mean
        local[channels + 1:] = var.double() * n
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 2C + 1), the same on every rank
    counts, means, m2s = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total, total


class _SyncNormalize(torch.autograd.Function):
    """``y = weight * (x - mean) * rstd + bias`` with global statistics, and its backward.

    The statistics are functions of every rank's input, so the input gradient has the
    training-mode closed form with global sums and the global count ``M``::

        dx = weight * rstd * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M)

    while ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)`` stay local (this rank's share).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, group):
        x3 = _ncl(x)
        # An empty slice has nothing to compute; no backend is asked (a backend named in
        # $BATCHNORM_BACKEND may refuse empty tensors).
        backend = "eager" if x3.numel() == 0 else _ops.resolve_backend(None, x3, None, False)
        scale, shift = _eager.inference_affine(weight, bias, mean, var, eps)
        y = _ops.from_ncl(_ops.backend_module(backend).forward_eval(x3, scale, shift), x)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps), count)
        ctx.group, ctx.backend = group, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd, count = ctx.saved_tensors
        x3, dy3 = _ncl(x), _ncl(_ops.like_layout(dy, x))
        _, dweight, dbias, _ = _ops.backend_module(ctx.backend).backward(
            dy3, x3, None, mean, rstd, weight, False, False, False)
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([dbias, dweight])
            dist.all_reduce(sums, group=ctx.group)
            dx = _ops.from_ncl(_input_grad(dy3, x3, weight, mean, rstd, sums, count), x)
        return (dx,
                dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None)


def _input_grad(dy3: Tensor, x3: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                sums: Tensor, count: Tensor) -> Tensor:
    """The closed-form ``dx`` from the global ``[sum(dy), sum(dy * x_hat)]`` and count."""
    acc, channels = mean.dtype, mean.shape[0]
    m = count.to(acc)
    mean_dy, mean_dy_xhat = sums[:channels] / m, sums[channels:] / m
    a = rstd if weight is None else rstd * weight.to(acc)
    per_channel = (1, -1, 1)
    # dx = a * (dy - mean(dy)) - a * rstd * mean(dy * x_hat) * (x - mean)
    g = (dy3.to(acc) - mean_dy.view(per_channel)) * a.view(per_channel)
    g = g - (x3.to(acc) - mean.view(per_channel)) * (a * rstd * mean_dy_xhat).view(per_channel)
    return g.to(x3.dtype)
