"""CPU benchmark: whole models, torch.nn's batch norm against the same model after ``convert``.

A layer timed alone says little about a model: most batch-norm layers of real networks are
small or mid-sized, so the cost of each call decides. This times, for each workload of
``WORKLOADS``, one step of a model built with torch.nn's layers and of a deep copy of it after
``batchnorm.convert`` (default backend, ``auto``), taking turns within each round so that a
change in the machine's load touches both alike: a training step is forward, cross-entropy
loss, backward and an SGD update; an inference step is a forward under ``torch.no_grad``.

Each workload runs in ``--processes`` fresh processes, one after another; within a process a
time is the median of its rounds after warm-up, and the table gives the median over the
processes and the range of the per-process ratios. The last column is the share of torch.nn's
step that is batch norm, from ``torch.profiler``: the self CPU time of every op and autograd
node whose name says batch norm, over the step's wall time (a lower bound: allocations inside
batch norm's ops are counted as their own ops), so a whole-model ratio can be read against
it: a model whose batch norm is 10% of the step cannot get more than 1.11x faster from it.

Run from the repository root (about five minutes on 2 cores)::

    python benchmarks/models.py                  # writes benchmarks/results/models.md
    python benchmarks/models.py --only mlp-train --processes 1
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name: (model, input shape, train, channels_last, timed rounds)
WORKLOADS = {
    "mlp-train": ("mlp", (60, 784), True, False, 200),
    "mlp-eval": ("mlp", (10000, 784), False, False, 40),
    "resnet18-train": ("resnet18", (16, 3, 112, 112), True, False, 8),
    "resnet18-train-cl": ("resnet18", (16, 3, 112, 112), True, True, 8),
    "mobilenet_v3_small-train": ("mobilenet_v3_small", (32, 3, 96, 96), True, False, 10),
    "resnet50-eval-b1": ("resnet50", (1, 3, 224, 224), False, False, 12),
    "resnet50-eval-b16": ("resnet50", (16, 3, 224, 224), False, False, 4),
    "bn2d-tiny": ("bn2d", (2, 64, 4, 4), True, False, 2000),
}
DESCRIPTIONS = {
    "mlp-train": "the paper's MNIST MLP (784-100-100-100-10, sigmoid, BN1d(100)), train step, "
                 "batch 60",
    "mlp-eval": "same MLP, eval forward, batch 10,000",
    "resnet18-train": "torchvision resnet18 train step, batch 16, 112x112, NCHW",
    "resnet18-train-cl": "same, channels_last",
    "mobilenet_v3_small-train": "mobilenet_v3_small train step, batch 32, 96x96",
    "resnet50-eval-b1": "resnet50 eval forward, batch 1, 224x224",
    "resnet50-eval-b16": "resnet50 eval forward, batch 16",
    "bn2d-tiny": "one BatchNorm2d(64) forward+backward on (2, 64, 4, 4)",
}
BATCH_NORM_NAME = re.compile(r"batch_?norm", re.IGNORECASE)


def _model(name: str):
    import torch

    if name == "mlp":
        layers = []
        for width_in in (784, 100, 100):
            layers += [torch.nn.Linear(width_in, 100, bias=False), torch.nn.BatchNorm1d(100),
                       torch.nn.Sigmoid()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(100, 10))
    if name == "bn2d":
        return torch.nn.BatchNorm2d(64)
    sys.path.insert(0, str(ROOT / "tests"))
    import vision_models  # torchvision beside a CPU-only torch

    return getattr(vision_models.torchvision().models, name)(num_classes=10)


def _step(model, x, train: bool):
    """One step of ``model`` on ``x``: a function taking no arguments."""
    import torch

    if not train:
        model.eval()

        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    model.train()
    if x.dim() == 4 and x.shape[1] == 64:  # the lone layer: forward + backward, as a layer
        x.requires_grad_(True)
        dy = torch.randn_like(x)
        params = tuple(model.parameters())
        return lambda: torch.autograd.grad(model(x), (x, *params), dy)
    target = torch.randint(0, 10, (x.shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    return train_step


def _batch_norm_share(step, wall_s: float) -> float:
    """The fraction of one ``step`` that ops named like batch norm spend, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if BATCH_NORM_NAME.search(e.key))
    return min(1.0, self_us / 1e6 / wall_s)


def measure(workload: str) -> dict:
    """Times of one workload in this process: ``{"torch.nn": s, "batchnorm": s, "share": f}``."""
    import torch

    import batchnorm

    torch.manual_seed(0)
    name, shape, train, channels_last, rounds = WORKLOADS[workload]
    reference = _model(name)
    ours = batchnorm.convert(copy.deepcopy(reference))
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        reference = reference.to(memory_format=torch.channels_last)
        ours = ours.to(memory_format=torch.channels_last)
    steps = {"torch.nn": _step(reference, x.clone(), train),
             "batchnorm": _step(ours, x.clone(), train)}
    for step in steps.values():  # warm-up: numba loads its kernels, the allocator its pools
        step()
        step()
    times = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    result = {impl: float(np.median(t)) for impl, t in times.items()}
    result["share"] = _batch_norm_share(steps["torch.nn"], result["torch.nn"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per workload (median over them). Default: 3")
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="the workloads to run. Default: all")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/models.md",
                        help="markdown file to write. Default: benchmarks/results/models.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    if not args.out.parent.is_dir():
        parser.error(f"--out: directory {args.out.parent} does not exist; create it first")
    import cpu as cpu_benchmark

    lines = cpu_benchmark.header(
        "CPU benchmark: whole models, torch.nn's batch norm against batchnorm's", "models.py",
        raw_args) + [
             f"- milliseconds per step, the median of each process's rounds (torch.nn and "
             f"batchnorm taking turns), then the median over {args.processes} fresh processes; "
             "ratio = torch.nn / batchnorm (above 1: batchnorm is faster), with the range over "
             "the processes; BN share = batch norm's part of torch.nn's step (torch.profiler)",
             "", "| workload | torch.nn ms | batchnorm ms | torch/ours | range | BN share |",
             "|---|---|---|---|---|---|"]
    for workload in args.only:
        runs = []
        for k in range(args.processes):
            print(f"{workload}: process {k + 1} of {args.processes}", file=sys.stderr)
            runs.append(cpu_benchmark.fresh("models", f"measure({workload!r})"))
        theirs = float(np.median([r["torch.nn"] for r in runs]))
        ours = float(np.median([r["batchnorm"] for r in runs]))
        ratios = [r["torch.nn"] / r["batchnorm"] for r in runs]
        share = float(np.median([r["share"] for r in runs]))
        lines.append(f"| {DESCRIPTIONS[workload]} | {1e3 * theirs:.3g} | {1e3 * ours:.3g} | "
                     f"{theirs / ours:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
                     f"{100 * share:.0f}% |")
    lines.append("")
    cpu_benchmark.write_report(lines, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    main()
