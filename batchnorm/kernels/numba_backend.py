"""The ``"numba"`` backend: batch normalization on CPU tensors by compiled, fused kernels.

The phases and fast paths of ``batchnorm.kernels`` with the signatures of
``batchnorm.kernels.eager`` (the specification), on the canonical ``(N, C, L)`` view. The
tensors are handed to the kernels of ``batchnorm.kernels.numba_forward`` and
``numba_backward`` as NumPy views of their own memory, read and written in place. The layout
(``loop_order``) decides how they are read:

* ``"ncl"``: contiguous input, in channel blocks that stay in the core's cache between the
  kernel's passes when a block's slice is small enough (``Config.slice_bytes``), else as its
  ``N*C`` rows of ``L`` values streamed in memory order;
* ``"rows"``: channels-last input (strides ``(L*C, 1, C)``) as its ``(N*L, C)`` rows, a view of
  the transpose, streamed; ``L == 1`` takes this order too, as its rows are contiguous either
  way.

Streamed rows are cut into ``row_chunks`` fixed chunks, the units of parallel work; ``plan``
names the kernel and its split for a shape. The split depends on the shape only, never on the
thread count, so results are bitwise reproducible.

Outputs come back in the input's layout; large ones reuse the memory of earlier outputs
(``batchnorm.kernels.numba_buffers``). numba is optional: this module imports without it
(``available()`` is then ``False``), numba is imported on the first kernel call, and each kernel
compiles on its first call for a dtype and layout (cached on disk by numba afterwards).
float32 and float64 run here; float16/bfloat16, other devices and the fused residual/ReLU
epilogue are refused by ``supports()`` and stay on the eager path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from batchnorm.kernels import eager, numba_buffers

DTYPES = (torch.float32, torch.float64)
NCL, ROWS = "ncl", "rows"  # the loop orders, see the module docstring


@dataclass(frozen=True)
class Config:
    """Work-split heuristics of the numba backend (one commented default each).

    Args:
        chunks: streamed rows are cut into this many chunks at most, work for up to that many
            threads. Default: ``64``.
        min_chunk_values: ... each holding this many values per channel at least (see
            ``row_chunks``). Default: ``16``.
        run: channel blocks hold this many contiguous values per run at least (4 KiB of
            float32 streams well). Default: ``1024``.
        min_blocks: ... unless that leaves fewer channel blocks than this for threads to
            share. Default: ``16``.
        slice_bytes: contiguous input runs in channel blocks only when a block's slice of the
            input is this many bytes at most (it stays in a 2 MiB L2 between the passes).
            Default: ``1 << 20``.
        parallel_min_numel: inputs with fewer elements run on one thread: waking the thread
            pool costs more than the second thread saves. Results are bitwise the same either
            way. Default: ``1 << 16``.
        block: channels per block, instead of ``channel_block``'s choice; ``None`` to choose.
            Default: ``None``.

    Calls read the module's ``DEFAULT`` at call time: ``numba_backend.DEFAULT =
    Config(...)`` tunes every call (benchmarks, tests).

    >>> Config(slice_bytes=0).chunks
    64
    """

    chunks: int = 64
    min_chunk_values: int = 16
    run: int = 1024
    min_blocks: int = 16
    slice_bytes: int = 1 << 20
    parallel_min_numel: int = 1 << 16
    block: int | None = None

    def replace(self, **changes) -> Config:
        return replace(self, **changes)


DEFAULT = Config()


_available: bool | None = None  # whether numba imports, once known
_forked = False  # whether this process was forked from one whose OpenMP threads had started


@torch.compiler.assume_constant_result  # torch.compile calls it once instead of tracing it
def available() -> bool:
    """Whether numba can be imported and its parallel kernels run in this process (once per
    process; this is where numba gets imported).

    They cannot in a process forked after its parent ran them on GNU OpenMP (numba's ``omp``
    threading layer, the usual one on Linux), which aborts the child ("fork() called from a
    process already using GNU OpenMP"): a ``DataLoader`` worker, say. There ``auto`` takes
    torch's own op, and asking for numba raises with ``why_unavailable()``.

    >>> isinstance(available(), bool)
    True
    """
    global _available
    if _available is None:
        try:
            import numba  # noqa: F401
            _available = True
        except ImportError:
            _available = False
    return _available and not _forked


def why_unavailable() -> str:
    """What stops this backend here, and the fix; for the error of an explicit request."""
    if _forked:
        return ("this process was forked from one that had run numba's kernels on GNU "
                "OpenMP, which cannot run in a forked child; start workers with the 'spawn' or "
                "'forkserver' method (e.g. DataLoader(multiprocessing_context='spawn')), or "
                "use backend='auto', which takes torch's own op here")
    return "numba cannot be imported; install it (pip install numba) or use backend='auto'"


def _threading_layer() -> str | None:
    """The threading layer numba started, or ``None`` before its first parallel kernel."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return numba.threading_layer()
    except ValueError:  # not started yet
        return None


def _after_fork_in_child() -> None:
    global _forked, _launching, _serial
    _launching = threading.Lock()  # another thread may have held it at the fork
    _serial = None
    if _threading_layer() == "omp":
        _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def loop_order(x3: Tensor) -> str | None:
    """``"ncl"``, ``"rows"`` (channels-last), or ``None`` when ``x3`` is in neither layout.

    >>> loop_order(torch.zeros(2, 3, 4)), loop_order(torch.zeros(2, 4, 3).transpose(1, 2))
    ('ncl', 'rows')
    >>> loop_order(torch.zeros(2, 3, 8)[:, :, ::2]) is None
    True
    """
    if x3.transpose(1, 2).is_contiguous() and (x3.shape[2] == 1 or not x3.is_contiguous()):
        return ROWS
    return NCL if x3.is_contiguous() else None


def supports(x3: Tensor, residual3: Tensor | None, relu: bool) -> bool:
    """Whether this backend runs the call: a non-empty float32/float64 CPU tensor in one of the
    two layouts, without the residual/ReLU epilogue.

    >>> supports(torch.zeros(2, 3, 4), None, False)
    True
    >>> supports(torch.zeros(2, 3, 4, dtype=torch.float16), None, False)
    False
    """
    return (
        x3.device.type == "cpu"
        and x3.dtype in DTYPES
        and x3.numel() > 0
        and residual3 is None
        and not relu
        and loop_order(x3) is not None
    )


def _check(x3: Tensor, residual3: Tensor | None = None, relu: bool = False) -> str:
    if not supports(x3, residual3, relu):
        raise ValueError(
            f"the numba backend cannot run this call: {x3.dtype} input of shape "
            f"{tuple(x3.shape)} and strides {x3.stride()} on {x3.device} (residual="
            f"{residual3 is not None}, relu={relu}); it runs non-empty float32/float64 CPU "
            "tensors, contiguous or channels-last, without residual or ReLU. Check supports() "
            "first, or use the eager backend")
    return loop_order(x3)


def _kernel(name: str):
    # Imports numba, only when a kernel first runs.
    from batchnorm.kernels import numba_backward, numba_forward

    backward = name.startswith(("backward", "grad"))
    return getattr(numba_backward if backward else numba_forward, name)


_launching = threading.Lock()
_serial: bool | None = None  # whether launches must not overlap; known after the first one


@contextlib.contextmanager
def _launch(numel: int):
    """Around every parallel kernel: numba's thread count for ``numel`` elements (all, or one
    when small), and launches one at a time where the threading layer cannot take concurrent
    ones (``workqueue``, numba's fallback without TBB or OpenMP, aborts the process when two
    Python threads launch at once; the others take them concurrently)."""
    if _forked:
        raise RuntimeError(f"the numba backend cannot run here: {why_unavailable()}")
    serial = _serial is not False
    if serial:
        _launching.acquire()
    try:
        if numel >= DEFAULT.parallel_min_numel:
            yield
        else:
            import numba

            previous = numba.get_num_threads()  # per calling thread; restored on failure too
            numba.set_num_threads(1)
            try:
                yield
            finally:
                numba.set_num_threads(previous)
    finally:
        if serial:
            _launching.release()
            _settle_serial()


def _settle_serial() -> None:
    global _serial
    layer = _threading_layer()
    if layer is not None:
        _serial = layer == "workqueue"


def row_chunks(rows: int, per_channel: int, config: Config | None = None) -> int:
    """How many chunks of consecutive rows the kernels cut their ``rows`` rows into.

    ``Config.chunks``, or fewer so that every chunk holds ``Config.min_chunk_values`` values
    per channel on average (``per_channel = N * L`` in all), and one at least. Each chunk keeps
    two float64 partial sums per channel; with 16 values per channel in each chunk, the
    partials take at most a quarter of a float32 input's bytes (64 chunks of a 64 x 1M input
    would take four times its size).

    >>> row_chunks(64 * 512, 64 * 49), row_chunks(12544, 12544), row_chunks(6, 14)
    (64, 64, 1)
    """
    cfg = config or DEFAULT
    return max(1, min(cfg.chunks, rows, per_channel // cfg.min_chunk_values))


def channel_block(channels: int, length: int, config: Config | None = None) -> int:
    """Channels per parallel task of the ``ncl_blocks`` kernels.

    One when rows are long; with short rows, enough channels to read runs of ``Config.run``
    values in memory order (short runs a stride apart stall on memory), but at most
    ``C / Config.min_blocks``.

    >>> channel_block(64, 3136), channel_block(512, 49), channel_block(3, 7)
    (1, 21, 1)
    """
    cfg = config or DEFAULT
    if cfg.block is not None:
        return cfg.block
    return max(1, min(-(-cfg.run // length), channels // cfg.min_blocks))


def plan(x3: Tensor, kind: str, config: Config | None = None) -> tuple[str, int]:
    """The kernel (by loop order) and its work split for ``x3`` in layout ``kind``.

    Contiguous input runs in channel blocks (``("ncl_blocks", channels per block)``) when a
    block's slice, ``N`` runs of ``block * L`` values, takes at most ``Config.slice_bytes``:
    the kernels then read it from the core's cache on their second pass. Larger slices stream
    (``("ncl", row chunks)``), as channels-last input always does (``("rows", row chunks)``).
    ``benchmarks/cpu_ncl.py`` times both ways on ResNet-like shapes. In its committed table
    (``benchmarks/results/cpu_ncl.md``, a 2-core Xeon with 2 MiB of L2 per core), streaming
    takes 3-12% longer than blocks for the slices of 0.3-0.8 MB but one (0.6 MB, even), and
    blocks take 7-13% longer for the slices of 1.05 and 1.6 MB. Between runs the 14x14
    ratios moved by up to 30%, the others by less than 10%.

    >>> plan(torch.empty(64, 64, 3136), "ncl"), plan(torch.empty(256, 512, 49), "ncl")
    (('ncl_blocks', 1), ('ncl', 64))
    """
    cfg = config or DEFAULT
    n, c, length = x3.shape
    if kind == NCL:
        block = channel_block(c, length, cfg)
        if block * n * length * x3.element_size() <= cfg.slice_bytes:
            return "ncl_blocks", block
        return NCL, row_chunks(n * c, n * length, cfg)
    return ROWS, row_chunks(n * length, n * length, cfg)


def _array(t3: Tensor, kind: str) -> np.ndarray:
    """The NumPy array a kernel reads for ``t3``: itself (``"ncl"``) or its rows (``"rows"``).

    A view of ``t3``'s memory when ``t3`` is in that layout; a copy otherwise (a gradient may
    arrive in another layout than the input's).
    """
    t3 = t3.detach()
    if kind != ROWS:
        return t3.contiguous().numpy()
    n, c, length = t3.shape
    return t3.transpose(1, 2).reshape(n * length, c).numpy()


def _empty(x3: Tensor, kind: str) -> Tensor:
    """An uninitialized tensor of ``x3``'s shape and dtype in the given layout.

    Outputs of ``numba_buffers.MIN_BYTES`` or more come from the backend's buffer pool, which
    reuses the memory of outputs no tensor refers to any more: without it the C allocator maps
    such blocks afresh on every call, and their first-touch page faults take about as long as
    the kernel that fills them (see ``batchnorm.kernels.numba_buffers``). Smaller outputs come
    from torch's allocator, whose freed blocks are reused without faults.
    """
    n, c, length = x3.shape
    shape = (n, c, length) if kind != ROWS else (n, length, c)
    if x3.numel() * x3.element_size() >= numba_buffers.MIN_BYTES:
        dtype = np.float32 if x3.dtype == torch.float32 else np.float64
        out = torch.from_numpy(numba_buffers.pool().empty(shape, dtype))
    else:
        out = torch.empty(shape, dtype=x3.dtype)
    return out if kind != ROWS else out.transpose(1, 2)


def _per_channel(v: Tensor | None, channels: int, fill: float, dtype=np.float64) -> np.ndarray:
    """``v`` as a contiguous array of ``dtype``, or ``fill`` repeated when it is ``None``."""
    if v is None:
        return np.full(channels, fill, dtype)
    return v.detach().to(torch.float64 if dtype == np.float64 else torch.float32) \
        .contiguous().numpy()


def _x_dtype(x3: Tensor):
    return np.float32 if x3.dtype == torch.float32 else np.float64


def stats(x3: Tensor) -> tuple[int, Tensor, Tensor]:
    """Phase ``stats`` as ``eager.stats``: ``(count, mean, M2)``, float64, streamed.

    >>> count, mean, m2 = stats(torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]]))
    >>> count, mean.tolist(), m2.tolist()
    (4, [4.0], [20.0])
    """
    kind = _check(x3)
    channels = x3.shape[1]
    mean, m2 = (torch.empty(channels, dtype=torch.float64) for _ in range(2))
    n, _, length = x3.shape
    rows = n * channels if kind == NCL else n * length
    with _launch(x3.numel()):
        _kernel("stats_" + kind)(_array(x3, kind), mean.numpy(), m2.numpy(),
                                 row_chunks(rows, n * length))
    return n * length, mean, m2


def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1, fused: ``y = weight * (x - mean) * rstd + bias`` with the batch's
    statistics, as ``eager.forward_train``: ``(y3, mean, rstd, var)``, the statistics in
    ``x3``'s dtype; ``y3`` into ``out`` when given (``x3`` itself for in-place ABN: every
    kernel reads a value before it writes its place). ``residual3``/``relu`` must be
    ``None``/``False`` (see ``supports``).

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> y3, mean, rstd, var = forward_train(x3, None, None, 0.0)
    >>> (y3 * 5 ** 0.5).flatten().round().tolist(), mean.tolist(), var.tolist()
    ([-3.0, -1.0, 1.0, 3.0], [4.0], [5.0])
    """
    kind = _check(x3, residual3, relu)
    channels = x3.shape[1]
    acc = eager.acc_dtype(x3.dtype)
    y3 = _empty(x3, kind) if out is None else _same_layout(out, x3, "out")
    mean, rstd, var = (torch.empty(channels, dtype=acc) for _ in range(3))
    order, split = plan(x3, kind)
    args = [_array(x3, kind), _per_channel(weight, channels, 1.0),
            _per_channel(bias, channels, 0.0), float(eps), _array(y3, kind),
            mean.numpy(), rstd.numpy(), var.numpy(), split]
    with _launch(x3.numel()):
        _kernel("forward_train_" + order)(*args)
    return y3, mean, rstd, var


def forward_eval(
    x3: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual3: Tensor | None = None,
    relu: bool = False,
    center: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Phase ``forward_eval``: ``y = (x - center[c]) * scale[c] + shift[c]``, in ``x3``'s dtype,
    into ``out`` when given (``x3`` itself for in-place ABN, or a tensor of its layout).

    >>> forward_eval(torch.ones(1, 2, 2), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    tensor([[[3., 3.],
             [3., 3.]]])
    """
    kind = _check(x3, residual3, relu)
    y3 = _empty(x3, kind) if out is None else _same_layout(out, x3, "out")
    dtype = _x_dtype(x3)
    channels = x3.shape[1]
    args = (_per_channel(center, channels, 0.0, dtype), _per_channel(scale, channels, 1.0, dtype),
            _per_channel(shift, channels, 0.0, dtype))
    with _launch(x3.numel()):
        _kernel("forward_eval_" + kind)(_array(x3, kind), *args, _array(y3, kind))
    return y3


def _same_layout(t3: Tensor, x3: Tensor, name: str) -> Tensor:
    if t3.shape != x3.shape or t3.stride() != x3.stride() or t3.dtype != x3.dtype:
        raise ValueError(f"{name} must have the shape, strides and dtype of the input: got "
                         f"{tuple(t3.shape)} {t3.stride()} {t3.dtype}, expected "
                         f"{tuple(x3.shape)} {x3.stride()} {x3.dtype}")
    return t3


def _flat(t3: Tensor) -> np.ndarray:
    """The memory of a dense ``t3`` (in either loop order) as one 1-D array, in place."""
    return t3.detach().as_strided((t3.numel(),), (1,)).numpy()


def _like(t3: Tensor | None, x3: Tensor) -> Tensor | None:
    """``t3`` in ``x3``'s exact layout and dtype (itself when it is), for flat kernels."""
    if t3 is None or (t3.stride() == x3.stride() and t3.dtype == x3.dtype):
        return t3
    return torch.empty_like(x3).copy_(t3)


def activate(z3: Tensor, residual3: Tensor | None, activation: str, param: float) -> Tensor:
    """Phase ``activate`` as ``eager.activate``: ``z = act(z + residual)`` in place.

    >>> activate(torch.tensor([[[-2.0, 3.0]]]), None, "leaky_relu", 0.5)
    tensor([[[-1.,  3.]]])
    """
    _check(z3)
    residual3 = _like(residual3, z3)
    z = _flat(z3)
    residual = z[:0] if residual3 is None else _flat(residual3)
    with _launch(z3.numel()):
        _activation_kernel("activate")(z, residual, residual3 is not None,
                                       eager.INVERTIBLE[activation], z.dtype.type(param))
    return z3


def invert_activation(z3: Tensor, dz3: Tensor, residual3: Tensor | None, activation: str,
                      param: float) -> tuple[Tensor, Tensor]:
    """Phase ``invert_activation`` as ``eager.invert_activation``: ``(y, dy)`` in ``z3``'s
    dtype and layout.

    >>> y, dy = invert_activation(torch.tensor([[[-1.0, 3.0]]]), torch.ones(1, 1, 2), None,
    ...                           "leaky_relu", 0.5)
    >>> y.tolist(), dy.tolist()
    ([[[-2.0, 3.0]]], [[[0.5, 1.0]]])
    """
    _check(z3)
    dz3, residual3 = _like(dz3, z3), _like(residual3, z3)
    # Not from the buffer pool: in-place ABN is there to save memory, and these two live only
    # through one layer's backward; the pool would keep one pair per layer size.
    y3, dy3 = torch.empty_like(z3), torch.empty_like(z3)
    z = _flat(z3)
    residual = z[:0] if residual3 is None else _flat(residual3)
    floor = z.dtype.type(eager.elu_floor(z3.dtype))
    with _launch(z3.numel()):
        _activation_kernel("invert_activation")(
            z, _flat(dz3), residual, residual3 is not None, eager.INVERTIBLE[activation],
            z.dtype.type(param), floor, _flat(y3), _flat(dy3))
    return y3, dy3


def inplace_abn_backward(
    dz3: Tensor, z3: Tensor, residual3: Tensor | None, activation: str, param: float,
    mean: Tensor, rstd: Tensor, weight: Tensor | None, training: bool, need_dx: bool = True,
    need_dres: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Fused: ``invert_activation`` then ``backward`` at its ``(y, dy)``, as
    ``(dx3, dweight, dbias, dres3)`` with ``dres3 = dy``. Where ``plan`` takes channel blocks,
    one kernel recomputes ``y`` and ``dy`` from ``z`` and ``dz`` on both of its passes (neither
    is ever written out); otherwise the two phases run one after the other.

    >>> z3 = torch.tensor([[[-1.0, 3.0]], [[5.0, 7.0]]])
    >>> dx3, dweight, dbias, _ = inplace_abn_backward(
    ...     z3 - 4, z3, None, "identity", 0.0, torch.tensor([4.0]), torch.tensor([0.5]), None,
    ...     False)
    >>> dx3.flatten().tolist(), dbias.tolist()
    ([-2.5, -0.5, 0.5, 1.5], [-2.0])
    """
    kind = _check(z3)
    order, block = plan(z3, kind)
    if order != "ncl_blocks":
        y3, dy3 = invert_activation(z3, dz3, residual3, activation, param)
        dx3, dweight, dbias, _ = backward(dy3, y3, None, mean, rstd, weight, training, need_dx)
        return dx3, dweight, dbias, (dy3 if need_dres else None)
    dz3, residual3 = _like(dz3, z3), _like(residual3, z3)
    channels = z3.shape[1]
    acc = eager.acc_dtype(z3.dtype)
    dweight, dbias = torch.empty(channels, dtype=acc), torch.empty(channels, dtype=acc)
    dx3 = torch.empty_like(z3) if need_dx else None
    dres3 = torch.empty_like(z3) if need_dres else None
    z = _array(z3, kind)
    dtype = z.dtype.type
    with _launch(z3.numel()):
        _activation_kernel("backward_ncl_blocks")(
            z, _array(dz3, kind), z if residual3 is None else _array(residual3, kind),
            residual3 is not None, eager.INVERTIBLE[activation], dtype(param),
            dtype(eager.elu_floor(z3.dtype)), mean.detach().to(acc).contiguous().numpy(),
            rstd.detach().to(acc).contiguous().numpy(), _per_channel(weight, channels, 1.0),
            bool(training), bool(need_dx), bool(need_dres),
            z if dx3 is None else _array(dx3, kind), z if dres3 is None else _array(dres3, kind),
            dweight.numpy(), dbias.numpy(), block)
    return dx3, dweight, dbias, dres3


def _activation_kernel(name: str):
    from batchnorm.kernels import numba_activation  # imports numba, on the first call

    return getattr(numba_activation, name)


def _no_epilogue(y3: Tensor | None, need_dres: bool) -> None:
    if y3 is not None or need_dres:
        raise ValueError("the numba backend has no fused ReLU/residual epilogue, so it has no "
                         "backward for one (y3 and need_dres are for it); run such calls on the "
                         "eager backend, as supports() says")


def grad_sums(dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor,
              rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Phase ``grad_sums``: ``(sum(dy), sum(dy * x_hat))`` in ``mean``'s dtype.

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> grad_sums(x3 - 4, x3, None, torch.tensor([4.0]), torch.tensor([0.5]))
    (tensor([0.]), tensor([10.]))
    """
    kind = _check(x3)
    _no_epilogue(y3, False)
    channels = x3.shape[1]
    s_dz, s_dz_x_hat = np.empty(channels), np.empty(channels)
    n, _, length = x3.shape
    rows = n * channels if kind == NCL else n * length
    with _launch(x3.numel()):
        _kernel("grad_sums_" + kind)(
            _array(dy3.to(x3.dtype), kind), _array(x3, kind), _per_channel(mean, channels, 0.0),
            _per_channel(rstd, channels, 1.0), s_dz, s_dz_x_hat, row_chunks(rows, n * length))
    return (torch.from_numpy(s_dz).to(mean.dtype), torch.from_numpy(s_dz_x_hat).to(mean.dtype))


def grad_input(
    dy3: Tensor, x3: Tensor, y3: Tensor | None, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, mean_dz: Tensor | None, mean_dz_x_hat: Tensor | None,
    need_dres: bool = False,
) -> tuple[Tensor, None]:
    """Phase ``grad_input``: ``dx = a * dy + b * (x - mean) + c0`` with ``a = weight * rstd``,
    ``b = -a * rstd * mean_dz_x_hat`` and ``c0 = -a * mean_dz`` (``eager.grad_input``);
    ``mean_dz=None`` for fixed statistics, ``dx = a * dy``.

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> grad_input(torch.ones_like(x3), x3, None, torch.tensor([4.0]), torch.tensor([0.5]),
    ...            None, torch.tensor([1.0]), torch.tensor([0.0]))[0].flatten().tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    kind = _check(x3)
    _no_epilogue(y3, need_dres)
    r = rstd.detach().double()
    a = r if weight is None else r * weight.detach().double()
    zero = torch.zeros_like(a)
    b = zero if mean_dz is None else -a * r * mean_dz_x_hat.double()
    c0 = zero if mean_dz is None else -a * mean_dz.double()
    coef = torch.stack([mean.detach().double(), a, b, c0]).to(x3.dtype).numpy()
    dx3 = _empty(x3, kind)
    n, _, length = x3.shape
    with _launch(x3.numel()):
        if kind == NCL:
            _kernel("grad_input_ncl")(_array(dy3.to(x3.dtype), kind), _array(x3, kind), coef,
                                      _array(dx3, kind))
        else:
            _kernel("grad_input_rows")(_array(dy3.to(x3.dtype), kind), _array(x3, kind), coef,
                                       _array(dx3, kind), row_chunks(n * length, n * length))
    return dx3, None


def backward(
    dy3: Tensor,
    x3: Tensor,
    y3: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    training: bool,
    need_dx: bool = True,
    need_dres: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Closed-form gradients, fused (two sums in one pass, then ``dx``), as
    ``eager.backward``: ``(dx3 or None, dweight, dbias, None)``, the sums in ``x3``'s dtype.

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> mean, rstd = torch.tensor([4.0]), torch.tensor([0.5])
    >>> dx3, dweight, dbias, _ = backward(x3 - 4, x3, None, mean, rstd, None, False)
    >>> dx3.flatten().tolist(), dweight.tolist(), dbias.tolist()
    ([-1.5, -0.5, 0.5, 1.5], [10.0], [0.0])
    """
    kind = _check(x3)
    _no_epilogue(y3, need_dres)
    channels = x3.shape[1]
    acc = eager.acc_dtype(x3.dtype)
    dweight, dbias = torch.empty(channels, dtype=acc), torch.empty(channels, dtype=acc)
    dx3 = _empty(x3, kind) if need_dx else None
    x = _array(x3, kind)
    dx = _array(dx3, kind) if need_dx else np.empty((0,) * x.ndim, x.dtype)
    args = [_array(dy3.to(x3.dtype), kind), x, mean.detach().contiguous().numpy(),
            rstd.detach().contiguous().numpy(), _per_channel(weight, channels, 1.0),
            bool(training), bool(need_dx), dx, dweight.numpy(), dbias.numpy()]
    order, split = plan(x3, kind)
    with _launch(x3.numel()):
        _kernel("backward_" + order)(*args, split)
    return dx3, dweight, dbias, None


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, m: int | Tensor, momentum: float | None,
) -> None:
    """Phase ``update_running_stats``, compiled: the rule and guard of
    ``eager.update_running_stats`` (a batch with any non-finite statistic, or a single value,
    changes nothing, the counter included) at a fraction of the per-call cost of its
    half-dozen torch ops. Tensors it does not take (not contiguous CPU float vectors, or a
    counter that is not an int64 scalar) go to the eager function.

    >>> rm, rv, count = torch.zeros(2), torch.ones(2), torch.tensor(0)
    >>> update_running_stats(rm, rv, count, torch.tensor([1.0, 2.0]), torch.ones(2), 5, 0.5)
    >>> rm.tolist(), rv.tolist(), count.item()
    ([0.5, 1.0], [1.125, 1.125], 1)
    """
    vectors = (running_mean, running_var, mean, var)
    counter_ok = num_batches_tracked is None or (
        num_batches_tracked.dtype == torch.int64 and num_batches_tracked.numel() == 1
        and num_batches_tracked.device.type == "cpu")
    if ((momentum is None and num_batches_tracked is None) or not counter_ok
            or not all(v.device.type == "cpu" and v.dtype in DTYPES and v.is_contiguous()
                       for v in vectors)):
        # The eager function runs these, and raises what it raises for the invalid ones.
        eager.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                   m, momentum)
        return
    m = float(m)
    count = (np.empty(0, np.int64) if num_batches_tracked is None
             else num_batches_tracked.view(1).numpy())
    arrays = [v.detach().numpy() for v in vectors]
    _kernel("update_running_stats")(*arrays[:2], count, *arrays[2:],
                                    m / (m - 1) if m > 1 else float("nan"),
                                    0.0 if momentum is None else float(momentum),
                                    momentum is None)
