"""batchnorm against torch.nn on torch's own BatchNorm test data, sample by sample.

The data is PyTorch's (``torch.testing._internal``, shipped in the wheel): the module inputs and
error inputs of the ``nn.BatchNorm1d/2d/3d`` ModuleInfos and the sample inputs of the
``nn.functional.batch_norm`` OpInfo. Every sample runs through torch.nn and through this
package side by side, and the two must agree: outputs and their memory layout, gradients,
running statistics and counters, error types and messages, forward-mode AD, ``vmap``, batched
gradients (``is_grads_batched``), and double backward in both memory layouts.

The one difference on purpose: torch's modules count an empty batch in
``num_batches_tracked``; ours leave the counter as it is (an empty batch has no statistics).
"""

import copy

import pytest
import torch
from tolerances import TOL
from torch.func import vmap

import batchnorm
from batchnorm.functional import batch_norm

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="torch's test data needs expecttest (pip install expecttest)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OURS = {torch.nn.BatchNorm1d: batchnorm.BatchNorm1d, torch.nn.BatchNorm2d: batchnorm.BatchNorm2d,
        torch.nn.BatchNorm3d: batchnorm.BatchNorm3d}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _close(actual, expected, dtype, msg=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg)


def _as_accurate(ours, theirs, truth, dtype, msg=""):
    """``ours`` within the dtype's tolerance of the float64 ``truth``, give or take the error
    of torch's own result (``theirs``): no less accurate than torch, which rounds too."""
    rtol, atol = TOL[dtype]
    ours, theirs, truth = ours.double(), theirs.double(), truth.double()
    allowed = atol + rtol * truth.abs() + (theirs - truth).abs()
    excess = (ours - truth).abs() - allowed
    assert not (excess > 0).any(), f"{msg}: off by {excess.max().item():.3g} beyond torch's error"


def _module_cases():
    for info in common_modules.module_db:
        if info.module_cls not in OURS:
            continue
        for dtype in DTYPES:
            for training in (True, False):
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype,
                                                 requires_grad=True, training=training)
                for k, sample in enumerate(inputs):
                    name = f"{info.name}-{sample.desc or 'default'}-{k}-{dtype}-" \
                           f"{'train' if training else 'eval'}"
                    yield pytest.param(info.module_cls, sample, dtype, training, id=name)


with torch.random.fork_rng():  # the samples' random values, the same in every run
    torch.manual_seed(0)
    MODULE_CASES = list(_module_cases())


def _pair(cls, sample, dtype, training):
    """torch.nn's module and ours, with the same non-trivial parameters and statistics."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = cls(*args, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        if theirs.running_mean is not None:
            theirs.running_mean.copy_(torch.randn(theirs.running_mean.shape, generator=g))
            theirs.running_var.copy_(torch.rand(theirs.running_var.shape, generator=g) + 0.5)
    ours = OURS[cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours.train(training), theirs.train(training)


def _input(sample, memory_format=None):
    x = sample.forward_input.args[0].detach().clone()
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_()


def _compare_state(ours, theirs, dtype, uncounted=0):
    """Equal running statistics; counters equal but for ``uncounted`` empty training batches,
    which torch counts and ours do not (module docstring)."""
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            _close(a, b, dtype, name)
    if theirs.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) - uncounted


def _step(module, x, dy):
    """Output, input gradient and parameter gradients of one training or inference step."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("cls, sample, dtype, training", MODULE_CASES)
def test_module_matches_torch_nn(cls, sample, dtype, training):
    ours, theirs = _pair(cls, sample, dtype, training)
    truth = copy.deepcopy(theirs).double()  # float64 torch.nn on the same rounded values
    names = ["output", "input gradient"] + [f"{n} gradient" for n, _ in ours.named_parameters()]
    for step in range(2):  # twice: the second step starts from updated running statistics
        x = sample.forward_input.args[0]
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        for module in (ours, theirs, truth):
            module.zero_grad()
        results = [_step(m, x.to(t), dy.to(t)) for m, t in
                   ((ours, dtype), (theirs, dtype), (truth, torch.float64))]
        assert results[0][0].stride() == results[1][0].stride() or x.numel() == 0, "layout"
        for k, name in enumerate(names):
            _as_accurate(results[0][k], results[1][k], results[2][k], dtype, name)
        empty_steps = step + 1 if x.numel() == 0 and training else 0
        _compare_state(ours, theirs, dtype, uncounted=empty_steps)


