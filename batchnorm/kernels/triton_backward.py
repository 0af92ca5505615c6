"""Triton kernels of the batch-norm gradients (the closed form of ``eager.backward``).

They read tensors through the ``(N, C, L)`` view and the units of ``triton_forward`` (see its
docstring), with the same three paths: channel-resident, channel per program, and a split
reduction whose partial sums merge in a fixed order (bitwise deterministic). With ``dz`` the
gradient at the affine output (``dy``, masked by ``y > 0`` after a fused ReLU) and
``m = N * L`` values per channel::

    dbias   = sum(dz),   dweight = sum(dz * x_hat),   x_hat = (x - mean) * rstd
    dx      = weight * rstd * (dz - dbias/m - x_hat * dweight/m)   (training)
    dx      = weight * rstd * dz                                   (inference)
    dres    = dz

Sums accumulate in ``ACC`` (float32, or float64 for float64 statistics); outputs are rounded
once into their tensor's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton_forward import _bc, _channel_vector, _first, _merge, _sum3, _unit


@triton.jit
def _saved_statistics(mean_ptr, rstd_ptr, w_ptr, c, cmask, HAS_W: tl.constexpr,
                      ACC: tl.constexpr):
    """Channels ``c``'s saved mean and rstd, and ``scale = weight * rstd``, in ``ACC``."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0).to(ACC)
    return mean, rstd, rstd * _channel_vector(w_ptr, c, cmask, HAS_W, 1.0, ACC)


@triton.jit
def _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU: tl.constexpr,
               ACC: tl.constexpr):
    """``dz`` (``dy``, masked by ``y > 0`` after a ReLU) and ``x_hat`` on one tile; 0 off it."""
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        # d relu(u)/du = 0 where the output was clamped (y <= 0; a NaN output passes dy on).
        # Written with y > 0: the form `where(y <= 0, 0, dz)` crashes LLVM in some Triton builds.
        dz = tl.where(y > 0, dz, tl.where(y == y, 0.0, dz))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    # 0 off the tile: an infinite mean would otherwise put 0 * inf = NaN into the sums
    x_hat = tl.where(mask, (x - _bc(mean)) * _bc(rstd), 0.0)
    return dz, x_hat


@triton.jit
def _through_stats(dz, x_hat, dbias, dweight, m):
    """``dz`` less its paths through the batch mean and variance (training only)."""
    return dz - _bc(dbias / m) - x_hat * _bc(dweight / m)


@triton.jit
def _store_dx(g, scale, dx_ptr, offs, mask):
    """``dx = weight * rstd * g``, rounded once into ``dx``."""
    tl.store(dx_ptr + offs, (g * _bc(scale)).to(dx_ptr.dtype.element_ty), mask=mask)


# Backward, channel per program (blocks cb = pid, pid + P, ... as in forward_channel_kernel):
#   dbias = sum(dz),  dweight = sum(dz * x_hat),  dres = dz,
#   dx = weight * rstd * (dz - dbias/m - x_hat * dweight/m)   (DX_PASS == 2, training)
#   dx = weight * rstd * dz                                   (DX_PASS == 1, inference)
# RESIDENT reads dy and x once; otherwise training reads them again for dx after the sums.
@triton.jit
def backward_channel_kernel(
    dy_ptr, x_ptr,  # output gradient and input, (N, C, L) in the view of the module docstring
    y_ptr,  # forward output, (N, C, L), read for the ReLU mask (if RELU)
    mean_ptr, rstd_ptr,  # saved batch (or running) mean and 1/sqrt(var + eps), (C,) ACC
    w_ptr,  # weight, (C,) (if HAS_W)
    dx_ptr, dres_ptr,  # outputs: input and residual gradients, (N, C, L) strides of x
    dw_ptr, db_ptr,  # outputs: weight and bias gradients, (C,) ACC
    N, C, L, s_n, s_c, CB, UNITS,
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, RESIDENT: tl.constexpr,
    RELU: tl.constexpr, HAS_W: tl.constexpr, DX_PASS: tl.constexpr, NEED_DRES: tl.constexpr,
    ACC: tl.constexpr,
):
    m = N * L
    for cb in range(tl.program_id(0), CB, tl.num_programs(0)):
        c = cb * BC + tl.arange(0, BC)
        cmask = c < C
        mean, rstd, scale = _saved_statistics(mean_ptr, rstd_ptr, w_ptr, c, cmask, HAS_W, ACC)
        if RESIDENT:
            offs, mask = _unit(0, cb, N, C, L, s_n, s_c, BN, BC, BL)
            dz, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU, ACC)
            dbias = _sum3(dz)
            dweight = _sum3(dz * x_hat)
            if NEED_DRES:
                tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
            if DX_PASS == 1:
                _store_dx(dz, scale, dx_ptr, offs, mask)
            if DX_PASS == 2:
                _store_dx(_through_stats(dz, x_hat, dbias, dweight, m), scale, dx_ptr, offs, mask)
        else:
            sum1 = tl.zeros([BN, BC, BL], ACC)
            sum2 = tl.zeros([BN, BC, BL], ACC)
            for u in range(0, UNITS):
                offs, mask = _unit(u, cb, N, C, L, s_n, s_c, BN, BC, BL)
                dz, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU, ACC)
                sum1 += dz
                sum2 += dz * x_hat
                if NEED_DRES:
                    tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
                if DX_PASS == 1:
                    _store_dx(dz, scale, dx_ptr, offs, mask)
            dbias = _sum3(sum1)
            dweight = _sum3(sum2)
            if DX_PASS == 2:
                for u in range(0, UNITS):
                    offs, mask = _unit(u, cb, N, C, L, s_n, s_c, BN, BC, BL)
                    dz, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU,
                                           ACC)
                    g = _through_stats(dz, x_hat, dbias, dweight, m)
                    _store_dx(g, scale, dx_ptr, offs, mask)
        tl.store(db_ptr + c, dbias, mask=cmask)
        tl.store(dw_ptr + c, dweight, mask=cmask)


