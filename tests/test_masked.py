"""Masked batch norm against batch norm on the gathered counted positions (float64)."""

import pytest
import torch
import triton_interpreter
from tolerances import assert_close

import batchnorm
from batchnorm.functional import batch_norm


def _case(seed=0, shape=(4, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    lengths = torch.tensor([7, 3, 5, 1])[: shape[0]]
    mask = torch.arange(shape[2]).expand(shape[0], -1) < lengths[:, None]
    x.data[~mask.unsqueeze(1).expand_as(x)] = 1e3  # padding far off: counting it would show
    return x, mask


def _gathered(x, mask):
    """The counted positions as an (m, C) batch for torch.nn.functional.batch_norm."""
    return x.transpose(1, 2)[mask]


@pytest.fixture(params=triton_interpreter.installed("auto", "eager"))
def backend(request):
    if request.param == "triton":
        triton_interpreter.backend()
    return request.param


def test_statistics_outputs_and_gradients_are_those_of_the_counted_positions(backend):
    x, mask = _case()
    weight = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = batch_norm(x, mean, var, weight, bias, training=True, momentum=0.5, mask=mask,
                   backend=backend)
    rmean, rvar = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(_gathered(x, mask), rmean, rvar, weight, bias,
                                              training=True, momentum=0.5)
    assert_close(_gathered(y, mask), expected)
    assert_close(mean, rmean)
    assert_close(var, rvar)
    dy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad((y * dy * mask.unsqueeze(1)).sum(), (x, weight, bias))
    want = torch.autograd.grad((expected * _gathered(dy, mask)).sum(), (x, weight, bias))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_backend_is_the_torch_ops_definition_with_gradients_everywhere(backend,
                                                                             channels_last):
    """On the backend's phases, against ``masked.train`` (torch ops, autograd's gradients):
    outputs at every position, and the gradients of a loss on the padding's outputs too."""
    from batchnorm import masked

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    mask = torch.rand(3, 5, 6, generator=g) < 0.6
    weight = torch.tensor([0.5, -1.5, 2.0, 0.9], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    y = batch_norm(x, None, None, weight, bias, training=True, mask=mask, backend=backend)
    expected = masked.train(x, mask, weight, bias, 1e-5)[0]
    assert_close(y, expected)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, (x, weight, bias), dy),
                    torch.autograd.grad(expected, (x, weight, bias), dy), strict=True):
        assert_close(a, b)


def test_double_backward_follows_the_definition():
    x, mask = _case(shape=(3, 2, 4))
    x.data[~mask.unsqueeze(1).expand_as(x)] = 0.5  # padding near the data: second order terms
    weight = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: batch_norm(x, None, None, w, training=True, mask=mask), (x, weight))


def test_padding_is_normalized_with_the_same_statistics():
    x, mask = _case()
    y = batch_norm(x, None, None, training=True, mask=mask)
    counted = _gathered(x, mask)
    mean, var = counted.mean(0), counted.var(0, unbiased=False)
    assert_close(y, (x - mean.view(1, -1, 1)) / (var.view(1, -1, 1) + 1e-5).sqrt())


def test_gradcheck():
    x, mask = _case(shape=(3, 2, 4))
    weight = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: batch_norm(x, None, None, w, training=True, mask=mask), (x, weight))


def test_the_module_takes_a_mask_and_eval_ignores_it():
    x, mask = _case()
    layer = batchnorm.BatchNorm1d(3).double()
    reference = torch.nn.BatchNorm1d(3).double()
    layer(x, mask=mask)
    reference(_gathered(x, mask))
    for key, value in reference.state_dict().items():
        assert_close(layer.state_dict()[key].double(), value.double(), msg=key)
    layer.eval()
    reference.eval()
    assert_close(layer(x, mask=mask), reference(x))


def test_ghost_batches_split_the_mask_too():
    x, mask = _case()
    layer = batchnorm.BatchNorm1d(3, virtual_batch_size=2).double()
    y = layer(x, mask=mask)
    first = batch_norm(x[:2], None, None, training=True, mask=mask[:2])
    assert_close(y[:2], first)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("bad,error,match", [
    (lambda m: m.float(), TypeError, "mask must be a bool tensor"),
    (lambda m: m[:, :3], ValueError, r"the input's shape without the channel dim, \(4, 7\)"),
    (lambda m: torch.zeros_like(m).index_fill_(1, torch.tensor([0]), True)[:1].expand(4, -1)
     & torch.tensor([True, False, False, False])[:, None], ValueError, "counts 1 value"),
])
def test_bad_masks_are_refused_and_move_nothing(bad, error, match):
    x, mask = _case()
    layer = batchnorm.BatchNorm1d(3).double()
    with pytest.raises(error, match=match):
        layer(x, mask=bad(mask))
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=torch.float64))
