"""Compiled CPU kernels (numba) of the batch-norm backward: two sums in one pass, then ``dx``.

The loop orders (``ncl`` and ``rows`` streamed in fixed chunks of rows, ``ncl_blocks`` in
cache-resident channel blocks), the chunked sums merged in chunk order, and the numerical rules
are those of ``batchnorm.kernels.numba_forward``.
With ``x_hat = (x - mean) * rstd``, ``a = weight * rstd`` and ``m = N * L`` values per channel:

    dbias   = sum(dy)
    dweight = sum(dy * x_hat) = rstd * sum(dy * (x - mean))
    dx      = a * (dy - dbias / m - x_hat * dweight / m)           (training)
            = a * dy + b * (x - mean) + c0,   b = -a * rstd * dweight / m,  c0 = -a * dbias / m
    dx      = a * dy                                                (inference)

The two sums read ``x`` and ``dy`` once, in float64; ``dx`` is a second pass in the input's
dtype, where ``x - mean`` cancels exactly for values near the mean. In inference ``x`` does
not enter ``dx`` at all, so an inf in ``x`` leaves it finite, as in the eager specification.
"""

from __future__ import annotations

import numpy as np

# numba's on-disk cache keys a kernel on its own file only: after editing a helper or constant
# imported from numba_forward, delete batchnorm/kernels/__pycache__ so this file's kernels
# rebuild.
from batchnorm.kernels.numba_forward import (
    JIT,
    SUM_FLAGS,
    chunk,
    merge,
    njit,
    prange,
    quarters,
)


@njit(fastmath=SUM_FLAGS, **JIT)
def grad_sums(dy, x, mu):
    """``(sum(dy), sum(dy * (x - mu)))`` over 1-D arrays, in float64."""
    s_dy = 0.0
    s_dyx = 0.0
    for i in range(x.shape[0]):
        g = np.float64(dy[i])
        s_dy += g
        s_dyx += g * (np.float64(x[i]) - mu)
    return s_dy, s_dyx


@njit(**JIT)
def grad_input(dy, x, mean, a, b, c0, training, dx):
    """``dx = a * dy + b * (x - mean) + c0`` (training) or ``a * dy`` over 1-D arrays."""
    if training:
        for i in range(x.shape[0]):
            dx[i] = dy[i] * a + (x[i] - mean) * b + c0
    else:
        for i in range(x.shape[0]):
            dx[i] = dy[i] * a


@njit(**JIT)
def coefficients(s_dy, s_dyx, m, mean, rstd, weight):
    """``(dweight, a, b, c0)`` of the module docstring from the two sums of one channel."""
    r = np.float64(rstd)
    a = weight * r
    dweight = s_dyx * r
    return dweight, a, -a * r * dweight / m, -a * s_dy / m


@njit(**JIT)
def finish_grads(partial, m, mean, rstd, weight, dweight, dbias, coef):
    """Merge per-chunk sums in chunk order; fill ``coef = (mean, a, b, c0)`` in its dtype."""
    total = merge(partial)
    for c in range(total.shape[1]):
        dbias[c] = total[0, c]
        dweight[c], coef[1, c], coef[2, c], coef[3, c] = coefficients(
            total[0, c], total[1, c], m, mean[c], rstd[c], weight[c])
        coef[0, c] = mean[c]


@njit(**JIT)
def finish_block(sums, c0, c1, m, mean, rstd, weight, dweight, dbias, coef):
    """A channel block's ``sums[0 or 1, c - c0]`` into ``dbias``, ``dweight`` and
    ``coef = (mean, a, b, c0)`` for channels ``[c0, c1)``."""
    for c in range(c0, c1):
        dbias[c] = sums[0, c - c0]
        dweight[c], coef[1, c], coef[2, c], coef[3, c] = coefficients(
            sums[0, c - c0], sums[1, c - c0], m, mean[c], rstd[c], weight[c])
        coef[0, c] = mean[c]


