"""``mnist``: the paper's §4.1 and Fig. 1, a sigmoid MLP on MNIST with and without BN.

Claim: with BN before each sigmoid the network reaches higher test accuracy sooner (a), and the
distribution of a sigmoid's input stays stable over training (c), where without BN it drifts (b).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.experiments.config import FULL_TRAIN, Limit, as_dict
from batchnorm.experiments.models import activation_layers, mlp
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train

TITLE = "MNIST with and without batch normalization (paper §4.1, Fig. 1)"
NETWORKS = {"plain": "none", "bn": "bn"}  # result key -> normalization before each sigmoid
PERCENTILES = (15, 50, 85)  # the percentiles of Fig. 1 (b, c)


@dataclass(frozen=True)
class Config:
    steps: int = 50_000  # paper: 50,000 steps
    batch_size: int = 60  # paper: 60 examples per mini-batch
    hidden: tuple[int, ...] = (100, 100, 100)  # paper: 3 fully-connected layers of 100 sigmoids
    init_std: float = 0.01  # paper: "small random Gaussian values"; 0.01 for every weight matrix
    # The paper states neither optimizer nor learning rate. Plain SGD (no momentum) isolates the
    # effect of normalization; the rate was tuned for the network WITHOUT BN, so that BN is not
    # compared with a handicapped baseline: on a 4,000/1,000 split of the training images, 10,000
    # steps, the plain network's validation accuracy was best at 4.0 among 0.1, 0.5, 1, 2, 4, 8
    # (mean of 3 seeds; 8 did not train). Both networks use it.
    lr: float = 4.0
    eval_every: int = 500  # steps between test-accuracy and percentile readings
    unit: int = 0  # which sigmoid of the last hidden layer Fig. 1 (b, c) follows


QUICK = {"steps": 2_000, "eval_every": 250}

# The values each setting may take (config.check, before any data is read; validate below).
LIMITS = {
    "steps": Limit(1),
    "batch_size": Limit(2, FULL_TRAIN, images=True, why="batch statistics need 2 examples"),
    "hidden": Limit(1),
    "init_std": Limit(0, open_low=True),
    "lr": Limit(0, open_low=True),
    "eval_every": Limit(1),
    "unit": Limit(0),  # and below the last hidden layer's width: validate
}


def validate(cfg: Config) -> None:
    """Reject a followed unit that the last hidden layer does not have (after config.check)."""
    width = cfg.hidden[-1]
    if cfg.unit >= width:
        raise ValueError(f"unit must be in [0, {width - 1}] (a sigmoid of the last hidden "
                         f"layer, which has {width}), got {cfg.unit}")

# Test accuracy read from the paper's Fig. 1(a), without BN and with BN.
PUBLISHED = {"test_accuracy": {"10000": {"plain": 0.926, "bn": 0.966},
                               "20000": {"plain": 0.963, "bn": 0.974},
                               "40000": {"plain": 0.972, "bn": 0.980}},
             "percentiles_bn_start": [-1.04, 0.0, 1.04]}


def _sigmoid_input(model: torch.nn.Module, x: torch.Tensor, unit: int) -> np.ndarray:
    """The input to sigmoid ``unit`` of the last hidden layer for every row of ``x``.

    The network runs as in training (batch statistics, over all of ``x`` as one batch) on a copy,
    so the readings show the distribution the sigmoid sees while learning, and the model's
    running statistics are left alone.
    """
    probe = copy.deepcopy(model).train()
    captured = []
    hook = activation_layers(probe)[-1].register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0][:, unit]))
    with torch.no_grad():
        probe(x)
    hook.remove()
    return captured[0].double().cpu().numpy()


def _train_one(ctx, norm: str) -> dict:
    cfg = ctx.config
    generator = ctx.generator()
    model = mlp(cfg.hidden, norm=norm, activation="sigmoid", init_std=cfg.init_std).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    curve = {"step": [], "test_accuracy": []}
    spread = {"step": [], **{f"p{q}": [] for q in PERCENTILES}}

    def on_eval(step: int) -> None:
        curve["step"].append(step)
        curve["test_accuracy"].append(accuracy(model, ctx.data.x_test, ctx.data.y_test))
        values = np.percentile(_sigmoid_input(model, ctx.data.x_test, cfg.unit), PERCENTILES)
        spread["step"].append(step)
        for q, value in zip(PERCENTILES, values, strict=True):
            spread[f"p{q}"].append(float(value))

    with ctx.progress(norm, cfg.steps) as advance:
        diverged = train(model, optimizer, ctx.data.x_train, ctx.data.y_train, steps=cfg.steps,
                         batch_size=cfg.batch_size, generator=generator,
                         eval_every=cfg.eval_every, on_eval=on_eval, advance=advance)
    return {"curve": curve, "percentiles": spread, "diverged_at": diverged}


def run(ctx) -> dict:
    runs = {}
    for name, norm in NETWORKS.items():
        spec = {**as_dict(ctx.config), "norm": norm}
        runs[name] = ctx.run(name, spec, lambda norm=norm: _train_one(ctx, norm))
    at_steps = {step: {name: _reading(runs[name]["curve"], int(step)) for name in NETWORKS}
                for step in PUBLISHED["test_accuracy"]}
    return {
        "final_test_accuracy": {name: runs[name]["curve"]["test_accuracy"][-1]
                                for name in NETWORKS},
        "test_accuracy_at": at_steps,
        "curves": {name: runs[name]["curve"] for name in NETWORKS},
        "percentiles": {name: runs[name]["percentiles"] for name in NETWORKS},
        "percentile_ranges": {name: _ranges(runs[name]["percentiles"]) for name in NETWORKS},
        "diverged_at": {name: runs[name]["diverged_at"] for name in NETWORKS},
        "published": PUBLISHED,
    }


def _ranges(spread: dict) -> dict:
    """Max minus min of each percentile after the first tenth of training: the drift that
    remains once the initial transient (the rise from the tiny initial weights) is over."""
    start = spread["step"][-1] / 10
    late = [i for i, step in enumerate(spread["step"]) if step >= start]
    ranges = {f"p{q}": max(spread[f"p{q}"][i] for i in late) - min(spread[f"p{q}"][i] for i in late)
              for q in PERCENTILES}
    return {"from_step": spread["step"][late[0]], **ranges}


def _reading(curve: dict, step: int) -> float | None:
    """Test accuracy at ``step``, or None when training stopped before it."""
    steps = curve["step"]
    if step not in steps:
        return None
    return curve["test_accuracy"][steps.index(step)]


def metrics(results: dict) -> list[dict]:
    rows = []
    for name in NETWORKS:
        curve, spread = results["curves"][name], results["percentiles"][name]
        for i, step in enumerate(curve["step"]):
            rows.append({"network": name, "step": step,
                         "test_accuracy": curve["test_accuracy"][i],
                         **{f"p{q}": spread[f"p{q}"][i] for q in PERCENTILES}})
    return rows


def figures(results: dict, directory) -> list[str]:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, label in (("plain", "Without BN"), ("bn", "With BN")):
        curve = results["curves"][name]
        axes[0].plot(curve["step"], curve["test_accuracy"], label=label)
    for step, reading in results["published"]["test_accuracy"].items():
        for name, marker in (("plain", "x"), ("bn", "+")):
            axes[0].plot(int(step), reading[name], marker, color="black", markersize=7)
    # As in the paper, the axis starts at 0.7 unless the second half of training is lower: the
    # early rise is off the chart, the differences that remain are visible.
    late = [a for n in NETWORKS for a in results["curves"][n]["test_accuracy"][
        len(results["curves"][n]["test_accuracy"]) // 2:]]
    axes[0].set_ylim(max(0.0, min(0.7, min(late) - 0.05)), 1.0)
    axes[0].set(title="(a) test accuracy (x, +: paper)", xlabel="step")
    axes[0].legend(loc="lower right")
    for axis, name, letter in ((axes[1], "plain", "(b) without BN"), (axes[2], "bn",
                                                                      "(c) with BN")):
        spread = results["percentiles"][name]
        for q in PERCENTILES:
            axis.plot(spread["step"], spread[f"p{q}"], label=f"{q}th percentile")
        axis.set(title=f"{letter}: sigmoid input", xlabel="step")
    axes[2].sharey(axes[1])
    axes[1].legend(loc="best", fontsize=8)
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return [save_figure(figure, directory / "fig1.png")]


def sections(results: dict, figure_names: list[str]) -> list[Section]:
    cfg, final = results["config"], results["final_test_accuracy"]
    paper = results["published"]["test_accuracy"]
    rows = [[f"{int(step):,}", fmt(ours["plain"]), fmt(paper[step]["plain"], 3), fmt(ours["bn"]),
             fmt(paper[step]["bn"], 3)] for step, ours in results["test_accuracy_at"].items()]
    rows.append([f"{results['curves']['bn']['step'][-1]:,} (final)", fmt(final["plain"]), "—",
                 fmt(final["bn"]), "—"])
    accuracy_table = Table(["step", "without BN (ours)", "without BN (paper)", "with BN (ours)",
                            "with BN (paper)"], rows,
                           "Test accuracy on the 10,000 MNIST test images; paper values read "
                           "from its Fig. 1(a).")
    spread_rows = []
    for name in NETWORKS:
        spread = results["percentiles"][name]
        for i in (0, len(spread["step"]) - 1):
            spread_rows.append([name, f"{spread['step'][i]:,}",
                                *(fmt(spread[f"p{q}"][i], 3) for q in PERCENTILES)])
        ranges = results["percentile_ranges"][name]
        spread_rows.append([name, f"range (max − min) from step {ranges['from_step']:,} on",
                            *(fmt(ranges[f"p{q}"], 3) for q in PERCENTILES)])
    spread_table = Table(["network", "step", "15th", "50th", "85th"], spread_rows,
                         "Percentiles of the input to sigmoid unit "
                         f"{cfg['unit']} of the last hidden layer over the test images. Paper, "
                         "with BN: starting near −1.04, 0, +1.04 and stable; without BN: "
                         "drifting.")
    claim = Section("Claim and setup", [
        "Paper (§4.1): a 784-100-100-100-10 sigmoid network trained for 50,000 steps of 60 "
        "examples reaches higher test accuracy sooner with BN before each sigmoid, and the "
        "input distribution of a sigmoid stays stable with BN while it drifts without.",
        f"Data: {results['dataset']['note']}. Weights N(0, {cfg['init_std']}²), biases 0 (none "
        f"where BN follows). {cfg['steps']:,} steps of {cfg['batch_size']} examples, plain SGD "
        f"at learning rate {cfg['lr']} for both networks. The paper states neither optimizer nor "
        "rate; SGD without momentum isolates normalization, and the rate was tuned for the "
        "network without BN (best plain validation accuracy on a 4,000/1,000 split of the "
        "training images over 0.1, 0.5, 1, 2, 4, 8), so BN is not compared with a handicapped "
        "baseline.",
        "Percentiles are taken as the network computes in training (batch statistics over the "
        "10,000 test images as one batch), on a copy, every "
        f"{cfg['eval_every']} steps; test accuracy uses the running averages (eval mode).",
    ])
    diverged = {k: v for k, v in results["diverged_at"].items() if v is not None}
    notes = [f"Diverged: {diverged}."] if diverged else []
    return [claim, Section("Results", notes, [accuracy_table, spread_table], figure_names)]


def headline(results: dict) -> tuple[str, str]:
    final = results["final_test_accuracy"]
    ours = f"test acc. BN {fmt(final['bn'])} / plain {fmt(final['plain'])}"
    return ours, "BN 0.980 / plain 0.972 (40K steps)"
