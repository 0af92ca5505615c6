"""The batchnorm CLI end to end, through its real parser, on tiny generated MNIST files."""

import csv
import importlib
import json
import math
import os
import re
import shutil
import typing
from pathlib import Path

import pytest
from test_data import write_mnist

from batchnorm import cli, data
from batchnorm.experiments import EXPERIMENTS, config, runner
from batchnorm.experiments import training as training_module

# Shrinks every experiment further than --quick so that the whole file runs in seconds.
TINY = ["--set", "mnist.steps=20", "--set", "mnist.eval_every=10",
        "--set", "init-scale.stds=1,0.01", "--set", "init-scale.epochs=2",
        "--set", "init-scale.train_size=100",
        "--set", "learning-rate.steps=10", "--set", "learning-rate.eval_every=5",
        "--set", "learning-rate.channels=4,8",
        "--set", "batch-size.sizes=2,8", "--set", "batch-size.group_sizes=2,8",
        "--set", "batch-size.noise_sizes=2,8",
        "--set", "batch-size.noise_batches=20", "--set", "batch-size.epochs=1",
        "--set", "inference.steps=20"]
NOTE = "training set: 200 images (full MNIST has 60,000)"


def reproduce(data_dir: Path, out: Path, *extra: str, experiment: str = "all") -> int:
    return cli.main(["reproduce", experiment, "--quick", "--quiet", "--data-dir", str(data_dir),
                     "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every experiment run once on 200 training and 100 test images."""
    root = tmp_path_factory.mktemp("cli")
    write_mnist(root / "data", 200, 100)
    status = reproduce(root / "data", root / "out")
    return status, root


def results(out: Path, name: str) -> dict:
    return json.loads((out / name / "results.json").read_text())


def tables(markdown: str) -> list[list[list[str]]]:
    """The markdown tables of a report, each a list of rows of cells (header row included)."""
    found, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("| ---"):
            continue
        if line.startswith("| "):
            current.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif current:
            found.append(current)
            current = []
    return found


def table_rows(markdown: str) -> list[list[str]]:
    """The rows of every table of a report."""
    return [row for table in tables(markdown) for row in table]


def test_help_lists_every_experiment(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in [*EXPERIMENTS, "all"]:
        assert name in text


def test_quick_changes_only_step_counts():
    import importlib

    for module_name, _ in EXPERIMENTS.values():
        module = importlib.import_module(f"batchnorm.experiments.{module_name}")
        assert set(module.QUICK) <= {"steps", "eval_every", "epochs", "noise_batches"}


def test_every_experiment_writes_its_files(finished):
    status, root = finished
    assert status == 0
    out = root / "out"
    for name in EXPERIMENTS:
        folder = out / name
        for file in ("results.json", "metrics.csv", "report.md", "report.html"):
            assert (folder / file).is_file(), (name, file)
        pngs = sorted(path.name for path in folder.glob("*.png"))
        assert pngs, name
        assert list((folder / "runs").glob("*.json")), name
        report, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
        for png in pngs:
            assert f"]({png})" in report
        sources = re.findall(r"src='([^']*)'", page)  # self-contained: every image inline
        assert len(sources) == len(pngs)
        assert all(s.startswith("data:image/png;base64,") for s in sources)
        saved = results(out, name)
        assert saved["experiment"] == name and saved["seed"] == 0 and saved["quick"] is True
        for key in ("config", "versions", "machine", "dataset", "published"):
            assert saved[key], (name, key)
        assert set(saved["versions"]) == {"python", "torch", "numpy", "batchnorm"}
        assert saved["dataset"]["n_train"] == 200 and saved["dataset"]["n_test"] == 100
        for text in (report, page, json.dumps(saved)):
            assert NOTE in text, name
    assert NOTE in (out / "summary.md").read_text()
    assert all(f"| {name} (--quick) |" in (out / "summary.md").read_text() for name in EXPERIMENTS)


def test_overrides_are_recorded_in_the_configuration(finished):
    out = finished[1] / "out"
    assert results(out, "mnist")["config"]["steps"] == 20
    assert results(out, "init-scale")["config"]["stds"] == [1.0, 0.01]
    assert results(out, "learning-rate")["config"]["channels"] == [4, 8]
    assert results(out, "mnist")["overrides"] == {"steps": "20", "eval_every": "10"}


def test_mnist_report_numbers_equal_results(finished):
    out = finished[1] / "out"
    saved = results(out, "mnist")
    final = saved["final_test_accuracy"]
    (row,) = [r for r in table_rows((out / "mnist" / "report.md").read_text())
              if r[0].endswith("(final)")]
    assert float(row[1]) == round(final["plain"], 4) and float(row[3]) == round(final["bn"], 4)
    assert set(saved["curves"]) == set(saved["percentiles"]) == {"bn", "plain"}
    assert saved["curves"]["bn"]["step"] == [0, 10, 20]
    assert final["bn"] == saved["curves"]["bn"]["test_accuracy"][-1]
    with open(out / "mnist" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["network"] == "plain"]
    assert [float(r["test_accuracy"]) for r in rows] == saved["curves"]["plain"]["test_accuracy"]
    assert [float(r["p50"]) for r in rows] == saved["percentiles"]["plain"]["p50"]


def test_other_reports_equal_results(finished):
    out = finished[1] / "out"
    rows = table_rows((out / "init-scale" / "report.md").read_text())
    for panel in results(out, "init-scale")["panels"]:
        (row,) = [r for r in rows if r[0] == f"{panel['std']:.3g}"]
        assert (float(row[1]), float(row[2])) == (round(panel["bn"], 3), round(panel["plain"], 3))
    ours = tables((out / "learning-rate" / "report.md").read_text())[0]  # then the paper's
    rows = {r[0]: r for r in ours}
    for run in results(out, "learning-rate")["networks"]:
        assert float(rows[run["label"]][4]) == round(run["best_test_accuracy"], 4)
    saved = results(out, "batch-size")
    (ours,) = [t for t in tables((out / "batch-size" / "report.md").read_text())
               if t[0][0] == "examples per batch m"]
    rows = {r[0]: r for r in ours[1:]}
    for run in saved["accuracy"]:
        column = 1 + saved["config"]["norms"].index(run["norm"])
        assert float(rows[str(run["batch_size"])][column]) == round(run["test_accuracy"], 4)
    saved = results(out, "inference")
    text = (out / "inference" / "report.md").read_text()
    for mode, prefix in (("ema", "(a)"), ("population", "(b) Algorithm 2"), ("batch", "(c)")):
        (row,) = [r for r in table_rows(text) if r[0].startswith(prefix)]
        assert float(row[1]) == round(saved["test_accuracy"][mode], 4)


def test_small_batch_table_equals_results(finished):
    out = finished[1] / "out"
    saved = results(out, "batch-size")
    small = saved["small_batch"]
    assert small["train_batch"] == 32 and small["norms"] == ["ghost", "renorm"]
    assert [row["m"] for row in small["table"]] == [2, 8]
    runs = {(r["norm"], r["batch_size"]): r for r in small["runs"]}
    same = {(r["norm"], r["batch_size"]): r for r in saved["accuracy"]}
    (table,) = [t for t in tables((out / "batch-size" / "report.md").read_text())
                if t[0][0] == "examples per normalization batch m"]
    assert len(table) == 1 + len(small["table"])
    for row, cells in zip(small["table"], table[1:], strict=True):
        m = row["m"]
        assert cells[0] == str(m)
        for column, norm in enumerate(small["norms"], 1):
            run = runs[(norm, m)]
            assert row[norm] == run["test_accuracy"]
            assert float(cells[column]) == round(row[norm], 4)
            # m examples per normalization batch, 32 per step: groups of m in every batch.
            assert run["train_batch"] == 32 and run["options"]["virtual_batch_size"] == m
        assert row["bn_batch_of_m"] == same[("bn", m)]["test_accuracy"]
        assert float(cells[3]) == round(row["bn_batch_of_m"], 4)
        assert cells[4] == cells[5] == "—"  # the paper reports m = 4 and 32 only
    with open(out / "batch-size" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["panel"] == "small_batch"]
    assert {(r["norm"], int(r["m"])): float(r["test_accuracy"]) for r in rows} == {
        key: run["test_accuracy"] for key, run in runs.items()}
    assert (out / "batch-size" / "small_batch.png").is_file()


def _stored_specs(folder: Path) -> dict:
    return {json.loads(path.read_text())["identity"]["label"]:
            json.loads(path.read_text())["identity"]["spec"] for path in folder.glob("*.json")}


def test_resume_key_holds_each_runs_settings(tmp_path):
    write_mnist(tmp_path / "data", 200, 100)
    assert reproduce(tmp_path / "data", tmp_path / "out", experiment="batch-size") == 0
    specs = _stored_specs(tmp_path / "out" / "batch-size" / "runs")
    ramp = specs["renorm-m2-in32"]["options"]["r_max"]["ramp"]
    assert (ramp["start"], ramp["end"]) == (1.0, 3.0) and ramp["stop"] > ramp["begin"]
    assert specs["ghost-m8-in32"]["options"]["virtual_batch_size"] == 8
    assert specs["bn-m2"]["train_batch"] == 2 and specs["bn-m2"]["options"] == {}
    # Another Batch Renorm bound retrains the Batch Renorm runs only.
    assert reproduce(tmp_path / "data", tmp_path / "out", "--set", "batch-size.renorm_r_max=2",
                     experiment="batch-size") == 0
    counts = results(tmp_path / "out", "batch-size")["training_runs"]
    assert (counts["ran"], counts["resumed"]) == (2, 1 + 4 + 2)
    specs = _stored_specs(tmp_path / "out" / "batch-size" / "runs")
    assert specs["renorm-m2-in32"]["options"]["r_max"]["ramp"]["end"] == 2.0


def test_ghost_bn_over_the_whole_batch_is_bn(tmp_path):
    """With groups as large as the batch, Ghost BN is batch norm: the same run, bit for bit."""
    write_mnist(tmp_path / "data", 200, 100)
    assert reproduce(tmp_path / "data", tmp_path / "out", "--set", "batch-size.sizes=8",
                     "--set", "batch-size.group_sizes=8", "--set", "batch-size.group_batch=8",
                     "--set", "batch-size.epochs=2", experiment="batch-size") == 0
    saved = results(tmp_path / "out", "batch-size")
    (bn,) = [r for r in saved["accuracy"] if r["norm"] == "bn"]
    (ghost,) = [r for r in saved["small_batch"]["runs"] if r["norm"] == "ghost"]
    assert ghost["options"] == {"virtual_batch_size": 8, "momentum": 0.1}
    assert (ghost["steps"], ghost["lr"]) == (bn["steps"], bn["lr"]) == (50, 0.025)
    assert ghost["test_accuracy"] == bn["test_accuracy"]


def test_restart_resumes_finished_runs(tmp_path):
    write_mnist(tmp_path / "data", 200, 100)
    assert reproduce(tmp_path / "data", tmp_path / "out", experiment="mnist") == 0
    runs = sorted((tmp_path / "out" / "mnist" / "runs").glob("*.json"))
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in runs}
    runs[0].unlink()  # as if interrupted before that run finished
    assert reproduce(tmp_path / "data", tmp_path / "out", experiment="mnist") == 0
    assert results(tmp_path / "out", "mnist")["training_runs"]["ran"] == 1
    assert results(tmp_path / "out", "mnist")["training_runs"]["resumed"] == 1
    for path in runs[1:]:
        assert (path.stat().st_mtime_ns, path.read_bytes()) == before[path]
    # Another seed is another run: nothing is reused.
    assert reproduce(tmp_path / "data", tmp_path / "out", "--seed", "1",
                     experiment="mnist") == 0
    counts = results(tmp_path / "out", "mnist")["training_runs"]
    assert (counts["ran"], counts["resumed"]) == (2, 0)


def test_report_rebuilds_without_training(finished, monkeypatch):
    out = finished[1] / "out"
    expected = (out / "init-scale" / "report.md").read_text()
    for name in ("report.md", "report.html", "metrics.csv", "init_scale.png"):
        (out / "init-scale" / name).unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("report must not train")

    monkeypatch.setattr(training_module, "train", no_training)
    assert cli.main(["report", str(out)]) == 0
    assert (out / "init-scale" / "report.md").read_text() == expected
    assert (out / "init-scale" / "init_scale.png").is_file()


def test_report_without_results_fails_clearly(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_missing_files_offline_fail_with_where_to_put_them(tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "urlopen", offline)
    assert reproduce(tmp_path / "empty", tmp_path / "out", experiment="mnist") == 1
    err = capsys.readouterr().err
    assert "Put the four files" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["reproduce", "mnist", "--no-download", "--data-dir",
                     str(tmp_path / "empty")]) == 1
    assert "train-images-idx3-ubyte.gz is missing" in capsys.readouterr().err


# name -> (file to damage, how, words the error must contain)
BAD_DATA = {
    "truncated gzip": ("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2],
                       ["train-images-idx3-ubyte.gz", "truncated"]),
    "wrong magic": ("t10k-labels-idx1-ubyte.gz", lambda b: __import__("gzip").compress(
        b"\0\0\x08\x03" + __import__("gzip").decompress(b)[4:]), ["magic number 2051"]),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_corrupt_files_fail_naming_the_file(tmp_path, capsys, case):
    name, damage, words = BAD_DATA[case]
    write_mnist(tmp_path / "data", 20, 10)
    path = tmp_path / "data" / name
    path.write_bytes(damage(path.read_bytes()))
    assert reproduce(tmp_path / "data", tmp_path / "out", experiment="mnist") == 1
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


# name -> (arguments, words the error must contain)
USAGE_ERRORS = {
    "unknown key": (["--set", "stepz=3"], ["unknown key 'stepz'", "mnist.steps"]),
    "wrong type": (["--set", "steps=many"], ["steps: expected int", "'many'"]),
    "no equals": (["--set", "steps"], ["expected KEY=VALUE"]),
    "unknown experiment": (["--set", "imagenet.steps=3"], ["unknown experiment 'imagenet'"]),
    "key of another experiment": (["--set", "inference.stds=1"], ["unknown key 'stds'",
                                                                  "inference.steps"]),
}


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=list(USAGE_ERRORS))
def test_bad_settings_are_usage_errors(tmp_path, capsys, case):
    arguments, words = USAGE_ERRORS[case]
    status = cli.main(["reproduce", "mnist", "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert status == 2 and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


# name -> (batch-size settings, words the error must contain)
BATCH_SIZE_ERRORS = {
    "group larger than the batch": (["group_sizes=4,64"],
                                    ["ghost at m=64", "trains on batches of 32"]),
    "unknown group norm": (["group_norms=ghost,layer"], ["unknown ['layer']", "renorm"]),
    "one example per group": (["group_sizes=1,2"], ["group_sizes must be a non-empty list of "
                                                    "values >= 2", "one example has no variance"]),
    "renorm ramp out of order": (["renorm_begin=0.5"], ["renorm_begin < renorm_d_stop"]),
    "momentum out of range": (["group_momentum_per_step=0"], ["group_momentum_per_step must"]),
}


@pytest.mark.parametrize("case", BATCH_SIZE_ERRORS, ids=list(BATCH_SIZE_ERRORS))
def test_bad_small_batch_settings_are_usage_errors(tmp_path, capsys, case):
    settings, words = BATCH_SIZE_ERRORS[case]
    arguments = [part for setting in settings for part in ("--set", f"batch-size.{setting}")]
    status = cli.main(["reproduce", "batch-size", "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert status == 2 and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def one_line_error(err: str) -> str:
    """The CLI's error, checked to be one line and no traceback."""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the command reads the data (usage errors come first)."""
    def load_mnist(*args, **kwargs):
        raise AssertionError("the data was read before the usage error")

    monkeypatch.setattr(data, "load_mnist", load_mnist)


MODULES = {name: importlib.import_module(f"batchnorm.experiments.{module}")
           for name, (module, _) in EXPERIMENTS.items()}

# name -> (experiment, settings separated by spaces, words the error must contain): the values
# that crashed after loading the data, or ran nothing and exited 0, before settings had ranges.
SETTING_RANGE_ERRORS = {
    "no readings": ("mnist", "eval_every=0", ["mnist: eval_every must be >= 1", "got 0"]),
    "negative readings": ("mnist", "eval_every=-1", ["eval_every must be >= 1", "got -1"]),
    "no hidden layers": ("mnist", "hidden=", ["hidden must be a non-empty list of values >= 1",
                                              "got an empty list"]),
    "empty hidden layer": ("mnist", "hidden=100,0", ["hidden must be", ">= 1", "got 100,0"]),
    "unit past the layer": ("mnist", "unit=1000", ["unit must be in [0, 99]", "which has 100",
                                                   "got 1000"]),
    "unit past a narrower layer": ("mnist", "hidden=100,10 unit=10", ["unit must be in [0, 9]",
                                                                      "got 10"]),
    "empty batch": ("mnist", "batch_size=0", ["batch_size must be in [2, 60000]",
                                              "MNIST's 60,000 training images", "got 0"]),
    "batch of one": ("inference", "batch_size=1", ["batch statistics need 2 examples"]),
    "huge batch": ("mnist", "batch_size=1000000000", ["batch_size must be in [2, 60000]"]),
    "batch in float notation": ("mnist", "batch_size=1e9", ["batch_size: expected int"]),
    "nan learning rate": ("mnist", "lr=nan", ["lr must be finite and > 0", "got nan"]),
    "infinite learning rate": ("mnist", "lr=inf", ["lr must be finite and > 0", "got inf"]),
    "negative steps": ("mnist", "steps=-5", ["steps must be >= 1", "got -5"]),
    "no steps": ("learning-rate", "steps=0", ["learning-rate: steps must be >= 1"]),
    "five pooling blocks": ("learning-rate", "channels=4,4,4,4,4",
                            ["channels must be a list of 1 to 4 values >= 1"]),
    "unreachable target": ("learning-rate", "target_accuracy=1.5",
                           ["target_accuracy must be in (0, 1]"]),
    "momentum of one": ("learning-rate", "momentum=1", ["momentum must be in [0, 1)"]),
    "frozen moving averages": ("inference", "momentum=0", ["momentum must be in (0, 1]"]),
    "batch beyond its images": ("init-scale", "train_size=100 batch_size=500",
                                ["batch_size must be at most train_size", "train_size=100"]),
    "zero weight scale": ("init-scale", "stds=1,0", ["stds must be a non-empty list of finite "
                                                     "values > 0", "got 1.0,0.0"]),
    "single noise batch": ("batch-size", "noise_batches=1", ["a spread needs 2 batches"]),
}


@pytest.mark.parametrize("case", SETTING_RANGE_ERRORS, ids=list(SETTING_RANGE_ERRORS))
def test_settings_out_of_range_are_usage_errors(tmp_path, capsys, no_data, case):
    experiment, settings, words = SETTING_RANGE_ERRORS[case]
    arguments = [part for setting in settings.split(" ")
                 for part in ("--set", f"{experiment}.{setting}")]
    status = cli.main(["reproduce", experiment, "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "out"), *arguments])
    err = one_line_error(capsys.readouterr().err)
    assert status == 2 and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def _outside(limit: config.Limit, kind: type, many: bool) -> list[str]:
    """``--set`` texts just outside ``limit`` (for a field of element type ``kind``)."""
    step = 1 if kind is int else 0.5
    scalars = []
    if kind in (int, float):
        if limit.low is not None:
            scalars.append(limit.low if limit.open_low else limit.low - step)
        if limit.high is not None:
            scalars.append(limit.high if limit.open_high else limit.high + step)
    if kind is float:
        scalars += [math.nan, math.inf]
    texts = [str(value) for value in scalars]
    if many:
        fewest, most = limit.items
        valid = "x" if kind is str else str(limit.low + (step if limit.open_low else 0))
        if fewest >= 1:
            texts.append("")
        if most is not None:
            texts.append(",".join([valid] * (most + 1)))
    return texts


def _every_setting():
    for name, module in MODULES.items():
        hints = typing.get_type_hints(module.Config)
        for key, limit in module.LIMITS.items():
            kind, many = config.element_type(hints[key])
            for text in _outside(limit, kind, many):
                yield pytest.param(name, key, text, id=f"{name}.{key}={text}")


def test_every_setting_has_a_limit_and_the_defaults_keep_them():
    for module in MODULES.values():
        for quick in (None, module.QUICK):
            cfg = config.resolve(module.Config, quick)
            config.check(cfg, module.LIMITS)  # also: LIMITS names every field (else TypeError)
            if hasattr(module, "validate"):
                module.validate(cfg)


@pytest.mark.parametrize(("name", "key", "text"), list(_every_setting()))
def test_every_setting_is_range_checked(tmp_path, capsys, no_data, name, key, text):
    status = cli.main(["reproduce", name, "--data-dir", str(tmp_path), "--out",
                       str(tmp_path / "out"), "--set", f"{name}.{key}={text}"])
    err = one_line_error(capsys.readouterr().err)
    assert status == 2 and f"{name}: {key} must be" in err, err


def test_bounds_themselves_are_allowed():
    for name, module in MODULES.items():
        hints = typing.get_type_hints(module.Config)
        for key, limit in module.LIMITS.items():
            kind, many = config.element_type(hints[key])
            if kind not in (int, float):
                continue
            bounds = [limit.low if not limit.open_low else None,
                      limit.high if not limit.open_high else None]
            for bound in [b for b in bounds if b is not None]:
                value = kind(bound)
                assert limit.admits((value,) if many else value, hints[key]), (name, key, bound)


def test_batches_larger_than_the_loaded_training_set_fail_before_training(tmp_path, capsys,
                                                                           monkeypatch):
    write_mnist(tmp_path / "data", 20, 10)

    def no_training(*args, **kwargs):
        raise AssertionError("trained with settings that do not fit the data")

    monkeypatch.setattr(training_module, "train", no_training)
    status = reproduce(tmp_path / "data", tmp_path / "out", "--set", "mnist.batch_size=50",
                       experiment="mnist")
    err = one_line_error(capsys.readouterr().err)
    assert status == 2, err
    assert "mnist: batch_size must be in [2, 20] (batch statistics need 2 examples; at most " \
           "the training set's 20 images), got 50" in err
    assert not (tmp_path / "out").exists()


def _unusable_out(tmp_path: Path) -> dict:
    """name -> (an --out that cannot be written, words the error must contain)."""
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mnist").write_text("a file where the experiment's directory goes")
    in_the_way = tmp_path / "taken" / "mnist"
    cases = {"existing file": (tmp_path / "file", ["is a file, not a directory"]),
             "below a file": (tmp_path / "file" / "out", ["cannot write to", "Not a directory"]),
             "experiment directory is a file": (tmp_path / "taken",
                                                [f"cannot write to {in_the_way}"])}
    if Path("/proc/self").is_dir():
        cases["under /proc"] = (Path("/proc/batchnorm-out"), ["cannot write to"])
    return cases


@pytest.mark.parametrize("case", ["existing file", "below a file",
                                  "experiment directory is a file", "under /proc"])
def test_unusable_out_fails_before_reading_data(tmp_path, capsys, no_data, case):
    cases = _unusable_out(tmp_path)
    if case not in cases:
        pytest.skip("no /proc on this system")
    out, words = cases[case]
    status = cli.main(["reproduce", "mnist", "--quiet", "--data-dir", str(tmp_path / "data"),
                       "--out", str(out)])
    err = one_line_error(capsys.readouterr().err)
    assert status == 2 and f"--out {out}" in err and "pass --out DIR" in err, err
    assert all(word in err for word in words), err


def test_read_only_out_fails_before_reading_data(tmp_path, capsys, no_data):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("permission bits do not bind this user (root): the directory is writable")
        status = cli.main(["reproduce", "mnist", "--quiet", "--out", str(out)])
        err = one_line_error(capsys.readouterr().err)
        assert status == 2 and f"cannot write to {out / 'mnist'}" in err, err
        assert "Permission denied" in err
    finally:
        out.chmod(0o755)


@pytest.fixture(scope="module")
def trained_mnist(tmp_path_factory):
    """The mnist experiment run once (tiny): its data directory and its output directory."""
    root = tmp_path_factory.mktemp("resume")
    write_mnist(root / "data", 200, 100)
    assert reproduce(root / "data", root / "out", experiment="mnist") == 0
    return root / "data", root / "out"


def _without(key: str):
    def damage(stored: dict) -> str:
        del stored[key]
        return json.dumps(stored)

    return damage


def _with(key: str, value, text: str | None = None):
    def damage(stored: dict) -> str:
        stored[key] = value
        return text or json.dumps(stored)

    return damage


# name -> (the damaged run file's text from the stored object, words the warning must contain)
CORRUPT_RUNS = {
    "an array": (lambda stored: "[1, 2]", ["holds an array, expected an object"]),
    "null": (lambda stored: "null", ["holds null"]),
    "no seconds": (_without("seconds"), ['"seconds" is missing']),
    "seconds as text": (_with("seconds", "12"), ['"seconds" is a string']),
    "NaN seconds": (lambda stored: json.dumps(stored).replace(
        f'"seconds": {json.dumps(stored["seconds"])}', '"seconds": NaN'), ["unreadable", "NaN"]),
    "no result": (_without("result"), ['"result" is missing']),
    "another identity": (lambda stored: json.dumps({**stored, "identity": {"seed": 7}}),
                         ['"identity" is not the one']),
    "cut short": (lambda stored: json.dumps(stored)[:40], ["unreadable"]),
}


@pytest.mark.parametrize("case", CORRUPT_RUNS, ids=list(CORRUPT_RUNS))
def test_corrupt_run_file_is_retrained_with_a_warning(tmp_path, capsys, trained_mnist, case):
    damage, words = CORRUPT_RUNS[case]
    data_dir, trained = trained_mnist
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    runs = sorted((out / "mnist" / "runs").glob("*.json"))
    runs[0].write_text(damage(json.loads(runs[0].read_text())))
    capsys.readouterr()
    assert reproduce(data_dir, out, experiment="mnist") == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert str(runs[0]) in warning and "training this run again" in warning, warning
    assert all(word in warning for word in words), warning
    counts = results(out, "mnist")["training_runs"]
    assert (counts["ran"], counts["resumed"]) == (1, 1)
    identity = json.loads((trained / "mnist" / "runs" / runs[0].name).read_text())["identity"]
    assert runner.stored_run_problem(json.loads(runs[0].read_text()), identity) is None


# name -> (text of results.json, words the error must contain)
CORRUPT_RESULTS = {
    "an array": ("[]", ["holds an array, not the results of an experiment"]),
    "null": ("null", ["holds null"]),
    "NaN": ("NaN", ["is not valid JSON", "NaN is not JSON"]),
    "no experiment": ('{"steps": 3}', ["holds an object, not the results of an experiment"]),
    "unknown experiment": ('{"experiment": "imagenet"}', ["unknown experiment 'imagenet'"]),
    "missing numbers": ('{"experiment": "mnist"}', ["does not hold the results this version "
                                                    "writes (KeyError: 'curves')"]),
    "not JSON": ("{", ["is not valid JSON"]),
}


@pytest.mark.parametrize("case", CORRUPT_RESULTS, ids=list(CORRUPT_RESULTS))
def test_report_on_corrupt_results_names_the_file(tmp_path, capsys, case):
    text, words = CORRUPT_RESULTS[case]
    path = tmp_path / "mnist" / "results.json"
    path.parent.mkdir()
    path.write_text(text)
    assert cli.main(["report", str(path.parent)]) == 1
    err = one_line_error(capsys.readouterr().err)
    assert str(path) in err and all(word in err for word in words), err


def test_unknown_experiment_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "imagenet"])
    assert exit_.value.code == 2
    assert re.search(r"invalid choice: 'imagenet'", capsys.readouterr().err)


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path cannot be reached")
    assert cli.main(["reproduce", "mnist", "--device", "cuda", "--data-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
