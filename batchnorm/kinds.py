"""The kinds of batch-norm layer, in one table, and how a layer is swapped for another kind.

Every conversion of the package reads this table: ``convert`` (another library's layer to
this package's), ``convert_sync_batchnorm`` (to ``SyncBatchNorm``), ``freeze`` (to a frozen
layer), ``fold`` (which layers fold into the layer before them, and which leave their
activation behind) and ``recalibrate`` (which layers keep running statistics to re-estimate).

=====================  ======================================  ====================  ====  =====
layer                  twins (converted to it)                 frozen form           sync  fused
=====================  ======================================  ====================  ====  =====
BatchNorm1d/2d/3d      torch ``nn.BatchNorm1d/2d/3d``          FrozenBatchNorm*d     yes   no
BatchNormAct1d/2d/3d   timm ``BatchNormAct2d``                 FrozenBatchNormAct*d  yes   yes
LazyBatchNorm1d/2d/3d  torch ``nn.LazyBatchNorm1d/2d/3d``      --                    --    no
BatchRenorm1d/2d/3d    --                                      FrozenBatchNorm*d     --    no
FrozenBatchNorm1d/2d/  torchvision's and timm's                (itself)              --    no
3d                     ``FrozenBatchNorm2d``
FrozenBatchNormAct*d   timm ``FrozenBatchNormAct2d``           (itself)              --    yes
(sync form)            torch ``nn.SyncBatchNorm``,             --                    yes   no/yes
                       timm ``SyncBatchNormAct``
=====================  ======================================  ====================  ====  =====

"sync" says whether ``convert_sync_batchnorm`` takes the kind (to ``SyncBatchNorm``, or
``SyncBatchNormAct`` when "fused": the layer carries an activation, a drop and a residual
after the normalization, which every conversion keeps). Rows match a layer by its exact type:
a subclass may behave differently, so it is left alone (``convert`` warns about it). timm's and
torchvision's rows are read only when those libraries are already imported: a model built
with them has imported them, and importing them otherwise would cost seconds.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    _FrozenBatchNorm,
)
from batchnorm.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _Act, _set_tail
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _BatchNorm,
)
from batchnorm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


@dataclass(frozen=True)
class Kind:
    """One row of the table: a layer class of this package and its relatives.

    ``layer`` is ``None`` for the row of the sync twins (their layer is the sync form).
    """

    layer: type | None
    twins: tuple[type, ...]
    frozen: type | None
    sync: bool
    fused: bool


def _optional(module: str, *names: str) -> tuple[type, ...]:
    """Classes of an optional library, if it is imported (else none)."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name))


def table() -> tuple[Kind, ...]:
    """The table of the module docstring."""
    timm = "timm.layers.norm_act"
    return (
        Kind(BatchNorm1d, (nn.BatchNorm1d,), FrozenBatchNorm1d, True, False),
        Kind(BatchNorm2d, (nn.BatchNorm2d,), FrozenBatchNorm2d, True, False),
        Kind(BatchNorm3d, (nn.BatchNorm3d,), FrozenBatchNorm3d, True, False),
        Kind(BatchNormAct1d, (), FrozenBatchNormAct1d, True, True),
        Kind(BatchNormAct2d, _optional(timm, "BatchNormAct2d"), FrozenBatchNormAct2d, True,
             True),
        Kind(BatchNormAct3d, (), FrozenBatchNormAct3d, True, True),
        Kind(LazyBatchNorm1d, (nn.LazyBatchNorm1d,), None, False, False),
        Kind(LazyBatchNorm2d, (nn.LazyBatchNorm2d,), None, False, False),
        Kind(LazyBatchNorm3d, (nn.LazyBatchNorm3d,), None, False, False),
        Kind(BatchRenorm1d, (), FrozenBatchNorm1d, False, False),
        Kind(BatchRenorm2d, (), FrozenBatchNorm2d, False, False),
        Kind(BatchRenorm3d, (), FrozenBatchNorm3d, False, False),
        Kind(FrozenBatchNorm1d, (), FrozenBatchNorm1d, False, False),
        Kind(FrozenBatchNorm2d, _optional("torchvision.ops.misc", "FrozenBatchNorm2d")
             + _optional(timm, "FrozenBatchNorm2d"), FrozenBatchNorm2d, False, False),
        Kind(FrozenBatchNorm3d, (), FrozenBatchNorm3d, False, False),
        Kind(FrozenBatchNormAct1d, (), FrozenBatchNormAct1d, False, True),
        Kind(FrozenBatchNormAct2d, _optional(timm, "FrozenBatchNormAct2d"),
             FrozenBatchNormAct2d, False, True),
        Kind(FrozenBatchNormAct3d, (), FrozenBatchNormAct3d, False, True),
        Kind(None, (nn.SyncBatchNorm,), None, True, False),
        Kind(None, _optional(timm, "SyncBatchNormAct"), None, True, True),
    )


