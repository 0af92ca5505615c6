"""The ``"triton"`` backend: batch normalization on CUDA tensors by fused Triton kernels.

The phases and fast paths of ``batchnorm.kernels`` with the signatures of
``batchnorm.kernels.eager`` (the specification), on the canonical ``(N, C, L)`` view, read and
written in place in either layout. The kernels and their math are in
``batchnorm.kernels.triton_forward`` (forward, running statistics) and
``batchnorm.kernels.triton_backward`` (gradients); each call's path (channel-resident, looped
or split), tile and grid come from ``batchnorm.kernels.triton_plan``. The phases ``stats`` and
``grad_sums`` run the split path's first launch and merge its partial sums per channel in a
fixed order; ``grad_input`` runs the split path's second launch on sums given from outside.

Nothing here synchronizes with the host or allocates by data (CUDA-graph safe). Triton is
imported on first use only. On CPU tensors the kernels run under Triton's interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before the kernel modules are first imported.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from batchnorm.kernels import eager, triton_plan
from batchnorm.kernels.triton_plan import Config, View, pow2, view_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_ELEMENTS = 2**31 - 1  # the kernels index with int32 offsets


_available: bool | None = None  # whether triton imports, once known


@torch.compiler.assume_constant_result  # torch.compile calls it once instead of tracing it
def available() -> bool:
    """Whether Triton can be imported (imported here, once per process).

    >>> isinstance(available(), bool)
    True
    """
    global _available
    if _available is None:
        try:
            import triton  # noqa: F401
            _available = True
        except ImportError:
            _available = False
    return _available


def _kernels():
    from batchnorm.kernels import triton_forward

    return triton_forward


def _backward_kernels():
    from batchnorm.kernels import triton_backward

    return triton_backward


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when the kernel modules were imported); only then can they take CPU tensors."""
    kernels = (_kernels().eval_kernel, _backward_kernels().grad_input_kernel)
    return all(type(k).__name__ == "InterpretedFunction" for k in kernels)


def supports(x3: Tensor, residual3: Tensor | None, relu: bool) -> bool:
    """Whether this call runs here: float16/bfloat16/float32/float64 input of fewer than 2**31
    elements in either layout, on a CUDA device (or on the CPU under the interpreter).

    >>> supports(torch.zeros(2, 3, 4, dtype=torch.int64), None, False)
    False
    """
    if not available() or x3.dim() != 3 or x3.dtype not in DTYPES:
        return False
    if not 0 < x3.numel() <= _MAX_ELEMENTS or view_of(x3) is None:
        return False
    if residual3 is not None and (residual3.shape[:2] != x3.shape[:2] or residual3.device
                                  != x3.device or residual3.numel() != x3.numel()):
        return False  # (N, C, ...) of x3's size: the residual may come before its (N, C, L) view
    if x3.device.type == "cuda":
        return True
    return x3.device.type == "cpu" and interpreted()


def _config(config: Config | None) -> Config:
    return config or triton_plan.DEFAULT


def _checked_view(x3: Tensor) -> View:
    view = view_of(x3) if x3.dim() == 3 else None
    if view is None or x3.dtype not in DTYPES or not 0 < x3.numel() <= _MAX_ELEMENTS:
        raise ValueError(
            f"the triton backend takes a non-empty (N, C, L) {'/'.join(map(str, DTYPES))} "
            f"tensor of fewer than 2**31 elements, contiguous or channels-last; got "
            f"{x3.dtype} of shape {tuple(x3.shape)} and strides {x3.stride()}; check "
            "supports() first, or use the eager backend")
    return view


