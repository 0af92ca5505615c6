"""Training and evaluation loops shared by the experiments: minibatch SGD on MNIST tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from batchnorm.data import Mnist


@dataclass(frozen=True)
class Tensors:
    """MNIST as float tensors on one device: images flattened to (N, 784) in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_tensors(mnist: Mnist, device: torch.device, seed: int) -> Tensors:
    """Convert to tensors on ``device``, with the training set shuffled by ``seed``.

    The shuffle matters: a reduced training set may be sorted by class, and experiments that
    take its first n images need a random, class-balanced subset.
    """
    order = np.random.default_rng(seed).permutation(mnist.n_train)

    def images(array: np.ndarray) -> torch.Tensor:
        flat = torch.from_numpy(array.reshape(len(array), -1))
        return flat.to(device=device, dtype=torch.float32).div_(255.0)

    def labels(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.astype(np.int64)).to(device)

    return Tensors(images(mnist.train_images[order]), labels(mnist.train_labels[order]),
                   images(mnist.test_images), labels(mnist.test_labels))


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator, *,
            replace: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of ``steps`` minibatches drawn from ``range(n)``.

    Args:
        replace: draw each batch independently with replacement (default False: shuffle once per
            epoch and take consecutive slices, dropping the remainder of an epoch).

    >>> g = torch.Generator().manual_seed(0)
    >>> [b.shape[0] for b in batches(10, 4, 3, g)]
    [4, 4, 4]
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the training set size), got {batch_size}")
    done, order, position = 0, None, n
    while done < steps:
        if replace:
            yield torch.randint(0, n, (batch_size,), generator=generator)
        else:
            if position + batch_size > n:
                order, position = torch.randperm(n, generator=generator), 0
            yield order[position:position + batch_size]
            position += batch_size
        done += 1


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 2000) -> float:
    """Fraction of ``x`` classified as ``y`` by ``model`` in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        correct += int((model(x[start:start + chunk]).argmax(1) == y[start:start + chunk]).sum())
    model.train(was_training)
    return correct / len(x)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          *, steps: int, batch_size: int, generator: torch.Generator, replace: bool = False,
          eval_every: int = 0, on_eval: Callable[[int], None] | None = None,
          advance: Callable[[int], None] | None = None) -> int | None:
    """Minimize the softmax cross-entropy of ``model`` on ``(x, y)`` for ``steps`` steps.

    Args:
        steps, batch_size, generator, replace: the minibatches (see :func:`batches`).
        eval_every: call ``on_eval(step)`` at step 0, every ``eval_every`` steps and at the end
            (default 0: never).
        advance: progress callback, called with the number of steps done since the last call.

    Returns:
        The step at which the loss stopped being finite (training stops there), else None.
    """
    model.train()
    if on_eval and eval_every:
        on_eval(0)
    device = x.device
    for step, index in enumerate(batches(len(x), batch_size, steps, generator, replace=replace), 1):
        index = index.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[index]), y[index])
        # A diverged network only produces NaNs from here on: stop and report the step.
        if not torch.isfinite(loss):
            return step
        loss.backward()
        optimizer.step()
        if advance and (step % 100 == 0 or step == steps):
            advance(100 if step % 100 == 0 else step % 100)
        if on_eval and eval_every and (step % eval_every == 0 or step == steps):
            on_eval(step)
    return None
