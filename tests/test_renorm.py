"""Batch Renorm against torch.nn (r = 1, d = 0), the paper's formulas, and its schedules."""

from dataclasses import dataclass

import pytest
import torch
from tolerances import assert_close

from batchnorm.renorm import PAPER_D_MAX, PAPER_R_MAX, BatchRenorm1d, BatchRenorm2d, Ramp


@dataclass(frozen=True)
class Case:
    name: str
    rank: int
    shape: tuple
    affine: bool = True
    bias: bool = True
    momentum: float | None = 0.1
    channels_last: bool = False


CASES = [
    Case("1d-dense", 1, (6, 3)),
    Case("1d-seq", 1, (4, 3, 7)),
    Case("2d", 2, (2, 3, 5, 4)),
    Case("3d", 3, (2, 3, 2, 3, 4)),
    Case("2d-no-affine", 2, (3, 3, 4, 4), affine=False),
    Case("2d-weight-no-bias", 2, (2, 3, 4, 3), bias=False),
    Case("2d-cumulative", 2, (2, 3, 5, 5), momentum=None),
    Case("2d-channels-last", 2, (2, 3, 5, 4), channels_last=True),
]


def _input(shape, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 0.7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _layers(case: Case, **bounds):
    import batchnorm.renorm as renorm

    kwargs = dict(momentum=case.momentum, affine=case.affine, dtype=torch.float64)
    if not case.bias:
        kwargs["bias"] = False
    ours = getattr(renorm, f"BatchRenorm{case.rank}d")(case.shape[1], **kwargs, **bounds)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    theirs = getattr(torch.nn, f"BatchNorm{case.rank}d")(case.shape[1], **torch_kwargs)
    if not case.bias:  # torch's own bias=False came after 2.11: drop the parameter
        theirs.register_parameter("bias", None)
    if case.affine:  # non-trivial parameters: ones and zeros can hide a wrong backward
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            theirs.weight.copy_(torch.rand(case.shape[1], generator=g) + 0.5)
            if case.bias:
                theirs.bias.copy_(torch.randn(case.shape[1], generator=g))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_r_max_1_and_d_max_0_is_batch_norm(case):
    ours, theirs = _layers(case, r_max=1.0, d_max=0.0)
    for seed in range(3):
        x = _input(case.shape, seed, case.channels_last)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), theirs(x_ref)
        assert_close(y, y_ref, msg="output")
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        assert_close(x.grad, x_ref.grad, msg="input gradient")
        for name, p in theirs.named_parameters():
            assert_close(getattr(ours, name).grad, p.grad, msg=f"{name} gradient")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
        assert int(ours.num_batches_tracked) == seed + 1


def _clipping_layer(r_max=2.0, d_max=0.5):
    """Running statistics that make channel 0 clip high, channel 1 low, channel 2 not at all."""
    bn = BatchRenorm2d(3, r_max=r_max, d_max=d_max, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.7, -1.2]))
        bn.bias.copy_(torch.tensor([0.3, -0.4, 0.9]))
        bn.running_mean.copy_(torch.tensor([-4.0, 9.0, 0.8]))
        bn.running_var.copy_(torch.tensor([0.2, 60.0, 6.0]))
    return bn


def test_r_and_d_clip_as_the_formulas_say():
    bn = _clipping_layer()
    x = _input((4, 3, 3, 5), seed=2)
    mu, sigma = bn.running_mean.clone(), torch.sqrt(bn.running_var.clone() + bn.eps)
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    y = bn(x)

    # The formulas, written out in plain float64 torch with the batch statistics differentiable
    # and r, d constants (stop-gradient).
    view = (1, -1, 1, 1)
    mu_b = x.mean((0, 2, 3))
    sigma_b = torch.sqrt(x.var((0, 2, 3), correction=0) + bn.eps)
    r_raw, d_raw = (sigma_b / sigma).detach(), ((mu_b - mu) / sigma).detach()
    assert r_raw[0] > 2.0 and r_raw[1] < 0.5 and 0.5 < r_raw[2] < 2.0, "the case must clip"
    assert d_raw[0] > 0.5 and d_raw[1] < -0.5 and abs(d_raw[2]) < 0.5, "the case must clip"
    r = torch.stack([torch.tensor(2.0), torch.tensor(0.5), r_raw[2]]).double()
    d = torch.stack([torch.tensor(0.5), torch.tensor(-0.5), d_raw[2]]).double()
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view)
    expected = gamma.view(view) * (x_hat * r.view(view) + d.view(view)) + beta.view(view)
    assert_close(y, expected, msg="output")

    dy = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(expected, x, dy)
    y.backward(dy)
    assert_close(x.grad, grad_x, msg="input gradient")
    assert_close(bn.weight.grad, (dy * (x_hat * r.view(view) + d.view(view))).sum((0, 2, 3)),
                 msg="weight gradient")
    assert_close(bn.bias.grad, dy.sum((0, 2, 3)), msg="bias gradient")
    # The running estimates move as batch norm's, whatever r and d were.
    m = x.numel() // 3
    unbiased = x.detach().var((0, 2, 3), correction=0) * m / (m - 1)
    assert_close(bn.running_mean, 0.9 * mu + 0.1 * mu_b.detach())
    assert_close(bn.running_var, 0.9 * (sigma**2 - bn.eps) + 0.1 * unbiased)


