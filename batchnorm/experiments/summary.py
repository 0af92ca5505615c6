"""The summary of ``batchnorm reproduce``: one row per experiment, printed and in summary.md."""

from __future__ import annotations

from pathlib import Path

from batchnorm.experiments import EXPERIMENTS
from batchnorm.experiments.report import experiment_module, read_json, write_text

# "training s" sums every run's own time, resumed ones included; "wall s" is the last command's.
HEADER = ["experiment", "ours", "published", "runs (new/resumed)", "training s",
          "wall s (last command)"]


def rows(root: Path) -> list[dict]:
    """A row per experiment directory under ``root`` that holds a results.json.

    Each row has ``name``, ``cells`` (the table's cells, in :data:`HEADER` order) and ``note``
    (the dataset's size).
    """
    found = []
    for name in EXPERIMENTS:
        path = root / name / "results.json"
        if not path.is_file():
            continue
        try:
            results = read_json(path)
            ours, published = experiment_module(name).headline(results)
            runs = results["training_runs"]
            label = name + (" (--quick)" if results["quick"] else "")
            cells = [label, ours, published, f"{runs['ran']}/{runs['resumed']}",
                     f"{results['train_seconds']:.1f}", f"{results['wall_seconds']:.1f}"]
            note = results["dataset"]["note"]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            # Results of another version or a damaged file: say so instead of failing.
            cells = [name, f"unreadable results.json ({type(error).__name__}: {error}); run "
                     "this experiment again", "", "", "", ""]
            note = ""
        found.append({"name": name, "note": note, "cells": cells})
    return found


def show(table: list[dict], console) -> None:
    """Print the rows as a table (rich when installed, else plain lines)."""
    if not table or console.quiet:
        return
    try:
        from rich.table import Table
    except ImportError:
        for row in [{"cells": HEADER}, *table]:
            console.log(" | ".join(row["cells"]))
        return
    view = Table(title="batchnorm reproduce", caption=table[0]["note"])
    for column in HEADER:
        view.add_column(column)
    for row in table:
        view.add_row(*row["cells"])
    console.show(view)


def write(root: Path, table: list[dict]) -> None:
    """Write ``root/summary.md`` (skipped when there is nothing to summarize)."""
    if not table:
        return
    lines = ["# batchnorm reproduce: summary", "", table[0]["note"] + ".", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row["cells"]) + " |" for row in table]
    write_text(root / "summary.md", "\n".join(lines) + "\n")
