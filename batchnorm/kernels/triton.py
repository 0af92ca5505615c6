"""The ``"triton"`` backend: batch normalization on CUDA tensors by fused Triton kernels.

Same functions and signatures as ``batchnorm._eager`` (the specification), on the canonical
``(N, C, L)`` view, read and written in place in either layout; the kernels and their math are
in ``batchnorm.kernels.triton_kernels`` (forward, running statistics) and
``batchnorm.kernels.triton_backward_kernels`` (gradients). Each call takes one of three paths
(``_plan``):

* ``"resident"``: a channel block's whole slice fits one tile, so each program reads it once,
  keeps it in registers for the statistics and writes the output: 2 passes over memory forward
  (x in, y out), 3 backward (dy and x in, dx out), one launch each.
* ``"looped"``: one program per channel block (persistent over the blocks) sums the slice,
  then reads it again to normalize; with few enough programs in flight the second read comes
  from L2. Taken when there are enough channel blocks to fill the GPU without splitting.
* ``"split"``: the slice is split over a grid of programs that store partial sums in a small
  workspace; a second launch merges them in a fixed order (no atomics: bitwise deterministic)
  and normalizes. Small ``C`` with large ``N * L`` still fills the GPU.

Nothing here synchronizes with the host or allocates by data (CUDA-graph safe). Triton is
imported on first use only. On CPU tensors the kernels run under Triton's interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before the kernel modules are first imported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PATHS = ("resident", "looped", "split")
_MAX_ELEMENTS = 2**31 - 1  # the kernels index with int32 offsets
_MAX_SPLIT = 1024  # most programs sharing one channel block on the split path
_MERGE = 4096  # most partial sums (G * BC) each split program merges: a few KB read from L2
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


@dataclass(frozen=True)
class Config:
    """Launch heuristics of the Triton backend (one commented default each).

    Args:
        tile_bytes: bytes of input a program loads per step. Default: ``16384`` (enough for a
            16-byte vector load per thread per tile row; small enough to leave registers free).
        row_bytes: width in bytes of a channel block in channels-last (rows) layout. Default:
            ``256`` (two 128-byte lines per row: coalesced, and many blocks for wide ``C``).
        resident_elems: most elements (padded to powers of two) of a channel block's slice
            that the resident path holds in registers. Default: ``16384`` (32 per thread at
            16 warps).
        programs_per_sm: programs per streaming multiprocessor that the split and looped
            paths aim for. Default: ``4`` (enough loads in flight to cover memory latency).
        path: force ``"resident"``, ``"looped"`` or ``"split"``; ``None`` chooses per call.
            Default: ``None``.

    Calls take ``config=``; without it they read the module's ``DEFAULT`` at call time, so
    assigning ``batchnorm.kernels.triton.DEFAULT = Config(...)`` tunes every call (benchmarks).

    >>> Config(path="split").tile_bytes
    16384
    """

    tile_bytes: int = 16384
    row_bytes: int = 256
    resident_elems: int = 16384
    programs_per_sm: int = 4
    path: str | None = None

    def __post_init__(self):
        for name in ("tile_bytes", "row_bytes", "resident_elems", "programs_per_sm"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.path is not None and self.path not in PATHS:
            raise ValueError(f"Config.path must be one of {PATHS} or None, got {self.path!r}")


DEFAULT = Config()


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (imported here, once per process).

    >>> isinstance(available(), bool)
    True
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from batchnorm.kernels import triton_kernels

    return triton_kernels


def _backward_kernels():
    from batchnorm.kernels import triton_backward_kernels

    return triton_backward_kernels


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when the kernel modules were imported); only then can they take CPU tensors."""
    kernels = (_kernels().eval_kernel, _backward_kernels().grad_input_kernel)
    return all(type(k).__name__ == "InterpretedFunction" for k in kernels)


@dataclass(frozen=True)
class _View:
    """A tensor as the kernels address it: element ``(n, c, l)`` at ``n*s_n + c*s_c + l``.

    ``rows`` marks channels-last (or ``L == 1``) input seen as ``(N*L, C, 1)`` rows.
    """

    n: int
    c: int
    l: int  # noqa: E741
    s_n: int
    s_c: int
    rows: bool


def _view(x3: Tensor) -> _View | None:
    """The kernels' view of ``x3``, or ``None`` when it is in neither layout. Size-1 dims may
    have any stride and rows may have gaps, but no two elements may share memory: outputs
    are allocated with ``x3``'s strides."""
    (n, c, span), (s_n, s_c, s_l) = x3.shape, x3.stride()
    if span == 1 and (s_c == 1 or c == 1) and (s_n >= c or n == 1):
        return _View(n, c, 1, s_n, 1, True)
    if s_l == 1 and (s_c == span or c == 1) and (s_n == c * span or n == 1):
        return _View(n, c, span, s_n, s_c, False)
    if (s_c == 1 or c == 1) and s_l >= c and (s_n == span * s_l or n == 1):
        return _View(n * span, c, 1, s_l, 1, True)
    return None


