"""An ``nn.Module`` and a loss as a pure ``value_fn(params, batch)``: :func:`functional_loss`.

The params are bound to the module with ``torch.func.functional_call`` for the whole
loss computation (the module's forward pass *and* the loss), so the value is pure in the
params and its gradient is taken in them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf

PyTree = Any

__all__ = ["functional_loss"]


def functional_loss(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[Callable[[PyTree, tuple[torch.Tensor, torch.Tensor]], torch.Tensor], dict]:
    """Turn ``module`` and ``loss_fn(outputs, targets)`` into ``(value_fn, params)``.

    ``value_fn(params, (inputs, targets))`` computes ``loss_fn(module(inputs), targets)``
    inside one ``torch.func.functional_call`` on ``params`` (a dict name -> tensor) and the
    module's buffers, so it is pure in ``params``. The loss runs while ``params`` are bound
    to the module: an output that reads the module's parameters only when the loss
    touches it (a GPyTorch ``ExactGP``'s lazy distribution) is differentiated in
    ``params``, not in the module's own tensors. ``params`` is a dict of detached copies
    of the module's parameters; the module itself is not modified.
    """
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    buffers = {name: b for name, b in module.named_buffers()}
    for mod in module.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(
                f"{type(mod).__name__} in training mode updates running statistics in place, "
                "which breaks functional transforms and Hessian products: use GroupNorm or "
                "LayerNorm, or call module.eval() first"
            )
    bound = _BoundLoss(module, loss_fn)

    def value_fn(p: PyTree, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        tensors = {f"module.{name}": t for name, t in {**buffers, **p}.items()}
        return tf.functional_call(bound, tensors, (inputs, targets))

    return value_fn, params


class _BoundLoss(torch.nn.Module):
    """``loss_fn(module(inputs), targets)`` as one module, so that ``functional_call`` keeps
    the params bound until the loss has been computed. ``loss_fn`` is held out of the
    module tree (it may itself be a module holding ``module``, as a GPyTorch likelihood)."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.module = module
        self.loss = (loss_fn,)  # a tuple: not registered as a submodule

    def forward(self, inputs: Any, targets: Any) -> torch.Tensor:
        return self.loss[0](self.module(inputs), targets)
