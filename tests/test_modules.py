"""BatchNorm1d/2d/3d against torch.nn over a named table of cases, step by step."""

import copy
from dataclasses import dataclass

import pytest
import torch
from tolerances import assert_close

import batchnorm


@dataclass(frozen=True)
class Case:
    name: str
    cls: str
    shape: tuple
    affine: bool = True
    track: bool = True
    momentum: float | None = 0.1
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    bias: bool = True


CASES = [
    Case("1d-dense", "BatchNorm1d", (6, 3)),
    Case("1d-seq", "BatchNorm1d", (4, 3, 7)),
    Case("2d", "BatchNorm2d", (2, 3, 5, 4)),
    Case("3d", "BatchNorm3d", (2, 3, 2, 3, 4)),
    Case("2d-no-affine", "BatchNorm2d", (3, 3, 4, 4), affine=False),
    Case("2d-no-track", "BatchNorm2d", (3, 3, 4, 4), track=False),
    Case("1d-no-affine-no-track", "BatchNorm1d", (5, 4, 3), affine=False, track=False),
    Case("2d-momentum-0.3", "BatchNorm2d", (2, 3, 5, 5), momentum=0.3),
    Case("2d-cumulative", "BatchNorm2d", (2, 3, 5, 5), momentum=None),
    Case("3d-cumulative", "BatchNorm3d", (2, 2, 3, 2, 3), momentum=None),
    Case("1d-float32", "BatchNorm1d", (16, 5), dtype=torch.float32),
    Case("2d-float32", "BatchNorm2d", (4, 3, 6, 6), dtype=torch.float32),
    Case("2d-channels-last", "BatchNorm2d", (2, 3, 5, 4), channels_last=True),
    Case("2d-f32-channels-last", "BatchNorm2d", (4, 5, 3, 3), dtype=torch.float32,
         channels_last=True),
    Case("3d-channels-last", "BatchNorm3d", (2, 3, 2, 3, 2), channels_last=True),
    Case("2d-weight-no-bias", "BatchNorm2d", (2, 3, 4, 3), bias=False),
]


def _input(case: Case, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g, dtype=torch.float64) * 2.5 + 0.7
    x = x.to(case.dtype)
    if case.channels_last:
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x.requires_grad_()


def _pair(case: Case):
    kwargs = dict(eps=1e-5, momentum=case.momentum, affine=case.affine,
                  track_running_stats=case.track, dtype=case.dtype)
    if not case.bias:
        kwargs["bias"] = False
    ours = getattr(batchnorm, case.cls)(case.shape[1], **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    theirs = getattr(torch.nn, case.cls)(case.shape[1], **torch_kwargs)
    if not case.bias:  # torch's own bias=False came after 2.11: drop the parameter
        theirs.register_parameter("bias", None)
    if case.affine:  # non-trivial parameters: ones and zeros can hide a wrong backward
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            theirs.weight.copy_(torch.rand(case.shape[1], generator=g) + 0.5)
            if case.bias:
                theirs.bias.copy_(torch.randn(case.shape[1], generator=g))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(ours, theirs, case, seed):
    x = _input(case, seed)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    assert_close(y, y_ref, msg="output")
    assert y.stride() == y_ref.stride(), "memory layout"
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x.grad, x_ref.grad, msg="input gradient")
    assert x.grad.stride() == x_ref.grad.stride()
    if case.affine:
        assert_close(ours.weight.grad, theirs.weight.grad, msg="weight gradient")
        if case.bias:
            assert_close(ours.bias.grad, theirs.bias.grad, msg="bias gradient")
    for name in ("running_mean", "running_var"):
        if case.track:
            assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
        else:
            assert getattr(ours, name) is None
    if case.track:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_torch_nn_over_training_and_eval(case):
    ours, theirs = _pair(case)
    for seed in range(3):
        _step(ours, theirs, case, seed)
    ours.eval()
    theirs.eval()
    _step(ours, theirs, case, seed=10)
    ours.zero_grad()
    theirs.zero_grad()
    with torch.no_grad():
        assert_close(ours(_input(case, 11)), theirs(_input(case, 11)))


