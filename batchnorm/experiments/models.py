"""The experiments' networks, with the normalization layer chosen by name.

Every model takes flattened MNIST images, shape (N, 784) with pixels in [0, 1], and returns
(N, 10) logits. The layer after each affine map comes from :data:`NORMS`, so an experiment can
compare normalizations by name: "none", "bn", "ghost" (batch norm over groups of
``virtual_batch_size`` examples inside the batch) and "renorm" (Batch Renorm, the same groups
when ``virtual_batch_size`` is given); a further variant is a further factory in :data:`NORMS`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.renorm import BatchRenorm1d, BatchRenorm2d


def _batch_norm(num_features: int, spatial: bool, **options) -> nn.Module:
    return (BatchNorm2d if spatial else BatchNorm1d)(num_features, **options)


def _ghost_batch_norm(num_features: int, spatial: bool, *, virtual_batch_size: int,
                      **options) -> nn.Module:
    # The group size is required: without it "ghost" would silently be plain batch norm.
    return _batch_norm(num_features, spatial, virtual_batch_size=virtual_batch_size, **options)


def _batch_renorm(num_features: int, spatial: bool, **options) -> nn.Module:
    return (BatchRenorm2d if spatial else BatchRenorm1d)(num_features, **options)


def _identity(num_features: int, spatial: bool, **options) -> nn.Module:
    return nn.Identity()


# name -> factory(num_features, spatial, **options) of the layer between an affine map and its
# nonlinearity; `spatial` is True after a convolution (statistics per channel).
NORMS = {"none": _identity, "bn": _batch_norm, "ghost": _ghost_batch_norm,
         "renorm": _batch_renorm}

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def make_norm(name: str, num_features: int, spatial: bool = False, **options) -> nn.Module:
    """The normalization layer called ``name`` for ``num_features`` features or channels.

    >>> make_norm("none", 3)
    Identity()
    >>> make_norm("ghost", 3, virtual_batch_size=4).virtual_batch_size
    4
    """
    if name not in NORMS:
        raise ValueError(f"unknown normalization {name!r}; expected one of {sorted(NORMS)}")
    return NORMS[name](num_features, spatial, **options)


def mlp(hidden: Sequence[int], *, norm: str = "none", activation: str = "relu",
        init_std: float | None = None, norm_options: dict | None = None) -> nn.Sequential:
    """A fully-connected network: (affine → norm → activation) per hidden layer, then affine.

    Args:
        hidden: widths of the hidden layers, e.g. ``(100, 100, 100)``.
        norm: name in :data:`NORMS` (default "none").
        activation: "relu" or "sigmoid" (default "relu").
        init_std: standard deviation of the Gaussian initial weights of every affine layer, with
            zero biases (default None: torch's default initialization).
        norm_options: keyword arguments for the normalization layers (default none).

    Returns:
        ``nn.Sequential`` of Linear, norm and activation modules, in that order per layer.

    The bias of an affine map is dropped when a normalization follows: subtracting the batch
    mean cancels it (its gradient is exactly zero) and the norm's own shift takes its place.

    >>> mlp((5, 4), norm="bn", activation="sigmoid")[0]
    Linear(in_features=784, out_features=5, bias=False)
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; "
                         f"expected one of {sorted(ACTIVATIONS)}")
    layers, width = [], 784
    for out in hidden:
        layers += [nn.Linear(width, out, bias=norm == "none"),
                   make_norm(norm, out, **(norm_options or {})), ACTIVATIONS[activation]()]
        width = out
    layers.append(nn.Linear(width, 10))
    if init_std is not None:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def convnet(channels: Sequence[int] = (16, 32), *, norm: str = "none") -> nn.Sequential:
    """A small convolutional network: (conv 3x3 → norm → ReLU → max-pool 2) per block, then affine.

    Args:
        channels: output channels of each block (default ``(16, 32)``); 28x28 inputs allow up
            to 4 blocks.
        norm: name in :data:`NORMS` (default "none").

    >>> convnet((4, 8), norm="bn")(__import__("torch").zeros(2, 784)).shape
    torch.Size([2, 10])
    """
    if not 1 <= len(channels) <= 4:
        raise ValueError(f"convnet takes 1 to 4 blocks for 28x28 inputs, got {len(channels)}")
    layers, width, side = [nn.Unflatten(1, (1, 28, 28))], 1, 28
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=norm == "none"),
                   make_norm(norm, out, spatial=True), nn.ReLU(), nn.MaxPool2d(2)]
        width, side = out, side // 2
    layers += [nn.Flatten(), nn.Linear(width * side * side, 10)]
    return nn.Sequential(*layers)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-normalization layers of ``model`` in forward order (modules with running stats)."""
    return [m for m in model.modules() if getattr(m, "running_mean", None) is not None]


def activation_layers(model: nn.Module) -> list[nn.Module]:
    """The nonlinearities of ``model`` in forward order."""
    kinds = tuple(ACTIVATIONS.values())
    return [m for m in model.modules() if isinstance(m, kinds)]
