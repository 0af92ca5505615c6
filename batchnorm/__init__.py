"""Batch normalization (Ioffe & Szegedy, 2015): reference, PyTorch modules and kernels.

>>> import torch, batchnorm
>>> bn = batchnorm.BatchNorm2d(4)
>>> bn(torch.randn(2, 4, 3, 3)).shape
torch.Size([2, 4, 3, 3])
"""

from batchnorm import functional, reference
from batchnorm.convert import convert
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "functional", "reference"]
__version__ = "0.1.0"
