"""Frozen batch norm: fixed statistics and affine parameters, all buffers, nothing to learn.

A frozen layer is Algorithm 2's inference transform and nothing else, in training mode too:

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale
    y     = x * scale + shift

Detection and segmentation backbones fine-tuned with a few images per device freeze their
batch norms this way; ``batchnorm.freeze(model)`` does it to a whole model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.fused import _Act
from batchnorm.modules import fx_leaf


class _FrozenBatchNorm(nn.Module):
    """The four tensors as buffers, ``eps``, and the folded affine forward."""

    _ranks: tuple[int, ...] = ()
    _input_words = ""
    activation: str | None = None  # applied after, fused; set by FrozenBatchNormAct*d

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
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input)
        return self._forward(input, None)

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        self._check_rank(input)
        # Inference-mode batch norm is exactly y = x * scale + shift with the folded scale and
        # shift above (the core's inference_affine), and its gradient reaches the input only.
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                            self.bias, training=False, eps=self.eps,
                            activation=self.activation, residual=residual)

    def _check_rank(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            raise ValueError(f"expected {self._input_words} input (got {input.dim()}D input of "
                             f"shape {tuple(input.shape)}) in {type(self).__name__}")

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


class FrozenBatchNormAct1d(_Act, FrozenBatchNorm1d):
    """``FrozenBatchNorm1d`` followed by its activation: ``act(drop(frozen(x) + residual))``,
    the frozen form of ``BatchNormAct1d``; arguments as ``BatchNormAct1d``'s ``activation`` and
    ``drop``.

    >>> import torch
    >>> bool((FrozenBatchNormAct1d(3)(torch.randn(4, 3)) >= 0).all())
    True
    """


class FrozenBatchNormAct2d(_Act, FrozenBatchNorm2d):
    """``FrozenBatchNorm2d`` followed by its activation: ``act(drop(frozen(x) + residual))``,
    the frozen form of ``BatchNormAct2d`` and timm's ``BatchNormAct2d``."""


class FrozenBatchNormAct3d(_Act, FrozenBatchNorm3d):
    """``FrozenBatchNorm3d`` followed by its activation: ``act(drop(frozen(x) + residual))``."""
