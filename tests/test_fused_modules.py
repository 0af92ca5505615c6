"""BatchNormAct1d/2d/3d: batch norm, residual and ReLU in one call, against torch.nn."""

import pytest
import torch
from tolerances import assert_close

import batchnorm

CASES = [  # (name, our class, torch's class, shape, with residual, activation)
    ("1d-relu", batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d, (6, 3, 5), False, "relu"),
    ("2d-add-relu", batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 4, 5, 3), True, "relu"),
    ("3d-add-none", batchnorm.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 2), True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_separate_torch_ops(case):
    _, ours_cls, torch_cls, shape, with_residual, activation = case
    ours = ours_cls(shape[1], dtype=torch.float64, activation=activation)
    theirs = torch_cls(shape[1], dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        res = torch.randn(shape, dtype=torch.float64, requires_grad=True) if with_residual \
            else None
        y = ours(x, res) if with_residual else ours(x)
        z = theirs(x) + (res if with_residual else 0)
        z = torch.relu(z) if activation == "relu" else z
        assert_close(y, z)
        dy = torch.randn_like(y)
        inputs = [x, ours.weight] + ([res] if with_residual else [])
        reference = [x, theirs.weight] + ([res] if with_residual else [])
        for g, g_ref in zip(torch.autograd.grad(y, inputs, dy),
                            torch.autograd.grad(z, reference, dy), strict=True):
            assert_close(g, g_ref)
        assert_close(ours.running_var, theirs.running_var)


def test_ghost_chunks_split_the_residual_too():
    layer = batchnorm.BatchNormAct1d(3, virtual_batch_size=2, dtype=torch.float64)
    x, res = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    reference = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    expected = torch.cat([torch.relu(reference(x[i:i + 2]) + res[i:i + 2]) for i in (0, 2)])
    assert_close(layer(x, res), expected)
    with pytest.raises(ValueError, match="residual must match the input"):
        layer(x, res[:3])


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        batchnorm.BatchNormAct2d(3, activation="tanh")
