"""``fold`` against direct computation: the layer, then the BN's inference formula."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as tF
from tolerances import assert_close
from torch import nn

import batchnorm
from batchnorm.fold import fold
from batchnorm.frozen import FrozenBatchNorm2d
from batchnorm.renorm import BatchRenorm1d


@dataclass(frozen=True)
class Case:
    name: str
    layer: str  # constructor call in torch.nn
    bn: str  # "torch", "ours", "frozen", "renorm", "no-affine"
    shape: tuple  # input shape


CASES = [
    Case("conv1d", "Conv1d(4, 6, 3)", "torch", (2, 4, 9)),
    Case("conv2d-no-bias", "Conv2d(3, 6, 3, bias=False)", "ours", (2, 3, 7, 6)),
    Case("conv2d-groups-3", "Conv2d(6, 9, 3, groups=3, padding=1)", "torch", (2, 6, 5, 5)),
    Case("conv2d-frozen-bn", "Conv2d(3, 4, 1)", "frozen", (2, 3, 4, 4)),
    Case("conv3d-no-affine-bn", "Conv3d(2, 3, 2)", "no-affine", (2, 2, 3, 4, 3)),
    Case("convT1d", "ConvTranspose1d(4, 6, 3, stride=2)", "ours", (2, 4, 5)),
    Case("convT2d-groups-2-no-bias", "ConvTranspose2d(4, 6, 3, groups=2, bias=False)",
         "torch", (2, 4, 3, 4)),
    Case("convT3d-groups-3", "ConvTranspose3d(3, 6, 2, groups=3)", "ours", (1, 3, 2, 3, 2)),
    Case("linear", "Linear(5, 7)", "torch", (4, 5)),
    Case("linear-no-bias-renorm", "Linear(5, 7, bias=False)", "renorm", (4, 5)),
]


def _bn(kind: str, channels: int, rank: int) -> nn.Module:
    g = torch.Generator().manual_seed(channels)
    if kind == "frozen":
        bn = FrozenBatchNorm2d(channels)
    elif kind == "renorm":
        bn = BatchRenorm1d(channels)
    else:
        module = nn if kind in ("torch", "no-affine") else batchnorm
        bn = getattr(module, f"BatchNorm{rank}d")(channels, affine=kind != "no-affine",
                                                  eps=1e-3)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 2)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.2)
    return bn


def _model(case: Case) -> nn.Sequential:
    torch.manual_seed(0)
    layer = eval(f"nn.{case.layer}")  # the table holds constructor calls
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    rank = max(len(case.shape) - 2, 1)
    return nn.Sequential(layer, _bn(case.bn, channels, rank), nn.ReLU()).double().eval()


def _direct(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layer, then the BN's inference formula, written out."""
    z = model[0](x)
    bn = model[1]
    view = (1, -1) + (1,) * (z.dim() - 2)
    z = (z - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + bn.eps)
    if bn.weight is not None:
        z = z * bn.weight.view(view) + bn.bias.view(view)
    return torch.relu(z)


def _scale(bn) -> torch.Tensor:
    weight = 1 if bn.weight is None else bn.weight.detach()
    return weight / torch.sqrt(bn.running_var + bn.eps)


def _expected_weight(layer, scale):
    """Each output channel's filter times its scale, one channel at a time."""
    w = layer.weight.detach().clone()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        per_group_in, per_group_out = w.shape[0] // layer.groups, w.shape[1]
        for out in range(layer.out_channels):
            group, j = divmod(out, per_group_out)
            rows = slice(group * per_group_in, (group + 1) * per_group_in)
            w[rows, j] *= scale[out]
    else:
        for out in range(w.shape[0]):
            w[out] *= scale[out]
    return w


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_folded_model_equals_layer_then_bn(case):
    model = _model(case)
    original = copy.deepcopy(model)
    x = torch.randn(case.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    folded = fold(model)
    assert isinstance(folded[1], nn.Identity)
    assert_close(folded(x), _direct(model, x))
    assert_close(folded[0].weight, _expected_weight(model[0], _scale(model[1])), msg="weight")
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), f"the original changed: {name}"


class Block(nn.Module):
    """A residual block: BN layers as attributes, called from forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), _bn("torch", 3, 2)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), _bn("ours", 3, 2)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(tF.relu(self.bn1(self.conv1(x))))))


def test_general_modules_through_the_fx_graph():
    model = nn.Sequential(Block(), Block()).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded = fold(model)
    assert all(isinstance(m, nn.Identity) for b in folded for m in (b.bn1, b.bn2))
    assert type(folded[0]) is Block
    assert_close(folded(x), model(x))


class Untraceable(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.bn = inner, _bn("torch", 4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.inner(x))


def test_without_a_graph_sequential_children_still_fold():
    inner = nn.Sequential(nn.Conv2d(2, 4, 1), _bn("ours", 4, 2), nn.Conv2d(4, 4, 1))
    model = Untraceable(inner).double().eval()
    with pytest.raises(ValueError, match="torch.fx cannot trace the model"):
        fold(model, strict=True)  # the outer BN follows a Sequential, not a conv
    model.bn = nn.Identity()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    folded = fold(model)
    assert isinstance(folded.inner[1], nn.Identity)
    assert_close(folded(x), model(x))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) + z


ERRORS = [
    ("after-relu", lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),
     "its input comes from"),
    ("first-layer", lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)),
     "its input comes from"),
    ("output-used-twice", SharedOutput, "also used elsewhere"),
    ("conv-called-twice",
     lambda: (lambda c: nn.Sequential(c, nn.BatchNorm2d(3), c))(nn.Conv2d(3, 3, 1)),
     "called more than once"),
    ("no-running-stats",
     lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
     "no running statistics"),
    ("channel-mismatch", lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)),
     "has 5 channels but '0' before it has 4 outputs"),
    ("lone-bn", lambda: nn.BatchNorm2d(3), "nothing precedes it"),
]


@pytest.mark.parametrize("build,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_refusals_name_the_problem_and_change_nothing(build, match):
    model = build().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fold(model, inplace=True, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("build", [e[1] for e in ERRORS[:4]], ids=[e[0] for e in ERRORS[:4]])
def test_by_default_what_cannot_fold_is_left_and_named(build, caplog):
    model = build().eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    with caplog.at_level("INFO", logger="batchnorm"), \
            pytest.warns(UserWarning, match=r"folded 0 batch-norm layer\(s\) and left 1"):
        folded = fold(model)
    assert "fold: left" in caplog.text
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected)


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        fold(model)


def test_inplace_changes_the_model_itself():
    model = _model(CASES[0])
    x = torch.randn(CASES[0].shape, dtype=torch.float64)
    expected = model(x)
    assert fold(model, inplace=True) is model
    assert isinstance(model[1], nn.Identity)
    assert_close(model(x), expected)
