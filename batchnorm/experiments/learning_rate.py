"""``learning-rate``: the paper's BN-x5 / BN-x30 claim, scaled down to a small convnet on MNIST.

Claim (paper §4.2, Table 2): BN makes training tolerate much higher learning rates; with the rate
raised 5x and 30x, the BN network reaches the baseline's accuracy in far fewer steps, while the
network without BN does not tolerate such rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchnorm.experiments.config import FULL_TRAIN, Limit, as_dict
from batchnorm.experiments.models import convnet
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train

TITLE = "Higher learning rates with batch normalization (paper §4.2, BN-x5 and BN-x30)"
NORMS = ("none", "bn")


@dataclass(frozen=True)
class Config:
    channels: tuple[int, ...] = (16, 32)  # two conv3x3→BN→ReLU→max-pool blocks, then affine
    steps: int = 3_000  # 36 epochs of a 5,000-image training set; time-bound on a 2-core CPU
    batch_size: int = 60  # as in the paper's MNIST experiment
    base_lr: float = 0.0015  # the paper's Inception initial rate, so 5x and 30x are its BN-x5/x30
    momentum: float = 0.9  # SGD with momentum, as the paper's Inception training
    multipliers: tuple[float, ...] = (1.0, 5.0, 30.0)  # the paper's baseline, BN-x5 and BN-x30
    target_accuracy: float = 0.97  # test accuracy whose first crossing is counted
    eval_every: int = 100  # steps between test-accuracy readings (resolution of the count)


QUICK = {"steps": 200, "eval_every": 50}

# The values each setting may take (config.check, before any data is read).
LIMITS = {
    "channels": Limit(1, items=(1, 4), why="each block halves the 28x28 image"),
    "steps": Limit(1),
    "batch_size": Limit(2, FULL_TRAIN, images=True, why="batch statistics need 2 examples"),
    "base_lr": Limit(0, open_low=True),
    "momentum": Limit(0, 1, open_high=True),  # SGD's; 1 or more never forgets a gradient
    "multipliers": Limit(0, open_low=True),
    "target_accuracy": Limit(0, 1, open_low=True),
    "eval_every": Limit(1),
}

# Paper, Table 2 (Inception on ImageNet): steps to reach Inception's 72.2% and best accuracy.
PUBLISHED = {
    "target": 0.722,
    "networks": {
        "Inception": {"steps_to_target": 31.0e6, "max_accuracy": 0.722},
        "BN-Baseline": {"steps_to_target": 13.3e6, "max_accuracy": 0.727},
        "BN-x5": {"steps_to_target": 2.1e6, "max_accuracy": 0.730},
        "BN-x30": {"steps_to_target": 2.7e6, "max_accuracy": 0.748},
        "BN-x5-Sigmoid": {"steps_to_target": None, "max_accuracy": 0.698},
    },
}


def _label(norm: str, multiplier: float) -> str:
    return f"{'BN' if norm == 'bn' else 'plain'}-x{multiplier:g}"


def _train_one(ctx, norm: str, lr: float) -> dict:
    cfg = ctx.config
    generator = ctx.generator()
    model = convnet(cfg.channels, norm=norm).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    curve = {"step": [], "test_accuracy": []}

    def on_eval(step: int) -> None:
        curve["step"].append(step)
        curve["test_accuracy"].append(accuracy(model, ctx.data.x_test, ctx.data.y_test))

    with ctx.progress(_label(norm, lr / cfg.base_lr), cfg.steps) as advance:
        diverged = train(model, optimizer, ctx.data.x_train, ctx.data.y_train, steps=cfg.steps,
                         batch_size=cfg.batch_size, generator=generator,
                         eval_every=cfg.eval_every, on_eval=on_eval, advance=advance)
    return {"curve": curve, "diverged_at": diverged}


def _status(run: dict) -> str:
    if run["diverged_at"] is not None:
        return f"diverged at step {run['diverged_at']:,}"
    # A finite loss at chance accuracy is a network that blew up into dead or saturated units.
    if run["final_test_accuracy"] < 0.2:
        return "failed (chance accuracy)"
    return "trained"


def run(ctx) -> dict:
    cfg, runs = ctx.config, []
    for norm in NORMS:
        for multiplier in cfg.multipliers:
            lr = cfg.base_lr * multiplier
            label = _label(norm, multiplier)
            spec = {**as_dict(cfg), "norm": norm, "lr": lr}
            result = ctx.run(label, spec, lambda norm=norm, lr=lr: _train_one(ctx, norm, lr))
            curve = result["curve"]
            reached = [s for s, a in zip(curve["step"], curve["test_accuracy"], strict=True)
                       if a >= cfg.target_accuracy]
            entry = {"label": label, "norm": norm, "multiplier": multiplier, "lr": lr,
                     "steps_to_target": reached[0] if reached else None,
                     "best_test_accuracy": max(curve["test_accuracy"]),
                     "final_test_accuracy": curve["test_accuracy"][-1],
                     "diverged_at": result["diverged_at"], "curve": curve}
            entry["status"] = _status(entry)
            runs.append(entry)
    baseline = runs[0]["steps_to_target"]
    for entry in runs:
        steps = entry["steps_to_target"]
        entry["speedup_vs_plain_x1"] = baseline / steps if baseline and steps else None
        # A baseline that never reached the target would need more than all the steps run.
        entry["speedup_at_least"] = (cfg.steps / steps if baseline is None and steps
                                     else None)
    return {"target_accuracy": cfg.target_accuracy, "networks": runs, "published": PUBLISHED}


def metrics(results: dict) -> list[dict]:
    return [{"label": r["label"], "norm": r["norm"], "lr": r["lr"], "step": step,
             "test_accuracy": acc}
            for r in results["networks"]
            for step, acc in zip(r["curve"]["step"], r["curve"]["test_accuracy"], strict=True)]


def figures(results: dict, directory) -> list[str]:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    colors = {}
    for r in results["networks"]:
        color = colors.setdefault(r["multiplier"], f"C{len(colors)}")
        axis.plot(r["curve"]["step"], r["curve"]["test_accuracy"], color=color,
                  linestyle="-" if r["norm"] == "bn" else "--",
                  label=f"{r['label']} (lr {r['lr']:g})"
                  + (" diverged" if r["diverged_at"] is not None else ""))
    axis.axhline(results["target_accuracy"], color="gray", linewidth=0.8, linestyle=":")
    # Zoom past the first tenth of training unless a run stays low (a failed run shows in full).
    late = [a for r in results["networks"] for s, a in zip(r["curve"]["step"],
            r["curve"]["test_accuracy"], strict=True) if s >= r["curve"]["step"][-1] / 10]
    axis.set(xlabel="step", ylabel="test accuracy", ylim=(max(0.0, min(late) - 0.05), 1.0),
             title="Test accuracy; solid: BN, dashed: without BN")
    axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return [save_figure(figure, directory / "learning_rate.png")]


def _speedup(run: dict) -> str:
    if run.get("speedup_at_least") is not None:
        return f"> {run['speedup_at_least']:.1f}"
    return fmt(run["speedup_vs_plain_x1"], 2)


def sections(results: dict, figure_names: list[str]) -> list[Section]:
    cfg, target = results["config"], results["target_accuracy"]
    rows = [[r["label"], f"{r['lr']:g}", fmt(r["steps_to_target"]), _speedup(r),
             fmt(r["best_test_accuracy"]),
             fmt(r["final_test_accuracy"]), r["status"]] for r in results["networks"]]
    ours = Table(["network", "learning rate", f"steps to {fmt(target, 3)}",
                 "speed-up vs plain-x1", "best test acc.", "final test acc.", "status"], rows,
                 f"Steps counted at the first of the readings every {cfg['eval_every']} steps "
                 f"that reaches {fmt(target, 3)} test accuracy; — where never reached. Speed-up: "
                 "plain-x1's steps over the network's; \"> x\" when plain-x1 never reached the "
                 "target, so that it would need more than all the steps run.")
    paper = Table(["network (paper, Inception on ImageNet)", "steps to 72.2%", "max accuracy"],
                  [[name, fmt(v["steps_to_target"] / 1e6, 1) + "M" if v["steps_to_target"]
                    else "—", fmt(v["max_accuracy"], 3)]
                   for name, v in results["published"]["networks"].items()],
                  "Paper, Table 2. BN-x5 reaches the baseline's accuracy in 14 times fewer "
                  "steps.")
    claim = Section("Claim and setup", [
        "Paper (§4.2.1, Table 2): with BN the learning rate can be raised 5x and 30x; the BN "
        "networks reach the baseline's accuracy in far fewer steps, which the network without "
        "BN cannot do at such rates.",
        f"Here, scaled down: a convnet with blocks of {cfg['channels']} channels "
        "(conv3x3 → BN → ReLU → max-pool; the convolution has no bias where BN follows), "
        f"{cfg['steps']:,} steps of {cfg['batch_size']} examples, SGD with momentum "
        f"{cfg['momentum']} at base learning rate {cfg['base_lr']} times "
        f"{', '.join(f'{m:g}' for m in cfg['multipliers'])}, with and without BN. "
        f"Data: {results['dataset']['note']}.",
    ])
    return [claim, Section("Results", [], [ours, paper], figure_names)]


def headline(results: dict) -> tuple[str, str]:
    runs = {r["label"]: r for r in results["networks"]}
    parts = [f"{label} {fmt(r['steps_to_target'])}" if r["status"] == "trained"
             else f"{label} {r['status'].split(' ')[0]}" for label, r in runs.items()]
    ours = f"steps to {fmt(results['target_accuracy'], 3)}: " + ", ".join(parts)
    return ours, "steps to 72.2%: Inception 31.0M, BN-x5 2.1M, BN-x30 2.7M"
