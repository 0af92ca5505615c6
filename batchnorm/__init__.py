"""Batch normalization (Ioffe & Szegedy, 2015): reference, PyTorch modules and kernels.

>>> import torch, batchnorm
>>> bn = batchnorm.BatchNorm2d(4)
>>> bn(torch.randn(2, 4, 3, 3)).shape
torch.Size([2, 4, 3, 3])
"""

from batchnorm import functional, reference
from batchnorm.convert import convert, freeze
from batchnorm.fold import fold
from batchnorm.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
)
from batchnorm.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, Epilogue
from batchnorm.inplace_abn import InPlaceABN1d, InPlaceABN2d, InPlaceABN3d, SyncInPlaceABN
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from batchnorm.recalibrate import recalibrate
from batchnorm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from batchnorm.sync import SyncBatchNorm, SyncBatchNormAct

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
    "BatchNormAct3d", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "Epilogue",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d", "FrozenBatchNormAct3d", "InPlaceABN1d", "InPlaceABN2d", "InPlaceABN3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm", "SyncBatchNormAct",
    "SyncInPlaceABN", "convert", "fold", "freeze", "functional", "recalibrate", "reference",
]
__version__ = "0.1.0"
