"""``batch-size``: the noise of batch statistics, and where BN degrades as batches shrink.

(a) The batch mean μ_B of m examples scatters around the population mean with standard
deviation σ/√m (times √((N−m)/(N−1)) when drawn without replacement from N examples): the
regularizing noise of BN, measured against this prediction. (b) Test accuracy, in eval mode
with the running estimates, against the examples per normalization batch m: trained on
batches of m (fewer examples per step as m shrinks), and, as in the Batch Renorm paper, on
batches of ``group_batch`` normalized in groups of m by BN (Ghost BN, ``virtual_batch_size=m``)
or Batch Renorm. :data:`SCHEMES` says how each normalization trains at m (training batch size
and layer options); the layer comes from :data:`batchnorm.experiments.models.NORMS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from batchnorm.experiments.config import FULL_TRAIN, Limit, as_dict
from batchnorm.experiments.models import NORMS, mlp
from batchnorm.experiments.report import Section, Table, fmt, pyplot, save_figure
from batchnorm.experiments.training import accuracy, train
from batchnorm.renorm import Ramp

TITLE = "Batch-statistics noise and small batches"


@dataclass(frozen=True)
class Config:
    noise_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # m for the μ_B-noise panel
    noise_batches: int = 1_000  # batches drawn per m to measure the spread of μ_B
    sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # m of the batch-of-m series
    norms: tuple[str, ...] = ("bn", "none")  # SCHEMES trained on batches of m (batch-of-m series)
    # The small-batch series: every step sees group_batch examples, normalized in groups of m.
    group_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)  # m, each <= group_batch
    group_batch: int = 32  # the paper's 32 examples per step; at m = 32 Ghost BN is plain BN
    group_norms: tuple[str, ...] = ("ghost", "renorm")  # SCHEMES of the small-batch series
    # Running-estimate update per step of group_batch examples, spread over its groups (each
    # group of m moves them by 1 - (1 - x)^(m / group_batch)): at every m they average about
    # the last 1/x steps, as BN's over the whole batch at torch's momentum 0.1 do, so small
    # groups change what training normalizes by, not how noisy inference's statistics are.
    group_momentum_per_step: float = 0.1
    hidden: tuple[int, ...] = (100, 100, 100)  # as the mnist experiment, with ReLU units
    epochs: int = 10  # every run sees the same number of examples: epochs x training set
    # SGD at lr_at_32 x (batch / 32): the linear scaling rule keeps the step per example the
    # same, so batch sizes differ in noise, not in how far training gets.
    lr_at_32: float = 0.1
    lr_reference_batch: int = 32  # the batch size at which the rate is lr_at_32
    # Batch Renorm's bounds, relaxed over the run's first part as the paper relaxes them over
    # its first 5k-40k steps (its 5k steps of plain BN alone outlast this run's 1,562):
    # r_max = 1 and d_max = 0 (plain BN) for the first renorm_begin of the run, while the
    # moving averages that r and d correct towards forget their initial 0 and 1 (they keep
    # 0.9 of themselves a step: 0.9**78 < 0.1% after 5% of the default run's 1,562 steps),
    # then linearly to the paper's final bounds in its order, d first: its corner points
    # 5k/25k/40k read as 5%/25%/40% of the run, leaving the last 60% at the full correction.
    # Shares count each layer's normalization batches (num_batches_tracked: groups of m), so
    # the ramp spans the same share of the run at every m.
    renorm_r_max: float = 3.0  # final r_max (the paper's)
    renorm_d_max: float = 5.0  # final d_max (the paper's)
    renorm_begin: float = 0.05  # share of the run at r_max = 1, d_max = 0
    renorm_d_stop: float = 0.25  # share of the run at which d_max reaches renorm_d_max
    renorm_r_stop: float = 0.40  # share of the run at which r_max reaches renorm_r_max


QUICK = {"epochs": 1, "noise_batches": 200}

# The values each setting may take (config.check, before any data is read); validate checks
# the normalization names and how the settings fit together.
_ONE_EXAMPLE = "one example has no variance"
LIMITS = {
    "noise_sizes": Limit(1, FULL_TRAIN - 1, images=True),  # all of it would have no spread
    "noise_batches": Limit(2, why="a spread needs 2 batches"),
    "sizes": Limit(2, FULL_TRAIN, images=True, why=_ONE_EXAMPLE),
    "norms": Limit(),
    "group_sizes": Limit(2, why=_ONE_EXAMPLE),  # and <= group_batch: validate
    "group_batch": Limit(2, FULL_TRAIN, images=True, why=_ONE_EXAMPLE),
    "group_norms": Limit(),
    "group_momentum_per_step": Limit(0, 1, open_low=True),
    "hidden": Limit(1),
    "epochs": Limit(1),
    "lr_at_32": Limit(0, open_low=True),
    "lr_reference_batch": Limit(1),
    "renorm_r_max": Limit(1),  # r is clipped to [1/r_max, r_max]
    "renorm_d_max": Limit(0),  # d is clipped to [-d_max, d_max]
    "renorm_begin": Limit(0, 1, why="a share of the run"),
    "renorm_d_stop": Limit(0, 1, why="a share of the run"),
    "renorm_r_stop": Limit(0, 1, why="a share of the run"),
}

PUBLISHED = {
    "noise": "std(μ_B) = σ/√m for m examples drawn independently (closed form)",
    "batch_renorm_paper": {"bn_4_per_batch": 0.742, "renorm_4_per_batch": 0.765,
                           "bn_32_per_batch": 0.783},
}

# Legend and column names: the batch-of-m series, then the small-batch series.
LABELS = {"bn": "BN, batch of m", "none": "no normalization, batch of m",
          "ghost": "Ghost BN (BN per group of m)", "renorm": "Batch Renorm per group of m"}


def group_momentum(m: int, cfg: Config) -> float:
    """Momentum per group of m that moves the running estimates per step as much as
    ``group_momentum_per_step`` does per batch of ``group_batch`` (exactly it at m = batch).

    >>> round(group_momentum(2, Config()), 5), group_momentum(32, Config())
    (0.00656, 0.1)
    """
    keep = 1 - cfg.group_momentum_per_step
    return cfg.group_momentum_per_step if m == cfg.group_batch else \
        1 - keep ** (m / cfg.group_batch)


def _ghost_options(m: int, cfg: Config, updates: int) -> dict:
    return {"virtual_batch_size": m, "momentum": group_momentum(m, cfg)}


def renorm_bounds(cfg: Config, updates: int) -> dict:
    """``r_max`` and ``d_max`` schedules over a run of ``updates`` normalization batches.

    >>> bounds = renorm_bounds(Config(), updates=1000)
    >>> bounds["r_max"](50), bounds["r_max"](400), bounds["d_max"](250)
    (1.0, 3.0, 5.0)
    """
    begin = round(cfg.renorm_begin * updates)

    def ramp(start: float, end: float, stop: float) -> Ramp:
        # A run shorter than the schedule's corner points still gets a ramp of one step.
        return Ramp(start, end, begin=begin, stop=max(begin + 1, round(stop * updates)))

    return {"r_max": ramp(1.0, cfg.renorm_r_max, cfg.renorm_r_stop),
            "d_max": ramp(0.0, cfg.renorm_d_max, cfg.renorm_d_stop)}


def _renorm_options(m: int, cfg: Config, updates: int) -> dict:
    return {**_ghost_options(m, cfg, updates), **renorm_bounds(cfg, updates)}


# name -> (training batch size for m examples per normalization batch, layer options given m
# and the number of normalization batches each layer sees over the run); the layer itself
# comes from models.NORMS under the same name.
SCHEMES = {"bn": (lambda m, cfg: m, lambda m, cfg, updates: {}),
           "none": (lambda m, cfg: m, lambda m, cfg, updates: {}),
           "ghost": (lambda m, cfg: cfg.group_batch, _ghost_options),
           "renorm": (lambda m, cfg: cfg.group_batch, _renorm_options)}


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


def _plan(cfg: Config, norm: str, m: int, n_train: int) -> dict:
    """Everything that determines one training run: also its resume key (with the options
    described as data)."""
    batch_of, options_of = SCHEMES[norm]
    batch = batch_of(m, cfg)
    steps = max(1, cfg.epochs * n_train // batch)
    updates = steps * -(-batch // m)  # normalization batches per layer: ceil(batch/m) a step
    return {"norm": norm, "m": m, "train_batch": batch, "epochs": cfg.epochs, "steps": steps,
            "lr": cfg.lr_at_32 * batch / cfg.lr_reference_batch, "hidden": list(cfg.hidden),
            "options": options_of(m, cfg, updates)}


def _described(options: dict) -> dict:
    """Layer options as JSON: a schedule becomes its fields."""
    return {key: {"ramp": dataclasses.asdict(value)} if isinstance(value, Ramp) else value
            for key, value in options.items()}


def _train_one(ctx, plan: dict) -> dict:
    generator = ctx.generator()
    model = mlp(plan["hidden"], norm=plan["norm"], activation="relu",
                norm_options=plan["options"]).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan["lr"])
    with ctx.progress(f"{plan['norm']} m={plan['m']}", plan["steps"]) as advance:
        diverged = train(model, optimizer, ctx.data.x_train, ctx.data.y_train,
                         steps=plan["steps"], batch_size=plan["train_batch"],
                         generator=generator, advance=advance)
    return {"train_batch": plan["train_batch"], "lr": plan["lr"], "steps": plan["steps"],
            "diverged_at": diverged,
            "test_accuracy": None if diverged else accuracy(model, ctx.data.x_test,
                                                             ctx.data.y_test)}


def _run_one(ctx, norm: str, m: int) -> dict:
    plan = _plan(ctx.config, norm, m, len(ctx.data.x_train))
    spec = {**plan, "options": _described(plan["options"])}
    label = f"{norm}-m{m}" + ("" if plan["train_batch"] == m else f"-in{plan['train_batch']}")
    result = ctx.run(label, spec, lambda: _train_one(ctx, plan))
    return {"norm": norm, "batch_size": m, **result, "options": spec["options"]}


def validate(cfg: Config) -> None:
    """Reject unknown normalizations, impossible group sizes and schedules before any work.

    The range of each setting on its own is :data:`LIMITS` (checked first); this checks the
    names and how the settings fit together.
    """
    unknown = [name for name in (*cfg.norms, *cfg.group_norms)
               if name not in SCHEMES or name not in NORMS]
    if unknown:
        available = sorted(set(SCHEMES) & set(NORMS))
        raise ValueError(f"norms, group_norms: unknown {unknown}; available: {available}")
    for norm, m in [(n, m) for n in cfg.norms for m in cfg.sizes] + \
                   [(n, m) for n in cfg.group_norms for m in cfg.group_sizes]:
        batch = SCHEMES[norm][0](m, cfg)
        if batch < m:
            raise ValueError(f"{norm} at m={m}: it trains on batches of {batch}, fewer than "
                             f"m; keep m <= {batch} or raise group_batch")
    fractions = (cfg.renorm_begin, cfg.renorm_d_stop, cfg.renorm_r_stop)
    if not cfg.renorm_begin < min(fractions[1:]):
        raise ValueError(f"renorm_begin < renorm_d_stop, renorm_r_stop must hold (the ramp "
                         f"begins before it stops), got {fractions}")


def _small_batch(cfg: Config, same: list[dict], grouped: list[dict]) -> dict:
    """The small-batch table: one row per m, one accuracy per method, the paper's beside."""
    paper = PUBLISHED["batch_renorm_paper"]
    by = {(r["norm"], r["batch_size"]): r["test_accuracy"] for r in grouped}
    bn = {r["batch_size"]: r["test_accuracy"] for r in same if r["norm"] == "bn"}
    table = [{"m": m, **{norm: by[(norm, m)] for norm in cfg.group_norms},
              "bn_batch_of_m": bn.get(m),
              "published_bn": {4: paper["bn_4_per_batch"], 32: paper["bn_32_per_batch"]}.get(m),
              "published_renorm": {4: paper["renorm_4_per_batch"]}.get(m)}
             for m in cfg.group_sizes]
    return {"train_batch": cfg.group_batch, "norms": list(cfg.group_norms), "table": table,
            "runs": grouped}


