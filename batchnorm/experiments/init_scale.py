"""``init-scale``: a deep ReLU network trained from 16 weight scales, with and without BN.

Claim ("Deep Learning from Scratch", §6.3): with BN the network trains from almost any initial
weight scale, where without BN it learns only in a narrow range; BN wins 14 of 16 panels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.experiments.config import FULL_TRAIN, Limit, as_dict
from batchnorm.experiments.models import mlp
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train

TITLE = "Training from any weight scale with batch normalization (textbook §6.3)"
NETWORKS = {"bn": "bn", "plain": "none"}  # result key -> normalization before each ReLU
BOOK_RANGE = (0.00215, 0.0464)  # stds over which the book's BN network reaches >= 0.95


@dataclass(frozen=True)
class Config:
    train_size: int = 1_000  # book: the first 1,000 training images (here: of the shuffled set)
    hidden: tuple[int, ...] = (100,) * 5  # book: 5 hidden layers of 100 units, Affine→BN→ReLU
    # book: np.logspace(0, -4, 16), the same Gaussian weight std for every layer
    stds: tuple[float, ...] = tuple(float(s) for s in np.logspace(0, -4, 16))
    lr: float = 0.01  # book: plain SGD at learning rate 0.01
    batch_size: int = 100  # book: 100 examples, drawn with replacement
    epochs: int = 20  # book: 20 epochs of train_size / batch_size = 10 steps


QUICK = {"epochs": 5}

# The values each setting may take (config.check, before any data is read; validate below).
LIMITS = {
    "train_size": Limit(2, FULL_TRAIN),  # more than the loaded set means all of it
    "hidden": Limit(1),
    "stds": Limit(0, open_low=True),
    "lr": Limit(0, open_low=True),
    "batch_size": Limit(2, FULL_TRAIN, images=True, why="batch statistics need 2 examples"),
    "epochs": Limit(1),
}


def validate(cfg: Config) -> None:
    """Reject batches larger than the images they are drawn from (after config.check)."""
    if cfg.batch_size > cfg.train_size:
        raise ValueError(f"batch_size must be at most train_size (batches are drawn from the "
                         f"first train_size images), got batch_size={cfg.batch_size}, "
                         f"train_size={cfg.train_size}")

PUBLISHED = {"bn_wins": 14, "panels": 16, "bn_min_in_range": 0.95, "plain_in_range": 0.11,
             "range": list(BOOK_RANGE)}


def _train_one(ctx, norm: str, std: float) -> dict:
    cfg = ctx.config
    generator = ctx.generator()
    x, y = ctx.data.x_train[:cfg.train_size], ctx.data.y_train[:cfg.train_size]
    model = mlp(cfg.hidden, norm=norm, activation="relu", init_std=std).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    per_epoch = max(1, cfg.train_size // cfg.batch_size)
    curve = {"epoch": [], "train_accuracy": []}

    def on_eval(step: int) -> None:
        curve["epoch"].append(step / per_epoch)
        curve["train_accuracy"].append(accuracy(model, x, y))

    diverged = train(model, optimizer, x, y, steps=cfg.epochs * per_epoch,
                     batch_size=cfg.batch_size, generator=generator, replace=True,
                     eval_every=per_epoch, on_eval=on_eval)
    if diverged is not None:  # the weights before the non-finite step: one last reading
        on_eval(diverged - 1)
    return {"curve": curve, "diverged_at": diverged}


def run(ctx) -> dict:
    cfg, panels = ctx.config, []
    images = min(cfg.train_size, len(ctx.data.x_train))
    with ctx.progress("panels", 2 * len(cfg.stds)) as advance:
        for index, std in enumerate(cfg.stds):
            panel = {"std": std}
            for name, norm in NETWORKS.items():
                spec = {**as_dict(cfg), "std": std, "norm": norm}
                result = ctx.run(f"std{index:02d}-{name}", spec,
                                 lambda norm=norm, std=std: _train_one(ctx, norm, std))
                panel[name] = result["curve"]["train_accuracy"][-1]
                panel[f"{name}_curve"] = result["curve"]
                panel[f"{name}_diverged_at"] = result["diverged_at"]
                advance(1)
            panels.append(panel)
    low, high = BOOK_RANGE
    inside = [p for p in panels if low * 0.999 <= p["std"] <= high * 1.001]
    return {
        "train_images": images,
        "panels": panels,
        "bn_wins": sum(p["bn"] > p["plain"] for p in panels),
        "in_book_range": {"stds": [p["std"] for p in inside],
                          "bn_min": min((p["bn"] for p in inside), default=None),
                          "plain_max": max((p["plain"] for p in inside), default=None)},
        "published": PUBLISHED,
    }


def metrics(results: dict) -> list[dict]:
    return [{"std": p["std"], "network": name, "epoch": epoch, "train_accuracy": acc}
            for p in results["panels"] for name in NETWORKS
            for epoch, acc in zip(p[f"{name}_curve"]["epoch"],
                                  p[f"{name}_curve"]["train_accuracy"], strict=True)]


def figures(results: dict, directory) -> list[str]:
    plt = pyplot()
    panels = results["panels"]
    rows = int(np.ceil(len(panels) / 4))
    figure, axes = plt.subplots(rows, 4, figsize=(12, 2.6 * rows), sharex=True, sharey=True,
                                squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.plot(panel["bn_curve"]["epoch"], panel["bn_curve"]["train_accuracy"],
                  label="with BN")
        axis.plot(panel["plain_curve"]["epoch"], panel["plain_curve"]["train_accuracy"], "--",
                  label="without BN")
        axis.set_title(f"W std = {panel['std']:.3g}", fontsize=9)
        axis.set_ylim(0.0, 1.0)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
    for axis in axes[:, 0]:
        axis.set_ylabel("training accuracy")
    figure.suptitle(f"BN wins {results['bn_wins']} of {len(panels)} panels; "
                    f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    figure.tight_layout()
    return [save_figure(figure, directory / "init_scale.png")]


def sections(results: dict, figure_names: list[str]) -> list[Section]:
    cfg, book = results["config"], results["in_book_range"]
    rows = [[f"{p['std']:.3g}", fmt(p["bn"], 3), fmt(p["plain"], 3),
             "BN" if p["bn"] > p["plain"] else ("tie" if p["bn"] == p["plain"] else "plain")]
            for p in results["panels"]]
    panels = Table(["weight std", "with BN", "without BN", "higher"], rows,
                   f"Training accuracy on the {results['train_images']:,} training images after "
                   f"{cfg['epochs']} epochs (eval mode).")
    compare = Table(["quantity", "ours", "book"], [
        ["panels where BN is higher", f"{results['bn_wins']} of {len(results['panels'])}",
         "14 of 16"],
        [f"lowest BN accuracy, std in [{BOOK_RANGE[0]}, {BOOK_RANGE[1]}]", fmt(book["bn_min"], 3),
         "≥ 0.95"],
        [f"highest accuracy without BN, std in [{BOOK_RANGE[0]}, {BOOK_RANGE[1]}]",
         fmt(book["plain_max"], 3), "≈ 0.11"],
    ])
    claim = Section("Claim and setup", [
        "Book (\"Deep Learning from Scratch\", §6.3): a network of 5 hidden layers of 100 ReLU "
        "units (Affine → BN → ReLU) trained on 1,000 MNIST images learns from nearly every "
        "initial weight scale with BN, but only in a narrow range without it.",
        f"Here: the first {results['train_images']:,} images of the shuffled training set "
        f"({results['dataset']['note']}); the same weight std for every layer from "
        f"logspace(0, −4, {len(cfg['stds'])}); plain SGD at {cfg['lr']}, batches of "
        f"{cfg['batch_size']} drawn with replacement, {cfg['epochs']} epochs. Affine maps "
        "followed by BN have no bias (BN's shift replaces it).",
        "Where the curves stop early the loss became non-finite (the network diverged). At the "
        "smallest scales a first-layer pre-activation has variance about 784·E[x²]·std², which "
        "falls below BN's ε = 1e-5 (torch's default; the book's implementation uses 1e-7) near "
        "std 1e-4: BN divides by √(σ²+ε) ≈ √ε and can no longer restore unit scale, so the "
        "signal still vanishes.",
    ])
    return [claim, Section("Results", [], [compare, panels], figure_names)]


def headline(results: dict) -> tuple[str, str]:
    book = results["in_book_range"]
    ours = (f"BN wins {results['bn_wins']}/{len(results['panels'])}; in range BN ≥ "
            f"{fmt(book['bn_min'], 3)}, plain ≤ {fmt(book['plain_max'], 3)}")
    return ours, "BN wins 14/16; in range BN ≥ 0.95, plain ≈ 0.11"
