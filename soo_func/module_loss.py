"""An ``nn.Module`` and a loss as a pure ``value_fn(params, batch)``: :func:`functional_loss`.

The params are bound to the module with ``torch.func.functional_call`` for the whole
loss computation (the module's forward pass *and* the loss), so the value is pure in the
params and its gradient is taken in them.

A module that cannot be made pure this way reads its own parameter tensors behind
``functional_call``'s back: a tensor computed from a parameter and cached (in
``__init__`` or by an earlier forward), or a ``loss_fn`` that holds
a parameter tensor captured before the call. Its value would be right and its gradient in ``params``
wrong (zero in those parameters). :func:`functional_loss` detects it from the autograd
graph of the first evaluation that records one (the module's parameters require grad,
so a loss that reads them is connected to them) and raises :class:`ImpureModuleError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

PyTree = Any

__all__ = ["ImpureModuleError", "functional_loss"]


class ImpureModuleError(ValueError):
    """The loss reads the module's own parameter tensors, not the params passed in."""


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
    names = {id(t): name for name, t in module.named_parameters()}
    unchecked = [True]  # until one evaluation recorded a graph (see check_pure)

    def value_fn(p: PyTree, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        tensors = {f"module.{name}": t for name, t in {**buffers, **p}.items()}
        loss = tf.functional_call(bound, tensors, (inputs, targets))
        if unchecked[0]:
            own = {i: n for i, n in names.items() if i not in {id(t) for t in p.values()}}
            unchecked[0] = not check_pure(loss, own, type(module).__name__)
        return loss

    return value_fn, params


def check_pure(loss: torch.Tensor, names: dict[int, str], module_name: str) -> bool:
    """Raise :class:`ImpureModuleError` when ``loss``'s autograd graph reaches one of the
    module's own parameters (``names``: their ids to their names); return whether the
    check was conclusive (the loss recorded a graph at the base level, under any
    ``torch.func`` wrappers)."""
    while is_functorch_wrapped_tensor(loss):
        loss = get_unwrapped(loss)
    if loss.grad_fn is None:
        return False
    read = sorted({names[id(v)] for v in _graph_leaves(loss.grad_fn) if id(v) in names})
    if read:
        raise ImpureModuleError(
            f"functional_loss: the loss of {module_name} depends on the module's own "
            f"parameter tensors {read}, not on the params passed in, so its gradient in "
            "params would be wrong (zero there). The module caches a tensor computed from "
            "a parameter (in __init__ or an earlier forward), or loss_fn holds a "
            "parameter tensor captured before the call: compute such tensors inside forward, "
            "and read parameters through the module (module.parameters() is bound) in loss_fn."
        )
    return True


def _graph_leaves(root: Any) -> list[torch.Tensor]:
    """The leaf tensors (``AccumulateGrad`` nodes' variables) an autograd graph reaches."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


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
