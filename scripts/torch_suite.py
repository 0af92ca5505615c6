"""Run PyTorch's own BatchNorm tests against torch.nn and against this package, and report.

PyTorch's test files are not part of this repository: fetch ``test/test_modules.py``,
``test/test_nn.py`` and ``test/nn/test_load_state_dict.py`` from pytorch/pytorch into a folder
of your own (keeping the ``nn/`` subfolder), and write there a ``COMMIT`` file with one line per
file, ``PATH<TAB>COMMIT<TAB>NOTE`` (``#`` starts a comment), naming the commit each came from.
This script only runs the files it is given; it carries no test code of PyTorch's.

For each implementation (``--impl torch``, ``batchnorm`` or ``both``) it starts one fresh
``python -m pytest`` over the three files, with this file loaded as a pytest plugin
(``-p torch_suite``) that

* keeps only the BatchNorm tests (the ``SELECTION`` table below) on the CPU: device-generic
  classes are instantiated for the CPU only (``PYTORCH_TESTING_DEVICE_ONLY_FOR=cpu``, no
  visible CUDA device), and tests that need CUDA skip themselves;
* for ``batchnorm``, before any test file or ``torch.testing._internal`` module is imported,
  binds ``torch.nn.BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (also
  under ``torch.nn.modules`` and ``torch.nn.modules.batchnorm``) and
  ``torch.nn.functional.batch_norm`` to this package's. ``common_modules`` then builds its
  ``ModuleInfo`` entries from our classes, under the same test names (``nn.BatchNorm2d``).

torch's own internals keep working: the private bases ``_NormBase``, ``_BatchNorm`` and
``_LazyNormBase`` are left alone, so ``isinstance`` checks inside torch see torch's classes as
before, and the torch modules that subclass or capture the public names when imported
(quantization, fusion; ``TORCH_FIRST``) are imported before the swap, so they keep torch's
classes. Our classes do not derive from torch's ``_BatchNorm``, so a torch helper that asks
``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` of one of ours answers no: a test that
depends on that fails, and that is a real difference a user would meet.

Outcomes come from pytest's JUnit XML. The markdown report names the torch version, the
pytorch commits of the test files (read from ``COMMIT``), this checkout's commit, the machine,
the date and the command, then the counts per implementation and every test that passes on
torch but fails on batchnorm, with the first line of its error.

Run from the repository root (about 2 minutes per implementation on 2 cores)::

    python scripts/torch_suite.py --tests /tmp/torch_tests --impl both
    python scripts/torch_suite.py --tests /tmp/torch_tests --impl batchnorm --out /tmp/bn.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "torch_suite.md"
IMPL_ENV = "TORCH_SUITE_IMPL"  # set by the runner for the pytest child; the plugin acts only then
IMPLS = ("torch", "batchnorm")

# The BatchNorm tests, per file: a test is kept when one of its patterns matches "Class::name".
SELECTION = {
    # every TestModule test parametrized over a BatchNorm ModuleInfo (module_db has no Lazy or
    # Sync entry at torch 2.13; the pattern takes them if a later torch adds them)
    "test_modules.py": [r"^TestModuleCPU::test_\w+?_nn_(Lazy|Sync)?BatchNorm\dd_"],
    "test_nn.py": [
        # names that mention batch norm: batchnorm, batch_norm, BatchNorm, sync_batchnorm, _bn_
        r"^(TestNN|TestNNDeviceTypeCPU|TestFusionUtils)::\w*(?i:batch_?norm|_bn_)",
        r"^TestNN::test_state_dict$",  # a module holding a BatchNorm2d: its state_dict keys
        r"^TestFusionEval::",  # Conv+BatchNorm2d fusion in eval mode (fuse_conv_bn_eval)
    ],
    # the tests whose modules hold a BatchNorm (each runs with and without swapped parameters)
    "nn/test_load_state_dict.py": [
        r"^TestLoadStateDict::test_load_state_dict_"
        r"(BC_|assign_meta_|assign_with_optimizer_|assign_shape_stride_)?swap_",
    ],
}

BN_CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
              "LazyBatchNorm3d", "SyncBatchNorm")
NAMESPACES = ("torch.nn", "torch.nn.modules", "torch.nn.modules.batchnorm")
# torch modules that subclass nn.BatchNorm*d or bind the names when imported: imported before
# the swap so they keep torch's classes (torch itself already imports most of them).
TORCH_FIRST = ("torch.ao.nn.intrinsic", "torch.ao.nn.qat", "torch.ao.nn.quantized",
               "torch.ao.quantization", "torch.nn.intrinsic", "torch.nn.qat",
               "torch.nn.quantized", "torch.nn.utils.fusion")
# torch.testing modules that build tables (module_db, module_tests, op_db) from those names
# when imported; the swap must come first (``import torch`` itself loads two harmless others).
CAPTURING = ("torch.testing._internal.common_modules", "torch.testing._internal.common_nn",
             "torch.testing._internal.common_methods_invocations")


# ---- the pytest plugin (active only in the child, where IMPL_ENV is set) ----

def substitute() -> list[str]:
    """Bind torch's public batch-norm names to this package's; return what was bound."""
    for name in TORCH_FIRST:
        importlib.import_module(name)
    early = [m for m in CAPTURING if m in sys.modules]
    if early:
        raise RuntimeError(f"{early[0]} is already imported, so its tables hold torch's "
                           "classes: load this plugin with -p, before any test file")
    import torch.nn.functional

    import batchnorm
    import batchnorm.functional

    bound = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in BN_CLASSES:
            setattr(module, name, getattr(batchnorm, name))
            bound.append(f"{namespace}.{name}")
    torch.nn.functional.batch_norm = batchnorm.functional.batch_norm
    bound.append("torch.nn.functional.batch_norm")
    return bound


def pytest_configure(config) -> None:
    impl = os.environ.get(IMPL_ENV)
    if impl is None:
        return
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={impl!r}: expected one of {', '.join(IMPLS)}")
    config._torch_suite_bound = substitute() if impl == "batchnorm" else []


def pytest_report_header(config) -> list[str]:
    bound = getattr(config, "_torch_suite_bound", None)
    if bound is None:
        return []
    import torch.nn
    return [f"torch_suite: impl={os.environ[IMPL_ENV]}, {len(bound)} names bound, "
            f"torch.nn.BatchNorm2d is {torch.nn.BatchNorm2d.__module__}.BatchNorm2d"]


def selected(nodeid: str) -> bool:
    """Whether a test (``path::Class::name``) is one of the BatchNorm tests."""
    path, _, rest = nodeid.partition("::")
    return any(re.search(pattern, rest) for pattern in SELECTION.get(path, ()))


def pytest_collection_modifyitems(config, items) -> None:
    if IMPL_ENV not in os.environ:
        return
    keep = [item for item in items if selected(item.nodeid)]
    drop = [item for item in items if not selected(item.nodeid)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ---- the runner ----

@dataclass
class Run:
    """One implementation's pytest run: outcome per test id, with its first message line."""

    impl: str
    command: list[str]
    returncode: int
    seconds: float
    outcomes: dict[str, str] = field(default_factory=dict)  # passed|failed|error|skipped
    messages: dict[str, str] = field(default_factory=dict)
    log_tail: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def child_command(tests: Path, junit: Path) -> list[str]:
    """The child's command line (run with ``tests`` as the working directory)."""
    return [sys.executable, "-m", "pytest", *SELECTION, "-p", "torch_suite",
            "-p", "no:cacheprovider", "--rootdir", str(tests), "-o", "addopts=",
            "-o", "junit_family=xunit2", "-q", "--junitxml", str(junit)]


