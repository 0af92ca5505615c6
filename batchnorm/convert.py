"""``convert``: swap torch.nn's batch-norm layers in a model for this package's."""

from __future__ import annotations

from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

_REPLACEMENTS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in ``module`` by this
    package's, in place.

    The new layers take over the old ones' parameter and buffer tensors themselves (so an
    optimizer built before the call still updates them), their hyperparameters and their
    training mode (and a ``SyncBatchNorm``'s process group); device and dtype follow. Subclasses
    of torch's layers are left alone, since their behaviour may differ.

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
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is not None:
        return _take_over(module, replacement)
    if type(module) is nn.SyncBatchNorm:
        from batchnorm.sync import SyncBatchNorm  # imported here: sync imports this module

        new = _take_over(module, SyncBatchNorm)
        new.process_group = module.process_group
        return new
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _take_over(old: nn.modules.batchnorm._BatchNorm, cls: type) -> _BatchNorm:
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(new, attr, getattr(old, attr))
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name in ("weight", "bias"):
        if name not in new._parameters:
            new.register_parameter(name, None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, old._buffers.get(name))
    new.train(old.training)
    return new
