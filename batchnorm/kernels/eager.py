"""The ``"eager"`` backend: batch normalization in plain torch ops, the specification.

Every backend implements the phases of ``batchnorm.kernels`` with these functions' signatures
and results; the compiled ones are tested against this module. Every function works on the
canonical view ``(N, C, L)`` of an input of any rank (channel at dim 1, all spatial positions
flattened into ``L``), in either memory layout: contiguous ``(N, C, L)`` or channels-last,
whose strides are ``(L*C, 1, C)``. Elementwise torch ops keep the layout of their input, so
outputs come back in the layout that came in.

Numerical decisions:

* Sums accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64.
* The batch is shifted by one sample per channel (a pivot ``s = x[0, c, 0]``) before any sum,
  and outputs are normalized as ``(x - s) * scale + shift`` with ``shift`` carrying
  ``mean - s``. When ``|mean| >> std`` a plain ``x - mean`` with a rounded ``mean`` loses most
  of the significant bits; the shifted difference ``x - s`` is exact for nearby values, so the
  centring error stays at the scale of the spread, not of the mean. For the same reason
  ``stats`` returns the mean in float64: ``s + (mean - s)`` keeps the bits the shift saved.
* The variance that normalizes is the biased one, ``M2 / m`` (Algorithm 1); the unbiased one,
  ``M2 / (m - 1)``, only feeds ``running_var``.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCE_DIMS = (0, 2)  # the batch and spatial axes of the (N, C, L) view
# The activations of in-place ABN (``batchnorm.inplace_abn``), invertible for a positive
# ``param``, by their codes in the compiled kernels.
INVERTIBLE = {"identity": 0, "leaky_relu": 1, "elu": 2}


def available() -> bool:
    """Always: torch is all this backend needs.

    >>> available()
    True
    """
    return True


def supports(x3: Tensor, residual3: Tensor | None, relu: bool) -> bool:
    """Every floating-point tensor on every device, with or without the epilogue.

    >>> supports(torch.zeros(2, 3, 4, dtype=torch.bfloat16), None, True)
    True
    """
    return x3.is_floating_point()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums accumulate in: float64 for float64 input, else float32.

    >>> acc_dtype(torch.bfloat16), acc_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
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


def pivot(x3: Tensor) -> Tensor:
    """The shift ``s``: one sample per channel, ``x3[0, :, 0]``; any value in the batch's range
    would do."""
    return x3[0, :, 0]


def batch_stats(x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x3``, and ``x3`` centred on the mean.

    Returns:
        ``(mean, var, centered)``: ``mean`` and ``var`` of shape ``(C,)`` in the accumulation
        dtype, and ``centered = (x - s) - (mean - s)`` with the shape and layout of ``x3``.
    """
    x = x3.to(acc_dtype(x3.dtype))
    s = pivot(x)
    shifted = x - _per_channel(s)
    shifted_mean = shifted.mean(REDUCE_DIMS)
    centered = shifted - _per_channel(shifted_mean)
    var = centered.square().mean(REDUCE_DIMS)  # two-pass: no E[x^2] - E[x]^2 cancellation
    return s + shifted_mean, var, centered


# --- phases ------------------------------------------------------------------------------------

def stats(x3: Tensor) -> tuple[int, Tensor, Tensor]:
    """Phase ``stats``: ``(count, mean, M2)`` of each channel's ``m = N * L`` values.

    ``M2 = sum((x - mean)**2)``, so ``var = M2 / m`` is the biased variance; ``mean`` and
    ``M2`` are float64, ``(C,)``, whatever the input dtype (see the module docstring). The
    triple is what Chan's formula merges across slices of a batch (``batchnorm.sync``).

    >>> count, mean, m2 = stats(torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]]))
    >>> count, mean.tolist(), m2.tolist()
    (4, [4.0], [20.0])
    """
    x = x3.to(acc_dtype(x3.dtype))
    s = pivot(x)
    shifted = x - _per_channel(s)
    shifted_mean = shifted.mean(REDUCE_DIMS)
    centered = shifted - _per_channel(shifted_mean)
    count = x3.shape[0] * x3.shape[2]
    m2 = centered.square().sum(REDUCE_DIMS).double()
    return count, s.double() + shifted_mean.double(), m2


def affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
           center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Batch norm with fixed statistics as one affine map: ``y = (x - center) * scale + shift``.

    ``scale = weight * rstd`` and ``shift = bias - (mean - center) * scale``, in the dtype of
    the statistics (float32 at least); ``center`` (``None`` for 0) is the pivot of the input
    the map will be applied to, which keeps ``x - center`` exact (module docstring). With the
    running statistics and ``center=None`` it is Algorithm 2's folded inference transform.

    >>> scale, shift = affine(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0]),
    ...                       torch.tensor([0.5]))
    >>> scale.tolist(), shift.tolist()
    ([1.0], [-2.0])
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    scale = rstd.to(dtype)
    if weight is not None:
        scale = scale * weight.to(dtype)
    offset = mean.to(dtype) if center is None else mean.to(dtype) - center.to(dtype)
    shift = -offset * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def inference_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """Algorithm 2's folded transform ``y = scale * x + shift`` for the running statistics.

    >>> inference_affine(None, None, torch.tensor([1.0]), torch.tensor([3.0]), 1.0)
    (tensor([0.5000]), tensor([-0.5000]))
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    return affine(weight, bias, mean, torch.rsqrt(var.to(dtype) + eps))


def forward_eval(
    x3: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual3: Tensor | None = None,
    relu: bool = False,
    center: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Phase ``forward_eval``: ``y = relu((x - center) * scale + shift + residual)``.

    The map of :func:`affine`: inference with the running statistics (``center=None``), or the
    normalization of a training batch once its statistics are known (``center`` its pivot).
    ``out`` (``x3`` itself, for in-place ABN) receives ``y`` when given; ``center`` must then
    not be a view of it.
    """
    x = x3.to(torch.promote_types(scale.dtype, acc_dtype(x3.dtype)))
    if center is not None:
        x = x - _per_channel(center.to(x.dtype))
    z = x * _per_channel(scale) + _per_channel(shift)
    y = _epilogue(z, residual3, relu, x3.dtype)
    return y if out is None else out.copy_(y)


def _grad_at_affine(dy3: Tensor, y3: Tensor | None, acc: torch.dtype) -> Tensor:
    dz = dy3.to(acc)
    if y3 is not None:
        dz = dz.masked_fill(y3 <= 0, 0)  # d relu(u)/du = 0 where the output was clamped
    return dz


