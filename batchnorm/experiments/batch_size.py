"""``batch-size``: the noise of batch statistics, and where BN degrades as batches shrink.

(a) The batch mean μ_B of m examples scatters around the population mean with standard
deviation σ/√m (times √((N−m)/(N−1)) when drawn without replacement from N examples): the
regularizing noise of BN, measured against this prediction. (b) Test accuracy against the
number of examples per normalization batch, with BN and without normalization.

The normalization is chosen by name (``norms``); :data:`SCHEMES` says how each is trained at m
examples per normalization batch, so variants that decouple the two (a ghost batch: statistics
per chunk of m in a larger training batch) or correct small-batch statistics plug in as entries
of :data:`SCHEMES` and of :data:`batchnorm.experiments.models.NORMS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.experiments.config import as_dict
from batchnorm.experiments.models import NORMS, mlp
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train

TITLE = "Batch-statistics noise and small batches"


def _same_batch(m: int, cfg) -> tuple[int, dict]:
    return m, {}


LABELS = {"bn": "BN", "none": "no normalization"}  # legend names; other norms show their key

# name -> (m, config) -> (training batch size, normalization-layer options) for m examples per
# normalization batch; the layer itself comes from models.NORMS under the same name.
SCHEMES = {"bn": _same_batch, "none": _same_batch}


@dataclass(frozen=True)
class Config:
    noise_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # m for the μ_B-noise panel
    noise_batches: int = 1_000  # batches drawn per m to measure the spread of μ_B
    sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # examples per normalization batch
    norms: tuple[str, ...] = ("bn", "none")  # entries of SCHEMES to compare
    hidden: tuple[int, ...] = (100, 100, 100)  # as the mnist experiment, with ReLU units
    epochs: int = 10  # every run sees the same number of examples: epochs x training set
    # SGD at lr_at_32 x (batch / 32): the linear scaling rule keeps the step per example the
    # same, so batch sizes differ in noise, not in how far training gets.
    lr_at_32: float = 0.1
    lr_reference_batch: int = 32  # the batch size at which the rate is lr_at_32


QUICK = {"epochs": 1, "noise_batches": 200}

PUBLISHED = {
    "noise": "std(μ_B) = σ/√m for m examples drawn independently (closed form)",
    "batch_renorm_paper": {"bn_4_per_batch": 0.742, "renorm_4_per_batch": 0.765,
                           "bn_32_per_batch": 0.783},
}


@torch.no_grad()
def _noise(ctx) -> dict:
    """Spread of the batch mean of first-layer pre-activations over random batches of m."""
    cfg = ctx.config
    generator = ctx.generator()
    layer = torch.nn.Linear(784, 100).to(ctx.device)  # a layer's input as BN would see it
    h = layer(ctx.data.x_train).double()
    n = len(h)
    sigma = h.std(0, unbiased=False)
    keep = sigma > 1e-12  # a constant unit has no spread to compare
    measured, predicted = [], []
    for m in cfg.noise_sizes:
        if m >= n:
            raise ValueError(f"noise_sizes: m={m} must be below the training set size {n}")
        means = torch.stack([h[torch.randperm(n, generator=generator)[:m].to(h.device)].mean(0)
                             for _ in range(cfg.noise_batches)])
        ratio = means.std(0, unbiased=True)[keep] / sigma[keep]
        measured.append(float(ratio.mean()))
        predicted.append(float(np.sqrt((n - m) / (m * (n - 1)))))
    return {"m": list(cfg.noise_sizes), "measured": measured, "predicted": predicted,
            "inverse_sqrt_m": [float(1 / np.sqrt(m)) for m in cfg.noise_sizes],
            "units": int(keep.sum())}


def _train_one(ctx, norm: str, m: int) -> dict:
    cfg = ctx.config
    batch, options = SCHEMES[norm](m, cfg)
    generator = ctx.generator()
    model = mlp(cfg.hidden, norm=norm, activation="relu", norm_options=options).to(ctx.device)
    lr = cfg.lr_at_32 * batch / cfg.lr_reference_batch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps = max(1, cfg.epochs * len(ctx.data.x_train) // batch)
    with ctx.progress(f"{norm} m={m}", steps) as advance:
        diverged = train(model, optimizer, ctx.data.x_train, ctx.data.y_train, steps=steps,
                         batch_size=batch, generator=generator, advance=advance)
    return {"train_batch": batch, "lr": lr, "steps": steps, "diverged_at": diverged,
            "test_accuracy": None if diverged else accuracy(model, ctx.data.x_test,
                                                             ctx.data.y_test)}


def validate(cfg: Config) -> None:
    """Reject normalizations without a training scheme or a layer, before any work starts."""
    unknown = [name for name in cfg.norms if name not in SCHEMES or name not in NORMS]
    if unknown:
        available = sorted(set(SCHEMES) & set(NORMS))
        raise ValueError(f"norms: unknown {unknown}; available: {available}")


def run(ctx) -> dict:
    cfg = ctx.config
    validate(cfg)
    noise = ctx.run("noise", {key: value for key, value in as_dict(cfg).items()
                              if key.startswith("noise")}, lambda: _noise(ctx))
    rows = []
    for norm in cfg.norms:
        for m in cfg.sizes:
            spec = {**as_dict(cfg), "norm": norm, "m": m}
            result = ctx.run(f"{norm}-m{m}", spec, lambda norm=norm, m=m: _train_one(ctx, norm, m))
            rows.append({"norm": norm, "batch_size": m, **result})
    return {"noise": noise, "accuracy": rows, "published": PUBLISHED}


def metrics(results: dict) -> list[dict]:
    noise = results["noise"]
    rows = [{"panel": "noise", "m": m, "measured_std_ratio": a, "predicted_std_ratio": b}
            for m, a, b in zip(noise["m"], noise["measured"], noise["predicted"], strict=True)]
    rows += [{"panel": "accuracy", "norm": r["norm"], "m": r["batch_size"],
              "train_batch": r["train_batch"], "lr": r["lr"], "steps": r["steps"],
              "test_accuracy": r["test_accuracy"]} for r in results["accuracy"]]
    return rows


def figures(results: dict, directory) -> list[str]:
    plt = pyplot()
    noise = results["noise"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.loglog(noise["m"], noise["measured"], "o", label="measured std(μ_B)/σ")
    left.loglog(noise["m"], noise["predicted"], "-", label="predicted √((N−m)/(m(N−1)))")
    left.loglog(noise["m"], noise["inverse_sqrt_m"], ":", color="gray", label="1/√m")
    left.set(xlabel="examples per batch m", title="(a) noise of the batch mean")
    left.legend(fontsize=8)
    for norm in dict.fromkeys(r["norm"] for r in results["accuracy"]):
        rows = [r for r in results["accuracy"] if r["norm"] == norm]
        right.semilogx([r["batch_size"] for r in rows],
                       [np.nan if r["test_accuracy"] is None else r["test_accuracy"]
                        for r in rows], "o-", base=2, label=LABELS.get(norm, norm))
    right.set(xlabel="examples per normalization batch", ylabel="test accuracy",
              title="(b) test accuracy against batch size")
    right.legend(fontsize=8)
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return [save_figure(figure, directory / "batch_size.png")]


def sections(results: dict, figure_names: list[str]) -> list[Section]:
    cfg, noise = results["config"], results["noise"]
    noise_table = Table(["m", "measured std(μ_B)/σ", "predicted", "1/√m"],
                        [[str(m), fmt(a), fmt(b), fmt(c)] for m, a, b, c in
                         zip(noise["m"], noise["measured"], noise["predicted"],
                             noise["inverse_sqrt_m"], strict=True)],
                        f"Averaged over {noise['units']} units, {cfg['noise_batches']:,} "
                        "batches per m, drawn without replacement from the training set.")
    norms = list(dict.fromkeys(r["norm"] for r in results["accuracy"]))
    by = {(r["norm"], r["batch_size"]): r for r in results["accuracy"]}
    accuracy_table = Table(["examples per normalization batch", *norms],
                           [[str(m), *(fmt(by[(n, m)]["test_accuracy"]) if (n, m) in by else "—"
                                       for n in norms)] for m in cfg["sizes"]],
                           f"Test accuracy after {cfg['epochs']} epoch(s); learning rate "
                           f"{cfg['lr_at_32']} x batch / {cfg['lr_reference_batch']}; — where "
                           "training diverged.")
    paper = results["published"]["batch_renorm_paper"]
    claim = Section("Claim and setup", [
        "BN normalizes with the statistics of the current batch, so each example's output "
        "depends on the other examples: noise of size σ/√m in the mean, which regularizes, "
        "and which grows as batches shrink until training and inference no longer agree. "
        f"Batch Renormalization (Ioffe, 2017) reports BN at {fmt(paper['bn_4_per_batch'], 3)} "
        f"with 4 examples per batch against {fmt(paper['bn_32_per_batch'], 3)} with 32, and "
        f"{fmt(paper['renorm_4_per_batch'], 3)} for Batch Renorm at 4 (ImageNet).",
        f"Here: (a) the first-layer pre-activations of a freshly initialized 784-100 layer on "
        f"the training images; (b) a {'-'.join(map(str, cfg['hidden']))} ReLU network with "
        "each normalization before every ReLU, trained with plain SGD; every run sees the "
        f"same number of examples. Data: {results['dataset']['note']}.",
    ])
    return [claim, Section("Results", [], [noise_table, accuracy_table], figure_names)]


def headline(results: dict) -> tuple[str, str]:
    noise = results["noise"]
    error = max(abs(a / b - 1) for a, b in zip(noise["measured"], noise["predicted"], strict=True))
    by = {(r["norm"], r["batch_size"]): r["test_accuracy"] for r in results["accuracy"]}
    sizes = results["config"]["sizes"]
    small, large = sizes[0], 32 if 32 in sizes else sizes[-1]
    ours = (f"std(μ_B) within {100 * error:.1f}% of σ/√m; BN acc. {fmt(by.get(('bn', small)))} at "
            f"m={small}, {fmt(by.get(('bn', large)))} at m={large}")
    return ours, "σ/√m; BN 0.742 at 4 vs 0.783 at 32 (ImageNet)"
