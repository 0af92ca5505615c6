"""Tests of the Triton backend (batchnorm/kernels/triton*.py) on CPU tensors, against float64 torch.

The kernels run under Triton's interpreter (``tests/triton_interpreter.py``;
``test_interpreter_on`` checks that it took effect).

Truths: ``torch.nn.functional.batch_norm`` and its autograd in float64 on the same (rounded)
values; a closed-form EMA for the running statistics. Shapes are tiny and odd (C = 1 and 3,
L = 1, N·L = 2, 2D, 5D), and a small-tile ``Config`` forces every path (resident, looped, split)
to cut the channel slices into several tiles and split programs.

``test_kernels_triton_compile.py`` compiles the same kernels for a GPU, which the interpreter
never does.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import triton_interpreter
from tolerances import TOL, assert_close

bt = triton_interpreter.backend()
from batchnorm.kernels import triton_plan as tp  # noqa: E402

EPS = 1e-5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# Named (N, C, L) cases; 5D (N, C, D, H, W) and 2D (N, C) inputs arrive as these views.
CASES = {
    "N2_C3_L7": (2, 3, 7),
    "one_channel": (4, 1, 9),
    "2d_L1": (6, 3, 1),
    "NL2_two_samples": (2, 3, 1),
    "NL2_two_positions": (1, 3, 2),
    "5d_D2_H3_W2": (2, 3, 12),
    "odd_N5_C5_L13": (5, 5, 13),
}
LAYOUTS = ("ncl", "channels_last")
PATHS = ("resident", "looped", "split")


def _small_tiles(dtype: torch.dtype, path: str | None = None):
    """Tiles of 8 values and channel blocks of 2: every path walks several tiles per block."""
    size = torch.empty(0, dtype=dtype).element_size()
    return tp.Config(tile_bytes=8 * size, row_bytes=2 * size, path=path)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "ncl" else t.transpose(1, 2).contiguous().transpose(1, 2)


def _make(shape, layout, dtype, seed=0):
    """x3, dy3 and residual3 in ``layout``; weight (mixed signs) and bias; all in ``dtype``."""
    n, c, length = shape
    g = torch.Generator().manual_seed(seed)
    offset = torch.empty(1, c, 1, dtype=torch.float64).uniform_(-3, 3, generator=g)
    spread = torch.empty(1, c, 1, dtype=torch.float64).uniform_(0.5, 3, generator=g)
    x = offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    residual = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.empty(c, dtype=torch.float64).uniform_(0.5, 2, generator=g)
    weight = weight * torch.where(torch.arange(c) % 2 == 0, 1.0, -1.0).double()
    bias = torch.empty(c, dtype=torch.float64).uniform_(-1, 1, generator=g)
    x3, dy3, res3 = (_laid_out(t.to(dtype), layout) for t in (x, dy, residual))
    return x3, dy3, res3, weight.to(dtype), bias.to(dtype)


def _truth_forward(x3, weight, bias, residual3=None, relu=False):
    """float64 torch: ``(y, mean, biased var)`` of training-mode batch norm and the epilogue."""
    x = x3.double()
    y = F.batch_norm(x, None, None, _f64(weight), _f64(bias), training=True, eps=EPS)
    if residual3 is not None:
        y = y + residual3.double()
    if relu:
        y = torch.relu(y)
    return y, x.mean((0, 2)), x.var((0, 2), unbiased=False)


def _truth_backward(dy3, x3, weight, training, mask=None):
    """float64 autograd of ``F.batch_norm``: ``(dx, dweight, dbias)`` for upstream ``dy * mask``.

    In training the statistics are the batch's; in inference they are the batch's too, but held
    fixed (passed as running statistics), which is what the kernel's inference backward takes.
    """
    x = x3.double().requires_grad_()
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.double()
    w = w.clone().requires_grad_()
    b = torch.zeros_like(w, requires_grad=True)
    stats = x.detach().mean((0, 2)), x.detach().var((0, 2), unbiased=False)
    y = F.batch_norm(x, *stats, w, b, training=training, eps=EPS)
    upstream = dy3.double() if mask is None else dy3.double() * mask
    y.backward(upstream)
    return x.grad, w.grad, b.grad, upstream


def _f64(t):
    return None if t is None else t.double()


def _saved_stats(x3):
    """The (mean, rstd) a forward pass saves, computed in float64 and held in the acc dtype."""
    acc = torch.float64 if x3.dtype == torch.float64 else torch.float32
    x = x3.double()
    mean, var = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    return mean.to(acc), torch.rsqrt(var + EPS).to(acc)


def _check_layout(out, x3):
    assert out.shape == x3.shape and out.dtype == x3.dtype
    assert out.stride() == x3.stride(), "outputs keep the input's strides"


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


grid = pytest.mark.parametrize
shapes = grid("shape", list(CASES.values()), ids=list(CASES))
layouts = grid("layout", LAYOUTS)
dtypes = grid("dtype", list(DTYPES.values()), ids=list(DTYPES))


def test_interpreter_on():
    assert bt.interpreted(), "kernels were defined without TRITON_INTERPRET=1"
    assert bt.supports(torch.zeros(2, 3, 4), None, False)


@shapes
@layouts
@dtypes
def test_forward_train(shape, layout, dtype):
    x3, _, _, weight, bias = _make(shape, layout, dtype)
    y3, mean, rstd, var = bt.forward_train(x3, weight, bias, EPS)
    y_true, mean_true, var_true = _truth_forward(x3, weight, bias)
    _check_layout(y3, x3)
    assert mean.dtype == var.dtype == rstd.dtype == _stat_dtype(dtype)
    assert_close(y3, y_true, msg="y")
    assert_close(mean, mean_true, dtype=_stat_dtype(dtype), msg="mean")
    assert_close(var, var_true, dtype=_stat_dtype(dtype), msg="var")
    assert_close(rstd, torch.rsqrt(var_true + EPS), dtype=_stat_dtype(dtype), msg="rstd")


@shapes
@layouts
@dtypes
def test_backward_train(shape, layout, dtype):
    x3, dy3, _, weight, _ = _make(shape, layout, dtype)
    mean, rstd = _saved_stats(x3)
    dx3, dweight, dbias, dres3 = bt.backward(dy3, x3, None, mean, rstd, weight, True)
    dx_true, dw_true, db_true, _ = _truth_backward(dy3, x3, weight, training=True)
    _check_layout(dx3, x3)
    assert dres3 is None
    # dx is a difference of O(1) terms: compare it at the scale of the terms
    assert_close(dx3, dx_true, msg="dx")
    assert_close(dweight, dw_true, dtype=_stat_dtype(dtype), msg="dweight")
    assert_close(dbias, db_true, dtype=_stat_dtype(dtype), msg="dbias")


@layouts
@dtypes
@grid("affine", [True, False], ids=["affine", "no_affine"])
def test_eval_forward_and_backward(layout, dtype, affine):
    x3, dy3, _, weight, bias = _make((3, 3, 5), layout, dtype, seed=1)
    weight, bias = (weight, bias) if affine else (None, None)
    acc = _stat_dtype(dtype)
    running_mean = torch.tensor([0.5, -1.0, 2.0], dtype=acc)
    running_var = torch.tensor([1.5, 0.25, 4.0], dtype=acc)
    rstd = torch.rsqrt(running_var + EPS)
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = -running_mean * scale + (0 if bias is None else bias.to(acc))
    y3 = bt.forward_eval(x3, scale, shift)
    y_true = F.batch_norm(x3.double(), running_mean.double(), running_var.double(), _f64(weight),
                          _f64(bias), training=False, eps=EPS)
    _check_layout(y3, x3)
    assert_close(y3, y_true, msg="y")
    dx3, dweight, dbias, _ = bt.backward(dy3, x3, None, running_mean, rstd, weight, False)
    x = x3.double().requires_grad_()
    w = (torch.ones(3) if weight is None else weight).double().requires_grad_()
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    F.batch_norm(x, running_mean.double(), running_var.double(), w, b, training=False,
                 eps=EPS).backward(dy3.double())
    assert_close(dx3, x.grad, msg="dx")
    assert_close(dweight, w.grad, dtype=_stat_dtype(dtype), msg="dweight")
    assert_close(dbias, b.grad, dtype=_stat_dtype(dtype), msg="dbias")


@grid("path", PATHS)
@layouts
@grid("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bfloat16",
                                                                   "float64"])
@grid("shape", [(5, 5, 13), (7, 3, 1)], ids=["N5_C5_L13", "2d_N7_C3"])
def test_paths_forward_backward(path, layout, dtype, shape):
    x3, dy3, _, weight, bias = _make(shape, layout, dtype, seed=2)
    config = _small_tiles(dtype, path)
    y3, mean, rstd, var = bt.forward_train(x3, weight, bias, EPS, config=config)
    y_true, mean_true, var_true = _truth_forward(x3, weight, bias)
    assert_close(y3, y_true, msg=f"y on the {path} path")
    assert_close(var, var_true, dtype=_stat_dtype(dtype), msg="var")
    dx3, dweight, dbias, _ = bt.backward(dy3, x3, None, mean, rstd, weight, True, config=config)
    dx_true, dw_true, db_true, _ = _truth_backward(dy3, x3, weight, training=True)
    assert_close(dx3, dx_true, msg=f"dx on the {path} path")
    assert_close(dweight, dw_true, dtype=_stat_dtype(dtype), msg="dweight")
    assert_close(dbias, db_true, dtype=_stat_dtype(dtype), msg="dbias")


@grid("path", PATHS)
@layouts
def test_forward_train_into_its_own_input_on_every_path(path, layout):
    """``out=x3`` (in-place ABN): the split path's programs must not read an overwritten
    pivot; every path equals the out-of-place call."""
    x3, _, _, weight, bias = _make((5, 5, 13), layout, torch.float32, seed=3)
    config = _small_tiles(torch.float32, path)
    expected, mean, _, var = bt.forward_train(x3, weight, bias, EPS, config=config)
    y3, mean2, _, var2 = bt.forward_train(x3, weight, bias, EPS, out=x3, config=config)
    assert y3.data_ptr() == x3.data_ptr()
    assert_close(x3, expected, msg=f"y on the {path} path")
    assert_close(mean2, mean, msg="mean")
    assert_close(var2, var, msg="var")


def test_small_tiles_really_split():
    """The small-tile config cuts these cases into several tiles and split programs."""
    for layout in LAYOUTS:
        x3 = _make((5, 5, 13), layout, torch.float32)[0]
        view = tp.view_of(x3)
        plan = tp.plan(view, 4, 1, x3.device, _small_tiles(torch.float32, "split"))
        assert plan.units > 1 and plan.programs > 1 and plan.per > 1


EPILOGUES = {"relu": (False, True), "residual": (True, False), "residual_relu": (True, True)}


@grid("epilogue", list(EPILOGUES))
@grid("path", ["resident", "split"])
@layouts
@dtypes
def test_fused_epilogues(epilogue, path, layout, dtype):
    has_res, relu = EPILOGUES[epilogue]
    x3, dy3, res3, weight, bias = _make((3, 3, 6), layout, dtype, seed=3)
    res3 = res3 if has_res else None
    config = _small_tiles(dtype, path)
    y3, mean, rstd, _ = bt.forward_train(x3, weight, bias, EPS, res3, relu, config=config)
    y_true, _, _ = _truth_forward(x3, weight, bias, res3, relu)
    _check_layout(y3, x3)
    assert_close(y3, y_true, msg="y")
    # The ReLU mask comes from the y passed in: any y with clamped entries (zeros included).
    y_given = _laid_out(torch.randn(x3.shape, generator=torch.Generator().manual_seed(4))
                        .clamp(min=-0.5).round().to(dtype), layout) if relu else None
    mask = None if y_given is None else (y_given.double() > 0).double()
    dx3, dweight, dbias, dres3 = bt.backward(dy3, x3, y_given, mean, rstd, weight, True,
                                             need_dx=True, need_dres=has_res, config=config)
    dx_true, dw_true, db_true, upstream = _truth_backward(dy3, x3, weight, True, mask)
    assert_close(dx3, dx_true, msg="dx")
    assert_close(dweight, dw_true, dtype=_stat_dtype(dtype), msg="dweight")
    assert_close(dbias, db_true, dtype=_stat_dtype(dtype), msg="dbias")
    if has_res:
        _check_layout(dres3, x3)
        assert_close(dres3, upstream, msg="dres = dz")
    else:
        assert dres3 is None


@grid("path", ["resident", "split"])
def test_gradients_without_dx(path):
    x3, dy3, _, weight, _ = _make((4, 3, 5), "channels_last", torch.float32, seed=5)
    mean, rstd = _saved_stats(x3)
    dx3, dweight, dbias, _ = bt.backward(dy3, x3, None, mean, rstd, weight, True,
                                         need_dx=False, config=_small_tiles(torch.float32, path))
    _, dw_true, db_true, _ = _truth_backward(dy3, x3, weight, training=True)
    assert dx3 is None
    assert_close(dweight, dw_true, msg="dweight")
    assert_close(dbias, db_true, msg="dbias")


@grid("path", PATHS)
def test_large_mean_keeps_precision(path):
    """float32 with mean 1e4 and std 1e-2 normalizes within 1e-2 of float64 (in std units)."""
    g = torch.Generator().manual_seed(6)
    x3 = (1e4 + 1e-2 * torch.randn(4, 2, 33, generator=g, dtype=torch.float64)).float()
    y3, _, _, var = bt.forward_train(x3, None, None, 0.0, config=_small_tiles(x3.dtype, path))
    x = x3.double()
    y_true = (x - x.mean((0, 2), keepdim=True)) / x.std((0, 2), unbiased=False, keepdim=True)
    assert (y3.double() - y_true).abs().max() < 1e-2
    torch.testing.assert_close(var.double(), x.var((0, 2), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf, on purpose
@grid("path", PATHS)
def test_non_finite_input_gives_non_finite_statistics(path):
    """A NaN or inf in a channel shows in its mean and var (what the running update skips on)."""
    x3 = _make((3, 3, 5), "ncl", torch.float32, seed=11)[0]
    x3[1, 0, 2], x3[2, 2, 4] = float("nan"), float("inf")
    _, mean, _, var = bt.forward_train(x3, None, None, EPS, config=_small_tiles(x3.dtype, path))
    assert not mean[0].isfinite() and not var[0].isfinite()
    assert not mean[2].isfinite() and not var[2].isfinite()
    assert mean[1].isfinite() and var[1].isfinite()


@grid("layout", LAYOUTS)
def test_gradient_layout_mismatch(layout):
    """dy in the other layout, or expanded (stride 0), is read correctly."""
    x3, dy3, _, weight, _ = _make((3, 4, 5), layout, torch.float32, seed=7)
    other = dy3.contiguous() if layout == "channels_last" else _laid_out(dy3, "channels_last")
    expanded = torch.ones(1, 1, 1).expand(x3.shape)
    mean, rstd = _saved_stats(x3)
    for dy in (other, expanded):
        dx3, dweight, _, _ = bt.backward(dy, x3, None, mean, rstd, weight, True)
        dx_true, dw_true, _, _ = _truth_backward(dy, x3, weight, training=True)
        _check_layout(dx3, x3)
        assert_close(dx3, dx_true, msg="dx")
        assert_close(dweight, dw_true, msg="dweight")


def _ema(running, batch, factor):
    return (1 - factor) * running.double() + factor * batch.double()


@grid("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@grid("running_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_update_running_stats(momentum, running_dtype):
    g = torch.Generator().manual_seed(8)
    c, m = 1500, 12  # more channels than one 1024-wide block of the kernel
    running_mean = torch.randn(c, generator=g, dtype=running_dtype)
    running_var = torch.rand(c, generator=g, dtype=running_dtype) + 0.5
    count = torch.tensor(4)
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g)
    before = running_mean.clone(), running_var.clone()
    bt.update_running_stats(running_mean, running_var, count, mean, var, m, momentum)
    factor = 1 / 5 if momentum is None else momentum  # cumulative: this is the 5th batch
    tol = TOL[running_dtype] if running_dtype == torch.float64 else TOL[torch.float32]
    assert count.item() == 5
    unbiased = var.double() * m / (m - 1)
    for got, start, batch in ((running_mean, before[0], mean), (running_var, before[1], unbiased)):
        torch.testing.assert_close(got.double(), _ema(start, batch, factor), rtol=tol[0],
                                   atol=max(tol[1], 1e-7))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf, on purpose
@grid("bad", ["nan_mean", "inf_var", "neg_inf_mean"])
@grid("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_non_finite_batch_changes_nothing(bad, momentum):
    c = 1500  # the bad channel sits in the kernel's second 1024-wide block
    running_mean, running_var, count = torch.randn(c), torch.rand(c) + 0.5, torch.tensor(7)
    mean, var = torch.randn(c), torch.rand(c)
    {"nan_mean": mean, "inf_var": var, "neg_inf_mean": mean}[bad][1400] = {
        "nan_mean": float("nan"), "inf_var": float("inf"), "neg_inf_mean": -float("inf")}[bad]
    before = running_mean.clone(), running_var.clone()
    bt.update_running_stats(running_mean, running_var, count, mean, var, 8, momentum)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    assert count.item() == 7


def test_update_without_counter():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    bt.update_running_stats(running_mean, running_var, None, torch.ones(3), torch.ones(3), 4, 0.5)
    assert_close(running_mean, torch.full((3,), 0.5, dtype=torch.float64), dtype=torch.float32)
    assert_close(running_var, torch.full((3,), 0.5 + 0.5 * 4 / 3, dtype=torch.float64),
                 dtype=torch.float32)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bt.update_running_stats(running_mean, running_var, None, torch.ones(3), torch.ones(3), 4,
                                None)


@grid("path", PATHS)
def test_bitwise_deterministic(path):
    x3, dy3, res3, weight, bias = _make((5, 5, 13), "channels_last", torch.float32, seed=9)
    config = _small_tiles(torch.float32, path)

    def run():
        y3, mean, rstd, var = bt.forward_train(x3, weight, bias, EPS, res3, True, config=config)
        return (y3, mean, rstd, var) + bt.backward(dy3, x3, y3, mean, rstd, weight, True,
                                                   need_dres=True, config=config)

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_refuses_what_it_cannot_run():
    assert not bt.supports(torch.zeros(2, 3, 4, dtype=torch.int32), None, False)
    assert not bt.supports(torch.zeros(2, 3, 8)[:, :, ::2], None, False)  # strided positions
    assert not bt.supports(torch.zeros(0, 3, 4), None, False)
    assert not bt.supports(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), False)
    overlapping = torch.zeros(16).as_strided((2, 3, 4), (4, 1, 1))  # rows share memory
    assert not bt.supports(overlapping, None, False)
    assert bt.supports(torch.zeros(2, 4, 6)[:, :, :3].transpose(1, 2), None, False)  # row gaps
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        bt.forward_train(torch.zeros(2, 3, 8)[:, :, ::2], None, None, EPS)
    with pytest.raises(ValueError, match="resident path"):
        bt.forward_train(torch.zeros(64, 3, 64), None, None, EPS,
                         config=tp.Config(path="resident", resident_elems=16))
    with pytest.raises(ValueError, match="Config.path"):
        tp.Config(path="fast")
    with pytest.raises(ValueError, match="Config.tile_bytes"):
        tp.Config(tile_bytes=0)


def test_functional_end_to_end():
    """``batch_norm(..., backend="triton")``: 4D channels-last input, residual and ReLU, running
    statistics, autograd; then inference; against float64 torch."""
    from batchnorm.functional import batch_norm

    g = torch.Generator().manual_seed(10)
    x = (torch.randn(3, 4, 5, 2, generator=g) * 2 + 1).to(memory_format=torch.channels_last)
    residual, dy = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    truths = [t.double().requires_grad_() for t in (x, weight, bias, residual)]
    running = [torch.zeros(4), torch.ones(4)]
    running_true = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    count = torch.tensor(0)
    with mock.patch.object(bt, "forward_train", wraps=bt.forward_train) as spy:
        y = batch_norm(leaves[0], *running, leaves[1], leaves[2], training=True, momentum=0.1,
                       num_batches_tracked=count, activation="relu", residual=leaves[3],
                       backend="triton")
    assert spy.call_count == 1, "the call did not reach the Triton backend"
    y_true = torch.relu(F.batch_norm(truths[0], *running_true, truths[1], truths[2],
                                     training=True, momentum=0.1, eps=EPS) + truths[3])
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_true.detach(), msg="y")
    assert count.item() == 1
    for got, want in zip(running, running_true, strict=True):
        assert_close(got, want, dtype=torch.float32, msg="running statistics")
    y.backward(dy)
    y_true.backward(dy.double())
    for got, want in zip(leaves, truths, strict=True):
        assert_close(got.grad, want.grad, dtype=torch.float32, msg="gradient")
    y_eval = batch_norm(x, *running, weight, bias, training=False, backend="triton")
    assert_close(y_eval, F.batch_norm(x.double(), *running_true, weight.double(), bias.double(),
                                      training=False, eps=EPS), msg="inference")
