"""PINN problems of Rathore et al. (ICML 2024), as pure functions of a params pytree.

Rathore, Lei, Frangella, Lu & Udell, "Challenges in Training PINNs: A Loss Landscape
Perspective", ICML 2024 (arXiv:2402.01868), section 2 and appendix A: on
``x in [0, 2 pi)``, ``t in [0, 1]`` with a periodic boundary,

* convection ``u_t + beta u_x = 0``, ``u(x, 0) = sin x``; exact ``u = sin(x - beta t)``;
* reaction ``u_t - rho u (1 - u) = 0``, ``u(x, 0) = h(x) = exp(-(x - pi)^2 / (2 (pi/4)^2))``;
  exact ``u = h e^{rho t} / (h e^{rho t} + 1 - h)`` (the logistic equation pointwise).

The network is a tanh MLP ``(x, t) -> u`` in float64 whose forward pass also carries the
input tangents (forward-mode derivatives ``u_x``, ``u_t`` propagated layer by layer:
``z' = W a'``, ``a' = (1 - tanh(z)^2) z'``), so the residuals are plain tensor code that
reverse mode (gradients) and reverse-over-reverse (Hessian products) differentiate.
The loss is that of the paper,

    L(w) = 1/(2 n_res) sum r_res^2 + 1/(2 n_ic) sum r_ic^2 + 1/(2 n_bc) sum r_bc^2
         = 0.5 ||r(w)||^2,

with ``r`` the three residual blocks each scaled by ``1 / sqrt(n_block)`` and stacked:
``residual_fn(params)`` returns ``r`` (for least-squares methods), ``value_fn(params)``
returns ``0.5 ||r||^2``. Both bind ``params`` with ``torch.func.functional_call``. The error
is the L2 relative error ``||u - u*|| / ||u*||`` on a test grid against the exact solution.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Residual = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DTYPE = torch.float64
TWO_PI = 2 * math.pi

__all__ = [
    "PINNProblem",
    "TanhMLP",
    "convection",
    "fresh_collocation",
    "input_derivatives",
    "l2_relative_error",
    "make_model",
    "reaction",
    "relative_error",
    "residual_fn",
    "value_fn",
]


class TanhMLP(nn.Module):
    """``(x, t) -> u``: ``depth`` hidden tanh layers of ``width`` units, float64."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        sizes = [2] + [width] * depth + [1]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, dtype=DTYPE) for a, b in itertools.pairwise(sizes)
        )

    def forward(self, points: torch.Tensor, derivatives: bool = False) -> torch.Tensor:
        """``u`` at ``points`` (``(N, 2)``: columns ``x``, ``t``), shape ``(N,)``; with
        ``derivatives``, ``(3, N)``: rows ``u``, ``u_x``, ``u_t``."""
        if not derivatives:
            h = points
            for layer in self.layers[:-1]:
                h = torch.tanh(layer(h))
            return self.layers[-1](h).squeeze(-1)
        first = self.layers[0]
        z = first(points)
        # tangents of the first pre-activation along e_x and e_t: the weight's columns
        tangents = first.weight.T.unsqueeze(1).expand(2, points.shape[0], -1)
        for layer in self.layers[1:]:
            a = torch.tanh(z)
            tangents = (1 - a * a) * tangents
            z = layer(a)
            tangents = tangents @ layer.weight.T
        return torch.cat([z.T, tangents.squeeze(-1)], dim=0)


@dataclass
class PINNProblem:
    """A PDE ``pde(u, u_x, u_t, coefficient) = 0`` with ``u(x, 0) = initial(x)``, periodic
    in ``x``, its exact solution, collocation points and test grid."""

    name: str
    coefficient: float
    pde: Residual
    initial: Callable[[torch.Tensor], torch.Tensor]
    exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    interior: torch.Tensor  # (n_res, 2) points (x, t)
    initial_x: torch.Tensor  # (n_ic,) x at t = 0
    boundary_t: torch.Tensor  # (n_bc,) t at x = 0 and x = 2 pi
    test_points: torch.Tensor  # (n_test, 2)

    @property
    def label(self) -> str:
        symbol = "beta" if self.name == "convection" else "rho"
        return f"{self.name} {symbol}={self.coefficient:g}"


def convection_residual(u, u_x, u_t, beta):
    """``u_t + beta u_x``."""
    return u_t + beta * u_x


def reaction_residual(u, u_x, u_t, rho):
    """``u_t - rho u (1 - u)``."""
    return u_t - rho * u * (1 - u)


def gaussian_bump(x: torch.Tensor) -> torch.Tensor:
    """``h(x) = exp(-(x - pi)^2 / (2 (pi/4)^2))``, the reaction problem's initial value."""
    return torch.exp(-((x - math.pi) ** 2) / (2 * (math.pi / 4) ** 2))


def _grid(n_x: int, n_t: int) -> torch.Tensor:
    x = torch.arange(n_x, dtype=DTYPE) * (TWO_PI / n_x)
    t = torch.linspace(0, 1, n_t, dtype=DTYPE)
    xx, tt = torch.meshgrid(x, t, indexing="ij")
    return torch.stack([xx.reshape(-1), tt.reshape(-1)], dim=1)


def _problem(name, coefficient, pde, initial, exact, sizes, seed) -> PINNProblem:
    n_res, n_ic, n_bc = sizes
    gen = torch.Generator().manual_seed(seed)
    interior = torch.rand(n_res, 2, generator=gen, dtype=DTYPE) * torch.tensor([TWO_PI, 1.0])
    initial_x = torch.arange(n_ic, dtype=DTYPE) * (TWO_PI / n_ic)
    boundary_t = torch.linspace(0, 1, n_bc, dtype=DTYPE)
    test = _grid(256, 100)
    return PINNProblem(
        name, coefficient, pde, initial, exact, interior, initial_x, boundary_t, test
    )