def run(ctx) -> dict:
    cfg = ctx.config
    validate(cfg)
    noise = ctx.run("noise", {key: value for key, value in as_dict(cfg).items()
                              if key.startswith("noise")}, lambda: _noise(ctx))
    same = [_run_one(ctx, norm, m) for norm in cfg.norms for m in cfg.sizes]
    grouped = [_run_one(ctx, norm, m) for norm in cfg.group_norms for m in cfg.group_sizes]
    return {"noise": noise, "accuracy": same, "small_batch": _small_batch(cfg, same, grouped),
            "published": PUBLISHED}


def metrics(results: dict) -> list[dict]:
    noise = results["noise"]
    rows = [{"panel": "noise", "m": m, "measured_std_ratio": a, "predicted_std_ratio": b}
            for m, a, b in zip(noise["m"], noise["measured"], noise["predicted"], strict=True)]
    for panel, runs in (("accuracy", results["accuracy"]),
                        ("small_batch", results["small_batch"]["runs"])):
        rows += [{"panel": panel, "norm": r["norm"], "m": r["batch_size"],
                  "train_batch": r["train_batch"], "lr": r["lr"], "steps": r["steps"],
                  "test_accuracy": r["test_accuracy"]} for r in runs]
    return rows


def _nan(value):
    return np.nan if value is None else value


