"""Tests of the NumPy reference (batchnorm/reference.py) against independent truths.

Truths used: float64 torch (functional and nn.BatchNorm{1,2,3}d, autograd for the gradients),
central finite differences, direct NumPy computations over concatenated batches, and the
paper's closed-form identities. Shapes are small and odd; γ and β are random and non-trivial,
because γ = 1, β = 0 can hide a wrong backward.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm.reference import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    inference_scale_shift,
    population_statistics,
    update_running_stats,
)

# One tolerance table, per dtype: float32 allows for the different summation orders of torch.
TOL = {
    np.float32: {"rtol": 1e-4, "atol": 1e-5},
    np.float64: {"rtol": 1e-10, "atol": 1e-11},
}

# Named cases: (name, shape, channel axis). Ranks 2..5; dense and convolutional layouts.
SHAPE_CASES = [
    ("dense_N2_D3", (2, 3), 1),
    ("dense_N5_D3", (5, 3), 1),
    ("dense_features_first_D3_N5", (3, 5), 0),
    ("conv1d_N3_C3_L7", (3, 3, 7), 1),
    ("conv1d_channels_last_N3_L7_C3", (3, 7, 3), -1),
    ("conv2d_N2_C3_H5_W4", (2, 3, 5, 4), 1),
    ("conv2d_channels_last_N2_H5_W4_C3", (2, 5, 4, 3), 3),
    ("conv3d_N2_C3_D3_H4_W5", (2, 3, 3, 4, 5), 1),
]
SHAPE_IDS = [case[0] for case in SHAPE_CASES]


def _data(shape, axis, seed, dtype=np.float64):
    """Random x (offset and scaled per channel), dy, and non-trivial γ, β."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offset = rng.uniform(-3.0, 3.0, channels).reshape(bshape)
    spread = rng.uniform(0.5, 4.0, channels).reshape(bshape)
    x = offset + spread * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.uniform(-1.0, 1.0, channels)
    return tuple(a.astype(dtype) for a in (x, dy, gamma, beta))


def _torch_batch_norm(x, dy, gamma, beta, eps, axis):
    """torch.nn.functional.batch_norm in training mode with autograd; channels moved to dim 1."""
    xt = torch.movedim(torch.tensor(x), axis, 1).requires_grad_()
    weight = torch.tensor(gamma, requires_grad=True)
    bias = torch.tensor(beta, requires_grad=True)
    y = F.batch_norm(xt, None, None, weight, bias, training=True, eps=eps)
    y.backward(torch.movedim(torch.tensor(dy), axis, 1))
    y, dx = (torch.movedim(t, 1, axis).detach().numpy() for t in (y, xt.grad))
    return y, dx, weight.grad.numpy(), bias.grad.numpy()


