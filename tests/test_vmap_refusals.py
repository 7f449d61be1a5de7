"""Code that decides on the host refuses ``torch.func.vmap`` with an error that names the
path that works there (instead of torch's "data-dependent control flow" or "data pointer"
errors from deep inside a search)."""

from __future__ import annotations

import pytest
import torch

import soo_func as sf

D = torch.float64
LOWER, UPPER = torch.zeros(3, dtype=D), torch.full((3,), 0.5, dtype=D)


def value(x: torch.Tensor) -> torch.Tensor:
    return ((x - 1.0) ** 2).sum()


def residual(x: torch.Tensor) -> torch.Tensor:
    return x - 1.0


def starts() -> torch.Tensor:
    return torch.linspace(0.1, 0.4, 6, dtype=D).reshape(2, 3)


HOST_DECIDING = {
    "armijo": (lambda: sf.chain(sf.lbfgs(), sf.armijo()), sf.minimize, value, "armijo_sync_free"),
    "wolfe": (lambda: sf.chain(sf.lbfgs(), sf.wolfe()), sf.minimize, value, "armijo_sync_free"),
    "lbfgs_b": (lambda: sf.lbfgs_b(LOWER, UPPER), sf.minimize, value, "change of variables"),
    "trust_region_reflective": (
        lambda: sf.trust_region_reflective(LOWER, UPPER),
        sf.least_squares,
        residual,
        "change of variables",
    ),
}


@pytest.mark.parametrize("name", HOST_DECIDING)
def test_host_deciding_transform_refuses_vmap_and_names_the_alternative(name):
    make, driver, fn, alternative = HOST_DECIDING[name]

    def solve(x: torch.Tensor) -> torch.Tensor:
        return driver(fn, x, make(), max_steps=5, check_every=None).params

    with pytest.raises(ValueError, match=r"torch\.func\.vmap") as err:
        torch.func.vmap(solve)(starts())
    assert name in str(err.value) and alternative in str(err.value)
    single = driver(fn, starts()[0], make(), max_steps=5, check_every=None)  # outside vmap
    assert torch.isfinite(single.value)


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("driver", ["minimize", "least_squares"])
def test_host_loop_under_vmap_asks_for_check_every_none(driver, check_every):
    chain = sf.chain(sf.lbfgs(), sf.armijo_sync_free())

    def solve(x: torch.Tensor) -> torch.Tensor:
        if driver == "minimize":
            return sf.minimize(value, x, chain, max_steps=5, check_every=check_every).params
        return sf.least_squares(residual, x, max_steps=5, check_every=check_every).params

    with pytest.raises(ValueError, match="check_every=None"):
        torch.func.vmap(solve)(starts())


def test_sync_free_run_under_vmap_equals_the_loop():
    chain = sf.chain(sf.lbfgs(), sf.armijo_sync_free())

    def solve(x: torch.Tensor) -> torch.Tensor:
        return sf.minimize(value, x, chain, max_steps=8, check_every=None).params

    batched = torch.func.vmap(solve)(starts())
    looped = torch.stack([solve(x) for x in starts()])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)