@pytest.mark.parametrize("case", CASES[:10], ids=lambda c: c.name)
def test_state_dict_round_trip_with_torch(case):
    ours, theirs = _pair(case)
    for seed in range(2):
        ours(_input(case, seed))
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    fresh_torch = getattr(torch.nn, case.cls)(case.shape[1], momentum=case.momentum,
                                              affine=case.affine, dtype=case.dtype,
                                              track_running_stats=case.track)
    fresh_torch.load_state_dict(state)
    back = getattr(batchnorm, case.cls)(case.shape[1], momentum=case.momentum,
                                        affine=case.affine, dtype=case.dtype,
                                        track_running_stats=case.track)
    back.load_state_dict(fresh_torch.state_dict())
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("metadata", ["version-1", "none"])
def test_state_dict_without_num_batches_tracked_loads_as_torch_does(metadata):
    # A checkpoint from before num_batches_tracked existed (version 1), or a partial state_dict
    # without metadata (strict=False): torch keeps the layer's own count.
    theirs = torch.nn.BatchNorm2d(3)
    theirs.running_mean.fill_(0.25)
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    if metadata == "version-1":
        state._metadata[""]["version"] = 1
    else:
        del state._metadata
    results = []
    for layer in (batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        layer.num_batches_tracked.fill_(7)
        layer.load_state_dict(state, strict=metadata == "version-1")
        assert torch.all(layer.running_mean == 0.25)
        results.append(int(layer.num_batches_tracked))
    assert results[0] == results[1] == 7


def test_reset_running_stats_and_parameters():
    bn = batchnorm.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0)
    bn(torch.randn(8, 4) * 5 + 2)
    bn.reset_running_stats()
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert int(bn.num_batches_tracked) == 0
    assert torch.all(bn.weight == 3.0)
    bn.reset_parameters()
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_repr_and_one_docstring_template():
    assert repr(batchnorm.BatchNorm2d(5, momentum=None)) == (
        "BatchNorm2d(5, eps=1e-05, momentum=None, affine=True, bias=True, "
        "track_running_stats=True)")
    docs = [getattr(batchnorm, f"BatchNorm{k}d").__doc__ for k in (1, 2, 3)]
    assert all("Args:" in d and "Shape:" in d and ">>>" in d for d in docs)
    assert "4D" in docs[1] and "5D" in docs[2]


def test_convert_keeps_tensors_mode_and_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5),
                            torch.nn.BatchNorm1d(5, momentum=None)),
        torch.nn.Unflatten(1, (5, 1, 1, 1)), torch.nn.BatchNorm3d(5, affine=False),
    ).double()
    model[3][2].eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(model)
    weight = model[1].weight
    converted = batchnorm.convert(model)
    assert converted is model
    assert type(model[1]) is batchnorm.BatchNorm2d and model[1].weight is weight
    assert type(model[3][2]) is batchnorm.BatchNorm1d and not model[3][2].training
    assert type(model[5]) is batchnorm.BatchNorm3d and model[5].weight is None
    assert model[3][2].momentum is None
    assert_close(model(x), reference(x))
    assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_convert_a_single_layer_returns_the_replacement():
    layer = torch.nn.BatchNorm1d(3, track_running_stats=False)
    new = batchnorm.convert(layer)
    assert type(new) is batchnorm.BatchNorm1d and new.running_mean is None


def test_convert_replaces_torch_sync_batchnorm_keeping_its_process_group():
    torch.manual_seed(0)
    group = object()  # stands for a process group: the attribute is carried over as it is
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.SyncBatchNorm(3, momentum=0.3))
    model[1].process_group = group
    reference = copy.deepcopy(model)
    reference[1].process_group = None
    weight = model[1].weight
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.SyncBatchNorm and model[1].weight is weight
    assert model[1].process_group is group and model[1].momentum == 0.3
    model[1].process_group = None  # not distributed here: both layers are plain batch norm
    x = torch.randn(6, 4)
    assert_close(model(x), reference(x), torch.float32)
    assert_close(model[1].running_var, reference[1].running_var, torch.float32)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lazy_modules_become_the_plain_layer_as_torch(rank):
    shape = {1: (4, 3, 7), 2: (4, 3, 5, 5), 3: (2, 3, 2, 4, 4)}[rank]
    ours = getattr(batchnorm, f"LazyBatchNorm{rank}d")(momentum=0.3, dtype=torch.float64)
    theirs = getattr(torch.nn, f"LazyBatchNorm{rank}d")(momentum=0.3, dtype=torch.float64)
    assert ours.has_uninitialized_params()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(ours(x), theirs(x))
    assert type(ours) is getattr(batchnorm, f"BatchNorm{rank}d") and ours.num_features == 3
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_close(ours.state_dict()[key], value, msg=key)
        else:
            assert torch.equal(ours.state_dict()[key], value), key


def test_lazy_layer_loads_a_checkpoint_before_its_first_input():
    trained = batchnorm.BatchNorm2d(5)
    trained(torch.randn(4, 5, 3, 3))
    lazy = batchnorm.LazyBatchNorm2d()
    lazy.load_state_dict(trained.state_dict())
    lazy.eval()
    trained.eval()
    x = torch.randn(2, 5, 3, 3)
    assert_close(lazy(x), trained(x))


def test_convert_takes_torch_lazy_layers_and_keeps_hooks():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d(),
                                torch.nn.BatchNorm2d(4))
    seen = []
    model[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model[2].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model = batchnorm.convert(model)
    assert type(model[1]) is batchnorm.LazyBatchNorm2d and type(model[2]) is batchnorm.BatchNorm2d
    model(torch.randn(2, 3, 4, 4))
    assert type(model[1]) is batchnorm.BatchNorm2d and model[1].num_features == 4
    assert seen == ["pre", torch.Size([2, 4, 4, 4])]