@pytest.mark.parametrize("cls, sample, dtype, training", MODULE_CASES)
def test_module_forward_ad_matches_torch_nn(cls, sample, dtype, training):
    ours, theirs = _pair(cls, sample, dtype, training)
    truth = copy.deepcopy(theirs).double()
    x = sample.forward_input.args[0].detach()
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    outs = []
    for module, t in ((ours, dtype), (theirs, dtype), (truth, torch.float64)):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x.to(t), tangent.to(t))
            outs.append(torch.autograd.forward_ad.unpack_dual(module(dual)))
    _as_accurate(outs[0].primal, outs[1].primal, outs[2].primal, dtype, "output")
    _as_accurate(outs[0].tangent, outs[1].tangent, outs[2].tangent, dtype, "tangent")
    _compare_state(ours, theirs, dtype, uncounted=int(x.numel() == 0 and training))


def _outcome(function):
    """``("ok", result)`` or ``("raised", exception type)``."""
    try:
        return "ok", function()
    except (RuntimeError, ValueError) as error:
        return "raised", error


@pytest.mark.parametrize("cls, sample, dtype, training", MODULE_CASES)
def test_module_vmap_matches_torch_nn(cls, sample, dtype, training):
    x = sample.forward_input.args[0].detach()
    if x.numel() == 0:
        pytest.skip("vmap of an empty batch")
    ours, theirs = _pair(cls, sample, dtype, training)
    stacked = torch.stack([x, x * 2 + 1, x - 3])
    results = [_outcome(lambda m=m: vmap(m)(stacked)) for m in (ours, theirs)]
    # Training with running statistics updates unbatched buffers in place: both refuse it.
    assert results[0][0] == results[1][0], (results[0][1], results[1][1])
    if results[0][0] == "ok":
        _close(results[0][1], results[1][1], dtype, "vmapped output")
        _compare_state(ours, theirs, dtype)


@pytest.mark.parametrize("cls, sample, dtype, training", MODULE_CASES)
def test_module_batched_gradients_match_torch_nn(cls, sample, dtype, training):
    if sample.forward_input.args[0].numel() == 0:
        pytest.skip("no gradient to batch for an empty batch")
    ours, theirs = _pair(cls, sample, dtype, training)
    grads = []
    for module in (ours, theirs):
        x = _input(sample)
        y = module(x)
        v = torch.randn((3, *y.shape), generator=torch.Generator().manual_seed(2)).to(dtype)
        grads.append(torch.autograd.grad(y, x, v, is_grads_batched=True)[0])
    _close(grads[0], grads[1], dtype, "batched input gradients")


def _memory_formats(sample):
    rank = sample.forward_input.args[0].dim()
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return [None] + ([formats[rank]] if rank in formats else [])


@pytest.mark.parametrize("cls, sample, dtype, training",
                         [c for c in MODULE_CASES if c.values[2] == torch.float64])
def test_module_double_backward_matches_torch_nn_in_both_layouts(cls, sample, dtype, training):
    if sample.forward_input.args[0].numel() == 0:
        pytest.skip("no gradient for an empty batch")
    for memory_format in _memory_formats(sample):
        ours, theirs = _pair(cls, sample, dtype, training)
        results = []
        for module in (ours, theirs):
            x = _input(sample, memory_format)
            params = list(module.parameters())
            y = module(x)
            g = torch.Generator().manual_seed(3)
            dy = torch.randn(y.shape, generator=g, dtype=dtype, requires_grad=True)
            first = torch.autograd.grad(y, [x, *params], dy, create_graph=True)
            weights = [torch.randn(f.shape, generator=g, dtype=dtype) for f in first]
            total = sum((f * w).sum() for f, w in zip(first, weights, strict=True))
            second = torch.autograd.grad(total, [x, dy, *params], allow_unused=True)
            results.append((first, second))
        for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1],
                        strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                _close(a, b, dtype, f"derivatives ({memory_format})")


def _error_cases():
    for info in common_modules.module_db:
        if info.module_cls not in OURS or info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                               requires_grad=False, training=True)
        for k, error in enumerate(errors):
            yield pytest.param(info.module_cls, error, id=f"{info.name}-{k}")