def test_inference_is_batch_norm_with_the_same_statistics():
    case = CASES[2]
    ours, theirs = _layers(case, r_max=3.0, d_max=5.0)
    for seed in range(3):
        ours(_input(case.shape, seed))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = _input(case.shape, seed=7)
    assert_close(ours(x), theirs(x.detach()))


def _bounds_at(step, **bounds):
    """The (r, d) of a batch whose statistics are far past any bound, at the given step."""
    bn = BatchRenorm1d(1, dtype=torch.float64, **bounds)
    bn.num_batches_tracked.fill_(step)
    x = torch.tensor([[-1000.0], [3000.0]], dtype=torch.float64)  # sigma_B >> 1, mu_B >> 0
    r, d = bn.corrections(x)
    return float(r), float(d)


# (step, r_max, d_max) of the paper's schedules, linear between the corner points.
PAPER_STEPS = [(0, 1.0, 0.0), (5000, 1.0, 0.0), (15000, 1 + 2 * 10 / 35, 2.5),
               (25000, 1 + 2 * 20 / 35, 5.0), (40000, 3.0, 5.0), (10**6, 3.0, 5.0)]


@pytest.mark.parametrize("step,r_max,d_max", PAPER_STEPS)
def test_default_schedule_is_the_papers_at_num_batches_tracked(step, r_max, d_max):
    r, d = _bounds_at(step)
    assert r == pytest.approx(r_max, abs=1e-12) and d == pytest.approx(d_max, abs=1e-12)
    assert PAPER_R_MAX(step) == pytest.approx(r_max) and PAPER_D_MAX(step) == pytest.approx(d_max)


def test_callable_and_constant_bounds():
    def stepwise(step):
        return 1.0 + (step >= 10).double()

    assert _bounds_at(9, r_max=stepwise, d_max=0.25) == (1.0, 0.25)
    assert _bounds_at(10, r_max=stepwise, d_max=0.25) == (2.0, 0.25)
    ramp = Ramp(2.0, 4.0, begin=10, stop=20)
    assert [ramp(s) for s in (0, 10, 15, 20, 99)] == [2.0, 2.0, 3.0, 4.0, 4.0]
    assert float(ramp(torch.tensor(15))) == 3.0


def test_lower_bounds_clip_too():
    r, d = _bounds_at(0, r_max=1.5, d_max=0.5)
    assert (r, d) == (1.5, 0.5)
    bn = BatchRenorm1d(1, r_max=1.5, d_max=0.5, dtype=torch.float64)
    bn.running_var.fill_(1e6)
    bn.running_mean.fill_(1e4)
    r, d = bn.corrections(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    assert float(r) == pytest.approx(1 / 1.5) and float(d) == -0.5


BAD_BOUNDS = [
    ("r_max-below-1", dict(r_max=0.5), "r_max must be a number >= 1.0"),
    ("d_max-negative", dict(d_max=-1.0), "d_max must be a number >= 0.0"),
    ("r_max-string", dict(r_max="3"), "r_max"),
]


@pytest.mark.parametrize("kwargs,match", [b[1:] for b in BAD_BOUNDS],
                         ids=[b[0] for b in BAD_BOUNDS])
def test_bad_bounds_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kwargs)


def test_ramp_needs_begin_before_stop():
    with pytest.raises(ValueError, match="begin < stop"):
        Ramp(1.0, 3.0, begin=10, stop=10)


def test_failing_call_leaves_the_statistics_untouched():
    bn = _clipping_layer()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1, dtype=torch.float64))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


# Ghost batches: name -> (layer, input shape, virtual_batch_size).
GHOST_CASES = {
    "1d-divides": ("BatchRenorm1d", (8, 3), 2),
    "1d-seq-remainder-of-2": ("BatchRenorm1d", (8, 3, 5), 3),
    "2d-remainder-of-1-sample": ("BatchRenorm2d", (7, 3, 2, 3), 3),
    "3d-k-equals-batch": ("BatchRenorm3d", (2, 3, 2, 2, 3), 2),
}


