"""``recalibrate`` against Algorithm 2 computed directly and by the NumPy reference."""

import copy

import numpy as np
import pytest
import torch
from tolerances import assert_close
from torch import nn

import batchnorm
from batchnorm.frozen import FrozenBatchNorm2d
from batchnorm.recalibrate import recalibrate
from batchnorm.reference import population_statistics
from batchnorm.renorm import BatchRenorm2d


def _model(second=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 1), second or batchnorm.BatchNorm2d(5),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 6), nn.BatchNorm1d(6, momentum=None),
    ).double()
    with torch.no_grad():  # stale statistics and non-trivial parameters
        for layer in (model[1], model[4], model[7]):
            layer.running_mean.fill_(7.0)
            layer.running_var.fill_(0.01)
            if isinstance(getattr(layer, "num_batches_tracked", None), torch.Tensor):
                layer.num_batches_tracked.fill_(1000)
            if layer.weight is not None:
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
    return model


def _batches(count=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
            for _ in range(count)]


def _train_bn(z, bn, k=None):
    """Algorithm 1 written out: normalize by the batch's (or each chunk's) statistics."""
    if k is not None and z.shape[0] > k:
        return torch.cat([_train_bn(chunk, bn) for chunk in z.split(k)])
    dims = [0] + list(range(2, z.dim()))
    view = (1, -1) + (1,) * (z.dim() - 2)
    y = (z - z.mean(dims, keepdim=True)) / torch.sqrt(z.var(dims, correction=0, keepdim=True)
                                                      + bn.eps)
    return y * bn.weight.view(view) + bn.bias.view(view)


def _bn_inputs(model, x, k=None):
    """The inputs of the three BN layers in the training network, computed directly."""
    z1 = model[0](x)
    z2 = model[3](torch.relu(_train_bn(z1, model[1])))
    z3 = model[6](_train_bn(z2, model[4], k).flatten(1))
    return z1, z2, z3


def _algorithm_2(inputs):
    """E_B[mu_B] and m/(m-1) E_B[sigma_B^2] for equal-size batches."""
    dims = [0] + list(range(2, inputs[0].dim()))
    m = inputs[0].numel() // inputs[0].shape[1]
    means = torch.stack([z.mean(dims) for z in inputs])
    variances = torch.stack([z.var(dims, correction=0) for z in inputs])
    return means.mean(0), variances.mean(0) * m / (m - 1)


def test_equals_algorithm_2_over_the_batches():
    model = _model().eval()
    weights = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" not in k
                             and "num_batches" not in k})
    batches = _batches()
    with torch.no_grad():
        inputs = list(zip(*[_bn_inputs(model, x) for x in batches], strict=True))
    assert recalibrate(model, batches) is model
    assert not any(m.training for m in model.modules())
    for layer, zs in zip((model[1], model[4], model[7]), inputs, strict=True):
        mean, var = _algorithm_2(zs)
        assert_close(layer.running_mean, mean)
        assert_close(layer.running_var, var)
        assert int(layer.num_batches_tracked) == len(batches)
        ref_mean, ref_var = population_statistics([z.numpy() for z in zs])
        np.testing.assert_allclose(layer.running_mean.numpy(), ref_mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), ref_var, rtol=1e-10, atol=1e-12)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_num_batches_tuples_and_restored_mixed_modes():
    model = _model().train()
    model[2].eval()
    batches = _batches(count=5)
    with torch.no_grad():
        inputs = list(zip(*[_bn_inputs(model, x) for x in batches[:2]], strict=True))
    loader = ((x, torch.zeros(len(x))) for x in batches)  # (input, target), read once
    recalibrate(model, loader, num_batches=2)
    assert [m.training for m in model] == [True, True, False] + [True] * 5
    mean, var = _algorithm_2(inputs[2])
    assert_close(model[7].running_mean, mean)
    assert_close(model[7].running_var, var)
    assert int(model[7].num_batches_tracked) == 2


def test_ghost_chunks_are_batches_and_renorm_is_plain_batch_norm():
    model = _model(second=batchnorm.BatchNorm2d(5, virtual_batch_size=4)).eval()
    batches = _batches(count=3, n=8)
    with torch.no_grad():
        inputs = list(zip(*[_bn_inputs(model, x, k=4) for x in batches], strict=True))
    recalibrate(model, batches)
    chunks = [c for z in inputs[1] for c in z.split(4)]
    mean, var = _algorithm_2(chunks)
    assert_close(model[4].running_mean, mean)
    assert_close(model[4].running_var, var)
    assert int(model[4].num_batches_tracked) == 6
    mean, var = _algorithm_2(inputs[2])  # the layer after: inputs normalized chunk by chunk
    assert_close(model[7].running_mean, mean)

    renorm = BatchRenorm2d(5, r_max=3.0, d_max=5.0, dtype=torch.float64)
    model = _model(second=renorm).eval()
    with torch.no_grad():
        inputs = list(zip(*[_bn_inputs(model, x) for x in batches], strict=True))
    recalibrate(model, batches)
    mean, var = _algorithm_2(inputs[2])
    assert_close(model[7].running_var, var)
    assert (renorm.r_max, renorm.d_max) == (3.0, 5.0)


def test_frozen_and_untracked_layers_are_left_alone():
    frozen = FrozenBatchNorm2d(5, dtype=torch.float64)
    model = _model(second=frozen).eval()
    model.insert(2, nn.BatchNorm2d(4, track_running_stats=False).double())
    recalibrate(model, _batches(count=2))
    assert torch.all(frozen.running_mean == 7.0) and torch.all(frozen.running_var == 0.01)
    assert int(model[1].num_batches_tracked) == 2


def test_a_failing_batch_restores_everything():
    model = _model().eval()
    before = copy.deepcopy(model.state_dict())
    batches = _batches(count=2) + [torch.randn(6, 2, 5, 5, dtype=torch.float64)]
    with pytest.raises(RuntimeError):
        recalibrate(model, batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


BAD_CALLS = [
    ("num-batches-zero", lambda: recalibrate(_model(), _batches(), num_batches=0),
     ValueError, "num_batches must be a positive int"),
    ("no-batches", lambda: recalibrate(_model(), []), ValueError, "no batch"),
    ("no-bn", lambda: recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)]), ValueError,
     "no batch-norm layer"),
    ("dict-batch", lambda: recalibrate(_model(), [{"x": torch.randn(2, 3, 5, 5)}]), TypeError,
     "each batch must be a tensor"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in BAD_CALLS],
                         ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()
