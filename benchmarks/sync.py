"""CPU benchmark: SyncBatchNorm over gloo with 2 processes, against plain BatchNorm and the
collectives alone.

Each of 2 spawned ranks (one core and one thread each) holds half the batch of every row of
``benchmarks/cpu.py`` and times, in interleaved rounds (a barrier before each timed call, the
slower rank's time counted):

* ``sync``: ``batchnorm.SyncBatchNorm`` forward + backward (the gradients of input, weight and
  bias), statistics over both ranks;
* ``plain``: ``batchnorm.BatchNorm2d``/``1d`` forward + backward on the same local half batch;
* ``collectives``: the collectives a SyncBatchNorm step issues, alone, on tensors of their
  sizes: a 2-number all_gather (the processes agree on channels and dtype), a ``2C + 1``-number
  all_gather (count, mean, M2) and a ``2C``-number all_reduce (the gradient sums), float64.

With ``--baseline DIR`` the same ranks are also started on the package of another checkout
(``DIR/batchnorm``, e.g. an earlier commit in a ``git worktree``) and time its SyncBatchNorm:
the ``baseline`` column. Checkouts alternate process by process. Figures are medians over
``--processes`` jobs of the per-job medians.

Run from the repository root (about a minute per job on 2 cores)::

    python benchmarks/sync.py                        # writes benchmarks/results/sync.md
    git worktree add /tmp/before <commit> && python benchmarks/sync.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TARGET_OVERHEAD = 1.1  # sync <= plain + 1.1 * collectives
TARGET_SPEEDUP = 1.5  # geometric mean of baseline / sync


def _rank_job(rank: int, init: str, repeats: int, parts: list[str], rows: list, out: str) -> None:
    """One rank: time every row's parts; rank 0 writes ``{row: {part: ms}}`` to ``out``. It
    imports only torch and the checkout's ``batchnorm``, whatever that checkout holds."""
    import torch
    import torch.distributed as dist

    import batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    results = {}
    for shape, memory_format, label in rows:
        runs = _runs(torch, dist, batchnorm, shape, memory_format, rank, parts)
        results[label] = _time(torch, dist, runs, repeats)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _runs(torch, dist, batchnorm, shape, memory_format, rank, parts) -> dict:
    local = (shape[0] // WORLD, *shape[1:])
    g = torch.Generator().manual_seed(rank)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    x = torch.randn(local, generator=g).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(local, generator=g).contiguous(memory_format=fmt)  # as x's next layer
    channels = shape[1]
    plain = getattr(batchnorm, "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d")(channels)
    sync = batchnorm.SyncBatchNorm(channels)

    def step(module):
        y = module(x)
        return torch.autograd.grad(y, (x, module.weight, module.bias), dy)

    header = torch.zeros(2, dtype=torch.float64)
    table = torch.zeros(2 * channels + 1, dtype=torch.float64)
    sums = torch.zeros(2 * channels, dtype=torch.float64)

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def collectives():
        for t in (header, table):
            gather(t.new_empty(WORLD * t.numel()), t)
        dist.all_reduce(sums)

    every = {"sync": lambda: step(sync), "plain": lambda: step(plain),
             "collectives": collectives}
    return {part: every[part] for part in parts}


def _time(torch, dist, runs: dict, repeats: int) -> dict:
    """Median ms of each run, the slower rank's time each round."""
    for run in runs.values():
        run()  # warm-up: numba's compilation or cache load
    times = {part: [] for part in runs}
    for _ in range(repeats):
        for part, run in runs.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[part].append(float(elapsed))
    return {part: 1e3 * float(np.median(t)) for part, t in times.items()}


def _job(checkout: Path, parts: list[str], repeats: int) -> dict:
    """One fresh job of WORLD ranks on the package of ``checkout``, on the rows of
    ``benchmarks/cpu.py``."""
    import cpu as cpu_benchmark

    rows = [(shape, fmt, cpu_benchmark._label(shape, fmt)) for shape, fmt in cpu_benchmark.ROWS]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code = (f"import sys; sys.path[:0] = [{str(checkout)!r}, {str(ROOT / 'benchmarks')!r}]\n"
                "import torch.multiprocessing as mp, sync\n"
                f"mp.spawn(sync._rank_job, args=({f'file://{tmp}/rendezvous'!r}, {repeats}, "
                f"{parts!r}, {rows!r}, {str(out)!r}), nprocs={WORLD}, join=True)\n")
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return json.loads(out.read_text())


def _median(jobs: list[dict], row: str, part: str) -> float:
    return float(np.median([job[row][part] for job in jobs]))


def report(ours: list[dict], baseline: list[dict], args) -> list[str]:
    columns = ["sync ms", "plain ms", "collectives ms", "sync - plain ms",
               "(sync - plain) / collectives"]
    if baseline:
        columns += ["baseline sync ms", "baseline / sync"]
    lines = ["| row | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    within, speedups = [], []
    for row in ours[0]:
        sync, plain, coll = (_median(ours, row, p) for p in ("sync", "plain", "collectives"))
        cells = [sync, plain, coll, sync - plain, (sync - plain) / coll]
        within.append(sync <= plain + TARGET_OVERHEAD * coll)
        if baseline:
            base = _median(baseline, row, "sync")
            cells += [base, base / sync]
            speedups.append(base / sync)
        lines.append(f"| {row} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", f"- sync <= plain + {TARGET_OVERHEAD} x collectives: {sum(within)} of "
              f"{len(within)} rows"]
    if speedups:
        geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(f"- geometric mean of baseline / sync: {geomean:.2f}x (target >= "
                     f"{TARGET_SPEEDUP}x: {'met' if geomean >= TARGET_SPEEDUP else 'not met'})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per job "
                        "(median reported). Default: 11")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh jobs per checkout (median over them). Default: 3")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout whose SyncBatchNorm is timed too. Default: none")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sync.md",
                        help="markdown file to write. Default: benchmarks/results/sync.md")
    raw_args = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_args)
    ours, baseline = [], []
    for job in range(args.processes):
        print(f"job {job + 1} of {args.processes}", file=sys.stderr)
        ours.append(_job(ROOT, ["sync", "plain", "collectives"], args.repeats))
        if args.baseline is not None:
            baseline.append(_job(args.baseline.resolve(), ["sync"], args.repeats))
    import cpu as cpu_benchmark  # benchmarks/cpu.py: its rows, machine and versions

    info = cpu_benchmark.machine()
    lines = [
        "# CPU benchmark: SyncBatchNorm over gloo, 2 processes, float32",
        "",
        f"- machine: {info['cpu']}, {info['cores']} CPUs; each rank 1 thread",
        f"- versions: {cpu_benchmark.versions()}",
        f"- this checkout: {cpu_benchmark.checkout(ROOT)}"
        + (f"; baseline: {args.baseline} at {cpu_benchmark.checkout(args.baseline)}"
           if args.baseline else ""),
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{' '.join(['python', 'benchmarks/sync.py', *raw_args])}`",
        f"- {args.processes} fresh jobs per checkout, alternating; in each, the median of "
        f"{args.repeats} rounds after a warm-up, the slower rank's time each round. Each rank "
        "holds half the batch of the row; forward + backward (input, weight and bias "
        "gradients); the collectives are those of one SyncBatchNorm step, alone",
        "",
        *report(ours, baseline, args),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
    main()
