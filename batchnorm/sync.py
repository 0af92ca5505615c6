"""``SyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group.

A thin layer over ``batchnorm.functional.batch_norm``'s reduction seam (``process_group=``):
the same validation, backends and running-statistics guard as ``BatchNorm``, with the
statistics and gradient sums of the processes' slices merged as ``batchnorm._seams``
describes.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from batchnorm import kinds
from batchnorm.fused import _Act
from batchnorm.modules import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose training statistics span a whole process group.

    In training under an initialized ``torch.distributed`` group of more than one process,
    every rank normalizes its slice of the batch with the mean and biased variance of the
    *global* batch (the concatenation of all ranks' slices), exactly as ``BatchNorm`` on
    that batch would; the input gradient goes through the global statistics too, and the
    running estimates, updated from the global statistics with the unbiased variance
    ``m/(m-1) * var`` (``m`` the global count), come out identical on every rank. Weight
    and bias gradients are each rank's own contribution: summed over the ranks (as
    ``DistributedDataParallel`` does, up to its averaging) they are the whole batch's.

    * Slices may differ in size, and may be empty: every rank must call the layer (and its
      backward) the same number of times, as with every collective.
    * Ranks whose inputs differ in channel count or dtype all raise an error that names
      each rank's, instead of a collective of mismatched sizes.
    * Outside training, without ``torch.distributed``, or in a group of one process, the
      layer is a plain ``BatchNorm`` (no error, no communication).
    * The local work runs on this package's backends (numba on the CPU, Triton on CUDA when
      installed), and nothing is read back to the host: the counts live on the device.
      Collectives use the group's backend: gloo for CPU tensors, NCCL for CUDA ones.
    * A global batch whose statistics are not finite (or hold a single value per channel)
      leaves the running estimates unchanged, decided on the device; torch would raise for
      the single value, which would need a host synchronization here.
    * Double backward and ``torch.func`` transforms through the merged statistics are not
      supported (they raise).

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running estimates, or ``None`` for the
            cumulative average. Default: ``0.1``.
        affine: learn a per-channel ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``. Default: ``True``.
        process_group: the group whose processes share statistics; ``None`` for the default
            group. Default: ``None``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters and buffers. Default: ``None``.
        bias: with ``affine``, learn the shift ``bias`` too (keyword only). Default: ``True``.

    Shape:
        - Input: ``(N, C, *)``, any rank >= 2; ``N`` may differ between ranks, even be 0.
        - Output: the same shape, dtype and memory layout.

    Examples::

        >>> import torch
        >>> from batchnorm.sync import SyncBatchNorm
        >>> bn = SyncBatchNorm(3)   # not distributed here: plain batch norm
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2D (got {input.dim()}D input); "
                             "SyncBatchNorm takes (N, C, *)")

    def _seams(self) -> dict:
        if _world_size(self.process_group) <= 1:
            return {}
        return {"process_group": self.process_group or dist.group.WORLD}

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch-norm layer that ``batchnorm.kinds`` knows (torch's, timm's and
        this package's ``BatchNorm*d``, ``BatchNormAct*d`` and torch's ``SyncBatchNorm``) by
        this package's ``SyncBatchNorm`` (``SyncBatchNormAct`` for those with an activation).

        The new layers take over the old ones' parameter and buffer tensors themselves (an
        optimizer built before still updates them), their hyperparameters, training mode and
        hooks. Other layers (Batch Renorm, frozen ones) are left alone.

        Args:
            module: a model, or a single batch-norm layer.
            process_group: the group to synchronize over; ``None`` for the default group.
                Default: ``None``.

        Returns:
            The model with the layers replaced, in place (a new layer if ``module`` was one).

        Example::

            >>> import torch
            >>> from batchnorm.sync import SyncBatchNorm
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> model = SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model[1]).__name__
            'SyncBatchNorm'
        """
        def make(layer, kind: kinds.Kind | None):
            if isinstance(layer, SyncBatchNorm) or kind is None or not kind.sync:
                return None
            if getattr(layer, "virtual_batch_size", None) is not None:
                raise ValueError(
                    f"cannot convert {layer!r}: SyncBatchNorm has no virtual batches; "
                    "construct the layer without virtual_batch_size first")
            target = SyncBatchNormAct if kind.fused else SyncBatchNorm
            return kinds.take_over(layer, target, process_group=process_group)

        return kinds.replace_layers(module, make)[0]


class SyncBatchNormAct(_Act, SyncBatchNorm):
    """``SyncBatchNorm`` fused with its activation (and residual, and drop), as
    ``BatchNormAct2d`` is with ``BatchNorm2d``; the sync form of ``BatchNormAct*d`` and of
    timm's ``BatchNormAct2d``/``SyncBatchNormAct``.

    >>> import torch
    >>> layer = SyncBatchNormAct(3)   # not distributed here: BatchNormAct
    >>> bool((layer(torch.randn(4, 3, 5)) >= 0).all())
    True
    """


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)