def convection(beta: float, sizes=(2000, 256, 100), seed: int = 0) -> PINNProblem:
    """Convection ``u_t + beta u_x = 0``, ``u(x, 0) = sin x``; ``sizes`` =
    (interior points drawn uniformly with ``seed``, initial points, boundary points)."""

    def exact(x, t):
        return torch.sin(x - beta * t)

    return _problem("convection", beta, convection_residual, torch.sin, exact, sizes, seed)


def reaction(rho: float, sizes=(2000, 256, 100), seed: int = 0) -> PINNProblem:
    """Reaction ``u_t - rho u (1 - u) = 0``, ``u(x, 0) = h(x)`` (:func:`gaussian_bump`)."""

    def exact(x, t):
        h, growth = gaussian_bump(x), torch.exp(rho * t)
        return h * growth / (h * growth + 1 - h)

    return _problem("reaction", rho, reaction_residual, gaussian_bump, exact, sizes, seed)


def fresh_collocation(problem: PINNProblem, n_res: int = 5000, seed: int = 1) -> PINNProblem:
    """The same problem on an independent set of collocation points: ``n_res`` interior
    points drawn with data ``seed`` (``!= 0``, the training points' seed), initial points at
    the midpoints of the training ``x`` grid, boundary points at the midpoints of the
    training ``t`` grid. A loss here far above the training loss marks a network that only
    interpolates the training points (a false solution)."""
    gen = torch.Generator().manual_seed(seed)
    interior = torch.rand(n_res, 2, generator=gen, dtype=DTYPE) * torch.tensor([TWO_PI, 1.0])
    step = TWO_PI / problem.initial_x.shape[0]
    t = problem.boundary_t
    return dataclasses.replace(
        problem,
        interior=interior,
        initial_x=problem.initial_x + step / 2,
        boundary_t=(t[1:] + t[:-1]) / 2,
    )


def make_model(width: int, depth: int, seed: int) -> tuple[TanhMLP, Params]:
    """The network (PyTorch's default ``nn.Linear`` initialization under ``seed``) and a
    dict of detached copies of its parameters."""
    torch.manual_seed(seed)
    model = TanhMLP(width, depth)
    return model, {name: p.detach().clone() for name, p in model.named_parameters()}


def residual_fn(problem: PINNProblem, model: TanhMLP) -> Callable[[Params], torch.Tensor]:
    """``params -> r``: the PDE, initial and boundary residuals, each block scaled by
    ``1 / sqrt(its size)``, concatenated (so that ``0.5 ||r||^2`` is the paper's loss)."""
    n_ic, n_bc = problem.initial_x.shape[0], problem.boundary_t.shape[0]
    zeros_ic, zeros_bc = torch.zeros(n_ic, dtype=DTYPE), torch.zeros(n_bc, dtype=DTYPE)
    edge_points = torch.cat(
        [
            torch.stack([problem.initial_x, zeros_ic], dim=1),
            torch.stack([zeros_bc, problem.boundary_t], dim=1),
            torch.stack([zeros_bc + TWO_PI, problem.boundary_t], dim=1),
        ]
    )
    initial_values = problem.initial(problem.initial_x)
    scales = [1 / math.sqrt(n) for n in (problem.interior.shape[0], n_ic, n_bc)]

    def residuals(params: Params) -> torch.Tensor:
        u, u_x, u_t = functional_call(model, params, (problem.interior,), {"derivatives": True})
        pde = problem.pde(u, u_x, u_t, problem.coefficient)
        edge = functional_call(model, params, (edge_points,))
        ic = edge[:n_ic] - initial_values
        bc = edge[n_ic : n_ic + n_bc] - edge[n_ic + n_bc :]
        return torch.cat([pde * scales[0], ic * scales[1], bc * scales[2]])

    return residuals


def value_fn(problem: PINNProblem, model: TanhMLP) -> Callable[[Params], torch.Tensor]:
    """``params -> 0.5 ||r(params)||^2`` (:func:`residual_fn`), the PINN loss."""
    residuals = residual_fn(problem, model)

    def loss(params: Params) -> torch.Tensor:
        r = residuals(params)
        return 0.5 * torch.dot(r, r)

    return loss


def relative_error(problem: PINNProblem, values: torch.Tensor) -> float:
    """``||u - u*|| / ||u*||`` for ``values`` ``u`` on the test grid (256 x 100 points)."""
    exact = problem.exact(problem.test_points[:, 0], problem.test_points[:, 1])
    return float(torch.linalg.vector_norm(values - exact) / torch.linalg.vector_norm(exact))


def l2_relative_error(problem: PINNProblem, model: TanhMLP, params: Params) -> float:
    """The L2RE (:func:`relative_error`) of the network at ``params``."""
    with torch.no_grad():
        return relative_error(problem, functional_call(model, params, (problem.test_points,)))


def input_derivatives(
    fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, u_x, u_t)`` of any ``fn(points) -> (N,)`` by reverse-mode autograd (the check
    of the network's forward-mode derivatives and of the exact solutions)."""
    points = points.detach().requires_grad_(True)
    u = fn(points)
    (grad,) = torch.autograd.grad(u.sum(), points)
    return u.detach(), grad[:, 0], grad[:, 1]
