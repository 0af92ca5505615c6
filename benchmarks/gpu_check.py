"""GPU correctness check of the Triton backend at real sizes, in one run on a CUDA machine.

Checks, each printed as PASS/FAIL with its largest error (the run exits 1 on any failure):

1. ``forward_train``, ``backward`` and ``forward_eval`` of ``batchnorm.kernels.triton_backend``
   on the benchmark shapes (float32, bfloat16, float16; NCHW and channels_last) with the default
   paths, against float64 torch (``F.batch_norm`` and its autograd) on the same values;
2. every path forced (resident, looped, split) with the fused residual + ReLU epilogue;
3. the running-statistics update on the device, including the non-finite skip;
4. bitwise determinism: forward and backward twice on every path;
5. a training step (forward, running-statistics update, backward) of the functional API
   captured in a CUDA graph replays to exactly the values of eager calls;
6. ``torch.compile(fullgraph=True)`` of ``batch_norm(..., backend="triton")``;
7. ``batchnorm.BatchNorm2d`` with ``BATCHNORM_BACKEND=triton`` against ``torch.nn.BatchNorm2d``.

Tolerances are the per-dtype table of ``tests/tolerances.py``. Run from the repository root
(a few minutes, most of it Triton compiling each kernel specialization once)::

    PYTHONPATH=. python benchmarks/gpu_check.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package and the one tolerance table

from tolerances import TOL  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm.functional import batch_norm  # noqa: E402
from batchnorm.kernels import triton_backend as bt  # noqa: E402
from batchnorm.kernels import triton_plan as tp  # noqa: E402

EPS = 1e-5
SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14),
          (256, 2048, 7, 7), (32, 64, 56, 56), (8192, 4096)]
MID_SHAPES = [(64, 96, 28, 28), (256, 2048, 7, 7), (2048, 768)]  # for forcing every path
# --smoke: the same script on small shapes, e.g. on a CPU under TRITON_INTERPRET=1
SMOKE_SHAPES = [(4, 6, 5, 5), (64, 3)]
SMOKE_MID_SHAPES = [(3, 5, 4, 3), (6, 4)]
DEVICE = "cuda"
RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """``got`` within the tolerance of ``dtype`` of the float64 ``want``; reported."""
    rtol, atol = TOL[dtype]
    err = (got.double() - want).abs()
    bound = atol + rtol * want.abs()
    finite_alike = torch.equal(torch.isfinite(got), torch.isfinite(want))
    ok = bool((err <= bound).all()) and finite_alike
    report(name, ok, f"max abs err {err.max().item():.3g}, worst err/bound "
                     f"{(err / bound).max().item():.3g}")
    return ok


def make(shape, dtype, channels_last, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    spread = torch.rand(view, device=DEVICE, generator=g) * 2 + 0.5
    offset = torch.randn(view, device=DEVICE, generator=g) * 2
    x = (torch.randn(shape, device=DEVICE, generator=g) * spread + offset).to(dtype)
    dy = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    res = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    if channels_last:
        x, dy, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, res))
    w = (torch.rand(c, device=DEVICE, generator=g) + 0.5).to(dtype)
    b = torch.randn(c, device=DEVICE, generator=g).to(dtype)
    return x, dy, res, w, b


def ncl(t):
    return t.reshape(t.shape[0], t.shape[1], -1)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def truth(x, dy, w, b, res=None, relu_mask=None):
    """float64 training forward (+ residual, ReLU) and its gradients for upstream ``dy``."""
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS)
    if res is not None:
        y = y + res.double()
    z = y
    if relu_mask is not None:
        y = torch.relu(y)
    up = dy.double() if relu_mask is None else dy.double() * relu_mask
    dx, dw, db = torch.autograd.grad(z, leaves, up)
    return y.detach(), dx, dw, db, up


def check_default_paths(shape, dtype, channels_last):
    name = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {'CL' if channels_last else 'NCHW'}"
    x, dy, _, w, b = make(shape, dtype, channels_last)
    y3, mean, rstd, var = bt.forward_train(ncl(x), w, b, EPS)
    y, dx, dw, db, _ = truth(x, dy, w, b)
    close(f"train y       {name}", y3, ncl(y), dtype)
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    close(f"train mean    {name}", mean, xd.mean(dims), acc(dtype))
    close(f"train var     {name}", var, xd.var(dims, unbiased=False), acc(dtype))
    dx3, dw3, db3, _ = bt.backward(ncl(dy), ncl(x), None, mean, rstd, w, True)
    close(f"backward dx   {name}", dx3, ncl(dx), dtype)
    close(f"backward dw   {name}", dw3, dw, acc(dtype))
    close(f"backward db   {name}", db3, db, acc(dtype))
    scale, shift = rstd * w.to(rstd.dtype), b.to(rstd.dtype) - mean * rstd * w.to(rstd.dtype)
    y_eval = bt.forward_eval(ncl(x), scale, shift)
    close(f"eval y        {name}", y_eval, ncl(y), dtype)
    report(f"layout kept   {name}", y3.stride() == ncl(x).stride() == dx3.stride(), "")


def paths_for(x3):
    """The paths this input can take (resident only where a channel block fits)."""
    paths = ["looped", "split"]
    try:
        tp.plan(tp.view_of(x3), x3.element_size(), 3, x3.device, tp.Config(path="resident"))
        paths.insert(0, "resident")
    except ValueError:
        pass
    return paths


def check_forced_paths(shape, dtype, channels_last):
    name = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {'CL' if channels_last else 'NCHW'}"
    x, dy, res, w, b = make(shape, dtype, channels_last, seed=1)
    x3, dy3, res3 = ncl(x), ncl(dy), ncl(res)
    for path in paths_for(x3):
        config = tp.Config(path=path)
        y3, mean, rstd, _ = bt.forward_train(x3, w, b, EPS, res3, True, config=config)
        mask = (y3.double() > 0).double()
        y, dx, dw, db, up = truth(x, dy, w, b, res, mask.reshape(x.shape))
        close(f"{path:8s} y+res+relu {name}", y3, ncl(y), dtype)
        outs = bt.backward(dy3, x3, y3, mean, rstd, w, True, need_dres=True, config=config)
        close(f"{path:8s} dx         {name}", outs[0], ncl(dx), dtype)
        close(f"{path:8s} dw         {name}", outs[1], dw, acc(dtype))
        close(f"{path:8s} db         {name}", outs[2], db, acc(dtype))
        close(f"{path:8s} dres       {name}", outs[3], ncl(up), dtype)
        again = bt.forward_train(x3, w, b, EPS, res3, True, config=config)
        again += bt.backward(dy3, x3, again[0], again[1], again[2], w, True, need_dres=True,
                             config=config)
        first = (y3, mean, rstd) + outs
        same = all(torch.equal(p, q) for p, q in zip(first, again[:3] + again[4:], strict=True))
        report(f"{path:8s} bitwise    {name}", same, "two runs, forward and backward")


def check_running_stats():
    c = 1000
    for momentum in (0.1, None):
        rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
        count = torch.tensor(4, device=DEVICE)
        mean, var = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE)
        start = rm.double(), rv.double()
        bt.update_running_stats(rm, rv, count, mean, var, 50, momentum)
        f = 0.2 if momentum is None else momentum
        close(f"running mean momentum={momentum}", rm, (1 - f) * start[0] + f * mean.double(),
              torch.float32)
        close(f"running var  momentum={momentum}", rv,
              (1 - f) * start[1] + f * var.double() * 50 / 49, torch.float32)
        report(f"counter      momentum={momentum}", count.item() == 5, f"{count.item()}")
        var[c - 1] = float("nan")
        before = rm.clone(), rv.clone()
        bt.update_running_stats(rm, rv, count, mean, var, 50, momentum)
        same = torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and count.item() == 5
        report(f"non-finite batch skipped momentum={momentum}", same, "")


def check_non_finite_input():
    """A NaN or inf in the input shows in its channel's mean and var on every path (GPU max
    and min drop NaN, so this differs from the interpreter if the kernels clamp with them),
    and the running statistics then stay unchanged."""
    shape = (64, 8, 300) if DEVICE == "cuda" else (3, 8, 5)
    x3 = make(shape, torch.float32, False, seed=5)[0]
    x3[1, 0, 2], x3[2, 5, 4] = float("nan"), float("inf")
    for path in paths_for(x3):
        _, mean, _, var = bt.forward_train(x3, None, None, EPS, config=tp.Config(path=path))
        bad = ~(mean.isfinite() & var.isfinite())
        expected = torch.zeros(8, dtype=torch.bool, device=DEVICE)
        expected[[0, 5]] = True
        report(f"{path:8s} non-finite input -> non-finite mean/var", torch.equal(bad, expected),
               f"non-finite channels {bad.nonzero().flatten().tolist()}")
        rm, rv, count = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE), \
            torch.tensor(3, device=DEVICE)
        bt.update_running_stats(rm, rv, count, mean, var, shape[0] * shape[2], 0.1)
        report(f"{path:8s} running stats kept", bool((rm == 0).all() and (rv == 1).all())
               and count.item() == 3, "")


def check_cuda_graph():
    x, dy, res, w, b = make((64, 96, 28, 28), torch.bfloat16, True, seed=2)
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    xg = x.clone().requires_grad_()

    def step(stats, count):
        y = batch_norm(xg, *stats, w, b, training=True, num_batches_tracked=count,
                       activation="relu", residual=res, backend="triton")
        return (y,) + torch.autograd.grad(y, (xg, w, b), dy)

    def fresh():
        return [torch.zeros(96, device=DEVICE), torch.ones(96, device=DEVICE)], \
            torch.tensor(0, device=DEVICE)

    stats_e, count_e = fresh()
    eager = step(stats_e, count_e)
    stats_g, count_g = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        step(*fresh())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(stats_g, count_g)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(p, q) for p, q in zip(eager, captured, strict=True))
    same &= torch.equal(stats_e[0], stats_g[0]) and torch.equal(stats_e[1], stats_g[1])
    report("CUDA graph replay = eager (y, dx, dw, db, running stats)", same,
           f"counter {count_g.item()} after one replay")


def check_compile():
    torch._dynamo.reset()
    x, _, res, w, b = make((32, 64, 56, 56), torch.float32, False, seed=3)

    def f(x, res):
        return batch_norm(x, None, None, w, b, training=True, activation="relu", residual=res,
                          backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    close("torch.compile(fullgraph=True) y", compiled(x, res), f(x, res).double(),
          torch.float32)


def check_module():
    shape = (32, 64, 56, 56) if DEVICE == "cuda" else (4, 5, 6, 7)
    c = shape[1]
    x, dy = make(shape, torch.float32, True, seed=4)[:2]
    x.requires_grad_()
    ours = batchnorm.BatchNorm2d(c).to(DEVICE)
    ref = torch.nn.BatchNorm2d(c).to(DEVICE).double()
    os.environ["BATCHNORM_BACKEND"] = "triton"
    try:
        y = ours(x)
        (gx,) = torch.autograd.grad(y, x, dy)
    finally:
        os.environ.pop("BATCHNORM_BACKEND")
    xd = x.detach().double().requires_grad_()
    yd = ref(xd)
    (gd,) = torch.autograd.grad(yd, xd, dy.double())
    close("BatchNorm2d y (BATCHNORM_BACKEND=triton)", y, yd.detach(), torch.float32)
    close("BatchNorm2d dx", gx, gd, torch.float32)
    close("BatchNorm2d running_var", ours.running_var, ref.running_var, torch.float32)


def write(out: Path, seconds: float) -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"
    lines = [f"# Triton backend correctness on {name}", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"{len(RESULTS)} checks in {seconds:.0f} s, "
             f"{sum(not ok for _, ok, _ in RESULTS)} failed.", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in RESULTS]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "gpu_check.md")  # atomic: never a half-written table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")),
                        help="folder for gpu_check.md. Default: $OUT, else the current folder")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="dtypes of the real-size checks. Default: float32,bfloat16,float16")
    parser.add_argument("--smoke", action="store_true",
                        help="small shapes on the CPU (with TRITON_INTERPRET=1): checks the script")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if not bt.available() or not (args.smoke or torch.cuda.is_available()):
        print("needs triton and a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 2
    start = time.time()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes, mid_shapes = (SMOKE_SHAPES, SMOKE_MID_SHAPES) if args.smoke else (SHAPES, MID_SHAPES)
    for shape in shapes:
        for dtype in dtypes:
            for channels_last in ((False, True) if len(shape) == 4 else (False,)):
                check_default_paths(shape, dtype, channels_last)
                torch.cuda.empty_cache()
    for shape in mid_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in ((False, True) if len(shape) == 4 else (False,)):
                check_forced_paths(shape, dtype, channels_last)
    checks = [check_running_stats, check_non_finite_input]
    checks += [] if args.smoke else [check_cuda_graph, check_compile]
    for check in checks + [check_module]:
        try:
            check()
        except Exception as error:  # a crash is a failed check; go on with the others
            report(check.__name__, False, f"{type(error).__name__}: {error}")
    write(args.out, time.time() - start)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} passed in {time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
