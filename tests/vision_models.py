"""torchvision and timm for the tests, importable beside a CPU-only torch.

torchvision's Linux wheels link ``libc10_cuda.so``, which torch's CPU build lacks: the C
extension then fails to load, and ``import torchvision`` dies registering fake kernels for its
``nms`` and ``qnms`` ops, which do not exist without it. Defining those two schemas first lets
the import finish; no torchvision C op is needed by the models. Where the extension loads, the
schemas are its own and nothing is defined here.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # kept alive: a Library's definitions go when it is collected


def torchvision():
    """The ``torchvision`` module, or the test skipped when it is not installed."""
    global _library
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install torchvision==0.28.0 beside "
                    "torch 2.13)")
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error) or _library is not None:
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return importlib.import_module("torchvision")


def timm():
    """The ``timm`` module (after torchvision, which it imports), or the test skipped."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install timm)")
    torchvision()
    return importlib.import_module("timm")
