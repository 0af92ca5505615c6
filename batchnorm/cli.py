"""The ``batchnorm`` command: ``reproduce`` the experiments on MNIST and rebuild their ``report``.

Exit status: 0 on success, 1 when the data or saved results are missing or corrupt, 2 for a
usage error (unknown experiment, bad ``--set``, an unavailable device), 130 when interrupted
(finished training runs are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
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
        for name, module in modules.items():
            if hasattr(module, "validate"):
                module.validate(configs[name])
    except (config.ConfigError, TypeError, ValueError) as error:
        return _fail(str(error), 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch; use --device cpu", 2)
    console = runner.Console(quiet=args.quiet)
    try:
        mnist = load_mnist(args.data_dir, download=not args.no_download, progress=not args.quiet)
    except (MnistError, MnistNotFoundError) as error:
        return _fail(str(error), 1)
    console.log(f"MNIST from {mnist.directory}: {mnist.note}")
    device = torch.device(args.device)
    data = to_tensors(mnist, device, args.seed)
    out = Path(args.out)
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