def _small_batch_figure(results: dict, directory) -> str:
    plt = pyplot()
    small, paper = results["small_batch"], results["published"]["batch_renorm_paper"]
    figure, (ours, zoom, theirs) = plt.subplots(1, 3, figsize=(14, 4),
                                                gridspec_kw={"width_ratios": [2, 2, 1.2]})
    # (b) leaves out the smallest m, whose collapse would flatten the other differences.
    for axes, rows in ((ours, small["table"]), (zoom, small["table"][1:])):
        m = [row["m"] for row in rows]
        for norm in small["norms"]:
            axes.semilogx(m, [_nan(row[norm]) for row in rows], "o-", base=2,
                          label=f"{LABELS.get(norm, norm)} in a batch of {small['train_batch']}")
        if any(row["bn_batch_of_m"] is not None for row in rows):
            axes.semilogx(m, [_nan(row["bn_batch_of_m"]) for row in rows], "s--", base=2,
                          color="gray", label="BN, batch of m (m examples per step)")
        axes.set(xlabel="examples per normalization batch m")
    ours.set(ylabel="test accuracy",
             title=f"(a) ours: MNIST, {results['dataset']['n_train']:,} training images")
    zoom.set_title("(b) the same without the smallest m")
    ours.legend(fontsize=8)
    theirs.plot([4, 32], [paper["bn_4_per_batch"], paper["bn_32_per_batch"]], "o", label="BN")
    theirs.plot([4], [paper["renorm_4_per_batch"]], "^", label="Batch Renorm")
    theirs.set_xscale("log", base=2)
    theirs.set(xlim=(1.5, 45), xlabel="examples per normalization batch m",
               title="(c) published: ImageNet, Inception")
    theirs.legend(fontsize=8)
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return save_figure(figure, directory / "small_batch.png")


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
        right.semilogx([r["batch_size"] for r in rows], [_nan(r["test_accuracy"]) for r in rows],
                       "o-", base=2, label=LABELS.get(norm, norm))
    right.set(xlabel="examples per batch m (training batch = normalization batch)",
              ylabel="test accuracy", title="(b) test accuracy against batch size")
    right.legend(fontsize=8)
    figure.suptitle(f"{results['dataset']['note']}; seed {results['seed']}", fontsize=9)
    return [save_figure(figure, directory / "batch_size.png"),
            _small_batch_figure(results, directory)]


