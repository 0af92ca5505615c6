"""The ``batchnorm`` command: ``reproduce`` the experiments on MNIST and rebuild their ``report``.

Exit status: 0 on success, 1 when the data or saved results are missing or corrupt, 2 for a
usage error (unknown experiment, a ``--set`` value of the wrong type or out of range, an
unavailable device, an ``--out`` that cannot be written), 130 when interrupted (finished training
runs are kept; the same command resumes). Usage errors are found before any data is read.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

from batchnorm.experiments import EXPERIMENTS


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<14} {text}" for name, (_, text) in EXPERIMENTS.items())
    parser = argparse.ArgumentParser(
        prog="batchnorm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reproduce the experiments of batch normalization on real MNIST.",
        epilog=f"experiments (batchnorm reproduce NAME, or all):\n{listing}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    reproduce = commands.add_parser(
        "reproduce", help="train, then write results, figures and reports under OUT/EXPERIMENT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"experiments:\n{listing}\n  {'all':<14} every experiment above, in this order")
    reproduce.add_argument("experiment", choices=[*EXPERIMENTS, "all"], metavar="EXPERIMENT",
                           help="one of: " + ", ".join([*EXPERIMENTS, "all"]))
    reproduce.add_argument("--quick", action="store_true",
                           help="fewer training steps (same models and data), for a fast check")
    reproduce.add_argument("--data-dir", metavar="DIR", help="MNIST directory (default: "
                           "$BATCHNORM_DATA, else ~/.cache/batchnorm/mnist; downloaded if absent)")
    reproduce.add_argument("--out", metavar="DIR", default="runs",
                           help="output directory (default: runs)")
    reproduce.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                           help="where to train (default: cpu)")
    reproduce.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    reproduce.add_argument("--set", action="append", default=[], metavar="[EXP.]KEY=VALUE",
                           dest="overrides", help="override a setting (repeatable); the report "
                           "records it")
    reproduce.add_argument("--no-download", action="store_true",
                           help="fail instead of downloading missing MNIST files")
    reproduce.add_argument("--quiet", action="store_true", help="no progress output")
    report = commands.add_parser("report", help="rebuild reports and figures from saved results "
                                 "(no training)")
    report.add_argument("out", metavar="OUT", help="an output directory of `reproduce` (or one "
                        "experiment's directory in it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "reproduce":
            return _reproduce(args, argv if argv is not None else sys.argv[1:])
        return _report(Path(args.out))
    except KeyboardInterrupt:
        print("interrupted: finished training runs are saved; run the same command again to "
              "resume", file=sys.stderr)
        return 130


def _fail(message: str, status: int) -> int:
    print(f"batchnorm: error: {message}", file=sys.stderr)
    return status


def _reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from batchnorm.data import MnistError, MnistNotFoundError, load_mnist
    from batchnorm.experiments import config, report, runner
    from batchnorm.experiments.training import to_tensors

    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    every = {name: importlib.import_module(f"batchnorm.experiments.{module}")
             for name, (module, _) in EXPERIMENTS.items()}
    modules = {name: every[name] for name in names}
    try:
        overrides = config.split_overrides(args.overrides,
                                           {n: m.Config for n, m in every.items()}, names)
        configs = {name: config.resolve(module.Config, module.QUICK if args.quick else None,
                                        overrides[name])
                   for name, module in modules.items()}
        _check_settings(modules, configs)
    except (config.ConfigError, TypeError, ValueError) as error:
        return _fail(str(error), 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch; use --device cpu", 2)
    out = Path(args.out)
    problem = _unwritable(out, names)
    if problem:
        return _fail(problem, 2)
    console = runner.Console(quiet=args.quiet)
    try:
        mnist = load_mnist(args.data_dir, download=not args.no_download, progress=not args.quiet)
    except (MnistError, MnistNotFoundError) as error:
        return _fail(str(error), 1)
    try:  # counts of training images, against the set just loaded
        _check_settings(modules, configs, mnist.n_train)
    except config.ConfigError as error:
        return _fail(str(error), 2)
    console.log(f"MNIST from {mnist.directory}: {mnist.note}")
    device = torch.device(args.device)
    data = to_tensors(mnist, device, args.seed)
    for name, module in modules.items():
        started = time.perf_counter()
        ctx = runner.Context(name, configs[name], mnist, data, device, args.seed, out / name,
                             console)
        console.log(f"[{name}] {module.TITLE}")
        payload = module.run(ctx)
        meta = runner.metadata(ctx, args.quick, overrides[name], "batchnorm " + " ".join(argv))
        runner.finish(ctx, payload, meta, started)
        report.build(ctx.out)
        console.log(f"[{name}] wrote {ctx.out}/results.json, metrics.csv, report.md, report.html")
    _summary(out, console, names)
    return 0


def _check_settings(modules: dict, configs: dict, train_images: int | None = None) -> None:
    """Hold each experiment's settings to its ``LIMITS``, then its ``validate``.

    Args:
        train_images: the loaded training set's size (default None: before loading, counts of
            training images are held to full MNIST's).

    Raises:
        ConfigError: the first setting out of range; the message starts with its experiment.
    """
    from batchnorm.experiments import config

    for name, module in modules.items():
        try:
            config.check(configs[name], module.LIMITS, train_images)
            if hasattr(module, "validate"):
                module.validate(configs[name])
        except ValueError as error:
            raise config.ConfigError(f"{name}: {error}") from None


def _unwritable(out: Path, names: list[str]) -> str | None:
    """Why the outputs of ``names`` cannot be written under ``out``; None when they can.

    Checked before any data is read or network trained, by doing what writing the outputs does:
    create OUT, OUT/EXPERIMENT and OUT/EXPERIMENT/runs and write (then remove) a file in each.
    Only trying tells: permissions do not bind root, and /proc or a read-only mount refuse
    whatever the mode bits say. Directories made only for this check are removed again, so a
    command that fails later (no data, say) leaves nothing behind.
    """
    if out.exists() and not out.is_dir():
        return (f"--out {out} is a file, not a directory; pass --out DIR naming a directory "
                "(it is created if needed)")
    targets = [out, *(out / name for name in names), *(out / name / "runs" for name in names)]
    created: list[Path] = []  # outermost first
    try:
        for directory in targets:
            created += reversed([p for p in (directory, *directory.parents) if not p.exists()])
            directory.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=directory, prefix=".batchnorm-probe-")
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        where = error.filename or directory
        return (f"--out {out}: cannot write to {where} ({error.strerror or error}); pass --out "
                "DIR naming a directory you can create and write to")
    finally:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:  # not made (the check failed first) or no longer empty
                pass
    return None


def _report(out: Path) -> int:
    from batchnorm.experiments import report, runner

    directories = [out] if (out / "results.json").is_file() else sorted(
        path.parent for path in out.glob("*/results.json"))
    if not directories:
        return _fail(f"no results.json in {out} or its subdirectories: run `batchnorm reproduce "
                     f"EXPERIMENT --out {out}` first", 1)
    try:
        for directory in directories:
            report.build(directory)
    except (ValueError, FileNotFoundError, KeyError) as error:
        return _fail(f"cannot rebuild the report from {directory}: {error}", 1)
    root = out if len(directories) > 1 or directories[0] != out else out.parent
    _summary(root, runner.Console(), [d.name for d in directories])
    return 0


def _summary(root: Path, console, names: list[str]) -> None:
    """Print the summary table of ``names`` and write ``root/summary.md`` over all results."""
    from batchnorm.experiments import summary

    rows = summary.rows(root)
    summary.show([row for row in rows if row["name"] in names], console)
    summary.write(root, rows)


if __name__ == "__main__":
    sys.exit(main())
