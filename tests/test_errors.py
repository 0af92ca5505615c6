"""Every promised error: its type, its message, and that no buffer changed."""

import pytest
import torch

import batchnorm
from batchnorm.functional import batch_norm


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    return all(torch.equal(module.state_dict()[k], v) for k, v in snapshot.items())


MODULE_CASES = [
    # (name, module factory, input factory, error type, message fragment)
    ("2d-given-3d", lambda: batchnorm.BatchNorm2d(3), lambda: torch.randn(2, 3, 4),
     ValueError, r"expected 4D input \(got 3D input\)"),
    ("1d-given-4d", lambda: batchnorm.BatchNorm1d(3), lambda: torch.randn(2, 3, 4, 4),
     ValueError, r"expected 2D or 3D input \(got 4D input\)"),
    ("3d-given-4d", lambda: batchnorm.BatchNorm3d(3), lambda: torch.randn(2, 3, 4, 4),
     ValueError, r"expected 5D input \(got 4D input\)"),
    ("channels", lambda: batchnorm.BatchNorm2d(16), lambda: torch.randn(2, 8, 3, 3),
     ValueError, r"expected input with 16 channels at dim 1, got 8"),
    ("one-value-per-channel", lambda: batchnorm.BatchNorm1d(3), lambda: torch.randn(1, 3),
     ValueError, r"Expected more than 1 value per channel when training, got input size"),
    ("one-value-2d", lambda: batchnorm.BatchNorm2d(3), lambda: torch.randn(1, 3, 1, 1),
     ValueError, r"Expected more than 1 value per channel when training"),
    ("double-params-float-input", lambda: batchnorm.BatchNorm1d(3).double(),
     lambda: torch.randn(4, 3), TypeError, r"weight has dtype torch.float64 but the input is "
                                           r"torch.float32; convert"),
    ("integer-input", lambda: batchnorm.BatchNorm1d(3), lambda: torch.ones(4, 3, dtype=torch.long),
     TypeError, r"expected a floating-point input, got torch.int64"),
    ("half-params-float-input", lambda: batchnorm.BatchNorm1d(3).half(),
     lambda: torch.randn(4, 3), TypeError, r"weight has dtype torch.float16"),
    ("meta-device-params", lambda: batchnorm.BatchNorm1d(3, device="meta"),
     lambda: torch.randn(4, 3), ValueError,
     r"is on meta but the input is on cpu; move them to one device"),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0])
def test_module_errors_name_the_problem_and_change_nothing(case):
    _, make_module, make_input, error, message = case
    module = make_module()
    before = _snapshot(module) if "meta" not in case[0] else None
    with pytest.raises(error, match=message):
        module(make_input())
    if before is not None:
        assert _unchanged(module, before)


def test_eval_without_running_statistics():
    with pytest.raises(ValueError, match="running_mean and running_var are needed when "
                                         "training=False"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


FUNCTIONAL_CASES = [
    ("rank-1", dict(input=torch.randn(5)), ValueError, r"at least 2 dimensions"),
    ("not-a-tensor", dict(input=[[1.0, 2.0]]), TypeError, r"input must be a torch.Tensor"),
    ("only-mean", dict(running_var=None), ValueError, r"pass both running_mean and running_var"),
    ("stats-shape", dict(running_mean=torch.zeros(4), running_var=torch.ones(4)), ValueError,
     r"running_mean has shape \(4,\) but the input has 3 channels"),
    ("weight-shape", dict(weight=torch.ones(2)), ValueError, r"weight has shape \(2,\)"),
    ("activation", dict(activation="gelu"), ValueError, r"activation must be one of"),
    ("residual-shape", dict(residual=torch.randn(4, 3, 2)), ValueError,
     r"residual must match the input"),
    ("momentum-nan", dict(momentum=float("nan")), ValueError,
     r"momentum must be finite to update the running statistics"),
    ("momentum-type", dict(momentum="0.1"), TypeError, r"momentum must be a real number"),
    ("momentum-none-no-counter", dict(momentum=None), ValueError,
     r"momentum=None \(cumulative average\) needs num_batches_tracked"),
    ("eps-negative", dict(eps=-1.0), ValueError, r"eps must be positive during training"),
    ("eps-zero", dict(eps=0.0), ValueError, r"eps must be positive during training"),
    ("eps-nan", dict(eps=float("nan")), ValueError, r"eps must be positive during training"),
    ("expanded-running-mean", dict(running_mean=torch.zeros(1).expand(3)), ValueError,
     r"running_mean is an expanded tensor \(stride 0\)"),
    ("running-var-requires-grad", dict(running_var=torch.ones(3, requires_grad=True)),
     ValueError, r"running_var requires grad, but running statistics are buffers"),
    ("counter-float", dict(num_batches_tracked=torch.tensor(0.0)), TypeError,
     r"num_batches_tracked must be a 0-dim integer tensor"),
    ("backend", dict(backend="cuda"), ValueError, r"unknown batch-norm backend 'cuda'"),
]


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=lambda c: c[0])
def test_functional_errors_leave_running_stats_untouched(case):
    _, overrides, error, message = case
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    before = (mean.clone(), var.clone())
    kwargs = dict(input=torch.randn(4, 3, 5), running_mean=mean, running_var=var, training=True)
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        batch_norm(**kwargs)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])


