"""Triton kernels of in-place ABN's activation and its inverse (``eager.activate`` and
``eager.invert_activation``).

Elementwise over the flat memory of dense tensors that share one layout (contiguous or
channels-last), ``BLOCK`` values per program, in ``ACC`` (float32, or float64 for float64
input), rounded once into the output. ``KIND`` is the activation's code in
``eager.INVERTIBLE`` (0 identity, 1 leaky ReLU, 2 ELU). ``exp(u) - 1`` and ``log(1 + w)``
near 0 are taken as ``(v - 1) * u / log(v)`` with ``v = exp(u)`` and ``log(v) * w / (v - 1)``
with ``v = 1 + w``, which keep their relative precision where the plain forms cancel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _expm1(u):
    v = tl.exp(u)
    log_v = tl.log(v)
    safe = tl.where(log_v == 0.0, 1.0, log_v)  # the branch not taken must not divide by 0
    return tl.where(v == 1.0, u, tl.where(v - 1.0 == -1.0, -1.0, (v - 1.0) * u / safe))


@triton.jit
def _log1p(w):
    v = 1.0 + w
    safe = tl.where(v == 1.0, 1.0, v - 1.0)
    return tl.where(v == 1.0, w, tl.log(v) * w / safe)


# z = act(z + residual), in place:  leaky: u < 0 ? param * u : u;  elu: u < 0 ? param * expm1(u) : u
@triton.jit
def activate_kernel(
    z_ptr,  # the normalized values, overwritten by the activation's output; numel values
    res_ptr,  # residual added first, same layout as z (if HAS_RES)
    numel, param,  # values; the activation's slope or alpha (> 0)
    BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        u += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if KIND == 1:
        u = tl.where(u < 0, u * param, u)
    elif KIND == 2:
        u = tl.where(u < 0, param * _expm1(u), u)
    tl.store(z_ptr + offs, u.to(z_ptr.dtype.element_ty), mask=mask)


# With u = act^-1(z):  y = u - residual,  dy = dz * act'(u); where z < 0
#   leaky: u = z / param, act' = param;   elu: u = log1p(max(z / param, floor)), act' = z + param
@triton.jit
def invert_activation_kernel(
    z_ptr, dz_ptr,  # the activation's output and its gradient; numel values, one layout
    res_ptr,  # residual added before the activation, same layout (if HAS_RES)
    y_ptr, dy_ptr,  # outputs: the normalized values and their gradient, same layout, ACC
    numel, param, floor,  # values; slope or alpha (> 0); eager.elu_floor of ACC
    BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(ACC)
    below = z < 0
    if KIND == 1:
        u = tl.where(below, z / param, z)
        dz = tl.where(below, dz * param, dz)
    elif KIND == 2:
        u = tl.where(below, _log1p(tl.maximum(z / param, floor)), z)
        dz = tl.where(below, dz * (z + param), dz)
    else:
        u = z
    if HAS_RES:
        u -= tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + offs, u.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + offs, dz.to(dy_ptr.dtype.element_ty), mask=mask)
