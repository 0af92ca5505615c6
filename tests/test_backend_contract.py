"""Every backend of ``batchnorm.kernels`` keeps the contract, phase by phase.

Each phase of each backend (eager, numba, and Triton under its interpreter) against a float64
truth written out here from the phase's definition, and each backend's fused fast paths against
the composition of its own phases. Shapes are small and odd, in both memory layouts.
"""

import pytest
import torch
import triton_interpreter
from tolerances import assert_close

from batchnorm.kernels import backend as backend_module
from batchnorm.kernels import eager


@pytest.fixture(params=triton_interpreter.installed("eager"))
def backend(request):
    if request.param == "triton":
        return triton_interpreter.backend()
    return backend_module(request.param)


SHAPES = {"N2_C3_L7": (2, 3, 7), "one_channel": (4, 1, 9), "L1": (16, 5, 1),
          "N3_C4_L30": (3, 4, 30)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape(request):
    return SHAPES[request.param]


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    return DTYPES[request.param]


@pytest.fixture(params=["ncl", "channels_last"])
def layout(request):
    return request.param


def _tensors(shape, dtype, layout, seed=0):
    """x3 (offset and scaled per channel), dy3, weight, and two per-channel vectors."""
    n, c, length = shape
    g = torch.Generator().manual_seed(seed)
    offset = torch.empty(1, c, 1, dtype=torch.float64).uniform_(-3, 3, generator=g)
    x = offset + torch.randn(shape, generator=g, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    vectors = [torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3)]

    def laid_out(t):
        t = t.to(dtype)
        return t if layout == "ncl" else t.transpose(1, 2).contiguous().transpose(1, 2)

    return laid_out(x), laid_out(dy), [v.to(dtype) for v in vectors]


def _skip_unless_supported(backend, x3):
    if not backend.supports(x3, None, False):
        pytest.skip(f"{backend.__name__} does not take this call")


def _same_layout(a, b):
    """The same memory order (strides of size-1 dimensions are arbitrary)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True)
               if n > 1)


def _per_channel(v):
    return v.double().view(1, -1, 1)


def test_stats(backend, shape, dtype, layout):
    x3, _, _ = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    count, mean, m2 = backend.stats(x3)
    x = x3.double()
    assert count == shape[0] * shape[2]
    assert mean.dtype == m2.dtype == torch.float64
    truth_mean = x.mean((0, 2))
    assert_close(mean, truth_mean, dtype)
    assert_close(m2, (x - _per_channel(truth_mean)).square().sum((0, 2)), dtype)


@pytest.mark.parametrize("centered", [False, True], ids=["no_center", "center"])
def test_forward_eval(backend, shape, dtype, layout, centered):
    x3, _, (scale, shift, center) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    acc = eager.acc_dtype(dtype)
    y3 = backend.forward_eval(x3, scale.to(acc), shift.to(acc), None, False,
                              center if centered else None)
    assert y3.dtype == dtype and _same_layout(y3, x3)
    x = x3.double() - (_per_channel(center) if centered else 0)
    assert_close(y3, x * _per_channel(scale) + _per_channel(shift), dtype)


def _statistics(x3):
    """Saved statistics as the training forward leaves them, in the accumulation dtype."""
    acc = eager.acc_dtype(x3.dtype)
    var, mean = torch.var_mean(x3.double(), dim=(0, 2), correction=0)
    return mean.to(acc), torch.rsqrt(var + 1e-5).to(acc)


def test_grad_sums(backend, shape, dtype, layout):
    x3, dy3, _ = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    mean, rstd = _statistics(x3)
    s_dz, s_dz_x_hat = backend.grad_sums(dy3, x3, None, mean, rstd)
    x_hat = (x3.double() - _per_channel(mean)) * _per_channel(rstd)
    assert_close(s_dz, dy3.double().sum((0, 2)), dtype)
    assert_close(s_dz_x_hat, (dy3.double() * x_hat).sum((0, 2)), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["through_stats", "fixed_stats"])
def test_grad_input(backend, shape, dtype, layout, training):
    x3, dy3, (weight, mean_dz, mean_dz_x_hat) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    mean, rstd = _statistics(x3)
    means = (mean_dz.to(mean.dtype), mean_dz_x_hat.to(mean.dtype)) if training else (None, None)
    dx3, dres3 = backend.grad_input(dy3, x3, None, mean, rstd, weight, *means)
    assert dres3 is None and _same_layout(dx3, x3)
    x_hat = (x3.double() - _per_channel(mean)) * _per_channel(rstd)
    g = dy3.double()
    if training:
        g = g - _per_channel(mean_dz) - x_hat * _per_channel(mean_dz_x_hat)
    assert_close(dx3, g * _per_channel(weight) * _per_channel(rstd), dtype)


def test_fused_forward_is_the_composition_of_the_phases(backend, shape, dtype, layout):
    x3, _, (weight, bias, _) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    y3, mean, rstd, var = backend.forward_train(x3, weight, bias, 1e-5)
    count, mean64, m2 = backend.stats(x3)
    assert_close(mean, mean64, dtype)
    assert_close(var, m2 / count, dtype)
    assert_close(rstd, torch.rsqrt(m2 / count + 1e-5), dtype)
    center = eager.pivot(x3)
    scale, shift = eager.affine(weight, bias, mean64, torch.rsqrt(m2 / count + 1e-5), center)
    acc = eager.acc_dtype(dtype)
    composed = backend.forward_eval(x3, scale.to(acc), shift.to(acc), None, False, center)
    assert_close(y3, composed, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_fused_backward_is_the_composition_of_the_phases(backend, shape, dtype, layout,
                                                         training):
    x3, dy3, (weight, _, _) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    mean, rstd = _statistics(x3)
    dx3, dweight, dbias, dres3 = backend.backward(dy3, x3, None, mean, rstd, weight, training)
    s_dz, s_dz_x_hat = backend.grad_sums(dy3, x3, None, mean, rstd)
    m = shape[0] * shape[2]
    means = (s_dz / m, s_dz_x_hat / m) if training else (None, None)
    composed, _ = backend.grad_input(dy3, x3, None, mean, rstd, weight, *means)
    assert dres3 is None
    assert_close(dbias, s_dz, dtype)
    assert_close(dweight, s_dz_x_hat, dtype)
    assert_close(dx3, composed, dtype)


@pytest.mark.parametrize("count", ["int", "tensor"])
@pytest.mark.parametrize("momentum", [0.1, -0.5, None], ids=["0.1", "-0.5", "cumulative"])
def test_update_running_stats(backend, momentum, count):
    g = torch.Generator().manual_seed(5)
    running = [torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5]
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g)
    spec = [t.double() for t in running]
    counter, spec_counter = torch.tensor(3), torch.tensor(3)
    m = 12 if count == "int" else torch.tensor(12.0, dtype=torch.float64)
    backend.update_running_stats(*running, counter, mean, var, m, momentum)
    eager.update_running_stats(*spec, spec_counter, mean.double(), var.double(), 12, momentum)
    for actual, expected in zip(running, spec, strict=True):
        assert_close(actual, expected, torch.float32)
    assert int(counter) == int(spec_counter) == 4


@pytest.mark.parametrize("bad", ["nan_mean", "single_value"])
def test_update_running_stats_keeps_everything_for_a_batch_without_statistics(backend, bad):
    running = [torch.zeros(3), torch.ones(3)]
    mean, var = torch.tensor([1.0, float("nan") if bad == "nan_mean" else 2.0, 3.0]), torch.ones(3)
    counter = torch.tensor(5)
    backend.update_running_stats(*running, counter, mean, var, 1 if bad == "single_value" else 8,
                                 0.1)
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))
    assert int(counter) == 5



def test_forward_eval_into_its_own_input(backend, shape, dtype, layout):
    """``out=x3`` (in-place ABN): the input's memory takes the output, nothing else moves."""
    x3, _, (scale, shift, _) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    acc = eager.acc_dtype(dtype)
    center = eager.pivot(x3).clone()
    expected = (x3.double() - _per_channel(center)) * _per_channel(scale) + _per_channel(shift)
    pointer = x3.data_ptr()
    y3 = backend.forward_eval(x3, scale.to(acc), shift.to(acc), None, False, center, out=x3)
    assert y3.data_ptr() == pointer and y3.stride() == x3.stride()
    assert_close(x3, expected, dtype)


# The activations of in-place ABN, written out from their definitions in float64.
ACTIVATIONS = {
    "leaky_relu": (0.2, lambda u, p: torch.where(u < 0, u * p, u)),
    "elu": (0.7, lambda u, p: torch.where(u < 0, p * torch.expm1(u), u)),
    "identity": (0.0, lambda u, p: u),
}


@pytest.fixture(params=list(ACTIVATIONS))
def activation(request):
    return request.param


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_activate(backend, shape, dtype, layout, activation, with_residual):
    x3, dy3, _ = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    param, act = ACTIVATIONS[activation]
    residual3 = dy3 if with_residual else None
    expected = act(x3.double() + (dy3.double() if with_residual else 0), param)
    z3 = backend.activate(x3, residual3, activation, param)
    assert z3 is x3
    assert_close(z3, expected, dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_invert_activation(backend, shape, dtype, layout, activation, with_residual):
    """From ``z = act(y + r)`` and ``dz``: ``y`` and ``dy = dz * act'``, by autograd in
    float64 on the activation itself."""
    x3, dy3, _ = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    param, act = ACTIVATIONS[activation]
    residual3 = _tensors(shape, dtype, layout, seed=1)[0] if with_residual else None
    u = x3.double().requires_grad_()
    z = act(u, param)
    (grad,) = torch.autograd.grad(z, u, dy3.double())
    y_truth = u.detach() - (residual3.double() if with_residual else 0)
    y3, dy = backend.invert_activation(z.detach().to(dtype), dy3, residual3, activation, param)
    assert y3.dtype == dy.dtype == eager.acc_dtype(dtype) and _same_layout(y3, x3)
    # z rounded to the dtype, then inverted: y carries z's rounding, times 1/param below 0
    scale = 1 / param if activation == "leaky_relu" else 1
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12)}[dtype]
    torch.testing.assert_close(y3.double(), y_truth, rtol=rtol * scale, atol=atol * scale * 10)
    assert_close(dy, grad, dtype)


