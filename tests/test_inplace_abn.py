"""In-place ABN against BatchNorm (weight |gamma| + eps) followed by the activation, float64."""

import pytest
import torch
import triton_interpreter
from tolerances import assert_close

import batchnorm
from batchnorm.inplace_abn import InPlaceABN1d, InPlaceABN2d, inplace_abn

ACTS = {"leaky_relu": lambda y, p: torch.nn.functional.leaky_relu(y, p),
        "elu": lambda y, p: torch.nn.functional.elu(y, p),
        "identity": lambda y, p: y}


def _reference(x, layer, training, residual=None):
    """The ordinary BN + activation, with the layer's tensors and the scale |gamma| + eps."""
    weight = layer.weight.abs() + layer.eps
    y = torch.nn.functional.batch_norm(
        x, layer.running_mean.clone(), layer.running_var.clone(), weight, layer.bias,
        training=training, momentum=layer.momentum, eps=layer.eps)
    if residual is not None:
        y = y + residual
    return ACTS[layer.inplace_activation](y, layer.activation_param)


@pytest.fixture(params=triton_interpreter.installed("eager", "native"))
def backend(request):
    if request.param == "triton":
        triton_interpreter.backend()
    return request.param


def _layer(activation, param, training):
    layer = InPlaceABN2d(3, activation=activation, activation_param=param).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.7, -1.3, 0.0]))  # a negative and a zero gamma
        layer.bias.copy_(torch.tensor([0.2, -0.1, 0.4]))
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    return layer.train(training)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("leaky_relu", 0.3),
                                              ("elu", 1.0), ("identity", 0.0)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_outputs_gradients_and_statistics_match_bn_then_activation(
        backend, activation, param, training, channels_last, with_residual, monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    torch.manual_seed(0)
    layer = _layer(activation, param, training)
    reference = _layer(activation, param, training)
    reference.load_state_dict(layer.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    source = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(
        memory_format=fmt).requires_grad_()
    residual = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(
        memory_format=fmt).requires_grad_() if with_residual else None
    expected = _reference(source, reference, training, residual)
    x = source * 1.0  # a non-leaf, as a conv's output is
    z = layer(x, residual)
    assert z.data_ptr() == x.data_ptr()  # written over its input
    assert_close(z, expected)
    dz = torch.randn_like(z)
    extra = (residual,) if with_residual else ()
    got = torch.autograd.grad(z, (source, layer.weight, layer.bias, *extra), dz)
    want = torch.autograd.grad(expected, (source, reference.weight, reference.bias, *extra), dz)
    for name, a, b in zip(("input", "weight", "bias", "residual"), got, want, strict=False):
        assert_close(a, b, msg=name)
    if training:
        assert int(layer.num_batches_tracked) == 1
        torch.nn.functional.batch_norm(source.detach(), reference.running_mean,
                                       reference.running_var, training=True,
                                       momentum=layer.momentum)
        assert_close(layer.running_mean, reference.running_mean, msg="running_mean")
        assert_close(layer.running_var, reference.running_var, msg="running_var")


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_on_every_backend_matches_float64_truth(backend, channels_last, monkeypatch):
    """The backends' own float32 kernels (statistics, in-place normalization, activation and
    its inverse, backward at y) within float32's tolerance of the float64 layer."""
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    torch.manual_seed(1)
    truth = _layer("elu", 0.8, True)
    layer = _layer("elu", 0.8, True).float()
    layer.load_state_dict(truth.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    source = (torch.randn(6, 3, 7, 5, dtype=torch.float64) * 3 - 2).contiguous(memory_format=fmt)
    residual = torch.randn_like(source)
    x64, x32 = source.clone().requires_grad_(), source.float().requires_grad_()
    r64, r32 = residual.clone().requires_grad_(), residual.float().requires_grad_()
    z64, z32 = truth(x64 * 1.0, r64), layer(x32 * 1.0, r32)
    assert_close(z32, z64, torch.float32)
    dz = torch.randn_like(z64)
    for a, b in zip(torch.autograd.grad(z32, (x32, layer.weight, layer.bias, r32), dz.float()),
                    torch.autograd.grad(z64, (x64, truth.weight, truth.bias, r64), dz),
                    strict=True):
        assert_close(a, b, torch.float32)
    assert_close(layer.running_var, truth.running_var, torch.float32)


def test_running_statistics_move_as_batch_norms():
    layer, reference = InPlaceABN1d(4).double(), torch.nn.BatchNorm1d(4).double()
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64) + step
        reference(x)
        layer(x.clone())
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(layer, key).double(), getattr(reference, key).double(), msg=key)
    assert set(layer.state_dict()) == set(reference.state_dict())


def test_gradcheck():
    weight = torch.tensor([0.6, -1.4], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)

    def f(x, weight, bias):
        return inplace_abn(x * 1.0, None, None, weight, bias, training=True,
                           activation="leaky_relu", activation_param=0.2)

    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_it_keeps_less_for_backward_than_bn_then_activation():
    """Saved tensors of the graph: one full-size tensor for in-place ABN, two otherwise."""
    def full_size_saved(build):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        x = torch.randn(4, 8, 6, 6, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            build(x * 1.0)
        return sum(1 for n in sizes if n == x.numel())

    ours = InPlaceABN2d(8)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(0.01))
    assert full_size_saved(ours) == 1
    assert full_size_saved(theirs) >= 2


def test_refusals():
    with pytest.raises(ValueError, match="plain ReLU is not invertible"):
        InPlaceABN2d(3, activation="relu")
    with pytest.raises(ValueError, match="positive activation_param"):
        InPlaceABN2d(3, activation="leaky_relu", activation_param=0.0)
    with pytest.raises(ValueError, match="leaf that requires grad"):
        InPlaceABN2d(3)(torch.randn(2, 3, 2, 2, requires_grad=True))
    x = torch.randn(2, 3, 2, 2, requires_grad=True) * 1.0
    z = InPlaceABN2d(3)(x)
    z.add_(1)  # changing the saved output invalidates the backward, and autograd says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    x, residual = torch.randn(2, 3, 2, 2, requires_grad=True) * 1.0, torch.randn(2, 3, 2, 2)
    z = InPlaceABN2d(3)(x, residual)
    residual.mul_(2)  # so does changing the residual, which the backward reads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    x = torch.randn(2, 3, 2, 2, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="shares memory with the input"):
        InPlaceABN2d(3)(x, x[:])
    with pytest.raises(ValueError, match="residual must match the input"):
        InPlaceABN2d(3)(x, torch.randn(2, 3, 2, 1))


def test_exported_from_the_package():
    assert batchnorm.InPlaceABN2d is InPlaceABN2d


def test_an_eval_call_keeps_its_own_statistics_for_backward():
    layer = InPlaceABN2d(3).double().eval()
    source = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    z = layer(source * 1.0)
    expected = _reference(source, layer, False)
    layer.train()
    layer(torch.randn(4, 3, 4, 4, dtype=torch.float64))  # moves the running estimates
    dz = torch.randn_like(z)
    assert_close(torch.autograd.grad(z, source, dz)[0],
                 torch.autograd.grad(expected, source, dz)[0])


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.1), ("elu", 0.7),
                                              ("identity", 0.0)])
