"""Batch Renormalization (Ioffe, 2017): training outputs that agree with inference.

A thin layer over ``batchnorm.functional.batch_norm``'s adjustment seam (``r_max=``,
``d_max=``): one statistics pass, the corrections from it (``batchnorm._seams``), then the
normalization, on the same backends and with the same guard as ``BatchNorm``.

Batch norm trains on ``x_hat = (x - mu_B) / sigma_B`` but infers with the running ``mu`` and
``sigma``; with small or non-i.i.d. batches the two differ. Batch Renorm trains on

    y = weight * (x_hat * r + d) + bias,   r = sigma_B / sigma,   d = (mu_B - mu) / sigma

which *is* the inference transform ``(x - mu) / sigma``, with ``r`` and ``d`` clipped to
``[1/r_max, r_max]`` and ``[-d_max, d_max]`` and treated as constants by the gradient. With
``r = 1`` and ``d = 0`` (``r_max = 1``, ``d_max = 0``) it is batch norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from batchnorm import _seams
from batchnorm.kernels import eager
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

Bound = float | Callable[[Tensor], "Tensor | float"]


@dataclass(frozen=True)
class Ramp:
    """A step schedule: ``start`` until step ``begin``, linear to ``end`` at ``stop``, then flat.

    Called with the step as an int it returns a float; called with a tensor (the layer passes
    its ``num_batches_tracked``) it returns a tensor on the same device, computed there, so a
    schedule never synchronizes with the host.

    Args:
        start: the value up to step ``begin``.
        end: the value from step ``stop`` on.
        begin: the last step at ``start``.
        stop: the first step at ``end``; must be greater than ``begin``.

    Example::

        >>> from batchnorm.renorm import Ramp
        >>> r_max = Ramp(1.0, 3.0, begin=5000, stop=40000)   # the paper's r_max
        >>> r_max(0), r_max(5000), r_max(22500), r_max(10**6)
        (1.0, 1.0, 2.0, 3.0)
    """

    start: float
    end: float
    begin: int
    stop: int

    def __post_init__(self) -> None:
        if not self.stop > self.begin >= 0:
            raise ValueError(f"Ramp needs 0 <= begin < stop, got begin={self.begin}, "
                             f"stop={self.stop}")

    def __call__(self, step: int | Tensor) -> float | Tensor:
        span = self.stop - self.begin
        if isinstance(step, Tensor):
            progress = (step - self.begin).clamp(0, span).to(torch.float64) / span
        else:
            progress = min(max(step - self.begin, 0), span) / span
        return self.start + (self.end - self.start) * progress


# The paper's schedules (Ioffe 2017, section 4.1): r_max = 1 and d_max = 0 for the first 5k
# steps, relaxed (here linearly) to r_max = 3 at 40k steps and d_max = 5 at 25k steps.
PAPER_R_MAX = Ramp(1.0, 3.0, begin=5000, stop=40000)
PAPER_D_MAX = Ramp(0.0, 5.0, begin=5000, stop=25000)


class _BatchRenorm(_BatchNorm):
    """The Batch Renorm training step on top of batch norm's state and inference."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        r_max: Bound | None = None,
        d_max: Bound | None = None,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias,
                         virtual_batch_size=virtual_batch_size)
        _check_bound("r_max", r_max, lowest=1.0)
        _check_bound("d_max", d_max, lowest=0.0)
        # Plain attributes, not state: a schedule's only state is the step, which is
        # num_batches_tracked, saved in the state_dict with torch's layout.
        self.r_max = PAPER_R_MAX if r_max is None else r_max
        self.d_max = PAPER_D_MAX if d_max is None else d_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max!r}, d_max={self.d_max!r}"

    def _seams(self) -> dict:
        # Called once per batch, or once per chunk of a ghost batch in turn, so each chunk is
        # corrected against the running estimates its predecessors updated, exactly as if the
        # chunks had come as separate batches; the step is the batches seen before this one.
        step = self.num_batches_tracked
        return {"r_max": _value(self.r_max, step), "d_max": _value(self.d_max, step)}

    def corrections(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The clipped ``(r, d)`` per channel (float64) that a training step on ``input``
        would apply now, before its running update (``batchnorm._seams.corrections``)."""
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {input.dtype}; convert it "
                            "with input.float()")
        _, mean, m2 = eager.stats(input.reshape(input.shape[0], input.shape[1], -1))
        var = m2 / (input.numel() // input.shape[1])
        bounds = self._seams()
        return _seams.corrections(mean, var, self.eps, bounds["r_max"], bounds["d_max"],
                                  self.running_mean, self.running_var)


def _value(bound: Bound, step: Tensor):
    return bound(step) if callable(bound) else bound


def _check_bound(name: str, bound, lowest: float) -> None:
    if bound is None or callable(bound):
        return
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound >= lowest:
        raise ValueError(f"{name} must be a number >= {lowest}, a callable of the step, or "
                         f"None for the paper's schedule; got {bound!r}")


_DOC = r"""Batch Renormalization (Ioffe, 2017) over a {rank_words} input.

    In training each channel is normalized with the batch's statistics and then corrected
    towards the running ones:

    .. math::
        y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}}\, r + d\right) + \beta, \quad
        r = \mathrm{{clip}}_{{[1/r_{{max}},\, r_{{max}}]}}
            \left(\frac{{\sigma_B}}{{\sigma}}\right), \quad
        d = \mathrm{{clip}}_{{[-d_{{max}},\, d_{{max}}]}}
            \left(\frac{{\mu_B - \mu}}{{\sigma}}\right)

    with :math:`\sigma_B = \sqrt{{\mathrm{{Var}}_B[x] + \epsilon}}` (biased batch variance),
    :math:`\sigma = \sqrt{{\mathrm{{running\_var}} + \epsilon}}`, :math:`\mu` the running mean,
    and ``r``, ``d`` constants for the gradient. The running estimates are updated as batch
    norm's, and inference (``eval()``) is batch norm's. ``r_max`` and ``d_max`` are numbers
    or schedules: callables of the step, ``num_batches_tracked`` before this batch (a 0-dim
    long tensor on the layer's device; see ``batchnorm.renorm.Ramp`` for one that stays on
    the device), returning a number or a 0-dim tensor. The state_dict is batch norm's
    (torch's layout); the schedules are constructor arguments.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running estimates, or ``None`` for the
            cumulative average. Default: ``0.1``.
        affine: learn a per-channel ``weight`` and ``bias``. Default: ``True``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters and buffers. Default: ``None``.
        bias: with ``affine``, learn the shift ``bias`` too (keyword only). Default: ``True``.
        r_max: bound of ``r``, >= 1, or a schedule (keyword only). Default: ``None``, the
            paper's: 1 up to step 5000, then linearly to 3 at step 40000.
        d_max: bound of ``|d|``, >= 0, or a schedule (keyword only). Default: ``None``, the
            paper's: 0 up to step 5000, then linearly to 5 at step 25000.
        virtual_batch_size: ghost batches (keyword only): in training, renormalize each chunk
            of this many samples along dim 0 with its own statistics, as ``BatchNorm1d``'s
            option of that name; each chunk is corrected against the running estimates as
            the chunks before it left them, and counts as one step of the schedules
            (``num_batches_tracked`` counts chunks). Default: ``None``.

    Shape:
        - Input: {shape}
        - Output: the same shape, dtype and memory layout.

    Examples::

        >>> import torch
        >>> from batchnorm.renorm import {name}
        >>> bn = {name}(3, r_max=2.0, d_max=1.0)
        >>> y = bn(torch.randn({example}))
        >>> tuple(y.shape), int(bn.num_batches_tracked)
        (({example}), 1)
    """


class BatchRenorm1d(_BatchRenorm):
    _check_input_dim = BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    _check_input_dim = BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    _check_input_dim = BatchNorm3d._check_input_dim


BatchRenorm1d.__doc__ = _DOC.format(name="BatchRenorm1d", rank_words="2D or 3D",
                                    shape="``(N, C)`` or ``(N, C, L)``", example="4, 3, 7")
BatchRenorm2d.__doc__ = _DOC.format(name="BatchRenorm2d", rank_words="4D",
                                    shape="``(N, C, H, W)``", example="4, 3, 5, 5")
BatchRenorm3d.__doc__ = _DOC.format(name="BatchRenorm3d", rank_words="5D",
                                    shape="``(N, C, D, H, W)``", example="2, 3, 2, 4, 4")