def _claim(results: dict) -> Section:
    cfg, paper = results["config"], results["published"]["batch_renorm_paper"]
    return Section("Claim and setup", [
        "BN normalizes with the statistics of the current batch, so each example's output "
        "depends on the other examples: noise of size σ/√m in the mean, which regularizes, "
        "and which grows as batches shrink until training and inference no longer agree. "
        "Batch Renormalization (Ioffe, 2017) keeps the examples per step and normalizes them "
        f"in groups of 4: BN reaches {fmt(paper['bn_4_per_batch'], 3)} there against "
        f"{fmt(paper['bn_32_per_batch'], 3)} with 32 per normalization batch, and Batch "
        f"Renorm {fmt(paper['renorm_4_per_batch'], 3)} at 4 (ImageNet, Inception).",
        f"Here: (a) the first-layer pre-activations of a freshly initialized 784-100 layer on "
        f"the training images; (b) a {'-'.join(map(str, cfg['hidden']))} ReLU network with "
        "each normalization before every ReLU, trained with plain SGD at "
        f"{cfg['lr_at_32']} x batch / {cfg['lr_reference_batch']}; every run sees the same "
        f"{cfg['epochs']} epoch(s) of examples. Two series answer different questions: "
        "*batch of m* trains on batches of m (fewer examples per step as m shrinks); the "
        f"*small-batch* series keeps {cfg['group_batch']} examples per step and normalizes "
        "them in groups of m, with BN per group (Ghost BN) or Batch Renorm per group. "
        f"Data: {results['dataset']['note']}.",
    ])


