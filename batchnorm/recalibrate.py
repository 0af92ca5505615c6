"""``recalibrate``: re-estimate the running statistics of a model's batch norms (Algorithm 2).

Algorithm 2 replaces the moving averages of training by population statistics over mini-batches
of the training network, per channel of every BN layer's input:

    E[x]   = E_B[mu_B]
    Var[x] = m / (m - 1) * E_B[sigma_B**2]

with ``mu_B`` and ``sigma_B**2`` the mean and biased variance of each batch's ``m`` values per
channel. After weight averaging, pruning or a change of data the running estimates no longer
describe the network; recalibrating recomputes them from a few batches, exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from batchnorm import kinds
from batchnorm.frozen import _FrozenBatchNorm
from batchnorm.renorm import _BatchRenorm


@dataclass
class _Sums:
    """Per-layer sums over the observed batches, in float64."""

    mean: Tensor | float = 0.0  # sum of mu_B
    var: Tensor | float = 0.0  # sum of m_B / (m_B - 1) * sigma_B**2
    count: int = 0  # batches observed


def recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Reset and re-estimate the running statistics of every batch norm in ``model``.

    The model runs on each batch without gradients, its batch-norm layers in training mode
    so that each normalizes by the batch's statistics, as in the training network of
    Algorithm 2; a hook records each BN input's per-channel mean and biased variance in
    float64. Each layer then gets

    * ``running_mean`` = the average over batches of the batch means (``E_B[mu_B]``),
    * ``running_var`` = the average of the unbiased batch variances ``m/(m-1) * sigma_B**2``
      (Algorithm 2's ``m/(m-1) E_B[sigma_B**2]`` when all batches have ``m`` values per
      channel), and
    * ``num_batches_tracked`` = the number of batches averaged.

    Details:

    * Layers: ``BatchNorm1d/2d/3d`` (torch's, this package's, ``SyncBatchNorm``) and
      ``BatchRenorm*d``, which normalize as plain batch norm (``r = 1``, ``d = 0``) while
      recalibrating. Layers without running statistics and frozen layers are left alone, as
      are layers no batch reached.
    * Ghost batch norm (``virtual_batch_size``): each chunk counts as a batch.
    * A batch whose statistics at a layer are not finite is skipped at that layer, as
      training skips it.
    * Weights and other buffers are untouched; every module's training mode is restored.
      Other layers run in the mode they are in: call ``model.eval()`` first to keep dropout
      out of the statistics. If a batch fails, the statistics are restored before the error
      propagates.
    * Under ``torch.distributed`` each process averages over its own batches.

    Args:
        model: the model to recalibrate, in place.
        batches: iterable of inputs on the model's device: a tensor is passed as
            ``model(batch)``; a tuple or list (``(input, target)`` from a data loader) as
            ``model(batch[0])``.
        num_batches: use at most this many batches; ``None`` for all. Default: ``None``.

    Returns:
        ``model``.

    Example::

        >>> import torch
        >>> from batchnorm.recalibrate import recalibrate
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).eval()
        >>> batches = [torch.randn(8, 3) for _ in range(5)]
        >>> model = recalibrate(model, batches)
        >>> int(model[1].num_batches_tracked), model.training
        (5, False)
    """
    if num_batches is not None and (not isinstance(num_batches, int)
                                    or isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    layers = [m for m in model.modules()
              if kinds.is_batch_norm(m) and not isinstance(m, _FrozenBatchNorm)
              and getattr(m, "running_mean", None) is not None
              and getattr(m, "num_batches_tracked", None) is not None]
    if not layers:
        raise ValueError("the model has no batch-norm layer with running statistics to "
                         "recalibrate (frozen layers and track_running_stats=False are skipped)")
    modes = [(m, m.training) for m in model.modules()]
    saved = {m: {k: v.clone() for k, v in _stat_buffers(m).items()} for m in layers}
    bounds = [(m, m.r_max, m.d_max) for m in layers if isinstance(m, _BatchRenorm)]
    sums = {m: _Sums() for m in layers}
    handles = [m.register_forward_pre_hook(_observer(sums[m])) for m in layers]
    try:
        for m in layers:
            m.train()
        for m, _, _ in bounds:
            m.r_max, m.d_max = 1.0, 0.0  # Batch Renorm reduces to batch norm
        if _run(model, batches, num_batches) == 0:
            raise ValueError("batches gave no batch; pass at least one input")
        for m in layers:
            _write(m, sums[m], saved[m])
    except BaseException:
        for m in layers:
            _restore(m, saved[m])
        raise
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
        for m, r_max, d_max in bounds:
            m.r_max, m.d_max = r_max, d_max
    return model


def _stat_buffers(m: nn.Module) -> dict[str, Tensor]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {k: getattr(m, k) for k in names if getattr(m, k, None) is not None}


def _restore(m: nn.Module, saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            getattr(m, name).copy_(value)


def _run(model: nn.Module, batches: Iterable, num_batches: int | None) -> int:
    used = 0
    with torch.no_grad():
        for batch in batches:
            if num_batches is not None and used == num_batches:
                break
            if isinstance(batch, tuple | list):
                batch = batch[0]
            if not isinstance(batch, Tensor):
                raise TypeError(f"each batch must be a tensor or a tuple/list whose first item "
                                f"is the input tensor, got {type(batch).__name__}")
            model(batch)
            used += 1
    return used


def _observer(sums: _Sums):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        k = getattr(module, "virtual_batch_size", None)
        # Ghost batch norm normalizes chunk by chunk: each chunk is a batch of its own.
        chunks = x.split(k) if k is not None and x.shape[0] > k else (x,)
        for chunk in chunks:
            _observe(sums, chunk.detach())

    return hook


def _observe(sums: _Sums, x: Tensor) -> None:
    if x.numel() == 0 or x.dim() < 2:
        return  # the layer itself returns an empty output or raises
    x3 = x.reshape(x.shape[0], x.shape[1], -1).double()
    m = x3.shape[0] * x3.shape[2]
    if m < 2:
        return  # the layer raises: one value per channel has no variance
    var, mean = torch.var_mean(x3, dim=(0, 2), correction=0)
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        return  # as in training, a non-finite batch changes no estimate
    sums.mean = sums.mean + mean
    sums.var = sums.var + var * (m / (m - 1))
    sums.count += 1


def _write(m: nn.Module, sums: _Sums, saved: dict[str, Tensor]) -> None:
    if sums.count == 0:
        _restore(m, saved)  # no batch reached this layer: keep what it had
        return
    with torch.no_grad():
        m.running_mean.copy_(sums.mean / sums.count)
        m.running_var.copy_(sums.var / sums.count)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(sums.count)
