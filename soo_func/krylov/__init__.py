"""Krylov solvers on pytrees: CG, conjugate residual, MINRES and Steihaug-CG.

Every solver takes ``matvec`` (a pytree -> pytree linear operator ``A``, assumed
symmetric) and returns a :class:`KrylovResult`. Convergence is
``||r|| <= max(rtol * ||b||, atol)`` with ``r = b - A x``.

Host synchronisation
--------------------
The iteration is written without data-dependent Python control flow: every
iteration computes a candidate state and keeps the old one where the solver has
already stopped (``torch.where`` on a 0-d ``done`` flag), so a stopped solver is
*frozen*, never corrupted by the 0/0 of a converged recurrence. Whether to leave the
loop early is the only host decision, taken every ``check_every`` iterations
(``bool(done)``, one device sync each time):

* ``check_every=1`` (the default of the functions here): one sync per iteration,
  as scipy does; no wasted operator applications.
* ``check_every=None``: never sync; the loop always runs ``max_iters`` iterations
  and frozen iterations still pay one operator application and a few ``where``
  ops each. This is what a direction's ``update`` uses to stay sync-free (bound
  ``max_iters`` there).
* ``check_every=k``: one sync per ``k`` iterations, at most ``k - 1`` frozen ones.

``rtol`` may be a 0-d tensor (a forcing term computed on the device); it is then not
validated, to avoid a sync.

``num_iters`` counts the iterations that changed the state; ``num_matvecs`` counts
every operator application made, frozen ones included (it is the cost paid).
Negative curvature (a direction ``p`` with ``<p, A p> <= 0``, or for MINRES a
Lanczos vector with ``<v, A v> <= 0``) is always reported in the result; CG and CR
stop there (without taking the step) only when ``stop_on_negative_curvature=True``.

References: Hestenes & Stiefel (1952) / Nocedal & Wright (2006) Alg. 5.2 (CG);
Saad (2003) Alg. 6.20 (conjugate residual); Paige & Saunders (1975) (MINRES);
Steihaug (1983) / Nocedal & Wright Alg. 7.2 (CG-Steihaug).
"""

from soo_func.krylov._common import KrylovResult
from soo_func.krylov.cg import cg, cr
from soo_func.krylov.minres import minres
from soo_func.krylov.steihaug import steihaug

__all__ = ["KrylovResult", "cg", "cr", "minres", "steihaug"]
