"""Tests of the numba backend's output pool (batchnorm/kernels/numba_buffers.py).

The property that matters: memory is handed out again only when no tensor can see it, so a
kept output is never overwritten, and training with the pool gives bitwise the results of
training without it. Also the limit, the eviction order, ``empty_cache`` and the environment
variable.
"""

import numpy as np
import pytest
import torch

import batchnorm

numba = pytest.importorskip("numba", reason="numba is not installed: the pool serves its kernels")
from batchnorm.kernels import numba_backend as cpu  # noqa: E402
from batchnorm.kernels import numba_buffers as cpu_buffers  # noqa: E402
from batchnorm.kernels.numba_buffers import BufferPool  # noqa: E402

MIB = 1 << 20


def _address(array) -> int:
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool of 64 MiB behind the backend, serving outputs of any size."""
    fresh = BufferPool(limit=64 * MIB)
    monkeypatch.setattr(cpu_buffers, "_pool", fresh)
    monkeypatch.setattr(cpu_buffers, "MIN_BYTES", 0)
    return fresh


# Ways a caller can keep an output's memory alive: each must stop the pool from reusing it.
HOLDERS = {
    "the_tensor": lambda y: y,
    "a_slice": lambda y: y[1:],
    "a_reshaped_view": lambda y: y.reshape(-1),
    "a_numpy_view": lambda y: y.numpy(),
    "a_list": lambda y: [y.transpose(0, 1)],
}


@pytest.mark.parametrize("hold", list(HOLDERS.values()), ids=list(HOLDERS))
def test_memory_a_caller_still_holds_is_never_handed_out(pool, hold):
    x3 = torch.randn(4, 3, 5)
    kept = hold(cpu.forward_train(x3, None, None, 1e-5)[0])
    y3 = cpu.forward_train(x3, None, None, 1e-5)[0]
    snapshot = y3.clone()
    first = kept if not isinstance(kept, list) else kept[0]
    assert _address(first) != y3.data_ptr()
    other = cpu.forward_train(x3 * 3 + 1, None, None, 1e-5)[0]  # a third output, other values
    assert torch.equal(y3, snapshot)
    assert other.data_ptr() not in (y3.data_ptr(), _address(first))


def test_memory_is_handed_out_again_once_every_tensor_on_it_is_gone(pool):
    x3 = torch.randn(4, 3, 5)
    y3 = cpu.forward_train(x3, None, None, 1e-5)[0]
    address, view = y3.data_ptr(), y3[:, 1]
    del y3
    other = cpu.forward_train(x3, None, None, 1e-5)[0]
    assert other.data_ptr() != address  # the view lives
    del view
    assert cpu.forward_train(x3, None, None, 1e-5)[0].data_ptr() == address
    assert pool.owned_bytes == 2 * x3.numel() * 4


def test_training_with_the_pool_matches_training_without_it_bitwise(monkeypatch):
    # Keep the outputs and gradients of every other step and drop the rest: the pool reuses
    # the dropped ones' memory, and must never overwrite one that is kept.
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")

    def train(min_bytes):
        pool = BufferPool(limit=64 * MIB)
        monkeypatch.setattr(cpu_buffers, "_pool", pool)
        monkeypatch.setattr(cpu_buffers, "MIN_BYTES", min_bytes)
        torch.manual_seed(0)
        bn = batchnorm.BatchNorm2d(3)
        kept, copies = [], []
        for step in range(6):
            x = (torch.randn(5, 3, 4, 4) * (step + 1)).requires_grad_()
            y = bn(x)
            grads = torch.autograd.grad((y * y.detach()).sum(), (x, bn.weight, bn.bias))
            if step % 2 == 0:
                kept += [y.detach(), *grads]
                copies += [t.clone() for t in (y, *grads)]
        return kept, copies, bn.state_dict(), pool.owned_bytes

    kept, copies, state, owned = train(min_bytes=0)
    _, plain, plain_state, _ = train(min_bytes=float("inf"))
    output_bytes = 5 * 3 * 4 * 4 * 4
    assert owned < 2 * 6 * output_bytes  # y and dx of six steps: some memory was reused
    for now, copy, reference in zip(kept, copies, plain, strict=True):
        assert torch.equal(now, copy)  # nothing kept was overwritten later
        assert torch.equal(copy, reference)
    for name, value in plain_state.items():
        assert torch.equal(state[name], value), name


def test_the_limit_bounds_what_the_pool_owns():
    pool = BufferPool(limit=3 * MIB)
    a = pool.empty((MIB,), np.uint8)
    b = pool.empty((2, MIB), np.uint8)
    c = pool.empty((MIB,), np.uint8)  # over the limit with a and b alive: not pooled
    assert pool.owned_bytes == 3 * MIB
    del c
    assert pool.owned_bytes == 3 * MIB
    del a
    d = pool.empty((2 * MIB,), np.uint8)  # a is idle but too small: not pooled either
    assert pool.owned_bytes == 3 * MIB
    assert d.nbytes == 2 * MIB and b.nbytes == 2 * MIB


def test_idle_buffers_make_room_oldest_first():
    pool = BufferPool(limit=3 * MIB)
    a, b, c = (pool.empty((MIB,), np.uint8) for _ in range(3))
    address_c = _address(c)
    del a, b, c
    d = pool.empty((2 * MIB,), np.uint8)  # drops a and b, the oldest idle ones
    assert pool.owned_bytes == 3 * MIB
    assert _address(pool.empty((MIB,), np.uint8)) == address_c  # c was kept
    assert d.nbytes == 2 * MIB


def test_the_buffer_handed_out_last_is_reused_first():
    pool = BufferPool(limit=8 * MIB)
    a, b, c = (pool.empty((MIB,), np.uint8) for _ in range(3))
    addresses = [_address(t) for t in (a, b, c)]
    del a, b, c
    assert _address(pool.empty((MIB,), np.uint8)) == addresses[2]  # c, handed out last
    b = pool.empty((MIB,), np.uint8)  # c is idle again (the last array is gone): c once more
    assert _address(b) == addresses[2]
    a = pool.empty((MIB,), np.uint8)  # c is in use: b's old buffer, the next most recent
    assert _address(a) == addresses[1]


def test_idle_buffers_handed_out_longest_ago_are_evicted_first():
    pool = BufferPool(limit=8 * MIB)
    arrays = [pool.empty((MIB,), np.uint8) for _ in range(3)]  # created in the order 0, 1, 2
    addresses = [_address(t) for t in arrays]
    del arrays
    # Handed out again in the reverse order (the last handed out first): 2, then 1, then 0.
    taken = [pool.empty((MIB,), np.uint8) for _ in range(3)]
    assert [_address(t) for t in taken] == addresses[::-1]
    del taken[2], taken[0]  # 0 and 2 idle; 2 was handed out longest ago, 0 created first
    pool.limit = 4 * MIB
    assert pool.empty((2 * MIB,), np.uint8).nbytes == 2 * MIB  # room for it: one must go
    assert pool.owned_bytes == 4 * MIB
    assert _address(pool.empty((MIB,), np.uint8)) == addresses[0]  # 0 was kept, 2 dropped


def test_clear_drops_idle_buffers_and_keeps_those_in_use():
    pool = BufferPool(limit=8 * MIB)
    kept, freed = pool.empty((MIB,), np.float32), pool.empty((MIB,), np.float32)
    kept[:] = 7.0
    del freed
    pool.clear()
    assert pool.owned_bytes == 4 * MIB
    assert (kept == 7.0).all()


def test_a_zero_limit_allocates_outside_the_pool():
    pool = BufferPool(limit=0)
    out = pool.empty((3, 5), np.float64)
    assert out.shape == (3, 5) and out.dtype == np.float64 and out.flags.c_contiguous
    assert pool.owned_bytes == 0


@pytest.mark.parametrize("text, limit", [("0", 0), ("1.5", 3 * MIB // 2), ("2048", 2048 * MIB)])
def test_the_limit_comes_from_the_environment(monkeypatch, text, limit):
    monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", text)
    monkeypatch.setattr(cpu_buffers, "_pool", None)
    assert cpu_buffers.pool().limit == limit


@pytest.mark.parametrize("text", ["lots", "-1", "nan"])
def test_a_bad_limit_in_the_environment_is_refused(monkeypatch, text):
    monkeypatch.setenv("BATCHNORM_CPU_CACHE_MB", text)
    monkeypatch.setattr(cpu_buffers, "_pool", None)
    with pytest.raises(ValueError, match=r"BATCHNORM_CPU_CACHE_MB must be a number of MiB >= 0 "
                                         rf"\(got '{text}'\); set it to 0"):
        cpu_buffers.pool()
