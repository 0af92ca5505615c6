"""The backends of batch normalization, and the contract each of them keeps.

A backend is a module that computes batch norm on the canonical ``(N, C, L)`` view of an input
(channel at dim 1, every spatial position flattened into ``L``), contiguous or channels-last,
in *phases* that ``batchnorm._autograd`` composes into the training and inference ops:

=========================  ==============================================================
phase                      computes (per channel ``c``, over its ``m = N * L`` values)
=========================  ==============================================================
``stats``                  ``(count, mean, M2)``: the count, mean and sum of squared
                           deviations; float64, the triple Chan's formula merges
``forward_eval``           ``y = act((x - center) * scale + shift + residual)``
``grad_sums``              ``(sum(dz), sum(dz * x_hat))``: ``dbias`` and ``dweight``
``grad_input``             ``dx = weight * rstd * (dz - mean_dz - x_hat * mean_dz_x_hat)``
``update_running_stats``   the guarded moving averages (a non-finite batch changes nothing)
=========================  ==============================================================

and, optionally, the fused fast paths ``forward_train`` (``stats`` and ``forward_eval`` in one
pass over the batch where the kernel can) and ``backward`` (``grad_sums`` and
``grad_input``). Plain batch norm runs the fused paths; the seams of the op (statistics merged
across processes, Batch Renorm's corrections) run between the phases. Each backend also has
``available()`` (its library imports) and ``supports(x3, residual3, relu)`` (it takes this
call). Signatures and results are those of ``batchnorm.kernels.eager``, the specification,
which every other backend is tested against.

=========  ===============================================  =================================
name       module                                           runs
=========  ===============================================  =================================
eager      ``batchnorm.kernels.eager``                       torch ops, every device and dtype
numba      ``batchnorm.kernels.numba_backend``               compiled CPU kernels
triton     ``batchnorm.kernels.triton_backend``              fused GPU kernels
=========  ===============================================  =================================

The compiled backends import their library (numba, Triton) only when a kernel first runs.
"""

from __future__ import annotations

import os
from types import ModuleType

from torch import Tensor

from batchnorm.kernels import eager, numba_backend, triton_backend

NAMES = ("auto", "eager", "numba", "triton")
PHASES = ("stats", "forward_eval", "grad_sums", "grad_input", "update_running_stats",
          "forward_train", "backward")
_MODULES = {"eager": eager, "numba": numba_backend, "triton": triton_backend}
_EXTRAS = {"numba": "pip install numba", "triton": "pip install triton"}


def backend(name: str) -> ModuleType:
    """The module of backend ``name`` (``"eager"``, ``"numba"`` or ``"triton"``).

    >>> backend("eager").__name__
    'batchnorm.kernels.eager'
    """
    return _MODULES[name]


def resolve(requested: str | None, x3: Tensor, residual3: Tensor | None, relu: bool) -> str:
    """The backend that runs a call: the argument, else ``$BATCHNORM_BACKEND``, else ``auto``.

    ``auto`` takes Triton for CUDA tensors and numba for CPU tensors when the library is
    installed and the backend supports the call, and the eager torch ops otherwise. A backend
    named explicitly must be able to run the call: no silent fallback.

    >>> import torch
    >>> resolve("eager", torch.zeros(2, 3, 4), None, False)
    'eager'
    """
    name = requested if requested is not None else os.environ.get("BATCHNORM_BACKEND", "auto")
    if name not in NAMES:
        raise ValueError(
            f"unknown batch-norm backend {name!r}; expected one of {', '.join(NAMES)} "
            "(set by the backend= argument or the BATCHNORM_BACKEND environment variable)")
    if name == "eager":
        return name
    if name == "auto":
        candidate = "triton" if x3.is_cuda else "numba"
        module = backend(candidate)
        if module.available() and module.supports(x3, residual3, relu):
            return candidate
        return "eager"
    module = backend(name)
    if not module.available():
        raise RuntimeError(
            f"batch-norm backend {name!r} was requested but cannot be imported; "
            f"install it ({_EXTRAS[name]}) or use backend='auto'")
    if not module.supports(x3, residual3, relu):
        raise ValueError(
            f"batch-norm backend {name!r} cannot run {x3.dtype} input on {x3.device} "
            f"(residual={residual3 is not None}, relu={relu}); use backend='auto' or 'eager'")
    return name
