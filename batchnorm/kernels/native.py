"""The ``"native"`` backend: torch's own batch-norm op (aten), behind this package's semantics.

For small tensors the cost of a call decides, not its bytes, and no compiled kernel here beats
torch's C++ op there: ``auto`` takes this backend below the crossovers measured by
``benchmarks/crossover.py`` (``batchnorm.kernels.resolve``). A call runs torch's
``native_batch_norm`` with its own autograd (double backward, forward AD and ``vmap`` are
torch's) and its own running-statistics update, guarded (``train``) so that a non-finite
batch still changes nothing.

The phases of the contract, which the seams of the op compose (``SyncBatchNorm``, Batch
Renorm), are those of the eager specification.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.kernels import eager
from batchnorm.kernels.eager import (  # noqa: F401  (the phases of this backend)
    activate,
    affine,
    backward,
    forward_eval,
    forward_train,
    grad_input,
    grad_sums,
    stats,
    update_running_stats,
)


def available() -> bool:
    """Always: torch is all this backend needs.

    >>> available()
    True
    """
    return True


def supports(x3: Tensor, residual3: Tensor | None, relu: bool) -> bool:
    """Every floating-point tensor on every device.

    >>> supports(torch.zeros(2, 3, 4, dtype=torch.float16), None, True)
    True
    """
    return x3.is_floating_point()


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, counter: Tensor | None, momentum: float,
          eps: float) -> Tensor:
    """Algorithm 1 by torch's op, differentiable by torch's autograd; torch's op also folds the
    batch into the running statistics, under this package's guard.

    torch's op updates ``running_mean`` and ``running_var`` in its own kernel; a batch whose
    statistics are not finite must change nothing, so the statistics are kept before and put
    back after such a batch (or, on the device, torch's op updates a copy, taken only when
    the batch is finite), and ``counter`` counts only the others. A batch is finite when
    its ``1/sqrt(var + eps)`` is positive: a non-finite mean makes the variance NaN, an
    infinite variance makes it 0. On the CPU the choice is a branch (a host read costs
    nothing there); on other devices and under ``torch.compile`` it is made on the device
    with ``torch.where``, without a host synchronization.

    torch computes the statistics in two passes (CPU) or by Welford's method (CUDA), which
    keep their precision when ``|mean| >> std`` without the shift that the compiled backends
    apply. The caller has checked the arguments and ensures at least 2 values per channel
    and a float ``momentum``.

    >>> mean, var = torch.zeros(1), torch.ones(1)
    >>> train(torch.tensor([[1.0], [3.0]]), None, None, mean, var, None, 1.0, 0.0).tolist()
    [[-1.0], [1.0]]
    >>> mean.tolist(), var.tolist()
    ([2.0], [2.0])
    """
    return train_saved(x, weight, bias, running_mean, running_var, counter, momentum, eps)[0]


def train_saved(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, counter: Tensor | None,
                momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`train`, and the batch's ``1/sqrt(var + eps)`` that torch's op saves for its
    backward: ``(y, invstd)``."""
    if running_mean is None:
        y, _, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        return y, invstd
    channels = len(running_mean)
    if x.is_cpu and not torch.compiler.is_compiling():
        kept = torch.cat((running_mean, running_var))
        y, _, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                               momentum, eps)
        if invstd.min().item() > 0:  # NaN compares False
            if counter is not None:
                counter.add_(1)
        else:
            # torch's op saved the statistics for its backward, which reads them in eval mode
            # only: ``.data`` writes them back without tripping its version check.
            running_mean.data.copy_(kept[:channels])
            running_var.data.copy_(kept[channels:])
        return y, invstd
    updated = torch.cat((running_mean, running_var))  # torch's op updates a copy ...
    y, _, invstd = torch.native_batch_norm(x, weight, bias, updated[:channels],
                                           updated[channels:], True, momentum, eps)
    finite = invstd.detach().amin() > 0  # ... which a finite batch's statistics take
    running_mean.copy_(torch.where(finite, updated[:channels], running_mean))
    running_var.copy_(torch.where(finite, updated[channels:], running_var))
    if counter is not None:
        counter.add_(finite.to(counter.dtype))
    return y, invstd


def infer(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
          running_var: Tensor, eps: float) -> Tensor:
    """Algorithm 2 by torch's op (its inference kernel, its autograd).

    >>> infer(torch.ones(2, 1), None, None, torch.zeros(1), torch.ones(1), 0.0).tolist()
    [[1.0], [1.0]]
    """
    # The flag's Python property costs more than the call to torch's op on a small input;
    # dynamo traces only the property.
    cudnn = (torch.backends.cudnn.enabled if torch.compiler.is_compiling()
             else torch._C._get_cudnn_enabled())
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, cudnn)


def invert_activation(z3: Tensor, dz3: Tensor, residual3: Tensor | None, activation: str,
                      param: float) -> tuple[Tensor, Tensor]:
    """Phase ``invert_activation`` of ``eager.invert_activation`` in torch's own activation
    kernels: leaky ReLU's inverse is leaky ReLU with slope ``1 / param``, and torch's
    ``leaky_relu_backward``/``elu_backward`` take the output (``z`` has the sign of ``u``).

    >>> y, dy = invert_activation(torch.tensor([[[-1.0, 3.0]]]), torch.ones(1, 1, 2), None,
    ...                           "leaky_relu", 0.5)
    >>> y.tolist(), dy.tolist()
    ([[[-2.0, 3.0]]], [[[0.5, 1.0]]])
    """
    acc = eager.acc_dtype(z3.dtype)
    z, dz = z3.to(acc), dz3.to(acc)
    if activation == "leaky_relu":
        u = torch.nn.functional.leaky_relu(z, 1.0 / param)
        dy = torch.ops.aten.leaky_relu_backward(dz, z, param, True)
    elif activation == "elu":
        u = torch.where(z < 0, torch.log1p((z / param).clamp(min=eager.elu_floor(acc))), z)
        dy = torch.ops.aten.elu_backward(dz, param, 1.0, 1.0, True, z)
    else:
        u, dy = z, dz
    return (u if residual3 is None else u - residual3.to(acc)), dy
