"""Frozen batch norm against the folded-affine formula and torch.nn in eval; ``freeze``."""

import copy

import pytest
import torch
from tolerances import assert_close

import batchnorm
from batchnorm import freeze
from batchnorm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.renorm import BatchRenorm1d
from batchnorm.sync import SyncBatchNorm

# (name, frozen class, torch class, input shape)
RANKS = [
    ("1d-dense", FrozenBatchNorm1d, torch.nn.BatchNorm1d, (5, 3)),
    ("1d-seq", FrozenBatchNorm1d, torch.nn.BatchNorm1d, (2, 3, 7)),
    ("2d", FrozenBatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 5, 4)),
    ("3d", FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 4)),
]


def _trained(cls, channels, seed=0, **kwargs):
    """A torch layer with non-trivial parameters and statistics."""
    layer = cls(channels, dtype=torch.float64, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=g))
        layer.running_mean.copy_(torch.randn(channels, generator=g) * 3)
        layer.running_var.copy_(torch.rand(channels, generator=g) * 4 + 0.1)
        layer.num_batches_tracked.fill_(17)
    return layer.eval()


def _x(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()


@pytest.mark.parametrize("name,frozen_cls,torch_cls,shape", RANKS, ids=[r[0] for r in RANKS])
def test_equals_the_folded_formula_and_torch_eval(name, frozen_cls, torch_cls, shape):
    trained = _trained(torch_cls, shape[1], eps=1e-3)
    frozen = frozen_cls(shape[1], eps=1e-3, dtype=torch.float64)
    frozen.load_state_dict(trained.state_dict())  # strict: num_batches_tracked is dropped
    x = _x(shape)
    # The formula as torchvision writes it: scale = w * rsqrt(rv + eps), shift = b - rm * scale.
    scale = trained.weight.detach() * (trained.running_var + 1e-3).rsqrt()
    shift = trained.bias.detach() - trained.running_mean * scale
    view = (1, -1) + (1,) * (len(shape) - 2)
    expected = x.detach() * scale.view(view) + shift.view(view)
    frozen.train()  # frozen means frozen: training mode changes nothing
    y = frozen(x)
    assert_close(y, expected, msg="folded formula")
    assert_close(y, trained(x.detach()), msg="torch.nn in eval")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(x.grad, dy * scale.view(view), msg="input gradient")


def test_all_four_tensors_are_buffers_and_the_layout_is_torchs():
    frozen = FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert sorted(name for name, _ in frozen.named_buffers()) == [
        "bias", "running_mean", "running_var", "weight"]
    expected = [k for k in torch.nn.BatchNorm2d(4).state_dict() if k != "num_batches_tracked"]
    assert list(frozen.state_dict()) == expected
    assert frozen.double().weight.dtype == torch.float64
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"


def test_wrong_rank_and_channels_are_errors():
    with pytest.raises(ValueError, match="expected 4D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm2d(3)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm1d(0)


def test_freeze_replaces_every_kind_and_keeps_eval_outputs():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), _trained(torch.nn.BatchNorm2d, 4, seed=1),
        batchnorm.convert(_trained(torch.nn.BatchNorm2d, 4, seed=2)),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5),
                            _trained(torch.nn.BatchNorm1d, 5, seed=3, affine=False)),
        BatchRenorm1d(5, dtype=torch.float64),
    ).double()
    with torch.no_grad():
        model[4].running_mean.fill_(0.5)
    reference = copy.deepcopy(model).eval()
    out = freeze(model)
    assert out is model
    kinds = [type(model[1]), type(model[2]), type(model[3][2]), type(model[4])]
    assert kinds == [FrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm1d, FrozenBatchNorm1d]
    assert torch.all(model[3][2].weight == 1) and torch.all(model[3][2].bias == 0)
    model.train()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    assert_close(model(x), reference(x))


def test_freeze_a_single_layer_and_refusals():
    trained = _trained(torch.nn.BatchNorm3d, 2)
    frozen = freeze(trained)
    assert type(frozen) is FrozenBatchNorm3d and frozen.eps == trained.eps
    assert frozen.running_var.data_ptr() != trained.running_var.data_ptr()  # a copy
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze(torch.nn.Sequential(torch.nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="freeze the model before convert_sync_batchnorm"):
        freeze(SyncBatchNorm(3))
