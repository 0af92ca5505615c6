"""Reused memory for the large outputs of the ``"numba"`` backend.

A training step allocates each batch-norm output (``y`` in the forward, ``dx`` in the
backward) and frees it a little later; the next step asks for the same sizes again. The C
allocator hands blocks of more than a few MiB back to the operating system when they are freed
(glibc's ``mmap`` threshold stops growing at 32 MiB), so every step pays the first-touch page
faults again: for a 50 MB output about as long as the kernel that fills it. This pool keeps
such blocks instead and hands one out again once no tensor uses it any more, as PyTorch's
CUDA caching allocator does on the GPU.

* A buffer is free when nothing but the pool refers to it. The tensors made from it (and all
  their views) hold it through their storage, so its reference count says when the last one is
  gone; nothing is ever reused while a tensor can still see it.
* Of the idle buffers of the right size, the one handed out last is handed out again: it is
  the one most likely still in the caches, as the C allocator's last freed block is.
* ``limit`` bounds all the memory the pool owns, in use or idle. When a new buffer would pass
  it, idle buffers are dropped (those handed out longest ago first) to make room; if even
  dropping all of them would not, the output is allocated outside the pool, as it would be
  without one.
* ``$BATCHNORM_CPU_CACHE_MB`` sets the limit of the pool the backend uses (default 2048; ``0``
  turns it off); :func:`empty_cache` returns the idle buffers to the operating system.

Buffers come from NumPy, which advises huge pages for large arrays: the first touch of a new
buffer faults 512 times less often than with 4 KiB pages. The tensors are made with
``torch.from_numpy``, so, like any such tensor, they cannot grow in place (``resize_`` to more
elements, or ``out=`` a larger result, raises "storage that is not resizable"); everything
else about them is ordinary.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20  # smaller outputs: the C allocator reuses them itself, without faults
DEFAULT_LIMIT_MB = 2048


class BufferPool:
    """Large uninitialized arrays whose memory is reused once no tensor refers to it.

    Args:
        limit: bytes the pool may own at most, in use and idle together.

    >>> pool = BufferPool(limit=64 << 20)
    >>> a = pool.empty((1024, 512), np.float32)
    >>> address = a.ctypes.data
    >>> b = pool.empty((1024, 512), np.float32)
    >>> b.ctypes.data == address  # a is still alive
    False
    >>> del a
    >>> pool.empty((512, 1024), np.float32).ctypes.data == address  # its memory again
    True
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._buffers: list[np.ndarray] = []  # flat uint8 arrays, by when last handed out
        self._lock = threading.Lock()
        # What _refcounts says of a buffer held by a list alone: the count is measured, not
        # assumed, as Python versions count the references of a running frame differently.
        self._idle_count = _refcounts([np.empty(0, np.uint8)])[0]

    @property
    def owned_bytes(self) -> int:
        """Bytes of all the pool's buffers, in use or idle."""
        return sum(buffer.nbytes for buffer in self._buffers)

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``, its contents undefined.

        An idle buffer of exactly this many bytes if there is one; a new pooled buffer if the
        limit allows it (after dropping idle ones); otherwise a plain ``np.empty``.
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            buffer = self._take(nbytes)
        if buffer is None:
            return np.empty(shape, dtype)
        # A view: while it (or a tensor made from it) lives, the buffer's count stays raised.
        return buffer.view(dtype).reshape(shape)

    def clear(self) -> None:
        """Drop every idle buffer (those in use stay with their tensors)."""
        with self._lock:
            idle = self._idle()
            pairs = zip(self._buffers, idle, strict=True)
            self._buffers = [buffer for buffer, is_idle in pairs if not is_idle]

    def _idle(self) -> list[bool]:
        return [count <= self._idle_count for count in _refcounts(self._buffers)]

    def _take(self, nbytes: int) -> np.ndarray | None:
        idle = self._idle()
        for i in reversed(range(len(self._buffers))):  # the one handed out last first
            if idle[i] and self._buffers[i].nbytes == nbytes:
                buffer = self._buffers.pop(i)
                self._buffers.append(buffer)
                return buffer
        owned = self.owned_bytes
        in_use = owned - sum(b.nbytes for b, is_idle in zip(self._buffers, idle, strict=True)
                             if is_idle)
        if in_use + nbytes > self.limit:
            return None  # no room even without the idle buffers: keep them for their sizes
        keep = []
        # Drop idle buffers, those handed out longest ago first, until the new one fits.
        for buffer, is_idle in zip(self._buffers, idle, strict=True):
            if is_idle and owned + nbytes > self.limit:
                owned -= buffer.nbytes
            else:
                keep.append(buffer)
        self._buffers = keep
        buffer = np.empty(nbytes, np.uint8)
        self._buffers.append(buffer)
        return buffer


def _refcounts(buffers: list[np.ndarray]) -> list[int]:
    """The reference count of each buffer, one code path for the pool and its calibration."""
    return [sys.getrefcount(buffer) for buffer in buffers]


def _limit_from_environment() -> int:
    text = os.environ.get("BATCHNORM_CPU_CACHE_MB", str(DEFAULT_LIMIT_MB))
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:  # also catches NaN
        raise ValueError(
            f"BATCHNORM_CPU_CACHE_MB must be a number of MiB >= 0 (got {text!r}); set it to 0 "
            f"to turn the CPU output cache off, or unset it for the default {DEFAULT_LIMIT_MB}")
    return int(megabytes * (1 << 20))


_pool: BufferPool | None = None


def pool() -> BufferPool:
    """The pool the numba backend allocates its outputs from (its limit read on first use)."""
    global _pool
    if _pool is None:
        _pool = BufferPool(_limit_from_environment())
        # A child forked while another thread held the lock would wait on it forever.
        os.register_at_fork(after_in_child=_new_lock_after_fork)
    return _pool


def _new_lock_after_fork() -> None:
    if _pool is not None:
        _pool._lock = threading.Lock()


def empty_cache() -> None:
    """Return the numba backend's idle output buffers to the operating system.

    >>> empty_cache()
    >>> pool().owned_bytes >= 0
    True
    """
    if _pool is not None:
        _pool.clear()