def _empty_like(x3: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor with exactly ``x3``'s strides, so one view addresses both."""
    return torch.empty_strided(x3.shape, x3.stride(), dtype=dtype or x3.dtype, device=x3.device)


def _matched(t: Tensor | None, x3: Tensor, view: View) -> Tensor | None:
    """``t`` itself when the kernels can address it with ``x3``'s view, else a copy that can."""
    if t is None or view_of(t) == view:
        return t
    return _empty_like(x3, t.dtype).copy_(t)


def _output(out: Tensor | None, x3: Tensor) -> Tensor:
    """``out`` when it has ``x3``'s shape, strides and dtype (an error otherwise), or a new
    tensor that has them."""
    if out is None:
        return _empty_like(x3)
    if out.shape != x3.shape or out.stride() != x3.stride() or out.dtype != x3.dtype:
        raise ValueError(f"out must have the input's shape, strides and dtype, got "
                         f"{tuple(out.shape)} {out.stride()} {out.dtype} for {tuple(x3.shape)} "
                         f"{x3.stride()} {x3.dtype}")
    return out


def _vector(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _hi_lo(value: float) -> tuple[float, float]:
    """``value`` as float32 ``hi + lo`` (scalar kernel arguments are float32; float64 kernels
    add the two back to about 48 bits)."""
    hi = float(np.float32(value))
    return hi, value - hi


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _split_plan(view: View, x3: Tensor, streams: int, config: Config | None):
    return triton_plan.plan(view, x3.element_size(), streams, x3.device,
                            replace(_config(config), path="split"))


def stats(x3: Tensor, *, config: Config | None = None) -> tuple[int, Tensor, Tensor]:
    """Phase ``stats`` as ``eager.stats``: ``(count, mean, M2)``, float64.

    The split path's partial shifted sums ``S1 = sum(x - s)`` and ``S2 = sum((x - s)**2)``,
    merged per channel by torch's (deterministic) sum; then ``mean = s + S1/m`` and
    ``M2 = S2 - S1**2/m`` in float64.
    """
    view = _checked_view(x3)
    plan = _split_plan(view, x3, 1, config)
    acc = eager.acc_dtype(x3.dtype)
    part = x3.new_empty((2, view.c, plan.programs), dtype=acc)
    _kernels().stats_partial_kernel[(plan.blocks, plan.programs)](
        x3, part, view.n, view.c, view.l, view.s_n, view.s_c, plan.per, plan.programs,
        ACC=_tl_acc(acc), **plan.consts())
    s1, s2 = part.sum(-1).double()
    m = view.n * view.l
    d_mean = s1 / m
    m2 = torch.clamp(s2 - s1 * d_mean, min=0)  # rounding only; NaN stays NaN
    return m, eager.pivot(x3).double() + d_mean, m2


def forward_train(
    x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    residual3: Tensor | None = None, relu: bool = False, *, out: Tensor | None = None,
    config: Config | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1, fused, as ``eager.forward_train``: ``(y3, mean, rstd, var)``; ``y3`` into
    ``out`` when given (``x3`` itself for in-place ABN).

    ``config`` (default ``triton_plan.DEFAULT``) overrides the launch heuristics, e.g. to force
    a path.
    """
    view = _checked_view(x3)
    plan = triton_plan.plan(view, x3.element_size(), 1, x3.device, _config(config))
    kernels, acc = _kernels(), eager.acc_dtype(x3.dtype)
    if out is not None and plan.path == "split":
        # The split path's programs each read the pivot x[0, c, 0], which one of them may
        # already have overwritten: into its own input, statistics first, then the map.
        count, mean64, m2 = stats(x3, config=config)
        var = (m2 / count).to(acc)
        rstd = torch.rsqrt(m2 / count + eps)
        center = eager.pivot(x3).clone()
        scale, shift = eager.affine(weight, bias, mean64, rstd, center)
        forward_eval(x3, scale.to(acc), shift.to(acc), residual3, relu, center, out=out,
                     config=config)
        return out, mean64.to(acc), rstd.to(acc), var
    y3 = _output(out, x3)
    residual3 = _matched(residual3, x3, view)
    mean, rstd, var = (x3.new_empty((view.c,), dtype=acc) for _ in range(3))
    weight, bias = _vector(weight), _vector(bias)
    eps_hi, eps_lo = _hi_lo(eps)
    args = (x3, y3, x3 if residual3 is None else residual3,
            x3 if weight is None else weight, x3 if bias is None else bias)
    sizes = (view.n, view.c, view.l, view.s_n, view.s_c)
    flags = {"HAS_W": weight is not None, "HAS_B": bias is not None,
             "HAS_RES": residual3 is not None, "RELU": bool(relu), "ACC": _tl_acc(acc),
             **plan.consts()}
    if plan.path == "split":
        part = x3.new_empty((2, view.c, plan.programs), dtype=acc)
        grid = (plan.blocks, plan.programs)
        kernels.stats_partial_kernel[grid](
            x3, part, *sizes, plan.per, plan.programs, ACC=flags["ACC"], **plan.consts())
        kernels.normalize_kernel[grid](
            *args, part, mean, rstd, var, *sizes, eps_hi, eps_lo, plan.per, plan.programs,
            BG=plan.merge_rows, **flags)
    else:
        kernels.forward_channel_kernel[(plan.programs,)](
            *args, mean, rstd, var, *sizes, eps_hi, eps_lo, plan.blocks, plan.units,
            RESIDENT=plan.path == "resident", **flags)
    return y3, mean, rstd, var


def forward_eval(
    x3: Tensor, scale: Tensor, shift: Tensor, residual3: Tensor | None = None,
    relu: bool = False, center: Tensor | None = None, *, out: Tensor | None = None,
    config: Config | None = None,
) -> Tensor:
    """Phase ``forward_eval``: ``relu((x - center) * scale + shift + residual)``, into ``out``
    when given (``x3`` itself for in-place ABN, or a tensor of its strides)."""
    view = _checked_view(x3)
    plan = triton_plan.elementwise_plan(view, x3.element_size(), _config(config))
    y3 = _output(out, x3)
    residual3 = _matched(residual3, x3, view)
    acc = torch.promote_types(scale.dtype, eager.acc_dtype(x3.dtype))
    _kernels().eval_kernel[(plan.blocks, plan.programs)](
        x3, y3, x3 if residual3 is None else residual3, _vector(scale), _vector(shift),
        scale if center is None else _vector(center), view.n, view.c, view.l, view.s_n,
        view.s_c, plan.per, HAS_RES=residual3 is not None, RELU=bool(relu),
        HAS_CENTER=center is not None, ACC=_tl_acc(acc), **plan.consts())
    return y3


_ACTIVATION_BLOCK = 1024  # values per program of the elementwise activation kernels


def _activation_kernels():
    from batchnorm.kernels import triton_activation

    return triton_activation


def activate(z3: Tensor, residual3: Tensor | None, activation: str, param: float) -> Tensor:
    """Phase ``activate`` as ``eager.activate``: ``z = act(z + residual)`` in place, one
    elementwise launch."""
    view = _checked_view(z3)
    residual3 = _matched(residual3, z3, view)
    grid = (-(-z3.numel() // _ACTIVATION_BLOCK),)
    _activation_kernels().activate_kernel[grid](
        z3, z3 if residual3 is None else residual3, z3.numel(), float(param),
        BLOCK=_ACTIVATION_BLOCK, KIND=eager.INVERTIBLE[activation],
        HAS_RES=residual3 is not None, ACC=_tl_acc(eager.acc_dtype(z3.dtype)))
    return z3


def invert_activation(z3: Tensor, dz3: Tensor, residual3: Tensor | None, activation: str,
                      param: float) -> tuple[Tensor, Tensor]:
    """Phase ``invert_activation`` as ``eager.invert_activation``: ``(y, dy)`` in the
    accumulation dtype and ``z3``'s strides, one elementwise launch."""
    view = _checked_view(z3)
    dz3, residual3 = _matched(dz3, z3, view), _matched(residual3, z3, view)
    acc = eager.acc_dtype(z3.dtype)
    y3, dy3 = _empty_like(z3, acc), _empty_like(z3, acc)
    grid = (-(-z3.numel() // _ACTIVATION_BLOCK),)
    _activation_kernels().invert_activation_kernel[grid](
        z3, dz3, z3 if residual3 is None else residual3, y3, dy3, z3.numel(), float(param),
        eager.elu_floor(acc), BLOCK=_ACTIVATION_BLOCK, KIND=eager.INVERTIBLE[activation],
        HAS_RES=residual3 is not None, ACC=_tl_acc(acc))
    return y3, dy3


def _grad_launch(dy3, x3, y3, mean, rstd, weight, need_dx, training, plan, view):
    """The arguments the gradient kernels share: ``(inputs, sizes, flags)``."""
    weight = _vector(weight)
    inputs = (dy3, x3, x3 if y3 is None else y3, _vector(mean), _vector(rstd),
              x3 if weight is None else weight)
    sizes = (view.n, view.c, view.l, view.s_n, view.s_c)
    dx_pass = 0 if not need_dx else 2 if training else 1  # dx after the sums, or with them
    flags = {"RELU": y3 is not None, "HAS_W": weight is not None, "DX_PASS": dx_pass,
             "ACC": _tl_acc(mean.dtype), **plan.consts()}
    return inputs, sizes, flags


def grad_sums(dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor, rstd: Tensor, *,
              config: Config | None = None) -> tuple[Tensor, Tensor]:
    """Phase ``grad_sums``: ``(sum(dz), sum(dz * x_hat))`` in ``mean``'s dtype, from the split
    path's partial sums merged by torch's (deterministic) sum."""
    view = _checked_view(x3)
    plan = _split_plan(view, x3, 2 if y3 is None else 3, config)
    dy3, y3 = _matched(dy3, x3, view), _matched(y3, x3, view)
    inputs, sizes, flags = _grad_launch(dy3, x3, y3, mean, rstd, None, False, False, plan, view)
    part = x3.new_empty((2, view.c, plan.programs), dtype=mean.dtype)
    _backward_kernels().grad_partial_kernel[(plan.blocks, plan.programs)](
        *inputs, part, x3, x3, *sizes, plan.per, plan.programs, NEED_DRES=False, **flags)
    s_dz, s_dz_x_hat = part.sum(-1)
    return s_dz, s_dz_x_hat


def grad_input(
    dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, mean_dz: Tensor | None, mean_dz_x_hat: Tensor | None,
    need_dres: bool = False, *, config: Config | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Phase ``grad_input``: ``dx = weight * rstd * (dz - mean_dz - x_hat * mean_dz_x_hat)``
    (``weight * rstd * dz`` when ``mean_dz`` is ``None``), and ``dres = dz`` when asked.

    The split path's second launch, which divides merged sums by the local count ``N * L``:
    it is handed the means times that count, as one partial per channel.
    """
    view = _checked_view(x3)
    plan = _split_plan(view, x3, 2 if y3 is None else 3, config)
    dy3, y3 = _matched(dy3, x3, view), _matched(y3, x3, view)
    training = mean_dz is not None
    inputs, sizes, flags = _grad_launch(dy3, x3, y3, mean, rstd, weight, True, True, plan, view)
    m = view.n * view.l
    if training:
        part = torch.stack([mean_dz, mean_dz_x_hat]).to(mean.dtype).mul_(m).unsqueeze(-1)
    else:
        part = mean.new_zeros((2, view.c, 1))  # no path through the statistics: zero means
    dx3 = _empty_like(x3)
    scratch = mean.new_empty((2, view.c))
    _backward_kernels().grad_input_kernel[(plan.blocks, plan.programs)](
        *inputs, part.contiguous(), dx3, scratch[0], scratch[1], *sizes, plan.per, 1, BG=1,
        **flags)
    dres3 = None
    if need_dres:
        dres3 = dy3 if y3 is None else torch.where(y3 <= 0, torch.zeros_like(dy3), dy3)
        dres3 = _empty_like(x3).copy_(dres3)
    return dx3, dres3


def backward(
    dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, training: bool, need_dx: bool = True, need_dres: bool = False,
    *, config: Config | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Closed-form gradients, fused, as ``eager.backward``: ``(dx3, dweight, dbias, dres3)``."""
    view = _checked_view(x3)
    plan = triton_plan.plan(view, x3.element_size(), 2 if y3 is None else 3, x3.device,
                            _config(config))
    kernels = _backward_kernels()
    dy3, y3 = _matched(dy3, x3, view), _matched(y3, x3, view)
    dx3 = _empty_like(x3) if need_dx else None
    dres3 = _empty_like(x3) if need_dres else None
    dweight, dbias = mean.new_empty(mean.shape), mean.new_empty(mean.shape)
    inputs, sizes, flags = _grad_launch(dy3, x3, y3, mean, rstd, weight, need_dx, training,
                                        plan, view)
    dx_arg = x3 if dx3 is None else dx3
    dres_arg = x3 if dres3 is None else dres3
    if plan.path == "split":
        part = x3.new_empty((2, view.c, plan.programs), dtype=mean.dtype)
        kernels.grad_partial_kernel[(plan.blocks, plan.programs)](
            *inputs, part, dx_arg, dres_arg, *sizes, plan.per, plan.programs,
            NEED_DRES=need_dres, **flags)
        kernels.grad_input_kernel[(plan.blocks, plan.programs if flags["DX_PASS"] == 2 else 1)](
            *inputs, part, dx_arg, dweight, dbias, *sizes, plan.per, plan.programs,
            BG=plan.merge_rows, **flags)
    else:
        kernels.backward_channel_kernel[(plan.programs,)](
            *inputs, dx_arg, dres_arg, dweight, dbias, *sizes, plan.blocks, plan.units,
            RESIDENT=plan.path == "resident", NEED_DRES=need_dres, **flags)
    return dx3, dweight, dbias, dres3


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, m: int | Tensor, momentum: float | None,
) -> None:
    """Phase ``update_running_stats`` in one launch of one program: the rule and guard of
    ``eager.update_running_stats`` (a batch with any non-finite statistic changes nothing, the
    counter included), decided on the device. A count held in a tensor (merged across
    processes, on the device) goes to the eager function, which keeps it there."""
    if isinstance(m, Tensor):
        eager.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                   m, momentum)
        return
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if m < 2:
        return  # no unbiased variance from a single value: nothing changes, as in eager
    vectors = (running_mean, running_var, mean, var)
    if not all(v.is_contiguous() for v in vectors):
        raise ValueError("running_mean, running_var, mean and var must be contiguous (C,) "
                         "tensors; pass .contiguous() copies")
    acc = torch.float64 if torch.float64 in (running_mean.dtype, mean.dtype) else torch.float32
    bessel_hi, bessel_lo = _hi_lo(m / (m - 1))
    momentum_hi, momentum_lo = _hi_lo(0.0 if momentum is None else momentum)
    channels = mean.numel()
    _kernels().update_running_kernel[(1,)](
        running_mean, running_var,
        running_mean if num_batches_tracked is None else num_batches_tracked, mean, var,
        channels, bessel_hi, bessel_lo, momentum_hi, momentum_lo,
        BC=min(pow2(channels), 1024), HAS_COUNT=num_batches_tracked is not None,
        CUMULATIVE=momentum is None, ACC=_tl_acc(acc), num_warps=4)
