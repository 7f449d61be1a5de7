"""The curve of :func:`~soo_func.continuation_arclength.arclength_homotopy`: the
homotopy map ``H`` of the built-in families, its Jacobian products, the minimum-norm
solves of the predictor and corrector (dense or MINRES), and the Hessian test at
``t = 1`` crossings (Lanczos)."""

from __future__ import annotations

import math
from typing import Any

import torch

from soo_func import tree
from soo_func.krylov import minres
from soo_func.oracles import hvp, value_and_grad

PyTree = Any


class Curve:
    """``H``, its Jacobian products and the minimum-norm solves at one anchor."""

    def __init__(self, family: str, base, state: Any, krylov_rtol, krylov_iters):
        self.family, self.base, self.state = family, base, state
        self.s, self.c = state.scale, state.t_unit
        self.rtol, self.iters = krylov_rtol, krylov_iters
        self.dense = False

    def residual(self, x, t):
        """``(f(x), grad f(x), H(x, t))``."""
        value, grad = value_and_grad(self.base)(x)
        st = self.state
        if self.family == "keller":
            return value, grad, tree.axpy(-(1 - t), st.anchor_grad, grad)
        diff = tree.sub(x, st.anchor)
        return value, grad, tree.add(tree.scale(t, grad), tree.scale((1 - t) * self.s, diff))

    def jacobian(self, x, t, grad):
        """``(v -> H_x v, H_w)`` at ``(x, t)``, ``w = c t`` (``H_x`` is symmetric)."""
        st = self.state
        if self.family == "keller":
            return (lambda v: hvp(self.base, x, v)), tree.scale(1 / self.c, st.anchor_grad)
        h_w = tree.scale(1 / self.c, tree.axpy(-self.s, tree.sub(x, st.anchor), grad))
        return (
            lambda v: tree.add(tree.scale(t, hvp(self.base, x, v)), tree.scale((1 - t) * self.s, v))
        ), h_w

    def min_norm(self, x, t, grad, a_x, a_w, b, normal=None):
        """``u = a - K^T (K K^T)^{-1} (K a - b)``, ``K = J`` or, with a unit ``normal``
        ``n``, ``K = J (I - n n^T)`` (then ``u`` is orthogonal to ``n``: the
        pseudo-arclength corrector's hyperplane). Dense (from ``n`` Hessian products) or
        MINRES on the saddle-point system ``[[s I, K^T], [K, 0]]``."""
        h_x, h_w = self.jacobian(x, t, grad)
        if self.dense:
            return self._dense_min_norm(x, h_x, h_w, a_x, a_w, b, normal)
        s = self.s

        def project(u_x, u_w):
            if normal is None:
                return u_x, u_w
            dot = tree.vdot(normal[0], u_x) + normal[1] * u_w
            return tree.axpy(-dot, normal[0], u_x), u_w - dot * normal[1]

        def matvec(v):
            u_x, u_w, y = v
            hy_x, hy_w = project(h_x(y), tree.vdot(h_w, y))
            p_x, p_w = project(u_x, u_w)
            top = tree.axpy(s, u_x, hy_x)
            return top, s * u_w + hy_w, tree.add(h_x(p_x), tree.scale(p_w, h_w))

        rhs = (tree.scale(s, a_x), s * a_w, b)
        n = sum(leaf.numel() for leaf in tree.leaves(x))
        iters = self.iters if self.iters is not None else max(4 * (2 * n + 1), 30)
        u_x, u_w, _ = minres(matvec, rhs, max_iters=iters, rtol=self.rtol).x
        return u_x, u_w

    def solve_x(self, x, t, grad, rhs):
        """``H_x^+ rhs`` at fixed ``t`` (dense pseudo-inverse or MINRES)."""
        h_x, _ = self.jacobian(x, t, grad)
        if not self.dense:
            return minres(h_x, rhs, rtol=self.rtol).x
        hess, raveled = dense_matrix(h_x, x)
        flat = tree.ravel(rhs).flat
        if not bool(torch.isfinite(hess).all() & torch.isfinite(flat).all()):
            return tree.map(lambda r: torch.full_like(r, math.nan), rhs)
        return tree.unravel(torch.linalg.pinv(hess) @ flat, raveled)

    def _dense_min_norm(self, x, h_x, h_w, a_x, a_w, b, normal):
        hess, raveled = dense_matrix(h_x, x)
        jac = torch.cat([hess, tree.ravel(h_w).flat[:, None]], 1)
        a = torch.cat([tree.ravel(a_x).flat, a_w.reshape(1)])
        rhs = tree.ravel(b).flat - jac @ a
        if normal is not None:  # [J; n^T] d = [b - J a; -n^T a]
            n_vec = torch.cat([tree.ravel(normal[0]).flat, normal[1].reshape(1)])
            jac, rhs = torch.cat([jac, n_vec[None]]), torch.cat([rhs, -(n_vec @ a).reshape(1)])
        if not bool(torch.isfinite(jac).all() & torch.isfinite(rhs).all()):
            u = torch.full_like(a, math.nan)
        else:
            u = a + torch.linalg.pinv(jac) @ rhs
        return tree.unravel(u[:-1], raveled), u[-1]

    def tangent(self, x, t, grad, prev_x, prev_w):
        """The unit null vector of ``J`` nearest ``prev`` (its orientation)."""
        zero = tree.zeros_like(x)
        u_x, u_w = self.min_norm(x, t, grad, prev_x, prev_w, zero)
        size = torch.sqrt(tree.sum_of_squares(u_x) + u_w**2)
        return tree.scale(1 / size, u_x), u_w / size