def _per_channel_view(a, axis):
    """(C, m) view of ``a``: one row per channel."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


# ---------------------------------------------------------------- Algorithm 1 against torch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, shape, axis", SHAPE_CASES, ids=SHAPE_IDS)
def test_forward_backward_match_torch_functional(name, shape, axis, dtype):
    x, dy, gamma, beta = _data(shape, axis, seed=len(name), dtype=dtype)
    y, cache = batch_norm_forward(x, gamma, beta, eps=1e-5, axis=axis)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    expected = _torch_batch_norm(x, dy, gamma, beta, 1e-5, axis)
    for got, want in zip((y, dx, dgamma, dbeta), expected, strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **TOL[dtype])


MODULE_CASES = [
    ("BatchNorm1d_dense_N4_C3", torch.nn.BatchNorm1d, (4, 3)),
    ("BatchNorm1d_seq_N3_C3_L7", torch.nn.BatchNorm1d, (3, 3, 7)),
    ("BatchNorm2d_N2_C3_H5_W4", torch.nn.BatchNorm2d, (2, 3, 5, 4)),
    ("BatchNorm3d_N2_C3_D3_H4_W5", torch.nn.BatchNorm3d, (2, 3, 3, 4, 5)),
]


@pytest.mark.parametrize("name, module_cls, shape", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_forward_backward_match_torch_modules(name, module_cls, shape):
    x, dy, gamma, beta = _data(shape, 1, seed=len(name))
    module = module_cls(shape[1], eps=1e-3).double().train()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
        module.bias.copy_(torch.tensor(beta))
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))

    y, cache = batch_norm_forward(x, gamma, beta, eps=1e-3)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[np.float64])
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[np.float64])
    np.testing.assert_allclose(dgamma, module.weight.grad.numpy(), **TOL[np.float64])
    np.testing.assert_allclose(dbeta, module.bias.grad.numpy(), **TOL[np.float64])


def test_cache_holds_biased_statistics_of_the_batch():
    x, _, gamma, beta = _data((5, 3, 7), 1, seed=3)
    _, cache = batch_norm_forward(x, gamma, beta, eps=1e-2)
    rows = _per_channel_view(x, 1)
    assert isinstance(cache, BatchNormCache)
    assert (cache.m, cache.axis) == (35, 1)
    np.testing.assert_allclose(cache.mean, rows.mean(axis=1), **TOL[np.float64])
    np.testing.assert_allclose(cache.var, rows.var(axis=1, ddof=0), **TOL[np.float64])
    np.testing.assert_allclose(cache.rstd, 1 / np.sqrt(rows.var(axis=1) + 1e-2), rtol=1e-12)


def test_half_and_integer_inputs_are_promoted():
    x, _, gamma, beta = _data((4, 3, 5), 1, seed=8)
    x16, gamma16, beta16 = (a.astype(np.float16) for a in (x, gamma, beta))
    y16, _ = batch_norm_forward(x16, gamma16, beta16)
    y64, _ = batch_norm_forward(*(a.astype(np.float64) for a in (x16, gamma16, beta16)))
    assert y16.dtype == np.float32  # statistics accumulate in float32, not float16
    np.testing.assert_allclose(y16, y64, **TOL[np.float32])
    y_int, _ = batch_norm_forward(np.arange(12).reshape(4, 3), [1, 2, 3], [0, 0, 0])
    assert y_int.dtype == np.float64


# ---------------------------------------------------------------- backward: finite differences

FD_CASES = [
    ("dense_N4_D3", (4, 3), 1),
    ("conv1d_N2_C3_L5", (2, 3, 5), 1),
    ("channels_last_N2_L3_C3", (2, 3, 3), -1),
]


def _central_difference(f, a, h=1e-6):
    """∂f/∂a for scalar f, by central differences, one element at a time."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        saved = a[i]
        a[i] = saved + h
        up = f()
        a[i] = saved - h
        down = f()
        a[i] = saved
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("name, shape, axis", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_backward_matches_finite_differences(name, shape, axis):
    x, w, gamma, beta = _data(shape, axis, seed=len(name) + 100)

    def loss():  # ℓ = Σ w·y, so ∂ℓ/∂y = w
        return float(np.sum(w * batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)[0]))

    _, cache = batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)
    dx, dgamma, dbeta = batch_norm_backward(w, cache)
    np.testing.assert_allclose(dx, _central_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, _central_difference(loss, gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, _central_difference(loss, beta), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the paper's identities


@pytest.mark.parametrize("name, shape, axis", SHAPE_CASES, ids=SHAPE_IDS)
def test_normalized_values_have_zero_mean_and_unit_variance(name, shape, axis):
    x, _, gamma, beta = _data(shape, axis, seed=len(name) + 200)
    _, cache = batch_norm_forward(x + 50.0, gamma, beta, eps=0.0, axis=axis)
    rows = _per_channel_view(cache.x_hat, cache.axis)
    np.testing.assert_allclose(rows.sum(axis=1), 0.0, atol=1e-11)
    np.testing.assert_allclose((rows**2).mean(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("a", [0.05, 0.7, 3.0, 250.0])
def test_scale_invariance_of_weights(a):
    """BN(a·W·u) = BN(W·u); ∂ℓ/∂u is unchanged and ∂ℓ/∂(aW) = (1/a)·∂ℓ/∂W (Section 3.3)."""
    rng = np.random.default_rng(int(a * 100))
    u = rng.standard_normal((5, 4))  # N=5 examples, K=4 inputs
    W = rng.standard_normal((3, 4))  # D=3 activations
    g = rng.standard_normal((5, 3))  # ∂ℓ/∂y of a linear loss ℓ = Σ g·y
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.uniform(-1.0, 1.0, 3)

    def grads(weight):
        y, cache = batch_norm_forward(u @ weight.T, gamma, beta, eps=0.0)
        dz = batch_norm_backward(g, cache)[0]  # ∂ℓ/∂(W·u); z = u·Wᵀ row-wise
        return y, dz @ weight, dz.T @ u  # y, ∂ℓ/∂u, ∂ℓ/∂W

    y, du, dW = grads(W)
    y_a, du_a, dW_a = grads(a * W)
    np.testing.assert_allclose(y_a, y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(du_a, du, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dW_a, dW / a, rtol=1e-9, atol=1e-12)


def test_constant_upstream_gradient_and_x_hat_direction_give_zero_dx():
    """dx is orthogonal to the directions 1 and x̂ along which normalization is invariant."""
    x, dy, gamma, beta = _data((3, 3, 7), 1, seed=11)
    _, cache = batch_norm_forward(x, gamma, beta, eps=0.0)  # so that mean x̂² is exactly 1
    bshape = (1, 3, 1)
    dy_invariant = np.full(3, 2.5).reshape(bshape) + np.array([0.3, -1.2, 2.0]).reshape(
        bshape) * cache.x_hat
    np.testing.assert_allclose(batch_norm_backward(dy_invariant, cache)[0], 0.0, atol=1e-11)


# ---------------------------------------------------------------- Algorithm 2

POP_CASES = [
    ("dense_4x_N5_D3", 4, (5, 3), 1),
    ("conv1d_3x_N2_C3_L7", 3, (2, 3, 7), 1),
    ("conv2d_channels_last_5x_N2_H3_W2_C3", 5, (2, 3, 2, 3), -1),
]


@pytest.mark.parametrize("name, k, shape, axis", POP_CASES, ids=[c[0] for c in POP_CASES])
def test_population_statistics_match_direct_computation(name, k, shape, axis):
    batches = [_data(shape, axis, seed=10 * i + len(name))[0] + i for i in range(k)]
    pop_mean, pop_var = population_statistics(iter(batches), axis=axis)

    # Equal-size batches: the mean of batch means is the mean over all the data.
    everything = _per_channel_view(np.concatenate(batches, axis=0), axis)
    np.testing.assert_allclose(pop_mean, everything.mean(axis=1), **TOL[np.float64])
    # m/(m-1)·E_B[σ²_B] is the average of the per-batch unbiased (ddof=1) variances.
    unbiased = [_per_channel_view(b, axis).var(axis=1, ddof=1) for b in batches]
    np.testing.assert_allclose(pop_var, np.mean(unbiased, axis=0), **TOL[np.float64])


@pytest.mark.parametrize("name, shape, axis", SHAPE_CASES, ids=SHAPE_IDS)
def test_folded_inference_equals_unfolded_and_torch_eval(name, shape, axis):
    x, _, gamma, beta = _data(shape, axis, seed=len(name) + 300)
    rng = np.random.default_rng(len(name))
    pop_mean, pop_var = rng.normal(size=gamma.shape), rng.uniform(0.1, 3.0, gamma.shape)
    folded = batch_norm_inference(x, gamma, beta, pop_mean, pop_var, eps=1e-3, axis=axis)
    unfolded = batch_norm_inference(x, gamma, beta, pop_mean, pop_var, 1e-3, axis, folded=False)
    np.testing.assert_allclose(folded, unfolded, **TOL[np.float64])

    xt = torch.movedim(torch.tensor(x), axis, 1)
    want = F.batch_norm(xt, torch.tensor(pop_mean), torch.tensor(pop_var), torch.tensor(gamma),
                        torch.tensor(beta), training=False, eps=1e-3)
    np.testing.assert_allclose(folded, torch.movedim(want, 1, axis).numpy(), **TOL[np.float64])

    scale, shift = inference_scale_shift(gamma, beta, pop_mean, pop_var, eps=1e-3)
    np.testing.assert_allclose(scale * np.sqrt(pop_var + 1e-3), gamma, **TOL[np.float64])
    np.testing.assert_allclose(shift + scale * pop_mean, beta, **TOL[np.float64])


# ---------------------------------------------------------------- torch's moving average

EMA_CASES = [
    ("BatchNorm1d_dense_momentum_0.1", torch.nn.BatchNorm1d, (5, 3), 0.1),
    ("BatchNorm2d_momentum_0.3", torch.nn.BatchNorm2d, (2, 3, 5, 4), 0.3),
    ("BatchNorm3d_momentum_1.0", torch.nn.BatchNorm3d, (2, 3, 2, 3, 2), 1.0),
]


@pytest.mark.parametrize("name, module_cls, shape, momentum", EMA_CASES,
                         ids=[c[0] for c in EMA_CASES])
def test_running_stats_match_torch_module(name, module_cls, shape, momentum):
    module = module_cls(3, momentum=momentum).double().train()
    running_mean, running_var = np.zeros(3), np.ones(3)  # torch's initial buffers
    for step in range(4):
        x, _, gamma, beta = _data(shape, 1, seed=step + len(name))
        module(torch.tensor(x + step))
        _, cache = batch_norm_forward(x + step, gamma, beta)
        running_mean, running_var = update_running_stats(
            running_mean, running_var, cache.mean, cache.var, cache.m, momentum)
    np.testing.assert_allclose(running_mean, module.running_mean.numpy(), **TOL[np.float64])
    np.testing.assert_allclose(running_var, module.running_var.numpy(), **TOL[np.float64])


def test_cumulative_average_equals_algorithm_2():
    """torch's momentum=None (weight 1/k at step k) is Algorithm 2's plain average."""
    batches = [_data((2, 3, 7), 1, seed=s)[0] * (s + 1) for s in range(5)]
    module = torch.nn.BatchNorm1d(3, momentum=None).double().train()
    running_mean, running_var = np.zeros(3), np.ones(3)
    for k, x in enumerate(batches, start=1):
        module(torch.tensor(x))
        _, cache = batch_norm_forward(x, np.ones(3), np.zeros(3))
        running_mean, running_var = update_running_stats(
            running_mean, running_var, cache.mean, cache.var, cache.m, momentum=1 / k)
    pop_mean, pop_var = population_statistics(batches)
    np.testing.assert_allclose(module.running_mean.numpy(), pop_mean, **TOL[np.float64])
    np.testing.assert_allclose(module.running_var.numpy(), pop_var, **TOL[np.float64])
    np.testing.assert_allclose(running_mean, pop_mean, **TOL[np.float64])
    np.testing.assert_allclose(running_var, pop_var, **TOL[np.float64])


def test_update_running_stats_leaves_its_inputs_untouched():
    running_mean, running_var = np.array([0.5, 1.0]), np.array([2.0, 3.0])
    update_running_stats(running_mean, running_var, np.ones(2), np.ones(2), m=3)
    np.testing.assert_array_equal(running_mean, [0.5, 1.0])
    np.testing.assert_array_equal(running_var, [2.0, 3.0])


# ---------------------------------------------------------------- errors at the boundary

_X = np.arange(24.0).reshape(2, 3, 4)
_C = np.ones(3)
_CACHE = batch_norm_forward(_X, _C, _C)[1]
ERROR_CASES = [
    ("x_complex", TypeError, "x must hold real numbers",
     lambda: batch_norm_forward(_X + 1j, _C, _C)),
    ("x_rank_1", ValueError, "at least 2 dimensions", lambda: batch_norm_forward(_C, _C, _C)),
    ("axis_not_int", TypeError, "axis must be an int",
     lambda: batch_norm_forward(_X, _C, _C, axis=1.0)),
    ("axis_out_of_range", ValueError, r"axis must be in \[-3, 2\]",
     lambda: batch_norm_forward(_X, _C, _C, axis=3)),
    ("gamma_shape", ValueError, r"gamma must have shape \(3,\)",
     lambda: batch_norm_forward(_X, np.ones(4), _C)),
    ("beta_shape", ValueError, r"beta must have shape \(3,\)",
     lambda: batch_norm_forward(_X, _C, np.ones((3, 1)))),
    ("eps_negative", ValueError, "eps must be a finite number >= 0",
     lambda: batch_norm_forward(_X, _C, _C, eps=-1e-5)),
    ("eps_nan", ValueError, "eps must be a finite number >= 0",
     lambda: batch_norm_forward(_X, _C, _C, eps=float("nan"))),
    ("forward_m_1", ValueError, "at least 2 values per channel",
     lambda: batch_norm_forward(np.ones((1, 3)), _C, _C)),
    ("constant_channel_eps_0", ValueError, r"channels \[1\] are constant",
     lambda: batch_norm_forward(np.array([[1.0, 2.0, 3.0], [4.0, 2.0, 6.0]]), _C, _C, eps=0)),
    ("dy_shape", ValueError, r"dy must have the shape of the forward's x, \(2, 3, 4\)",
     lambda: batch_norm_backward(np.ones((2, 3)), _CACHE)),
    ("population_empty", ValueError, "batches is empty", lambda: population_statistics([])),
    ("population_m_1", ValueError, r"needs m >= 2 .* has m=1",
     lambda: population_statistics([np.ones((1, 3))])),
    ("population_channels_differ", ValueError, r"batches\[1\] of shape \(2, 4, 4\) has C=4",
     lambda: population_statistics([_X, np.ones((2, 4, 4))])),
    ("population_m_differs", ValueError, r"batches\[1\] of shape \(1, 3, 4\) has C=3, m=4",
     lambda: population_statistics([_X, _X[:1]])),
    ("population_batch_dtype", TypeError, r"batches\[0\] must hold real numbers",
     lambda: population_statistics([_X.astype(object)])),
    ("scale_shift_gamma_rank", ValueError, "gamma must be 1-D",
     lambda: inference_scale_shift(np.ones((3, 1)), _C, _C, _C)),
    ("scale_shift_pop_mean_shape", ValueError, r"pop_mean must have shape \(3,\)",
     lambda: inference_scale_shift(_C, _C, np.ones(2), _C)),
    ("scale_shift_negative_var", ValueError, "pop_var \\+ eps must be > 0",
     lambda: inference_scale_shift(_C, _C, _C, [1.0, -0.5, 1.0])),
    ("scale_shift_zero_var_eps_0", ValueError, "pop_var \\+ eps must be > 0",
     lambda: inference_scale_shift(_C, _C, _C, [1.0, 0.0, 1.0], eps=0.0)),
    ("inference_gamma_shape", ValueError, r"gamma must have shape \(4,\)",
     lambda: batch_norm_inference(_X, _C, _C, _C, _C, axis=2)),
    ("running_mean_rank", ValueError, "running_mean must be 1-D",
     lambda: update_running_stats(np.ones((3, 1)), _C, _C, _C, m=4)),
    ("running_var_shape", ValueError, r"running_var must have shape \(3,\)",
     lambda: update_running_stats(_C, np.ones(2), _C, _C, m=4)),
    ("running_m_1", ValueError, "needs an integer m >= 2; got m=1",
     lambda: update_running_stats(_C, _C, _C, _C, m=1)),
    ("running_m_float", ValueError, "needs an integer m >= 2; got m=4.0",
     lambda: update_running_stats(_C, _C, _C, _C, m=4.0)),
    ("momentum_out_of_range", ValueError, r"momentum must be in \[0, 1\]",
     lambda: update_running_stats(_C, _C, _C, _C, m=4, momentum=1.5)),
]


@pytest.mark.parametrize("name, error, match, call", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_raises_clear_error(name, error, match, call):
    with pytest.raises(error, match=match) as info:
        call()
    assert "Fix:" in str(info.value)


# ---------------------------------------------------------------- property test


@st.composite
def _shape_and_axis(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(2, 4))] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
    axis = draw(st.integers(-rank, rank - 1))
    if axis % rank == 0 and all(d == 1 for d in shape[1:]):
        shape[1] = 2  # the batch axis holds the channels: keep m >= 2 values per channel
    return tuple(shape), axis, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(_shape_and_axis())
def test_random_shapes_match_torch_and_gradient_identities(case):
    shape, axis, seed = case
    x, dy, gamma, beta = _data(shape, axis, seed)
    y, cache = batch_norm_forward(x, gamma, beta, eps=1e-4, axis=axis)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    expected = _torch_batch_norm(x, dy, gamma, beta, 1e-4, axis)
    for got, want in zip((y, dx, dgamma, dbeta), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    # Σ dx = 0 and Σ dx·x̂ = 0 per channel: with eps = 0, ℓ cannot change under a shift or a
    # scaling of x within a channel (with eps > 0 the scaling changes x̂ slightly).
    _, cache = batch_norm_forward(x, gamma, beta, eps=0.0, axis=axis)
    dx = batch_norm_backward(dy, cache)[0]
    dx_rows = _per_channel_view(dx, axis)
    x_hat_rows = _per_channel_view(cache.x_hat, axis)
    scale = np.abs(gamma * cache.rstd).max() * np.abs(dy).max()  # the size of a term of dx
    np.testing.assert_allclose(dx_rows.sum(axis=1) / scale, 0.0, atol=1e-10)
    np.testing.assert_allclose((dx_rows * x_hat_rows).sum(axis=1) / scale, 0.0, atol=1e-10)
