"""Tests of the numba CPU backend (batchnorm/kernels/numba_backend.py) against independent truths.

Truths: float64 ``torch.nn.functional.batch_norm`` (outputs, and its autograd for the
gradients) and the eager specification ``batchnorm.kernels.eager`` run in float64 on the same
values.
Every case runs in every loop order of the kernels: contiguous input in channel blocks (of one
channel, and of two) and streamed (``ncl``), channels-last input streamed (``rows``); the
streamed ones with the chunks of rows the backend picks and with three chunks forced (uneven,
and cutting samples apart). All in float32 and float64, with non-trivial weight/bias and
without them.
"""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from batchnorm.kernels import eager as _eager

numba = pytest.importorskip("numba", reason="numba is not installed: the CPU kernels are optional")
cpu = pytest.importorskip("batchnorm.kernels.numba_backend")

EPS = 1e-5

# Named (N, C, L) cases: odd sizes, degenerate axes, and row counts around the kernels' chunking.
CASES = {
    "N2_C3_L7": (2, 3, 7),
    "one_channel": (4, 1, 9),
    "L1_dense": (16, 5, 1),
    "NL2_two_samples": (2, 4, 1),
    "NL2_two_positions": (1, 4, 2),
    "5d_like_D2_H3_W5": (3, 4, 30),
    "larger_N8_C32_L50": (8, 32, 50),
    "rows_300_uneven_chunks": (300, 7, 1),
    "rows_485_C6": (5, 6, 97),
}
ORDERS = ("ncl_blocks_1", "ncl_blocks_2", "ncl", "ncl_3_chunks", "rows", "rows_3_chunks")
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _multithreaded_kernels(monkeypatch):
    # Run even the small cases on numba's thread pool; the one-thread path that small inputs
    # take gives bitwise the same results (see the thread-count test below).
    monkeypatch.setattr(cpu, "DEFAULT", cpu.DEFAULT.replace(parallel_min_numel=0))


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    """The layout under test (``"ncl"`` or ``"rows"``), its kernels forced as the name says.

    ``ncl_blocks_2`` has channel blocks of two, the last one short when C is odd. The
    ``_3_chunks`` variants cut the rows into three chunks (or one per row when there are
    fewer), where the backend would pick one for most small cases: partial sums merged across
    chunk boundaries, wherever those fall.
    """
    name = request.param
    config = cpu.DEFAULT
    if name.startswith("ncl_blocks"):
        monkeypatch.setattr(cpu, "DEFAULT", config.replace(slice_bytes=1 << 62,
                                                           block=int(name[-1])))
        return "ncl"
    config = config.replace(slice_bytes=0)  # contiguous input streams
    if name.endswith("_3_chunks"):
        config = config.replace(chunks=3, min_chunk_values=1)
    monkeypatch.setattr(cpu, "DEFAULT", config)
    return name.removesuffix("_3_chunks")


def _make(shape, order, dtype, seed=0):
    """x3 (offset and scaled per channel) in the memory layout of ``order``, dy3 alike, γ, β."""
    n, c, length = shape
    g = torch.Generator().manual_seed(seed)
    offset = torch.empty(1, c, 1, dtype=torch.float64).uniform_(-3, 3, generator=g)
    spread = torch.empty(1, c, 1, dtype=torch.float64).uniform_(0.5, 4, generator=g)
    x = offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.empty(c, dtype=torch.float64).uniform_(0.5, 2, generator=g)
    weight = weight * torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    bias = torch.empty(c, dtype=torch.float64).uniform_(-1, 1, generator=g)

    def laid_out(t):
        t = t.to(dtype)
        return t if order != "rows" else t.transpose(1, 2).contiguous().transpose(1, 2)

    x3 = laid_out(x)
    # C == 1 or L == 1 makes both layouts hold at once; the backend then picks its order itself.
    assert cpu.loop_order(x3) == order or 1 in (c, length)
    return x3, laid_out(dy), weight.to(dtype), bias.to(dtype)


def _assert_same_layout(out, x3):
    assert out.shape == x3.shape and out.dtype == x3.dtype
    if x3.is_contiguous():
        assert out.is_contiguous()
    if x3.transpose(1, 2).is_contiguous():
        assert out.transpose(1, 2).is_contiguous()


def _params(affine, weight, bias):
    return (weight, bias) if affine else (None, None)


grid = pytest.mark.parametrize
all_cases = [
    grid("shape", list(CASES.values()), ids=list(CASES)),
    grid("dtype", DTYPES, ids=["float32", "float64"]),
    grid("affine", [True, False], ids=["affine", "no_affine"]),
]


def _apply(marks):
    def decorate(function):
        for mark in reversed(marks):
            function = mark(function)
        return function

    return decorate