@njit(parallel=True, inline="always", **JIT)  # inlined as numba_forward.partial_sums_ncl
def partial_grad_sums_ncl(dy, x, mu, n_chunks):
    """Per-chunk ``(sum(dy), sum(dy * (x - mu)))`` of contiguous ``(N, C, L)`` arrays' ``N * C``
    rows, cut into ``n_chunks`` chunks: a ``(n_chunks, 2, C)`` float64 array."""
    channels = x.shape[1]
    rows = x.shape[0] * channels
    partial = np.empty((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        partial[k] = 0.0  # by the task that fills it: in parallel, and warm in its cache
        for i in range(start, stop):
            n, c = divmod(i, channels)
            t_dy, t_dyx = grad_sums(dy[n, c], x[n, c], mu[c])
            partial[k, 0, c] += t_dy
            partial[k, 1, c] += t_dyx
    return partial


@njit(parallel=True, **JIT)
def backward_ncl(dy, x, mean, rstd, weight, training, need_dx, dx, dweight, dbias, n_chunks):
    """Gradients on contiguous ``(N, C, L)`` arrays, as their ``N * C`` rows in memory order.

    Args:
        dy, x: ``(N, C, L)`` C-contiguous, one dtype.
        mean, rstd: ``(C,)`` saved statistics; weight: ``(C,)`` float64 (ones for none).
        training: whether ``dx`` flows through the batch statistics.
        need_dx: whether to write ``dx`` (an ``(N, C, L)`` array, else unused).
        dweight, dbias: ``(C,)`` outputs.
        n_chunks: how many chunks of consecutive rows to cut the ``N * C`` rows into.

    >>> x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> dy, dx, dw, db = np.ones_like(x), np.empty_like(x), np.empty(1), np.empty(1)
    >>> args = np.array([4.0]), np.array([0.5]), np.ones(1)
    >>> backward_ncl(dy, x, *args, True, True, dx, dw, db, 2)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([4.0], [0.0], [0.0, 0.0, 0.0, 0.0])
    >>> backward_ncl(x - 4.0, x, *args, False, True, dx, dw, db, 1)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([0.0], [10.0], [-1.5, -0.5, 0.5, 1.5])
    """
    n_batch, channels, length = x.shape
    rows = n_batch * channels
    partial = partial_grad_sums_ncl(dy, x, mean.astype(np.float64), n_chunks)
    coef = np.empty((4, channels), x.dtype)  # mean, a, b, c0 in x's dtype
    finish_grads(partial, n_batch * length, mean, rstd, weight, dweight, dbias, coef)
    if need_dx:
        for k in prange(n_chunks):
            start, stop = chunk(k, n_chunks, rows)
            for i in range(start, stop):
                n, c = divmod(i, channels)
                grad_input(dy[n, c], x[n, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                           training, dx[n, c])


@njit(parallel=True, **JIT)
def backward_ncl_blocks(dy, x, mean, rstd, weight, training, need_dx, dx, dweight, dbias, block):
    """Gradients on contiguous ``(N, C, L)`` arrays, one task per channel block, whose slices
    of ``dy`` and ``x`` are read for the sums and again, from the cache, for ``dx``. Arguments
    as :func:`backward_ncl`, but for ``block``, the channels per parallel task.

    >>> x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> dy, dx, dw, db = x - 4.0, np.empty_like(x), np.empty(1), np.empty(1)
    >>> args = np.array([4.0]), np.array([0.5]), np.ones(1)
    >>> backward_ncl_blocks(dy, x, *args, False, True, dx, dw, db, 1)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([0.0], [10.0], [-1.5, -0.5, 0.5, 1.5])
    """
    n_batch, channels, length = x.shape
    coef = np.empty((4, channels), x.dtype)  # mean, a, b, c0 in x's dtype
    for j in prange((channels + block - 1) // block):
        c0 = j * block
        c1 = min(c0 + block, channels)
        sums = np.zeros((2, c1 - c0))  # this task's own: no cache line shared with another
        for n in range(n_batch):
            for c in range(c0, c1):
                t_dy, t_dyx = grad_sums(dy[n, c], x[n, c], np.float64(mean[c]))
                sums[0, c - c0] += t_dy
                sums[1, c - c0] += t_dyx
        finish_block(sums, c0, c1, n_batch * length, mean, rstd, weight, dweight, dbias, coef)
        if need_dx:
            for n in range(n_batch):  # the block's slices again, from the cache
                for c in range(c0, c1):
                    grad_input(dy[n, c], x[n, c], coef[0, c], coef[1, c], coef[2, c],
                               coef[3, c], training, dx[n, c])


@njit(**JIT)
def _grad_sums_rows(dy, x, start, stop, mu, s_dy, s_dyx):
    """Add ``dy`` and ``dy * (x - mu)``, per channel, over rows ``[start, stop)``.

    Four rows per sweep, one from each quarter of the range, as
    ``numba_forward._shifted_sums_rows`` and for the same reasons.
    """
    q = quarters(start, stop)
    for r in range(start, start + q):
        g0, g1, g2, g3 = dy[r], dy[r + q], dy[r + 2 * q], dy[r + 3 * q]
        x0, x1, x2, x3 = x[r], x[r + q], x[r + 2 * q], x[r + 3 * q]
        for c in range(x0.shape[0]):
            m = mu[c]
            a0, a1 = np.float64(g0[c]), np.float64(g1[c])
            a2, a3 = np.float64(g2[c]), np.float64(g3[c])
            s_dy[c] += (a0 + a1) + (a2 + a3)
            s_dyx[c] += ((a0 * (np.float64(x0[c]) - m) + a1 * (np.float64(x1[c]) - m))
                         + (a2 * (np.float64(x2[c]) - m) + a3 * (np.float64(x3[c]) - m)))
    for i in range(start + 4 * q, stop):
        g_row = dy[i]
        x_row = x[i]
        for c in range(x_row.shape[0]):
            g = np.float64(g_row[c])
            s_dy[c] += g
            s_dyx[c] += g * (np.float64(x_row[c]) - mu[c])


@njit(**JIT)
def _grad_input_rows(dy, x, start, stop, coef, training, dx):
    """``dx`` over rows ``[start, stop)``; ``coef`` rows: mean, a, b, c0."""
    mean, a, b, c0 = coef[0], coef[1], coef[2], coef[3]
    for r in range(start, stop):
        g_row = dy[r]
        x_row = x[r]
        out = dx[r]
        if training:
            for c in range(x_row.shape[0]):
                out[c] = g_row[c] * a[c] + (x_row[c] - mean[c]) * b[c] + c0[c]
        else:
            for c in range(x_row.shape[0]):
                out[c] = g_row[c] * a[c]


@njit(parallel=True, inline="always", **JIT)
def partial_grad_sums_rows(dy, x, mu, n_chunks):
    """Per-chunk gradient sums, as :func:`partial_grad_sums_ncl`, of ``(R, C)`` rows."""
    rows, channels = x.shape
    partial = np.empty((n_chunks, 2, channels))
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, rows)
        partial[k] = 0.0  # by the task that fills it: in parallel, and warm in its cache
        _grad_sums_rows(dy, x, start, stop, mu, partial[k, 0], partial[k, 1])
    return partial


@njit(parallel=True, **JIT)
def backward_rows(dy, x, mean, rstd, weight, training, need_dx, dx, dweight, dbias, n_chunks):
    """Gradients on channels-last ``(R, C)`` rows: chunked partial sums, merge, then ``dx``.

    Arguments as :func:`backward_ncl`, with ``dy``, ``x`` and ``dx`` of shape ``(R, C)`` and
    ``1 <= n_chunks <= R``.

    >>> x = np.array([[1.0], [3.0], [5.0], [7.0]])
    >>> dy, dx, dw, db = x - 4.0, np.empty_like(x), np.empty(1), np.empty(1)
    >>> args = np.array([4.0]), np.array([0.5]), np.ones(1)
    >>> backward_rows(dy, x, *args, False, True, dx, dw, db, 3)
    >>> db.tolist(), dw.tolist(), dx.ravel().tolist()
    ([0.0], [10.0], [-1.5, -0.5, 0.5, 1.5])
    """
    rows, channels = x.shape
    partial = partial_grad_sums_rows(dy, x, mean.astype(np.float64), n_chunks)
    coef = np.empty((4, channels), x.dtype)  # mean, a, b, c0 in x's dtype
    finish_grads(partial, rows, mean, rstd, weight, dweight, dbias, coef)
    if need_dx:
        for k in prange(n_chunks):
            start, stop = chunk(k, n_chunks, rows)
            _grad_input_rows(dy, x, start, stop, coef, training, dx)


@njit(**JIT)
def finish_grad_sums(partial, rstd, s_dz, s_dz_x_hat):
    """Phase ``grad_sums`` from per-chunk sums: ``sum(dy)``, and ``rstd * sum(dy * (x - mu))``
    for ``sum(dy * x_hat)``."""
    total = merge(partial)
    for c in range(total.shape[1]):
        s_dz[c] = total[0, c]
        s_dz_x_hat[c] = total[1, c] * np.float64(rstd[c])


@njit(parallel=True, **JIT)
def grad_sums_ncl(dy, x, mean, rstd, s_dz, s_dz_x_hat, n_chunks):
    """Phase ``grad_sums`` on contiguous ``(N, C, L)`` arrays, streamed in ``n_chunks`` chunks.

    >>> x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> s_dz, s_dz_x_hat = np.empty(1), np.empty(1)
    >>> grad_sums_ncl(x - 4.0, x, np.array([4.0]), np.array([0.5]), s_dz, s_dz_x_hat, 2)
    >>> s_dz.tolist(), s_dz_x_hat.tolist()
    ([0.0], [10.0])
    """
    partial = partial_grad_sums_ncl(dy, x, mean.astype(np.float64), n_chunks)
    finish_grad_sums(partial, rstd, s_dz, s_dz_x_hat)


@njit(parallel=True, **JIT)
def grad_sums_rows(dy, x, mean, rstd, s_dz, s_dz_x_hat, n_chunks):
    """Phase ``grad_sums`` on channels-last ``(R, C)`` rows, streamed in ``n_chunks`` chunks."""
    partial = partial_grad_sums_rows(dy, x, mean.astype(np.float64), n_chunks)
    finish_grad_sums(partial, rstd, s_dz, s_dz_x_hat)


@njit(parallel=True, **JIT)
def grad_input_ncl(dy, x, coef, dx):
    """Phase ``grad_input`` on contiguous ``(N, C, L)`` arrays: ``dx = a * dy + b * (x - mean)
    + c0`` with ``coef`` rows ``mean, a, b, c0`` (module docstring), in x's dtype.

    >>> x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> dx = np.empty_like(x)
    >>> grad_input_ncl(np.ones_like(x), x, np.array([[4.0], [0.5], [0.0], [-0.5]]), dx)
    >>> dx.ravel().tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    n_batch, channels, _ = x.shape
    for i in prange(n_batch * channels):
        n, c = i // channels, i % channels
        grad_input(dy[n, c], x[n, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c], True,
                   dx[n, c])


@njit(parallel=True, **JIT)
def grad_input_rows(dy, x, coef, dx, n_chunks):
    """Phase ``grad_input`` on channels-last ``(R, C)`` rows, in ``n_chunks`` chunks."""
    for k in prange(n_chunks):
        start, stop = chunk(k, n_chunks, x.shape[0])
        _grad_input_rows(dy, x, start, stop, coef, True, dx)
