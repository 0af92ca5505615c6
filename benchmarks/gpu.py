"""GPU benchmark: the Triton backend against torch eager and torch.compile (issue 3's suite).

Parts (``--parts``, default ``table,fused,resnet``; ``sweep`` on request):

* ``table``: for each shape of ``SHAPES`` in float32 and bfloat16 (weights and running
  statistics in the input's dtype, as after ``model.to(dtype)``), NCHW and channels_last (2D:
  one layout): eval forward, training forward (running statistics updated) and training
  forward+backward (gradients of x, weight and bias) for ours
  (``batchnorm.functional.batch_norm(..., backend="triton")``), torch eager (``F.batch_norm``)
  and ``torch.compile(F.batch_norm)``, compiled fresh for every case and mode
  (``torch._dynamo.reset()``, ``fullgraph=True``: no silent fallback to eager).
* ``fused``: BN+ReLU and BN+add+ReLU (``activation="relu"``, ``residual=``), training
  forward+backward, against torch eager's separate ops (in place, as ResNet writes them).
* ``resnet``: ResNet-50 training steps (torchvision's, or a local definition of the same
  network without torchvision), batch 128, synthetic data, SGD, after ``batchnorm.convert`` vs
  torch's batch norm, in bfloat16 channels_last (autocast) and float32 NCHW: images/s, the
  losses of the first 20 steps from the same weights and data, CUDA time in batch norm.
* ``sweep``: ours with every path and tile size forced, to tune ``batchnorm.kernels.triton_plan``.

Times are medians of CUDA-event timings, L2 flushed (a 256 MB write) before every run, after
a warm-up call. Bandwidth counts the minimal traffic for an input of ``S`` bytes: eval 2S,
training forward 3S, forward+backward 8S (3S + 5S), and is given as a percentage of the
measured device-to-device copy bandwidth (read + write). Results go to ``--out`` as
``gpu_<gpu>_<parts>.md`` and ``.csv``, rewritten atomically after every case. No new case
starts after ``--budget`` seconds, and torch.compile is skipped in the last ``--reserve``
seconds before it (the table marks what was skipped), so one call stays under 10 minutes.
For the whole suite, run from the repository root in three calls::

    PYTHONPATH=. python benchmarks/gpu.py --out "$OUT" --parts table
    PYTHONPATH=. python benchmarks/gpu.py --out "$OUT" --parts fused,resnet
    PYTHONPATH=. python benchmarks/gpu.py --out "$OUT" --parts sweep
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from a checkout, next to gpu_resnet.py

import gpu_resnet  # noqa: E402

from batchnorm.functional import batch_norm  # noqa: E402
from batchnorm.kernels import triton_backend as bt  # noqa: E402
from batchnorm.kernels import triton_plan as tp  # noqa: E402

SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14),
          (256, 2048, 7, 7), (32, 64, 56, 56), (8192, 4096)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = {"eval": 2, "train": 3, "train_bwd": 8}  # minimal traffic in units of S
IMPLS = ("ours", "eager", "compile")
TARGETS = {"geomean_eager": 2.0, "geomean_compile": 1.3, "min_vs_best": 0.95,
           "copy_fraction": 0.85, "large_bytes": 64e6, "fused": 1.3}
START = time.time()
DEVICE = "cuda"  # "cpu" with --smoke: tiny sizes through the interpreter, to check the script
SMOKE_SHAPES = [(4, 6, 5, 5), (64, 3)]


class Timer:
    """Median milliseconds of a callable over CUDA events, with L2 flushed before each run."""

    def __init__(self, target_ms: float):
        self.target_ms = target_ms
        self.flush = torch.empty(256 << 20 if DEVICE == "cuda" else 1, dtype=torch.int8,
                                 device=DEVICE)

    def __call__(self, fn) -> float:
        fn()  # warm-up: Triton and inductor compile here
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        seconds = time.perf_counter() - t0
        if DEVICE != "cuda":
            return 1e3 * seconds
        reps = max(5, min(50, int(self.target_ms / 1e3 / max(seconds, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in events)[reps // 2]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of a device-to-device copy of 1 GiB, counting read + write."""
    src = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 20, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timer(lambda: dst.copy_(src)) / 1e6


