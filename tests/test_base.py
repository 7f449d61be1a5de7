"""The transform protocol: purity, sgd against torch.optim.SGD, chain, publish, errors."""

from __future__ import annotations

import importlib
import io
import pkgutil
from typing import NamedTuple

import pytest
import torch
from helpers import assert_trees_equal, assert_update_is_pure

import soo_func as sf
from soo_func import tree


def make_params(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return {"w": r(3, 2), "b": (r(2), [r(1)])}


def quadratic(params):
    return sum(0.5 * (i + 1) * (leaf**2).sum() for i, leaf in enumerate(tree.leaves(params)))


class CounterState(NamedTuple):
    count: torch.Tensor


def optax_style_scale_by_count():
    """A user-written optax-style transform: no publish, no **extra, its own state."""

    def init(params):
        leaf = tree.leaves(params)[0]
        return CounterState(torch.zeros((), dtype=leaf.dtype, device=leaf.device))

    def update(updates, state, params=None):
        count = state.count + 1
        return tree.scale(1 / count, updates), CounterState(count)

    return sf.Transform(init, update)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sf.sgd(0.1),
        lambda: sf.sgd(0.1, momentum=0.9),
        lambda: sf.sgd(0.1, momentum=0.9, nesterov=True),
        lambda: sf.scale(-0.5),
        lambda: sf.chain(sf.scale(-1.0), sf.scale(0.1)),
        lambda: sf.chain(optax_style_scale_by_count(), sf.sgd(0.1, momentum=0.5)),
    ],
    ids=["sgd", "momentum", "nesterov", "scale", "chain", "chain_with_optax_style"],
)
def test_update_is_pure(make, dtype, device):
    params = make_params(dtype, device)
    grad = sf.value_and_grad(quadratic)(params)[1]
    updates, state = assert_update_is_pure(make(), params, grad, steps=3, value_fn=quadratic)
    for leaf in tree.leaves((updates, state)):
        assert leaf.device.type == device.type and leaf.dtype == dtype


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch_optim(momentum, nesterov):
    params = make_params()
    torch_params = [leaf.clone().requires_grad_(True) for leaf in tree.leaves(params)]
    opt = torch.optim.SGD(torch_params, lr=0.05, momentum=momentum, nesterov=nesterov)
    transform = sf.sgd(0.05, momentum=momentum, nesterov=nesterov)
    state = transform.init(params)
    for _ in range(5):
        _, grad = sf.value_and_grad(quadratic)(params)
        updates, state = transform.update(grad, state, params)
        params = sf.apply_updates(params, updates)
        opt.zero_grad()
        loss = quadratic(tree.unravel(torch.cat([p.reshape(-1) for p in torch_params]), params))
        loss.backward()
        opt.step()
    for ours, theirs in zip(tree.leaves(params), torch_params, strict=True):
        assert torch.allclose(ours, theirs.detach(), rtol=1e-13, atol=1e-15)


def test_sgd_validates_parameters():
    with pytest.raises(ValueError, match="learning_rate"):
        sf.sgd(0.0)
    with pytest.raises(ValueError, match="momentum"):
        sf.sgd(0.1, momentum=1.0)


def test_optax_style_member_inside_chain_gets_no_extras():
    seen = {}

    def init(params):
        return sf.EmptyState()

    def update(updates, state, params=None):
        seen["called"] = True
        return updates, state

    opt = sf.chain(sf.Transform(init, update), sf.scale(-1.0))
    params = make_params()
    grad = tree.ones_like(params)
    updates, _ = opt.update(
        grad, opt.init(params), params, value=torch.tensor(1.0), value_fn=quadratic
    )
    assert seen["called"]
    assert torch.equal(tree.ravel(updates).flat, -tree.ravel(grad).flat)


class Recorder(NamedTuple):
    seen: torch.Tensor


def publisher(key: str, value: float):
    def init(params):
        return sf.EmptyState()

    def update(updates, state, params=None, **extra):
        return updates, state

    def publish(state, params=None, **extra):
        return {key: torch.tensor(value, dtype=torch.float64)}

    return sf.Transform(init, update, publish)


def recorder(key: str):
    """Stores the extra ``key`` it received in its state (NaN when absent)."""

    def init(params):
        return Recorder(torch.tensor(float("nan"), dtype=torch.float64))

    def update(updates, state, params=None, **extra):
        got = extra.get(key)
        return updates, Recorder(torch.tensor(float("nan")) if got is None else got)

    return sf.Transform(init, update)


