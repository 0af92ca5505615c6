"""batchnorm.functional.batch_norm against torch and first principles."""

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from batchnorm.functional import batch_norm

BACKENDS = ["eager", "auto"]


def _params(c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return weight.requires_grad_(), bias.requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(backend, training):
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight, bias = _params(2)
    mean, var = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def f(x, weight, bias):
        # Fresh running statistics each call: training mutates them in place.
        return batch_norm(x, mean.clone(), var.clone(), weight, bias, training=training,
                          backend=backend)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_and_residual_gradients(training):
    x = (torch.randn(4, 3, 6, dtype=torch.float64) + 0.3).requires_grad_()
    residual = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = _params(3)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, weight, bias, residual):
        return batch_norm(x, mean.clone(), var.clone(), weight, bias, training=training,
                          activation="relu", residual=residual)

    expected = torch.relu(tF.batch_norm(x, mean.clone(), var.clone(), weight, bias,
                                        training=training) + residual)
    assert_close(f(x, weight, bias, residual), expected)
    assert torch.autograd.gradcheck(f, (x, weight, bias, residual))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias, residual))


@pytest.mark.parametrize("backend", ["eager", "numba"])
def test_large_mean_small_std_normalizes_accurately(backend):
    # The shifted sums of this package's kernels; below the crossover ``auto`` runs torch's
    # own op, whose numerics are torch.nn's (tests/test_native.py).
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(32, 4, 64, generator=g, dtype=torch.float64)).float()
    y = batch_norm(x, None, None, training=True, backend=backend)
    # The truth: float64 arithmetic on the same (float32-rounded) input.
    x64 = x.double()
    mean = x64.mean(dim=(0, 2), keepdim=True)
    std = x64.var(dim=(0, 2), unbiased=False, keepdim=True).add(1e-5).sqrt()
    truth = (x64 - mean) / std
    assert (y.double() - truth).abs().max() < 1e-2  # in units of the input's std


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_batch_leaves_running_stats_unchanged(backend, bad):
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = bad
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    counter = torch.tensor(4)
    before = (mean.clone(), var.clone())
    y = batch_norm(x, mean, var, training=True, num_batches_tracked=counter, backend=backend)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
    assert int(counter) == 4
    assert not torch.isfinite(y[:, 2]).all()  # the output still shows the bad values
    assert torch.isfinite(y[:, 0]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    x = torch.randn(16, 3, 40, dtype=torch.float64) * 3 + 50
    weight, bias = _params(3)
    mean, var = torch.zeros(3), torch.ones(3)
    y = batch_norm(x.to(dtype), mean, var, weight.detach().float(), bias.detach().float(),
                   training=True)
    assert y.dtype == dtype and mean.dtype == torch.float32
    expected_mean, expected_var = torch.zeros(3, dtype=torch.float64), torch.ones(3,
                                                                               dtype=torch.float64)
    x_rounded = x.to(dtype).double()
    expected = tF.batch_norm(x_rounded, expected_mean, expected_var, weight.detach(),
                             bias.detach(), training=True)
    assert_close(y, expected, dtype=dtype)
    assert_close(mean.double(), expected_mean, dtype=torch.float32)
    assert_close(var.double(), expected_var, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    weight, bias = _params(3, dtype=torch.float32)
    mean, var, counter = torch.randn(3), torch.rand(3), torch.tensor(2)
    before = (mean.clone(), var.clone())
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = batch_norm(x, mean, var, weight, bias, training=True, num_batches_tracked=counter,
                   backend=backend)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(3)) and x.grad.shape == x.shape
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1]) and int(counter) == 2


