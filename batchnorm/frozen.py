"""Frozen batch norm: fixed statistics and affine parameters, all buffers, nothing to learn.

A frozen layer is Algorithm 2's inference transform and nothing else, in training mode too:

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale
    y     = x * scale + shift

Detection and segmentation backbones fine-tuned with a few images per device freeze their
batch norms this way; ``freeze(model)`` does it to a whole model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from batchnorm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


class _FrozenBatchNorm(nn.Module):
    """The four tensors as buffers, ``eps``, and the folded affine forward."""

    _ranks: tuple[int, ...] = ()
    _input_words = ""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self._ranks:
            raise ValueError(f"expected {self._input_words} input (got {input.dim()}D input of "
                             f"shape {tuple(input.shape)}) in {type(self).__name__}")
        # Inference-mode batch norm is exactly y = x * scale + shift with the folded scale and
        # shift above (the core's inference_affine), and its gradient reaches the input only.
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                            self.bias, training=False, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Checkpoints of trainable batch norm carry a counter a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


_DOC = r"""Batch normalization with frozen statistics and affine parameters, for {shape} input.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers (saved, moved by
    ``.to()``, never trained), and the forward is the folded affine transform in training
    and inference alike:

    .. math::
        y = x \cdot s + (\beta - \mu\, s), \qquad
        s = \frac{{\gamma}}{{\sqrt{{\sigma^2 + \epsilon}}}}

    It loads the state_dict of a trained ``BatchNorm{rank}d`` (torch's or this package's),
    ignoring ``num_batches_tracked``.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: added to ``running_var`` for numerical stability. Default: ``1e-5``.
        device: device of the buffers. Default: ``None``.
        dtype: dtype of the buffers. Default: ``None``.

    Shape:
        - Input: {shape}
        - Output: the same shape, dtype and memory layout.

    Examples::

        >>> import torch
        >>> from batchnorm.frozen import {name}
        >>> trained = torch.nn.BatchNorm{rank}d(3).eval()
        >>> frozen = {name}(3)
        >>> frozen.load_state_dict(trained.state_dict())
        <All keys matched successfully>
        >>> x = torch.randn({example})
        >>> torch.allclose(frozen(x), trained(x), atol=1e-6)
        True
    """


class FrozenBatchNorm1d(_FrozenBatchNorm):
    _ranks, _input_words = (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    _ranks, _input_words = (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    _ranks, _input_words = (5,), "5D"


for _cls, _rank, _shape, _example in (
        (FrozenBatchNorm1d, 1, "``(N, C)`` or ``(N, C, L)``", "4, 3, 7"),
        (FrozenBatchNorm2d, 2, "``(N, C, H, W)``", "4, 3, 5, 5"),
        (FrozenBatchNorm3d, 3, "``(N, C, D, H, W)``", "2, 3, 2, 4, 4")):
    _cls.__doc__ = _DOC.format(name=_cls.__name__, rank=_rank, shape=_shape, example=_example)

# Each trainable layer and the frozen layer of its rank.
_FROZEN = {
    nn.BatchNorm1d: FrozenBatchNorm1d, BatchNorm1d: FrozenBatchNorm1d,
    BatchRenorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d, BatchNorm2d: FrozenBatchNorm2d,
    BatchRenorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d, BatchNorm3d: FrozenBatchNorm3d,
    BatchRenorm3d: FrozenBatchNorm3d,
}


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a frozen copy of its values, in place.

    ``BatchNorm1d/2d/3d`` (torch's, including lazy and other subclasses, and this package's)
    and ``BatchRenorm1d/2d/3d`` become ``FrozenBatchNorm1d/2d/3d`` holding copies of their
    weight (1 without ``affine``), bias (0 without one), running statistics and ``eps``, on
    the same device and dtype. The model then computes in training mode what it computed in
    ``eval()`` before. The parameters leave ``model.parameters()``: build the optimizer
    after freezing.

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
        >>> import batchnorm.frozen
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = batchnorm.frozen.freeze(model)
        >>> type(model[1]).__name__, len(list(model[1].parameters()))
        ('FrozenBatchNorm2d', 0)
    """
    frozen = _frozen_class(model)
    if frozen is not None:
        return _frozen_copy(model, frozen)
    for name, child in model.named_children():
        new = freeze(child)
        if new is not child:
            setattr(model, name, new)
    return model


def _frozen_class(module: nn.Module) -> type | None:
    for cls in type(module).__mro__:
        if cls in _FROZEN:
            return _FROZEN[cls]
    if isinstance(module, nn.modules.batchnorm._BatchNorm | _BatchNorm):
        raise ValueError(
            f"cannot freeze {module!r}: a {type(module).__name__} takes inputs of any rank, so "
            "the frozen layer's rank is unknown; freeze the model before "
            "convert_sync_batchnorm (frozen layers need no synchronization)")
    return None


def _frozen_copy(layer: nn.Module, cls: type) -> _FrozenBatchNorm:
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
    return frozen
