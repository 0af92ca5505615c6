"""The Triton backend on CPU tensors, under Triton's interpreter, for the tests.

The repository's ``conftest.py`` sets ``TRITON_INTERPRET=1`` before Triton is imported, and
``@triton.jit`` reads it when a kernel is *defined*: ``backend()`` defines the kernels again if
they were imported before that.
"""

import importlib

import pytest


def backend():
    """``batchnorm.kernels.triton_backend`` with interpreted kernels, or the test skipped."""
    pytest.importorskip("triton", reason="triton is not installed: the GPU kernels are optional")
    module = importlib.import_module("batchnorm.kernels.triton_backend")
    if not module.interpreted():
        for name in ("triton_forward", "triton_backward"):  # helpers first, then users
            importlib.reload(importlib.import_module(f"batchnorm.kernels.{name}"))
    return module