def make(shape, dtype, layout, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(shape, device=DEVICE, generator=g).mul_(2).add_(1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    return {"x": x, "dy": torch.randn_like(x), "res": torch.randn_like(x),
            "w": (torch.rand(c, device=DEVICE, generator=g) + 0.5).to(dtype),
            "b": torch.randn(c, device=DEVICE, generator=g).to(dtype)}


def runner(impl: str, mode: str, case: dict, fused: str | None = None):
    """A zero-argument call of one implementation in one mode (its own running statistics)."""
    x, w, b, res = case["x"], case["w"], case["b"], case["res"]
    rm, rv = torch.zeros_like(w), torch.ones_like(w)
    if impl == "ours":
        def bn(x, rm, rv, w, b, training, res=None):
            return batch_norm(x, rm, rv, w, b, training, backend="triton",
                              activation="relu" if fused else None, residual=res)
    else:
        def bn(x, rm, rv, w, b, training, res=None):
            y = F.batch_norm(x, rm, rv, w, b, training)
            if fused == "add_relu":
                y += res
            return F.relu_(y) if fused else y
        if impl == "compile":
            torch._dynamo.reset()  # fresh: no recompile limit, no fallback to eager
            bn = torch.compile(bn, fullgraph=True, dynamic=False)
    residual = res if fused == "add_relu" else None
    if mode != "train_bwd":
        def run():
            with torch.no_grad():
                return bn(x, rm, rv, w, b, mode == "train", residual)
        return run
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())

    def run_bwd():
        y = bn(leaves[0], rm, rv, leaves[1], leaves[2], True, *leaves[3:])
        return torch.autograd.grad(y, leaves, case["dy"])
    return run_bwd


def label(shape, dtype, layout):
    return f"{'x'.join(map(str, shape))} {dtype} {'' if len(shape) == 2 else layout}".strip()


def cases():
    for shape in SHAPES if DEVICE == "cuda" else SMOKE_SHAPES:
        for dtype in DTYPES:
            for layout in (("nchw", "channels_last") if len(shape) == 4 else ("nchw",)):
                yield shape, dtype, layout


def table_part(args, timer, copy_gbs, rows, save):
    for shape, dtype, layout in cases():
        if time.time() - START > args.budget:
            print(f"time budget spent: {label(shape, dtype, layout)} and later cases skipped")
            break
        case = make(shape, DTYPES[dtype], layout)
        nbytes = case["x"].numel() * case["x"].element_size()
        for mode, passes in PASSES.items() if "table" in args.parts else ():
            for impl in IMPLS:
                if impl == "compile" and (args.no_compile
                                          or time.time() - START > args.budget - args.reserve):
                    continue  # out of compile time: the cell stays empty, the table says so
                ms = timer(runner(impl, mode, case))
                rows.append(row(shape, dtype, layout, mode, impl, ms, passes * nbytes, copy_gbs))
        for fused in (["relu", "add_relu"] if "fused" in args.parts else []):
            for impl in ("ours", "eager"):
                ms = timer(runner(impl, "train_bwd", case, fused))
                rows.append(row(shape, dtype, layout, f"fused_{fused}", impl, ms, 8 * nbytes,
                                copy_gbs))
        del case
        torch.cuda.empty_cache()
        done = {f"{r['mode']}/{r['impl']}": r["ms"] for r in rows
                if r["case"] == label(shape, dtype, layout) and r["mode"] == "train_bwd"}
        print(f"{time.time() - START:6.0f} s  {label(shape, dtype, layout)}  ms: {done}",
              flush=True)
        save()


def row(shape, dtype, layout, mode, impl, ms, nbytes, copy_gbs):
    gbs = nbytes / ms / 1e6
    return {"case": label(shape, dtype, layout), "shape": "x".join(map(str, shape)),
            "dtype": dtype, "layout": layout, "mode": mode, "impl": impl, "ms": round(ms, 4),
            "model_bytes": int(nbytes), "gbs": round(gbs, 1),
            "pct_copy": round(100 * gbs / copy_gbs, 1)}


def table_lines(rows) -> list[str]:
    got = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    lines = []
    for mode in list(PASSES) + ["fused_relu", "fused_add_relu"]:
        names = [c for c in dict.fromkeys(r["case"] for r in rows) if (c, mode, "ours") in got]
        if not names:
            continue
        impls = ("ours", "eager") if mode.startswith("fused") else IMPLS
        lines += ["", f"### {mode}", "", "| case | " + " | ".join(f"{i} ms" for i in impls)
                  + " | ours GB/s | " + " | ".join(f"{i} % copy" for i in impls)
                  + " | " + " | ".join(f"vs {i}" for i in impls[1:]) + " |",
                  "|---" * (1 + 3 * len(impls)) + "|"]
        for name in names:
            cells = [got.get((name, mode, i)) for i in impls]
            ms = [f"{c['ms']:.3f}" if c else "-" for c in cells]
            pct = [f"{c['pct_copy']:.0f}%" if c else "-" for c in cells]
            ratio = [f"{c['ms'] / cells[0]['ms']:.2f}x" if c else "-" for c in cells[1:]]
            lines.append(f"| {name} | {' | '.join(ms)} | {cells[0]['gbs']:.0f} | "
                         f"{' | '.join(pct)} | {' | '.join(ratio)} |")
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def _geomean(ratios: list[float]) -> float:
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")


def target_lines(rows) -> list[str]:
    """The issue's targets, from the forward+backward and fused rows present."""
    got = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    cases_of = {m: [c for c in dict.fromkeys(r["case"] for r in rows) if (c, m, "ours") in got]
                for m in ("train_bwd", "fused_relu", "fused_add_relu")}
    lines = ["", "## Targets (training forward+backward)", ""]
    names = cases_of["train_bwd"]
    if names:
        ours = {n: got[n, "train_bwd", "ours"] for n in names}
        ratio = {i: [got[n, "train_bwd", i]["ms"] / ours[n]["ms"] for n in names
                     if (n, "train_bwd", i) in got] for i in ("eager", "compile")}
        best = {n: min(got[n, "train_bwd", i]["ms"] for i in ("eager", "compile")
                       if (n, "train_bwd", i) in got) / ours[n]["ms"] for n in names}
        worst = min(best, key=best.get)
        large = [n for n in names if ours[n]["model_bytes"] / 8 >= TARGETS["large_bytes"]]
        low = [f"{n} ({ours[n]['pct_copy']:.0f}%)" for n in large
               if ours[n]["pct_copy"] < 100 * TARGETS["copy_fraction"]]
        g_e, g_c = _geomean(ratio["eager"]), _geomean(ratio["compile"])
        lines += [
            f"- geometric-mean speedup over torch eager: {g_e:.2f}x (>= "
            f"{TARGETS['geomean_eager']}x: {_verdict(g_e >= TARGETS['geomean_eager'])})",
            f"- geometric-mean speedup over torch.compile: {g_c:.2f}x (>= "
            f"{TARGETS['geomean_compile']}x: {_verdict(g_c >= TARGETS['geomean_compile'])}; "
            f"{len(ratio['compile'])}/{len(names)} cases compiled)",
            f"- slowest case against the faster of eager and compile: {best[worst]:.2f}x on "
            f"{worst} (>= {TARGETS['min_vs_best']}x: "
            f"{_verdict(best[worst] >= TARGETS['min_vs_best'])})",
            f"- cases with S >= {TARGETS['large_bytes'] / 1e6:.0f} MB at >= "
            f"{100 * TARGETS['copy_fraction']:.0f}% of copy bandwidth (8S): "
            f"{len(large) - len(low)}/{len(large)} ({_verdict(not low)}"
            f"{'; below: ' + ', '.join(low) if low else ''})"]
    for mode in ("fused_relu", "fused_add_relu"):
        ratios = [got[n, mode, "eager"]["ms"] / got[n, mode, "ours"]["ms"]
                  for n in cases_of[mode]]
        if ratios:
            lines.append(f"- {mode} over eager separate ops: min {min(ratios):.2f}x, geomean "
                         f"{_geomean(ratios):.2f}x (>= {TARGETS['fused']}x everywhere: "
                         f"{_verdict(min(ratios) >= TARGETS['fused'])})")
    return lines


def sweep_part(args, timer, copy_gbs, rows, save):
    configs = [tp.Config(path="resident")] + [
        tp.Config(path=p, tile_bytes=t) for p in ("looped", "split") for t in (8192, 16384, 32768)]
    default = tp.DEFAULT
    for shape, dtype, layout in cases():
        case = make(shape, DTYPES[dtype], layout)
        nbytes = case["x"].numel() * case["x"].element_size()
        for config in [None] + configs:
            name = "auto" if config is None else f"{config.path}/{config.tile_bytes}"
            tp.DEFAULT = config or default
            try:
                for mode in ("train", "train_bwd"):
                    ms = timer(runner("ours", mode, case))
                    rows.append(row(shape, dtype, layout, mode, name, ms, PASSES[mode] * nbytes,
                                    copy_gbs))
            except ValueError:
                pass  # the resident path does not fit this shape
            finally:
                tp.DEFAULT = default
        print(f"{time.time() - START:6.0f} s  sweep {label(shape, dtype, layout)}", flush=True)
        save()


def sweep_lines(rows) -> list[str]:
    names = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["", "| case | mode | " + " | ".join(f"{n} ms" for n in names) + " | best |",
             "|---" * (len(names) + 3) + "|"]
    got = {(r["case"], r["mode"], r["impl"]): r["ms"] for r in rows}
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        ms = {n: got.get((case, mode, n)) for n in names}
        best = min((v, n) for n, v in ms.items() if v is not None)[1]
        lines.append(f"| {case} | {mode} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in ms.values())
                     + f" | {best} |")
    return lines


def write(out: Path, stem: str, lines: list[str], rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, writer in ((".md", lambda f: f.write("\n".join(lines) + "\n")),
                           (".csv", lambda f: _csv(f, rows))):
        tmp = out / f"{stem}{suffix}.tmp"
        with open(tmp, "w", newline="") as f:
            writer(f)
        tmp.replace(out / f"{stem}{suffix}")  # atomic: never a half-written file


def _csv(f, rows):
    if rows:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def header(part: str, copy_gbs: float, args) -> list[str]:
    import triton

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (--smoke)"
    return [f"# Batch norm on {name}: {part}", "",
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; measured copy bandwidth "
            f"{copy_gbs:.0f} GB/s; {time.strftime('%Y-%m-%d %H:%M')}; "
            f"backend config {tp.DEFAULT}; arguments {vars(args)}.", "",
            "ms: median CUDA time per call, L2 flushed before each; % copy: achieved bandwidth "
            "over the minimal traffic (eval 2S, train 3S, train_bwd and fused 8S) as a share "
            "of the copy bandwidth; vs X: X's time over ours (above 1 = ours faster)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--parts", default="table,fused,resnet",
                        help="comma-separated: table, fused, resnet, sweep. "
                             "Default: table,fused,resnet")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--budget", type=float, default=540,  # under the 10-minute call limit
                        help="seconds after which no new case starts. Default: 540")
    parser.add_argument("--reserve", type=float, default=60,  # the last cases without compile
                        help="seconds before the budget ends in which torch.compile is skipped. "
                             "Default: 60")
    parser.add_argument("--target-ms", type=float, default=150,
                        help="timed milliseconds per figure. Default: 150")
    parser.add_argument("--resnet-batch", type=int, default=128, help="Default: 128")
    parser.add_argument("--resnet-steps", type=int, default=15, help="timed steps. Default: 15")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (with TRITON_INTERPRET=1): checks the script")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if not bt.available() or not (args.smoke or torch.cuda.is_available()):
        print("needs triton and a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 2
    timer = Timer(args.target_ms)
    copy_gbs = copy_bandwidth(timer)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu smoke"
    gpu = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    print(f"{gpu}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if "resnet" in args.parts:  # first: the table then gets whatever time is left
        res_rows: list[dict] = []
        gpu_resnet.run(args, DEVICE, res_rows, lambda: write(
            args.out, f"gpu_{gpu}_resnet50", header("ResNet-50 training", copy_gbs, args)
            + ["", "| " + " | ".join(res_rows[0]) + " |", "|---" * len(res_rows[0]) + "|"]
            + ["| " + " | ".join(map(str, r.values())) + " |" for r in res_rows], res_rows))
    suite = [p for p in ("table", "fused") if p in args.parts]
    if suite:
        rows: list[dict] = []
        stem = f"gpu_{gpu}_{'_'.join(suite)}"
        table_part(args, timer, copy_gbs, rows, lambda: write(
            args.out, stem, header(" and ".join(suite), copy_gbs, args) + table_lines(rows)
            + target_lines(rows), rows))
    if "sweep" in args.parts:
        sweep_rows: list[dict] = []
        sweep_part(args, timer, copy_gbs, sweep_rows, lambda: write(
            args.out, f"gpu_{gpu}_sweep", header("path and tile sweep (ours)", copy_gbs, args)
            + sweep_lines(sweep_rows), sweep_rows))
    print(f"done in {time.time() - START:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
