"""Compiled CPU kernels (numba) of the batch-norm forward phases, on NumPy views of tensors.

Three loop orders for the two layouts of the canonical ``(N, C, L)`` view (the caller picks
one, and its work split, from the shape):

* ``*_ncl`` (contiguous ``(N, C, L)``): the ``N * C`` rows of ``L`` values, each of one channel,
  streamed in memory order;
* ``*_rows`` (channels-last): the ``(R, C)`` array of ``R = N * L`` rows, each holding every
  channel once, streamed in memory order;
* ``*_ncl_blocks`` (contiguous): one parallel task per block of channels, which sums its block
  and normalizes it while the block's slice is still in the core's cache, so the input crosses
  the memory bus once for both passes. Faster than streaming when the slice fits the cache.

The streamed orders cut their rows into ``n_chunks`` fixed chunks of consecutive rows. Each
chunk sums into its own per-channel partials; the partials are merged in chunk order into the
statistics; then each chunk is normalized. Chunks and blocks depend on the shape only, never on
the thread count, so every result is bitwise reproducible.

Numerical decisions:

* Sums accumulate in float64 for float32 and float64 input, on values shifted by a pivot ``s``
  (the channel's first value, as in ``batchnorm.kernels.eager``): ``d = x - s`` is exact for values
  near each other, so ``var = E[d^2] - E[d]^2`` keeps its precision when ``|mean| >> std``.
  Rounding can make that difference slightly negative; it is clamped at zero, NaN kept.
* The normalization is ``y = (x - s) * scale + shift`` with ``scale = weight * rstd`` and
  ``shift = bias - (mean - s) * scale``, in the input's dtype: the large common part of ``x``
  and ``mean`` cancels exactly in ``x - s``, never in a rounded ``mean``.
* Only the reduction loops are compiled with ``reassoc`` (``SUM_FLAGS``), which lets LLVM keep
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

SUM_FLAGS = {"reassoc", "contract"}  # see the module docstring
JIT = {"cache": True, "nogil": True}


@njit(fastmath=SUM_FLAGS, **JIT)
def shifted_sums(values, pivot):
    """``(sum(v - pivot), sum((v - pivot)**2))`` over a 1-D array, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(values.shape[0]):
        d = np.float64(values[i]) - pivot
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**JIT)
def affine(values, pivot, scale, shift, out):
    """``out = (values - pivot) * scale + shift`` over a 1-D array (scalars in its dtype)."""
    for i in range(values.shape[0]):
        out[i] = (values[i] - pivot) * scale + shift


@njit(**JIT)
def statistics(s1, s2, m, pivot, weight, bias, eps):
    """Mean, biased variance, rstd and the affine ``(scale, shift)`` from shifted sums."""
    d_mean = s1 / m  # mean - pivot
    var = s2 / m - d_mean * d_mean
    if var < 0.0:  # rounding only; written as a comparison so that NaN stays NaN
        var = 0.0
    rstd = 1.0 / np.sqrt(var + eps)
    scale = weight * rstd
    return pivot + d_mean, var, rstd, scale, bias - d_mean * scale


@njit(**JIT)
def chunk(k, n_chunks, rows):
    """Rows ``[start, stop)`` of chunk ``k``: a fixed partition of ``rows`` rows."""
    return k * rows // n_chunks, (k + 1) * rows // n_chunks


@njit(**JIT)
def quarters(start, stop):
    """Rows per quarter of ``[start, stop)``: row ``r`` of the first quarter is swept together
    with ``r + q``, ``r + 2q`` and ``r + 3q``; the last ``(stop - start) % 4`` rows come after."""
    return (stop - start) // 4


@njit(**JIT)
def merge(partial):
    """``partial[k]`` summed over chunks ``k`` in order (row by row, so that it vectorizes)."""
    total = partial[0].copy()
    for k in range(1, partial.shape[0]):
        chunk_sums = partial[k]
        for i in range(total.shape[0]):
            for c in range(total.shape[1]):
                total[i, c] += chunk_sums[i, c]
    return total


@njit(**JIT)
def finish_statistics(partial, pivot, m, weight, bias, eps, mean, rstd, var, coef):
    """Merge per-chunk ``partial[k, 0 or 1, c]`` sums in chunk order into the statistics.

    Writes ``mean``, ``rstd``, ``var`` and ``coef = (pivot, scale, shift)`` in coef's dtype.
    """
    total = merge(partial)
    for c in range(total.shape[1]):
        mean[c], var[c], rstd[c], coef[1, c], coef[2, c] = statistics(
            total[0, c], total[1, c], m, np.float64(pivot[c]), weight[c], bias[c], eps)
        coef[0, c] = pivot[c]