def test_cumulative_average_with_momentum_none():
    batches = [torch.randn(5, 2, 3, dtype=torch.float64) + k for k in range(4)]
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    counter = torch.tensor(0)
    for x in batches:
        batch_norm(x, mean, var, training=True, momentum=None, num_batches_tracked=counter)
    # Algorithm 2: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[sigma_B^2], here with m = 15.
    mus = torch.stack([x.mean(dim=(0, 2)) for x in batches])
    variances = torch.stack([x.var(dim=(0, 2), unbiased=True) for x in batches])
    assert_close(mean, mus.mean(0))
    assert_close(var, variances.mean(0))
    assert int(counter) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_after_one_step_from_first_principles(backend):
    x = torch.randn(6, 3, 7, dtype=torch.float64) * 2 + 1
    mean, var = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 2.0,
                                                                       dtype=torch.float64)
    y = batch_norm(x, mean, var, training=True, momentum=0.25, backend=backend)
    assert_close(mean, 0.75 * 0.5 + 0.25 * x.mean(dim=(0, 2)))
    assert_close(var, 0.75 * 2.0 + 0.25 * x.var(dim=(0, 2), unbiased=True))
    # Algorithm 1 with eps -> 0: zero mean, unit (biased) variance per channel.
    assert_close(y.mean(dim=(0, 2)), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(y.var(dim=(0, 2), unbiased=False), torch.ones(3, dtype=torch.float64),
                          atol=1e-4)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown batch-norm backend 'no-such-backend'"):
        batch_norm(torch.randn(2, 3), None, None, training=True)
    monkeypatch.setenv("BATCHNORM_BACKEND", "eager")
    y = batch_norm(torch.randn(4, 3), None, None, training=True)
    assert y.shape == (4, 3)


def test_non_canonical_layout_is_normalized_correctly():
    base = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    x = base.permute(0, 3, 1, 2)  # (N, C=2, 5, 4) with a layout that is neither format
    expected = tF.batch_norm(x, None, None, training=True)
    assert_close(batch_norm(x, None, None, training=True), expected)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 5), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), max_size=3),
    training=st.booleans(), affine=st.booleans(), channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch_functional(n, c, spatial, training, affine, channels_last,
                                           seed):
    shape = (n, c, *spatial)
    if training and n * int(torch.tensor(spatial).prod()) < 2:
        n, shape = 2, (2, c, *spatial)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    weight, bias = _params(c, seed=seed) if affine else (None, None)
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.1
    mean_ref, var_ref = mean.clone(), var.clone()
    y = batch_norm(x, mean, var, weight, bias, training=training, momentum=0.2)
    expected = tF.batch_norm(x, mean_ref, var_ref, weight, bias, training=training, momentum=0.2)
    assert_close(y, expected)
    assert y.stride() == expected.stride()
    assert_close(mean, mean_ref)
    assert_close(var, var_ref)


def _transform_cases():
    """Each torch.func / autograd.functional transform the issue tracker saw fail, as a function
    of the batch-norm function ``f(x, weight, bias)`` and its inputs."""
    def scalar(f):
        return lambda x, w, b: f(x, w, b).square().sum()

    return {
        "vmap": lambda f, x, w, b: torch.func.vmap(f, in_dims=(0, None, None))(
            torch.stack([x, 2 * x + 1]), w, b),
        "grad": lambda f, x, w, b: torch.func.grad(scalar(f), argnums=(0, 1, 2))(x, w, b),
        "jacrev": lambda f, x, w, b: torch.func.jacrev(f, argnums=(0, 1))(x, w, b),
        "jacfwd": lambda f, x, w, b: torch.func.jacfwd(f, argnums=(0, 1))(x, w, b),
        "jvp": lambda f, x, w, b: torch.func.jvp(f, (x, w, b), (torch.ones_like(x), w, b)),
        "hessian": lambda f, x, w, b: torch.func.hessian(scalar(f))(x, w, b),
        "jacobian_vectorized": lambda f, x, w, b: torch.autograd.functional.jacobian(
            f, (x, w, b), vectorize=True),
        "hessian_vectorized": lambda f, x, w, b: torch.autograd.functional.hessian(
            scalar(f), (x, w, b), vectorize=True),
    }


TRANSFORMS = _transform_cases()


@pytest.mark.parametrize("backend", BACKENDS + ["numba"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_function_transforms_match_torch(transform, training, backend):
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight, bias = (t.detach() for t in _params(3))
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def ours(x, w, b):
        return batch_norm(x, mean, var, w, b, training=training, backend=backend) \
            if not training else batch_norm(x, None, None, w, b, training=True, backend=backend)

    def theirs(x, w, b):
        return tF.batch_norm(x, mean, var, w, b, training=training) \
            if not training else tF.batch_norm(x, None, None, w, b, training=True)

    results = [TRANSFORMS[transform](f, x, weight, bias) for f in (ours, theirs)]
    flat = [torch.utils._pytree.tree_leaves(r) for r in results]
    assert len(flat[0]) == len(flat[1])
    for a, b in zip(*flat, strict=True):
        assert_close(a, b, msg=transform)


@pytest.mark.parametrize("backend", BACKENDS + ["numba"])
def test_gradcheck_with_batched_and_forward_gradients(backend):
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight, bias = _params(2)

    def f(x, weight, bias):
        return batch_norm(x, None, None, weight, bias, training=True, backend=backend)

    assert torch.autograd.gradcheck(f, (x, weight, bias), check_batched_grad=True,
                                    check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, weight, bias), check_fwd_over_rev=True,
                                        check_rev_over_rev=True)
