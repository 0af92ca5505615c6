"""The ``"numba"`` backend: batch normalization on CPU tensors by compiled, fused kernels.

Same functions and signatures as ``batchnorm._eager`` (the specification), on the canonical
``(N, C, L)`` view. The tensors are handed to the kernels of ``batchnorm.kernels.cpu_kernels``
(forward) and ``cpu_kernels_backward`` as NumPy views of their own memory, read and written in
place. The layout (``loop_order``) decides how they are read:

* ``"ncl"``: contiguous input, in channel blocks that stay in the core's cache between the
  kernel's passes when a block's slice is small enough (``SLICE_BYTES``), else as its ``N*C``
  rows of ``L`` values streamed in memory order;
* ``"rows"``: channels-last input (strides ``(L*C, 1, C)``) as its ``(N*L, C)`` rows, a view of
  the transpose, streamed; ``L == 1`` takes this order too, as its rows are contiguous either
  way.

Streamed rows are cut into ``row_chunks`` fixed chunks, the units of parallel work; ``plan``
names the kernel and its split for a shape.

Outputs come back in the input's layout; large ones reuse the memory of earlier outputs
(``batchnorm.kernels.cpu_buffers``). The running statistics are updated by a compiled kernel
too (``update_running_stats``). numba is optional: this module imports without it
(``available()`` is then ``False``), numba is imported on the first kernel call, and each kernel
compiles on its first call for a dtype and layout (cached on disk by numba afterwards).
float32 and float64 run here; float16/bfloat16, other devices and the fused residual/ReLU
epilogue are refused by ``supports()`` and stay on the eager path.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import Tensor

from batchnorm import _eager
from batchnorm.kernels import cpu_buffers

DTYPES = (torch.float32, torch.float64)
NCL, ROWS = "ncl", "rows"  # the loop orders, see the module docstring
CHUNKS = 64  # streamed: chunks of rows at most, work for up to 64 threads ...
MIN_CHUNK_VALUES = 16  # ... each holding this many values per channel at least (see row_chunks)
RUN = 1024  # channel blocks: values per contiguous run at least (4 KiB of float32 streams well)
MIN_BLOCKS = 16  # ... unless that leaves fewer channel blocks than this for threads to share
SLICE_BYTES = 1 << 20  # ... and blocks only when a block's slice of the input is this at most
# Inputs with fewer elements run on one thread: waking the thread pool costs more than the
# second thread saves (and waits for a timeslice when the machine is busy). Results are
# bitwise the same either way (the kernels' partitions do not depend on the thread count).
PARALLEL_MIN_NUMEL = 1 << 16


@functools.cache
def available() -> bool:
    """Whether numba can be imported (once per process; this is where numba gets imported).

    >>> isinstance(available(), bool)
    True
    """
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


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
    from batchnorm.kernels import cpu_kernels, cpu_kernels_backward

    module = cpu_kernels_backward if name.startswith("backward") else cpu_kernels
    return getattr(module, name)


@contextlib.contextmanager
def _threads_for(numel: int):
    """numba's thread count for a kernel on ``numel`` elements: all, or one when small."""
    if numel >= PARALLEL_MIN_NUMEL or not available():
        yield
        return
    import numba

    previous = numba.get_num_threads()  # per calling thread; restored even if the kernel fails
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def row_chunks(rows: int, per_channel: int) -> int:
    """How many chunks of consecutive rows the kernels cut their ``rows`` rows into.

    ``CHUNKS``, or fewer so that every chunk holds ``MIN_CHUNK_VALUES`` values per channel on
    average (``per_channel = N * L`` in all), and one at least. Each chunk keeps two float64
    partial sums per channel; with 16 values per channel in each chunk, the partials take at
    most a quarter of a float32 input's bytes (64 chunks of a 64 x 1M input would take four
    times its size).
    A function of the shape only, so results never depend on the thread count.

    >>> row_chunks(64 * 512, 64 * 49), row_chunks(12544, 12544), row_chunks(6, 14)
    (64, 64, 1)
    """
    return max(1, min(CHUNKS, rows, per_channel // MIN_CHUNK_VALUES))


def channel_block(channels: int, length: int) -> int:
    """Channels per parallel task of the ``ncl_blocks`` kernels.

    One when rows are long; with short rows, enough channels to read runs of ``RUN`` values in
    memory order (short runs a stride apart stall on memory), but at most ``C / MIN_BLOCKS``.

    >>> channel_block(64, 3136), channel_block(512, 49), channel_block(3, 7)
    (1, 21, 1)
    """
    return max(1, min(-(-RUN // length), channels // MIN_BLOCKS))


def plan(x3: Tensor, kind: str) -> tuple[str, int]:
    """The kernel (by loop order) and its work split for ``x3`` in layout ``kind``.

    Contiguous input runs in channel blocks (``("ncl_blocks", channels per block)``) when a
    block's slice, ``N`` runs of ``block * L`` values, takes at most ``SLICE_BYTES``: the
    kernels then read it from the core's cache on their second pass. Larger slices stream
    (``("ncl", row chunks)``), as channels-last input always does (``("rows", row chunks)``).
    ``benchmarks/cpu_ncl.py`` times both ways on ResNet-like shapes. In its committed table
    (``benchmarks/results/cpu_ncl.md``, a 2-core Xeon with 2 MiB of L2 per core), streaming
    takes 3-12% longer than blocks for the slices of 0.3-0.8 MB but one (0.6 MB, even), and
    blocks take 7-13% longer for the slices of 1.05 and 1.6 MB. Between runs the 14x14
    ratios moved by up to 30%, the others by less than 10%.
    A function of the shape and dtype only, so results never depend on the thread count.

    >>> plan(torch.empty(64, 64, 3136), "ncl"), plan(torch.empty(256, 512, 49), "ncl")
    (('ncl_blocks', 1), ('ncl', 64))
    """
    n, c, length = x3.shape
    if kind == NCL:
        block = channel_block(c, length)
        if block * n * length * x3.element_size() <= SLICE_BYTES:
            return "ncl_blocks", block
        return NCL, row_chunks(n * c, n * length)
    return ROWS, row_chunks(n * length, n * length)


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

    Outputs of ``cpu_buffers.MIN_BYTES`` or more come from the backend's buffer pool, which
    reuses the memory of outputs no tensor refers to any more: without it the C allocator maps
    such blocks afresh on every call, and their first-touch page faults take about as long as
    the kernel that fills them (see ``batchnorm.kernels.cpu_buffers``). Smaller outputs come
    from torch's allocator, whose freed blocks are reused without faults.
    """
    n, c, length = x3.shape
    shape = (n, c, length) if kind != ROWS else (n, length, c)
    if x3.numel() * x3.element_size() >= cpu_buffers.MIN_BYTES:
        dtype = np.float32 if x3.dtype == torch.float32 else np.float64
        out = torch.from_numpy(cpu_buffers.pool().empty(shape, dtype))
    else:
        out = torch.empty(shape, dtype=x3.dtype)
    return out if kind != ROWS else out.transpose(1, 2)


def _per_channel(v: Tensor | None, channels: int, fill: float) -> np.ndarray:
    """``v`` as a float64 array, or ``fill`` repeated when the layer has no such parameter."""
    if v is None:
        return np.full(channels, fill)
    return v.detach().to(torch.float64).contiguous().numpy()


def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1: ``y = weight * (x - mean) * rstd + bias`` with the batch's statistics.

    Args:
        x3: ``(N, C, L)`` float32/float64 CPU tensor, contiguous or channels-last.
        weight, bias: ``(C,)`` or ``None`` (ones / zeros).
        eps: added to the biased variance.
        residual3, relu: must be ``None`` / ``False`` (see ``supports``).

    Returns:
        ``(y3, mean, rstd, var)``: ``y3`` in ``x3``'s dtype and layout; per-channel mean,
        ``rstd = 1/sqrt(var + eps)`` and biased variance in ``x3``'s dtype.

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> y3, mean, rstd, var = forward_train(x3, None, None, 0.0)
    >>> (y3 * 5 ** 0.5).flatten().round().tolist(), mean.tolist(), var.tolist()
    ([-3.0, -1.0, 1.0, 3.0], [4.0], [5.0])
    """
    kind = _check(x3, residual3, relu)
    channels = x3.shape[1]
    acc = _eager.acc_dtype(x3.dtype)
    y3 = _empty(x3, kind)
    mean, rstd, var = (torch.empty(channels, dtype=acc) for _ in range(3))
    order, split = plan(x3, kind)
    args = [_array(x3, kind), _per_channel(weight, channels, 1.0),
            _per_channel(bias, channels, 0.0), float(eps), _array(y3, kind),
            mean.numpy(), rstd.numpy(), var.numpy(), split]
    with _threads_for(x3.numel()):
        _kernel("forward_train_" + order)(*args)
    return y3, mean, rstd, var


def forward_eval(
    x3: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Inference with fixed statistics: ``y = scale[c] * x + shift[c]``.

    Args:
        x3: ``(N, C, L)`` float32/float64 CPU tensor, contiguous or channels-last.
        scale, shift: ``(C,)`` from ``_eager.inference_affine``; applied in ``x3``'s dtype.
        residual3, relu: must be ``None`` / ``False`` (see ``supports``).

    Returns:
        ``y3`` in ``x3``'s dtype and layout.

    >>> forward_eval(torch.ones(1, 2, 2), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    tensor([[[3., 3.],
             [3., 3.]]])
    """
    kind = _check(x3, residual3, relu)
    y3 = _empty(x3, kind)
    kernel = _kernel("forward_eval_" + kind)
    scale, shift = (v.detach().to(x3.dtype).contiguous().numpy() for v in (scale, shift))
    with _threads_for(x3.numel()):
        kernel(_array(x3, kind), scale, shift, _array(y3, kind))
    return y3


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
    """Closed-form gradients, as ``_eager.backward``: two sums in one pass, then ``dx``.

    ``dbias = sum(dy)``, ``dweight = sum(dy * x_hat)``; ``dx = weight * rstd * (dy - dbias/m -
    x_hat * dweight/m)`` in training, ``weight * rstd * dy`` in inference.

    Args:
        dy3: upstream gradient, ``x3``'s shape (another layout is copied into ``x3``'s).
        x3: the forward input; y3: must be ``None`` (no fused ReLU here).
        mean, rstd: ``(C,)`` statistics the forward normalized with.
        weight: ``(C,)`` or ``None``.
        training: whether the statistics were the batch's own (gradient flows through them).
        need_dx: compute ``dx``. Default: ``True``. need_dres: must be ``False``.

    Returns:
        ``(dx3 or None, dweight, dbias, None)``, ``dx3`` in ``x3``'s dtype and layout, the
        sums in ``x3``'s dtype.

    >>> x3 = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    >>> mean, rstd = torch.tensor([4.0]), torch.tensor([0.5])
    >>> dx3, dweight, dbias, _ = backward(x3 - 4, x3, None, mean, rstd, None, False)
    >>> dx3.flatten().tolist(), dweight.tolist(), dbias.tolist()
    ([-1.5, -0.5, 0.5, 1.5], [10.0], [0.0])
    """
    kind = _check(x3)
    if y3 is not None or need_dres:
        raise ValueError("the numba backend has no fused ReLU/residual epilogue, so it has no "
                         "backward for one (y3 and need_dres are for it); run such calls on the "
                         "eager backend, as supports() says")
    channels = x3.shape[1]
    acc = _eager.acc_dtype(x3.dtype)
    dweight, dbias = torch.empty(channels, dtype=acc), torch.empty(channels, dtype=acc)
    dx3 = _empty(x3, kind) if need_dx else None
    x = _array(x3, kind)
    dx = _array(dx3, kind) if need_dx else np.empty((0,) * x.ndim, x.dtype)
    args = [_array(dy3.to(x3.dtype), kind), x, mean.detach().contiguous().numpy(),
            rstd.detach().contiguous().numpy(), _per_channel(weight, channels, 1.0),
            bool(training), bool(need_dx), dx, dweight.numpy(), dbias.numpy()]
    order, split = plan(x3, kind)
    with _threads_for(x3.numel()):
        _kernel("backward_" + order)(*args, split)
    return dx3, dweight, dbias, None


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    mean: Tensor, var: Tensor, m: int, momentum: float | None,
) -> None:
    """The running-estimate update of ``batchnorm._eager.update_running_stats``, compiled:
    the same rule and guard (a batch with any non-finite statistic changes nothing, the counter
    included) at a fraction of the per-call cost of its half-dozen torch ops. Tensors it does
    not take (not contiguous CPU float vectors, or a counter that is not an int64 scalar) go
    to the eager function.

    >>> rm, rv, count = torch.zeros(2), torch.ones(2), torch.tensor(0)
    >>> update_running_stats(rm, rv, count, torch.tensor([1.0, 2.0]), torch.ones(2), 5, 0.5)
    >>> rm.tolist(), rv.tolist(), count.item()
    ([0.5, 1.0], [1.125, 1.125], 1)
    """
    vectors = (running_mean, running_var, mean, var)
    counter_ok = num_batches_tracked is None or (
        num_batches_tracked.dtype == torch.int64 and num_batches_tracked.numel() == 1
        and num_batches_tracked.device.type == "cpu")
    if (m < 2 or (momentum is None and num_batches_tracked is None) or not counter_ok
            or not all(v.device.type == "cpu" and v.dtype in DTYPES and v.is_contiguous()
                       for v in vectors)):
        # The eager function runs these, and raises what it raises for the invalid ones.
        _eager.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                    m, momentum)
        return
    count = (np.empty(0, np.int64) if num_batches_tracked is None
             else num_batches_tracked.view(1).numpy())
    arrays = [v.detach().numpy() for v in vectors]
    _kernel("update_running_stats")(*arrays[:2], count, *arrays[2:], m / (m - 1),
                                    -1.0 if momentum is None else float(momentum))
