"""torch.compile(fullgraph=True) traces the modules without graph breaks and matches eager."""

import copy

import pytest
import torch

import batchnorm


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, bias=False), batchnorm.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 4, bias=False),
        batchnorm.BatchNorm1d(4, momentum=None),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_and_eval_match_eager(backend):
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for step in range(2):
        x = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(step))
        y, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y)
        y.square().sum().backward()
        y_c.square().sum().backward()
    torch.testing.assert_close(compiled_model[0].weight.grad, eager[0].weight.grad)
    for i in (1, 5):
        torch.testing.assert_close(compiled_model[i].running_mean, eager[i].running_mean)
        torch.testing.assert_close(compiled_model[i].running_var, eager[i].running_var)
        assert int(compiled_model[i].num_batches_tracked) == 2
    eager.eval()
    compiled.eval()
    x = torch.randn(3, 3, 7, 7)
    torch.testing.assert_close(compiled(x), eager(x))
