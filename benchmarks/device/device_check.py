"""Stages of the prepared GPU check of the Triton backend; device_check.sh runs them in order.

Run from the root of a project checkout with PYTHONPATH=. (the package, benchmarks/ and tests/
are found from the current folder). Each stage is its own process, so a CUDA error that poisons
one context costs that stage only. Every stage checks the DEADLINE it is given (seconds since
the epoch) before each item, prints each result as it comes, and rewrites its files under $OUT
after every item:

    env     versions, device properties, copy bandwidth           -> env.txt
    check   correctness at real sizes, every path forced, running
            statistics, non-finite input, bitwise determinism,
            CUDA-graph capture, BatchNorm2d, torch.compile         -> check.md, kernels.csv
    bench   ours vs torch eager on all 22 benchmark cases (eval,
            train, train+backward, with host enqueue time), fused
            epilogues, a targeted config sweep, kernel time under
            CUDA-graph replay on the small cases, torch.compile on
            a priority subset                                      -> bench.md, bench.csv,
                                                                      kernels.csv
    resnet  ResNet-50 training steps, bf16 autocast channels_last -> resnet.md
    summary the short tables printed last (no torch import)

SMOKE=1 runs the same code on the CPU with tiny shapes (needs TRITON_INTERPRET=1): it checks
the script, not the kernels.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path.cwd()
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
SMOKE = os.environ.get("SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
OUT = Path(os.environ.get("OUT") or "device_out")
DEADLINE = float(os.environ.get("DEADLINE") or time.time() + 600)
TARGET_MS = 20 if SMOKE else 60  # timed milliseconds per figure (median of the reps)

# The 22 benchmark cases of benchmarks/gpu.py, most decision-relevant first, so that a run cut
# short still covers every regime: split rows, split NCHW with a partial second wave, the
# resident path (register spills), the looped path (16-bit scalar loads), small (launch-bound),
# 2D; then the rest.
PRIORITY = [
    ((256, 256, 56, 56), "bfloat16", "channels_last"),
    ((256, 64, 112, 112), "float32", "nchw"),
    ((256, 2048, 7, 7), "bfloat16", "nchw"),
    ((256, 1024, 14, 14), "bfloat16", "nchw"),
    ((32, 64, 56, 56), "bfloat16", "channels_last"),
    ((8192, 4096), "float32", "nchw"),
    ((256, 64, 112, 112), "bfloat16", "nchw"),
    ((256, 256, 56, 56), "float32", "channels_last"),
    ((256, 2048, 7, 7), "float32", "nchw"),
    ((256, 1024, 14, 14), "float32", "channels_last"),
]
SMOKE_CASES = [((4, 6, 5, 5), "float32", "nchw"), ((4, 6, 5, 5), "bfloat16", "channels_last"),
               ((64, 3), "float32", "nchw")]


def left() -> float:
    return DEADLINE - time.time()


def say(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')} {left():4.0f}s left]", *parts, flush=True)


def write(name: str, text: str) -> None:
    """Rewrite ``$OUT/name`` atomically (a stage killed mid-write leaves the previous version)."""
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(OUT / name)


def write_csv(name: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(OUT / name)


def poisoned(error: BaseException) -> bool:
    """Whether the CUDA context is unusable after this error (the stage must stop)."""
    text = str(error)
    return any(s in text for s in ("illegal memory access", "unspecified launch failure",
                                   "device-side assert", "misaligned address",
                                   "illegal instruction", "CUDA error:", "capturing"))


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --- env -----------------------------------------------------------------------------------------

def stage_env() -> int:
    import platform

    import numpy
    import torch
    import triton

    lines = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA "
             f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton "
             f"{triton.__version__}, numpy {numpy.__version__}"]
    if DEVICE == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                     f"L2 {p.L2_cache_size / 2**20:.0f} MiB, {p.total_memory / 2**30:.0f} GiB, "
                     f"regs/SM {getattr(p, 'regs_per_multiprocessor', '?')}, "
                     f"max threads/SM {getattr(p, 'max_threads_per_multi_processor', '?')}")
        try:
            props = triton.runtime.driver.active.utils.get_device_properties(0)
            lines.append(f"triton device properties: {props}")
        except Exception as error:  # the helper moves between Triton versions
            lines.append(f"triton device properties: unavailable ({error})")
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = sorted(times)[len(times) // 2]
        lines.append(f"copy bandwidth (1 GiB device-to-device, read + write): "
                     f"{2 * src.numel() / ms / 1e6:.0f} GB/s (median of 10: {ms:.3f} ms)")
    for line in lines:
        say(line)
    write("env.txt", "\n".join(lines) + "\n")
    return 0


# --- check ---------------------------------------------------------------------------------------

CHECK_LOG: list[tuple[str, str, float, str]] = []  # (item, status, seconds, detail)


def _check_md(gc, t0: float) -> None:
    results = gc.RESULTS
    failed = [r for r in results if not r[1]]
    lines = ["# Triton backend on the GPU: correctness", "",
             f"{len(results)} checks, {len(failed)} failed, in {time.time() - t0:.0f} s; "
             f"items run: {sum(s == 'done' for _, s, _, _ in CHECK_LOG)}, skipped or crashed: "
             f"{sum(s != 'done' for _, s, _, _ in CHECK_LOG)}.", "",
             "| item | status | s | detail |", "|---|---|---|---|"]
    lines += [f"| {i} | {s} | {sec:.1f} | {d} |" for i, s, sec, d in CHECK_LOG]
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {n} | {'PASS' if ok else 'FAIL'} | {d} |" for n, ok, d in results]
    write("check.md", "\n".join(lines) + "\n")


def _determinism(shape, dtype_name, channels_last):
    """Forward and backward twice on the default path of a real-size input: bitwise equal."""
    import torch

    from batchnorm.kernels import triton_backend as bt

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(shape, device=DEVICE, generator=g).mul_(2).add_(1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w = torch.rand(shape[1], device=DEVICE, generator=g).add_(0.5).to(dtype)
    x3, dy3 = (t.reshape(shape[0], shape[1], -1) for t in (x, dy))

    def run():
        y3, mean, rstd, var = bt.forward_train(x3, w, w, 1e-5)
        return (y3, mean, rstd, var) + bt.backward(dy3, x3, None, mean, rstd, w, True)[:3]

    a, b = run(), run()
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def kernel_rows() -> list[dict]:
    """Registers, spills, shared memory and warps of every kernel this process compiled."""
    from batchnorm.kernels import triton_backward as tbk
    from batchnorm.kernels import triton_forward as tk

    rows = []
    for module in (tk, tbk):
        for name in sorted(n for n in dir(module) if n.endswith("_kernel")):
            fn = getattr(module, name)
            for caches in getattr(fn, "device_caches", {}).values():
                for k in list(caches[0].values()):
                    try:
                        k = k.result() if hasattr(k, "result") else k
                        src = getattr(k, "src", None)
                        names = getattr(getattr(src, "fn", None), "arg_names", [])
                        consts = {names[key[0]] if isinstance(key, tuple) and key
                                  and key[0] < len(names) else str(key): v
                                  for key, v in getattr(src, "constants", {}).items()}
                        keep = {n: consts[n] for n in (
                            "BN", "BC", "BL", "BG", "RESIDENT", "HAS_W", "HAS_B", "RELU",
                            "HAS_RES", "DX_PASS", "NEED_DRES", "ACC") if n in consts}
                        sig = getattr(src, "signature", {})
                        md = k.metadata
                        rows.append({"kernel": name, "num_warps": md.num_warps,
                                     "n_regs": getattr(k, "n_regs", ""),
                                     "n_spills": getattr(k, "n_spills", ""),
                                     "shared": md.shared,
                                     "x_dtype": sig.get(names[0], "") if names else "",
                                     "constexprs": " ".join(f"{a}={b}" for a, b in keep.items()),
                                     "int1_args": " ".join(n for n, v in consts.items()
                                                           if v == 1 and n not in keep)})
                    except Exception as error:
                        rows.append({"kernel": name, "constexprs": f"unreadable: {error}"})
    return rows


def merge_kernel_rows(rows: list[dict]) -> None:
    """kernels.csv: the union of this process's kernels and those an earlier stage wrote."""
    path = OUT / "kernels.csv"
    old = list(csv.DictReader(open(path))) if path.exists() else []
    seen, merged = set(), []
    for r in old + [{k: str(v) for k, v in r.items()} for r in rows]:
        key = tuple(sorted(r.items()))
        if key not in seen:
            seen.add(key)
            merged.append(r)
    write_csv("kernels.csv", merged)
    spilled = [r for r in merged if r.get("n_spills") not in ("", "0", None)]
    say(f"kernels.csv: {len(merged)} compiled kernels, {len(spilled)} with spills"
        + "".join(f"\n    {r['kernel']} {r['constexprs']} warps={r['num_warps']} "
                  f"regs={r['n_regs']} spills={r['n_spills']}" for r in spilled[:12]))


