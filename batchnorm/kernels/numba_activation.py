"""Compiled CPU kernels (numba) of in-place ABN's activation and its inverse.

Elementwise, on the flat memory of dense tensors that share one layout (contiguous or
channels-last: the order does not matter, only that every array has the same), in parallel
over fixed slices. The math is that of ``batchnorm.kernels.eager.activate`` and
``invert_activation``, with the activation by its code in ``eager.INVERTIBLE`` (0 identity,
1 leaky ReLU, 2 ELU) and its ``param`` in the arrays' dtype.
"""

from __future__ import annotations

import numpy as np

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
    for t in prange((n + SLICE - 1) // SLICE):
        for i in range(t * SLICE, min(n, (t + 1) * SLICE)):
            v = z[i]
            g = dz[i]
            u = v
            if v < 0:
                if kind == 1:
                    u = v / param
                    g = g * param
                elif kind == 2:
                    u = np.log1p(max(v / param, floor))
                    g = g * (v + param)
            if has_residual:
                u -= residual[i]
            y[i] = u
            dy[i] = g
