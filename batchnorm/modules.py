"""Drop-in batch-norm modules: torch's hierarchy, names, state_dict layout and semantics.

``_NormBase`` holds the state (parameters, buffers, checkpoint loading), ``_BatchNorm`` decides
which statistics a forward uses and calls ``batchnorm.functional.batch_norm``, and
``BatchNorm1d/2d/3d`` only say which input ranks they take.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from batchnorm import functional as F


class _NormBase(nn.Module):
    """Parameters and running statistics shared by the batch-norm modules."""

    _version = 2  # version 2 added num_batches_tracked, as in torch
    virtual_batch_size: int | None = None  # also the value of layers built without __init__
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        lazy = isinstance(self, LazyModuleMixin) and num_features == 0  # set by the first input
        if not isinstance(num_features, int) or isinstance(num_features, bool) \
                or (num_features < 1 and not lazy):
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if virtual_batch_size is not None and (
                not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool)
                or virtual_batch_size < 1):
            raise ValueError(f"virtual_batch_size must be a positive int or None, got "
                             f"{virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, and the weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
                "bias={has_bias}, track_running_stats={track_running_stats}"
                .format(**self.__dict__, has_bias=self.bias is not None))
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        return text

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed (or a partial state_dict
            # without its metadata): keep the layer's own count, as torch does.
            counter = self.num_batches_tracked
            usable = counter is not None and counter.device.type != "meta"
            state_dict[key] = counter if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def fx_leaf(module: nn.Module, *args):
    """The call of ``module`` under ``torch.fx`` symbolic tracing: one ``call_module`` node, as
    the tracer makes of torch.nn's own layers, so that a traced graph (and torchvision's
    ``create_feature_extractor``) runs the layer itself, with its semantics and its training
    flag at run time, instead of tracing into its checks."""
    proxy = next(a for a in args if isinstance(a, torch.fx.Proxy))
    tracer = proxy.tracer
    if module is tracer.root:
        raise TypeError(f"torch.fx cannot trace a lone {type(module).__name__}: its call is "
                        "a leaf of the graph of a model that holds it; trace that model")
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _BatchNorm(_NormBase):
    """Chooses the statistics of a forward the way torch does, then normalizes."""

    activation: str | None = None  # applied after normalizing, fused; set by BatchNormAct*d

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: in training, a bool tensor of ``input``'s shape without dim 1, True where
        a value counts in the statistics (padded sequences; ``batchnorm.masked``)."""
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input) if mask is None else fx_leaf(self, input, mask)
        return self._forward(input, None, mask)

    def _forward(self, input: Tensor, residual: Tensor | None,
                 mask: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_channels(input)
        k = self.virtual_batch_size
        if self.training and k is not None and input.shape[0] > k:
            return self._ghost_forward(input, residual, k, mask)
        return self._normalize(input, residual, mask)

    def _ghost_forward(self, input: Tensor, residual: Tensor | None, k: int,
                       mask: Tensor | None = None) -> Tensor:
        """Ghost batch norm: each chunk of ``k`` samples along dim 0 is a batch of its own.

        The last chunk holds the remaining ``N mod k`` samples when ``k`` does not divide ``N``.
        Chunks update the running estimates one after another, as ``N / k`` batches would.
        """
        last = (input.shape[0] - 1) % k + 1
        if input[:last].numel() // input.shape[1] <= 1:
            # Checked before any chunk runs, so a failing call leaves the statistics untouched.
            raise ValueError(
                f"virtual_batch_size={k} splits a batch of {input.shape[0]} into chunks whose "
                f"last one has {last} sample(s), 1 value per channel (input shape "
                f"{tuple(input.shape)}); use a batch size whose last chunk keeps at least 2 "
                "values per channel, e.g. a multiple of a virtual_batch_size >= 2")
        chunks = input.split(k)
        if residual is not None:
            F.check_residual(residual, input)
        residuals = [None] * len(chunks) if residual is None else residual.split(k)
        masks = [None] * len(chunks) if mask is None else mask.split(k)
        return torch.cat([self._normalize(chunk, res, m)
                          for chunk, res, m in zip(chunks, residuals, masks, strict=True)])

    def _normalize(self, input: Tensor, residual: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:
        use_batch_stats, running_mean, running_var, counter = self._statistics()
        weight, bias = self.weight, self.bias
        if (residual is None and mask is None and self.activation is None
                and type(self)._seams is _BatchNorm._seams):
            # A plain layer's call, checked by the layer; small ones go to torch's op directly.
            y = F.layer_call(input, running_mean, running_var, weight, bias, use_batch_stats,
                             self.momentum, self.eps, counter)
            if y is not None:
                return y
        return F.batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats,
                            self.momentum, self.eps, num_batches_tracked=counter,
                            activation=self.activation, residual=residual, mask=mask,
                            **(self._seams() if self.training else {}))

    def _statistics(self) -> tuple:
        """``(use_batch_stats, running_mean, running_var, counter)`` of a call, chosen as torch
        does: batch statistics in training, and in inference when there are no running ones;
        running ones read in inference and updated in training when tracked."""
        training, running_mean, running_var = self.training, self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            return use_batch_stats, None, None, None  # tracked: read in eval only
        return (use_batch_stats, running_mean, running_var,
                self.num_batches_tracked if training else None)

    def _seams(self) -> dict:
        """Keyword arguments of ``batch_norm`` that open its seams in training (the process
        group of ``SyncBatchNorm``, the bounds of Batch Renorm); none for plain batch norm."""
        return {}

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise F.ShapeError(
                f"{type(self).__name__}({self.num_features}) expected input with "
                f"{self.num_features} channels at dim 1, got {input.shape[1]} (input shape "
                f"{tuple(input.shape)}); construct it with num_features={input.shape[1]} or fix "
                "the layer before it")


_DOC = r"""Batch normalization over a {rank_words} input, as ``torch.nn.{name}``.

    Ioffe & Szegedy (2015): each of the ``C`` channels is normalized over {over}, then scaled
    and shifted:

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \cdot \gamma
            + \beta

    In training, ``E[x]`` and ``Var[x]`` are the batch's mean and biased variance (Algorithm 1)
    and the running estimates move towards the batch's mean and unbiased variance; in
    ``eval()`` the running estimates are used (Algorithm 2), or the batch's statistics when
    ``track_running_stats=False``. A batch whose statistics are not finite leaves the running
    estimates and ``num_batches_tracked`` unchanged. Parameters, buffers and state_dict keys
    are torch's, so checkpoints load both ways.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running estimates, or ``None`` for the
            cumulative average. Default: ``0.1``.
        affine: learn a per-channel scale ``weight`` and shift ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked``. Default: ``True``.
        device: device of the parameters and buffers. Default: ``None``.
        dtype: dtype of the parameters and buffers. Default: ``None``.
        bias: with ``affine``, learn the shift ``bias`` too (keyword only). Default: ``True``.
        virtual_batch_size: ghost batch norm (keyword only): in training, normalize each
            chunk of this many samples along dim 0 with its own statistics; the last chunk
            keeps the remainder when the batch size is not a multiple, and must hold at least
            2 values per channel. Each chunk updates the running estimates in turn, exactly
            as if the chunks had come as separate batches, so they estimate the statistics
            of ``virtual_batch_size`` batches (the batches inference should match) and
            ``num_batches_tracked`` counts chunks. ``eval()`` is unchanged. Default: ``None``.

    Shape:
        - Input: {shape}
        - Output: the same shape, dtype and memory layout.

    Examples::

        >>> import torch
        >>> from batchnorm import {name}
        >>> bn = {name}(3)
        >>> y = bn(torch.randn({example}))
        >>> tuple(y.shape), int(bn.num_batches_tracked)
        (({example_tuple}), 1)
    """


class BatchNorm1d(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input); "
                             "BatchNorm1d takes (N, C) or (N, C, L)")


