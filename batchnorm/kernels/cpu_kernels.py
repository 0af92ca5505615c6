"""Compiled CPU kernels (numba) for batch normalization on NumPy views of torch tensors.

Two memory layouts of the canonical ``(N, C, L)`` view, each with its own loop order:

* ``*_ncl`` kernels take the contiguous ``(N, C, L)`` array. Each channel is one parallel task
  (``prange`` over ``C``): its statistics are summed and then its values normalized while the
  channel's slice (``N * L`` values) is still in the core's cache, so the input crosses the
  memory bus once for both passes when the slice fits.
* ``*_rows`` kernels take the channels-last input as a ``(R, C)`` array of ``R = N * L`` rows.
  The rows are cut into ``min(R, CHUNKS)`` fixed chunks; each parallel task sums its chunk into
  its own per-channel partial sums, and the partials are merged in chunk order. The partition
  depends on the shape only, never on the thread count, so the result is bitwise reproducible.

Numerical decisions:

* Sums accumulate in float64 for float32 and float64 input, on values shifted by a pivot ``s``
  (the channel's first value, as in ``batchnorm._eager``): ``d = x - s`` is exact for values
  near each other, so ``var = E[d^2] - E[d]^2`` keeps its precision when ``|mean| >> std``.
  Rounding can make that difference slightly negative; it is clamped at zero, NaN kept.
* The normalization is ``y = (x - s) * scale + shift`` with ``scale = weight * rstd`` and
  ``shift = bias - (mean - s) * scale``, in the input's dtype: the large common part of ``x``
  and ``mean`` cancels exactly in ``x - s``, never in a rounded ``mean``.
* Only the reduction loops are compiled with ``reassoc`` (``_SUM_FLAGS``), which lets LLVM keep
  several SIMD partial sums; the order is fixed at compile time, so it is deterministic. The
  elementwise loops keep strict IEEE semantics, so ``(x - s) * scale`` is never rewritten into
  ``x * scale - s * scale``. NaN and inf propagate (no ``nnan``/``ninf``).

Every kernel writes into output arrays its caller allocated; per-channel parameters come as
float64 arrays. Without numba the module still imports and the kernels run as plain Python
(slowly): that keeps its doctests runnable, but nothing else should rely on it.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # numba is optional: the backend reports available() == False then

    def njit(*args, **kwargs):
        return lambda function: function

    prange = range

CHUNKS = 64  # row chunks of the channels-last kernels: enough for 64 threads, partials stay small
_SUM_FLAGS = {"reassoc", "contract"}  # see the module docstring
_JIT = {"cache": True, "nogil": True}


@njit(fastmath=_SUM_FLAGS, **_JIT)
def _shifted_sums_ncl(x, c, pivot):
    """``(sum(x - pivot), sum((x - pivot)**2))`` over channel ``c`` of ``x``, in float64."""
    s1 = 0.0
    s2 = 0.0
    for n in range(x.shape[0]):
        row = x[n, c]
        for i in range(row.shape[0]):
            d = np.float64(row[i]) - pivot
            s1 += d
            s2 += d * d
    return s1, s2


@njit(**_JIT)
def _affine_ncl(x, c, pivot, scale, shift, y):
    """``y = (x - pivot) * scale + shift`` over channel ``c`` (scalars in x's dtype)."""
    for n in range(x.shape[0]):
        row = x[n, c]
        out = y[n, c]
        for i in range(row.shape[0]):
            out[i] = (row[i] - pivot) * scale + shift


@njit(**_JIT)
def _statistics(s1, s2, m, pivot, weight, bias, eps):
    """Mean, biased variance, rstd and the affine ``(scale, shift)`` from shifted sums."""
    d_mean = s1 / m  # mean - pivot
    var = s2 / m - d_mean * d_mean
    if var < 0.0:  # rounding only; written as a comparison so that NaN stays NaN
        var = 0.0
    rstd = 1.0 / np.sqrt(var + eps)
    scale = weight * rstd
    return pivot + d_mean, var, rstd, scale, bias - d_mean * scale


@njit(parallel=True, **_JIT)
def forward_train_ncl(x, weight, bias, eps, y, mean, rstd, var):
    """Algorithm 1 on a contiguous ``(N, C, L)`` array, one fused pass per channel.

    Args:
        x: ``(N, C, L)`` C-contiguous float32/float64 input.
        weight, bias: ``(C,)`` float64 (ones / zeros when the layer has none).
        eps: added to the variance.
        y: ``(N, C, L)`` output, x's dtype and layout.
        mean, rstd, var: ``(C,)`` outputs (biased variance), any float dtype.

    >>> x = np.arange(12.0).reshape(2, 3, 2)
    >>> y, mean, rstd, var = np.empty_like(x), np.empty(3), np.empty(3), np.empty(3)
    >>> forward_train_ncl(x, np.ones(3), np.zeros(3), 0.0, y, mean, rstd, var)
    >>> mean.tolist(), var.tolist()
    ([3.5, 5.5, 7.5], [9.25, 9.25, 9.25])
    """
    n_batch, channels, length = x.shape
    m = n_batch * length
    coef = np.empty((2, channels), x.dtype)  # scale, shift rounded to x's dtype
    for c in prange(channels):
        pivot = x[0, c, 0]
        s1, s2 = _shifted_sums_ncl(x, c, np.float64(pivot))
        mu, v, r, scale, shift = _statistics(s1, s2, m, np.float64(pivot), weight[c], bias[c],
                                             eps)
        mean[c], var[c], rstd[c] = mu, v, r
        coef[0, c], coef[1, c] = scale, shift
        _affine_ncl(x, c, pivot, coef[0, c], coef[1, c], y)


@njit(**_JIT)
def _chunk(k, n_chunks, rows):
    """Rows ``[start, stop)`` of chunk ``k``: a fixed partition of ``rows`` rows."""
    return k * rows // n_chunks, (k + 1) * rows // n_chunks


@njit(**_JIT)
def _shifted_sums_rows(x, start, stop, pivot, s1, s2):
    """Add ``x - pivot`` and its square, per channel, over rows ``[start, stop)``."""
    for r in range(start, stop):
        row = x[r]
        for c in range(row.shape[0]):
            d = np.float64(row[c]) - pivot[c]
            s1[c] += d
            s2[c] += d * d


@njit(**_JIT)
def _affine_rows(x, start, stop, pivot, scale, shift, y):
    """``y = (x - pivot) * scale + shift`` over rows ``[start, stop)`` (per-channel vectors)."""
    for r in range(start, stop):
        row = x[r]
        out = y[r]
        for c in range(row.shape[0]):
            out[c] = (row[c] - pivot[c]) * scale[c] + shift[c]


@njit(parallel=True, **_JIT)
def forward_train_rows(x, weight, bias, eps, y, mean, rstd, var):
    """Algorithm 1 on channels-last input seen as ``(R, C)`` rows (``R = N * L``).

    Arguments as :func:`forward_train_ncl`, with ``x`` and ``y`` of shape ``(R, C)``.

    >>> x = np.arange(12.0).reshape(4, 3)
    >>> y, mean, rstd, var = np.empty_like(x), np.empty(3), np.empty(3), np.empty(3)
    >>> forward_train_rows(x, np.ones(3), np.zeros(3), 0.0, y, mean, rstd, var)
    >>> mean.tolist(), var.tolist(), np.round(y[:, 0] * np.sqrt(5.0), 12).tolist()
    ([4.5, 5.5, 6.5], [11.25, 11.25, 11.25], [-3.0, -1.0, 1.0, 3.0])
    """
    rows, channels = x.shape
    n_chunks = min(rows, CHUNKS)
    pivot = x[0].astype(np.float64)
    partial = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = _chunk(k, n_chunks, rows)
        _shifted_sums_rows(x, start, stop, pivot, partial[k, 0], partial[k, 1])
    coef = np.empty((3, channels), x.dtype)  # pivot, scale, shift in x's dtype
    for c in range(channels):
        s1 = 0.0
        s2 = 0.0
        for k in range(n_chunks):  # fixed merge order
            s1 += partial[k, 0, c]
            s2 += partial[k, 1, c]
        mean[c], var[c], rstd[c], coef[1, c], coef[2, c] = _statistics(
            s1, s2, rows, pivot[c], weight[c], bias[c], eps)
        coef[0, c] = x[0, c]
    for k in prange(n_chunks):
        start, stop = _chunk(k, n_chunks, rows)
        _affine_rows(x, start, stop, coef[0], coef[1], coef[2], y)


@njit(parallel=True, **_JIT)
def forward_eval_ncl(x, scale, shift, y):
    """``y = scale[c] * x + shift[c]`` on a contiguous ``(N, C, L)`` array.

    ``scale`` and ``shift`` are ``(C,)`` in x's dtype; the ``N * C`` rows run in parallel.

    >>> x = np.ones((2, 2, 3))
    >>> y = np.empty_like(x)
    >>> forward_eval_ncl(x, np.array([2.0, 3.0]), np.array([0.5, -1.0]), y)
    >>> y[1].tolist()
    [[2.5, 2.5, 2.5], [2.0, 2.0, 2.0]]
    """
    n_batch, channels, length = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        a, b = scale[c], shift[c]
        row = x[n, c]
        out = y[n, c]
        for j in range(length):
            out[j] = row[j] * a + b


@njit(parallel=True, **_JIT)
def forward_eval_rows(x, scale, shift, y):
    """``y = scale[c] * x + shift[c]`` on channels-last ``(R, C)`` rows.

    >>> x = np.ones((3, 2))
    >>> y = np.empty_like(x)
    >>> forward_eval_rows(x, np.array([2.0, 3.0]), np.array([0.5, -1.0]), y)
    >>> y.tolist()
    [[2.5, 2.0], [2.5, 2.0], [2.5, 2.0]]
    """
    rows, channels = x.shape
    n_chunks = min(rows, CHUNKS)
    for k in prange(n_chunks):
        start, stop = _chunk(k, n_chunks, rows)
        for r in range(start, stop):
            row = x[r]
            out = y[r]
            for c in range(channels):
                out[c] = row[c] * scale[c] + shift[c]


# --- backward ---------------------------------------------------------------------------------
# With dz = dy, x_hat = (x - mean) * rstd, a = weight * rstd and m = N * L values per channel:
#   dbias = sum(dy),  dweight = sum(dy * x_hat) = rstd * sum(dy * (x - mean))
#   training:  dx = a * (dy - dbias / m - x_hat * dweight / m)
#                 = a * dy + b * (x - mean) + c0,  b = -a * rstd * dweight / m,  c0 = -a * dbias / m
#   inference: dx = a * dy   (the statistics are constants)


@njit(fastmath=_SUM_FLAGS, **_JIT)
def _grad_sums_ncl(dy, x, c, mu):
    """``(sum(dy), sum(dy * (x - mu)))`` over channel ``c``, in float64."""
    s_dy = 0.0
    s_dyx = 0.0
    for n in range(x.shape[0]):
        g_row = dy[n, c]
        x_row = x[n, c]
        for i in range(x_row.shape[0]):
            g = np.float64(g_row[i])
            s_dy += g
            s_dyx += g * (np.float64(x_row[i]) - mu)
    return s_dy, s_dyx


@njit(**_JIT)
def _grad_input_ncl(dy, x, c, mean, a, b, c0, dx):
    """``dx = a * dy + b * (x - mean) + c0`` over channel ``c`` (scalars in x's dtype)."""
    for n in range(x.shape[0]):
        g_row = dy[n, c]
        x_row = x[n, c]
        out = dx[n, c]
        for i in range(x_row.shape[0]):
            out[i] = g_row[i] * a + (x_row[i] - mean) * b + c0


@njit(**_JIT)
def _scaled_ncl(dy, c, a, dx):
    """``dx = a * dy`` over channel ``c``: inference, where x does not enter (even if inf)."""
    for n in range(dy.shape[0]):
        g_row = dy[n, c]
        out = dx[n, c]
        for i in range(g_row.shape[0]):
            out[i] = g_row[i] * a


@njit(parallel=True, **_JIT)
def backward_ncl(dy, x, mean, rstd, weight, training, need_dx, dx, dweight, dbias):
    """Gradients on contiguous ``(N, C, L)`` arrays: both sums in one pass, then ``dx``.

    Args:
        dy, x: ``(N, C, L)`` C-contiguous, one dtype.
        mean, rstd: ``(C,)`` saved statistics; weight: ``(C,)`` float64 (ones for none).
        training: whether ``dx`` flows through the batch statistics.
        need_dx: whether to write ``dx`` (an ``(N, C, L)`` array, else unused).
        dweight, dbias: ``(C,)`` outputs.

    >>> x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> dy, dx, dw, db = np.ones_like(x), np.empty_like(x), np.empty(1), np.empty(1)
    >>> backward_ncl(dy, x, np.array([4.0]), np.array([0.5]), np.ones(1), True, True, dx, dw, db)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([4.0], [0.0], [0.0, 0.0, 0.0, 0.0])
    """
    n_batch, channels, length = x.shape
    m = n_batch * length
    coef = np.empty((4, channels), x.dtype)  # mean, a, b, c0 in x's dtype
    for c in prange(channels):
        mu = np.float64(mean[c])
        r = np.float64(rstd[c])
        a = weight[c] * r
        s_dy, s_dyx = _grad_sums_ncl(dy, x, c, mu)
        dw = s_dyx * r
        dbias[c], dweight[c] = s_dy, dw
        coef[0, c], coef[1, c] = mean[c], a
        coef[2, c], coef[3, c] = -a * r * dw / m, -a * s_dy / m
        if need_dx and training:
            _grad_input_ncl(dy, x, c, coef[0, c], coef[1, c], coef[2, c], coef[3, c], dx)
        elif need_dx:
            _scaled_ncl(dy, c, coef[1, c], dx)


@njit(**_JIT)
def _grad_sums_rows(dy, x, start, stop, mu, s_dy, s_dyx):
    """Add ``dy`` and ``dy * (x - mu)``, per channel, over rows ``[start, stop)``."""
    for r in range(start, stop):
        g_row = dy[r]
        x_row = x[r]
        for c in range(x_row.shape[0]):
            g = np.float64(g_row[c])
            s_dy[c] += g
            s_dyx[c] += g * (np.float64(x_row[c]) - mu[c])


@njit(**_JIT)
def _grad_input_rows(dy, x, start, stop, coef, training, dx):
    """``dx`` over rows ``[start, stop)``; ``coef`` rows: mean, a, b, c0 (see above)."""
    mean, a, b, c0 = coef[0], coef[1], coef[2], coef[3]
    for r in range(start, stop):
        g_row = dy[r]
        x_row = x[r]
        out = dx[r]
        if training:
            for c in range(x_row.shape[0]):
                out[c] = g_row[c] * a[c] + (x_row[c] - mean[c]) * b[c] + c0[c]
        else:  # inference: x does not enter (even if inf)
            for c in range(x_row.shape[0]):
                out[c] = g_row[c] * a[c]


@njit(parallel=True, **_JIT)
def backward_rows(dy, x, mean, rstd, weight, training, need_dx, dx, dweight, dbias):
    """Gradients on channels-last ``(R, C)`` rows: per-chunk partial sums, merge, then ``dx``.

    Arguments as :func:`backward_ncl`, with ``dy``, ``x`` and ``dx`` of shape ``(R, C)``.

    >>> x = np.array([[1.0], [3.0], [5.0], [7.0]])
    >>> dy, dx, dw, db = x - 4.0, np.empty_like(x), np.empty(1), np.empty(1)
    >>> backward_rows(dy, x, np.array([4.0]), np.array([0.5]), np.ones(1), False, True, dx, dw,
    ...               db)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([0.0], [10.0], [-1.5, -0.5, 0.5, 1.5])
    """
    rows, channels = x.shape
    n_chunks = min(rows, CHUNKS)
    mu = mean.astype(np.float64)
    partial = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = _chunk(k, n_chunks, rows)
        _grad_sums_rows(dy, x, start, stop, mu, partial[k, 0], partial[k, 1])
    coef = np.empty((4, channels), x.dtype)  # mean, a, b, c0 in x's dtype
    for c in range(channels):
        s_dy = 0.0
        s_dyx = 0.0
        for k in range(n_chunks):  # fixed merge order
            s_dy += partial[k, 0, c]
            s_dyx += partial[k, 1, c]
        r = np.float64(rstd[c])
        a = weight[c] * r
        dw = s_dyx * r
        dbias[c], dweight[c] = s_dy, dw
        coef[0, c], coef[1, c] = mean[c], a
        coef[2, c], coef[3, c] = -a * r * dw / rows, -a * s_dy / rows
    if need_dx:
        for k in prange(n_chunks):
            start, stop = _chunk(k, n_chunks, rows)
            _grad_input_rows(dy, x, start, stop, coef, training, dx)
