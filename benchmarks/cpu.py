"""CPU benchmark: batch norm in training, this package's backends against torch.nn.

Times, for each shape and memory format of ``ROWS``:

* the training forward through ``batchnorm.functional.batch_norm(..., backend=...)`` against
  ``torch.nn.functional.batch_norm`` (both updating running statistics), and
* forward + backward through the modules (``batchnorm.BatchNorm2d``/``1d`` with
  ``$BATCHNORM_BACKEND`` set, against ``torch.nn.BatchNorm2d``/``1d``), the gradients of the
  input, weight and bias taken with ``torch.autograd.grad``,

for the ``numba`` backend (also with its output pool off, every output from torch's allocator
as torch.nn's are: the ``no pool`` columns) and the ``eager`` backend. Within a process each
time is the median of ``--repeats`` timed runs after one warm-up; torch.nn and numba take turns
within each round, so a change in the machine's load touches them alike (eager, much slower, is
timed in rounds of its own).

The whole measurement runs in ``--processes`` fresh processes, one after another, and every
figure is the median over them: the times of the smaller rows depend on the state the C
allocator and the caches are left in (whether a freed output's pages are mapped again, and
what is still cached), which differs from process to process far more than from round to
round. The speedup columns give the median and the range of the per-process speedups.
Achieved bandwidth counts the minimal traffic for an input of ``S`` bytes: ``3 S`` for the
forward (read for the statistics, read and write to normalize) and ``3 S + 5 S`` for forward +
backward (the backward reads x and dy for its sums, then reads x and dy and writes dx). The
machine's copy bandwidth is measured the way a fresh output is made,
``torch.empty_like(x).copy_(x)`` counting read + write, so both sides pay for new pages.

Run from the repository root (about 20 seconds per process on 2 cores)::

    python benchmarks/cpu.py                 # writes benchmarks/results/cpu.md
    python benchmarks/cpu.py --repeats 3 --processes 1 --out /tmp/cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import batchnorm  # noqa: E402
from batchnorm.functional import batch_norm  # noqa: E402
from batchnorm.kernels import numba_backend  # noqa: E402
from batchnorm.kernels import numba_buffers as cpu_buffers  # noqa: E402

# (shape, memory format): the table; the 2D row has a single layout.
ROWS = [
    ((64, 64, 56, 56), "nchw"),
    ((64, 64, 56, 56), "channels_last"),
    ((64, 256, 28, 28), "nchw"),
    ((64, 256, 28, 28), "channels_last"),
    ((256, 512, 7, 7), "nchw"),
    ((256, 512, 7, 7), "channels_last"),
    ((4096, 1024), "nchw"),
]
IMPLS = ("torch.nn", "numba", "numba, no pool", "eager")
TARGET_GEOMEAN = 2.0  # forward+backward speedup over torch.nn, geometric mean over the rows
TARGET_MIN = 1.0  # no row slower than torch.nn
TARGET_COPY_FRACTION = 0.5  # training forward (3-pass traffic) vs copy bandwidth, largest shape


def _median_ms(function, repeats: int) -> float:
    function()  # warm-up (and numba's compilation or cache load on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def copy_bandwidth(numel: int, repeats: int) -> tuple[float, float]:
    """GB/s of a copy into a fresh tensor and into a preallocated one (read + write)."""
    x = torch.randn(numel)
    fresh = _median_ms(lambda: torch.empty_like(x).copy_(x), repeats)
    out = torch.empty_like(x)
    reused = _median_ms(lambda: out.copy_(x), repeats)
    nbytes = 2 * x.numel() * x.element_size()
    return nbytes / fresh / 1e6, nbytes / reused / 1e6


def _modules(channels: int, rank: int) -> dict:
    name = "BatchNorm2d" if rank == 4 else "BatchNorm1d"
    ours = getattr(batchnorm, name)(channels)
    return {"torch.nn": getattr(torch.nn, name)(channels), "numba": ours,
            "numba, no pool": ours, "eager": ours}


@contextlib.contextmanager
def _allocation(impl: str):
    """For ``"numba, no pool"``: every output from torch's allocator, as torch.nn's are."""
    if impl != "numba, no pool":
        yield
        return
    saved = cpu_buffers.MIN_BYTES
    cpu_buffers.MIN_BYTES = math.inf  # no output is large enough for the pool
    try:
        yield
    finally:
        cpu_buffers.MIN_BYTES = saved


def _backend(impl: str) -> str:
    return {"torch.nn": "auto", "numba, no pool": "numba"}.get(impl, impl)


def _forward(impl: str, x, stats, weight, bias):
    with torch.no_grad(), _allocation(impl):
        if impl == "torch.nn":
            return torch.nn.functional.batch_norm(x, *stats, weight, bias, training=True)
        return batch_norm(x, *stats, weight, bias, training=True, backend=_backend(impl))


def _forward_backward(impl: str, module, x, dy):
    os.environ["BATCHNORM_BACKEND"] = _backend(impl)
    with _allocation(impl):
        y = module(x)
        return torch.autograd.grad(y, (x, module.weight, module.bias), dy)


def _rounds(runs: dict, repeats: int) -> dict:
    """Median milliseconds of each run: one warm-up, then ``repeats`` rounds of every run."""
    for run in runs.values():
        run()
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * float(np.median(t)) for key, t in times.items()}


def time_row(shape, memory_format: str, repeats: int) -> dict:
    """Median milliseconds of each implementation, forward and forward+backward.

    torch.nn and numba (with and without its output pool) take turns; the eager backend, a
    reference only, is timed afterwards in rounds of its own: its temporaries several times
    the input's size would otherwise evict the input from the cache before whichever
    implementation runs next.
    """
    x = torch.randn(shape)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    stats = {impl: (torch.zeros(channels), torch.ones(channels)) for impl in IMPLS}
    modules = _modules(channels, len(shape))
    x_grad = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)

    def runs(impls):
        table = {}
        for impl in impls:
            table["fwd", impl] = lambda i=impl: _forward(i, x, stats[i], weight, bias)
            table["fb", impl] = lambda i=impl: _forward_backward(i, modules[i], x_grad, dy)
        return table

    result = _rounds(runs(("torch.nn", "numba", "numba, no pool")), repeats)
    result.update(_rounds(runs(("eager",)), max(3, repeats // 3)))
    os.environ.pop("BATCHNORM_BACKEND", None)
    result["bytes"] = x.numel() * x.element_size()
    return result


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        info["cores"] = fields.get("CPU(s)", str(info["cores"])).strip()
    except (OSError, subprocess.CalledProcessError):
        pass  # lscpu is Linux-only: keep the platform module's answer
    return info


# Environment variables that change these timings (thread counts, allocator behaviour).
ENV_RECORDED = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "GLIBC_TUNABLES",
                "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def environment() -> str:
    pairs = [f"{name}={os.environ[name]}" for name in ENV_RECORDED if name in os.environ]
    return ", ".join(pairs) if pairs else "none of " + ", ".join(ENV_RECORDED)


def versions() -> str:
    import numba

    return (f"python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), numba {numba.__version__} "
            f"({numba.get_num_threads()} threads, {numba.threading_layer()} layer), "
            f"numpy {np.__version__}")


def checkout(path: Path) -> str:
    """A checkout's commit, as ``git`` names it (``"unknown"`` outside git), and whether its
    working tree has changes."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit


def fresh(module: str, call: str, env: dict | None = None):
    """``module.call`` (a Python expression on a module of ``benchmarks/``) evaluated in a
    fresh process that imports the package from this checkout: its result, passed as JSON."""
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys, json; sys.path[:0] = [{str(root)!r}, {str(root / 'benchmarks')!r}]"
            f"\nimport {module}\nprint(json.dumps({module}.{call}))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def header(title: str, script: str, raw_args: list[str]) -> list[str]:
    """The opening lines of a results file: what it measures and where, when and how."""
    info = machine()
    return [f"# {title}", "",
            f"- machine: {info['cpu']}, {info['cores']} CPUs",
            f"- versions: {versions()}",
            f"- checkout: {checkout(Path(__file__).resolve().parents[1])}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- command: `{' '.join(['python', f'benchmarks/{script}', *raw_args])}`"]


def write_report(lines: list[str], out: Path) -> None:
    """Print a results file's lines and write them to ``out``."""
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def _label(shape, memory_format) -> str:
    return "x".join(map(str, shape)) + ("" if len(shape) == 2 else f" {memory_format}")


def aggregate(runs: list[list[dict]]) -> list[dict]:
    """Per row, the median over processes of every time, and the per-process speedups.

    ``runs`` holds one list per process of ``{"shape", "format", "bytes", "ms"}`` rows, where
    ``ms`` maps ``"part|impl"`` to that process's median milliseconds.
    """
    rows = []
    for per_process in zip(*runs, strict=True):
        ms = {key: float(np.median([row["ms"][key] for row in per_process]))
              for key in per_process[0]["ms"]}
        speedups = {f"{part}|{impl}": [row["ms"][f"{part}|torch.nn"] / row["ms"][f"{part}|{impl}"]
                                       for row in per_process]
                    for part in ("fwd", "fb") for impl in ("numba", "numba, no pool")}
        first = per_process[0]
        rows.append({"shape": first["shape"], "format": first["format"], "bytes": first["bytes"],
                     "ms": ms, "speedups": speedups})
    return rows


