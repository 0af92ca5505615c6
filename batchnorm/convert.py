"""Conversions of whole models: ``convert`` (to this package's layers) and ``freeze``.

Both read the table of ``batchnorm.kinds``, as ``SyncBatchNorm.convert_sync_batchnorm`` and
``fold`` do.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from batchnorm import kinds
from batchnorm.frozen import _FrozenBatchNorm
from batchnorm.fused import _Act
from batchnorm.sync import SyncBatchNorm, SyncBatchNormAct

_log = logging.getLogger("batchnorm")


def convert(module: nn.Module) -> nn.Module:
    """Replace the batch-norm layers of torch, timm and torchvision in ``module`` by this
    package's, in place.

    ``torch.nn.BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d`` and ``SyncBatchNorm``, timm's
    ``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNorm2d`` and
    ``FrozenBatchNormAct2d``, and torchvision's ``FrozenBatchNorm2d`` become the layers of
    their row in ``batchnorm.kinds``. The new layers take over the old ones' parameter and
    buffer tensors themselves (so an optimizer built before the call still updates them),
    their hyperparameters, training mode, hooks, activation and drop modules (and a
    ``SyncBatchNorm``'s process group); device and dtype follow. Subclasses of these layers
    are left alone, since their behaviour may differ, with a warning that names them. How
    many layers of each type were replaced is logged (logger ``"batchnorm"``, level INFO).

    Args:
        module: a model, or a single batch-norm layer.

    Returns:
        The model with the layers replaced (a new layer if ``module`` itself was one).

    Example::

        >>> import torch
        >>> import batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = batchnorm.convert(model)
        >>> type(model[1]).__module__
        'batchnorm.modules'
    """
    def make(layer: nn.Module, kind: kinds.Kind | None):
        if kind is None or type(layer) not in kind.twins:
            return None  # this package's own layers, and layers no row knows, stay
        target = kind.layer or (SyncBatchNormAct if kind.fused else SyncBatchNorm)
        return kinds.take_over(layer, target)

    module, counts = kinds.replace_layers(module, make)
    _report("convert", counts)
    kinds.warn_unconverted(module, "convert")
    return module


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a frozen copy of its values, in place.

    The layers of ``batchnorm.kinds`` with a frozen form (``BatchNorm1d/2d/3d`` of torch,
    timm and this package, ``BatchRenorm1d/2d/3d``, ``BatchNormAct*d``), and other subclasses
    of torch's ``BatchNorm1d/2d/3d``, become ``FrozenBatchNorm1d/2d/3d`` (or
    ``FrozenBatchNormAct1d/2d/3d``, keeping the activation and drop modules) holding copies
    of their weight (1 without ``affine``), bias (0 without one), running statistics and
    ``eps``, on the same device and dtype. The model then computes in training mode what it
    computed in ``eval()`` before. The parameters leave ``model.parameters()``: build the
    optimizer after freezing.

    Args:
        model: a model, or a single batch-norm layer.

    Returns:
        The model with the layers replaced (a new layer if ``model`` itself was one).

    Raises:
        ValueError: a layer keeps no running statistics (``track_running_stats=False``),
            so there is nothing to freeze; or a ``SyncBatchNorm``, whose input rank is not
            known: freeze before ``convert_sync_batchnorm`` (frozen layers need no sync).

    Example::

        >>> import torch
        >>> import batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = batchnorm.freeze(model)
        >>> type(model[1]).__name__, len(list(model[1].parameters()))
        ('FrozenBatchNorm2d', 0)
    """
    model, counts = kinds.replace_layers(model, _frozen_copy)
    _report("freeze", counts)
    return model


def _frozen_copy(layer: nn.Module, kind: kinds.Kind | None) -> nn.Module | None:
    if isinstance(layer, _FrozenBatchNorm) or (kind is not None and kind.frozen is type(layer)):
        return None  # frozen already
    kind = kind or kinds.inherited_kind(layer)  # a subclass: its rank by what it extends
    cls = None if kind is None else kind.frozen
    if cls is None:
        raise ValueError(
            f"cannot freeze {layer!r}: a {type(layer).__name__} takes inputs of any rank, so "
            "the frozen layer's rank is unknown; freeze the model before "
            "convert_sync_batchnorm (frozen layers need no synchronization)")
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError(
            f"cannot freeze {layer!r}: it has no running statistics "
            "(track_running_stats=False) and normalizes every batch by its own; keep it "
            "trainable, or train it with track_running_stats=True")
    mean = layer.running_mean
    frozen = cls(layer.num_features, eps=layer.eps, device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        frozen.running_mean.copy_(mean)
        frozen.running_var.copy_(layer.running_var)
        if layer.weight is not None:
            frozen.weight.copy_(layer.weight)
        if layer.bias is not None:
            frozen.bias.copy_(layer.bias)
    if isinstance(frozen, _Act):
        kinds.take_tail(layer, frozen)
    return frozen


def _report(what: str, counts) -> None:
    if counts:
        _log.info("%s replaced %s", what, ", ".join(f"{n} x {pair}" for pair, n in
                                                    sorted(counts.items())))