def test_publication_reaches_later_members_only():
    opt = sf.chain(recorder("mark"), publisher("mark", 7.0), recorder("mark"))
    params = make_params()
    _, state = opt.update(tree.ones_like(params), opt.init(params), params)
    before, _, after = state.states
    assert torch.isnan(before.seen)
    assert after.seen == 7.0
    assert sf.publish(opt, state, params) == {"mark": torch.tensor(7.0, dtype=torch.float64)}
    assert sf.publish(sf.scale(1.0), sf.EmptyState(), params) == {}


def test_publication_reaches_the_driver_history():
    opt = sf.chain(sf.sgd(0.1), publisher("my_diagnostic", 3.5))
    result = sf.minimize(quadratic, make_params(), opt, max_steps=3, gtol=0.0)
    assert [row["my_diagnostic"] for row in result.history[1:]] == [3.5, 3.5, 3.5]
    assert "my_diagnostic" not in result.history[0]


def test_chain_passes_grad_as_extra_when_missing():
    def init(params):
        return sf.EmptyState()

    def update(updates, state, params=None, **extra):
        return extra["grad"], state

    opt = sf.chain(sf.scale(3.0), sf.Transform(init, update))
    params = {"x": torch.tensor([2.0], dtype=torch.float64)}
    grad = {"x": torch.tensor([5.0], dtype=torch.float64)}
    updates, _ = opt.update(grad, opt.init(params), params)
    assert torch.equal(updates["x"], grad["x"])  # the chain's input, not the scaled updates
    other = {"x": torch.tensor([-1.0], dtype=torch.float64)}
    updates, _ = opt.update(grad, opt.init(params), params, grad=other)
    assert torch.equal(updates["x"], other["x"])  # an explicit grad wins


def test_require_extras_message():
    with pytest.raises(TypeError) as err:
        sf.require_extras("newton_krylov", {"value": torch.tensor(1.0)}, "value", "value_fn")
    message = str(err.value)
    assert "newton_krylov" in message and "value_fn" in message and "params -> 0-d loss" in message
    assert "value," not in message  # only the missing one is named
    sf.require_extras("x", {"grad": 1}, "grad")  # present: no error


def test_chain_checks_state_and_update_structure():
    opt = sf.chain(sf.scale(1.0), sf.scale(2.0))
    params = make_params()
    with pytest.raises(ValueError, match="2 transforms"):
        opt.update(tree.ones_like(params), sf.ChainState((sf.EmptyState(),)), params)
    with pytest.raises(ValueError, match="structures differ"):
        opt.update({"w": torch.zeros(3, 2)}, opt.init(params), params)


