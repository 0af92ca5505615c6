"""``batch_norm``: torch's functional batch normalization, with the running statistics guarded.

The arguments are validated here, once, before anything is computed or updated; the arithmetic
is in the backends of ``batchnorm.kernels`` (``eager`` the specification), composed by the
autograd functions of ``batchnorm._autograd``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from torch.autograd import forward_ad

from batchnorm import _autograd, _ops, masked
from batchnorm.kernels import crossover, eager, native, resolve

ACTIVATIONS = (None, "relu")
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.3


class ShapeError(ValueError, RuntimeError):
    """A tensor whose shape, device or memory does not fit the call. Also a ``RuntimeError``,
    which torch raises for the same mistakes, so code written for either catches it."""


class DtypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype; also a ``RuntimeError``, as torch's."""


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
    process_group=None,
    r_max: float | Tensor | None = None,
    d_max: float | Tensor | None = None,
    mask: Tensor | None = None,
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
    * float16/bfloat16 inputs accumulate statistics in float32; the compiled and eager
      backends shift the batch by a sample per channel first, so ``|mean| >> std`` keeps its
      precision (below ``batchnorm.kernels.crossover`` ``auto`` runs torch's op instead).
    * A zero-size batch returns an empty output and leaves the statistics untouched (torch's
      modules count it in ``num_batches_tracked``).
    * ``process_group`` computes the statistics over the batch of every process of a
      ``torch.distributed`` group (``SyncBatchNorm``); ``r_max``/``d_max`` turn on Batch
      Renorm's corrections (``BatchRenorm1d``).

    Args:
        input: ``(N, C, *)`` tensor, contiguous or channels-last (the layout is kept).
        running_mean: ``(C,)`` running mean, updated in place in training; or ``None``.
        running_var: ``(C,)`` running (unbiased) variance, updated in place; or ``None``.
        weight: ``(C,)`` scale :math:`\gamma`, or ``None`` for 1. Default: ``None``.
        bias: ``(C,)`` shift :math:`\beta`, or ``None`` for 0. Default: ``None``.
        training: normalize with batch statistics and update the running ones.
            Default: ``False``.
        momentum: weight of the new batch in the running estimates (any number, as torch);
            ``None`` for the cumulative average, which needs ``num_batches_tracked``.
            Default: ``0.1``.
        eps: added to the variance for numerical stability; positive in training.
            Default: ``1e-5``.
        num_batches_tracked: 0-dim integer tensor, incremented in place for each batch folded
            into the running estimates. Default: ``None``.
        activation: ``"relu"`` to apply a ReLU to the result. Default: ``None``.
        residual: tensor of ``input``'s shape added before the activation. Default: ``None``.
        backend: ``"auto"``, ``"native"`` (torch's op), ``"eager"``, ``"numba"`` or
            ``"triton"``; ``None`` reads
            ``$BATCHNORM_BACKEND`` (default ``auto``). Default: ``None``.
        process_group: in training, merge the statistics (and the gradient sums) over the
            processes of this ``torch.distributed`` group; ``None`` for none. Default: ``None``.
        mask: in training, a bool tensor of the input's shape without dim 1, True where a
            value counts: the statistics are those of the counted positions only, for padded
            sequences (``batchnorm.masked``); ignored in inference. Default: ``None``.
        r_max, d_max: in training, Batch Renorm's bounds on ``r`` (>= 1) and ``|d|`` (>= 0),
            numbers or 0-dim tensors; ``None`` for 1 and 0, no correction. Default: ``None``.

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
    if torch.jit.is_tracing():
        # The trace records torch's ops, which check their arguments; checks of ours would run
        # once, on the example input, and only warn that their outcome is baked into the trace.
        return _traceable(input, running_mean, running_var, weight, bias, training,
                          None if momentum is None else float(momentum), float(eps),
                          num_batches_tracked, activation == "relu", residual)
    momentum, eps = _check(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, num_batches_tracked, activation, residual, process_group,
                           r_max, d_max)
    if input.numel() == 0 and process_group is None:
        return _empty_output(input, weight, bias, residual)
    if mask is not None and training:
        return _masked(input, mask, running_mean, running_var, weight, bias, momentum, eps,
                       num_batches_tracked, activation, residual, process_group, r_max, d_max,
                       backend)
    x = _canonical_layout(input)
    if residual is not None:
        residual = _ops.like_layout(residual, x)
    relu = activation == "relu"
    if _is_exporting():
        return _traceable(x, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked, relu, residual)
    name = "eager" if x.numel() == 0 else resolve(backend, x, residual, relu, training)
    seams = process_group is not None or r_max is not None or d_max is not None
    if name == "native" and (
            seams or torch._C._are_functorch_transforms_active()
            or (momentum is None and training and torch.compiler.is_compiling())
            or not _takes(x, weight, bias, running_mean, running_var)):
        # The seams compose phases, which torch's op does not expose; inside torch.func
        # transforms, torch's op cannot update unbatched running statistics in place; the
        # cumulative average's factor would be read from the device, which a graph cannot.
        name = "eager"
    if name == "native":
        return _native(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, relu, residual)
    compiling = torch.compiler.is_compiling()  # the ops' twins without jvp, which dynamo traces
    if not training:
        op = _autograd.TracedEval if compiling else _autograd.BatchNormEval
        return op.apply(x, weight, bias, running_mean, running_var, residual, eps, relu, name)
    if not seams:
        op = _autograd.TracedTrain if compiling else _autograd.BatchNormTrain
        y, mean, var, _ = op.apply(x, weight, bias, residual, eps, relu, name)
        m = x.numel() // x.shape[1]
    else:
        renorm = None
        if r_max is not None or d_max is not None:
            renorm = (1.0 if r_max is None else r_max, 0.0 if d_max is None else d_max,
                      running_mean, running_var)
        op = _autograd.TracedSeamed if compiling else _autograd.BatchNormSeamed
        y, mean, var, m, *_ = op.apply(x, weight, bias, residual, eps, relu, name,
                                       process_group, renorm)
    if running_mean is not None:
        # Inside torch.func transforms the statistics are wrapped tensors: torch ops update.
        updater = "eager" if torch._C._are_functorch_transforms_active() else name
        _ops.call("update_running_stats")(running_mean, running_var, num_batches_tracked, mean,
                                          var, m, momentum, updater)
    return y


def _masked(x, mask, running_mean, running_var, weight, bias, momentum, eps, counter,
            activation, residual, process_group, r_max, d_max, backend) -> Tensor:
    """Training over the positions ``mask`` counts (``batchnorm.masked``): on the backend's
    phases, or in torch ops where a kernel cannot run (``torch.func``, ``torch.compile``)."""
    masked.check_mask(mask, x, True, process_group)
    if r_max is not None or d_max is not None:
        raise ValueError("mask= and Batch Renorm's r_max/d_max do not combine; use one of them")
    x = _canonical_layout(x)
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        name = "eager"
        y, mean, var, m = masked.train(x, mask, weight, bias, eps, process_group)
    else:
        name = resolve(backend, x, None, False, True)
        if name == "native":
            name = "eager"  # phases: torch's op has none
        y, mean, var, m = masked.MaskedTrain.apply(x, weight, bias, mask, eps, name,
                                                   process_group)
    if running_mean is not None:
        _ops.call("update_running_stats")(running_mean, running_var, counter, mean, var, m,
                                          momentum, name)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def _native(x, running_mean, running_var, weight, bias, training, momentum, eps, counter,
            relu, residual) -> Tensor:
    """The call on torch's own op (``batchnorm.kernels.native``): its autograd, its update of
    the running statistics under the guard, the epilogue in torch ops."""
    if not training:
        y = native.infer(x, weight, bias, running_mean, running_var, eps)
    else:
        if momentum is None and running_mean is not None:  # the cumulative average, as torch
            momentum = 1.0 / (int(counter) + 1)
        y = native.train(x, weight, bias, running_mean, running_var, counter, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _takes(x: Tensor, weight, bias, running_mean, running_var) -> bool:
    """Whether torch's op takes these per-channel tensors with ``x``: one dtype among them all,
    ``x``'s own or float32 beside a float16/bfloat16 ``x``."""
    dtype = next((t.dtype for t in (weight, running_mean, bias, running_var) if t is not None),
                 x.dtype)
    if dtype != x.dtype and not (
            dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    return ((weight is None or weight.dtype == dtype) and (bias is None or bias.dtype == dtype)
            and (running_mean is None or running_mean.dtype == dtype)
            and (running_var is None or running_var.dtype == dtype))


def layer_call(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool, momentum,
               eps: float, counter: Tensor | None) -> Tensor | None:
    """The call of a plain layer (no activation, residual or seam) whose input ``auto`` gives to
    torch's own op, with only the checks that depend on the tensors; ``None`` when the call
    needs ``batch_norm``'s full path (which then raises, where an argument is wrong).

    A layer's own configuration (its ``num_features``, the rank of its input) is checked by
    the layer; torch's op checks the shapes, dtypes and devices of the tensors before it
    writes anything, and any error of it sends the call to the full path, whose checks name
    the problem and the fix. What remains is the rest of this package's semantics: positive
    ``eps`` and 2 values per channel in training, running statistics that can be written in
    place, and a layout that the output keeps.
    """
    if (torch._C._get_tracing_state() is not None or torch.compiler.is_compiling()
            or _is_exporting() or torch._C._are_functorch_transforms_active()
            or os.environ.get("BATCHNORM_BACKEND", "auto") not in ("auto", "native")
            or not 0 < x.numel() < crossover(x, training)
            or not (x.is_contiguous() or x.is_contiguous(memory_format=_CHANNELS_LAST.get(
                x.dim(), torch.contiguous_format)))):
        return None
    shape = (x.shape[1],)  # torch's native_batch_norm reads per-channel tensors unchecked
    if not ((weight is None or weight.shape == shape) and (bias is None or bias.shape == shape)
            and (running_mean is None or running_mean.shape == shape)
            and (running_var is None or running_var.shape == shape)):
        return None
    if training:
        if not (type(eps) is float and eps > 0 and x.numel() >= 2 * x.shape[1]):
            return None
        if running_mean is not None and not (
                type(momentum) is float and math.isfinite(momentum)
                and not running_mean.requires_grad and not running_var.requires_grad
                and not running_mean.is_inference() and not running_var.is_inference()
                and 0 not in running_mean.stride() and 0 not in running_var.stride()):
            return None
    try:
        if not training:
            return native.infer(x, weight, bias, running_mean, running_var, eps)
        return native.train(x, weight, bias, running_mean, running_var, counter, momentum, eps)
    except RuntimeError:
        return None


def _traceable(x, running_mean, running_var, weight, bias, training, momentum, eps,
               num_batches_tracked, relu, residual) -> Tensor:
    """The call in plain torch ops, for ``torch.jit.trace`` and ``torch.export`` (and the ONNX
    exporters), which need ops they can record and translate, not kernels they cannot see:
    torch's ``batch_norm`` in inference (ONNX ``BatchNormalization``), the eager
    specification in training (running-statistics guard included)."""
    if training:
        x3 = _ops.as_ncl(x)
        res3 = None if residual is None else _ops.as_ncl(residual)
        y3, mean, _, var = eager.forward_train(x3, weight, bias, eps, res3, relu)
        if running_mean is not None:
            eager.update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                       var, x3.shape[0] * x3.shape[2], momentum)
        return y3.reshape(x.shape)
    y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                         torch.backends.cudnn.enabled)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _canonical_layout(x: Tensor) -> Tensor:
    """``x`` itself when it is contiguous or channels-last (channel innermost), else a copy."""
    if x.is_contiguous() or (x.dim() > 2 and x.movedim(1, -1).is_contiguous()):
        return x
    return x.contiguous()


def _empty_output(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None) -> Tensor:
    # Built from the inputs so that backward still reaches them (with zero gradients).
    shape = (-1,) if x.dim() == 1 else (1, -1) + (1,) * (x.dim() - 2)
    y = x * weight.view(shape) if weight is not None else x.clone()
    if bias is not None:
        y = y + bias.view(shape)
    return y if residual is None else y + residual


def _check(x, running_mean, running_var, weight, bias, training, momentum, eps,
           num_batches_tracked, activation, residual, process_group, r_max, d_max):
    """Every argument check, before anything is computed or updated; returns ``momentum``
    and ``eps`` as Python numbers."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 and not (x.dim() == 1 and x.numel() == 0):
        raise ShapeError(
            f"expected input of at least 2 dimensions (N, C, ...), got {x.dim()}D input of "
            f"shape {tuple(x.shape)}; add a batch dimension with input.unsqueeze(0)")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}; convert it with "
                        "input.float()")
    eps = _number("eps", eps)  # first, as torch: its own tests expect this error before others
    if training and not eps > 0:
        raise ValueError(f"eps must be positive during training, got {eps}; a channel whose "
                         "values are all equal has variance 0 and would divide by zero (the "
                         "default is 1e-5)")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    channels = x.shape[1] if x.dim() > 1 else 0
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are needed when training=False; pass them, or use "
            "training=True to normalize with the batch's own statistics")
    updated = training and running_mean is not None
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, x, channels, exact_dtype=False)
        if updated:
            _check_writable(name, t)
    for name, t in (("weight", weight), ("bias", bias)):
        # An empty input normalizes nothing: any floating dtype will do, as in torch.
        _check_vector(name, t, x, channels, exact_dtype=x.numel() > 0)
    if running_mean is not None and _has_tangent(x) and (
            _has_tangent(running_mean) or _has_tangent(running_var)):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var: "
                           "they are statistics, not inputs; pass them without a tangent "
                           "(e.g. running_mean.detach())")
    if residual is not None:
        check_residual(residual, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if momentum is not None:
        momentum = _number("momentum", momentum)
        if updated and not math.isfinite(momentum):
            raise ValueError(f"momentum must be finite to update the running statistics, got "
                             f"{momentum}; it is the weight of the new batch, e.g. 0.1")
    elif updated and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked; "
                         "pass the module's counter or set a float momentum")
    if num_batches_tracked is not None:
        _check_counter(num_batches_tracked, running_mean, updated)
    if process_group is not None and not training:
        raise ValueError("process_group merges training statistics; pass it with "
                         "training=True only")
    if (r_max is not None or d_max is not None) and not (training and running_mean is not None):
        raise ValueError("r_max and d_max (Batch Renorm) correct a training batch towards the "
                         "running statistics; pass them with training=True and running_mean"
                         "/running_var")
    if training and process_group is None and x.numel() > 0 and x.numel() // channels <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}; "
            "use a batch of at least 2 samples, or call .eval() to use the running statistics")
    return momentum, eps


def _has_tangent(t: Tensor) -> bool:
    """Whether ``t`` is a dual tensor of ``torch.autograd.forward_ad`` with a tangent."""
    if forward_ad._current_level < 0:  # no dual level open: nothing can have a tangent
        return False
    return forward_ad.unpack_dual(t).tangent is not None


def _number(name: str, value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_vector(name: str, t: Tensor | None, x: Tensor, channels: int, exact_dtype: bool):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (channels,):
        raise ShapeError(
            f"{name} has shape {tuple(t.shape)} but the input has {channels} channels at dim 1 "
            f"(input shape {tuple(x.shape)}); expected shape ({channels},)")
    if t.device != x.device:
        raise ShapeError(f"{name} is on {t.device} but the input is on {x.device}; move them "
                         "to one device, e.g. module.to(input.device)")
    mixed = x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
    if not t.is_floating_point() or (exact_dtype and t.dtype != x.dtype and not mixed):
        raise DtypeError(f"{name} has dtype {t.dtype} but the input is {x.dtype}; convert one "
                         f"of them, e.g. module.to({x.dtype}) or input.to({t.dtype})")


def _check_writable(name: str, t: Tensor) -> None:
    """Running statistics are written in place: they must be memory of their own."""
    if t.numel() > 1 and 0 in t.stride():
        raise ShapeError(f"{name} is an expanded tensor (stride 0): several channels share one "
                         f"value, so updating it in place is undefined; pass {name}.clone()")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but running statistics are buffers updated "
                         f"in place; pass {name}.detach() or register it as a buffer")
    if (not torch.compiler.is_compiling() and t.is_inference()
            and not torch.is_inference_mode_enabled()):
        raise ValueError(f"{name} was created under torch.inference_mode() and cannot be "
                         "updated outside it; clone it outside inference mode, or call "
                         "the layer in eval()")


def _check_counter(counter: Tensor, running_mean: Tensor | None, updated: bool) -> None:
    if not isinstance(counter, Tensor) or counter.dim() != 0 or counter.is_floating_point() \
            or counter.dtype == torch.bool:
        raise TypeError("num_batches_tracked must be a 0-dim integer tensor, got "
                        f"{getattr(counter, 'dtype', type(counter).__name__)} of shape "
                        f"{tuple(getattr(counter, 'shape', ()))}")
    if updated:
        if counter.device != running_mean.device:
            raise ShapeError(f"num_batches_tracked is on {counter.device} but the running "
                             f"statistics are on {running_mean.device}; move them together, "
                             "e.g. module.to(device)")
        _check_writable("num_batches_tracked", counter)


def check_residual(residual: Tensor, x: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ShapeError(
            f"residual must match the input: got {tuple(residual.shape)} {residual.dtype} on "
            f"{residual.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}")