def test_numpy_reference_from_the_output_is_the_backward_from_the_input(activation, param):
    """``reference.inplace_abn_backward`` (from z alone) against Algorithm 1's backward from
    x through the activation's derivative, float64, and the layer on its backends against it."""
    import numpy as np

    from batchnorm import reference

    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (5, 3, 4))
    gamma, beta = np.array([0.8, -1.2, 0.0]), np.array([0.3, -0.4, 0.1])
    y, cache = reference.batch_norm_forward(x, np.abs(gamma) + 1e-5, beta)
    z = torch.from_numpy(y)
    act = ACTS[activation]
    u = z.clone().requires_grad_()
    dz = rng.normal(size=x.shape)
    (dy,) = torch.autograd.grad(act(u, param), u, torch.from_numpy(dz))
    z = act(z, param).numpy()
    want_dx, want_dscale, want_dbeta = reference.batch_norm_backward(dy.numpy(), cache)
    dx, dgamma, dbeta = reference.inplace_abn_backward(dz, z, gamma, beta, cache.rstd,
                                                       activation, param)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, np.sign(gamma) * want_dscale, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dbeta, want_dbeta, rtol=1e-9, atol=1e-11)
    weight = torch.tensor(gamma, requires_grad=True)
    bias = torch.tensor(beta, requires_grad=True)
    for backend in triton_interpreter.installed("eager", "native"):
        if backend == "triton":
            continue  # on CPU tensors under its interpreter: the layer test above runs it
        source = torch.tensor(x, requires_grad=True)
        out = inplace_abn(source * 1.0, None, None, weight, bias, training=True,
                          activation=activation, activation_param=param, backend=backend)
        got = torch.autograd.grad(out, (source, weight, bias), torch.from_numpy(dz))
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, (dx, dgamma, dbeta), strict=True):
            assert_close(a, torch.from_numpy(b), msg=f"{name} on {backend}")