@_apply(all_cases)
def test_forward_train_matches_float64_truths(shape, order, dtype, affine):
    x3, _, weight, bias = _make(shape, order, dtype)
    w, b = _params(affine, weight, bias)
    y3, mean, rstd, var = cpu.forward_train(x3, w, b, EPS)
    _assert_same_layout(y3, x3)
    x64 = x3.double()
    w64, b64 = (None if t is None else t.double() for t in (w, b))
    torch_y = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    spec_y, spec_mean, spec_rstd, spec_var = _eager.forward_train(x64, w64, b64, EPS)
    var_truth, mean_truth = torch.var_mean(x64, dim=(0, 2), correction=0)
    for actual, truth in ((y3, torch_y), (y3, spec_y), (mean, mean_truth), (mean, spec_mean),
                          (var, var_truth), (var, spec_var), (rstd, spec_rstd)):
        assert_close(actual, truth, dtype)
    assert mean.dtype == var.dtype == rstd.dtype == _eager.acc_dtype(dtype)


@_apply(all_cases)
def test_forward_eval_matches_float64_truths(shape, order, dtype, affine):
    x3, _, weight, bias = _make(shape, order, dtype)
    w, b = _params(affine, weight, bias)
    c = shape[1]
    running_mean = torch.linspace(-1, 2, c, dtype=dtype)
    running_var = torch.linspace(0.5, 3, c, dtype=dtype)
    scale, shift = _eager.inference_affine(w, b, running_mean, running_var, EPS)
    y3 = cpu.forward_eval(x3, scale, shift)
    _assert_same_layout(y3, x3)
    w64, b64 = (None if t is None else t.double() for t in (w, b))
    torch_y = F.batch_norm(x3.double(), running_mean.double(), running_var.double(), w64, b64,
                           training=False, eps=EPS)
    spec_y = _eager.forward_eval(x3.double(), scale.double(), shift.double())
    assert_close(y3, torch_y, dtype)
    assert_close(y3, spec_y, dtype)


def _torch_grads(x3, dy3, w, b, training, running=None):
    """dx, dweight, dbias of float64 torch.nn.functional.batch_norm by autograd."""
    x = x3.double().requires_grad_()
    params = [None if t is None else t.double().requires_grad_() for t in (w, b)]
    rm, rv = (None, None) if running is None else (t.double() for t in running)
    y = F.batch_norm(x, rm, rv, *params, training=training, eps=EPS)
    y.backward(dy3.double())
    grads = [x.grad] + [None if p is None else p.grad for p in params]
    return grads


@_apply(all_cases)
def test_backward_training_matches_float64_truths(shape, order, dtype, affine):
    x3, dy3, weight, bias = _make(shape, order, dtype)
    w, b = _params(affine, weight, bias)
    _, mean, rstd, _ = _eager.forward_train(x3, w, b, EPS)  # the statistics a forward saves
    dx3, dweight, dbias, dres = cpu.backward(dy3, x3, None, mean, rstd, w, True)
    _assert_same_layout(dx3, x3)
    assert dres is None
    dx_truth, dw_truth, db_truth = _torch_grads(x3, dy3, w, b, training=True)
    x64, dy64 = x3.double(), dy3.double()
    m64, r64 = _eager.forward_train(x64, None, None, EPS)[1:3]
    spec = _eager.backward(dy64, x64, None, m64, r64, None if w is None else w.double(), True)
    assert_close(dx3, dx_truth, dtype)
    assert_close(dx3, spec[0], dtype)
    assert_close(dbias, dy64.sum((0, 2)), dtype)
    assert_close(dweight, spec[1], dtype)
    if affine:
        assert_close(dweight, dw_truth, dtype)
        assert_close(dbias, db_truth, dtype)


@_apply(all_cases)
def test_backward_inference_matches_float64_truths(shape, order, dtype, affine):
    x3, dy3, weight, bias = _make(shape, order, dtype)
    w, b = _params(affine, weight, bias)
    c = shape[1]
    running = (torch.linspace(-1, 2, c, dtype=dtype), torch.linspace(0.5, 3, c, dtype=dtype))
    rstd = torch.rsqrt(running[1] + EPS)
    dx3, dweight, dbias, _ = cpu.backward(dy3, x3, None, running[0], rstd, w, False)
    _assert_same_layout(dx3, x3)
    dx_truth, dw_truth, db_truth = _torch_grads(x3, dy3, w, b, training=False, running=running)
    assert_close(dx3, dx_truth, dtype)
    x_hat = (x3.double() - running[0].double().view(1, -1, 1)) * rstd.double().view(1, -1, 1)
    assert_close(dweight, (dy3.double() * x_hat).sum((0, 2)), dtype)
    assert_close(dbias, dy3.double().sum((0, 2)), dtype)
    if affine:
        assert_close(dweight, dw_truth, dtype)
        assert_close(dbias, db_truth, dtype)


