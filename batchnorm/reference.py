"""NumPy reference of batch normalization (Ioffe & Szegedy, 2015): Algorithms 1 and 2.

Written to be read next to the paper. Float64 input is computed in float64 end to end; float16
and integer input is promoted (to float32 and float64) so statistics never accumulate in half
precision. Every rank is handled the same way: the feature (channel) axis is ``axis`` (default 1,
torch's ``(N, C, ...)`` layout) and the statistics reduce over every other axis. For dense
``(N, D)`` input that is one set of statistics per activation; for convolutional ``(N, C, p, q)``
maps it is one per channel over the batch and all spatial positions, the paper's m' = m·p·q.

Paper notation and the names used here:

    =====================  ===================  ==============================================
    paper                  code                 meaning
    =====================  ===================  ==============================================
    B = {x_1 ... x_m}      ``x``                mini-batch, any rank, channels on ``axis``
    m  (m' = m·p·q)        ``m``                values per channel in one mini-batch
    μ_B                    ``mean``             per-channel mini-batch mean
    σ²_B                   ``var``              per-channel biased variance, 1/m·Σ(x−μ_B)²
    1/√(σ²_B + ε)          ``rstd``             reciprocal standard deviation
    ε                      ``eps``              constant added to the variance for stability
    x̂_i                    ``x_hat``            normalized input, (x − μ_B)·rstd
    γ, β                   ``gamma``, ``beta``  learned scale and shift (torch: weight, bias)
    y_i                    ``y``                output, γ·x̂ + β
    ∂ℓ/∂y_i                ``dy``               upstream gradient
    ∂ℓ/∂x_i, ∂ℓ/∂γ, ∂ℓ/∂β  ``dx``, ``dgamma``,  gradients returned by the backward
                           ``dbeta``
    E[x], Var[x]           ``pop_mean``,        population statistics (Algorithm 2)
                           ``pop_var``
    =====================  ===================  ==============================================

The biased variance σ²_B normalizes during training (Algorithm 1, and torch). The unbiased
m/(m−1)·σ²_B appears only in estimates of the population variance: Algorithm 2's average over
mini-batches (:func:`population_statistics`) and torch's exponential moving average
(:func:`update_running_stats`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "inference_scale_shift",
    "population_statistics",
    "update_running_stats",
]


class BatchNormCache(NamedTuple):
    """What :func:`batch_norm_backward` needs from :func:`batch_norm_forward`.

    Attributes:
        x_hat: normalized input x̂, same shape as ``x``.
        mean: per-channel mini-batch mean μ_B, shape ``(C,)``.
        var: per-channel biased variance σ²_B, shape ``(C,)``.
        rstd: per-channel 1/√(σ²_B + ε), shape ``(C,)``.
        gamma: the scale γ used in the forward, shape ``(C,)``.
        axis: the channel axis of ``x`` (non-negative).
        m: values per channel that each statistic averages over.

    >>> _, cache = batch_norm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3))
    >>> cache.m, cache.axis, cache.mean.shape
    (2, 1, (3,))
    """

    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    rstd: np.ndarray
    gamma: np.ndarray
    axis: int
    m: int


def _as_real(name: str, value) -> np.ndarray:
    """Return ``value`` as an array, rejecting dtypes that are not real numbers."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must hold real numbers (int or float); got dtype {arr.dtype}. "
            f"Fix: pass e.g. np.asarray({name}, dtype=np.float64)."
        )
    return arr