def test_forward_train_into_its_own_input(backend, shape, dtype, layout):
    x3, _, (weight, bias, _) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    expected, mean, rstd, var = backend.forward_train(x3, weight, bias, 1e-5)
    pointer = x3.data_ptr()
    y3, mean2, rstd2, var2 = backend.forward_train(x3, weight, bias, 1e-5, out=x3)
    assert y3.data_ptr() == pointer
    for a, b in ((x3, expected), (mean2, mean), (rstd2, rstd), (var2, var)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_fused_inplace_abn_backward_is_the_composition_of_the_phases(
        shape, dtype, layout, activation, training, with_residual):
    """numba's one-kernel backward of in-place ABN (the only backend that has one)."""
    pytest.importorskip("numba", reason="numba is not installed")
    backend = backend_module("numba")
    x3, dz3, (weight, mean, _) = _tensors(shape, dtype, layout)
    _skip_unless_supported(backend, x3)
    param, _ = ACTIVATIONS[activation]
    residual3 = _tensors(shape, dtype, layout, seed=1)[0] if with_residual else None
    acc = eager.acc_dtype(dtype)
    z3 = backend.activate(x3.clone(), residual3, activation, param)
    mean, rstd = mean.to(acc), (weight.abs() + 0.5).reciprocal().to(acc)
    dx3, dweight, dbias, dres3 = backend.inplace_abn_backward(
        dz3, z3, residual3, activation, param, mean, rstd, weight, training, True, True)
    y3, dy3 = backend.invert_activation(z3, dz3, residual3, activation, param)
    want = backend.backward(dy3, y3, None, mean, rstd, weight, training)
    for name, got, expected in (("dx", dx3, want[0]), ("dweight", dweight, want[1]),
                                ("dbias", dbias, want[2]), ("dres", dres3, dy3)):
        assert_close(got, expected, dtype, msg=name)