def supports(x3: Tensor, residual3: Tensor | None, relu: bool) -> bool:
    """Whether this call runs here: float16/bfloat16/float32/float64 input of fewer than 2**31
    elements in either layout, on a CUDA device (or on the CPU under the interpreter).

    >>> supports(torch.zeros(2, 3, 4, dtype=torch.int64), None, False)
    False
    """
    if not available() or x3.dim() != 3 or x3.dtype not in DTYPES:
        return False
    if not 0 < x3.numel() <= _MAX_ELEMENTS or _view(x3) is None:
        return False
    if residual3 is not None and (residual3.shape[:2] != x3.shape[:2] or residual3.device
                                  != x3.device or residual3.numel() != x3.numel()):
        return False  # (N, C, ...) of x3's size: the residual may come before its (N, C, L) view
    if x3.device.type == "cuda":
        return True
    return x3.device.type == "cpu" and interpreted()


@functools.cache
def _device_info(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a CUDA device; a small nominal GPU for the interpreter."""
    if device.type != "cuda":
        return 4, 4 << 20
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def _pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _warps(elements: int) -> int:
    return max(1, min(16, _pow2(elements) // 512))  # 8 warps for a 4096-element tile


@dataclass(frozen=True)
class _Plan:
    path: str
    tile: tuple[int, int, int]  # BN, BC, BL
    blocks: int  # channel blocks: C / BC, rounded up
    units: int  # tiles per channel block
    programs: int  # the grid of the channel-per-program paths; G per block on the split path
    per: int  # units per program on the split path

    @property
    def merge_rows(self) -> int:
        """Partials per channel that a split program adds per step: 2048 values in all."""
        return min(_pow2(self.programs), max(1, 2048 // self.tile[1]))

    @property
    def warps(self) -> int:
        return _warps(math.prod(self.tile))

    def consts(self) -> dict:
        return {"BN": self.tile[0], "BC": self.tile[1], "BL": self.tile[2],
                "num_warps": self.warps}


def _tile(view: _View, elem: int, cfg: Config, bc: int | None = None) -> tuple[int, int, int]:
    tile = max(1, cfg.tile_bytes // elem)
    if view.rows:
        bc = bc or min(_pow2(view.c), max(1, cfg.row_bytes // elem))
        return min(_pow2(view.n), max(1, tile // bc)), bc, 1
    bl = min(_pow2(view.l), max(2, tile))  # BL == 1 is the kernels' mark of rows
    return min(_pow2(view.n), max(1, tile // bl)), 1, bl


def _units(view: _View, tile: tuple[int, int, int]) -> int:
    return -(-view.n // tile[0]) * -(-view.l // tile[2])


@functools.lru_cache(maxsize=1024)  # plans depend on shapes only: keep them off the launch path
def _plan(view: _View, elem: int, streams: int, device: torch.device, cfg: Config) -> _Plan:
    """The path, tile and grid of a reduction over ``view`` (``streams`` tensors read)."""
    sms, l2_bytes = _device_info(device)
    target = sms * cfg.programs_per_sm
    tile = _tile(view, elem, cfg)
    blocks = -(-view.c // tile[1])
    whole = (_pow2(view.n), tile[1], _pow2(view.l))
    fits = math.prod(whole) <= cfg.resident_elems
    # Between a program's two reads of its slice every program in flight reads its own; with
    # at most `cached` programs that stays within half of L2, so the second read hits it.
    cached = l2_bytes // (2 * view.n * view.l * tile[1] * elem * streams)
    looped = min(blocks, cached) >= 2 * sms
    path = cfg.path or ("resident" if fits else "looped" if looped else "split")
    if path == "resident":
        if not fits:
            raise ValueError(
                f"the resident path holds at most {cfg.resident_elems} elements per program, "
                f"but a channel block here pads to {whole}; raise Config.resident_elems or "
                "choose another path")
        return _Plan(path, whole, blocks, 1, blocks, 1)
    if path == "looped":
        programs = max(1, min(blocks, target, cached))
        return _Plan(path, tile, blocks, _units(view, tile), programs, _units(view, tile))
    if view.rows:
        # Every program merges G * BC partials: narrow the channel blocks (down to 64 bytes)
        # until C / BC blocks of G <= _MERGE / BC programs can reach the target together.
        widest = math.isqrt(max(1, view.c * _MERGE // target))
        bc = max(min(tile[1], max(1, 64 // elem)), min(tile[1], 1 << (widest.bit_length() - 1)))
        tile = _tile(view, elem, cfg, bc)
        blocks = -(-view.c // bc)
    units = _units(view, tile)
    split = min(units, _MAX_SPLIT, max(1, _MERGE // tile[1]), -(-target // blocks))
    per = -(-units // split)
    return _Plan(path, tile, blocks, units, -(-units // per), per)


@functools.lru_cache(maxsize=1024)
def _elementwise_plan(view: _View, elem: int, cfg: Config) -> _Plan:
    tile = _tile(view, elem, cfg)
    units = _units(view, tile)
    per = -(-units // _MAX_GRID_Y)
    return _Plan("split", tile, -(-view.c // tile[1]), units, -(-units // per), per)


def _checked_view(x3: Tensor) -> _View:
    view = _view(x3) if x3.dim() == 3 else None
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


def _matched(t: Tensor | None, x3: Tensor, view: _View) -> Tensor | None:
    """``t`` itself when the kernels can address it with ``x3``'s view, else a copy that can."""
    if t is None or _view(t) == view:
        return t
    return _empty_like(x3, t.dtype).copy_(t)


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


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_train(
    x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    residual3: Tensor | None = None, relu: bool = False, *, config: Config | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 as ``batchnorm._eager.forward_train``: ``(y3, mean, rstd, var)``.

    ``config`` (default ``DEFAULT``) overrides the launch heuristics, e.g. to force a path.
    """
    view = _checked_view(x3)
    plan = _plan(view, x3.element_size(), 1, x3.device, config or DEFAULT)
    kernels, acc = _kernels(), _acc(x3.dtype)
    y3 = _empty_like(x3)
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
    relu: bool = False, *, config: Config | None = None,
) -> Tensor:
    """Inference as ``batchnorm._eager.forward_eval``: ``relu(scale * x + shift + residual)``."""
    view = _checked_view(x3)
    plan = _elementwise_plan(view, x3.element_size(), config or DEFAULT)
    y3 = _empty_like(x3)
    residual3 = _matched(residual3, x3, view)
    acc = torch.promote_types(scale.dtype, _acc(x3.dtype))
    _kernels().eval_kernel[(plan.blocks, plan.programs)](
        x3, y3, x3 if residual3 is None else residual3, _vector(scale), _vector(shift),
        view.n, view.c, view.l, view.s_n, view.s_c, plan.per, HAS_RES=residual3 is not None,
        RELU=bool(relu), ACC=_tl_acc(acc), **plan.consts())
    return y3


def backward(
    dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, training: bool, need_dx: bool = True, need_dres: bool = False,
    *, config: Config | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Gradients as ``batchnorm._eager.backward``: ``(dx3, dweight, dbias, dres3)``."""
    view = _checked_view(x3)
    streams = 2 if y3 is None else 3
    plan = _plan(view, x3.element_size(), streams, x3.device, config or DEFAULT)
    kernels, acc = _backward_kernels(), mean.dtype
    dy3, y3 = _matched(dy3, x3, view), _matched(y3, x3, view)
    dx3 = _empty_like(x3) if need_dx else None
    dres3 = _empty_like(x3) if need_dres else None
    dweight, dbias = mean.new_empty(mean.shape), mean.new_empty(mean.shape)
    weight = _vector(weight)
    inputs = (dy3, x3, x3 if y3 is None else y3, _vector(mean), _vector(rstd),
              x3 if weight is None else weight)
    sizes = (view.n, view.c, view.l, view.s_n, view.s_c)
    dx_pass = 0 if not need_dx else 2 if training else 1  # dx after the sums, or with them
    flags = {"RELU": y3 is not None, "HAS_W": weight is not None, "DX_PASS": dx_pass,
             "ACC": _tl_acc(acc), **plan.consts()}
    dx_arg = x3 if dx3 is None else dx3
    dres_arg = x3 if dres3 is None else dres3
    if plan.path == "split":
        part = x3.new_empty((2, view.c, plan.programs), dtype=acc)
        kernels.grad_partial_kernel[(plan.blocks, plan.programs)](
            *inputs, part, dx_arg, dres_arg, *sizes, plan.per, plan.programs,
            NEED_DRES=need_dres, **flags)
        kernels.grad_input_kernel[(plan.blocks, plan.programs if dx_pass == 2 else 1)](
            *inputs, part, dx_arg, dweight, dbias, *sizes, plan.per, plan.programs,
            BG=plan.merge_rows, **flags)
    else:
        kernels.backward_channel_kernel[(plan.programs,)](
            *inputs, dx_arg, dres_arg, dweight, dbias, *sizes, plan.blocks, plan.units,
            RESIDENT=plan.path == "resident", NEED_DRES=need_dres, **flags)
    return dx3, dweight, dbias, dres3


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, m: int, momentum: float | None,
) -> None:
    """The running-estimate update of ``batchnorm._eager.update_running_stats``, in one launch
    of one program: a batch with any non-finite statistic changes nothing (the counter
    included), decided on the device."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if m < 2:
        raise ValueError(f"the unbiased variance needs m >= 2 values per channel, got m={m}")
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
        BC=min(_pow2(channels), 1024), HAS_COUNT=num_batches_tracked is not None,
        CUMULATIVE=momentum is None, ACC=_tl_acc(acc), num_warps=4)
