"""``fold``: merge inference-mode batch norm into the convolution or linear layer before it.

In inference a batch-norm layer is a per-channel affine map (Algorithm 2),
``y = z * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``. When ``z`` is the output of a layer ``z = W x + b``
whose output channels are the BN's channels, the composition is that layer with

    W' = W * scale   (each output channel's filter scaled)
    b' = b * scale + shift

so the BN can go. Where the output channel sits in ``W``: dim 0 for ``Conv*d`` and ``Linear``;
for ``ConvTranspose*d`` the weight is ``(in, out / groups, *kernel)`` and output channel
``g * (out / groups) + j`` is column ``j`` of group ``g``'s block of input rows.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter

import torch
from torch import fx, nn

from batchnorm import kinds
from batchnorm.frozen import _FrozenBatchNorm
from batchnorm.fused import Epilogue
from batchnorm.kernels import eager

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_LAYER_NAMES = "Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear"
_log = logging.getLogger("batchnorm")


def fold(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> nn.Module:
    """Fold every inference-mode batch norm of ``model`` into the layer right before it.

    A batch-norm layer (``BatchNorm1d/2d/3d``, torch's or this package's, ``SyncBatchNorm``,
    ``BatchRenorm*d``, ``FrozenBatchNorm*d``) is *directly after* a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` when, in the ``torch.fx`` graph of
    ``model.forward``, its input is that layer's output and nothing else uses that output,
    and each of the two modules is called once. When ``torch.fx`` cannot trace the model
    (data-dependent control flow), the rule is the one an ``nn.Sequential`` makes plain: the
    BN is the child right after such a layer in the same ``nn.Sequential``. A ``Linear``
    followed by ``BatchNorm1d`` is folded for ``(N, features)`` input, the case where the
    BN's channels are the ``Linear``'s output features.

    Each folded BN is replaced by ``nn.Identity``, or, for a layer fused with its activation
    (``BatchNormAct*d``, timm's ``BatchNormAct2d``), by that activation with its drop and
    residual (``batchnorm.fused.Epilogue``); other layers keep their names, and the
    layer gets the folded weight and bias (a bias is added where it had none), computed in
    float64 and stored in the layer's dtype. Outputs in ``eval()`` are unchanged up to
    rounding. BN layers that ``forward`` never calls are left alone.

    A BN that does not directly follow such a layer (after a concatenation, as in DenseNet,
    or after an activation) stays as it is, in inference mode, and the model still computes
    the same; a warning names how many were left and the log (logger ``"batchnorm"``, level
    INFO) names each with the reason. ``strict=True`` makes that an error instead.

    Args:
        model: the model, with its batch-norm layers in inference mode (``model.eval()``).
        inplace: change ``model`` itself instead of a deep copy (keyword only).
            Default: ``False``.
        strict: raise instead of leaving a BN that cannot be folded (keyword only).
            Default: ``False``.

    Returns:
        The model with the batch-norm layers folded away.

    Raises:
        ValueError: a BN layer is in training mode, has no running statistics
            (``track_running_stats=False``), has a channel count other than the outputs of
            the layer before it, or (``strict=True``) does not directly follow a foldable
            layer. Nothing is changed.

    Example::

        >>> import torch
        >>> from batchnorm.fold import fold
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                             torch.nn.ReLU()).eval()
        >>> folded = fold(model)
        >>> folded[1]
        Identity()
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
    """
    if kinds.is_batch_norm(model):
        raise ValueError(f"cannot fold a lone {type(model).__name__}: nothing precedes it; "
                         "pass the model that holds it and the layer before it")
    modules = dict(model.named_modules())
    pairs, unpaired = _find_pairs(model, modules)
    for name, module in modules.items():
        if kinds.is_batch_norm(module):
            _check_inference(name, module)
    if unpaired and strict:
        name, reason = next(iter(unpaired.items()))
        raise ValueError(
            f"cannot fold batch-norm layer {name!r}: {reason}; fold needs each BN directly "
            f"after a {_LAYER_NAMES} whose output goes nowhere else ({len(unpaired)} such "
            f"layer(s): {', '.join(unpaired)}); strict=False folds the others and leaves "
            "these")
    for bn_name, layer_name in pairs.items():
        _check_channels(bn_name, modules[bn_name], layer_name, modules[layer_name])
    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
    for bn_name, layer_name in pairs.items():
        _fold_into(modules[layer_name], modules[bn_name])
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _remainder(modules[bn_name]))
    _log.info("fold: %d batch-norm layer(s) folded", len(pairs))
    for name, reason in unpaired.items():
        _log.info("fold: left %r: %s", name, reason)
    if unpaired:
        shown = ", ".join(list(unpaired)[:3]) + (", ..." if len(unpaired) > 3 else "")
        warnings.warn(f"fold folded {len(pairs)} batch-norm layer(s) and left {len(unpaired)} "
                      f"that do not directly follow a {_LAYER_NAMES} ({shown}; the "
                      "'batchnorm' logger at INFO says why for each); they still normalize, "
                      "in eval. Pass strict=True to make this an error", stacklevel=2)
    return model


class _Tracer(fx.Tracer):
    """Keeps the layers fold looks for as single call_module nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (kinds.is_batch_norm(module) or isinstance(module, _LAYERS)
                or super().is_leaf_module(module, qualified_name))


def _find_pairs(model: nn.Module, modules: dict) -> tuple[dict, dict]:
    """``({bn: layer}, {bn: why not})`` from the fx graph, else from nn.Sequential order."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many exception types for untraceable code
        return _sequential_pairs(modules, f"torch.fx cannot trace the model ({error})")
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs, unpaired = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or not kinds.is_batch_norm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], _LAYERS)):
            what = source.format_node() if isinstance(source, fx.Node) else repr(source)
            unpaired[node.target] = f"its input comes from `{what}`"
        elif len(source.users) > 1:
            unpaired[node.target] = f"the output of {source.target!r} is also used elsewhere"
        elif calls[source.target] > 1 or calls[node.target] > 1:
            unpaired[node.target] = (f"{source.target!r} or {node.target!r} is called more "
                                     "than once")
        else:
            pairs[node.target] = source.target
    return pairs, unpaired


def _sequential_pairs(modules: dict, why_no_graph: str) -> tuple[dict, dict]:
    pairs = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        prefix = f"{name}." if name else ""
        for (before_name, before), (child_name, child) in zip(children, children[1:],
                                                              strict=False):
            if kinds.is_batch_norm(child) and isinstance(before, _LAYERS):
                pairs[prefix + child_name] = prefix + before_name
    unpaired = {name: f"{why_no_graph}, and it is not right after a {_LAYER_NAMES} in an "
                      "nn.Sequential"
                for name, module in modules.items()
                if kinds.is_batch_norm(module) and name not in pairs}
    return pairs, unpaired


def _remainder(bn: nn.Module) -> nn.Module:
    """What is left of a folded layer: its activation, drop and residual when it has them
    (``batchnorm.fused.Epilogue``), else nothing (``nn.Identity``)."""
    if not kinds.is_fused(bn):
        return nn.Identity()
    if hasattr(bn, "epilogue"):
        return bn.epilogue()
    return Epilogue(bn.act, bn.drop)  # timm's: its act and drop modules


def _check_inference(name: str, bn: nn.Module) -> None:
    if isinstance(bn, _FrozenBatchNorm):
        return
    if bn.training:
        raise ValueError(f"batch-norm layer {name!r} is in training mode, where it normalizes "
                         "by batch statistics; call model.eval() before fold")
    if bn.running_mean is None:
        raise ValueError(f"batch-norm layer {name!r} has no running statistics "
                         "(track_running_stats=False), so it normalizes by each batch's own "
                         "even in eval(); it cannot be folded")


def _check_channels(bn_name: str, bn: nn.Module, layer_name: str, layer: nn.Module) -> None:
    outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != outputs:
        raise ValueError(f"batch-norm layer {bn_name!r} has {bn.num_features} channels but "
                         f"{layer_name!r} before it has {outputs} outputs; the model would not "
                         "run, fix its channel counts")


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias in place so that it computes ``bn(layer(x))``."""
    def f64(t):
        return None if t is None else t.detach().double()

    scale, shift = eager.inference_affine(f64(bn.weight), f64(bn.bias), f64(bn.running_mean),
                                           f64(bn.running_var), bn.eps)
    weight = layer.weight.detach().double()
    kernel = (1,) * (weight.dim() - 2)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        blocks = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        folded = (blocks * scale.view(g, 1, -1, *kernel)).view_as(weight)
    else:
        folded = weight * scale.view(-1, 1, *kernel)
    bias = shift if layer.bias is None else layer.bias.detach().double() * scale + shift
    with torch.no_grad():
        layer.weight.copy_(folded)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight))
        else:
            layer.bias.copy_(bias)