def child_env(impl: str) -> dict[str, str]:
    """The environment of the pytest child: plugin and package importable, CPU only."""
    env = dict(os.environ)
    paths = [str(ROOT / "scripts"), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env[IMPL_ENV] = impl
    env["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"  # device-generic classes: CPU only
    env["CUDA_VISIBLE_DEVICES"] = ""  # so CUDA-only tests skip even on a GPU machine
    return env


def run_impl(impl: str, tests: Path, workdir: Path, timeout: float) -> Run:
    """Run the selection in a fresh pytest process under one implementation."""
    junit = workdir / f"{impl}.xml"
    command = child_command(tests, junit)
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=tests, env=child_env(impl), capture_output=True,
                              text=True, timeout=timeout)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, log = -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    run = Run(impl, command, returncode, time.monotonic() - start, log_tail=log[-3000:])
    if junit.exists():
        parse_junit(junit, run)
    return run


def case_id(case: ET.Element) -> str:
    """``path::Class::name`` from a JUnit testcase (classname ``nn.test_x.Class``)."""
    module, _, cls = case.get("classname", "").rpartition(".")
    return f"{module.replace('.', '/')}.py::{cls}::{case.get('name')}"


# terminal colour codes, raw or as the JUnit writer escapes them ("#x1B[1m")
ANSI = re.compile(r"(\x1b|#x1B)\[[0-9;]*m")


def first_line(element: ET.Element) -> str:
    """The first non-empty line of a failure/error/skipped element's message or text."""
    for text in (element.get("message"), element.text):
        for line in ANSI.sub("", text or "").splitlines():
            if line.strip():
                return line.strip()[:300]
    return ""


def parse_junit(path: Path, run: Run) -> None:
    """Fill ``run.outcomes`` and ``run.messages`` from a JUnit XML file."""
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = case_id(case)
        outcome, message = "passed", ""
        for tag, name in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            child = case.find(tag)
            if child is not None:
                outcome, message = name, first_line(child)
        run.outcomes[tid] = outcome
        run.messages[tid] = message


# ---- the report ----

def read_commits(tests: Path) -> list[tuple[str, str, str]]:
    """(path, commit, note) per line of the tests folder's COMMIT file."""
    source = tests / "COMMIT"
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: write one 'PATH<TAB>COMMIT<TAB>NOTE' "
                                "line per test file, naming the pytorch commit it came from")
    rows = []
    for line in source.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            path, commit, *note = line.split("\t")
            rows.append((path, commit, note[0] if note else ""))
    return rows


