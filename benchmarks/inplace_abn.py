"""CPU benchmark: memory and time of a ResNet-50 training step with in-place ABN.

Four versions of torchvision's resnet50 (untrained, 10 classes), trained with SGD on one
batch:

* ``BN + ReLU``: torch.nn's ``BatchNorm2d`` + ``ReLU(inplace=True)``, as torchvision builds it;
* ``BN + LeakyReLU``: the same with ``LeakyReLU(0.01, inplace=True)``;
* ``InPlaceABN (pairs)``: ``batchnorm.InPlaceABN2d`` (leaky ReLU 0.01) for every BN that an
  activation follows (the stem and the first two of each bottleneck); the third BN of a
  bottleneck, which feeds the residual add, stays a ``BatchNorm2d``;
* ``InPlaceABN (units)``: every BN an in-place ABN: also the third of each bottleneck in its
  residual form, ``abn3(conv3(out), identity)`` = ``leaky_relu(BN(conv3(out)) + identity)``
  over conv3's output, and the shortcut's BN with the identity activation.

Peak memory is how far the process's resident memory rises above its level before one
training step (forward, backward, SGD update), in a fresh process per version whose C
allocator maps every large tensor on its own (``MALLOC_MMAP_THRESHOLD_``), so that resident
memory follows the tensors alive (Linux). Every version first loads numba and the compiled
in-place ABN kernels (a call on a small input), so that library code is not counted as a
step's memory. Step time is the median
of ``--steps`` steps after a warm-up, the versions taking turns, in each of ``--processes``
fresh processes, then the median over them.

Run from the repository root (about four minutes on 2 cores)::

    python benchmarks/inplace_abn.py                  # writes benchmarks/results/inplace_abn.md
    python benchmarks/inplace_abn.py --device cuda    # batch 64 at 224x224: inplace_abn_cuda.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("BN + ReLU", "BN + LeakyReLU", "InPlaceABN (pairs)", "InPlaceABN (units)")
SHAPES = {"cpu": (16, 3, 160, 160), "cuda": (64, 3, 224, 224)}


def _pairs_forward(self, x):
    identity = x
    out = self.abn1(self.conv1(x))
    out = self.abn2(self.conv2(out))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity
    return self.relu(out)


def _units_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.abn1(self.conv1(x))
    out = self.abn2(self.conv2(out))
    return self.abn3(self.conv3(out), identity)  # leaky_relu(BN(.) + identity), in place


def build(version: str):
    import torch

    import batchnorm

    sys.path.insert(0, str(ROOT / "tests"))
    import vision_models  # torchvision beside a CPU-only torch

    torch.manual_seed(0)
    model = vision_models.torchvision().models.resnet50(num_classes=10)
    if version == "BN + LeakyReLU":
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, torch.nn.ReLU):
                    setattr(module, name, torch.nn.LeakyReLU(0.01, inplace=True))
    elif version.startswith("InPlaceABN"):
        def abn(bn, activation="leaky_relu"):
            layer = batchnorm.InPlaceABN2d(bn.num_features, activation=activation,
                                           activation_param=0.01)
            layer.load_state_dict(bn.state_dict())
            return layer
        units = version == "InPlaceABN (units)"
        model.bn1, model.relu = abn(model.bn1), torch.nn.Identity()
        for module in model.modules():
            if type(module).__name__ == "Bottleneck":
                module.abn1, module.abn2 = abn(module.bn1), abn(module.bn2)
                del module.bn1, module.bn2
                if units:
                    module.abn3 = abn(module.bn3)
                    del module.bn3
                    if module.downsample is not None:
                        module.downsample[1] = abn(module.downsample[1], "identity")
                forward = _units_forward if units else _pairs_forward
                module.forward = types.MethodType(forward, module)
    return model


def _step_function(model, device: str):
    import torch

    shape = SHAPES[device]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    target = (torch.arange(shape[0]) % 10).to(device)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def _load_libraries() -> None:
    """numba and the compiled in-place ABN kernels loaded (from numba's on-disk cache) by a
    call on a small input, in every version alike: library code, not the step's memory."""
    import torch

    from batchnorm.inplace_abn import inplace_abn
    from batchnorm.kernels import numba_backend

    if numba_backend.available():
        x = torch.randn(4, 8, 6, 6, requires_grad=True)
        z = inplace_abn(x * 1.0, None, None, training=True, residual=torch.randn(4, 8, 6, 6),
                        backend="numba")
        z.sum().backward()


def peak_bytes(version: str, device: str = "cpu") -> int:
    """How far this process's memory rose above its level before one step (the first:
    forward, backward, the gradients' allocation and the update), in bytes.

    On the CPU resident memory, run with ``MALLOC_MMAP_THRESHOLD_`` fixed (``_fresh`` does),
    so that every large tensor is its own mapping, given back to the system when freed:
    resident memory then follows the tensors alive, and its peak (``ru_maxrss``) is theirs.
    On CUDA ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before.
    """
    import gc
    import os
    import resource

    import torch

    step = _step_function(build(version), device)
    _load_libraries()
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def step_times(steps: int, device: str = "cpu") -> dict:
    runs = {v: _step_function(build(v), device) for v in VERSIONS}
    for step in runs.values():
        step()
    times = {v: [] for v in VERSIONS}
    for _ in range(steps):
        for version, step in runs.items():
            start = time.perf_counter()
            step()
            times[version].append(time.perf_counter() - start)
    return {v: float(np.median(t)) for v, t in times.items()}


def _gpu_line(device: str) -> list[str]:
    if device != "cuda":
        return []
    import torch

    return [f"- gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}"]


def _fresh(call: str):
    import cpu as cpu_benchmark

    # Every large tensor its own mapping, given back when freed (peak_bytes).
    return cpu_benchmark.fresh("inplace_abn", call,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per version")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes for time")
    parser.add_argument("--device", choices=sorted(SHAPES), default="cpu",
                        help="cpu (resident memory, batch 16 at 160x160) or cuda "
                             "(max_memory_allocated, batch 64 at 224x224)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/inplace_abn[_cuda].md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    device = args.device
    out = args.out or ROOT / "benchmarks/results" / (
        "inplace_abn.md" if device == "cpu" else f"inplace_abn_{device}.md")
    peaks = {v: _fresh(f"peak_bytes({v!r}, {device!r})") for v in VERSIONS}
    runs = [_fresh(f"step_times({args.steps}, {device!r})") for _ in range(args.processes)]
    times = {v: float(np.median([r[v] for r in runs])) for v in VERSIONS}
    import cpu as cpu_benchmark

    base = "BN + ReLU"
    shape = SHAPES[device]
    peak_rule = ("the rise of resident memory during the first step above its level before "
                 "(ru_maxrss, large tensors mapped on their own, a fresh process each)"
                 if device == "cpu" else "torch.cuda.max_memory_allocated during the first "
                 "step above memory_allocated before (a fresh process each)")
    lines = cpu_benchmark.header(
        f"{device.upper()} benchmark: ResNet-50 training step memory with in-place ABN",
        "inplace_abn.py", raw_args) + _gpu_line(device) + [
             f"- torchvision resnet50, batch {shape[0]} at {shape[2]}x{shape[3]}, float32, SGD; "
             f"peak = {peak_rule}; time = median of "
             f"{args.steps} interleaved steps, median over {args.processes} fresh processes",
             "", f"| version | peak MB | vs {base} | step s | vs {base} |", "|---|---|---|---|---|"]
    for v in VERSIONS:
        lines.append(f"| {v} | {peaks[v] / 2**20:.0f} | {peaks[v] / peaks[base]:.2f}x | "
                     f"{times[v]:.2f} | {times[v] / times[base]:.2f}x |")
    lines.append("")
    cpu_benchmark.write_report(lines, out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    main()
