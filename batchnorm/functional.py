"""``batch_norm``: torch's functional batch normalization, with the running statistics guarded.

The arguments are validated here, once; the arithmetic is in ``batchnorm._eager`` (the
specification) and in the kernels, reached through the custom ops of ``batchnorm._ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import _ops

ACTIVATIONS = (None, "relu")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Batch normalization over dim 1 of an input of rank >= 2, as ``torch.nn.functional``.

    In training (Algorithm 1) each channel is normalized by the mean and the *biased* variance
    of its values in the batch (over dim 0 and every dim after 1, ``m = N * L`` values), and
    the running estimates, when given, move towards the batch's mean and *unbiased* variance
    ``m/(m-1) * var``. In inference (Algorithm 2) the running estimates normalize instead.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \cdot \gamma + \beta + \mathrm{residual}\Big)

    Beyond torch:

    * A training batch whose statistics are not finite (an inf or NaN, as under float16
      overflow) leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` unchanged,
      decided on the device without a host synchronization; the output still shows the
      non-finite values.
    * float16/bfloat16 inputs accumulate statistics in float32; the batch is shifted by a
      sample per channel first, so ``|mean| >> std`` keeps its precision.
    * A zero-size batch returns an empty output and leaves the statistics untouched.

    Args:
        input: ``(N, C, *)`` tensor, contiguous or channels-last (the layout is kept).
        running_mean: ``(C,)`` running mean, updated in place in training; or ``None``.
        running_var: ``(C,)`` running (unbiased) variance, updated in place; or ``None``.
        weight: ``(C,)`` scale :math:`\gamma`, or ``None`` for 1. Default: ``None``.
        bias: ``(C,)`` shift :math:`\beta`, or ``None`` for 0. Default: ``None``.
        training: normalize with batch statistics and update the running ones.
            Default: ``False``.
        momentum: weight of the new batch in the running estimates; ``None`` for the
            cumulative average, which needs ``num_batches_tracked``. Default: ``0.1``.
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        num_batches_tracked: 0-dim integer tensor, incremented in place for each batch folded
            into the running estimates. Default: ``None``.
        activation: ``"relu"`` to apply a ReLU to the result. Default: ``None``.
        residual: tensor of ``input``'s shape added before the activation. Default: ``None``.
        backend: ``"auto"``, ``"eager"``, ``"numba"`` or ``"triton"``; ``None`` reads
            ``$BATCHNORM_BACKEND`` (default ``auto``). Default: ``None``.

    Returns:
        A tensor of ``input``'s shape, dtype and memory layout.

    Example::

        >>> import torch
        >>> from batchnorm.functional import batch_norm
        >>> x = torch.randn(8, 3, 5)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, mean, var, training=True)
        >>> torch.allclose(y.mean(dim=(0, 2)), torch.zeros(3), atol=1e-6)
        True
        >>> torch.allclose(mean, 0.1 * x.mean(dim=(0, 2)))
        True
    """
    _check(input, running_mean, running_var, weight, bias, training, momentum, eps,
           num_batches_tracked, activation, residual)
    if input.numel() == 0:
        return _empty_output(input, weight, bias, residual)
    x = _canonical_layout(input)
    if residual is not None:
        residual = _ops.like_layout(residual, x)
    relu = activation == "relu"
    residual3 = None if residual is None else _ops.as_ncl(residual)
    name = _ops.resolve_backend(backend, _ops.as_ncl(x), residual3, relu)
    if not training:
        return _ops.BatchNormEval.apply(
            x, weight, bias, running_mean, running_var, residual, eps, relu, name)
    y, mean, var = _ops.BatchNormTrain.apply(x, weight, bias, residual, eps, relu, name)
    if running_mean is not None:
        m = x.numel() // x.shape[1]
        _ops.update_running_stats(
            running_mean, running_var, num_batches_tracked, mean, var, m, momentum, name)
    return y


def _canonical_layout(x: Tensor) -> Tensor:
    """``x`` itself when it is contiguous or channels-last (channel innermost), else a copy."""
    if x.is_contiguous() or (x.dim() > 2 and x.movedim(1, -1).is_contiguous()):
        return x
    return x.contiguous()


def _empty_output(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None) -> Tensor:
    # Built from the inputs so that backward still reaches them (with zero gradients).
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x * weight.view(shape) if weight is not None else x.clone()
    if bias is not None:
        y = y + bias.view(shape)
    return y if residual is None else y + residual


def _check(x, running_mean, running_var, weight, bias, training, momentum, eps,
           num_batches_tracked, activation, residual) -> None:
    """Every argument check, before anything is computed or updated."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"expected input of at least 2 dimensions (N, C, ...), got {x.dim()}D input of "
            f"shape {tuple(x.shape)}; add a batch dimension with input.unsqueeze(0)")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}; convert it with "
                        "input.float()")
    channels = x.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are needed when training=False; pass them, or use "
            "training=True to normalize with the batch's own statistics")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, x, channels, exact_dtype=False)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, t, x, channels, exact_dtype=True)
    if residual is not None:
        check_residual(residual, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked; "
                             "pass the module's counter or set a float momentum")
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if num_batches_tracked is not None and (
            num_batches_tracked.dim() != 0 or num_batches_tracked.is_floating_point()):
        raise TypeError("num_batches_tracked must be a 0-dim integer tensor, got "
                        f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
    if training and x.numel() > 0 and x.numel() // channels <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}; "
            "use a batch of at least 2 samples, or call .eval() to use the running statistics")


def _check_vector(name: str, t: Tensor | None, x: Tensor, channels: int, exact_dtype: bool):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (channels,):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input has {channels} channels at dim 1 "
            f"(input shape {tuple(x.shape)}); expected shape ({channels},)")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; move them to "
                         "one device, e.g. module.to(input.device)")
    mixed = x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
    if not t.is_floating_point() or (exact_dtype and t.dtype != x.dtype and not mixed):
        raise TypeError(f"{name} has dtype {t.dtype} but the input is {x.dtype}; convert one of "
                        f"them, e.g. module.to({x.dtype}) or input.to({t.dtype})")


def check_residual(residual: Tensor, x: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual must match the input: got {tuple(residual.shape)} {residual.dtype} on "
            f"{residual.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}")