def test_backward_without_dx_still_gives_the_sums(order):
    x3, dy3, weight, _ = _make((3, 5, 11), order, torch.float64)
    _, mean, rstd, _ = _eager.forward_train(x3, weight, None, EPS)
    dx3, dweight, dbias, _ = cpu.backward(dy3, x3, None, mean, rstd, weight, True, need_dx=False)
    spec = _eager.backward(dy3, x3, None, mean, rstd, weight, True)
    assert dx3 is None
    assert_close(dweight, spec[1])
    assert_close(dbias, spec[2])


def test_gradient_in_another_layout_than_the_input(order):
    x3, dy3, weight, _ = _make((4, 6, 10), order, torch.float64)
    dy_other = dy3.transpose(1, 2).contiguous().transpose(1, 2) if order != "rows" else \
        dy3.contiguous()
    _, mean, rstd, _ = _eager.forward_train(x3, weight, None, EPS)
    dx3 = cpu.backward(dy_other, x3, None, mean, rstd, weight, True)[0]
    _assert_same_layout(dx3, x3)
    assert_close(dx3, _torch_grads(x3, dy_other, weight, None, training=True)[0])


def test_outputs_from_the_buffer_pool_are_ordinary_tensors(order, monkeypatch):
    # Outputs of numba_buffers.MIN_BYTES or more come from the pool; lower the bar to test it.
    monkeypatch.setattr(cpu.numba_buffers, "MIN_BYTES", 0)
    x3, dy3, weight, bias = _make((3, 5, 11), order, torch.float32)
    y3, mean, rstd, _ = cpu.forward_train(x3, weight, bias, EPS)
    dx3 = cpu.backward(dy3, x3, None, mean, rstd, weight, True)[0]
    for out in (y3, dx3):
        _assert_same_layout(out, x3)
    assert_close(y3, F.batch_norm(x3.double(), None, None, weight.double(), bias.double(),
                                  training=True, eps=EPS), torch.float32)
    assert_close(dx3, _torch_grads(x3, dy3, weight, bias, training=True)[0], torch.float32)
    y3.add_(1.0)  # writable, and usable as any tensor
    assert torch.isfinite(y3).all()


def test_large_mean_small_std_float32_normalizes_within_1e_2_std(order):
    # mean 1e4, std 1e-2: float32 spacing at 1e4 is ~1e-3, a tenth of the std, so a naive
    # x - mean with a rounded mean is off by a large fraction of the std.
    g = torch.Generator().manual_seed(7)
    x64 = 1e4 + 1e-2 * torch.randn(16, 3, 257, generator=g, dtype=torch.float64)
    x3 = x64.float()
    if order == "rows":
        x3 = x3.transpose(1, 2).contiguous().transpose(1, 2)
    eps = 1e-12  # negligible against var = 1e-4 (torch refuses eps = 0 in training)
    y3 = cpu.forward_train(x3, None, None, eps)[0]
    truth = F.batch_norm(x3.double(), None, None, training=True, eps=eps)
    assert (y3.double() - truth).abs().max().item() <= 1e-2


@grid("shape", [(700, 9, 1), (40, 9, 20)], ids=["700_rows", "360_rows_of_20"])
def test_results_are_bitwise_reproducible_across_thread_counts(shape, order):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here: nothing to compare across thread counts")
    x3, dy3, weight, bias = _make(shape, order, torch.float32, seed=3)
    previous = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            numba.set_num_threads(threads)
            y3, mean, rstd, _ = cpu.forward_train(x3, weight, bias, EPS)
            results.append((y3,) + cpu.backward(dy3, x3, None, mean, rstd, weight, True)[:3])
    finally:
        numba.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_small_inputs_run_on_one_thread_and_restore_the_thread_count(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here: nothing to switch")
    monkeypatch.setattr(cpu, "DEFAULT", cpu.DEFAULT.replace(parallel_min_numel=100))
    kernel = cpu._kernel("forward_eval_ncl")
    seen = []

    def spy(*args):
        seen.append(numba.get_num_threads())
        return kernel(*args)

    monkeypatch.setattr(cpu, "_kernel", lambda name: spy)
    before = numba.get_num_threads()
    for shape in ((2, 3, 4), (2, 3, 50)):  # 24 elements, then 300
        cpu.forward_eval(torch.randn(shape), torch.ones(3), torch.zeros(3))
    assert seen == [1, before]
    assert numba.get_num_threads() == before


def test_non_finite_input_gives_non_finite_statistics_for_its_channel_only(order):
    x3 = _make((3, 4, 5), order, torch.float32)[0].clone()
    x3[1, 2, 3] = float("inf")
    _, mean, _, var = cpu.forward_train(x3, None, None, EPS)
    finite = torch.isfinite(mean) & torch.isfinite(var)
    assert finite.tolist() == [True, True, False, True]


UNSUPPORTED = {
    "float16": (torch.zeros(2, 3, 4, dtype=torch.float16), None, False),
    "bfloat16": (torch.zeros(2, 3, 4, dtype=torch.bfloat16), None, False),
    "strided": (torch.zeros(2, 3, 8)[:, :, ::2], None, False),
    "empty": (torch.zeros(0, 3, 4), None, False),
    "relu": (torch.zeros(2, 3, 4), None, True),
    "residual": (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), False),
}


