"""``inference``: Algorithm 2's population statistics against moving averages and batch statistics.

The paper's inference network (Algorithm 2) normalizes with population statistics computed
after training, layer by layer: E[x] = E_B[μ_B] and Var[x] = m/(m−1)·E_B[σ²_B] over training
mini-batches of size m, each BN layer then being a fixed affine map (step 11). Frameworks use the
moving averages kept during training instead. This experiment trains the mnist BN network and
compares, on the test set: (a) moving averages, (b) Algorithm 2, (c) batch statistics; and checks
that the folded affine maps give the same outputs as (b).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from batchnorm import reference
from batchnorm.experiments.config import FULL_TRAIN, Limit, as_dict
from batchnorm.experiments.models import mlp, norm_layers
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train

TITLE = "Inference with population statistics (paper Algorithm 2)"
MODES = ("ema", "population", "batch")  # (a), (b), (c)


@dataclass(frozen=True)
class Config:
    steps: int = 10_000  # training steps of the BN network (a fifth of mnist's 50,000)
    batch_size: int = 60  # as mnist; also Algorithm 2's m and the batch of (c)
    hidden: tuple[int, ...] = (100, 100, 100)  # the mnist network: 3 layers of 100 sigmoids
    init_std: float = 0.01  # as mnist
    lr: float = 4.0  # as mnist (plain SGD; see its configuration for the choice)
    momentum: float = 0.1  # BN's moving-average momentum (torch's default)


QUICK = {"steps": 1_000}

# The values each setting may take (config.check, before any data is read).
LIMITS = {
    "steps": Limit(1),
    # m of Algorithm 2 too, whose unbiased variance m/(m-1) needs m >= 2
    "batch_size": Limit(2, FULL_TRAIN, images=True, why="batch statistics need 2 examples"),
    "hidden": Limit(1),
    "init_std": Limit(0, open_low=True),
    "lr": Limit(0, open_low=True),
    "momentum": Limit(0, 1, open_low=True),  # 0 would leave the moving averages at 0 and 1
}

PUBLISHED = {
    "claim": "Algorithm 2: inference uses population statistics with the unbiased variance "
             "m/(m-1)·E_B[σ²_B]; each BN becomes a fixed linear transform. No accuracy is "
             "published for this comparison.",
}


class Affine(nn.Module):
    """y = scale·x + shift per feature: one BN layer of Algorithm 2's inference network."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray, like: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale).to(like))
        self.register_buffer("shift", torch.as_tensor(shift).to(like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@torch.no_grad()
def population_network(model: nn.Module, x: torch.Tensor, m: int,
                       generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` whose BN layers hold Algorithm 2's population statistics.

    Layer by layer (steps 9–10): with the earlier layers already in inference form, the inputs
    of BN layer k over the training mini-batches of size m give E[x] and Var[x] through
    :func:`batchnorm.reference.population_statistics`.
    """
    network = copy.deepcopy(model).eval()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    batches = [order[i:i + m] for i in range(0, len(x) - m + 1, m)]  # equal m: drop the rest
    for layer in norm_layers(network):
        inputs: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(
            lambda module, args, inputs=inputs: inputs.append(args[0]))
        for index in batches:
            network(x[index])
        hook.remove()
        mean, var = reference.population_statistics(t.double().cpu().numpy() for t in inputs)
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_var.copy_(torch.from_numpy(var))
    return network


def folded_network(network: nn.Module) -> nn.Module:
    """``network`` with each eval-mode BN layer replaced by its folded affine map (step 11)."""
    folded = copy.deepcopy(network)
    for name, child in list(folded.named_children()):
        if getattr(child, "running_mean", None) is not None:
            scale, shift = reference.inference_scale_shift(
                child.weight.detach().double().cpu().numpy(),
                child.bias.detach().double().cpu().numpy(),
                child.running_mean.double().cpu().numpy(),
                child.running_var.double().cpu().numpy(), child.eps)
            setattr(folded, name, Affine(scale, shift, child.weight))
    return folded


@torch.no_grad()
def _batch_statistics_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                               m: int) -> float:
    """Accuracy with BN normalizing each test batch of m by its own statistics (a copy).

    Every test image counts: the last batch holds the remainder (if it has at least 2 images,
    the fewest that batch statistics allow; a single leftover image is dropped).
    """
    network = copy.deepcopy(model).train()
    end = len(x) if len(x) % m != 1 else len(x) - 1
    correct = sum(int((network(x[i:min(i + m, end)]).argmax(1) == y[i:min(i + m, end)]).sum())
                  for i in range(0, end, m))
    return correct / end


def _train_and_compare(ctx) -> dict:
    cfg, data = ctx.config, ctx.data
    generator = ctx.generator()
    model = mlp(cfg.hidden, norm="bn", activation="sigmoid", init_std=cfg.init_std,
                norm_options={"momentum": cfg.momentum}).to(ctx.device)
    with ctx.progress("bn", cfg.steps) as advance:
        diverged = train(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data.x_train,
                         data.y_train, steps=cfg.steps, batch_size=cfg.batch_size,
                         generator=generator, advance=advance)
    if diverged is not None:
        raise RuntimeError(f"the BN network diverged at step {diverged}; lower --set lr=...")
    model.eval()
    population = population_network(model, data.x_train, cfg.batch_size, generator)
    folded = folded_network(population)
    with torch.no_grad():
        logits, logits_folded = population(data.x_test), folded(data.x_test)
    gaps = [{"mean_max_abs": float((a.running_mean - b.running_mean).abs().max()),
             "var_max_rel": float(((a.running_var - b.running_var).abs() / b.running_var).max())}
            for a, b in zip(norm_layers(model), norm_layers(population), strict=True)]
    return {
        "test_accuracy": {
            "ema": accuracy(model, data.x_test, data.y_test),
            "population": accuracy(population, data.x_test, data.y_test),
            "batch": _batch_statistics_accuracy(model, data.x_test, data.y_test, cfg.batch_size)},
        "folded": {"test_accuracy": accuracy(folded, data.x_test, data.y_test),
                   "max_abs_logit_difference": float((logits - logits_folded).abs().max()),
                   "same_predictions": bool((logits.argmax(1) == logits_folded.argmax(1)).all())},
        "ema_vs_population": gaps,
        "population_batches": len(data.x_train) // cfg.batch_size,
    }


def run(ctx) -> dict:
    result = ctx.run("bn", as_dict(ctx.config), lambda: _train_and_compare(ctx))
    return {**result, "published": PUBLISHED}


def metrics(results: dict) -> list[dict]:
    rows = [{"mode": mode, "test_accuracy": results["test_accuracy"][mode]} for mode in MODES]
    rows.append({"mode": "folded", "test_accuracy": results["folded"]["test_accuracy"]})
    return rows


def figures(results: dict, directory) -> list[str]:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    labels = ["(a) moving\naverages", "(b) Algorithm 2\npopulation", "(c) batch\nstatistics",
              "(b) folded\naffine"]
    values = [results["test_accuracy"][mode] for mode in MODES]
    values.append(results["folded"]["test_accuracy"])
    bars = axis.bar(labels, values, color=["C0", "C1", "C2", "C1"])
    axis.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=8)
    low = min(values)
    axis.set(ylim=(max(0.0, low - 0.05), min(1.0, max(values) + 0.02)), ylabel="test accuracy",
             title="Normalization statistics at inference")
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return [save_figure(figure, directory / "inference.png")]


def sections(results: dict, figure_names: list[str]) -> list[Section]:
    cfg, acc, folded = results["config"], results["test_accuracy"], results["folded"]
    table = Table(["statistics used at inference", "test accuracy"], [
        ["(a) moving averages (torch's running_mean / running_var)", fmt(acc["ema"])],
        ["(b) Algorithm 2: E_B[μ_B], m/(m−1)·E_B[σ²_B]", fmt(acc["population"])],
        [f"(c) batch statistics of each test batch of {cfg['batch_size']}", fmt(acc["batch"])],
        ["(b) as folded affine maps y = γ/√(Var+ε)·x + (β − γ·E[x]/√(Var+ε))",
         fmt(folded["test_accuracy"])],
    ], f"Folded against unfolded (b): largest logit difference "
       f"{folded['max_abs_logit_difference']:.2e}, same predictions: "
       f"{fmt(folded['same_predictions'])}.")
    gaps = Table(["BN layer", "max |mean(a) − mean(b)|", "max relative |var(a) − var(b)|"],
                 [[str(i + 1), f"{g['mean_max_abs']:.2e}", f"{g['var_max_rel']:.2e}"]
                  for i, g in enumerate(results["ema_vs_population"])],
                 "How far the moving averages are from the population statistics.")
    claim = Section("Claim and setup", [
        "Paper (§3.1, Algorithm 2): after training, each BN layer normalizes with the population "
        "statistics E[x] = E_B[μ_B] and Var[x] = m/(m−1)·E_B[σ²_B] over training mini-batches "
        "of m, computed layer by layer in the inference network, and becomes one fixed affine "
        "map; the output then depends on the input alone. The paper publishes no accuracy "
        "for this comparison.",
        f"Here: the mnist BN network (784-{'-'.join(map(str, cfg['hidden']))}-10, sigmoid), "
        f"{cfg['steps']:,} steps of {cfg['batch_size']} with SGD at {cfg['lr']}, moving-average "
        f"momentum {cfg['momentum']}; Algorithm 2 over {results['population_batches']} training "
        f"batches of m = {cfg['batch_size']} (batchnorm.reference.population_statistics). "
        f"Data: {results['dataset']['note']}.",
    ])
    return [claim, Section("Results", [], [table, gaps], figure_names)]


def headline(results: dict) -> tuple[str, str]:
    acc = results["test_accuracy"]
    ours = (f"EMA {fmt(acc['ema'])}, Alg. 2 {fmt(acc['population'])}, batch "
            f"{fmt(acc['batch'])}; folded Δ {results['folded']['max_abs_logit_difference']:.1e}")
    return ours, "Alg. 2 prescribed; no number published"
