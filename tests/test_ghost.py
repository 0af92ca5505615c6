"""Ghost batch norm (``virtual_batch_size``) against torch.nn applied to each chunk in turn."""

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
    k: int
    momentum: float | None = 0.1
    track: bool = True
    channels_last: bool = False


CASES = [
    Case("2d-divides", "BatchNorm2d", (8, 3, 4, 5), k=4),
    Case("2d-remainder-of-1-sample", "BatchNorm2d", (7, 3, 2, 3), k=3),
    Case("1d-dense-remainder-of-2", "BatchNorm1d", (8, 3), k=3),
    Case("1d-seq-k-1", "BatchNorm1d", (3, 2, 5), k=1),
    Case("3d-cumulative", "BatchNorm3d", (5, 2, 2, 3, 2), k=2, momentum=None),
    Case("2d-no-track", "BatchNorm2d", (6, 3, 3, 3), k=4, track=False),
    Case("2d-channels-last", "BatchNorm2d", (6, 3, 4, 3), k=4, channels_last=True),
]


def _input(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g, dtype=torch.float64) * 2.5 + 0.7
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _pair(case: Case):
    kwargs = dict(momentum=case.momentum, track_running_stats=case.track, dtype=torch.float64)
    ours = getattr(batchnorm, case.cls)(case.shape[1], virtual_batch_size=case.k, **kwargs)
    theirs = getattr(torch.nn, case.cls)(case.shape[1], **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(case.shape[1], generator=g) + 0.5)
        theirs.bias.copy_(torch.randn(case.shape[1], generator=g))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_equals_batch_norm_applied_chunk_by_chunk(case):
    ours, theirs = _pair(case)
    for seed in range(2):
        x = _input(case, seed)
        x_ref = x.detach().clone().requires_grad_()
        y = ours(x)
        y_ref = torch.cat([theirs(chunk) for chunk in x_ref.split(case.k)])
        assert_close(y, y_ref, msg="output")
        assert y.stride() == x.stride(), "memory layout"
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        assert_close(x.grad, x_ref.grad, msg="input gradient")
        for name, p in theirs.named_parameters():
            assert_close(getattr(ours, name).grad, p.grad, msg=f"{name} gradient")
        if case.track:
            for name in ("running_mean", "running_var"):
                assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
            chunks = -(-case.shape[0] // case.k)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
            assert int(ours.num_batches_tracked) == chunks * (seed + 1)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_eval_and_small_batches_are_unchanged(case):
    ours, theirs = _pair(case)
    x = _input(case, 3)[: case.k]  # one chunk: plain batch norm
    assert_close(ours(x), theirs(x))
    ours.eval()
    theirs.eval()
    x = _input(case, 4)
    assert_close(ours(x), theirs(x))


def test_a_last_chunk_of_one_value_per_channel_is_refused_before_any_update():
    bn = batchnorm.BatchNorm1d(3, virtual_batch_size=3)
    with pytest.raises(ValueError, match="last one has 1 sample"):
        bn(torch.randn(7, 3))
    assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_virtual_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        batchnorm.BatchNorm2d(3, virtual_batch_size=bad)


def test_repr_and_state_dict():
    assert "virtual_batch_size" not in repr(batchnorm.BatchNorm2d(3))
    bn = batchnorm.BatchNorm2d(3, virtual_batch_size=16)
    assert repr(bn).endswith("track_running_stats=True, virtual_batch_size=16)")
    assert list(bn.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert batchnorm.convert(torch.nn.BatchNorm2d(3)).virtual_batch_size is None
