"""Triton kernels of batch normalization: statistics, normalization and running statistics.

Every kernel reads a tensor through one three-dimensional view ``(N, C, L)`` with element
``(n, c, l)`` at ``n * s_n + c * s_c + l``; the host (``batchnorm.kernels.triton_backend``) maps
both memory layouts onto it without a copy:

* contiguous ``(N, C, L)``: the view itself, ``s_n = C * L``, ``s_c = L``. A program owns one
  channel (``BC = 1``) and walks ``[BN, 1, BL]`` tiles of its ``N`` runs of ``L`` values.
* channels-last, or ``L == 1``: rows of ``C`` adjacent channels. The view is ``(N * L, C, 1)``
  with ``s_n`` the row stride and ``s_c = 1``; a program owns ``BC`` adjacent channels and walks
  ``[BN, BC, 1]`` tiles of whole rows.

A channel block's ``(n, l)`` tiles are its *units*, numbered row-major: unit ``u`` is tile
``(u // cdiv(L, BL), u % cdiv(L, BL))``. A unit past the end falls wholly under the mask.

Numerical decisions (the same as ``batchnorm.kernels.eager``):

* Accumulation in ``ACC`` (float32, or float64 for float64 input); outputs are rounded once.
* Every value is shifted by a pivot ``s = x[0, c, 0]`` before it is summed. Partial sums
  ``S1 = sum(x - s)`` and ``S2 = sum((x - s)**2)`` then merge by plain addition in a fixed
  order (no atomics: bitwise deterministic), and ``var = S2/m - (S1/m)**2`` only loses bits in
  proportion to ``((mean - s) / std)**2``, a sample's squared z-score, not ``(mean / std)**2``.
* The channel-resident path holds the whole slice in registers and takes the exact two-pass
  variance ``mean(((x - s) - (mean - s))**2)``.
* Outputs are normalized as ``((x - s) - (mean - s)) * rstd``: ``x - s`` is exact for values
  near the pivot, so the centring error is at the scale of the spread, not of the mean.

The gradient kernels, which share the helpers here, are in ``triton_backward``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unit(u, cb, N, C, L, s_n, s_c, BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr):
    """Offsets and mask of unit ``u`` of channel block ``cb``: a ``[BN, BC, BL]`` tile."""
    c = (cb * BC + tl.arange(0, BC))[None, :, None]
    if BL == 1:
        # Whole rows: no position term, so the compiler sees the rows' alignment and
        # contiguity along c and can issue vector loads.
        n = (u * BN + tl.arange(0, BN))[:, None, None]
        offs = n * s_n + c * s_c
        mask = (n < N) & (c < C)
    else:
        l_blocks = (L + BL - 1) // BL
        nb = u // l_blocks
        n = (nb * BN + tl.arange(0, BN))[:, None, None]
        ll = ((u - nb * l_blocks) * BL + tl.arange(0, BL))[None, None, :]
        offs = n * s_n + c * s_c + ll
        mask = (n < N) & (c < C) & (ll < L)
    return offs, mask


@triton.jit
def _sum3(t):
    """Per-channel sum of a ``[BN, BC, BL]`` tile: a ``[BC]`` vector."""
    return tl.sum(tl.sum(t, 2), 0)


@triton.jit
def _bc(v):
    """A per-channel ``[BC]`` vector broadcast against ``[BN, BC, BL]`` tiles."""
    return v[None, :, None]


@triton.jit
def _channel_vector(ptr, c, cmask, HAS: tl.constexpr, default, ACC: tl.constexpr):
    """``ptr[c]`` in ``ACC``, or ``default`` everywhere when the vector is absent."""
    if HAS:
        v = tl.load(ptr + c, mask=cmask, other=default).to(ACC)
    else:
        v = tl.full(c.shape, default, ACC)
    return v


@triton.jit
def _store_output(z, y_ptr, res_ptr, offs, mask, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """``y = relu(z + residual)`` in the accumulation dtype, rounded once into ``y``."""
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(z.dtype)
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamp_var(v):
    """``max(v, 0)`` against rounding below zero; a NaN stays NaN (GPU max would drop it)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def _first(cmask, g):
    """``cmask`` in program ``g == 0`` of a channel block, all false elsewhere."""
    return cmask & ((cmask.to(tl.int32) * 0 + g) == 0)  # a vector: the interpreter needs one