def _schedule_text(results: dict) -> str:
    cfg = results["config"]
    steps = "/".join(map(str, sorted({r["steps"] for r in results["small_batch"]["runs"]})))
    return (
        f"Batch Renorm schedule: r_max = 1 and d_max = 0 (plain BN) for the first "
        f"{100 * cfg['renorm_begin']:.0f}% of each layer's normalization batches, then linearly "
        f"to d_max = {cfg['renorm_d_max']:g} at {100 * cfg['renorm_d_stop']:.0f}% and r_max = "
        f"{cfg['renorm_r_max']:g} at {100 * cfg['renorm_r_stop']:.0f}%: the paper's final "
        "bounds and its corner points 5k/25k/40k steps as shares of this much shorter run "
        f"({steps} steps of {cfg['group_batch']}: the paper's 5k steps of plain BN alone "
        "would outlast it), "
        "so the moving averages have settled before r and d correct towards them and the last "
        f"{100 * (1 - max(cfg['renorm_d_stop'], cfg['renorm_r_stop'])):.0f}% of training "
        "runs at the full correction. Inference, for every network, is eval mode with the "
        "running estimates (Algorithm 2's moving-average form). With Ghost BN and Batch Renorm "
        "they are moving averages of group means and unbiased group variances: every group "
        f"of m updates them in turn with momentum 1 − (1 − {cfg['group_momentum_per_step']:g})"
        f"^(m/{cfg['group_batch']}), so at every m they average about the last "
        f"{1 / cfg['group_momentum_per_step']:.0f} steps "
        f"({cfg['group_batch'] / cfg['group_momentum_per_step']:.0f} examples), as BN's over "
        f"the whole batch of {cfg['group_batch']} do at that momentum; Batch Renorm's training "
        "outputs are corrected towards these same statistics, Ghost BN's are not. The "
        "batch-of-m series keeps torch's momentum 0.1 per batch of m.")