def git_state() -> str:
    """This checkout's commit, and whether its work tree has uncommitted changes (read-only)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()
    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    return f"{head or 'unknown'}" + (" with uncommitted changes" if dirty else "")


def header_lines(tests: Path, argv: list[str], runs: list[Run]) -> list[str]:
    """The report's opening: versions, sources, machine, date, command."""
    import torch

    uname = platform.uname()
    lines = ["# PyTorch's own BatchNorm tests, run on torch.nn and on batchnorm", "",
             f"- torch: {torch.__version__} (git {torch.version.git_version})",
             f"- batchnorm: {ROOT} at {git_state()}",
             f"- python: {platform.python_version()}",
             f"- machine: {platform.processor() or uname.machine}, {os.cpu_count()} CPUs, "
             f"{uname.system} {uname.release}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `{shlex.join(['python', *argv])}`",
             f"- test files, from pytorch/pytorch (`{tests / 'COMMIT'}`):"]
    lines += [f"  - `test/{path}` at `{commit}`" + (f": {note}" if note else "")
              for path, commit, note in read_commits(tests)]
    lines += [f"- {run.impl} run: `{shlex.join(run.command[1:])}`, exit {run.returncode}, "
              f"{run.seconds:.0f} s" for run in runs]
    lines.append("- selection (`Class::name` patterns, CPU only): "
                 + "; ".join(f"`{p}`: " + ", ".join(f"`{r}`" for r in rs)
                             for p, rs in SELECTION.items()))
    return lines


