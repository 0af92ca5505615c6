"""Compiled CPU kernels (numba) of in-place ABN's activation and its inverse.

Elementwise, on the flat memory of dense tensors that share one layout (contiguous or
channels-last: the order does not matter, only that every array has the same), in parallel
over fixed slices; and in-place ABN's whole backward on channel blocks, which inverts the
activation on the fly. The math is that of ``batchnorm.kernels.eager.activate`` and
``invert_activation``, with the activation by its code in ``eager.INVERTIBLE`` (0 identity,
1 leaky ReLU, 2 ELU) and its ``param`` in the arrays' dtype.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels.numba_backward import finish_block, grad_input, grad_sums
from batchnorm.kernels.numba_forward import JIT, njit, prange

SLICE = 1 << 14  # values per parallel task: long enough to stream, short enough to share


@njit(parallel=True, **JIT)
def activate(z, residual, has_residual, kind, param):
    """``z = act(z + residual)`` in place over a 1-D array (``residual`` read if
    ``has_residual``).

    >>> z = np.array([-2.0, 3.0])
    >>> activate(z, z[:0], False, 1, 0.5)
    >>> z.tolist()
    [-1.0, 3.0]
    """
    n = z.shape[0]
    for t in prange((n + SLICE - 1) // SLICE):
        for i in range(t * SLICE, min(n, (t + 1) * SLICE)):
            u = z[i]
            if has_residual:
                u += residual[i]
            if u < 0:
                if kind == 1:
                    u = u * param
                elif kind == 2:
                    u = param * np.expm1(u)
            z[i] = u


@njit(**JIT)
def invert_row(z, dz, residual, has_residual, kind, param, inv_param, floor, y, dy):
    """``y = act^-1(z) - residual`` and ``dy = dz * act'(act^-1(z))`` over 1-D arrays, one
    loop per activation (leaky ReLU's selects vectorize; ``inv_param = 1 / param``)."""
    n = z.shape[0]
    if kind == 1:
        for i in range(n):
            v = z[i]
            below = v < 0
            y[i] = v * inv_param if below else v
            dy[i] = dz[i] * param if below else dz[i]
    elif kind == 2:
        for i in range(n):
            v = z[i]
            if v < 0:
                y[i] = np.log1p(max(v * inv_param, floor))
                dy[i] = dz[i] * (v + param)
            else:
                y[i] = v
                dy[i] = dz[i]
    else:
        for i in range(n):
            y[i] = z[i]
            dy[i] = dz[i]
    if has_residual:
        for i in range(n):
            y[i] -= residual[i]


@njit(parallel=True, **JIT)
def invert_activation(z, dz, residual, has_residual, kind, param, floor, y, dy):
    """From ``z = act(y + residual)`` and ``dz`` over 1-D arrays: ``y = act^-1(z) - residual``
    and ``dy = dz * act'(act^-1(z))``; ``floor`` is ``eager.elu_floor``.

    >>> z = np.array([-1.0, 3.0])
    >>> y, dy = np.empty(2), np.empty(2)
    >>> invert_activation(z, np.ones(2), z[:0], False, 1, 0.5, -1.0, y, dy)
    >>> y.tolist(), dy.tolist()
    ([-2.0, 3.0], [0.5, 1.0])
    """
    n = z.shape[0]
    inv_param = 1 / param if kind != 0 else param
    for t in prange((n + SLICE - 1) // SLICE):
        a, b = t * SLICE, min(n, (t + 1) * SLICE)
        invert_row(z[a:b], dz[a:b], residual[a:b] if has_residual else residual, has_residual,
                   kind, param, inv_param, floor, y[a:b], dy[a:b])


@njit(parallel=True, **JIT)
def backward_ncl_blocks(z, dz, residual, has_residual, kind, param, floor, mean, rstd, weight,
                        training, need_dx, need_dres, dx, dres, dweight, dbias, block):
    """In-place ABN's backward in one kernel on contiguous ``(N, C, L)`` arrays: batch norm's
    gradients (``numba_backward.backward_ncl_blocks``, whose ``mean``, ``rstd`` and ``weight``
    these are) at the input ``y = act^-1(z) - residual`` with the gradient ``dy``, both
    recomputed run by run into a scratch row that stays in the cache, on each of the two
    passes, instead of being written out and read back. ``dx`` and ``dres = dy`` are written
    when asked (``residual``, ``dx`` and ``dres`` are placeholders otherwise).

    >>> z = np.array([[[-1.0, 3.0]], [[5.0, 7.0]]])
    >>> dx, dw, db = np.empty_like(z), np.empty(1), np.empty(1)
    >>> backward_ncl_blocks(z, z - 4.0, z, False, 0, 0.0, -1.0, np.array([4.0]),
    ...                     np.array([0.5]), np.ones(1), False, True, False, dx, z, dw, db, 1)
    >>> db.tolist(), dx.ravel().tolist()
    ([-2.0], [-2.5, -0.5, 0.5, 1.5])
    """
    n_batch, channels, length = z.shape
    inv_param = 1 / param if kind != 0 else param
    coef = np.empty((4, channels), z.dtype)  # mean, a, b, c0 in z's dtype
    for j in prange((channels + block - 1) // block):
        c0 = j * block
        c1 = min(c0 + block, channels)
        y, dy = np.empty(length, z.dtype), np.empty(length, z.dtype)  # this task's scratch
        sums = np.zeros((2, c1 - c0))  # this task's own: no cache line shared with another
        for n in range(n_batch):
            for c in range(c0, c1):
                invert_row(z[n, c], dz[n, c], residual[n, c], has_residual, kind, param,
                           inv_param, floor, y, dy)
                t_dy, t_dyx = grad_sums(dy, y, np.float64(mean[c]))
                sums[0, c - c0] += t_dy
                sums[1, c - c0] += t_dyx
        finish_block(sums, c0, c1, n_batch * length, mean, rstd, weight, dweight, dbias, coef)
        if need_dx or need_dres:
            for n in range(n_batch):  # the block's slices again, from the cache
                for c in range(c0, c1):
                    invert_row(z[n, c], dz[n, c], residual[n, c], has_residual, kind, param,
                               inv_param, floor, y, dy)
                    if need_dx:
                        grad_input(dy, y, coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                                   training, dx[n, c])
                    if need_dres:
                        dres[n, c, :] = dy