@grid("call", list(UNSUPPORTED.values()), ids=list(UNSUPPORTED))
def test_unsupported_calls_are_refused_with_a_clear_error(call):
    x3, residual3, relu = call
    assert not cpu.supports(x3, residual3, relu)
    with pytest.raises(ValueError, match="supports"):
        cpu.forward_train(x3, None, None, EPS, residual3, relu)


def test_supported_calls():
    assert cpu.available()
    for dtype in DTYPES:
        for memory in (torch.zeros(2, 3, 4), torch.zeros(2, 4, 3).transpose(1, 2)):
            assert cpu.supports(memory.to(dtype), None, False)


def test_backward_refuses_a_relu_mask():
    x3 = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="ReLU"):
        cpu.backward(x3, x3, x3, torch.zeros(3), torch.ones(3), None, True)


def _running_case(running_dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    c = 37
    running = (torch.randn(c, generator=g, dtype=running_dtype),
               torch.rand(c, generator=g, dtype=running_dtype) + 0.5)
    batch = torch.randn(c, generator=g) * 3 + 1, torch.rand(c, generator=g) + 0.1
    return running, batch


# (momentum, whether the layer keeps a counter); the cumulative average needs one.
UPDATES = {"momentum0.1": (0.1, True), "momentum0.7": (0.7, True), "cumulative": (None, True),
           "momentum0.1_no_counter": (0.1, False), "momentum0.7_no_counter": (0.7, False)}


@grid("update", list(UPDATES.values()), ids=list(UPDATES))
@grid("running_dtype", DTYPES, ids=["float32", "float64"])
def test_update_running_stats_matches_the_eager_specification(update, running_dtype):
    momentum, counter = update
    (running_mean, running_var), (mean, var) = _running_case(running_dtype)
    spec_mean, spec_var = running_mean.double(), running_var.double()
    count = torch.tensor(4) if counter else None
    spec_count = torch.tensor(4) if counter else None
    for step, m in enumerate((12, 2, 30)):  # several batches, each of m values per channel
        cpu.update_running_stats(running_mean, running_var, count, mean + step, var * (step + 1),
                                 m, momentum)
        _eager.update_running_stats(spec_mean, spec_var, spec_count, (mean + step).double(),
                                    (var * (step + 1)).double(), m, momentum)
    assert_close(running_mean, spec_mean, running_dtype)
    assert_close(running_var, spec_var, running_dtype)
    if counter:
        assert count.item() == spec_count.item() == 7


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@grid("bad", ["nan_mean", "inf_var", "neg_inf_mean"])
@grid("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_update_running_stats_skips_a_non_finite_batch_counter_included(bad, momentum):
    (running_mean, running_var), (mean, var) = _running_case(torch.float32)
    count = torch.tensor(7)
    target, value = {"nan_mean": (mean, float("nan")), "inf_var": (var, float("inf")),
                     "neg_inf_mean": (mean, -float("inf"))}[bad]
    target[30] = value
    before = running_mean.clone(), running_var.clone()
    cpu.update_running_stats(running_mean, running_var, count, mean, var, 8, momentum)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    assert count.item() == 7


def test_update_running_stats_hands_other_tensors_to_the_eager_function():
    # A strided running_mean, and a counter of another dtype: same result as the specification.
    storage = torch.zeros(6)
    running_mean, running_var = storage[::2], torch.ones(3)
    count = torch.tensor(2, dtype=torch.int32)
    cpu.update_running_stats(running_mean, running_var, count, torch.ones(3), torch.ones(3), 4,
                             None)
    assert count.item() == 3
    assert_close(running_mean, torch.full((3,), 1 / 3, dtype=torch.float64), torch.float32)
    assert storage[1::2].eq(0).all()  # the values between the strided ones stay untouched
    with pytest.raises(ValueError, match="num_batches_tracked"):
        cpu.update_running_stats(torch.zeros(3), torch.ones(3), None, torch.ones(3),
                                 torch.ones(3), 4, None)