def dense_matrix(matvec, x) -> tuple[torch.Tensor, tree.Raveled]:
    """The matrix of ``matvec`` in the raveled coordinates of ``x`` (``n`` products)."""
    raveled = tree.ravel(x)
    eye = torch.eye(raveled.flat.numel(), dtype=raveled.flat.dtype, device=raveled.flat.device)
    columns = [tree.ravel(matvec(tree.unravel(e, raveled))).flat for e in eye]
    return torch.stack(columns, 1), raveled


def ritz_extremes(matvec, start: PyTree, steps: int) -> tuple[float, float]:
    """Smallest and largest Ritz values of ``steps`` Lanczos steps (full
    reorthogonalization), the Hessian test at a ``t = 1`` crossing (Golub & Van Loan 10.1)."""
    basis, alphas, betas = [], [], []
    v = tree.scale(1 / tree.norm(start), start)
    for k in range(steps):
        basis.append(v)
        w = matvec(v)
        alphas.append(tree.vdot(v, w))
        for q in basis:  # full reorthogonalization (Gram-Schmidt twice)
            w = tree.axpy(-tree.vdot(q, w), q, w)
        for q in basis:
            w = tree.axpy(-tree.vdot(q, w), q, w)
        beta = tree.norm(w)
        if k + 1 == steps or float(beta) <= 1e-12 * max(abs(float(a)) for a in alphas):
            break
        betas.append(beta)
        v = tree.scale(1 / beta, w)
    t_mat = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        t_mat = t_mat + torch.diag(off, 1) + torch.diag(off, -1)
    eig = torch.linalg.eigvalsh(t_mat.double())
    return float(eig[0]), float(eig[-1])


def family_value(family, base, state: Any, x, t, known=None):
    """``f_t(x)``, and its gradient from ``known = (f(x), grad f(x))`` when given."""
    f, g = (base(x), None) if known is None else known
    if family == "keller":
        value = f - (1 - t) * tree.vdot(state.anchor_grad, x)
        return value, None if g is None else tree.axpy(-(1 - t), state.anchor_grad, g)
    diff = tree.sub(x, state.anchor)
    value = t * f + (1 - t) * 0.5 * state.scale * tree.sum_of_squares(diff)
    return value, None if g is None else tree.add(
        tree.scale(t, g), tree.scale((1 - t) * state.scale, diff)
    )