# Backward, split reduction, pass 1 of 2: program (cb, g) over its PER units stores
#   part[0, c, g] = sum(dz),  part[1, c, g] = sum(dz * x_hat),
# and the values that need no sums: dres = dz, and dx = weight * rstd * dz in inference.
@triton.jit
def grad_partial_kernel(
    dy_ptr, x_ptr,  # output gradient and input, (N, C, L) in the view of the module docstring
    y_ptr,  # forward output, (N, C, L), read for the ReLU mask (if RELU)
    mean_ptr, rstd_ptr,  # saved batch (or running) mean and 1/sqrt(var + eps), (C,) ACC
    w_ptr,  # weight, (C,) (if HAS_W)
    part_ptr,  # output: partial sums, (2, C, G) ACC
    dx_ptr, dres_ptr,  # outputs: input (if DX_PASS == 1) and residual gradients, strides of x
    N, C, L, s_n, s_c, PER, G,
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, RELU: tl.constexpr,
    HAS_W: tl.constexpr, DX_PASS: tl.constexpr, NEED_DRES: tl.constexpr, ACC: tl.constexpr,
):
    cb = tl.program_id(0)
    g = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    mean, rstd, scale = _saved_statistics(mean_ptr, rstd_ptr, w_ptr, c, cmask, HAS_W, ACC)
    sum1 = tl.zeros([BN, BC, BL], ACC)
    sum2 = tl.zeros([BN, BC, BL], ACC)
    for i in range(0, PER):
        offs, mask = _unit(g * PER + i, cb, N, C, L, s_n, s_c, BN, BC, BL)
        dz, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU, ACC)
        sum1 += dz
        sum2 += dz * x_hat
        if NEED_DRES:
            tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if DX_PASS == 1:
            _store_dx(dz, scale, dx_ptr, offs, mask)
    tl.store(part_ptr + c * G + g, _sum3(sum1), mask=cmask)
    tl.store(part_ptr + C * G + c * G + g, _sum3(sum2), mask=cmask)


# Backward, split reduction, pass 2 of 2: every program merges its channels' partials in the
# same fixed order into dbias and dweight (programs g == 0 store them); in training
# (DX_PASS == 2) each then writes dx = weight * rstd * (dz - dbias/m - x_hat * dweight/m)
# on its own units. Launched with one program per channel block when dx is not needed here.
@triton.jit
def grad_input_kernel(
    dy_ptr, x_ptr,  # output gradient and input, (N, C, L) in the view of the module docstring
    y_ptr,  # forward output, (N, C, L), read for the ReLU mask (if RELU)
    mean_ptr, rstd_ptr,  # saved batch mean and 1/sqrt(var + eps), (C,) ACC
    w_ptr,  # weight, (C,) (if HAS_W)
    part_ptr,  # partial sums from grad_partial_kernel, (2, C, G) ACC
    dx_ptr,  # output: input gradient, (N, C, L) strides of x (if DX_PASS == 2)
    dw_ptr, db_ptr,  # outputs: weight and bias gradients, (C,) ACC
    N, C, L, s_n, s_c, PER, G,
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BG: tl.constexpr,
    RELU: tl.constexpr, HAS_W: tl.constexpr, DX_PASS: tl.constexpr, ACC: tl.constexpr,
):
    cb = tl.program_id(0)
    g = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    dbias, dweight = _merge(part_ptr, c, cmask, C, G, BG, BC)
    tl.store(db_ptr + c, dbias, mask=_first(cmask, g))
    tl.store(dw_ptr + c, dweight, mask=_first(cmask, g))
    if DX_PASS == 2:
        m = N * L
        mean, rstd, scale = _saved_statistics(mean_ptr, rstd_ptr, w_ptr, c, cmask, HAS_W, ACC)
        for i in range(0, PER):
            offs, mask = _unit(g * PER + i, cb, N, C, L, s_n, s_c, BN, BC, BL)
            dz, x_hat = _grad_tile(dy_ptr, x_ptr, y_ptr, offs, mask, mean, rstd, RELU, ACC)
            _store_dx(_through_stats(dz, x_hat, dbias, dweight, m), scale, dx_ptr, offs, mask)