@pytest.mark.parametrize("cls, error", list(_error_cases()))
def test_module_errors_match_torch_nn(cls, error):
    sample = error.module_error_input
    ours = OURS[cls](*sample.constructor_input.args, **sample.constructor_input.kwargs)
    snapshot = copy.deepcopy(ours.state_dict())
    with pytest.raises(error.error_type, match=error.error_regex):
        ours(*sample.forward_input.args, **sample.forward_input.kwargs)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in snapshot.items())


BATCH_NORM_OP = next(op for op in op_db
                     if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")


def _functional_cases():
    for dtype in DTYPES:
        for k, sample in enumerate(BATCH_NORM_OP.sample_inputs("cpu", dtype, requires_grad=True)):
            yield pytest.param(sample, dtype, id=f"sample{k}-{tuple(sample.input.shape)}-{dtype}")


with torch.random.fork_rng():
    torch.manual_seed(0)
    FUNCTIONAL_CASES = list(_functional_cases())


def _clone_args(sample):
    """Fresh copies of the sample's input, running statistics and parameters."""
    def fresh(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().clone().requires_grad_(t.requires_grad)

    return fresh(sample.input), [fresh(a) for a in sample.args], dict(sample.kwargs)


@pytest.mark.parametrize("sample, dtype", FUNCTIONAL_CASES)
def test_functional_matches_torch_on_opinfo_samples(sample, dtype):
    results = []
    for function in (batch_norm, torch.nn.functional.batch_norm):
        x, args, kwargs = _clone_args(sample)
        y = function(x, *args, **kwargs)
        inputs = [t for t in (x, args[2], args[3]) if isinstance(t, torch.Tensor)
                  and t.requires_grad]
        grads = torch.autograd.grad(y.sum() * 1.5, inputs, allow_unused=True) if inputs else []
        results.append((y, args[0], args[1], grads))
    (y, rm, rv, grads), (y_ref, rm_ref, rv_ref, grads_ref) = results
    _close(y, y_ref, dtype, "output")
    for a, b in ((rm, rm_ref), (rv, rv_ref)):
        if b is not None:
            _close(a, b, dtype, "running statistics")
    for a, b in zip(grads, grads_ref, strict=True):
        _close(a, b, dtype, "gradient")


@pytest.mark.parametrize("sample, dtype",
                         [c for c in FUNCTIONAL_CASES if c.values[1] != torch.bfloat16])
def test_functional_forward_ad_and_vmap_match_torch(sample, dtype):
    if sample.input.numel() == 0:
        pytest.skip("empty input")
    tangent = torch.randn(sample.input.shape, generator=torch.Generator().manual_seed(4),
                          dtype=dtype)
    outcomes = []
    for function in (batch_norm, torch.nn.functional.batch_norm):
        x, args, kwargs = _clone_args(sample)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x.detach(), tangent)
            tangent_out = torch.autograd.forward_ad.unpack_dual(
                function(dual, *args, **kwargs)).tangent
        x, args, kwargs = _clone_args(sample)
        stacked = torch.stack([x.detach(), x.detach() * 2 + 1])
        mapped = _outcome(lambda f=function, a=args, kw=kwargs, s=stacked: vmap(
            lambda t: f(t, *a, **kw))(s))
        outcomes.append((tangent_out, mapped))
    _close(outcomes[0][0], outcomes[1][0], dtype, "tangent")
    assert outcomes[0][1][0] == outcomes[1][1][0], (outcomes[0][1][1], outcomes[1][1][1])
    if outcomes[0][1][0] == "ok":
        _close(outcomes[0][1][1], outcomes[1][1][1], dtype, "vmapped output")


@pytest.mark.parametrize("cls, sample, dtype, training",
                         [c for c in MODULE_CASES if c.values[2] == torch.float32])
def test_module_pickles_and_copies_as_torch_nn(cls, sample, dtype, training, tmp_path):
    # torch's test_pickle, with the full-module load it needs (torch.load defaults to weights)
    ours, _ = _pair(cls, sample, dtype, training)
    x = sample.forward_input.args[0].detach()
    y = ours(x)
    torch.save(ours, tmp_path / "layer.pt")
    for copied in (torch.load(tmp_path / "layer.pt", weights_only=False), copy.deepcopy(ours)):
        assert type(copied) is type(ours)
        _close(copied(x), ours(x), dtype, "output of the copy")
    assert y.shape == x.shape