def test_running_stats_made_under_inference_mode_are_refused_in_training():
    with torch.inference_mode():
        mean, var = torch.zeros(3), torch.ones(3)
    counter = torch.tensor(2)
    with pytest.raises(ValueError, match="created under torch.inference_mode"):
        batch_norm(torch.randn(4, 3), mean, var, training=True, num_batches_tracked=counter)
    assert int(counter) == 2
    with torch.inference_mode():  # inside it, and in eval, they work
        batch_norm(torch.randn(4, 3), mean, var, training=True)
    batch_norm(torch.randn(4, 3), mean, var, training=False)


def test_eval_takes_any_momentum_and_a_zero_eps_as_torch():
    x = torch.randn(4, 3, 5)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    for momentum in (-1.2, 3.0, float("nan"), None):
        y = batch_norm(x, mean, var, training=False, momentum=momentum, eps=0.0)
        expected = torch.nn.functional.batch_norm(x, mean, var, training=False, eps=0.0)
        torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        batch_norm(x, mean, var, training=False, eps=-1.0)


def test_training_takes_a_momentum_outside_0_1_as_torch():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ours = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    theirs = tuple(t.clone() for t in ours)
    batch_norm(x, *ours, training=True, momentum=-1.0)
    torch.nn.functional.batch_norm(x, *theirs, training=True, momentum=-1.0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


MISMATCHES = [
    ("weight-shape", dict(weight=torch.ones(2)), r"weight has shape \(2,\)"),
    ("stats-shape", dict(running_mean=torch.zeros(4), running_var=torch.ones(4)),
     r"running_mean has shape \(4,\)"),
    ("weight-dtype", dict(weight=torch.ones(3, dtype=torch.float64)),
     r"weight has dtype torch.float64"),
    ("weight-device", dict(weight=torch.ones(3, device="meta")), r"weight is on meta"),
]


@pytest.mark.parametrize("case", MISMATCHES, ids=lambda c: c[0])
def test_mismatched_tensors_raise_what_torch_raises_too(case):
    # torch raises RuntimeError for these; code written for it catches ours as well.
    _, overrides, message = case
    kwargs = dict(input=torch.randn(4, 3, 5), running_mean=torch.zeros(3),
                  running_var=torch.ones(3), training=True)
    kwargs.update(overrides)
    with pytest.raises(RuntimeError, match=message):
        batch_norm(**kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        batch_norm(**kwargs)


def test_unsupported_forced_backend_is_an_error_not_a_fallback():
    pytest.importorskip("numba", reason="numba is not installed: the backend cannot be asked for")
    with pytest.raises(ValueError, match="backend 'numba' cannot run torch.float16 input"):
        batch_norm(torch.randn(4, 3, dtype=torch.float16), None, None, training=True,
                   backend="numba")


def test_num_features_must_be_positive():
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        batchnorm.BatchNorm2d(0)


def _refused(kind: str, layer) -> None:
    if kind == "expanded":
        layer.running_mean = torch.zeros(1).expand(3)
    elif kind == "requires-grad":
        layer.running_var = torch.ones(3, requires_grad=True)
    else:
        with torch.inference_mode():
            layer.running_mean = torch.zeros(3)


@pytest.mark.parametrize("backend", ["auto", "native", "eager", "numba"])
@pytest.mark.parametrize("kind", ["expanded", "requires-grad", "inference-mode"])
def test_a_refused_running_statistic_moves_nothing_on_any_backend(backend, kind, monkeypatch):
    """The checks run before the backend is chosen: every backend refuses alike, and the
    counter stays where it was."""
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    layer = batchnorm.BatchNorm1d(3)
    layer.num_batches_tracked.fill_(5)
    _refused(kind, layer)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="expanded|requires grad|inference_mode"):
        layer(torch.randn(8, 3))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("backend", ["native", "eager", "numba"])
def test_a_tensor_momentum_is_a_number_on_every_backend(backend, monkeypatch):
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    layer = batchnorm.BatchNorm1d(3, momentum=0.25)
    x = torch.randn(8, 3)
    layer.momentum = torch.tensor(0.25)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("backend", ["native", "eager", "numba"])
def test_jit_trace_records_torchs_ops_whatever_the_backend(backend, monkeypatch):
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    x = torch.randn(4, 3, 5, 5)
    traced = torch.jit.trace(batchnorm.BatchNorm2d(3), x)
    x2 = torch.randn(4, 3, 5, 5) * 3
    torch.testing.assert_close(traced(x2), torch.nn.functional.batch_norm(
        x2, None, None, training=True), atol=1e-5, rtol=1e-5)