def _recovered(results: dict) -> str:
    """How much of the gap between Ghost BN at m = 4 and at m = batch Batch Renorm closes."""
    rows = {row["m"]: row for row in results["small_batch"]["table"]}
    paper = results["published"]["batch_renorm_paper"]
    full = rows.get(results["small_batch"]["train_batch"], {}).get("ghost")
    small, renorm = rows.get(4, {}).get("ghost"), rows.get(4, {}).get("renorm")
    if None in (full, small, renorm) or full == small:
        return ""
    theirs = ((paper["renorm_4_per_batch"] - paper["bn_4_per_batch"])
              / (paper["bn_32_per_batch"] - paper["bn_4_per_batch"]))
    return (f"At m = 4 Batch Renorm closes {100 * (renorm - small) / (full - small):.0f}% of the "
            f"gap between Ghost BN at 4 ({fmt(small)}) and BN over the whole batch "
            f"({fmt(full)}) with this seed; in the paper it closes {100 * theirs:.0f}%.")


def _small_batch_table(results: dict) -> Table:
    small = results["small_batch"]
    header = ["examples per normalization batch m",
              *(f"{LABELS.get(n, n)} (ours)" for n in small["norms"]),
              "BN, batch of m (ours)", "BN (published)", "Batch Renorm (published)"]
    rows = [[str(row["m"]), *(fmt(row[n]) for n in small["norms"]), fmt(row["bn_batch_of_m"]),
             fmt(row["published_bn"], 3), fmt(row["published_renorm"], 3)]
            for row in small["table"]]
    return Table(header, rows, f"Small batches: test accuracy with {small['train_batch']} "
                 "examples per step normalized in groups of m (Ghost BN at m = "
                 f"{small['train_batch']} is BN over the whole batch), beside BN trained on "
                 "batches of m; published: ImageNet validation accuracy of Inception "
                 "(Batch Renorm paper), — where not reported or where training diverged.")


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
    accuracy_table = Table(["examples per batch m", *(LABELS.get(n, n) for n in norms)],
                           [[str(m), *(fmt(by[(n, m)]["test_accuracy"]) if (n, m) in by else "—"
                                       for n in norms)] for m in cfg["sizes"]],
                           "Batch of m: test accuracy after training on batches of m; — where "
                           "training diverged.")
    return [_claim(results),
            Section("Results", [], [noise_table, accuracy_table, _small_batch_table(results)],
                    figure_names),
            Section("Small batches: schedule and inference",
                    [text for text in (_recovered(results), _schedule_text(results)) if text])]


def headline(results: dict) -> tuple[str, str]:
    noise = results["noise"]
    error = max(abs(a / b - 1) for a, b in zip(noise["measured"], noise["predicted"], strict=True))
    by = {(r["norm"], r["batch_size"]): r["test_accuracy"] for r in results["accuracy"]}
    sizes = results["config"]["sizes"]
    small, large = sizes[0], 32 if 32 in sizes else sizes[-1]
    ours = (f"std(μ_B) within {100 * error:.1f}% of σ/√m; BN on batches of m: "
            f"{fmt(by.get(('bn', small)))} at m={small}, {fmt(by.get(('bn', large)))} at "
            f"m={large}")
    rows = {row["m"]: row for row in results["small_batch"]["table"]}
    if 4 in rows:
        row = rows[4]
        ours += "; groups of 4 in 32: " + ", ".join(
            f"{LABELS.get(n, n).split(' (')[0]} {fmt(row.get(n))}"
            for n in results["small_batch"]["norms"])
    return ours, "σ/√m; groups of 4: BN 0.742, Batch Renorm 0.765; BN 0.783 at 32 (ImageNet)"
