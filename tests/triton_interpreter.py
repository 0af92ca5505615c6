"""The Triton backend on CPU tensors, under Triton's interpreter, for the tests.

The repository's ``conftest.py`` sets ``TRITON_INTERPRET=1`` before Triton is imported, and
``@triton.jit`` reads it when a kernel is *defined*: ``backend()`` defines the kernels again if
they were imported before that.
"""

import importlib

import numpy as np
import pytest


def installed(*always: str) -> list[str]:
    """The backends ``always``, then numba and triton where they are installed: the
    parameters of the tests that run on every backend."""
    names = list(always)
    for name in ("numba", "triton"):
        try:
            __import__(name)
            names.append(name)
        except ImportError:
            pass
    return names


def backend():
    """``batchnorm.kernels.triton_backend`` with interpreted kernels, or the test skipped."""
    triton = pytest.importorskip("triton",
                                 reason="triton is not installed: the GPU kernels are optional")
    if _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with numpy "
                    f"{np.__version__} (it needs numpy < 2.4): pip install 'numpy<2.4'")
    module = importlib.import_module("batchnorm.kernels.triton_backend")
    if not module.interpreted():
        for name in ("triton_forward", "triton_backward", "triton_activation"):  # helpers first
            importlib.reload(importlib.import_module(f"batchnorm.kernels.{name}"))
    return module


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