def _layout(x: np.ndarray, axis: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Check ``axis`` against ``x`` and return (axis, reduced axes, per-channel broadcast shape)."""
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (a batch axis and a channel axis); got shape "
            f"{x.shape}. Fix: add the batch axis, e.g. x[None] for a single example."
        )
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int; got {type(axis).__name__}. Fix: pass e.g. axis=1.")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"axis must be in [{-x.ndim}, {x.ndim - 1}] for x of rank {x.ndim}; got {axis}. "
            "Fix: pass the index of the channel axis (torch's layout uses 1)."
        )
    axis = int(axis) % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    bshape = tuple(x.shape[axis] if i == axis else 1 for i in range(x.ndim))
    return axis, reduce_axes, bshape


def _per_channel(name: str, value, channels: int) -> np.ndarray:
    """Return ``value`` as a ``(channels,)`` real array, or say why it is not one."""
    arr = _as_real(name, value)
    if arr.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel of x; got shape "
            f"{arr.shape}. Fix: pass a 1-D array of length {channels}."
        )
    return arr


def _moments(x: np.ndarray, reduce_axes: tuple[int, ...], bshape: tuple[int, ...]):
    """Per-channel mean μ_B, centred x − μ_B and biased variance σ²_B of one mini-batch.

    Two-pass (subtract the mean, then square): the one-pass E[x²] − E[x]² cancels
    catastrophically when the mean is large against the spread.
    """
    mean = x.mean(axis=reduce_axes)
    centered = x - mean.reshape(bshape)
    return mean, centered, (centered * centered).mean(axis=reduce_axes)  # divides by m, not m−1


def _check_eps(eps: float) -> float:
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps}. Fix: use e.g. 1e-5.")
    return float(eps)


def batch_norm_forward(
    x, gamma, beta, eps: float = 1e-5, axis: int = 1
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch-normalize a mini-batch with its own statistics (the paper's Algorithm 1).

    Args:
        x: mini-batch, rank >= 2, channels on ``axis``.
        gamma: scale γ, shape ``(C,)``.
        beta: shift β, shape ``(C,)``.
        eps: ε added to the variance, default 1e-5 (torch's default); 0 is allowed.
        axis: channel axis of ``x``, default 1; negative values count from the end.

    Shape:
        ``x`` and ``y``: any ``(..., C, ...)`` with C at ``axis``; statistics have shape ``(C,)``.

    Returns:
        ``(y, cache)``: the output, and a :class:`BatchNormCache` for the backward.

    Math, per channel over its m values (all axes but ``axis``)::

        mean = 1/m · Σ x_i                      mini-batch mean
        var  = 1/m · Σ (x_i − mean)²            biased variance (Algorithm 1, torch)
        x_hat = (x_i − mean) · rstd,            rstd = 1/√(var + eps)
        y_i  = gamma · x_hat + beta

    - The variance is two-pass, subtracting the mean before squaring, to avoid cancellation.
    - At least 2 values per channel are required, as torch requires in training: with m = 1
      every x̂ is 0 and the layer outputs β whatever the input.
    - With eps = 0 a constant channel would divide by zero; that raises instead of giving NaN.
    - The result is float32 for float16/float32 input and float64 for float64/integer input.

    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])            # (N=2, D=2)
    >>> y, cache = batch_norm_forward(x, np.array([2.0, 1.0]), np.array([0.5, 0.0]), eps=0.0)
    >>> y
    array([[-1.5, -1. ],
           [ 2.5,  1. ]])
    >>> cache.mean, cache.var
    (array([ 2., 20.]), array([  1., 100.]))
    """
    x = _as_real("x", x)
    axis, reduce_axes, bshape = _layout(x, axis)
    channels = x.shape[axis]
    gamma = _per_channel("gamma", gamma, channels)
    beta = _per_channel("beta", beta, channels)
    eps = _check_eps(eps)
    m = x.size // channels
    if m < 2:
        raise ValueError(
            f"batch statistics need at least 2 values per channel; x of shape {x.shape} has "
            f"m={m} along the non-channel axes (axis={axis}). Fix: use a larger mini-batch, "
            "or use batch_norm_inference with population statistics."
        )
    dtype = np.result_type(x.dtype, gamma.dtype, beta.dtype, np.float32)
    x, gamma, beta = x.astype(dtype), gamma.astype(dtype), beta.astype(dtype)

    mean, centered, var = _moments(x, reduce_axes, bshape)
    if eps == 0 and np.any(var == 0):
        raise ValueError(
            f"channels {np.flatnonzero(var == 0).tolist()} are constant over the mini-batch, so "
            "with eps=0 their normalization divides by zero. Fix: use eps > 0 (e.g. 1e-5)."
        )
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = centered * rstd.reshape(bshape)
    y = gamma.reshape(bshape) * x_hat + beta.reshape(bshape)
    return y, BatchNormCache(x_hat, mean, var, rstd, gamma, axis, m)


def batch_norm_backward(dy, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a loss ℓ through Algorithm 1, in closed form.

    Args:
        dy: ∂ℓ/∂y, same shape as the forward's ``x``.
        cache: the :class:`BatchNormCache` returned by :func:`batch_norm_forward`.

    Returns:
        ``(dx, dgamma, dbeta)`` with shapes ``x.shape``, ``(C,)``, ``(C,)``.

    Derivation, per channel, sums Σ over its m values. The paper's chain rule (Section 3)::

        ∂ℓ/∂x̂_i = ∂ℓ/∂y_i · γ
        ∂ℓ/∂σ²  = Σ ∂ℓ/∂x̂_i · (x_i − μ) · (−1/2)·(σ² + ε)^(−3/2)
        ∂ℓ/∂μ   = Σ ∂ℓ/∂x̂_i · (−rstd)  +  ∂ℓ/∂σ² · Σ −2(x_i − μ)/m
        ∂ℓ/∂x_i = ∂ℓ/∂x̂_i · rstd  +  ∂ℓ/∂σ² · 2(x_i − μ)/m  +  ∂ℓ/∂μ · 1/m
        ∂ℓ/∂γ   = Σ ∂ℓ/∂y_i · x̂_i
        ∂ℓ/∂β   = Σ ∂ℓ/∂y_i

    The second term of ∂ℓ/∂μ (the path μ → σ² → ℓ) vanishes because Σ(x_i − μ) = 0: the
    variance is stationary in the mean it is centred on. Substituting x_i − μ = x̂_i/rstd gives
    ∂ℓ/∂σ² = −(γ/2)·rstd²·Σ dy·x̂ and ∂ℓ/∂μ = −γ·rstd·Σ dy, so the three terms of ∂ℓ/∂x_i are
    (γ·rstd/m)·(m·dy_i), −(γ·rstd/m)·x̂_i·Σ dy·x̂ and −(γ·rstd/m)·Σ dy, which collapse to::

        dx = (γ·rstd/m) · (m·dy − Σ dy − x̂ · Σ(dy·x̂))
        dgamma = Σ(dy·x̂),   dbeta = Σ dy

    Read it as: dx is γ·rstd times dy with its mean removed and its projection on x̂ removed
    (exactly a projection when eps = 0, where mean x̂² = 1): shifting or scaling a channel of x
    leaves x̂, and so ℓ, unchanged.

    >>> x = np.array([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]])
    >>> y, cache = batch_norm_forward(x, np.array([1.5, -0.5]), np.array([0.1, 0.2]))
    >>> dx, dgamma, dbeta = batch_norm_backward(np.ones_like(y), cache)
    >>> np.allclose(dx, 0.0), dbeta                         # a constant dy has no effect on x
    (True, array([3., 3.]))
    """
    dy = _as_real("dy", dy)
    x_hat, _, _, rstd, gamma, axis, m = cache
    if dy.shape != x_hat.shape:
        raise ValueError(
            f"dy must have the shape of the forward's x, {x_hat.shape}; got {dy.shape}. "
            "Fix: pass the gradient of the loss with respect to the forward's output y."
        )
    reduce_axes = tuple(i for i in range(x_hat.ndim) if i != axis)
    bshape = tuple(x_hat.shape[axis] if i == axis else 1 for i in range(x_hat.ndim))
    dbeta = dy.sum(axis=reduce_axes)
    dgamma = (dy * x_hat).sum(axis=reduce_axes)
    scale = (gamma * rstd / m).reshape(bshape)
    dx = scale * (m * dy - dbeta.reshape(bshape) - x_hat * dgamma.reshape(bshape))
    return dx, dgamma, dbeta


def inplace_abn_backward(dz, z, gamma, beta, rstd, activation: str = "leaky_relu",
                         param: float = 0.01, eps: float = 1e-5,
                         axis: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 1's backward from the activated output alone (in-place ABN, Rota Bulò et al.,
    2018): the gradients of ``z = act(γ'·x̂ + β)``, ``γ' = |γ| + eps``, without ``x`` or ``x̂``.

    Args:
        dz: ∂ℓ/∂z, the shape of ``z``.
        z: the forward's output, channels on ``axis``.
        gamma, beta: γ (its sign and magnitude) and β, shape ``(C,)``.
        rstd: the mini-batch's 1/√(σ²_B + ε), shape ``(C,)``.
        activation: ``"leaky_relu"`` (slope ``param``), ``"elu"`` (alpha ``param``) or
            ``"identity"``; ``param > 0``, so that the activation is invertible.

    Returns:
        ``(dx, dgamma, dbeta)`` as :func:`batch_norm_backward`.

    Invert the activation, then the affine map (γ' > 0 always), then take the closed form::

        y   = act⁻¹(z)           leaky ReLU: z/param where z < 0;  ELU: log(1 + z/param)
        dy  = dz · act'(y)       leaky ReLU: param where z < 0;    ELU: z + param
        x̂   = (y − β) / γ'
        dx, dγ', dβ = batch_norm_backward(dy) with x̂ and γ',   dγ = sign(γ) · dγ'

    >>> x = np.array([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]])
    >>> g, b = np.array([1.5, -0.5]), np.array([0.1, 0.2])
    >>> y, cache = batch_norm_forward(x, np.abs(g) + 1e-5, b)
    >>> dx, _, _ = inplace_abn_backward(np.ones_like(y), y, g, b, cache.rstd, "identity")
    >>> np.allclose(dx, 0.0)
    True
    """
    z, dz = _as_real("z", z), _as_real("dz", dz)
    if not param > 0 and activation != "identity":
        raise ValueError(f"{activation} is invertible for a positive param only, got {param}")
    axis, _, bshape = _layout(z, axis)
    channels = z.shape[axis]
    gamma = _per_channel("gamma", gamma, channels)
    scale = np.abs(gamma) + eps
    below = z < 0
    if activation == "leaky_relu":
        y, dy = np.where(below, z / param, z), np.where(below, dz * param, dz)
    elif activation == "elu":
        y = np.where(below, np.log1p(np.maximum(z / param, -1.0 + np.finfo(z.dtype).eps)), z)
        dy = np.where(below, dz * (z + param), dz)
    elif activation == "identity":
        y, dy = z, dz
    else:
        raise ValueError(f"activation must be leaky_relu, elu or identity, got {activation!r}")
    x_hat = (y - _per_channel("beta", beta, channels).reshape(bshape)) / scale.reshape(bshape)
    cache = BatchNormCache(x_hat, np.zeros(channels), np.zeros(channels),
                           _per_channel("rstd", rstd, channels), scale, axis,
                           z.size // channels)
    dx, dscale, dbeta = batch_norm_backward(dy, cache)
    return dx, np.sign(gamma) * dscale, dbeta


def population_statistics(batches: Iterable, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and variance from a sequence of mini-batches (Algorithm 2, step 10).

    Args:
        batches: iterable of mini-batches, each shaped like the training input, all with the
            same channel count and the same m (values per channel).
        axis: channel axis of every batch, default 1.

    Returns:
        ``(pop_mean, pop_var)``, each of shape ``(C,)``, float64 (or float32 for float32 input).

    Math, with μ_B and σ²_B the per-channel mean and biased variance of each mini-batch::

        E[x]   = E_B[μ_B]
        Var[x] = m/(m − 1) · E_B[σ²_B]

    - m is the number of values per channel in one batch, so m·p·q for convolutional maps.
    - All batches must share m: the paper's formula uses one m/(m−1) correction, and with
      equal sizes E_B[μ_B] is exactly the mean over all the data.

    >>> batches = [np.array([[0.0], [2.0]]), np.array([[4.0], [6.0]])]
    >>> population_statistics(batches)        # means 1, 5; variances 1, 1; m = 2
    (array([3.]), array([2.]))
    """
    mean_sum = var_sum = None
    count, m, channels = 0, None, None
    for index, batch in enumerate(batches):
        batch = _as_real(f"batches[{index}]", batch)
        batch_axis, reduce_axes, bshape = _layout(batch, axis)
        c, batch_m = batch.shape[batch_axis], batch.size // batch.shape[batch_axis]
        if count == 0:
            m, channels = batch_m, c
            if m < 2:
                raise ValueError(
                    f"the unbiased variance m/(m-1)·σ² needs m >= 2 values per channel; "
                    f"batches[0] of shape {batch.shape} has m={m}. Fix: use larger mini-batches."
                )
        elif (c, batch_m) != (channels, m):
            raise ValueError(
                f"every mini-batch must have the same channels and values per channel as "
                f"batches[0] (C={channels}, m={m}); batches[{index}] of shape {batch.shape} has "
                f"C={c}, m={batch_m}. Fix: drop the incomplete batch or use equal batch sizes."
            )
        batch = batch.astype(np.result_type(batch.dtype, np.float32))
        mean, _, var = _moments(batch, reduce_axes, bshape)  # μ_B and the biased σ²_B
        mean_sum = mean if mean_sum is None else mean_sum + mean
        var_sum = var if var_sum is None else var_sum + var
        count += 1
    if count == 0:
        raise ValueError("batches is empty. Fix: pass at least one mini-batch.")
    return mean_sum / count, m / (m - 1) * (var_sum / count)


def inference_scale_shift(
    gamma, beta, pop_mean, pop_var, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference batch normalization into one affine map (Algorithm 2, step 11).

    Args:
        gamma: scale γ, shape ``(C,)``.
        beta: shift β, shape ``(C,)``.
        pop_mean: population mean E[x], shape ``(C,)``.
        pop_var: population variance Var[x] (unbiased estimate), shape ``(C,)``, >= 0.
        eps: ε, default 1e-5.

    Returns:
        ``(scale, shift)``, shape ``(C,)`` each, so that inference is ``y = scale·x + shift``.

    Math::

        scale = γ / √(Var[x] + ε)
        shift = β − γ·E[x] / √(Var[x] + ε) = β − scale·E[x]

    >>> scale, shift = inference_scale_shift([2.0], [1.0], [3.0], [4.0], eps=0.0)
    >>> scale, shift
    (array([1.]), array([-2.]))
    """
    gamma = _as_real("gamma", gamma)
    if gamma.ndim != 1:
        raise ValueError(
            f"gamma must be 1-D with shape (C,); got shape {gamma.shape}. "
            "Fix: pass one scale per channel, e.g. gamma.reshape(-1)."
        )
    channels = gamma.shape[0]
    beta = _per_channel("beta", beta, channels)
    pop_mean = _per_channel("pop_mean", pop_mean, channels)
    pop_var = _per_channel("pop_var", pop_var, channels)
    eps = _check_eps(eps)
    if np.any(pop_var < 0) or np.any(pop_var + eps == 0):
        raise ValueError(
            f"pop_var + eps must be > 0 in every channel; got pop_var={pop_var.tolist()} and "
            f"eps={eps}. Fix: pass a variance (>= 0) and eps > 0 for constant channels."
        )
    dtype = np.result_type(gamma, beta, pop_mean, pop_var, np.float32)
    scale = gamma.astype(dtype) / np.sqrt(pop_var.astype(dtype) + eps)
    shift = beta.astype(dtype) - scale * pop_mean.astype(dtype)
    return scale, shift


def batch_norm_inference(
    x, gamma, beta, pop_mean, pop_var, eps: float = 1e-5, axis: int = 1, folded: bool = True
) -> np.ndarray:
    """Batch normalization at inference, with fixed population statistics (Algorithm 2).

    Args:
        x: input, rank >= 2 (any m, even 1), channels on ``axis``.
        gamma, beta: scale γ and shift β, shape ``(C,)``.
        pop_mean, pop_var: population statistics E[x] and Var[x], shape ``(C,)``.
        eps: ε, default 1e-5.
        axis: channel axis of ``x``, default 1.
        folded: default True, apply the folded affine map of :func:`inference_scale_shift`;
            False applies the normalization step by step. Both give the same y.

    Returns:
        ``y``, shape of ``x``.

    Math::

        folded:    y = scale·x + shift
        unfolded:  y = γ · (x − E[x]) / √(Var[x] + ε) + β

    >>> x = np.array([[5.0], [1.0]])
    >>> batch_norm_inference(x, [2.0], [1.0], [3.0], [4.0], eps=0.0)
    array([[ 3.],
           [-1.]])
    """
    x = _as_real("x", x)
    axis, _, bshape = _layout(x, axis)
    gamma = _per_channel("gamma", gamma, x.shape[axis])
    scale, shift = inference_scale_shift(gamma, beta, pop_mean, pop_var, eps)
    dtype = np.result_type(x.dtype, scale.dtype)
    x = x.astype(dtype)
    if folded:
        return scale.reshape(bshape) * x + shift.reshape(bshape)
    g, b, mean, var = (
        np.asarray(v, dtype=dtype).reshape(bshape) for v in (gamma, beta, pop_mean, pop_var)
    )
    return g * (x - mean) / np.sqrt(var + eps) + b


def update_running_stats(
    running_mean, running_var, mean, var, m: int, momentum: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """One step of torch's exponential moving average of the batch statistics.

    Args:
        running_mean, running_var: current estimates, shape ``(C,)`` (torch starts at 0 and 1).
        mean, var: the mini-batch mean μ_B and *biased* variance σ²_B, as in
            :class:`BatchNormCache`.
        m: values per channel in the mini-batch (``cache.m``), >= 2.
        momentum: weight of the new value, default 0.1 (torch's), in [0, 1].

    Returns:
        ``(new_running_mean, new_running_var)``; the inputs are left untouched.

    Math::

        running_mean ← (1 − momentum)·running_mean + momentum·μ_B
        running_var  ← (1 − momentum)·running_var  + momentum·m/(m − 1)·σ²_B

    - Algorithm 2 averages over *all* batches equally; this average forgets old batches
      geometrically, so it tracks statistics that drift while the network trains.
    - With momentum = 1/k at step k (torch's ``momentum=None``) it is the plain average over k
      equal-size batches, which is exactly :func:`population_statistics`.

    >>> update_running_stats([0.0], [1.0], [2.0], [3.0], m=4, momentum=0.5)
    (array([1.]), array([2.5]))
    """
    running_mean = _as_real("running_mean", running_mean)
    if running_mean.ndim != 1:
        raise ValueError(
            f"running_mean must be 1-D with shape (C,); got shape {running_mean.shape}. "
            "Fix: pass one value per channel, e.g. running_mean.reshape(-1)."
        )
    channels = running_mean.shape[0]
    running_var = _per_channel("running_var", running_var, channels)
    mean = _per_channel("mean", mean, channels)
    var = _per_channel("var", var, channels)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise ValueError(
            f"the unbiased variance m/(m-1)·σ² needs an integer m >= 2; got m={m!r}. "
            "Fix: pass cache.m, the number of values per channel in the mini-batch."
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (the weight of the new batch); got {momentum}. "
            "Fix: use e.g. torch's default 0.1."
        )
    dtype = np.result_type(running_mean, running_var, mean, var, np.float32)
    unbiased_var = m / (m - 1) * var.astype(dtype)
    new_mean = (1 - momentum) * running_mean.astype(dtype) + momentum * mean.astype(dtype)
    new_var = (1 - momentum) * running_var.astype(dtype) + momentum * unbiased_var
    return new_mean, new_var
