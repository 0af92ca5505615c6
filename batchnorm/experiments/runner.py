"""Running one experiment: data, seeds, resumable training runs, and results.json.

Each training run (one network, one setting) is stored under ``OUT/EXPERIMENT/runs/`` as soon
as it finishes, named by a hash of everything that determines it (its settings, the seed, the
device and the dataset's digest). A restarted command with the same arguments finds the file
and skips the run; changing any of those inputs changes the hash, so a stale result is never
reused. A stored file that is unreadable, not the object this module writes, or of another
identity is not trusted: the run is trained again and the file replaced, with a warning that
names it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from batchnorm.data import Mnist
from batchnorm.experiments.config import as_dict
from batchnorm.experiments.report import json_kind, read_json, write_json
from batchnorm.experiments.training import Tensors

# Bump when the meaning of stored run results changes, so old files are not reused.
RUN_SCHEMA = 1


def machine() -> dict:
    """Platform, processor, core count and torch's thread count, for every results.json."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def versions() -> dict:
    """Versions of python, torch, numpy and batchnorm."""
    import batchnorm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "batchnorm": getattr(batchnorm, "__version__", _dist())}


def _dist() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchnorm")
    except PackageNotFoundError:
        return "unknown (not installed)"


class Console:
    """Log lines and progress bars: rich when installed, else plain lines on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        try:
            from rich.console import Console as RichConsole
        except ImportError:
            self._rich = None
        else:
            self._rich = RichConsole(stderr=True)
            if not self._rich.is_terminal:  # a log file: wide lines, no live bars
                self._rich = RichConsole(stderr=True, width=140)

    def log(self, text: str) -> None:
        if self.quiet:
            return
        if self._rich:
            self._rich.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """A warning on stderr, shown even when quiet, on one unwrapped line (paths stay whole)."""
        line = f"warning: {text}"
        if self._rich:
            self._rich.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def show(self, renderable) -> None:
        """Print a rich renderable (a table) to the console."""
        if not self.quiet and self._rich:
            self._rich.print(renderable)

    @contextmanager
    def progress(self, description: str, total: int):
        """Yield ``advance(n)``; shows a bar for ``total`` units of work."""
        if self.quiet or self._rich is None or not self._rich.is_terminal:  # logs: no bars
            yield lambda n: None
            return
        from rich.progress import Progress, TimeElapsedColumn, TimeRemainingColumn

        columns = (*Progress.get_default_columns()[:-1], TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self._rich, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.update(task, advance=n)


@dataclass
class Context:
    """What an experiment's ``run`` gets: configuration, data, device, seed and the run store."""

    name: str
    config: object
    mnist: Mnist
    data: Tensors
    device: torch.device
    seed: int
    out: Path
    console: Console
    ran: int = 0
    resumed: int = 0
    run_seconds: dict = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """Seed torch for model initialization and return the minibatch generator.

        Called at the start of every training run, so each run is the same whether or not the
        runs before it were resumed, and networks compared in one experiment see the same
        initial draws and the same minibatches.
        """
        torch.manual_seed(self.seed)
        return torch.Generator().manual_seed(self.seed + 1)

    def run(self, label: str, spec: dict, train: Callable[[], dict]) -> dict:
        """The result of the training run ``label`` with settings ``spec``: loaded or computed.

        ``train()`` returns a JSON-ready dict; it is stored atomically when it finishes.
        """
        identity = {"schema": RUN_SCHEMA, "experiment": self.name, "label": label, "spec": spec,
                    "seed": self.seed, "device": self.device.type,
                    "dataset": self.mnist.describe()["sha256"]}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        path = self.out / "runs" / f"{label}-{digest}.json"
        stored = self._stored(path, identity) if path.is_file() else None
        if stored is not None:
            self.resumed += 1
            self.run_seconds[label] = stored["seconds"]
            self.console.log(f"[{self.name}] {label}: finished before, skipped ({path.name})")
            return stored["result"]
        start = time.perf_counter()
        result = train()
        seconds = time.perf_counter() - start
        write_json(path, {"identity": identity, "seconds": seconds, "result": result})
        self.ran += 1
        self.run_seconds[label] = seconds
        self.console.log(f"[{self.name}] {label}: done in {seconds:.1f} s")
        return result

    def _stored(self, path: Path, identity: dict) -> dict | None:
        """The run stored at ``path`` if it is whole and has ``identity``; else None, warned."""
        try:
            stored = read_json(path)
        except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError, NaN
            problem = f"unreadable ({error})"
        else:
            problem = stored_run_problem(stored, identity)
        if problem is None:
            return stored
        self.console.warn(f"[{self.name}] {path}: {problem}; not trusted: training this run "
                          "again and replacing the file")
        return None

    def progress(self, label: str, total: int):
        return self.console.progress(f"{self.name} {label}", total)


def stored_run_problem(stored, identity: dict) -> str | None:
    """What is wrong with a parsed run file for ``identity``; None when it can be resumed.

    The file must be what :meth:`Context.run` writes: an object with this ``identity`` (the file
    name is its hash, so another one means a damaged or hand-made file), the run's ``seconds``
    (a finite number >= 0) and its ``result`` (an object).

    >>> stored_run_problem([1, 2], {"label": "bn"})
    'holds an array, expected an object with "identity", "seconds" and "result"'
    >>> stored_run_problem({"identity": {"label": "bn"}, "result": {}}, {"label": "bn"})
    '"seconds" is missing, expected a number >= 0'
    """
    if not isinstance(stored, dict):
        return f'holds {json_kind(stored)}, expected an object with "identity", "seconds" and ' \
               '"result"'
    if stored.get("identity") != identity:
        return '"identity" is not the one this run\'s settings give (its file name is their hash)'
    seconds = stored.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not (math.isfinite(seconds) and seconds >= 0):
        got = "missing" if "seconds" not in stored else f"{json_kind(seconds)} {seconds!r}"
        return f'"seconds" is {got}, expected a number >= 0'
    if not isinstance(stored.get("result"), dict):
        got = "missing" if "result" not in stored else json_kind(stored["result"])
        return f'"result" is {got}, expected an object'
    return None


def metadata(ctx: Context, quick: bool, overrides: dict, command: str) -> dict:
    """The record that every results.json carries next to the experiment's own numbers."""
    return {
        "config": as_dict(ctx.config),
        "quick": quick,
        "overrides": overrides,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "machine": machine(),
        "versions": versions(),
        "dataset": ctx.mnist.describe(),
        "command": command,
    }


def finish(ctx: Context, payload: dict, meta: dict, started: float) -> Path:
    """Write ``OUT/EXPERIMENT/results.json`` and return its path."""
    clash = set(payload) & (set(meta) | {"experiment", "training_runs", "train_seconds",
                                          "wall_seconds"})
    if clash:
        raise KeyError(f"experiment {ctx.name} returned reserved keys {sorted(clash)}")
    results = {"experiment": ctx.name, **meta, **payload,
               "training_runs": {"ran": ctx.ran, "resumed": ctx.resumed,
                        "seconds": {k: round(v, 3) for k, v in ctx.run_seconds.items()}},
               "train_seconds": round(sum(ctx.run_seconds.values()), 3),
               "wall_seconds": round(time.perf_counter() - started, 3)}
    path = ctx.out / "results.json"
    write_json(path, results)
    return path
