"""Batch normalization in plain torch ops: the specification every kernel matches.

Every function works on the canonical view ``(N, C, L)`` of an input of any rank (channel at
dim 1, all spatial positions flattened into ``L``), in either memory layout: contiguous
``(N, C, L)`` or channels-last, whose strides are ``(L*C, 1, C)``. Elementwise torch ops keep
the layout of their input, so outputs come back in the layout that came in.

Numerical decisions:

* Statistics accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64.
* The batch is shifted by one sample per channel (a pivot ``s``) before any sum, and the output is
  normalized as ``((x - s) - (mean - s)) * rstd``. When ``|mean| >> std`` a plain ``x - mean`` with
  a rounded ``mean`` loses most of the significant bits; the shifted difference ``x - s`` is exact
  for nearby values, so the centring error stays at the scale of the spread, not of the mean.
* The variance that normalizes is the biased one, ``mean((x - mean)**2)`` (Algorithm 1); the
  unbiased one, ``m/(m-1)`` times it, only feeds ``running_var``, in the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCE_DIMS = (0, 2)  # the batch and spatial axes of the (N, C, L) view


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1)


def _epilogue(z: Tensor, residual3: Tensor | None, relu: bool, dtype: torch.dtype) -> Tensor:
    """``relu(z + residual)`` in the accumulation dtype, rounded once to the input dtype."""
    if residual3 is not None:
        z = z + residual3.to(z.dtype)
    if relu:
        z = torch.relu(z)
    return z.to(dtype)


def batch_stats(x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x3``, and ``x3`` centred on the mean.

    Returns:
        ``(mean, var, centered)``: ``mean`` and ``var`` of shape ``(C,)`` in the accumulation
        dtype, and ``centered = (x - s) - (mean - s)`` with the shape and layout of ``x3``.
    """
    x = x3.to(acc_dtype(x3.dtype))
    pivot = x[0, :, 0]  # one sample per channel; any value inside the batch's range will do
    shifted = x - _per_channel(pivot)
    shifted_mean = shifted.mean(REDUCE_DIMS)
    centered = shifted - _per_channel(shifted_mean)
    var = centered.square().mean(REDUCE_DIMS)  # two-pass: no E[x^2] - E[x]^2 cancellation
    return pivot + shifted_mean, var, centered


def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1: normalize by the batch's own statistics, then scale and shift.

    ``y = relu(weight * (x - mean) * rstd + bias + residual)``, with ``rstd = 1/sqrt(var + eps)``
    and the biased batch variance ``var``; the residual and the ReLU are optional.

    Returns:
        ``(y3, mean, rstd, var)``: the output in the input's dtype and layout, and the per-channel
        batch mean, reciprocal standard deviation and biased variance in the accumulation dtype.
    """
    mean, var, centered = batch_stats(x3)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    z = centered * _per_channel(scale)
    if bias is not None:
        z = z + _per_channel(bias.to(z.dtype))
    return _epilogue(z, residual3, relu, x3.dtype), mean, rstd, var


def inference_affine(
    weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Algorithm 2's folded transform: ``y = scale * x + shift`` for fixed statistics.

    ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``, in the dtype of the
    statistics (float32 at least).
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def forward_eval(
    x3: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Inference with fixed statistics: ``y = relu(scale * x + shift + residual)``."""
    z = x3.to(torch.promote_types(scale.dtype, acc_dtype(x3.dtype))) * _per_channel(scale)
    return _epilogue(z + _per_channel(shift), residual3, relu, x3.dtype)


def backward(
    dy3: Tensor,
    x3: Tensor,
    y3: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    training: bool,
    need_dx: bool = True,
    need_dres: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Gradients of batch normalization, in closed form (the chain rule of Algorithm 1).

    With ``dz`` the gradient at the normalized-and-shifted value (``dy`` masked by ``y > 0``
    when a ReLU followed, which is why ``y3`` is passed; ``None`` means no ReLU) and
    ``M = N * L`` values per channel::

        dbias   = sum(dz)
        dweight = sum(dz * x_hat)
        dx      = weight * rstd * (dz - dbias / M - x_hat * dweight / M)    (training)
        dx      = weight * rstd * dz                                         (inference)

    In training the two subtracted terms are the paths through the batch mean and variance;
    with fixed statistics they vanish. The residual's gradient, when there is one, is ``dz``.

    Returns:
        ``(dx3, dweight, dbias, dres3)``: ``dx3`` (``None`` unless ``need_dx``) and ``dres3``
        (``None`` unless ``need_dres``) in the input's dtype and layout; ``dweight`` and ``dbias``
        are per-channel sums in the accumulation dtype (the caller casts them).
    """
    acc = mean.dtype
    dz = dy3.to(acc)
    if y3 is not None:
        dz = dz.masked_fill(y3 <= 0, 0)  # d relu(u)/du = 0 where the output was clamped
    x_hat = (x3.to(acc) - _per_channel(mean)) * _per_channel(rstd)
    dbias = dz.sum(REDUCE_DIMS)
    dweight = (dz * x_hat).sum(REDUCE_DIMS)
    dx = None
    if need_dx:
        scale = rstd if weight is None else rstd * weight.to(acc)
        g = dz
        if training:
            m = x3.shape[0] * x3.shape[2]
            g = dz - _per_channel(dbias / m) - x_hat * _per_channel(dweight / m)
        dx = (g * _per_channel(scale)).to(x3.dtype)
    dres = dz.to(x3.dtype) if need_dres else None
    return dx, dweight, dbias, dres


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    m: int,
    momentum: float | None,
) -> None:
    """Fold one batch's statistics into the running estimates, in place, without a host sync.

    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance
    ``m / (m - 1) * var`` in ``running_var``. ``momentum=None`` gives the cumulative average,
    ``momentum = 1 / num_batches_tracked`` after counting this batch.

    A batch whose statistics are not all finite (an inf or NaN in the input, as under float16
    overflow) changes nothing, the batch counter included: the choice is made on the device with
    ``torch.where``, so no value is read back to the host.
    """
    ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = momentum
    unbiased = var * (m / (m - 1))
    new_mean = torch.lerp(running_mean, mean.to(running_mean.dtype), factor)
    new_var = torch.lerp(running_var, unbiased.to(running_var.dtype), factor)
    running_mean.copy_(torch.where(ok, new_mean, running_mean))
    running_var.copy_(torch.where(ok, new_var, running_var))
