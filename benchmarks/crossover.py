"""CPU benchmark: from which size the numba kernels beat torch's own batch-norm op.

``auto`` takes torch's op (the ``native`` backend) below a size and numba's kernels above it
(``batchnorm.kernels.CROSSOVER``). This times both through ``batchnorm.BatchNorm2d`` with
``$BATCHNORM_BACKEND`` forcing each, in interleaved rounds: training forward + backward (the
gradients of input, weight and bias) and inference forward, float32, both memory layouts,
``N = 16`` and ``C`` of 64 and 256 with square ``H = W`` from 1 to 128 (1, 2, 4, 8, 12, 16,
24, ...; up to 16M elements),
and ``BatchNorm1d(1024)`` on ``(N, 1024)``, in ``--processes`` fresh processes (medians of
medians). The crossover of a mode and a layout class (channel dim outermost within a sample,
as NCHW; or innermost, as channels-last and ``(N, C)``) is the smallest size from which numba
was at least as fast in every case of that size and every larger one.

Run from the repository root (about two minutes per process on 2 cores)::

    python benchmarks/crossover.py               # writes benchmarks/results/crossover.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [(16, c, hw, hw) for c in (64, 256) for hw in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
         if c * hw * hw * 16 <= 1 << 24]
FLAT = [(n, 1024) for n in (16, 64, 256, 1024, 4096, 16384)]  # BatchNorm1d on (N, C)
LAYOUTS = ("nchw", "channels_last")
MODES = ("train", "eval")
BACKENDS = ("native", "numba")


def _case(shape, layout: str, mode: str, repeats: int) -> dict:
    import torch

    import batchnorm

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(mode == "train")
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    layer = (batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d)(shape[1])
    layer.train(mode == "train")

    def call():
        if mode == "train":
            return torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)
        with torch.no_grad():
            return layer(x)

    times = {b: [] for b in BACKENDS}
    for round_ in range(repeats + 2):  # two warm-up rounds: numba compiles or loads its cache
        for backend in BACKENDS:
            os.environ["BATCHNORM_BACKEND"] = backend
            start = time.perf_counter()
            call()
            if round_ >= 2:
                times[backend].append(time.perf_counter() - start)
    return {b: 1e6 * float(np.median(t)) for b, t in times.items()}


def measure(repeats: int) -> list[dict]:
    return [{"shape": shape, "layout": layout, "mode": mode,
             **_case(shape, layout, mode, repeats)}
            for mode in MODES
            for shape, layout in [(s, la) for s in CASES for la in LAYOUTS]
            + [(s, "channel-innermost (N, C)") for s in FLAT]]


def kind(row: dict) -> str:
    """The layout class of ``batchnorm.kernels.CROSSOVER``: where the channel dim lies."""
    return "contiguous" if row["layout"] == "nchw" else "channels_last"


def crossover(rows: list[dict], mode: str, layout: str) -> int | None:
    """The smallest numel from which numba wins every case of that size and above."""
    rows = [r for r in rows if r["mode"] == mode and kind(r) == layout]
    sizes = sorted({int(np.prod(r["shape"])) for r in rows})
    wins = {n: all(r["numba"] <= r["native"] for r in rows if int(np.prod(r["shape"])) == n)
            for n in sizes}
    for k, n in enumerate(sizes):
        if all(wins[m] for m in sizes[k:]):
            return n
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed rounds per case (median reported). Default: 15")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes (median over them). Default: 3")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/crossover.md",
                        help="markdown file to write. Default: benchmarks/results/crossover.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    import cpu as cpu_benchmark

    runs = []
    for k in range(args.processes):
        print(f"process {k + 1} of {args.processes}", file=sys.stderr)
        runs.append(cpu_benchmark.fresh("crossover", f"measure({args.repeats})"))
    rows = [dict(r, **{b: float(np.median([run[i][b] for run in runs])) for b in BACKENDS})
            for i, r in enumerate(runs[0])]
    lines = cpu_benchmark.header("CPU benchmark: numba's kernels against torch's own op, by size",
                                 "crossover.py", raw_args) + [
             f"- BatchNorm2d, float32; microseconds per call, the median of {args.repeats} "
             f"interleaved rounds in each of {args.processes} fresh processes, then the median "
             "over them; train = forward + backward (input, weight and bias gradients), "
             "eval = inference forward", "",
             "| mode | shape | elements | layout | native us | numba us | native / numba |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'x'.join(map(str, r['shape']))} | "
                     f"{int(np.prod(r['shape']))} | {r['layout']} | {r['native']:.1f} | "
                     f"{r['numba']:.1f} | {r['native'] / r['numba']:.2f}x |")
    lines.append("")
    for mode in MODES:
        for layout in ("contiguous", "channels_last"):
            n = crossover(rows, mode, layout)
            where = f"{mode}, {layout} (channels-last and (N, C) input)" \
                if layout == "channels_last" else f"{mode}, {layout}"
            lines.append(f"- {where}: numba wins from {n} elements on" if n is not None else
                         f"- {where}: numba does not win at every size up to the largest "
                         "measured")
    lines.append("")
    cpu_benchmark.write_report(lines, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    main()
