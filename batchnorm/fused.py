"""Batch norm fused with what follows it: the activation, a residual, a dropout.

``BatchNormAct1d/2d/3d`` compute ``act(drop(BN(x) + residual))``; the ReLU is fused into the
batch-norm kernels, any other activation module runs after. ``Epilogue`` is that tail alone,
which ``fold`` and ``freeze`` keep where they replace the normalization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, fx_leaf


class Epilogue(nn.Module):
    """What follows the normalization in a fused layer: ``act(drop(z + residual))``.

    ``activation="relu"`` is applied by the batch-norm kernel itself (``z`` arrives with it
    applied, which commutes with a dropout's non-negative scaling); ``act`` is any other
    activation module, applied after ``drop`` (a dropout or DropBlock module), in timm's
    order. Standing alone (after ``fold``), the ReLU is applied here.

    Args:
        activation: ``"relu"``, ``None``, or an activation module (``nn.ReLU`` counts as
            ``"relu"``). Default: ``None``.
        drop: a module applied before ``act``, or ``None``. Default: ``None``.

    >>> import torch
    >>> Epilogue("relu")(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -3.0]))
    tensor([2., 0.])
    """

    def __init__(self, activation: str | nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__()
        _set_tail(self, activation, drop)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is not None:
            input = input + residual
        if self.activation == "relu":
            input = torch.relu(input)
        return self.act(self.drop(input))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}" if self.activation else ""


def _set_tail(module: nn.Module, activation, drop: nn.Module | None) -> None:
    """``module.activation`` (the ReLU the kernels fuse, or ``None``), ``module.drop`` and
    ``module.act`` (any other activation module), ``nn.Identity`` where there is none."""
    fused = activation
    if isinstance(activation, nn.ReLU):
        fused, activation = "relu", None
    elif isinstance(activation, nn.Module):
        fused = None
    elif activation not in F.ACTIVATIONS:
        raise ValueError(f"activation must be one of {F.ACTIVATIONS} or an activation module "
                         f"(e.g. nn.SiLU()), got {activation!r}")
    else:
        activation = None
    module.activation = fused
    module.drop = drop if drop is not None else nn.Identity()
    module.act = activation if activation is not None else nn.Identity()


class _Act:
    """Batch norm followed by its activation, with an optional residual added before it: the
    ReLU fused into the kernels, another activation module and a ``drop`` module after."""

    def __init__(self, num_features: int, *args, activation: str | nn.Module | None = "relu",
                 drop: nn.Module | None = None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        _set_tail(self, activation, drop)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy) or isinstance(residual, torch.fx.Proxy):
            return fx_leaf(self, input, residual)
        return self.act(self.drop(self._forward(input, residual)))

    def epilogue(self) -> Epilogue:
        """This layer's activation, drop and residual as a module of their own (``fold``)."""
        unfused = self.act if not isinstance(self.act, nn.Identity) else self.activation
        return Epilogue(unfused, self.drop if not isinstance(self.drop, nn.Identity) else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_Act, BatchNorm1d):
    pass


class BatchNormAct2d(_Act, BatchNorm2d):
    pass


class BatchNormAct3d(_Act, BatchNorm3d):
    pass


_ACT_DOC = r"""``{base}`` fused with its activation: ``act(BN(x) + residual)`` in one pass.

    The block ``BN -> (+ residual) -> ReLU`` that ends most convolutional units, computed by one
    kernel forward and one backward where the backend has them (Triton), so the normalized
    tensor and the sum are never written out. State, arguments and checkpoints are
    ``{base}``'s (an activation module with parameters adds its own, under ``act.``).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            virtual_batch_size: as ``{base}``.
        activation: ``"relu"`` (fused), ``None``, or an activation module such as
            ``nn.SiLU()``, applied after ``drop`` as timm's ``BatchNormAct2d`` does.
            Default: ``"relu"``.
        drop: a module applied before a module activation (timm's ``drop_layer``), or
            ``None``. Default: ``None``.

    Call it as ``layer(input)`` or ``layer(input, residual)``, with ``residual`` a tensor of
    the input's shape, dtype and device, added before the activation.

    Examples::

        >>> import torch
        >>> from batchnorm import {name}
        >>> layer = {name}(3)
        >>> x, shortcut = torch.randn({example}), torch.randn({example})
        >>> y = layer(x, shortcut)
        >>> bool((y >= 0).all()), tuple(y.shape)
        (True, ({example}))
    """

for _cls, _example in ((BatchNormAct1d, "4, 3, 7"), (BatchNormAct2d, "4, 3, 5, 5"),
                       (BatchNormAct3d, "2, 3, 2, 4, 4")):
    _cls.__doc__ = _ACT_DOC.format(name=_cls.__name__, base=_cls.__mro__[2].__name__,
                                   example=_example)