# Inlined into their callers (inline="always"): a parallel function called from a parallel
# kernel would be a thread-pool launch of its own, about a millisecond on 7x7 rows.
@njit(parallel=True, inline="always", **JIT)
def partial_sums_ncl(x, pivot, n_chunks):
    """Per-chunk ``(sum(x - pivot), sum((x - pivot)**2))`` of a contiguous ``(N, C, L)``
    array's ``N * C`` rows, cut into ``n_chunks`` chunks: a ``(n_chunks, 2, C)`` float64 array."""
    channels = x.shape[1]
    rows = x.shape[0] * channels
    partial = np.empty((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        partial[k] = 0.0  # by the task that fills it: in parallel, and warm in its cache
        for i in range(start, stop):
            n, c = divmod(i, channels)
            t1, t2 = shifted_sums(x[n, c], pivot[c])
            partial[k, 0, c] += t1
            partial[k, 1, c] += t2
    return partial


@njit(parallel=True, **JIT)
def forward_train_ncl(x, weight, bias, eps, y, mean, rstd, var, n_chunks):
    """Algorithm 1 on a contiguous ``(N, C, L)`` array, as its ``N * C`` rows in memory order.

    Args:
        x: ``(N, C, L)`` C-contiguous float32/float64 input.
        weight, bias: ``(C,)`` float64 (ones / zeros when the layer has none).
        eps: added to the variance.
        y: ``(N, C, L)`` output, x's dtype and layout.
        mean, rstd, var: ``(C,)`` outputs (biased variance), any float dtype.
        n_chunks: how many chunks of consecutive rows to cut the ``N * C`` rows into
            (``1 <= n_chunks <= N * C``).

    >>> x = np.arange(12.0).reshape(2, 3, 2)
    >>> y, mean, rstd, var = np.empty_like(x), np.empty(3), np.empty(3), np.empty(3)
    >>> forward_train_ncl(x, np.ones(3), np.zeros(3), 0.0, y, mean, rstd, var, 4)
    >>> mean.tolist(), var.tolist()
    ([3.5, 5.5, 7.5], [9.25, 9.25, 9.25])
    """
    n_batch, channels, length = x.shape
    rows = n_batch * channels
    partial = partial_sums_ncl(x, x[0, :, 0].astype(np.float64), n_chunks)
    coef = np.empty((3, channels), x.dtype)  # pivot, scale, shift in x's dtype
    finish_statistics(partial, x[0, :, 0], n_batch * length, weight, bias, eps, mean, rstd, var,
                      coef)
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        for i in range(start, stop):
            n, c = divmod(i, channels)
            affine(x[n, c], coef[0, c], coef[1, c], coef[2, c], y[n, c])


@njit(parallel=True, **JIT)
def forward_train_ncl_blocks(x, weight, bias, eps, y, mean, rstd, var, block):
    """Algorithm 1 on a contiguous ``(N, C, L)`` array, one fused task per channel block.

    Each task sums its block's slice (``N`` runs of ``block * L`` values) and then normalizes
    the slice while it is still in the core's cache: the input crosses the memory bus once for
    both passes. Arguments as :func:`forward_train_ncl`, but for ``block``, the channels per
    parallel task (the last block may hold fewer).

    >>> x = np.arange(12.0).reshape(2, 3, 2)
    >>> y, mean, rstd, var = np.empty_like(x), np.empty(3), np.empty(3), np.empty(3)
    >>> forward_train_ncl_blocks(x, np.ones(3), np.zeros(3), 0.0, y, mean, rstd, var, 2)
    >>> mean.tolist(), var.tolist()
    ([3.5, 5.5, 7.5], [9.25, 9.25, 9.25])
    """
    n_batch, channels, length = x.shape
    coef = np.empty((3, channels), x.dtype)  # pivot, scale, shift in x's dtype
    for j in prange((channels + block - 1) // block):
        c0 = j * block
        c1 = min(c0 + block, channels)
        sums = np.zeros((2, c1 - c0))  # this task's own: no cache line shared with another
        for n in range(n_batch):
            for c in range(c0, c1):  # one run of (c1 - c0) * L values in memory order
                t1, t2 = shifted_sums(x[n, c], np.float64(x[0, c, 0]))
                sums[0, c - c0] += t1
                sums[1, c - c0] += t2
        for c in range(c0, c1):
            coef[0, c] = x[0, c, 0]  # kept: y may be x itself (in-place ABN)
            mean[c], var[c], rstd[c], coef[1, c], coef[2, c] = statistics(
                sums[0, c - c0], sums[1, c - c0], n_batch * length, np.float64(x[0, c, 0]),
                weight[c], bias[c], eps)
        for n in range(n_batch):  # the block's slice again, from the cache
            for c in range(c0, c1):
                affine(x[n, c], coef[0, c], coef[1, c], coef[2, c], y[n, c])


@njit(**JIT)
def _shifted_sums_rows(x, start, stop, pivot, s1, s2):
    """Add ``x - pivot`` and its square, per channel, over rows ``[start, stop)``.

    Four rows per sweep: the sweep is bound by loading and storing the per-channel partials,
    not by memory, so they are updated once per four rows instead of once per row. The four
    are one from each quarter of the range (``quarters``), so that each quarter streams
    through memory on its own, as the hardware prefetchers follow best.
    """
    q = quarters(start, stop)
    for r in range(start, start + q):
        x0, x1, x2, x3 = x[r], x[r + q], x[r + 2 * q], x[r + 3 * q]
        for c in range(x0.shape[0]):
            p = pivot[c]
            d0, d1 = np.float64(x0[c]) - p, np.float64(x1[c]) - p
            d2, d3 = np.float64(x2[c]) - p, np.float64(x3[c]) - p
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for i in range(start + 4 * q, stop):
        row = x[i]
        for c in range(row.shape[0]):
            d = np.float64(row[c]) - pivot[c]
            s1[c] += d
            s2[c] += d * d


@njit(**JIT)
def _affine_rows(x, start, stop, pivot, scale, shift, y):
    """``y = (x - pivot) * scale + shift`` over rows ``[start, stop)`` (per-channel vectors)."""
    for r in range(start, stop):
        row = x[r]
        out = y[r]
        for c in range(row.shape[0]):
            out[c] = (row[c] - pivot[c]) * scale[c] + shift[c]


@njit(parallel=True, inline="always", **JIT)
def partial_sums_rows(x, pivot, n_chunks):
    """Per-chunk shifted sums, as :func:`partial_sums_ncl`, of channels-last ``(R, C)`` rows."""
    rows, channels = x.shape
    partial = np.empty((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        partial[k] = 0.0  # by the task that fills it: in parallel, and warm in its cache
        _shifted_sums_rows(x, start, stop, pivot, partial[k, 0], partial[k, 1])
    return partial


@njit(parallel=True, **JIT)
def forward_train_rows(x, weight, bias, eps, y, mean, rstd, var, n_chunks):
    """Algorithm 1 on channels-last input seen as ``(R, C)`` rows (``R = N * L``).

    Arguments as :func:`forward_train_ncl`, with ``x`` and ``y`` of shape ``(R, C)`` and
    ``1 <= n_chunks <= R``.

    >>> x = np.arange(12.0).reshape(4, 3)
    >>> y, mean, rstd, var = np.empty_like(x), np.empty(3), np.empty(3), np.empty(3)
    >>> forward_train_rows(x, np.ones(3), np.zeros(3), 0.0, y, mean, rstd, var, 3)
    >>> mean.tolist(), var.tolist(), np.round(y[:, 0] * np.sqrt(5.0), 12).tolist()
    ([4.5, 5.5, 6.5], [11.25, 11.25, 11.25], [-3.0, -1.0, 1.0, 3.0])
    """
    rows, channels = x.shape
    partial = partial_sums_rows(x, x[0].astype(np.float64), n_chunks)
    coef = np.empty((3, channels), x.dtype)  # pivot, scale, shift in x's dtype
    finish_statistics(partial, x[0], rows, weight, bias, eps, mean, rstd, var, coef)
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        _affine_rows(x, start, stop, coef[0], coef[1], coef[2], y)


@njit(parallel=True, **JIT)
def forward_eval_ncl(x, center, scale, shift, y):
    """``y = (x - center[c]) * scale[c] + shift[c]`` on a contiguous ``(N, C, L)`` array.

    ``center``, ``scale`` and ``shift`` are ``(C,)`` in x's dtype (``center`` zeros for
    inference with the running statistics, a pivot for a training batch: ``x - center`` is
    then exact); the ``N * C`` rows run in parallel.

    >>> x = np.ones((2, 2, 3))
    >>> y = np.empty_like(x)
    >>> forward_eval_ncl(x, np.zeros(2), np.array([2.0, 3.0]), np.array([0.5, -1.0]), y)
    >>> y[1].tolist()
    [[2.5, 2.5, 2.5], [2.0, 2.0, 2.0]]
    """
    n_batch, channels, length = x.shape
    for i in prange(n_batch * channels):
        n, c = i // channels, i % channels
        affine(x[n, c], center[c], scale[c], shift[c], y[n, c])


@njit(parallel=True, **JIT)
def forward_eval_rows(x, center, scale, shift, y):
    """``y = (x - center[c]) * scale[c] + shift[c]`` on channels-last ``(R, C)`` rows.

    >>> x = np.ones((3, 2))
    >>> y = np.empty_like(x)
    >>> forward_eval_rows(x, np.zeros(2), np.array([2.0, 3.0]), np.array([0.5, -1.0]), y)
    >>> y.tolist()
    [[2.5, 2.0], [2.5, 2.0], [2.5, 2.0]]
    """
    for r in prange(x.shape[0]):
        _affine_rows(x, r, r + 1, center, scale, shift, y)


@njit(**JIT)
def finish_moments(partial, pivot, m, mean, m2):
    """Phase ``stats`` from per-chunk shifted sums: ``mean = pivot + S1/m`` and
    ``M2 = S2 - S1**2/m`` (clamped at 0 against rounding, NaN kept), both float64."""
    total = merge(partial)
    for c in range(total.shape[1]):
        d_mean = total[0, c] / m
        v = total[1, c] - total[0, c] * d_mean
        if v < 0.0:
            v = 0.0
        mean[c] = np.float64(pivot[c]) + d_mean
        m2[c] = v


@njit(parallel=True, **JIT)
def stats_ncl(x, mean, m2, n_chunks):
    """Phase ``stats`` of a contiguous ``(N, C, L)`` array, streamed as in
    :func:`forward_train_ncl`; ``mean`` and ``m2`` are float64 ``(C,)`` outputs.

    >>> mean, m2 = np.empty(3), np.empty(3)
    >>> stats_ncl(np.arange(12.0).reshape(2, 3, 2), mean, m2, 4)
    >>> mean.tolist(), m2.tolist()
    ([3.5, 5.5, 7.5], [37.0, 37.0, 37.0])
    """
    pivot = x[0, :, 0].astype(np.float64)
    finish_moments(partial_sums_ncl(x, pivot, n_chunks), pivot, x.shape[0] * x.shape[2], mean,
                   m2)


@njit(parallel=True, **JIT)
def stats_rows(x, mean, m2, n_chunks):
    """Phase ``stats`` of channels-last ``(R, C)`` rows, streamed as in
    :func:`forward_train_rows`.

    >>> mean, m2 = np.empty(3), np.empty(3)
    >>> stats_rows(np.arange(12.0).reshape(4, 3), mean, m2, 3)
    >>> mean.tolist(), m2.tolist()
    ([4.5, 5.5, 6.5], [45.0, 45.0, 45.0])
    """
    pivot = x[0].astype(np.float64)
    finish_moments(partial_sums_rows(x, pivot, n_chunks), pivot, x.shape[0], mean, m2)


@njit(**JIT)
def update_running_stats(running_mean, running_var, count, mean, var, bessel, momentum,
                         cumulative):
    """The running-estimate update of ``batchnorm.kernels.eager.update_running_stats``, in place.

    ``running = running + factor * (batch - running)`` in float64, rounded once into the
    running arrays' dtype, with ``var * bessel`` (``bessel = m / (m - 1)``) as the batch's
    variance. ``factor`` is ``momentum``, or ``1 / count`` after counting this batch when
    ``cumulative`` (the cumulative average). ``count`` is a 1-element int64 array, or empty
    when the layer keeps no counter. A batch with any non-finite statistic (or a NaN
    ``bessel``, for a single value) changes nothing.

    >>> rm, rv, count = np.zeros(2), np.ones(2), np.array([1])
    >>> update_running_stats(rm, rv, count, np.array([2.0, 4.0]), np.ones(2), 2.0, 0.0, True)
    >>> rm.tolist(), rv.tolist(), count.tolist()
    ([1.0, 2.0], [1.5, 1.5], [2])
    """
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(np.float64(var[c]) * bessel)):
            return
    if count.shape[0] > 0:
        count[0] += 1
    factor = momentum
    if cumulative:
        factor = 1.0 / max(count[0], 1)
    for c in range(mean.shape[0]):
        old_mean, old_var = np.float64(running_mean[c]), np.float64(running_var[c])
        running_mean[c] = old_mean + factor * (np.float64(mean[c]) - old_mean)
        running_var[c] = old_var + factor * (np.float64(var[c]) * bessel - old_var)
