"""Oracles against torch.autograd.functional and dense Jacobians; counting; functional_loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import soo_func as sf
from soo_func import tree


def mlp_params(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(
            dtype=dtype, device=device
        )

    return {"hidden": (r(4, 3), r(4)), "out": {"weight": r(2, 4), "bias": [r(2)]}}


INPUTS = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
TARGETS = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def mlp_outputs(params, inputs):
    w1, b1 = params["hidden"]
    h = torch.tanh(inputs @ w1.T + b1)
    return h @ params["out"]["weight"].T + params["out"]["bias"][0]


def mlp_loss(params):
    inputs, targets = INPUTS.to(tree.leaves(params)[0]), TARGETS.to(tree.leaves(params)[0])
    return ((mlp_outputs(params, inputs) - targets) ** 2).mean() + 0.1 * (
        tree.sum_of_squares(params) ** 2
    )


def mlp_residuals(params):
    inputs = INPUTS.to(tree.leaves(params)[0])
    return {"fit": mlp_outputs(params, inputs), "ridge": [torch.sin(params["hidden"][1])]}


def flat_fn(fn, like):
    raveled = tree.ravel(like)
    return (lambda x: fn(tree.unravel(x, raveled))), raveled


def reference_hvp(params, v):
    f, raveled = flat_fn(mlp_loss, params)
    _, hv = torch.autograd.functional.hvp(f, raveled.flat, tree.ravel(v).flat)
    return hv


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hvp_matches_autograd_functional(mode):
    params = mlp_params()
    v = tree.map_leaves(torch.randn_like, params)
    hv = sf.hvp(mlp_loss, params, v, mode=mode)
    assert tree.structure(hv) == tree.structure(params)
    assert torch.allclose(tree.ravel(hv).flat, reference_hvp(params, v), rtol=0, atol=1e-10)


def test_linearize_grad_matches_references():
    params = mlp_params()
    value, grad, hvp_fn = sf.linearize_grad(mlp_loss, params)
    ref_value, ref_grad = sf.value_and_grad(mlp_loss)(params)
    assert torch.allclose(value, ref_value, rtol=1e-14)
    assert torch.allclose(tree.ravel(grad).flat, tree.ravel(ref_grad).flat, rtol=0, atol=1e-12)
    f, raveled = flat_fn(mlp_loss, params)
    ref_grad_flat = torch.autograd.functional.jacobian(f, raveled.flat)
    assert torch.allclose(tree.ravel(grad).flat, ref_grad_flat, rtol=0, atol=1e-12)
    for _ in range(3):
        v = tree.map_leaves(torch.randn_like, params)
        assert torch.allclose(
            tree.ravel(hvp_fn(v)).flat, reference_hvp(params, v), rtol=0, atol=1e-10
        )


def test_hvp_with_extra_args_and_bad_mode():
    params = mlp_params()

    def loss_with_batch(p, inputs, targets):
        return ((mlp_outputs(p, inputs) - targets) ** 2).sum()

    v = tree.ones_like(params)
    hv = sf.hvp(loss_with_batch, params, v, INPUTS, TARGETS)
    f, raveled = flat_fn(lambda p: loss_with_batch(p, INPUTS, TARGETS), params)
    dense = torch.autograd.functional.hessian(f, raveled.flat)
    assert torch.allclose(tree.ravel(hv).flat, dense @ tree.ravel(v).flat, atol=1e-10)
    with pytest.raises(ValueError, match="reverse-over-reverse"):
        sf.hvp(mlp_loss, params, v, mode="forward")
    with pytest.raises(ValueError, match="structures differ"):
        sf.hvp(mlp_loss, params, {"hidden": v["hidden"]})


def test_ggn_vp_matches_dense_jacobian():
    params = mlp_params()

    def flat_residuals(x):
        return tree.ravel(mlp_residuals(tree.unravel(x, raveled))).flat

    raveled = tree.ravel(params)
    jac = torch.autograd.functional.jacobian(flat_residuals, raveled.flat)
    v = tree.map_leaves(torch.randn_like, params)
    out = sf.ggn_vp(mlp_residuals, params, v)
    expected = jac.T @ (jac @ tree.ravel(v).flat)
    assert torch.allclose(tree.ravel(out).flat, expected, rtol=0, atol=1e-10)


def test_ggn_operator_products_share_one_forward_and_match_dense_jtj():
    """k products of one operator: one call of the (pytree-valued) residual function, and
    each product ``J^T J v`` of the dense Jacobian, also under ``vmap`` over ``v``."""
    params = mlp_params()
    calls = []

    def counted(p):
        calls.append(1)
        return mlp_residuals(p)

    raveled = tree.ravel(params)
    jac = torch.autograd.functional.jacobian(
        lambda x: tree.ravel(mlp_residuals(tree.unravel(x, raveled))).flat, raveled.flat
    )
    _, matvec = sf.oracles.ggn_operator(counted, params)
    vs = [tree.map_leaves(torch.randn_like, params) for _ in range(3)]
    for v in vs:
        expected = jac.T @ (jac @ tree.ravel(v).flat)
        torch.testing.assert_close(tree.ravel(matvec(v)).flat, expected, rtol=0, atol=1e-10)
    stacked = tree.map_leaves(lambda *leaves: torch.stack(leaves), *vs)
    batched = torch.func.vmap(matvec)(stacked)
    for i, v in enumerate(vs):
        got = tree.ravel(tree.map_leaves(lambda t, i=i: t[i], batched)).flat
        torch.testing.assert_close(got, jac.T @ (jac @ tree.ravel(v).flat), rtol=0, atol=1e-10)
    assert len(calls) == 1


def test_value_and_grad_matches_autograd_and_is_pure(dtype, device):
    params = mlp_params(dtype, device)
    versions = [leaf._version for leaf in tree.leaves(params)]
    value, grad = sf.value_and_grad(mlp_loss)(params)
    assert versions == [leaf._version for leaf in tree.leaves(params)]
    assert all(not leaf.requires_grad for leaf in tree.leaves(params))
    assert value.dim() == 0 and value.dtype == dtype and not value.requires_grad
    leaves = [leaf.detach().requires_grad_(True) for leaf in tree.leaves(params)]
    expected = torch.autograd.grad(
        mlp_loss(tree.unravel(torch.cat([x.reshape(-1) for x in leaves]), params)), leaves
    )
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, e in zip(tree.leaves(grad), expected, strict=True):
        assert g.dtype == dtype and g.device.type == device.type
        assert torch.allclose(g, e, rtol=rtol, atol=rtol)
    hv = sf.hvp(mlp_loss, params, grad)
    assert all(h.dtype == dtype and h.device.type == device.type for h in tree.leaves(hv))


def test_value_and_grad_inside_torch_func_and_no_grad():
    params = mlp_params()
    _, grad = sf.value_and_grad(mlp_loss)(params)
    with torch.no_grad():
        _, grad_no_grad = sf.value_and_grad(mlp_loss)(params)
    assert torch.allclose(tree.ravel(grad_no_grad).flat, tree.ravel(grad).flat, atol=1e-14)
    # the gradient of <grad, v> through sf.value_and_grad under torch.func is H v
    v = tree.ones_like(params)
    hv = torch.func.grad(lambda p: tree.vdot(sf.value_and_grad(mlp_loss)(p)[1], v))(params)
    assert torch.allclose(tree.ravel(hv).flat, reference_hvp(params, v), atol=1e-10)


def test_value_and_grad_has_aux_and_unused_leaf():
    params = {"used": torch.tensor([1.0, 2.0]), "unused": torch.tensor([3.0])}
    (value, aux), grad = sf.value_and_grad(lambda p: ((p["used"] ** 2).sum(), "aux"), has_aux=True)(
        params
    )
    assert aux == "aux" and value == 5.0
    assert torch.equal(grad["used"], torch.tensor([2.0, 4.0]))
    assert torch.equal(grad["unused"], torch.zeros(1))


def test_clear_errors():
    params = mlp_params()
    with pytest.raises(ValueError, match="scalar"):
        sf.value_and_grad(lambda p: p["out"]["weight"] * 2)(params)
    with pytest.raises(TypeError, match=r"0-d torch\.Tensor"):
        sf.value_and_grad(lambda p: 1.0)(params)
    with pytest.raises(TypeError, match=r"leaf at \['b'\] is int"):
        sf.value_and_grad(lambda p: p["a"].sum())({"a": torch.zeros(2), "b": 3})
    with pytest.raises(ValueError, match="scalar"):
        sf.hvp(lambda p: p["out"]["weight"] * 2, params, params)


def test_counted_objective_charges_each_oracle_once():
    objective = sf.CountedObjective(mlp_loss)
    params = mlp_params()
    objective(params)
    assert (objective.num_value_evals, objective.num_grad_evals) == (1, 0)
    sf.value_and_grad(objective)(params)
    assert (objective.num_value_evals, objective.num_grad_evals) == (2, 1)
    sf.hvp(objective, params, params)
    sf.hvp(objective, params, params, mode="reverse-over-reverse")
    assert (objective.num_value_evals, objective.num_grad_evals, objective.num_hvp_evals) == (
        2,
        1,
        2,
    )
    _, _, hvp_fn = sf.linearize_grad(objective, params)
    assert (objective.num_value_evals, objective.num_grad_evals) == (3, 2)
    hvp_fn(params)
    hvp_fn(params)
    assert objective.num_hvp_evals == 4
    assert sf.CountedObjective(objective).fn is mlp_loss  # no double wrapping


class SmallNet(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


def test_functional_loss_matches_module_and_leaves_it_alone():
    torch.manual_seed(0)
    module = SmallNet(nn.GroupNorm(2, 4)).double()
    inputs = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (6,))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    value_fn, params = sf.functional_loss(module, nn.functional.cross_entropy)
    assert set(params) == {name for name, _ in module.named_parameters()}
    value, grad = sf.value_and_grad(value_fn)(params, (inputs, targets))
    expected = nn.functional.cross_entropy(module(inputs), targets)
    assert torch.allclose(value, expected, rtol=1e-14)
    expected_grads = torch.autograd.grad(expected, list(module.parameters()))
    for (name, _), e in zip(module.named_parameters(), expected_grads, strict=True):
        assert torch.allclose(grad[name], e, rtol=1e-12, atol=1e-14)
    # moving the params does not move the module
    moved = tree.map_leaves(lambda t: t + 1, params)
    value_fn(moved, (inputs, targets))
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[key])
    assert all(p.grad is None for p in module.parameters())
    hv = sf.hvp(lambda p: value_fn(p, (inputs, targets)), params, grad)
    assert tree.structure(hv) == tree.structure(params)


def test_functional_loss_rejects_training_batchnorm():
    module = SmallNet(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"BatchNorm2d.*eval"):
        sf.functional_loss(module, nn.functional.cross_entropy)
    module.eval()
    value_fn, params = sf.functional_loss(module, nn.functional.cross_entropy)
    before = module.norm.running_mean.clone()
    value_fn(params, (torch.randn(2, 1, 4, 4), torch.tensor([0, 1])))
    assert torch.equal(module.norm.running_mean, before)


class LazyOutput:
    """An output that reads its module's parameters only when the loss asks for them, as a
    GPyTorch ``ExactGP``'s lazy distribution does (issue 16, item 1)."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor) -> None:
        self.module, self.inputs = module, inputs

    def mean(self) -> torch.Tensor:
        return torch.tanh(self.inputs @ self.module.weight) + self.module.bias

    def log_scale(self) -> torch.Tensor:
        return self.module.log_noise


class LazyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.7, -0.3], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        self.log_noise = nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> LazyOutput:
        return LazyOutput(self, inputs)


def lazy_negative_log_likelihood(out: LazyOutput, targets: torch.Tensor) -> torch.Tensor:
    scale = torch.exp(out.log_scale())
    return (0.5 * ((targets - out.mean()) / scale) ** 2 + out.log_scale()).sum()


def test_functional_loss_differentiates_a_lazy_output_in_the_params():
    """The loss runs while the params are bound: the gradient (and a Hessian product) of
    a lazy output's loss agree with central differences of the value in the params."""
    inputs = torch.randn(7, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = torch.randn(7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    module = LazyModel()
    value_fn, params = sf.functional_loss(module, lazy_negative_log_likelihood)
    params = {name: p + 0.1 for name, p in params.items()}  # away from the module's own values
    batch = (inputs, targets)

    def flat_value(x: torch.Tensor) -> torch.Tensor:
        return value_fn(tree.unravel(x, params), batch)

    value, grad = sf.value_and_grad(value_fn)(params, batch)
    x = tree.ravel(params).flat
    assert torch.allclose(value, flat_value(x), rtol=0, atol=0)
    h = 1e-6
    eye = torch.eye(x.numel(), dtype=x.dtype)
    central = torch.stack([(flat_value(x + h * e) - flat_value(x - h * e)) / (2 * h) for e in eye])
    assert central.abs().max() > 0.1  # every parameter matters
    assert torch.allclose(tree.ravel(grad).flat, central, rtol=1e-7, atol=1e-8)
    v = tree.unravel(torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype), params)
    hv = sf.hvp(lambda p: value_fn(p, batch), params, v)
    shifted = [sf.value_and_grad(value_fn)(tree.unravel(x + s * 1e-5 * tree.ravel(v).flat, params),
                                            batch)[1] for s in (1.0, -1.0)]  # fmt: skip
    difference = (tree.ravel(shifted[0]).flat - tree.ravel(shifted[1]).flat) / 2e-5
    assert torch.allclose(tree.ravel(hv).flat, difference, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in module.parameters())  # the module is left alone


class CachedScaleModel(nn.Module):
    """Caches a tensor computed from its parameter at construction: it cannot be made pure
    by ``functional_call`` (the cache keeps reading the module's own ``weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.scaled = 2.0 * self.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.scaled


@pytest.mark.parametrize("path", ["autograd", "torch.func.grad", "minimize"])
def test_functional_loss_raises_on_a_module_that_cannot_be_made_pure(path):
    """The gradient in params of a cached-parameter module is exactly zero although the
    value depends on ``weight``: functional_loss raises instead of returning it, on
    eager autograd, inside torch.func and through the driver."""
    module = CachedScaleModel()
    value_fn, params = sf.functional_loss(module, lambda out, y: ((out - y) ** 2).sum())
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    with pytest.raises(sf.ImpureModuleError, match=r"own parameter tensors \['weight'\]"):
        if path == "autograd":
            sf.value_and_grad(value_fn)(params, batch)
        elif path == "torch.func.grad":
            torch.func.grad(value_fn)(params, batch)
        else:
            sf.minimize(lambda p: value_fn(p, batch), params, sf.chain(sf.lbfgs(), sf.wolfe()))


def test_functional_loss_accepts_a_loss_reading_the_bound_parameters():
    """``module.parameters()`` read inside ``loss_fn`` are the bound params (not flagged),
    and passing the module's own tensors as params is not flagged either: the gradient
    agrees with torch.autograd on the module."""
    layer = nn.Linear(3, 1).double()
    inputs, targets = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def loss_fn(out, y):
        return ((out.squeeze(-1) - y) ** 2).sum() + sum((q**2).sum() for q in layer.parameters())

    value_fn, params = sf.functional_loss(layer, loss_fn)
    _, grad = sf.value_and_grad(value_fn)(params, (inputs, targets))
    expected = torch.autograd.grad(loss_fn(layer(inputs), targets), list(layer.parameters()))
    for got, want in zip(grad.values(), expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    value_fn(dict(layer.named_parameters()), (inputs, targets))  # its own tensors: pure