def table(rows: list[dict], part: str) -> list[str]:
    """The markdown table of ``part`` (``"fwd"`` or ``"fb"``): times, speedups and GB/s."""
    passes = 3 if part == "fwd" else 8
    head = ("| shape | MB | torch.nn ms | numba ms | numba, no pool ms | eager ms | speedup | "
            "speedup range | speedup, no pool | numba GB/s | torch.nn GB/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        s, ms = row["bytes"], {impl: row["ms"][f"{part}|{impl}"] for impl in IMPLS}
        ours, no_pool = row["speedups"][f"{part}|numba"], row["speedups"][f"{part}|numba, no pool"]
        lines.append(
            f"| {_label(row['shape'], row['format'])} | {s / 1e6:.1f} | {ms['torch.nn']:.2f} | "
            f"{ms['numba']:.2f} | {ms['numba, no pool']:.2f} | {ms['eager']:.2f} | "
            f"{np.median(ours):.2f}x | {min(ours):.2f}-{max(ours):.2f}x | "
            f"{np.median(no_pool):.2f}x | "
            f"{passes * s / ms['numba'] / 1e6:.1f} | {passes * s / ms['torch.nn'] / 1e6:.1f} |")
    return lines


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


def targets(rows: list[dict], copy_gbs: float) -> list[str]:
    """The issue's three targets, judged on the medians over processes."""
    speedups = [float(np.median(row["speedups"]["fb|numba"])) for row in rows]
    no_pool = [float(np.median(row["speedups"]["fb|numba, no pool"])) for row in rows]
    per_process = [_geomean(ratios) for ratios in
                    zip(*(row["speedups"]["fb|numba"] for row in rows), strict=True)]
    lowest = min((min(row["speedups"]["fb|numba"]), _label(row["shape"], row["format"]))
                 for row in rows)
    slowest = min(zip(speedups, (_label(r["shape"], r["format"]) for r in rows), strict=True))
    largest = max(row["bytes"] for row in rows)
    fractions = [3 * row["bytes"] / row["ms"]["fwd|numba"] / 1e6 / copy_gbs
                 for row in rows if row["bytes"] == largest]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    geomean = _geomean(speedups)
    return [
        f"- forward+backward geometric-mean speedup over torch.nn, over the rows' median "
        f"speedups: {geomean:.2f}x (target >= {TARGET_GEOMEAN}x: "
        f"{verdict(geomean >= TARGET_GEOMEAN)}); in each process: "
        f"{', '.join(f'{g:.2f}x' for g in per_process)}; with every output from torch's "
        f"allocator (no pool): {_geomean(no_pool):.2f}x",
        f"- slowest row, forward+backward: {slowest[1]} at {slowest[0]:.2f}x (target >= "
        f"{TARGET_MIN}x: {verdict(slowest[0] >= TARGET_MIN)}); lowest in any process: "
        f"{lowest[1]} at {lowest[0]:.2f}x",
        f"- training forward on the largest shape ({largest / 1e6:.1f} MB): "
        f"{', '.join(f'{100 * f:.0f}%' for f in fractions)} of the copy bandwidth "
        f"(target >= {100 * TARGET_COPY_FRACTION:.0f}%: "
        f"{verdict(min(fractions) >= TARGET_COPY_FRACTION)})",
    ]


def measure(repeats: int) -> list[dict]:
    """Every row timed in this process, as ``aggregate`` takes them."""
    rows = []
    for shape, memory_format in ROWS:
        r = time_row(shape, memory_format, repeats)
        rows.append({"shape": list(shape), "format": memory_format, "bytes": r.pop("bytes"),
                     "ms": {f"{part}|{impl}": ms for (part, impl), ms in r.items()}})
        print(f"{_label(shape, memory_format)}: done", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11,  # timed rounds after one warm-up
                        help="timed runs per figure in each process (median). Default: 11")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes to measure in, one after another; every figure "
                             "is the median over them. Default: 5")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu.md"),
                        help="markdown file to write. Default: benchmarks/results/cpu.md")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # a measuring process
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    for name in ("repeats", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not numba_backend.available():
        sys.exit("numba is not installed: pip install numba (the benchmark times its kernels)")
    if args.json is not None:
        args.json.write_text(json.dumps(measure(args.repeats)))
        return

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f}: other work on the machine will "
              "slow every implementation and add noise", file=sys.stderr)
    largest = max(math.prod(shape) for shape, _ in ROWS)
    copy_fresh, copy_reused = copy_bandwidth(largest, args.repeats)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.processes):
            print(f"process {index + 1} of {args.processes}", file=sys.stderr)
            path = Path(scratch) / f"{index}.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--repeats",
                            str(args.repeats), "--json", str(path)], check=True)
            runs.append(json.loads(path.read_text()))
    rows = aggregate(runs)
    load_after = os.getloadavg()

    info = machine()
    lines = [
        "# CPU benchmark: training batch norm, float32",
        "",
        f"- machine: {info['cpu']}, {info['cores']} CPUs ({platform.system()})",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- versions: {versions()}",
        f"- command: `{' '.join(['python', 'benchmarks/cpu.py', *raw_args])}`",
        f"- load average (1/5/15 min) before: {' / '.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {' / '.join(f'{v:.2f}' for v in load_after)}",
        f"- copy bandwidth (`torch.empty_like(x).copy_(x)`, read + write, "
        f"{largest * 4 / 1e6:.0f} MB): {copy_fresh:.1f} GB/s; into a preallocated tensor: "
        f"{copy_reused:.1f} GB/s",
        f"- environment: {environment()}",
        f"- {args.processes} fresh processes, one after another; in each, the median of "
        f"{args.repeats} runs after a warm-up (eager: {max(3, args.repeats // 3)}). Times are "
        "the medians over the processes; speedup = torch.nn time / numba time, the median and "
        "the range over the processes. GB/s counts 3 S bytes for the forward, 8 S for "
        "forward+backward",
        "- every call asks for new outputs, as in training. torch.nn gets them from the C "
        "allocator, which, depending on its state, maps large blocks afresh (4 KiB pages, "
        "faulted in on first touch) or hands back recently freed ones; the numba backend reuses "
        f"the memory of its earlier outputs of {cpu_buffers.MIN_BYTES >> 20} MiB or more once "
        "they are freed (`batchnorm.kernels.numba_buffers`). The \"no pool\" columns time the "
        "same kernels with every output from torch's allocator, as torch.nn's",
        "",
        "Training forward (with running-statistics update):",
        "",
        *table(rows, "fwd"),
        "",
        "Forward + backward (module call, then the gradients of input, weight and bias):",
        "",
        *table(rows, "fb"),
        "",
        "Targets:",
        "",
        *targets(rows, copy_fresh),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(text)
    partial.replace(args.out)  # atomic: an interrupted run never leaves a half-written table


if __name__ == "__main__":
    main()
