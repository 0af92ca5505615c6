"""CPU benchmark: Batch Renorm against plain BatchNorm, forward + backward, float32.

Batch Renorm is plain batch norm with the adjustment seam open (one statistics pass, its
corrections, then the normalization; the backward's two sums, then the input gradient), where
plain BatchNorm runs the fused kernels. This times ``batchnorm.BatchRenorm2d``/``1d`` and
``batchnorm.BatchNorm2d``/``1d`` on the rows of ``benchmarks/cpu.py``, forward + backward (the
gradients of input, weight and bias), in interleaved rounds within each of ``--processes``
fresh processes; figures are medians over the processes of the per-process medians. The
corrections are in effect (``r_max=3``, ``d_max=5``, past the paper's ramp), so nothing is
skipped. With ``--baseline DIR`` the processes alternate with processes that time another
checkout's Batch Renorm (``DIR/batchnorm``): the ``baseline`` column.

Run from the repository root (about 30 seconds per process on 2 cores)::

    python benchmarks/renorm.py                    # writes benchmarks/results/renorm.md
    python benchmarks/renorm.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2  # Batch Renorm's forward + backward at most this times plain BatchNorm's


def measure(rows: list, parts: list[str], repeats: int) -> dict:
    """``{row: {part: ms}}`` in this process, with whichever ``batchnorm`` it imports."""
    import torch

    import batchnorm

    results = {}
    for shape, memory_format, label in rows:
        x = torch.randn(shape)
        if memory_format == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn_like(x)  # in x's layout, as the next layer's gradient would be
        suffix = "2d" if len(shape) == 4 else "1d"
        layers = {"plain": getattr(batchnorm, "BatchNorm" + suffix)(shape[1]),
                  "renorm": getattr(batchnorm, "BatchRenorm" + suffix)(
                      shape[1], r_max=3.0, d_max=5.0)}
        runs = {part: (lambda m=layers[part], x=x, dy=dy: torch.autograd.grad(
            m(x), (x, m.weight, m.bias), dy)) for part in parts}
        for run in runs.values():
            run()  # warm-up: numba's compilation or cache load
        times = {part: [] for part in runs}
        for _ in range(repeats):
            for part, run in runs.items():
                start = time.perf_counter()
                run()
                times[part].append(time.perf_counter() - start)
        results[label] = {p: 1e3 * float(np.median(t)) for p, t in times.items()}
    return results


def _process(checkout: Path, parts: list[str], repeats: int) -> dict:
    import cpu as cpu_benchmark

    rows = [(shape, fmt, cpu_benchmark._label(shape, fmt)) for shape, fmt in cpu_benchmark.ROWS]
    code = (f"import sys, json; sys.path[:0] = [{str(checkout)!r}, "
            f"{str(ROOT / 'benchmarks')!r}]\nimport renorm\n"
            f"print(json.dumps(renorm.measure({rows!r}, {parts!r}, {repeats})))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11,
                        help="timed rounds per process (median reported). Default: 11")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes per checkout (median over them). Default: 5")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout whose Batch Renorm is timed too. Default: none")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/renorm.md",
                        help="markdown file to write. Default: benchmarks/results/renorm.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    import cpu as cpu_benchmark

    ours, baseline = [], []
    for k in range(args.processes):
        print(f"process {k + 1} of {args.processes}", file=sys.stderr)
        ours.append(_process(ROOT, ["plain", "renorm"], args.repeats))
        if args.baseline is not None:
            baseline.append(_process(args.baseline.resolve(), ["renorm"], args.repeats))
    columns = ["BatchNorm ms", "BatchRenorm ms", "renorm / plain"]
    columns += ["baseline renorm ms", "baseline / renorm"] if baseline else []
    lines = ["| row | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    ratios = []
    for row in ours[0]:
        plain, renorm = (float(np.median([p[row][k] for p in ours])) for k in ("plain", "renorm"))
        cells = [plain, renorm, renorm / plain]
        ratios.append(renorm / plain)
        if baseline:
            base = float(np.median([p[row]["renorm"] for p in baseline]))
            cells += [base, base / renorm]
        lines.append(f"| {row} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    worst = max(ratios)
    info = cpu_benchmark.machine()
    header = [
        "# CPU benchmark: Batch Renorm against plain BatchNorm, float32", "",
        f"- machine: {info['cpu']}, {info['cores']} CPUs",
        f"- versions: {cpu_benchmark.versions()}",
        f"- this checkout: {cpu_benchmark.checkout(ROOT)}"
        + (f"; baseline: {args.baseline} at {cpu_benchmark.checkout(args.baseline)}"
           if args.baseline else ""),
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{' '.join(['python', 'benchmarks/renorm.py', *raw_args])}`",
        f"- {args.processes} fresh processes per checkout, alternating; in each, the median of "
        f"{args.repeats} interleaved rounds after a warm-up; forward + backward (input, weight "
        "and bias gradients); Batch Renorm with r_max=3, d_max=5", ""]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    footer = ["", f"- renorm / plain: at most {worst:.2f}x, geometric mean {geomean:.2f}x "
              f"(target <= {TARGET_RATIO}x on every row: "
              f"{'met' if worst <= TARGET_RATIO else 'not met'})", ""]
    text = "\n".join(header + lines + footer)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
    main()
