"""CPU benchmark: the two kernels for contiguous input, channel blocks against streamed rows.

The numba backend runs a contiguous ``(N, C, H, W)`` input either in channel blocks, each read
twice from the core's cache, or as ``N * C`` rows streamed in memory order; it takes blocks when
a block's slice of the input fits ``numba_backend.Config.slice_bytes``. This script times
forward + backward (module call, then the gradients of input, weight and bias) both ways on
ResNet-like shapes, and prints which way ``plan`` picks for each. As in ``benchmarks/cpu.py``,
torch.nn's forward + backward runs before every timed call, so each starts from the cache and
allocator state a call of the other implementation leaves.

Run from the repository root (about a minute on 2 cores)::

    python benchmarks/cpu_ncl.py            # writes benchmarks/results/cpu_ncl.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu as cpu_benchmark  # noqa: E402  (benchmarks/cpu.py)

import batchnorm  # noqa: E402
from batchnorm.kernels import numba_backend as cpu  # noqa: E402

SHAPES = [(64, 64, 56, 56), (16, 64, 112, 112), (64, 256, 28, 28), (256, 64, 28, 28),
          (64, 128, 20, 20), (64, 256, 14, 14), (128, 128, 14, 14), (256, 512, 7, 7)]
WAYS = {"blocks": 1 << 62, "streamed": 0}  # the Config.slice_bytes that forces each way


def time_shape(shape, repeats: int) -> dict:
    """Median forward + backward milliseconds of each way, torch.nn's run before each call."""
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    theirs, ours = torch.nn.BatchNorm2d(shape[1]), batchnorm.BatchNorm2d(shape[1])

    def forward_backward(module):
        y = module(x)
        return torch.autograd.grad(y, (x, module.weight, module.bias), dy)

    times = {way: [] for way in WAYS}
    saved = cpu.DEFAULT
    try:
        for round_ in range(repeats + 1):  # the first round warms up and is not counted
            for way, slice_bytes in WAYS.items():
                forward_backward(theirs)
                cpu.DEFAULT = saved.replace(slice_bytes=slice_bytes)
                start = time.perf_counter()
                forward_backward(ours)
                if round_:
                    times[way].append(time.perf_counter() - start)
    finally:
        cpu.DEFAULT = saved
    return {way: 1e3 * float(np.median(t)) for way, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed runs per figure (median reported). Default: 15")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_ncl.md"),
                        help="markdown file to write. Default: benchmarks/results/cpu_ncl.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    if not cpu.available():
        sys.exit("numba is not installed: pip install numba (the benchmark times its kernels)")
    os.environ["BATCHNORM_BACKEND"] = "numba"
    load_before = os.getloadavg()
    info = cpu_benchmark.machine()
    lines = [
        "# CPU benchmark: channel blocks against streamed rows, contiguous float32 input",
        "",
        f"- machine: {info['cpu']}, {info['cores']} CPUs ({platform.system()})",
        f"- versions: {cpu_benchmark.versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{' '.join(['python', 'benchmarks/cpu_ncl.py', *raw_args])}`",
        f"- load average before: {load_before[0]:.2f}",
        f"- forward + backward, median of {args.repeats} runs; slice = one channel block's "
        f"part of the input (`channel_block` channels x N x H x W x 4 bytes); blocks are taken "
        f"up to Config.slice_bytes = {cpu.DEFAULT.slice_bytes / 2**20:g} MiB",
        "",
        "| shape | slice MB | blocks ms | streamed ms | streamed / blocks | plan picks |",
        "|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        n, c, h, w = shape
        block = cpu.channel_block(c, h * w)
        x3 = torch.empty(n, c, h * w)
        ms = time_shape(shape, args.repeats)
        lines.append(
            f"| {'x'.join(map(str, shape))} | {block * n * h * w * 4 / 1e6:.2f} | "
            f"{ms['blocks']:.2f} | {ms['streamed']:.2f} | "
            f"{ms['streamed'] / ms['blocks']:.2f} | {cpu.plan(x3, cpu.NCL)[0]} |")
        print(lines[-1], file=sys.stderr)
    lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