def _x_hat(x3: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return (x3.to(mean.dtype) - _per_channel(mean)) * _per_channel(rstd.to(mean.dtype))


def grad_sums(dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor,
              rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Phase ``grad_sums``: ``(sum(dz), sum(dz * x_hat))`` per channel, in ``mean``'s dtype.

    ``dz`` is the gradient at the normalized-and-shifted value: ``dy``, masked by ``y > 0``
    when a ReLU followed (``y3``; ``None`` for no ReLU). They are ``dbias`` and ``dweight``.
    """
    dz = _grad_at_affine(dy3, y3, mean.dtype)
    return dz.sum(REDUCE_DIMS), (dz * _x_hat(x3, mean, rstd)).sum(REDUCE_DIMS)


def grad_input(
    dy3: Tensor,
    x3: Tensor,
    y3: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    mean_dz: Tensor | None,
    mean_dz_x_hat: Tensor | None,
    need_dres: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Phase ``grad_input``: ``dx`` (and ``dres = dz`` when ``need_dres``) from the sums.

    ``dx = weight * rstd * (dz - mean_dz - x_hat * mean_dz_x_hat)``, with the two means the
    sums of :func:`grad_sums` divided by the count (over every slice of the batch, when the
    statistics spanned several), which are the paths through the batch mean and variance;
    ``mean_dz=None`` means fixed statistics, ``dx = weight * rstd * dz``.

    Returns:
        ``(dx3, dres3)`` in the input's dtype and layout (``dres3`` ``None`` unless asked).
    """
    acc = mean.dtype
    dz = _grad_at_affine(dy3, y3, acc)
    g = dz
    if mean_dz is not None:
        g = dz - _per_channel(mean_dz.to(acc)) - _x_hat(x3, mean, rstd) * _per_channel(
            mean_dz_x_hat.to(acc))
    scale = rstd.to(acc) if weight is None else rstd.to(acc) * weight.to(acc)
    dx = (g * _per_channel(scale)).to(x3.dtype)
    return dx, (dz.to(x3.dtype) if need_dres else None)


# --- fused fast paths --------------------------------------------------------------------------

def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 in one call: ``stats``, then ``forward_eval`` with the batch's statistics.

    ``y = relu(weight * (x - mean) * rstd + bias + residual)``, with ``rstd = 1/sqrt(var + eps)``
    and the biased batch variance ``var``; the residual and the ReLU are optional. ``out``
    (``x3`` itself, for in-place ABN) receives ``y`` when given.

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
    y = _epilogue(z, residual3, relu, x3.dtype)
    return (y if out is None else out.copy_(y)), mean, rstd, var


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
    """Gradients in closed form (the chain rule of Algorithm 1): ``grad_sums`` and
    ``grad_input`` in one.

    With ``M = N * L`` values per channel::

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
    dz = _grad_at_affine(dy3, y3, acc)  # the two phases' shared terms, computed once
    x_hat = _x_hat(x3, mean, rstd)
    dbias, dweight = dz.sum(REDUCE_DIMS), (dz * x_hat).sum(REDUCE_DIMS)
    dx = None
    if need_dx:
        m = x3.shape[0] * x3.shape[2]
        g = dz - _per_channel(dbias / m) - x_hat * _per_channel(dweight / m) if training else dz
        scale = rstd.to(acc) if weight is None else rstd.to(acc) * weight.to(acc)
        dx = (g * _per_channel(scale)).to(x3.dtype)
    return dx, dweight, dbias, (dz.to(x3.dtype) if need_dres else None)


# --- running statistics ------------------------------------------------------------------------

def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    m: int | Tensor,
    momentum: float | None,
) -> None:
    """Phase ``update_running_stats``: fold one batch into the running estimates, in place,
    without a host sync.

    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance
    ``m / (m - 1) * var`` in ``running_var``. ``momentum=None`` gives the cumulative average,
    ``momentum = 1 / num_batches_tracked`` after counting this batch. ``m`` may be a 0-dim
    tensor (a count summed across processes, kept on the device).

    A batch whose statistics are not all finite (an inf or NaN in the input, as under float16
    overflow), or whose variance has no unbiased estimate (``m < 2``), changes nothing, the
    batch counter included: the choice is made on the device with ``torch.where``, so no value
    is read back to the host.
    """
    unbiased = var * (m / (m - 1)) if not isinstance(m, int) or m > 1 else var * float("nan")
    ok = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = momentum
    new_mean = torch.lerp(running_mean, mean.to(running_mean.dtype), factor)
    new_var = torch.lerp(running_var, unbiased.to(running_var.dtype), factor)
    running_mean.copy_(torch.where(ok, new_mean, running_mean))
    running_var.copy_(torch.where(ok, new_var, running_var))


# --- in-place ABN's activation -----------------------------------------------------------------

def activate(z3: Tensor, residual3: Tensor | None, activation: str, param: float) -> Tensor:
    """Phase ``activate``: ``z = act(z + residual)`` in place over ``z3``, which it returns.

    ``act`` is one of ``INVERTIBLE``, with ``param > 0``::

        leaky_relu(u) = u if u >= 0 else param * u
        elu(u)        = u if u >= 0 else param * (exp(u) - 1)
        identity(u)   = u

    >>> activate(torch.tensor([[[-2.0, 3.0]]]), None, "leaky_relu", 0.5)
    tensor([[[-1.,  3.]]])
    """
    if residual3 is not None:
        z3.add_(residual3)
    if activation == "leaky_relu":
        torch.nn.functional.leaky_relu_(z3, param)
    elif activation == "elu":
        torch.nn.functional.elu_(z3, param)
    return z3


def elu_floor(dtype: torch.dtype) -> float:
    """The least ``z / param`` that ``invert_activation`` takes for an ELU output: ``-1 + eps``.

    ELU saturates: below about ``u = -17`` (float32) ``z`` rounds to ``-param`` exactly and
    ``u = log1p(-1)`` would be ``-inf``; there ``u`` becomes ``log(eps)`` instead (about -16 in
    float32, -36 in float64), and the gradient at ``u``, ``dz * (z + param)``, is 0 either way.
    """
    return -1.0 + torch.finfo(dtype).eps


def invert_activation(z3: Tensor, dz3: Tensor, residual3: Tensor | None, activation: str,
                      param: float) -> tuple[Tensor, Tensor]:
    """Phase ``invert_activation``: from ``z = act(y + residual)`` and ``dz``, ``(y, dy)``.

    With ``u = act^-1(z)``: ``y = u - residual`` and ``dy = dz * act'(u)``, which is also the
    residual's gradient. Where ``z < 0``::

        leaky_relu: u = z / param,          act'(u) = param
        elu:        u = log1p(z / param),   act'(u) = param * exp(u) = z + param

    and ``u = z``, ``act'(u) = 1`` elsewhere (a NaN stays NaN). Both come back in the
    accumulation dtype, in ``z3``'s layout.

    >>> y, dy = invert_activation(torch.tensor([[[-1.0, 3.0]]]), torch.ones(1, 1, 2), None,
    ...                           "leaky_relu", 0.5)
    >>> y.tolist(), dy.tolist()
    ([[[-2.0, 3.0]]], [[[0.5, 1.0]]])
    """
    acc = acc_dtype(z3.dtype)
    z, dz = z3.to(acc), dz3.to(acc)
    below = z < 0
    if activation == "leaky_relu":
        u, dy = torch.where(below, z / param, z), torch.where(below, dz * param, dz)
    elif activation == "elu":
        u = torch.where(below, torch.log1p((z / param).clamp(min=elu_floor(acc))), z)
        dy = torch.where(below, dz * (z + param), dz)
    else:
        u, dy = z, dz
    y = u if residual3 is None else u - residual3.to(acc)
    return y, dy
