"""Reports from saved results: metrics.csv, PNG figures, report.md and a self-contained report.html.

Everything here reads ``results.json`` only, so ``batchnorm report OUT`` rebuilds the same files
without training, and every number in a report is formatted from the value in results.json.
All files are written atomically (a temporary file in the same directory, then a rename), so an
interrupted command never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import base64
import csv
import html
import importlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        # mkstemp creates the file private (0600); give it the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=False, allow_nan=False) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (results are written without NaN or Infinity)")


def read_json(path: Path):
    """The value in the JSON file ``path``, read as strictly as :func:`write_json` writes.

    NaN and Infinity are refused: :func:`write_json` never writes them, so a file holding one
    was not written by this package (or was damaged), and a NaN would pass every later check.

    Raises:
        OSError: the file cannot be read. ValueError: it is not UTF-8 or not strict JSON.
    """
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)


def json_kind(value) -> str:
    """The JSON name of a parsed value's type, for error messages.

    >>> json_kind([1, 2]), json_kind(None), json_kind({})
    ('an array', 'null', 'an object')
    """
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"),
             ((int, float), "a number"))
    return next(name for kind, name in kinds if isinstance(value, kind))


@dataclass
class Table:
    """A table of preformatted cells; ``caption`` is a sentence under it."""

    header: list
    rows: list
    caption: str = ""


@dataclass
class Section:
    """A report section: paragraphs, then tables, then figures (PNG file names)."""

    title: str
    paragraphs: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)


def fmt(value, digits: int = 4) -> str:
    """A number as the reports show it ("—" for None, "diverged" for NaN)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", "\u2009") if abs(value) >= 10_000 else str(value)
    if value != value:
        return "diverged"
    return f"{value:.{digits}f}"


def setup_section(results: dict) -> Section:
    """Machine, versions, seed, dataset and resolved configuration of a run."""
    data, mach, ver = results["dataset"], results["machine"], results["versions"]
    runs = results["training_runs"]
    paragraphs = [
        f"Data: {data['note']}, read from `{data['path']}`; published MD5 checked for: "
        + (", ".join(data["md5_verified"]) or "none (no file had the original's size)") + ".",
        f"Machine: {mach['platform']}; {mach['cpu']}; {mach['cores']} cores, "
        f"{mach['torch_threads']} torch threads; device `{results['device']}`"
        + (f" ({mach['cuda_device']})" if mach.get("cuda_device") else "") + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        f"Seed {results['seed']}; " + ("`--quick` (shortened) settings; " if results["quick"]
                                       else "default settings; ")
        + (f"overrides {results['overrides']}; " if results["overrides"] else "")
        + f"wall time {results['wall_seconds']:.1f} s for this invocation, "
        f"{results['train_seconds']:.1f} s of training over {runs['ran'] + runs['resumed']} "
        f"runs ({runs['resumed']} resumed from earlier invocations).",
        f"Command: `{results['command']}`",
    ]
    rows = [[f"`{key}`", f"`{json.dumps(value)}`"] for key, value in results["config"].items()]
    return Section("Setup", paragraphs, [Table(["setting", "value"], rows)])


def _markdown_table(table: Table) -> str:
    def cells(row) -> str:  # a literal | would end the cell
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"

    lines = [cells(table.header), "|" + "|".join(" --- " for _ in table.header) + "|"]
    lines += [cells(row) for row in table.rows]
    return "\n".join(lines) + (f"\n\n{table.caption}" if table.caption else "")


def to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += section.paragraphs
        parts += [_markdown_table(table) for table in section.tables]
        parts += [f"![{name}]({name})" for name in section.figures]
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escape for HTML and turn `code` spans into <code>."""
    pieces = html.escape(str(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
          "padding:.25em .6em;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
          "code{background:#f6f6f6;padding:0 .2em}")


def to_html(title: str, sections: list[Section], directory: Path) -> str:
    """A self-contained page: the figures are embedded as base64 PNG data."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
        for table in section.tables:
            head = "".join(f"<th>{_inline(c)}</th>" for c in table.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                           for row in table.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            if table.caption:
                parts.append(f"<p>{_inline(table.caption)}</p>")
        for name in section.figures:
            data = base64.b64encode((directory / name).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(name)}' "
                         f"src='data:image/png;base64,{data}'></figure>")
    return "".join(parts) + "</body></html>\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, stream.getvalue())


def save_figure(figure, path: Path) -> str:
    """Save a matplotlib figure as PNG atomically, close it, and return the file name."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
    return path.name


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported only when drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def build(directory: str | os.PathLike) -> dict:
    """Rebuild metrics.csv, the figures, report.md and report.html of one experiment directory.

    Returns:
        The experiment's results (as read from ``results.json``).
    """
    directory = Path(directory)
    path = directory / "results.json"
    try:
        results = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run `batchnorm reproduce` with this --out "
                                "first (reports are built from saved results)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError and NaN are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({error}); run the experiment again") from None
    if not isinstance(results, dict) or not isinstance(results.get("experiment"), str):
        raise ValueError(f"{path} holds {json_kind(results)}, not the results of an experiment "
                         "(a JSON object with its \"experiment\" name); run the experiment again")
    try:
        module = experiment_module(results["experiment"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}; run the experiment again") from None
    try:
        write_csv(directory / "metrics.csv", module.metrics(results))
        figures = module.figures(results, directory)
        sections = module.sections(results, figures) + [setup_section(results)]
    except (KeyError, TypeError, IndexError) as error:  # a damaged file, or another version's
        raise ValueError(f"{path} does not hold the results this version writes "
                         f"({type(error).__name__}: {error}); run the experiment again") from error
    title = f"{module.TITLE} ({results['experiment']})"
    write_text(directory / "report.md", to_markdown(title, sections))
    write_text(directory / "report.html", to_html(title, sections, directory))
    return results


def experiment_module(name: str):
    from batchnorm.experiments import EXPERIMENTS

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r} in results.json; known: {list(EXPERIMENTS)}")
    return importlib.import_module(f"batchnorm.experiments.{EXPERIMENTS[name][0]}")
