"""CPU profile: where the microseconds of one small batch-norm call go, layer by layer.

A small layer's time is the cost of each call, not of its bytes. This times one
``BatchNorm2d(64)`` call on ``(2, 64, 4, 4)`` (and ``--shape``), three ways (training forward +
backward, training forward without autograd, inference forward), through nested layers of the
package, each timed on its own:

* ``module``: ``layer(x)`` (and ``torch.autograd.grad`` of input, weight and bias);
* ``functional``: ``batchnorm.functional.batch_norm`` with the layer's tensors (module glue off);
* ``op``: the autograd op and the running-statistics update, arguments already checked and the
  backend already chosen (validation and dispatch off);
* ``kernels``: the backend's own functions alone (``forward_train`` + ``update_running_stats``,
  ``backward``; ``forward_eval``), on the ``(N, C, L)`` view;

beside torch.nn's ``BatchNorm2d`` and ``torch.batch_norm`` (the aten op, its glue off). The
differences between consecutive layers are what each layer costs. Every figure is the median
of ``--repeats`` calls after a warm-up, in each of ``--processes`` fresh processes, and the
median over them.

Run from the repository root (about 20 seconds per process)::

    python benchmarks/per_call.py                 # writes benchmarks/results/per_call.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2, 64, 4, 4), (32, 64, 16, 16)]
MODES = ("train fwd+bwd", "train fwd", "eval fwd")


def _median_us(function, repeats: int) -> float:
    for _ in range(20):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def _layers(shape, mode: str) -> dict:
    """The callables of every layer for one shape and mode."""
    import torch

    import batchnorm
    from batchnorm import _autograd, _ops
    from batchnorm.kernels import backend

    channels = shape[1]
    training = mode != "eval fwd"
    grad = mode == "train fwd+bwd"
    x = torch.randn(shape, requires_grad=grad)
    dy = torch.randn(shape)
    ours, theirs = batchnorm.BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    ours.train(training)
    theirs.train(training)
    name = "numba"  # the compiled backend, which the op and kernel layers time
    kernels = backend(name)

    def step(forward, params):
        if not grad:
            with torch.no_grad():
                return forward()
        return torch.autograd.grad(forward(), (x, *params), dy)

    def functional():
        return batchnorm.functional.batch_norm(
            x, ours.running_mean, ours.running_var, ours.weight, ours.bias, training,
            ours.momentum, ours.eps, num_batches_tracked=ours.num_batches_tracked)

    def op():
        if not training:
            return _autograd.BatchNormEval.apply(x, ours.weight, ours.bias, ours.running_mean,
                                                 ours.running_var, None, ours.eps, False, name)
        y, mean, var, _ = _autograd.BatchNormTrain.apply(x, ours.weight, ours.bias, None,
                                                         ours.eps, False, name)
        _ops.call("update_running_stats")(ours.running_mean, ours.running_var,
                                          ours.num_batches_tracked, mean, var,
                                          x.numel() // channels, ours.momentum, name)
        return y

    x3 = _ops.as_ncl(x.detach())
    dy3 = _ops.as_ncl(dy)
    saved = kernels.forward_train(x3, ours.weight, ours.bias, ours.eps)

    def kernel_calls():
        if not training:
            scale, shift = batchnorm.kernels.eager.inference_affine(
                ours.weight, ours.bias, ours.running_mean, ours.running_var, ours.eps)
            return kernels.forward_eval(x3, scale, shift)
        out = kernels.forward_train(x3, ours.weight, ours.bias, ours.eps)
        kernels.update_running_stats(ours.running_mean, ours.running_var,
                                     ours.num_batches_tracked, out[1], out[3],
                                     x3.shape[0] * x3.shape[2], ours.momentum)
        if grad:
            kernels.backward(dy3, x3, None, saved[1], saved[2], ours.weight, True)
        return out

    def aten():
        return torch.batch_norm(x, theirs.weight, theirs.bias, theirs.running_mean,
                                theirs.running_var, training, 0.1, 1e-5, False)

    params = (ours.weight, ours.bias)
    return {"torch.nn module": lambda: step(lambda: theirs(x), (theirs.weight, theirs.bias)),
            "torch.batch_norm": lambda: step(aten, (theirs.weight, theirs.bias)),
            "module": lambda: step(lambda: ours(x), params),
            "functional": lambda: step(functional, params),
            "op": lambda: step(op, params),
            f"kernels ({name})": kernel_calls}


def measure(repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    return {f"{'x'.join(map(str, shape))} {mode}": {
        layer: _median_us(run, repeats) for layer, run in _layers(shape, mode).items()}
        for shape in SHAPES for mode in MODES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=500,
                        help="timed calls per figure (median reported). Default: 500")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes (median over them). Default: 3")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/per_call.md",
                        help="markdown file to write. Default: benchmarks/results/per_call.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    import cpu as cpu_benchmark

    runs = []
    for k in range(args.processes):
        print(f"process {k + 1} of {args.processes}", file=sys.stderr)
        runs.append(cpu_benchmark.fresh("per_call", f"measure({args.repeats})"))
    layers = list(next(iter(runs[0].values())))
    lines = cpu_benchmark.header(
        "CPU profile: the cost of one small batch-norm call, layer by layer", "per_call.py",
        raw_args) + [
             f"- microseconds per call, the median of {args.repeats} calls after a warm-up in "
             f"each of {args.processes} fresh processes, then the median over them; the layers "
             "are described in the script's docstring", "",
             "| call | " + " | ".join(layers) + " | module / torch.nn |",
             "|" + "---|" * (len(layers) + 2)]
    for case in runs[0]:
        us = {layer: float(np.median([run[case][layer] for run in runs])) for layer in layers}
        ratio = us["module"] / us["torch.nn module"]
        lines.append(f"| {case} | " + " | ".join(f"{us[layer]:.1f}" for layer in layers)
                     + f" | {ratio:.2f}x |")
    lines.append("")
    cpu_benchmark.write_report(lines, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    main()