def stage_check() -> int:
    import gpu_check as gc
    import torch

    gc.DEVICE = DEVICE
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    t0 = time.time()
    if SMOKE:
        forced = [((3, 5, 4, 3), f32, False), ((3, 5, 4, 3), bf16, True), ((6, 4), bf16, False)]
        real = [((4, 6, 5, 5), f32, False), ((4, 6, 5, 5), f16, True), ((64, 3), f32, False)]
        determinism = [((4, 6, 5, 5), "float32", False)]
    else:
        # Every path forced with the residual + ReLU epilogue, and bitwise repeats (gpu_check's
        # MID_SHAPES): first, at moderate sizes, so a kernel that crashes shows up early.
        forced = [((64, 96, 28, 28), f32, False), ((64, 96, 28, 28), bf16, True),
                  ((256, 2048, 7, 7), bf16, False), ((256, 2048, 7, 7), f32, True),
                  ((2048, 768), bf16, False)]
        # Default paths at real sizes: one case per path and regime, all three dtypes.
        real = [((256, 64, 112, 112), f32, False),   # split NCHW, 205M elements (int32 offsets)
                ((256, 64, 112, 112), bf16, True),   # split rows, 3.2M rows
                ((256, 1024, 14, 14), bf16, False),  # looped forward, L = 196
                ((256, 2048, 7, 7), f32, False),     # resident, spills
                ((256, 2048, 7, 7), f16, True),      # float16, rows
                ((32, 64, 56, 56), bf16, False),     # small
                ((8192, 4096), f32, False)]          # 2D
        determinism = [((256, 256, 56, 56), "bfloat16", True),
                       ((256, 64, 112, 112), "float32", False)]
    name = lambda s, d, cl: f"{'x'.join(map(str, s))} {str(d).replace('torch.', '')} " \
                            f"{'CL' if cl else 'NCHW'}"
    items = [(f"forced paths {name(s, d, cl)}", 6, lambda s=s, d=d, cl=cl:
              gc.check_forced_paths(s, d, cl)) for s, d, cl in forced]
    items += [("running statistics", 3, gc.check_running_stats),
              ("non-finite input", 5, gc.check_non_finite_input)]
    if not SMOKE:
        items.append(("CUDA graph capture and replay", 5, gc.check_cuda_graph))
    for s, d, cl in real:
        def default(s=s, d=d, cl=cl):
            gc.check_default_paths(s, d, cl)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        items.append((f"default paths {name(s, d, cl)}", 8, default))
    for s, d, cl in determinism:
        items.append((f"bitwise repeat {name(s, d, cl)}", 4, lambda s=s, d=d, cl=cl: gc.report(
            f"bitwise repeat, default path {name(s, d, cl)}", _determinism(s, d, cl),
            "forward and backward twice")))
    items.append(("BatchNorm2d with BATCHNORM_BACKEND=triton", 4, gc.check_module))
    if not SMOKE:
        items.append(("torch.compile(fullgraph=True) of batch_norm", 45, gc.check_compile))
    status = 0
    for item, need, fn in items:
        if left() < need:
            CHECK_LOG.append((item, "skipped (time)", 0.0, f"{left():.0f}s left, needs ~{need}s"))
            say(f"SKIP  {item}: out of time")
            continue
        say(f"--- {item}")
        t = time.time()
        try:
            fn()
            CHECK_LOG.append((item, "done", time.time() - t, ""))
        except Exception as error:
            detail = f"{type(error).__name__}: {str(error)[:300]}".replace("\n", " ")
            CHECK_LOG.append((item, "crashed", time.time() - t, detail))
            gc.report(item, False, detail)
            traceback.print_exc()
            if poisoned(error):
                say("the CUDA context is unusable: the check stage stops here")
                status = 3
                break
        _check_md(gc, t0)
    _check_md(gc, t0)
    try:
        merge_kernel_rows(kernel_rows())
    except Exception as error:
        say(f"kernel table: {type(error).__name__}: {error}")
    failed = sum(not ok for _, ok, _ in gc.RESULTS)
    say(f"check: {len(gc.RESULTS) - failed}/{len(gc.RESULTS)} passed in {time.time() - t0:.0f} s")
    return status or (1 if failed else 0)