def test_apply_updates_errors():
    params = make_params()
    with pytest.raises(ValueError, match="structures differ"):
        sf.apply_updates(params, {"w": torch.zeros(3, 2)})
    wrong_dtype = tree.map_leaves(lambda t: t.float(), params)
    with pytest.raises(TypeError, match="dtype"):
        sf.apply_updates(params, wrong_dtype)
    wrong_shape = dict(params, w=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        sf.apply_updates(params, wrong_shape)
    with pytest.raises(TypeError, match="tensor"):
        sf.apply_updates({"w": torch.zeros(2)}, {"w": 1.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_apply_updates_wrong_device():
    params = {"w": torch.zeros(2, device="cuda")}
    with pytest.raises(ValueError, match="device"):
        sf.apply_updates(params, {"w": torch.zeros(2)})


def test_apply_updates_is_pure_and_follows_dtype(dtype, device):
    params = make_params(dtype, device)
    updates = tree.ones_like(params)
    versions = [leaf._version for leaf in tree.leaves((params, updates))]
    new = sf.apply_updates(params, updates)
    assert versions == [leaf._version for leaf in tree.leaves((params, updates))]
    for p, n in zip(tree.leaves(params), tree.leaves(new), strict=True):
        assert n.dtype == dtype and n.device.type == device.type
        assert torch.equal(n, p + 1)


# --- states load with torch.load's defaults (issue 16, item 11) --------------------------


def residual_fn(params):
    flat = tree.ravel(params).flat
    return torch.cat([flat**2 - 0.5, 0.3 * flat + 1.0])


def least_squares_value(params):
    return 0.5 * (residual_fn(params) ** 2).sum()


def quartic(params):
    flat = tree.ravel(params).flat
    return quadratic(params) + 0.25 * (flat**4).sum() - flat.sum()


LEAST_SQUARES = (
    "gauss_newton+armijo_sync_free",
    "levenberg_marquardt",
    "levenberg_marquardt(cg)",
    "trust_region_reflective",
)

SAVED_FAMILIES = {
    "lbfgs+wolfe": lambda: sf.chain(sf.lbfgs(), sf.wolfe()),
    "bfgs+armijo": lambda: sf.chain(sf.bfgs(), sf.armijo()),
    "sr1(m)+trust_region": lambda: sf.chain(sf.sr1(memory_size=3), sf.trust_region()),
    "ssbroyden+armijo": lambda: sf.chain(sf.ssbroyden(), sf.armijo()),
    "ssbfgs(m)+wolfe": lambda: sf.chain(sf.ssbfgs(memory_size=3), sf.wolfe()),
    "newton_krylov+trust_region": lambda: sf.chain(sf.newton_krylov(), sf.trust_region()),
    "gauss_newton+armijo_sync_free": lambda: sf.chain(sf.gauss_newton(), sf.armijo_sync_free()),
    "nonlinear_cg+wolfe": lambda: sf.chain(sf.nonlinear_cg(), sf.wolfe(c2=0.1)),
    "newton_krylov+levenberg": lambda: sf.chain(sf.newton_krylov(), sf.levenberg()),
    "levenberg_marquardt": lambda: sf.levenberg_marquardt(),
    "levenberg_marquardt(cg)": lambda: sf.levenberg_marquardt(solver="cg"),
    "trust_region_reflective": lambda: sf.trust_region_reflective(-5.0, 5.0),
    "sgd": lambda: sf.sgd(0.05, momentum=0.9),
    "scale_by_schedule": lambda: sf.chain(
        sf.scale_by_schedule(sf.cosine_decay_schedule(1.0, 4)), sf.scale(-0.1)),
    "hessian_free": lambda: sf.hessian_free(),
    "multi_batch_lbfgs": lambda: sf.multi_batch_lbfgs(learning_rate=0.5),
    "homotopy": lambda: sf.chain(sf.homotopy("convex"), sf.newton_krylov(), sf.armijo()),
    "arclength_homotopy": lambda: sf.chain(
        sf.homotopy(max_descent_steps=2), sf.newton_krylov(), sf.armijo()),
}  # fmt: skip


def run_steps(optimizer, params, state, steps, least_squares):
    value_fn = least_squares_value if least_squares else quartic
    for _ in range(steps):
        value, grad = sf.value_and_grad(value_fn)(params)
        extra = dict(value=value, grad=grad, value_fn=value_fn, overlap_value_fn=value_fn)
        if least_squares:
            extra["residual_fn"] = residual_fn
        updates, state = optimizer.update(grad, state, params, **extra)
        params = sf.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_state_round_trips_through_torch_save_and_default_load(family):
    """``torch.save`` then ``torch.load`` with its defaults (``weights_only=True``), and the
    run continues exactly as from the state in memory."""
    least_squares = family in LEAST_SQUARES
    optimizer = SAVED_FAMILIES[family]()
    params = make_params()
    params, state = run_steps(optimizer, params, optimizer.init(params), 3, least_squares)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert_trees_equal(loaded, state)
    assert type(loaded) is type(state)
    expected = run_steps(optimizer, params, state, 2, least_squares)
    assert_trees_equal(run_steps(optimizer, params, loaded, 2, least_squares), expected)


def _package_state_types():
    found = set()
    for info in pkgutil.walk_packages(sf.__path__, "soo_func."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, tuple)
                and hasattr(obj, "_fields")
                and obj.__module__ == info.name
                and name.endswith("State")
                and not name.startswith("_")
            ):
                found.add(obj)
    return found


def test_every_state_type_of_the_package_is_a_safe_global():
    registered = set(torch.serialization.get_safe_globals())
    missing = _package_state_types() - set(sf.serialization.STATE_TYPES)
    assert not missing, f"add these to soo_func/serialization.py: {missing}"
    assert set(sf.serialization.STATE_TYPES) <= registered