def counts_table(runs: list[Run]) -> list[str]:
    lines = ["", "## Counts", "", "| implementation | tests | passed | failed | errors | skipped |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        if not run.outcomes:
            lines.append(f"| {run.impl} | run failed (exit {run.returncode}) | | | | |")
            continue
        lines.append(f"| {run.impl} | {len(run.outcomes)} | {run.count('passed')} | "
                     f"{run.count('failed')} | {run.count('error')} | {run.count('skipped')} |")
    return lines


def differences(torch_run: Run, bn_run: Run) -> list[str]:
    """Tests that pass on torch but not on batchnorm; then the reverse; then fail on both."""
    bad = ("failed", "error")
    regressions = [t for t, o in torch_run.outcomes.items()
                   if o == "passed" and bn_run.outcomes.get(t, "missing") != "passed"]
    gains = [t for t, o in bn_run.outcomes.items() if o == "passed"
             and torch_run.outcomes.get(t) in bad]
    both = [t for t, o in torch_run.outcomes.items() if o in bad and bn_run.outcomes.get(t) in bad]
    lines = ["", f"## Pass on torch, fail on batchnorm ({len(regressions)})", ""]
    lines += [f"- `{t}` ({bn_run.outcomes.get(t, 'missing')}): "
              f"{bn_run.messages.get(t) or 'not run'}" for t in sorted(regressions)] or ["none"]
    lines += ["", f"## Pass on batchnorm, fail on torch ({len(gains)})", ""]
    lines += [f"- `{t}`: torch says {torch_run.messages[t]}" for t in sorted(gains)] or ["none"]
    lines += ["", f"## Fail on both ({len(both)})", ""]
    lines += [f"- `{t}`: torch says {torch_run.messages[t]}" for t in sorted(both)] or ["none"]
    return lines


def run_details(runs: list[Run]) -> list[str]:
    """Skip reasons per implementation, and the log tail of any run that wrote no results."""
    lines = []
    for run in runs:
        reasons = Counter(run.messages[t] for t, o in run.outcomes.items() if o == "skipped")
        lines += ["", f"## Skipped on {run.impl} ({sum(reasons.values())}), by reason", ""]
        lines += [f"- {n} x {reason or '(no reason given)'}" for reason, n in
                  reasons.most_common()] or ["none"]
        if not run.outcomes:
            lines += ["", f"## {run.impl}: no results; end of its output", "", "```",
                      run.log_tail, "```"]
    return lines


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so an interrupted run never leaves a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- entry point ----

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True,
                        help="folder with PyTorch's test files and their COMMIT file")
    parser.add_argument("--impl", choices=(*IMPLS, "both"), default="both",
                        help="which implementation to run the tests on (default: both)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"markdown report (default: {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one implementation's pytest run may take (default: 1800)")
    args = parser.parse_args(argv)
    args.tests = args.tests.resolve()
    missing = [p for p in SELECTION if not (args.tests / p).exists()]
    if missing:
        parser.error(f"--tests {args.tests} lacks {', '.join(missing)}: fetch them from "
                     "pytorch/pytorch's test/ folder, keeping the nn/ subfolder")
    read_commits(args.tests)  # fail now, not after the runs, if COMMIT is missing
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    impls = IMPLS if args.impl == "both" else (args.impl,)
    runs = []
    with tempfile.TemporaryDirectory(prefix="torch_suite.") as workdir:
        for impl in impls:
            print(f"running {impl} ...", flush=True)
            runs.append(run_impl(impl, args.tests, Path(workdir), args.timeout))
            print(counts_table(runs)[-1], flush=True)
    lines = header_lines(args.tests, argv, runs) + counts_table(runs)
    if len(runs) == 2:
        lines += differences(*runs)
    lines += run_details(runs)
    write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(run.outcomes for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