def _renorm_chunks(x, mean, var, weight, bias, k, bounds_at, step, momentum=0.1, eps=1e-5):
    """Batch Renorm written out per chunk of ``k`` samples in plain float64 torch.

    Each chunk takes r and d (constants for the gradient) from the running estimates as the
    chunks before it left them, with the bounds at its own step, then updates the estimates
    (mean, and the unbiased variance) as batch norm does. Returns output, mean, var.
    """
    view = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    outputs = []
    for i, chunk in enumerate(x.split(k)):
        r_max, d_max = bounds_at(step + i)
        mu_b, var_b = chunk.mean(dims), chunk.var(dims, correction=0)
        sigma_b, sigma = torch.sqrt(var_b + eps), torch.sqrt(var + eps)
        r = (sigma_b / sigma).detach().clamp(1 / r_max, r_max)
        d = ((mu_b - mean) / sigma).detach().clamp(-d_max, d_max)
        x_hat = (chunk - mu_b.view(view)) / sigma_b.view(view)
        outputs.append(weight.view(view) * (x_hat * r.view(view) + d.view(view))
                       + bias.view(view))
        m = chunk.numel() // chunk.shape[1]
        mean = (1 - momentum) * mean + momentum * mu_b.detach()
        var = (1 - momentum) * var + momentum * var_b.detach() * m / (m - 1)
    return torch.cat(outputs), mean, var


@pytest.mark.parametrize("case", GHOST_CASES, ids=list(GHOST_CASES))
def test_ghost_batches_renormalize_chunk_by_chunk(case):
    import batchnorm.renorm as renorm

    name, shape, k = GHOST_CASES[case]
    # Bounds that change from one chunk to the next inside a batch: every chunk is a step.
    schedule = Ramp(1.2, 3.0, begin=2, stop=5), Ramp(0.1, 2.0, begin=1, stop=6)
    bn = getattr(renorm, name)(shape[1], r_max=schedule[0], d_max=schedule[1],
                               virtual_batch_size=k, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial parameters and running estimates that make r, d clip
        bn.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64) * 2)
        bn.running_var.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) * 4 + 0.1)
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    chunks = -(-shape[0] // k)
    for seed in range(2):
        x = _input(shape, seed)
        x_ref = x.detach().clone().requires_grad_()
        y = bn(x)
        expected, mean, var = _renorm_chunks(x_ref, mean, var, weight, bias, k,
                                             lambda s: (schedule[0](s), schedule[1](s)),
                                             step=chunks * seed)
        assert_close(y, expected, msg="output")
        dy = torch.randn_like(y)
        y.backward(dy)
        expected.backward(dy)
        assert_close(x.grad, x_ref.grad, msg="input gradient")
        assert_close(bn.weight.grad, weight.grad, msg="weight gradient")
        assert_close(bn.bias.grad, bias.grad, msg="bias gradient")
        assert_close(bn.running_mean, mean, msg="running_mean")
        assert_close(bn.running_var, var, msg="running_var")
        assert int(bn.num_batches_tracked) == chunks * (seed + 1)


def test_ghost_batches_with_r_max_1_and_d_max_0_are_ghost_batch_norm():
    k, shape = 3, (8, 3, 4)
    ours = BatchRenorm1d(3, r_max=1.0, d_max=0.0, virtual_batch_size=k, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    x = _input(shape, seed=5)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), torch.cat([theirs(chunk) for chunk in x_ref.split(k)])
    assert_close(y, y_ref, msg="output")
    y.backward(torch.ones_like(y) * 0.3 + x.detach())
    y_ref.backward(torch.ones_like(y_ref) * 0.3 + x_ref.detach())
    assert_close(x.grad, x_ref.grad, msg="input gradient")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).double(), getattr(theirs, name).double()), name


def test_ghost_batches_leave_inference_unchanged():
    ours = BatchRenorm2d(3, r_max=2.0, d_max=1.0, virtual_batch_size=2, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    ours(_input((6, 3, 2, 2), seed=1))
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = _input((5, 3, 2, 2), seed=2).detach()
    assert_close(ours(x), theirs(x))


def test_ghost_batch_with_a_one_value_chunk_is_refused_untouched():
    bn = BatchRenorm1d(3, r_max=2.0, d_max=1.0, virtual_batch_size=2, dtype=torch.float64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="virtual_batch_size=2 splits a batch of 5"):
        bn(torch.randn(5, 3, dtype=torch.float64))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        BatchRenorm1d(3, virtual_batch_size=0)