# --- bench ---------------------------------------------------------------------------------------

def host_us(fn, calls: int = 10) -> float:
    """CPU microseconds to enqueue one call (no synchronization in between)."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t) / calls * 1e6
    sync()
    return us


def graph_ms(fn, timer) -> float:
    """Median ms of one CUDA-graph replay of ``fn`` (the kernels without the host's launches)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay)


def plan_text(case) -> str:
    """The path, grid, tile and warps ours takes forward and backward for this case."""
    from batchnorm.kernels import triton_plan

    x = case["x"]
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    view = triton_plan.view_of(x3)
    out = []
    for what, streams in (("fwd", 1), ("bwd", 2)):
        p = triton_plan.plan(view, x3.element_size(), streams, x3.device, triton_plan.DEFAULT)
        grid = f"{p.blocks}x{p.programs}" if p.path == "split" else f"{p.programs}"
        out.append(f"{what} {p.path} grid {grid} tile {'x'.join(map(str, p.tile))} w{p.warps}")
    return "; ".join(out)


def stage_bench() -> int:
    import gpu as gb
    import torch

    from batchnorm.kernels import triton_backend as bt

    gb.DEVICE = DEVICE
    timer = gb.Timer(TARGET_MS)
    copy = gb.copy_bandwidth(timer)
    say(f"copy bandwidth {copy:.0f} GB/s")
    t0 = time.time()
    rows: list[dict] = []
    if SMOKE:
        cases = SMOKE_CASES
    else:
        every = [(s, d, lay) for s in gb.SHAPES for d in gb.DTYPES
                 for lay in (("nchw", "channels_last") if len(s) == 4 else ("nchw",))]
        cases = PRIORITY + [c for c in every if c not in PRIORITY]
    made: dict = {}

    def get(c):
        if c not in made:
            made.clear()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            made[c] = gb.make(c[0], gb.DTYPES[c[1]], c[2])
        return made[c]

    def add(c, part, mode, impl, ms, host=None, note=""):
        case = get(c)
        nbytes = case["x"].numel() * case["x"].element_size()
        passes = 8 if mode.startswith(("fused", "graph_train_bwd")) else gb.PASSES.get(mode, 8)
        r = gb.row(c[0], c[1], c[2], mode, impl, ms, passes * nbytes, copy)
        r.update(part=part, host_us=None if host is None else round(host, 1), note=note)
        rows.append(r)

    def save():
        write_csv("bench.csv", rows)
        write("bench.md", bench_md(rows, copy, time.time() - t0))

    def timed(label, fn):
        try:
            return timer(fn), None
        except Exception as error:
            say(f"ERROR {label}: {type(error).__name__}: {str(error)[:300]}")
            if poisoned(error):
                raise
            return None, f"{type(error).__name__}"

    # A: ours and eager, three modes, every case (host enqueue time for the train+backward call).
    try:
        for c in cases:
            if left() < 25:
                say(f"A: out of time at {gb.label(*c)}")
                break
            case = get(c)
            for mode in gb.PASSES:
                for impl in ("ours", "eager"):
                    fn = gb.runner(impl, mode, case)
                    ms, err = timed(f"{gb.label(*c)} {mode} {impl}", fn)
                    host = host_us(fn) if ms is not None and mode == "train_bwd" else None
                    if ms is not None:
                        add(c, "A", mode, impl, ms, host,
                            plan_text(case) if impl == "ours" and mode == "train_bwd" else "")
            got = {(r["mode"], r["impl"]): r for r in rows if r["case"] == gb.label(*c)}
            o, e = got.get(("train_bwd", "ours")), got.get(("train_bwd", "eager"))
            if o and e:
                say(f"A {gb.label(*c):38s} train_bwd ours {o['ms']:.3f} ms ({o['pct_copy']:.0f}%"
                    f" of 8S), eager {e['ms']:.3f} ms, eager/ours {e['ms'] / o['ms']:.2f}x, "
                    f"host ours {o['host_us']:.0f} us, eager {e['host_us']:.0f} us")
            save()
        # C: fused epilogues against torch eager's separate (in-place) ops.
        for c in cases[:6]:
            if left() < 20:
                break
            for fused in ("relu", "add_relu"):
                for impl in ("ours", "eager"):
                    ms, _ = timed(f"{gb.label(*c)} fused_{fused} {impl}",
                                  gb.runner(impl, "train_bwd", get(c), fused))
                    if ms is not None:
                        add(c, "C", f"fused_{fused}", impl, ms)
            save()
        # D: targeted sweep (ours, train+backward) on the hypotheses of the review.
        sweep = [] if SMOKE else [
            (((256, 64, 112, 112), "float32", "nchw"),
             [bt.Config(programs_per_sm=p) for p in (3, 8, 16)]),   # partial second wave
            (((256, 2048, 7, 7), "bfloat16", "nchw"),
             [bt.Config(path="looped"), bt.Config(path="split")]),  # resident spills
            (((256, 2048, 7, 7), "float32", "nchw"),
             [bt.Config(path="looped"), bt.Config(path="split")]),
            (((256, 1024, 14, 14), "bfloat16", "nchw"),
             [bt.Config(path="split"), bt.Config(programs_per_sm=1)]),  # looped at 1 CTA/SM
            (((256, 256, 56, 56), "bfloat16", "channels_last"),
             [bt.Config(row_bytes=128), bt.Config(tile_bytes=8192), bt.Config(programs_per_sm=8)]),
        ]
        if SMOKE:
            sweep = [(SMOKE_CASES[0], [bt.Config(path="split"), bt.Config(programs_per_sm=8)])]
        from batchnorm.kernels import triton_plan

        default = triton_plan.DEFAULT
        for c, configs in sweep:
            for config in configs:
                if left() < 15:
                    break
                triton_plan.DEFAULT = config
                try:
                    ms, _ = timed(f"{gb.label(*c)} {config}",
                                  gb.runner("ours", "train_bwd", get(c)))
                finally:
                    triton_plan.DEFAULT = default
                if ms is not None:
                    knobs = {k: v for k, v in vars(config).items() if v != getattr(default, k)}
                    add(c, "D", "train_bwd", "ours " + " ".join(f"{k}={v}" for k, v in
                                                             knobs.items()), ms)
                    say(f"D {gb.label(*c):38s} {knobs} {ms:.3f} ms")
            save()
        # E: kernel time without the host (CUDA-graph replay) where the host may dominate.
        small = [c for c in cases if c[0][0] == 32 or c[0][1] == 2048 or SMOKE][:4]
        for c in small if DEVICE == "cuda" else []:
            if left() < 20:
                break
            for impl in ("ours", "eager"):
                try:
                    ms = graph_ms(gb.runner(impl, "train_bwd", get(c)), timer)
                    add(c, "E", "graph_train_bwd", impl, ms)
                    say(f"E {gb.label(*c):38s} graph replay train_bwd {impl} {ms:.3f} ms")
                except Exception as error:
                    say(f"E {gb.label(*c)} {impl}: graph failed: {type(error).__name__}: {error}")
                    if poisoned(error):
                        raise
            save()
        # B: torch.compile (fresh for every case, fullgraph, static shapes), train+backward.
        for c in cases[: (1 if SMOKE else 8)]:
            if left() < 40:
                say("B: no time left for another torch.compile")
                break
            t = time.time()
            ms, _ = timed(f"{gb.label(*c)} compile", gb.runner("compile", "train_bwd", get(c)))
            if ms is not None:
                add(c, "B", "train_bwd", "compile", ms, note=f"compiled+timed in "
                                                             f"{time.time() - t:.0f} s")
                say(f"B {gb.label(*c):38s} compile train_bwd {ms:.3f} ms "
                    f"({time.time() - t:.0f} s with compiling)")
            save()
    except Exception as error:
        say(f"bench stopped: {type(error).__name__}: {error}")
        traceback.print_exc()
        save()
        return 3
    finally:
        try:
            merge_kernel_rows(kernel_rows())
        except Exception as error:
            say(f"kernel table: {type(error).__name__}: {error}")
    save()
    return 0


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def bench_md(rows: list[dict], copy: float, seconds: float) -> str:
    import torch
    import triton

    got = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    names = list(dict.fromkeys(r["case"] for r in rows))
    lines = [f"# Batch norm on {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}",
             "", f"torch {torch.__version__}, triton {triton.__version__}, copy {copy:.0f} GB/s, "
             f"{seconds:.0f} s. ms: median CUDA-event time per call, L2 flushed before each; "
             "% = minimal traffic (eval 2S, train 3S, train_bwd/fused 8S) over time, as a share "
             "of copy bandwidth; x = other's time over ours (above 1: ours faster); host us: CPU "
             "time to enqueue one call; graph ms: CUDA-graph replay (no host launches)."]
    for mode in ("eval", "train", "train_bwd"):
        cases = [n for n in names if (n, mode, "ours") in got]
        if not cases:
            continue
        bwd = mode == "train_bwd"
        lines += ["", f"## {mode}", "",
                  "| case | ours ms | eager ms | " + ("compile ms | " if bwd else "")
                  + "ours % | eager % | eager/ours | " + ("compile/ours | host us ours/eager |"
                                                         " graph ms ours/eager | plan |" if bwd
                                                         else ""),
                  "|---" * (12 if bwd else 6) + "|"]
        for n in cases:
            o, e, c = (got.get((n, mode, i)) for i in ("ours", "eager", "compile"))
            cell = lambda r, k="ms", f="{:.3f}": f.format(r[k]) if r else "-"
            ratio = lambda r, o=o: f"{r['ms'] / o['ms']:.2f}x" if r else "-"
            line = f"| {n} | {cell(o)} | {cell(e)} | "
            if bwd:
                line += f"{cell(c)} | "
            line += f"{cell(o, 'pct_copy', '{:.0f}%')} | {cell(e, 'pct_copy', '{:.0f}%')} | " \
                    f"{ratio(e)} | "
            if bwd:
                go, ge = got.get((n, "graph_train_bwd", "ours")), got.get(
                    (n, "graph_train_bwd", "eager"))
                line += (f"{ratio(c)} | {cell(o, 'host_us', '{:.0f}')}/"
                         f"{cell(e, 'host_us', '{:.0f}')} | {cell(go)}/{cell(ge)} | "
                         f"{o.get('note', '')} |")
            lines.append(line)
    bwd = [n for n in names if (n, "train_bwd", "ours") in got]
    if bwd:
        r_e = [got[n, "train_bwd", "eager"]["ms"] / got[n, "train_bwd", "ours"]["ms"]
               for n in bwd if (n, "train_bwd", "eager") in got]
        r_c = [got[n, "train_bwd", "compile"]["ms"] / got[n, "train_bwd", "ours"]["ms"]
               for n in bwd if (n, "train_bwd", "compile") in got]
        speed = {n: got[n, "train_bwd", "eager"]["ms"] / got[n, "train_bwd", "ours"]["ms"]
                 for n in bwd if (n, "train_bwd", "eager") in got}
        lose = [f"{n} ({v:.2f}x)" for n, v in speed.items() if v < 1]
        lines += ["", "## summary (train_bwd)", "",
                  f"- geomean eager/ours over {len(r_e)} cases: {_geomean(r_e):.2f}x "
                  "(target 2.0x)",
                  f"- geomean compile/ours over {len(r_c)} cases: {_geomean(r_c):.2f}x "
                  "(target 1.3x; priority subset only)",
                  f"- cases where eager is faster: {', '.join(lose) if lose else 'none'}"]
    for part, title in (("C", "fused epilogues (train_bwd, ours vs eager separate ops)"),
                        ("D", "config sweep (ours, train_bwd)")):
        sel = [r for r in rows if r.get("part") == part]
        if sel:
            lines += ["", f"## {title}", "", "| case | mode | impl | ms | % of 8S |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['case']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | "
                      f"{r['pct_copy']:.0f}% |" for r in sel]
    return "\n".join(lines) + "\n"


# --- resnet --------------------------------------------------------------------------------------

def stage_resnet() -> int:
    """ResNet-50 training steps, torch's batch norm against ours after ``batchnorm.convert``.

    The timed comparison uses benchmarks/gpu_resnet.py's own definition of the network
    (out-of-place ReLU and add) for both implementations; last, if time is left, a one-step
    probe of torchvision's resnet50 after ``convert`` (its ``ReLU(inplace=True)`` and
    ``out += identity`` modify our output in place, which autograd forbids while that output is
    a view of the kernels' (N, C, L) buffer: _ops.from_ncl).
    """
    import copy as copylib

    import gpu_resnet as gr
    import torch

    import batchnorm

    batch, side, steps = (128, 224, 10) if DEVICE == "cuda" else (2, 32, 2)
    result, notes, lines = {}, [], []

    def save():
        lines[:] = ["# ResNet-50 training, bf16 autocast, channels_last, batch "
                    f"{batch}, SGD (gpu_resnet.py's definition)", "",
                    "| impl | images/s | BN share of CUDA time | "
                    f"losses of the first {steps} steps |", "|---|---|---|---|"]
        for impl, (losses, ips, share) in result.items():
            lines.append(f"| {impl} | {ips:.0f} | {share:.3f} | "
                         f"{' '.join(f'{v:.4f}' for v in losses.tolist())} |")
        if len(result) == 2:
            a, b = result["torch"][0], result["ours"][0]
            lines.append(f"\nlargest relative loss difference over {steps} steps: "
                         f"{((b - a).abs() / a.abs()).max().item():.2e}")
        lines.extend(f"\nnote: {n}" for n in notes)
        write("resnet.md", "\n".join(lines) + "\n")

    def batches(n, count, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        return [(torch.randn(n, 3, side, side, device=DEVICE, generator=g)
                 .contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 1000, (n,), device=DEVICE, generator=g)) for _ in range(count)]

    torch.backends.cudnn.benchmark = True
    saved = sys.modules.get("torchvision")
    sys.modules["torchvision"] = None  # gpu_resnet.resnet50() then builds its own definition
    try:
        torch.manual_seed(0)
        base = gr.resnet50().to(DEVICE).to(memory_format=torch.channels_last)
    finally:
        if saved is None:
            sys.modules.pop("torchvision", None)
        else:
            sys.modules["torchvision"] = saved
    data = batches(batch, 4, 1)
    for impl in ("torch", "ours"):
        if left() < 25:
            say(f"resnet: no time for {impl}")
            break
        model = copylib.deepcopy(base)
        if impl == "ours":
            model = batchnorm.convert(model)
        t = time.time()
        losses = gr.train(model, data, steps, True, DEVICE).cpu()  # warm-up: cuDNN, Triton
        sync()
        say(f"resnet {impl}: {steps} warm-up steps in {time.time() - t:.1f} s")
        t = time.perf_counter()
        gr.train(model, data, steps, True, DEVICE)
        sync()
        ips = batch * steps / (time.perf_counter() - t)
        share = gr.bn_share(model, data, True, DEVICE) if left() > 15 else float("nan")
        result[impl] = (losses, ips, share)
        say(f"resnet {impl}: {ips:.0f} images/s, BN {share:.1%} of CUDA time")
        save()
        del model
    if left() < 15:
        notes.append("torchvision probe skipped: out of time")
        save()
        return 0
    try:  # compatibility probe: torchvision's network, converted, one training step
        try:  # beside a CPU-only torch, torchvision imports only after its op schemas exist
            import vision_models

            torchvision = vision_models.torchvision()
        except ImportError:  # no pytest here: the GPU machine's torchvision has its ops
            import torchvision

        net = batchnorm.convert(torchvision.models.resnet50()).to(DEVICE).to(
            memory_format=torch.channels_last)
        gr.train(net, batches(8 if DEVICE == "cuda" else 2, 1, 2), 1, True, DEVICE)
        sync()
        notes.append("torchvision resnet50 after batchnorm.convert: one training step OK")
    except ImportError:
        notes.append("torchvision not installed: no probe of its in-place ReLU and add")
    except Exception as error:
        notes.append("torchvision resnet50 after batchnorm.convert FAILS on its first training "
                     f"step: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    say("resnet probe: " + notes[-1])
    save()
    return 0


# --- summary -------------------------------------------------------------------------------------

def stage_summary() -> int:
    """The short version, printed last (the reply shows the end of the output)."""
    print("=" * 100)
    for name in ("env.txt", "check.md", "bench.md", "resnet.md"):
        path = OUT / name
        if not path.exists():
            print(f"{name}: missing")
            continue
        text = path.read_text().splitlines()
        if name == "check.md":
            fails = [t for t in text if "| FAIL |" in t or "| crashed |" in t
                     or "| skipped" in t]
            print("\n".join(text[:3] + fails[:25]))
        elif name == "bench.md":
            keep, on = [], False
            for t in text:
                on = on or t.startswith("## train_bwd")
                if t.startswith("## ") and not t.startswith(("## train_bwd", "## summary",
                                                              "## config", "## fused")):
                    on = False
                if on:
                    keep.append(t)
            print("\n".join(keep[:60]))
        else:
            print("\n".join(text[:12]))
    return 0


STAGES = {"env": stage_env, "check": stage_check, "bench": stage_bench, "resnet": stage_resnet,
          "summary": stage_summary}

if __name__ == "__main__":
    stage = sys.argv[1]
    try:
        code = STAGES[stage]()
    except KeyboardInterrupt:  # timeout -s INT: the files were written after every item
        say(f"{stage}: interrupted at its time limit")
        code = 124
    sys.exit(code)
