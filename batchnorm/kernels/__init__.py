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
``activate``               ``z = act(z + residual)`` in place (in-place ABN's activations)
``invert_activation``      ``(y, dy)`` back from ``z`` and ``dz`` (in-place ABN's backward)
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
native     ``batchnorm.kernels.native``                      torch's own op, small inputs
numba      ``batchnorm.kernels.numba_backend``               compiled CPU kernels
triton     ``batchnorm.kernels.triton_backend``              fused GPU kernels
=========  ===============================================  =================================

The compiled backends import their library (numba, Triton) only when a kernel first runs.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

from torch import Tensor

from batchnorm.kernels import eager, native, numba_backend, triton_backend

NAMES = ("auto", "eager", "native", "numba", "triton")
PHASES = ("stats", "forward_eval", "grad_sums", "grad_input", "update_running_stats",
          "activate", "invert_activation", "forward_train", "backward")
_MODULES = {"eager": eager, "native": native, "numba": numba_backend, "triton": triton_backend}
_EXTRAS = {"numba": "pip install numba", "triton": "pip install triton"}

# Elements of the input from which ``auto`` takes the compiled kernels over torch's own op,
# per (backend, training, layout class); below them torch's op is faster, the cost of a call
# deciding. The layout class is where the channel dim lies: ``"contiguous"`` (outermost within
# a sample, as NCHW) or ``"channels_last"`` (innermost: channels-last and ``(N, C)`` input).
# The CPU values are the crossovers that ``benchmarks/crossover.py`` measured on a 2-core VM
# (``benchmarks/results/crossover.md``): the smallest size from which numba won every case of
# that size and every larger one. In inference torch's op wins up to 4M elements and numba
# from the next size measured, 9M (36 MB in float32), where torch's fresh outputs start to
# fault in new pages.
# No GPU measurement exists yet: on CUDA about 450 us of host time per training step was
# measured for the Triton path with its kernels stubbed out, so it is predicted to lose to
# torch's cuDNN/native kernels below about 100 MB a call; ``benchmarks/gpu.py`` measures.
CROSSOVER = {
    ("numba", True, "contiguous"): 1 << 20, ("numba", True, "channels_last"): 1 << 22,
    ("numba", False, "contiguous"): 9 << 20, ("numba", False, "channels_last"): 9 << 20,
    ("triton", True, "contiguous"): 1 << 25, ("triton", True, "channels_last"): 1 << 25,
    ("triton", False, "contiguous"): 1 << 25, ("triton", False, "channels_last"): 1 << 25,
}


def crossover(x: Tensor, training: bool) -> int:
    """The size from which ``auto`` runs a compiled kernel on a call like ``x``: ``CROSSOVER``
    of the backend of ``x``'s device, the mode and the layout class of ``x`` (canonical:
    contiguous or channels-last).

    >>> import torch
    >>> crossover(torch.zeros(2, 3, 4), True) == CROSSOVER["numba", True, "contiguous"]
    True
    """
    layout = "contiguous" if x.dim() > 2 and x.is_contiguous() else "channels_last"
    return CROSSOVER["triton" if x.is_cuda else "numba", training, layout]


def backend(name: str) -> ModuleType:
    """The module of backend ``name`` (``"eager"``, ``"native"``, ``"numba"`` or ``"triton"``).

    >>> backend("eager").__name__
    'batchnorm.kernels.eager'
    """
    return _MODULES[name]


def resolve(requested: str | None, x: Tensor, residual: Tensor | None, relu: bool,
            training: bool = True) -> str:
    """The backend that runs a call: the argument, else ``$BATCHNORM_BACKEND``, else ``auto``.

    ``auto`` takes Triton for CUDA tensors and numba for CPU tensors when the library is
    installed, the backend supports the call and the input has ``crossover(x, training)``
    elements at least; torch's own op (``"native"``) otherwise. A backend named explicitly
    must be able to run the call: no silent fallback.

    >>> import torch
    >>> resolve("eager", torch.zeros(2, 3, 4), None, False)
    'eager'
    >>> resolve("auto", torch.zeros(2, 3, 4), None, False)
    'native'
    """
    name = requested if requested is not None else os.environ.get("BATCHNORM_BACKEND", "auto")
    if name in ("eager", "native"):
        return name
    if name == "auto":
        candidate = "triton" if x.is_cuda else "numba"
        if x.numel() < crossover(x, training):
            return "native"
        module = _MODULES[candidate]
        if module.available() and module.supports(_ncl(x), _ncl(residual), relu):
            return candidate
        return "native"
    if name not in NAMES:
        raise ValueError(
            f"unknown batch-norm backend {name!r}; expected one of {', '.join(NAMES)} "
            "(set by the backend= argument or the BATCHNORM_BACKEND environment variable)")
    module = _MODULES[name]
    if not module.available():
        raise RuntimeError(
            f"batch-norm backend {name!r} was requested but cannot run: "
            + (module.why_unavailable() if hasattr(module, "why_unavailable") else
               f"it cannot be imported; install it ({_EXTRAS[name]}) or use backend='auto'"))
    if not module.supports(_ncl(x), _ncl(residual), relu):
        raise ValueError(
            f"batch-norm backend {name!r} cannot run {x.dtype} input on {x.device} "
            f"(residual={residual is not None}, relu={relu}); use backend='auto' or 'eager'")
    return name


def as_ncl(t: Tensor) -> Tensor:
    """The ``(N, C, L)`` view of a tensor whose layout is contiguous or channels-last."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _ncl(t: Tensor | None) -> Tensor | None:
    """``as_ncl`` of ``t``, or ``None``."""
    return None if t is None else as_ncl(t)