def kind_of(module: nn.Module) -> Kind | None:
    """The row whose layer or twins include ``type(module)`` exactly, or ``None``.

    >>> kind_of(nn.BatchNorm2d(3)).layer.__name__, kind_of(nn.Conv2d(3, 3, 1))
    ('BatchNorm2d', None)
    """
    cls = type(module)
    for kind in table():
        if cls is kind.layer or cls in kind.twins:
            return kind
    return None


def inherited_kind(module: nn.Module) -> Kind | None:
    """The row of the nearest class in ``type(module)``'s hierarchy that the table names: a
    subclass's row, by what it extends.

    >>> class Mine(nn.BatchNorm1d):
    ...     pass
    >>> kind_of(Mine(3)) is None, inherited_kind(Mine(3)).layer.__name__
    (True, 'BatchNorm1d')
    """
    rows = table()
    for cls in type(module).__mro__:
        for kind in rows:
            if cls is kind.layer or cls in kind.twins:
                return kind
    return None


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with per-channel statistics: any batch-norm layer of this
    package, torch (subclasses included) or the table."""
    return (isinstance(module, _BatchNorm | _FrozenBatchNorm | nn.modules.batchnorm._BatchNorm)
            or kind_of(module) is not None)


def is_fused(module: nn.Module) -> bool:
    """Whether a batch-norm layer carries an activation (a drop, a residual) after it."""
    kind = kind_of(module)
    return isinstance(module, _Act) or (kind is not None and kind.fused)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
          "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
          "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def take_over(old: nn.Module, cls: type, **attributes) -> nn.Module:
    """A ``cls`` layer holding ``old``'s own parameter and buffer tensors (so an optimizer
    built before still updates them), hyperparameters, training mode, hooks and, for a fused
    layer, its activation and drop modules; then ``attributes`` set on it."""
    if issubclass(cls, LazyModuleMixin):  # nothing to take over yet: the same configuration
        new = cls(old.eps, old.momentum, old.affine, old.track_running_stats,
                  bias=old.bias is not None)
    else:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                     "virtual_batch_size", "process_group"):
            if hasattr(old, name):
                setattr(new, name, getattr(old, name))
        if not hasattr(old, "num_features"):  # torchvision's frozen layer has its tensors only
            new.num_features = old.weight.numel()
        _take_tensors(old, new, frozen=issubclass(cls, _FrozenBatchNorm))
    if issubclass(cls, _Act):
        take_tail(old, new)
    for name in _HOOKS:
        hooks = getattr(old, name, None)
        if hooks is not None:  # added to the new layer's own (a lazy layer's setup hooks)
            own = getattr(new, name)
            own.update((key, hook) for key, hook in hooks.items()
                       if getattr(hook, "__self__", None) is not old)  # not old's own setup
    new.train(old.training)
    for name, value in attributes.items():
        setattr(new, name, value)
    return new


def take_tail(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (fused) the activation and drop of ``old``: this package's fused layers
    hold them as ``activation``/``act``/``drop``; timm's as ``act``/``drop`` modules, of which
    a ReLU is fused from now on."""
    if isinstance(old, _Act):
        new.activation, new.act, new.drop = old.activation, old.act, old.drop
    else:
        _set_tail(new, getattr(old, "act", None), getattr(old, "drop", None))


def _take_tensors(old: nn.Module, new: nn.Module, frozen: bool) -> None:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if name in old._parameters:
            new.register_parameter(name, old._parameters[name])
        elif name in old._buffers:
            new.register_buffer(name, old._buffers[name])
        elif name in ("weight", "bias"):
            new.register_parameter(name, None)
        elif not frozen:  # frozen layers keep no counter
            new.register_buffer(name, None)


def replace_layers(module: nn.Module, make: Callable[[nn.Module, Kind | None], nn.Module | None]
                   ) -> tuple[nn.Module, Counter]:
    """Swap every batch-norm layer for ``make(layer, kind)`` where that is not ``None``, in
    place; ``kind`` is the layer's row (``None`` for a batch-norm layer no row matches).

    Returns:
        ``(module, counts)``: the model (a new layer if ``module`` itself was swapped) and how
        many layers of each ``"old -> new"`` pair were swapped.
    """
    counts = Counter()
    new = make(module, kind_of(module)) if is_batch_norm(module) else None
    if new is not None:
        counts[f"{type(module).__name__} -> {type(new).__name__}"] += 1
        return new, counts
    for name, child in module.named_children():
        new_child, child_counts = replace_layers(child, make)
        counts.update(child_counts)
        if new_child is not child:
            setattr(module, name, new_child)
    return module, counts


def warn_unconverted(module: nn.Module, what: str) -> None:
    """Warn about batch-norm layers of ``module`` that no row matches (subclasses of torch's,
    say), which ``what`` (a conversion) therefore left as they are."""
    left = Counter(type(m).__name__ for m in module.modules()
                   if is_batch_norm(m) and kind_of(m) is None
                   and not isinstance(m, _BatchNorm | _FrozenBatchNorm))
    if left:
        names = ", ".join(f"{count} {name}" for name, count in sorted(left.items()))
        warnings.warn(f"{what} left batch-norm layers of types it does not know as they are: "
                      f"{names}; subclasses may behave differently from the class they extend, "
                      "so they are not converted", stacklevel=3)
