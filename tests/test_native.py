"""The small-input path: ``auto`` on torch's own op, with this package's guard and semantics.

Below ``batchnorm.kernels.CROSSOVER`` elements a call runs torch's ``native_batch_norm``; a
plain layer reaches it by ``functional.layer_call``, with only the checks that depend on the
tensors. Everything here is compared with torch.nn (the layer the path must match) and with
the eager backend (the package's specification).
"""

import copy

import pytest
import torch
from tolerances import assert_close

import batchnorm
from batchnorm import functional
from batchnorm.kernels import CROSSOVER, resolve

LAYERS = {2: (torch.nn.BatchNorm1d, batchnorm.BatchNorm1d),
          3: (torch.nn.BatchNorm1d, batchnorm.BatchNorm1d),
          4: (torch.nn.BatchNorm2d, batchnorm.BatchNorm2d),
          5: (torch.nn.BatchNorm3d, batchnorm.BatchNorm3d)}


def test_auto_takes_torchs_op_below_the_crossover_only():
    small = torch.zeros(2, 3, 4)
    assert resolve("auto", small, None, False, True) == "native"
    assert resolve("auto", small, None, False, False) == "native"
    if batchnorm.kernels.backend("numba").available():
        side = int((CROSSOVER["numba", True, "contiguous"] / 8) ** 0.5) + 1
        big = torch.zeros(2, 4, side, side)
        assert resolve("auto", big, None, False, True) == "numba"
        channels_last = big.contiguous(memory_format=torch.channels_last)
        below = CROSSOVER["numba", True, "channels_last"] > big.numel()
        assert resolve("auto", channels_last, None, False, True) == ("native" if below
                                                                     else "numba")


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 4, 5, 2), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_layers_match_torch_nn(shape, channels_last, momentum):
    """Outputs, gradients, running statistics and the counter over training and eval steps."""
    if channels_last and len(shape) < 4:
        pytest.skip("channels-last needs 4 or 5 dims")
    theirs_cls, ours_cls = LAYERS[len(shape)]
    theirs = theirs_cls(shape[1], momentum=momentum).double()
    ours = ours_cls(shape[1], momentum=momentum).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + step
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [layer(xi) for layer, xi in zip((theirs, ours), xs, strict=True)]
        assert ys[1].stride() == ys[0].stride()
        assert_close(ys[1], ys[0])
        grads = [torch.autograd.grad(y.square().sum(), (xi, layer.weight, layer.bias))
                 for y, xi, layer in zip(ys, xs, (theirs, ours), strict=True)]
        for mine, ref in zip(grads[1], grads[0], strict=True):
            assert_close(mine, ref)
    for name, buffer in theirs.state_dict().items():
        assert_close(ours.state_dict()[name].double(), buffer.double(), msg=name)
    theirs.eval()
    ours.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_float32_layers_match_torch_nn(dtype):
    theirs, ours = torch.nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    assert_close(ours(x), theirs(x))
    assert_close(ours.running_var, theirs.running_var, dtype=dtype)


def test_a_non_finite_batch_changes_nothing_and_backward_still_runs():
    layer = batchnorm.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = float("inf")
    x.requires_grad_()
    layer(x).sum().backward()  # the statistics were written back behind autograd's back
    assert x.grad is not None
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_the_device_guard_without_host_reads_agrees():
    """The branch of ``native.train`` that chooses with ``torch.where`` (CUDA, compile)."""
    layer = batchnorm.BatchNorm1d(3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    good, bad = torch.randn(8, 3), torch.randn(8, 3)
    bad[3, 0] = float("nan")
    reference = torch.nn.BatchNorm1d(3)
    compiled(good)
    reference(good)
    compiled(bad.requires_grad_()).sum().backward()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, msg=name)


def test_the_layer_path_keeps_the_clear_errors():
    layer = batchnorm.BatchNorm2d(3)
    layer.weight = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(functional.ShapeError, match=r"weight has shape \(4,\)"):
        layer(torch.randn(2, 3, 2, 2))
    layer = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    layer.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive"):
        layer(torch.randn(2, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 0


def test_statistics_of_another_dtype_go_to_the_eager_backend():
    """torch's op takes one dtype for every per-channel tensor; this package takes any."""
    x = torch.randn(6, 3, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float32), torch.ones(3, dtype=torch.float32)
    y = functional.batch_norm(x, mean, var, training=True)
    expected_mean = 0.1 * x.mean(0)
    assert_close(mean, expected_mean, dtype=torch.float32)
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_an_expanded_running_statistic_is_refused_not_corrupted():
    layer = batchnorm.BatchNorm1d(3)
    layer.running_mean = torch.zeros(1).expand(3)
    with pytest.raises(ValueError, match="expanded tensor"):
        layer(torch.randn(4, 3))


def test_small_float32_calls_are_torch_nns_bit_for_bit():
    theirs, ours = torch.nn.BatchNorm2d(5), batchnorm.BatchNorm2d(5)
    x = (1e3 + torch.randn(4, 5, 3, 3)).requires_grad_()
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    dy = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(y_ours, x, dy)[0],
                               torch.autograd.grad(y_theirs, x, dy)[0], rtol=0, atol=0)