class BatchNorm2d(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input); "
                             "BatchNorm2d takes (N, C, H, W)")


class BatchNorm3d(_BatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input); "
                             "BatchNorm3d takes (N, C, D, H, W)")


def _fill_doc(cls: type, rank_words: str, over: str, shape: str, example: str) -> None:
    cls.__doc__ = _DOC.format(name=cls.__name__, rank_words=rank_words, over=over, shape=shape,
                              example=example, example_tuple=example)


_fill_doc(BatchNorm1d, "2D or 3D", "the batch (and the length ``L``, if any)",
          "``(N, C)`` or ``(N, C, L)``", "4, 3, 7")
_fill_doc(BatchNorm2d, "4D", "the batch and all ``H * W`` positions (``m' = m p q``)",
          "``(N, C, H, W)``", "4, 3, 5, 5")
_fill_doc(BatchNorm3d, "5D", "the batch and all ``D * H * W`` positions",
          "``(N, C, D, H, W)``", "2, 3, 2, 4, 4")


class _LazyBatchNorm(LazyModuleMixin, _BatchNorm):
    """Batch norm whose ``num_features`` is read from the first input (``C = input.shape[1]``),
    as ``torch.nn.LazyBatchNorm*d``; it then becomes the plain layer of its rank."""

    cls_to_become: type | None = None
    weight: UninitializedParameter
    bias: UninitializedParameter

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        # No tensors yet: affine and tracking off, then uninitialized ones in their place.
        super().__init__(0, eps, momentum, False, False, device, dtype, bias=False)
        factory = {"device": device, "dtype": dtype}
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:
        if not self.has_uninitialized_params():
            # Loaded from a checkpoint before its first input: its tensors tell the channels.
            tensor = next((t for t in (self.weight, self.running_mean) if t is not None), None)
            if self.num_features == 0 and tensor is not None:
                self.num_features = tensor.numel()
            return
        if input.dim() < 2:
            raise F.ShapeError(f"{type(self).__name__} reads num_features from dim 1 of its "
                               f"first input, which has shape {tuple(input.shape)}")
        self.num_features = input.shape[1]
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(self, name)
                if tensor is not None:
                    tensor.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    cls_to_become = BatchNorm3d


_LAZY_DOC = """``{plain}`` whose ``num_features`` is read from its first input, as
    ``torch.nn.Lazy{plain}``; after that call the layer is a ``{plain}``.

    Args:
        eps, momentum, affine, track_running_stats, device, dtype, bias: as ``{plain}``.

    Examples::

        >>> import torch
        >>> from batchnorm import {name}
        >>> bn = {name}()
        >>> _ = bn(torch.randn({example}))
        >>> type(bn).__name__, bn.num_features
        ('{plain}', 3)
    """

for _cls, _example in ((LazyBatchNorm1d, "4, 3, 7"), (LazyBatchNorm2d, "4, 3, 5, 5"),
                       (LazyBatchNorm3d, "2, 3, 2, 4, 4")):
    _cls.__doc__ = _LAZY_DOC.format(name=_cls.__name__, plain=_cls.cls_to_become.__name__,
                                    example=_example)