@triton.jit
def _affine(dmean, var, s, eps, c, cmask, w_ptr, b_ptr, mean_ptr, rstd_ptr, var_ptr, g,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """From ``dmean = mean - s`` and ``var``: ``(scale, bias)`` with ``y = (d - dmean) * scale +
    bias``; program ``g == 0`` of a channel block stores ``mean``, ``rstd`` and ``var``."""
    rstd = 1.0 / tl.sqrt(var + eps)
    keep = _first(cmask, g)
    tl.store(mean_ptr + c, s + dmean, mask=keep)
    tl.store(rstd_ptr + c, rstd, mask=keep)
    tl.store(var_ptr + c, var, mask=keep)
    scale = rstd * _channel_vector(w_ptr, c, cmask, HAS_W, 1.0, ACC)
    return scale, _channel_vector(b_ptr, c, cmask, HAS_B, 0.0, ACC)


@triton.jit
def _merge(part_ptr, c, cmask, C, G, BG: tl.constexpr, BC: tl.constexpr):
    """Sums of the ``G`` partials of each channel in ``part[2, C, G]``, ``BG`` at a time, in a
    fixed order."""
    first = tl.zeros([BG, BC], part_ptr.dtype.element_ty)
    second = tl.zeros([BG, BC], part_ptr.dtype.element_ty)
    for g0 in range(0, G, BG):
        g = g0 + tl.arange(0, BG)[:, None]
        offs = c[None, :] * G + g
        mask = cmask[None, :] & (g < G)
        first += tl.load(part_ptr + offs, mask=mask, other=0.0)
        second += tl.load(part_ptr + C * G + offs, mask=mask, other=0.0)
    return tl.sum(first, 0), tl.sum(second, 0)


# Training forward, channel per program. One program owns channel blocks cb = pid, pid + P, ...
# (P programs) and finishes each before the next, so its statistics need no other program.
#   RESIDENT: the block's whole slice is one tile, read once into registers:
#       d = x - s,  dmean = sum(d)/m,  var = sum((d - dmean)^2)/m  (two passes over registers),
#       y = relu((d - dmean) * rstd * weight + bias + residual).
#   otherwise: a first loop sums S1 = sum(d), S2 = sum(d^2) over the units,
#       dmean = S1/m, var = max(S2/m - dmean^2, 0); a second loop reads x again and normalizes.
#       P is kept small enough for the re-read to come from L2.
@triton.jit
def forward_channel_kernel(
    x_ptr,  # input, (N, C, L) in the view of the module docstring
    y_ptr,  # output, (N, C, L), same strides as x
    res_ptr,  # residual added before the ReLU, (N, C, L) same strides as x (if HAS_RES)
    w_ptr, b_ptr,  # weight and bias, (C,) (if HAS_W / HAS_B)
    mean_ptr, rstd_ptr, var_ptr,  # outputs: batch mean, 1/sqrt(var + eps), biased var; (C,) ACC
    N, C, L, s_n, s_c, eps_hi, eps_lo,  # sizes, strides; eps as float32 hi + lo for float64
    CB, UNITS,  # channel blocks, units per channel block
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr,
):
    m = N * L
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    for cb in range(tl.program_id(0), CB, tl.num_programs(0)):
        c = cb * BC + tl.arange(0, BC)
        cmask = c < C
        s = tl.load(x_ptr + c * s_c, mask=cmask, other=0.0).to(ACC)
        if RESIDENT:
            offs, mask = _unit(0, cb, N, C, L, s_n, s_c, BN, BC, BL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - _bc(s), 0.0)
            dmean = _sum3(d) / m
            centered = tl.where(mask, d - _bc(dmean), 0.0)
            var = _sum3(centered * centered) / m
            scale, bias = _affine(dmean, var, s, eps, c, cmask, w_ptr, b_ptr, mean_ptr,
                                  rstd_ptr, var_ptr, 0, HAS_W, HAS_B, ACC)
            z = centered * _bc(scale) + _bc(bias)
            _store_output(z, y_ptr, res_ptr, offs, mask, HAS_RES, RELU)
        else:
            sum1 = tl.zeros([BN, BC, BL], ACC)
            sum2 = tl.zeros([BN, BC, BL], ACC)
            for u in range(0, UNITS):
                offs, mask = _unit(u, cb, N, C, L, s_n, s_c, BN, BC, BL)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                d = tl.where(mask, x - _bc(s), 0.0)
                sum1 += d
                sum2 += d * d
            dmean = _sum3(sum1) / m
            var = _clamp_var(_sum3(sum2) / m - dmean * dmean)
            scale, bias = _affine(dmean, var, s, eps, c, cmask, w_ptr, b_ptr, mean_ptr,
                                  rstd_ptr, var_ptr, 0, HAS_W, HAS_B, ACC)
            for u in range(0, UNITS):
                offs, mask = _unit(u, cb, N, C, L, s_n, s_c, BN, BC, BL)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                z = ((x - _bc(s)) - _bc(dmean)) * _bc(scale) + _bc(bias)
                _store_output(z, y_ptr, res_ptr, offs, mask, HAS_RES, RELU)


# Training forward, split reduction, pass 1 of 2. Program (cb, g) sums its PER units
# u = g*PER ... g*PER + PER - 1 into per-lane accumulators, then stores one partial per channel:
#   part[0, c, g] = sum(x - s),  part[1, c, g] = sum((x - s)^2).
@triton.jit
def stats_partial_kernel(
    x_ptr,  # input, (N, C, L) in the view of the module docstring
    part_ptr,  # output: partial shifted sums, (2, C, G) ACC
    N, C, L, s_n, s_c, PER, G,  # sizes, strides, units per program, programs per channel block
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, ACC: tl.constexpr,
):
    cb = tl.program_id(0)
    g = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    s = tl.load(x_ptr + c * s_c, mask=cmask, other=0.0).to(ACC)
    sum1 = tl.zeros([BN, BC, BL], ACC)
    sum2 = tl.zeros([BN, BC, BL], ACC)
    for i in range(0, PER):
        offs, mask = _unit(g * PER + i, cb, N, C, L, s_n, s_c, BN, BC, BL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - _bc(s), 0.0)
        sum1 += d
        sum2 += d * d
    tl.store(part_ptr + c * G + g, _sum3(sum1), mask=cmask)
    tl.store(part_ptr + C * G + c * G + g, _sum3(sum2), mask=cmask)


# Training forward, split reduction, pass 2 of 2. Every program merges its channels' G partials
# in the same fixed order (so all agree bitwise), dmean = S1/m, var = max(S2/m - dmean^2, 0);
# programs g == 0 store mean, rstd and var; then each program normalizes its own units:
#   y = relu(((x - s) - dmean) * rstd * weight + bias + residual).
@triton.jit
def normalize_kernel(
    x_ptr,  # input, (N, C, L) in the view of the module docstring
    y_ptr,  # output, (N, C, L), same strides as x
    res_ptr,  # residual added before the ReLU, (N, C, L) same strides as x (if HAS_RES)
    w_ptr, b_ptr,  # weight and bias, (C,) (if HAS_W / HAS_B)
    part_ptr,  # partial shifted sums from stats_partial_kernel, (2, C, G) ACC
    mean_ptr, rstd_ptr, var_ptr,  # outputs: batch mean, 1/sqrt(var + eps), biased var; (C,) ACC
    N, C, L, s_n, s_c, eps_hi, eps_lo, PER, G,
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BG: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr,
):
    cb = tl.program_id(0)
    g = tl.program_id(1)
    m = N * L
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    s = tl.load(x_ptr + c * s_c, mask=cmask, other=0.0).to(ACC)
    sum1, sum2 = _merge(part_ptr, c, cmask, C, G, BG, BC)
    dmean = sum1 / m
    var = _clamp_var(sum2 / m - dmean * dmean)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    scale, bias = _affine(dmean, var, s, eps, c, cmask, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                          var_ptr, g, HAS_W, HAS_B, ACC)
    for i in range(0, PER):
        offs, mask = _unit(g * PER + i, cb, N, C, L, s_n, s_c, BN, BC, BL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = ((x - _bc(s)) - _bc(dmean)) * _bc(scale) + _bc(bias)
        _store_output(z, y_ptr, res_ptr, offs, mask, HAS_RES, RELU)


# The affine map of a batch norm with known statistics (Algorithm 2 folded into one FMA per
# value, or a training batch once its statistics are merged), program (cb, g) on its PER units:
#   y = relu((x - center[c]) * scale[c] + shift[c] + residual),   center = 0 unless HAS_CENTER.
@triton.jit
def eval_kernel(
    x_ptr,  # input, (N, C, L) in the view of the module docstring
    y_ptr,  # output, (N, C, L), same strides as x
    res_ptr,  # residual added before the ReLU, (N, C, L) same strides as x (if HAS_RES)
    scale_ptr, shift_ptr,  # weight * rstd and bias - (mean - center) * weight * rstd, (C,)
    center_ptr,  # the pivot subtracted first (x - center is exact near it), (C,) (if HAS_CENTER)
    N, C, L, s_n, s_c, PER,
    BN: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, HAS_CENTER: tl.constexpr, ACC: tl.constexpr,
):
    cb = tl.program_id(0)
    g = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC)
    center = _channel_vector(center_ptr, c, cmask, HAS_CENTER, 0.0, ACC)
    for i in range(0, PER):
        offs, mask = _unit(g * PER + i, cb, N, C, L, s_n, s_c, BN, BC, BL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = (x - _bc(center)) * _bc(scale) + _bc(shift)
        _store_output(z, y_ptr, res_ptr, offs, mask, HAS_RES, RELU)


@triton.jit
def _lerp_store(ptrs, target, f, mask, ACC: tl.constexpr):
    """``*ptrs = lerp(*ptrs, target, f)`` as torch.lerp: exact at ``f = 0`` and ``f = 1``."""
    start = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    diff = target.to(ACC) - start
    out = tl.where(f < 0.5, start + f * diff, target.to(ACC) - diff * (1.0 - f))
    tl.store(ptrs, out.to(ptrs.dtype.element_ty), mask=mask)


# Running statistics, one program, one launch, no host synchronization:
#   ok = every mean[c] and var[c] finite      (x - x is 0 exactly when x is finite)
#   count += ok;  f = momentum, or 1/max(count, 1) when CUMULATIVE
#   running_mean = ok ? lerp(running_mean, mean, f) : running_mean
#   running_var  = ok ? lerp(running_var, var * m/(m-1), f) : running_var
@triton.jit
def update_running_kernel(
    rmean_ptr, rvar_ptr,  # running mean and unbiased variance, (C,), updated in place
    count_ptr,  # num_batches_tracked, 0-dim int64, updated in place (if HAS_COUNT)
    mean_ptr, var_ptr,  # the batch's mean and biased variance, (C,)
    C, bessel_hi, bessel_lo, momentum_hi, momentum_lo,  # m/(m-1) and momentum, float32 hi + lo
    BC: tl.constexpr, HAS_COUNT: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):
    bad = tl.zeros([BC], tl.int32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        mean = tl.load(mean_ptr + c, mask=c < C, other=0.0).to(ACC)
        var = tl.load(var_ptr + c, mask=c < C, other=0.0).to(ACC)
        bad += tl.where(((mean - mean) == 0) & ((var - var) == 0), 0, 1)
    n_bad = tl.sum(bad, 0)
    if HAS_COUNT:
        count = tl.load(count_ptr) + (n_bad == 0).to(tl.int64)
        tl.store(count_ptr, count)
    if CUMULATIVE:
        f = 1.0 / tl.maximum(count, 1).to(ACC)
    else:
        f = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
    bessel = tl.cast(bessel_hi, ACC) + tl.cast(bessel_lo, ACC)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        keep = (c < C) & ((c * 0 + n_bad) == 0)  # a vector mask: the interpreter needs one
        _lerp_store(rmean_ptr + c, tl.load(mean_ptr + c, mask=keep, other=0.0), f, keep, ACC)
        var = tl.load(var_ptr + c, mask=keep, other=0.0).to(ACC) * bessel
        _lerp_store(rvar_ptr + c, var, f, keep, ACC)
