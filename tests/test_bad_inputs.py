"""Bad inputs at every public entry point get an error naming the problem and the fix
(issue 16): a wrongly structured gradient, a foreign state, a missing ``init``, NaN or
out-of-range hyper-parameters, a non-scalar loss and missing extras.

Each case asserts the error's type and, with ``match=``, that the message names the
transform (or entry point), the argument and what to do.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import soo_func as sf
from soo_func.searches.levenberg import LevenbergState
from soo_func.searches.trust_region import TrustRegionState

D = torch.float64


def make_params():
    return {"a": torch.tensor([1.0, -2.0], dtype=D), "b": torch.tensor([0.5, 1.5, -1.0], dtype=D)}


def quadratic(p):
    return 0.5 * (p["a"] ** 2).sum() + (p["b"] ** 2).sum()


def residuals(p):
    return torch.cat([p["a"], 2 * p["b"]])


# (who the errors name, factory): every public transform.
TRANSFORMS = [
    ("lbfgs", lambda: sf.lbfgs()),
    ("bfgs", lambda: sf.bfgs()),
    ("bfgs(memory_size=3)", lambda: sf.bfgs(memory_size=3)),
    ("dfp", lambda: sf.dfp()),
    ("dfp(memory_size=3)", lambda: sf.dfp(memory_size=3)),
    ("sr1", lambda: sf.sr1()),
    ("sr1(memory_size=3)", lambda: sf.sr1(memory_size=3)),
    ("broyden", lambda: sf.broyden()),
    ("broyden(memory_size=3)", lambda: sf.broyden(memory_size=3)),
    ("ssbfgs", lambda: sf.ssbfgs()),
    ("ssbroyden", lambda: sf.ssbroyden()),
    ("ssbfgs(memory_size=3)", lambda: sf.ssbfgs(memory_size=3)),
    ("newton_krylov", lambda: sf.newton_krylov()),
    ("gauss_newton", lambda: sf.gauss_newton()),
    ("nonlinear_cg", lambda: sf.nonlinear_cg()),
    ("sgd", lambda: sf.sgd(0.1, momentum=0.9)),
    ("scale", lambda: sf.scale(-0.5)),
    ("stateless", lambda: sf.stateless(lambda u, p: u)),
    ("scale_by_schedule", lambda: sf.scale_by_schedule(sf.cosine_decay_schedule(1.0, 10))),
    ("armijo", lambda: sf.armijo()),
    ("armijo_sync_free", lambda: sf.armijo_sync_free()),
    ("wolfe", lambda: sf.wolfe()),
    ("trust_region", lambda: sf.trust_region()),
    ("levenberg", lambda: sf.levenberg()),
    ("levenberg_marquardt", lambda: sf.levenberg_marquardt()),
    ("hessian_free", lambda: sf.hessian_free()),
    ("multi_batch_lbfgs", lambda: sf.multi_batch_lbfgs()),
    ("homotopy", lambda: sf.homotopy("convex")),
    ("arclength_homotopy", lambda: sf.homotopy()),
]
IDS = [who for who, _ in TRANSFORMS]


def extras(params):
    value, grad = sf.value_and_grad(quadratic)(params)
    return dict(
        value=value,
        grad=grad,
        value_fn=quadratic,
        residual_fn=residuals,
        overlap_value_fn=quadratic,
        curvature=lambda v: v,
    )


def foreign_state(who, params):
    """A state some other transform made (a Levenberg one; a trust region's for Levenberg)."""
    if who.startswith("levenberg"):
        return sf.trust_region().init(params)
    return sf.levenberg().init(params)


# --- item 4: the updates are checked against the params --------------------------------


@pytest.mark.parametrize("who, make", TRANSFORMS, ids=IDS)
def test_update_refuses_updates_of_another_structure(who, make):
    params = make_params()
    t = make()
    grad = extras(params)["grad"]
    swapped = (grad["b"], grad["a"])  # issue 16's reproducer: b's gradient in a's slot
    with pytest.raises(ValueError, match=rf"^{re.escape(who)}: updates .*structures differ"):
        t.update(swapped, t.init(params), params, **extras(params))


@pytest.mark.parametrize("who, make", TRANSFORMS, ids=IDS)
def test_update_refuses_updates_of_another_shape(who, make):
    params = make_params()
    t = make()
    wrong = {"a": torch.zeros(3, dtype=D), "b": torch.zeros(2, dtype=D)}
    with pytest.raises(ValueError, match=rf"^{re.escape(who)}: updates leaf has shape"):
        t.update(wrong, t.init(params), params, **extras(params))


@pytest.mark.parametrize("who, make", TRANSFORMS, ids=IDS)
def test_update_refuses_updates_of_another_dtype(who, make):
    params = make_params()
    t = make()
    wrong = {k: v.float() for k, v in extras(params)["grad"].items()}
    with pytest.raises(TypeError, match=rf"^{re.escape(who)}: updates leaf has dtype.*params"):
        t.update(wrong, t.init(params), params, **extras(params))


@pytest.mark.parametrize("make", [sf.lbfgs, sf.bfgs, sf.dfp, sf.sr1])
def test_quasi_newton_no_longer_relabels_a_swapped_gradient(make):
    """Issue 16, item 4: the direction of ``a`` was computed from ``b``'s gradient."""
    params = {"a": torch.tensor([1.0, 2.0], dtype=D), "b": torch.tensor([3.0, 4.0], dtype=D)}
    t = make()
    with pytest.raises(ValueError, match="structures differ"):
        t.update((params["b"], params["a"]), t.init(params), params)


@pytest.mark.parametrize(
    "who, make",
    [("sgd", lambda: sf.sgd(0.1)), ("nonlinear_cg", lambda: sf.nonlinear_cg())],
)
def test_update_without_params_checks_the_states_params(who, make):
    params = make_params()
    t = make()
    with pytest.raises(ValueError, match=rf"{who}: updates .*params held by the state"):
        t.update({"a": params["a"]}, t.init(params))


# --- item 8: states are checked at the door --------------------------------------------


@pytest.mark.parametrize("who, make", TRANSFORMS, ids=IDS)
def test_update_refuses_a_foreign_state(who, make):
    params = make_params()
    t = make()
    state = foreign_state(who, params)
    kind = type(state).__name__
    pattern = rf"^{re.escape(who)} got a state of type {kind}.*{re.escape(who)}\.init\(params\)"
    with pytest.raises(TypeError, match=pattern):
        t.update(extras(params)["grad"], state, params, **extras(params))


@pytest.mark.parametrize("who, make", TRANSFORMS, ids=IDS)
def test_update_before_init_says_so(who, make):
    params = make_params()
    t = make()
    pattern = rf"^{re.escape(who)}\.update got state=None: call init first.*\.init\(params\)"
    with pytest.raises(TypeError, match=pattern):
        t.update(extras(params)["grad"], None, params, **extras(params))


PUBLISHERS = [w for w in TRANSFORMS if w[0] not in ("stateless", "scale", "sgd", "scale_by_schedule",
                                                     "multi_batch_lbfgs")]  # fmt: skip


@pytest.mark.parametrize("who, make", PUBLISHERS, ids=[w for w, _ in PUBLISHERS])
def test_publish_refuses_a_foreign_state(who, make):
    t = make()
    params = make_params()
    with pytest.raises(TypeError, match=rf"^{re.escape(who)} got a state of type"):
        sf.publish(t, foreign_state(who, params), params, **extras(params))


def test_levenberg_state_in_the_trust_region_slot_is_refused():
    """Issue 16's reproducer: the radius of -1 that stayed negative."""
    params = make_params()
    opt = sf.chain(sf.lbfgs(), sf.trust_region())
    state = sf.ChainState((sf.lbfgs().init(params), sf.levenberg().init(params)))
    with pytest.raises(TypeError, match=r"trust_region got a state of type LevenbergState"):
        opt.update(extras(params)["grad"], state, params, value_fn=quadratic)
    assert isinstance(opt.init(params).states[1], TrustRegionState)
    assert not isinstance(opt.init(params).states[1], LevenbergState)


@pytest.mark.parametrize(
    "state, error, pattern",
    [
        (None, TypeError, r"chain\.update got state=None: call init first"),
        ((), TypeError, r"chain got a state of type tuple.*ChainState"),
        (sf.ChainState((sf.EmptyState(),)), ValueError, r"2 transforms.*1 members"),
    ],
    ids=["none", "tuple", "wrong_size"],
)
def test_chain_refuses_bad_states(state, error, pattern):
    params = make_params()
    opt = sf.chain(sf.lbfgs(), sf.wolfe())
    with pytest.raises(error, match=pattern):
        opt.update(extras(params)["grad"], state, params, **extras(params))


def test_reset_at_stage_change_refuses_a_foreign_state():
    params = make_params()
    t = sf.reset_at_stage_change(sf.lbfgs())
    restart = torch.tensor(True)
    with pytest.raises(TypeError, match=r"got a state of type LevenbergState"):
        t.update(params, sf.levenberg().init(params), params, continuation_restart=restart)


# --- update without params, for the transforms that need them ---------------------------

NEED_PARAMS = [w for w in TRANSFORMS if w[0] not in ("sgd", "scale", "stateless", "nonlinear_cg",
                                                      "scale_by_schedule", "levenberg",
                                                      "levenberg_marquardt")]  # fmt: skip


@pytest.mark.parametrize("who, make", NEED_PARAMS, ids=[w for w, _ in NEED_PARAMS])
def test_update_without_params_names_the_missing_argument(who, make):
    params = make_params()
    t = make()
    with pytest.raises(TypeError, match=rf"{re.escape(who)}.*(needs|need).*params"):
        t.update(extras(params)["grad"], t.init(params), **extras(params))


# --- item 7: hyper-parameters -----------------------------------------------------------

NAN, INF = math.nan, math.inf

HYPER = [
    # issue 16's four stalls
    ("newton_krylov", sf.newton_krylov, {"damping": NAN}, "damping"),
    ("trust_region", sf.trust_region, {"max_iters": 0}, "max_iters"),
    ("levenberg", sf.levenberg, {"tau": NAN}, "tau"),
    ("levenberg_marquardt", sf.levenberg_marquardt,
     {"initial_damping": NAN, "damping_rule": "nielsen"}, "initial_damping"),
    # directions
    ("newton_krylov", sf.newton_krylov, {"damping": INF}, "damping"),
    ("newton_krylov", sf.newton_krylov, {"damping": -1.0}, "damping"),
    ("newton_krylov", sf.newton_krylov, {"forcing": NAN}, "forcing"),
    ("newton_krylov", sf.newton_krylov, {"eta_initial": NAN}, "eta_initial"),
    ("newton_krylov", sf.newton_krylov, {"eta_max": 1.0}, "eta_max"),
    ("newton_krylov", sf.newton_krylov, {"max_iters": 0}, "max_iters"),
    ("newton_krylov", sf.newton_krylov, {"check_every": 0}, "check_every"),
    ("newton_krylov", sf.newton_krylov, {"solver": "lu"}, "solver"),
    ("newton_krylov", sf.newton_krylov, {"hvp_mode": "fd"}, "hvp_mode"),
    ("gauss_newton", sf.gauss_newton, {"damping": NAN}, "damping"),
    ("gauss_newton", sf.gauss_newton, {"rtol": NAN}, "rtol"),
    ("gauss_newton", sf.gauss_newton, {"max_iters": 0}, "max_iters"),
    ("gauss_newton", sf.gauss_newton, {"check_every": 0}, "check_every"),
    ("lbfgs", sf.lbfgs, {"memory_size": 0}, "memory_size"),
    ("lbfgs", sf.lbfgs, {"curvature_eps": NAN}, "curvature_eps"),
    ("lbfgs", sf.lbfgs, {"curvature_eps": INF}, "curvature_eps"),
    ("lbfgs", sf.lbfgs, {"initial_scaling": NAN}, "initial_scaling"),
    ("lbfgs", sf.lbfgs, {"initial_scaling": INF}, "initial_scaling"),
    ("lbfgs", sf.lbfgs, {"first_step_norm": 3}, "first_step_norm"),
    ("bfgs", sf.bfgs, {"initial_scaling": 0.0}, "initial_scaling"),
    ("bfgs", sf.bfgs, {"curvature_eps": -1.0}, "curvature_eps"),
    ("bfgs", sf.bfgs, {"form": "lu"}, "form"),
    ("bfgs(memory_size=0)", sf.bfgs, {"memory_size": 0}, "memory_size"),
    ("ssbfgs(memory_size=0)", sf.ssbfgs, {"memory_size": 0}, "memory_size"),
    ("ssbroyden", sf.ssbroyden, {"memory_size": 5}, "memory_size"),
    ("dfp", sf.dfp, {"curvature_eps": NAN}, "curvature_eps"),
    ("sr1", sf.sr1, {"sr1_rtol": NAN}, "sr1_rtol"),
    ("sr1", sf.sr1, {"sr1_rtol": 1.0}, "sr1_rtol"),
    ("broyden", sf.broyden, {"initial_scaling": -1.0}, "initial_scaling"),
    ("nonlinear_cg", sf.nonlinear_cg, {"beta": "magic"}, "beta"),
    ("nonlinear_cg", sf.nonlinear_cg, {"restart_every": 0}, "restart_every"),
    ("nonlinear_cg", sf.nonlinear_cg, {"restart_threshold": NAN}, "restart_threshold"),
    ("nonlinear_cg", sf.nonlinear_cg, {"max_step_hint": NAN}, "max_step_hint"),
    ("nonlinear_cg", sf.nonlinear_cg, {"max_step_hint": 0.0}, "max_step_hint"),
    # first order and schedules
    ("sgd", sf.sgd, {"learning_rate": NAN}, "learning_rate"),
    ("sgd", sf.sgd, {"learning_rate": INF}, "learning_rate"),
    ("sgd", sf.sgd, {"learning_rate": 0.0}, "learning_rate"),
    ("sgd", lambda **k: sf.sgd(0.1, **k), {"momentum": NAN}, "momentum"),
    ("sgd", lambda **k: sf.sgd(0.1, **k), {"momentum": 1.0}, "momentum"),
    ("scale", sf.scale, {"step": NAN}, "step"),
    ("scale", sf.scale, {"step": -INF}, "step"),
    ("cosine_decay_schedule", lambda **k: sf.cosine_decay_schedule(**{"decay_steps": 5, **k}),
     {"init_value": NAN}, "init_value"),
    ("cosine_decay_schedule", lambda **k: sf.cosine_decay_schedule(1.0, **k),
     {"decay_steps": 0}, "decay_steps"),
    ("cosine_decay_schedule", lambda **k: sf.cosine_decay_schedule(1.0, 5, **k),
     {"final_fraction": NAN}, "final_fraction"),
    # line searches
    ("armijo", sf.armijo, {"slope_rtol": NAN}, "slope_rtol"),
    ("armijo", sf.armijo, {"c1": INF}, "slope_rtol"),
    ("armijo", sf.armijo, {"min_shrink": NAN}, "min_shrink"),
    ("armijo", sf.armijo, {"max_shrink": 1.0}, "max_shrink"),
    ("armijo", sf.armijo, {"max_steps": 0}, "max_steps"),
    ("armijo", sf.armijo, {"initial_step": NAN}, "initial_step"),
    ("armijo_sync_free", sf.armijo_sync_free, {"max_shrink": NAN}, "max_shrink"),
    ("armijo_sync_free", sf.armijo_sync_free, {"max_steps": 0}, "max_steps"),
    ("wolfe", sf.wolfe, {"c1": NAN}, "slope_rtol"),
    ("wolfe", sf.wolfe, {"c2": NAN}, "curvature_rtol"),
    ("wolfe", sf.wolfe, {"c2": 1.0}, "curvature_rtol"),
    ("wolfe", sf.wolfe, {"max_steps": 0}, "max_steps"),
    ("wolfe", sf.wolfe, {"initial_step": INF}, "initial_step"),
    # trust region
    ("trust_region", sf.trust_region, {"max_iters": -3}, "max_iters"),
    ("trust_region", sf.trust_region, {"initial_radius": NAN}, "initial_radius"),
    ("trust_region", sf.trust_region, {"max_radius": NAN}, "max_radius"),
    ("trust_region", sf.trust_region, {"min_radius": NAN}, "min_radius"),
    ("trust_region", sf.trust_region, {"accept_ratio": NAN}, "accept_ratio"),
    ("trust_region", sf.trust_region, {"shrink_below": NAN}, "shrink_below"),
    ("trust_region", sf.trust_region, {"grow_above": NAN}, "grow_above"),
    ("trust_region", sf.trust_region, {"shrink_factor": NAN}, "shrink_factor"),
    ("trust_region", sf.trust_region, {"grow_factor": NAN}, "grow_factor"),
    ("trust_region", sf.trust_region, {"grow_factor": INF}, "grow_factor"),
    ("trust_region", sf.trust_region, {"rtol": NAN}, "rtol"),
    ("trust_region", sf.trust_region, {"solver": "exact"}, "solver"),
    # Levenberg(-Marquardt)
    ("levenberg", sf.levenberg, {"tau": INF}, "tau"),
    ("levenberg", sf.levenberg, {"initial_damping": NAN}, "initial_damping"),
    ("levenberg", sf.levenberg, {"accept_ratio": NAN}, "accept_ratio"),
    ("levenberg", sf.levenberg, {"increase_factor": NAN}, "increase_factor"),
    ("levenberg", sf.levenberg, {"decrease_factor": INF}, "decrease_factor"),
    ("levenberg", sf.levenberg, {"min_damping": NAN}, "min_damping"),
    ("levenberg", sf.levenberg, {"max_damping": NAN}, "max_damping"),
    ("levenberg", sf.levenberg, {"cg_rtol": NAN}, "cg_rtol"),
    ("levenberg", sf.levenberg, {"step_rtol": NAN}, "step_rtol"),
    ("levenberg", sf.levenberg, {"dense_max_params": 0}, "dense_max_params"),
    ("levenberg", sf.levenberg, {"damping_rule": "fast"}, "damping_rule"),
    ("levenberg_marquardt", sf.levenberg_marquardt, {"tau": NAN}, "tau"),
    ("levenberg_marquardt", sf.levenberg_marquardt, {"solver": "qr"}, "solver"),
    # stochastic
    ("hessian_free", sf.hessian_free, {"damping": NAN}, "damping"),
    ("hessian_free", sf.hessian_free, {"damping": INF}, "damping"),
    ("hessian_free", sf.hessian_free, {"progress_tol": NAN}, "progress_tol"),
    ("hessian_free", sf.hessian_free, {"min_damping": NAN}, "min_damping"),
    ("hessian_free", sf.hessian_free, {"max_cg_iters": 0}, "max_cg_iters"),
    ("hessian_free", sf.hessian_free, {"warm_start_decay": NAN}, "warm_start_decay"),
    ("hessian_free", sf.hessian_free, {"backtrack_gamma": NAN}, "backtrack_gamma"),
    ("hessian_free", sf.hessian_free, {"backtrack_gamma": INF}, "backtrack_gamma"),
    ("hessian_free", sf.hessian_free, {"damping_increase": NAN}, "damping_increase"),
    ("hessian_free", sf.hessian_free, {"damping_decrease": NAN}, "damping_decrease"),
    ("multi_batch_lbfgs", sf.multi_batch_lbfgs, {"learning_rate": NAN}, "learning_rate"),
    ("multi_batch_lbfgs", sf.multi_batch_lbfgs, {"curvature_eps": NAN}, "curvature_eps"),
    ("multi_batch_lbfgs", sf.multi_batch_lbfgs, {"memory_size": 0}, "memory_size"),
    # continuation
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"stage_step": NAN}, "stage_step"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"min_step": NAN}, "min_step"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"grow": NAN}, "grow"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"shrink": NAN}, "shrink"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"corrector_rtol": NAN},
     "corrector_rtol"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"corrector_atol": NAN},
     "corrector_atol"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"corrector_rtol": NAN,
     "corrector_atol": 1e-6}, "corrector_rtol"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"final_gap": NAN}, "final_gap"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"anchor_curvature": NAN}, "anchor_curvature"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"tangent_rtol": NAN}, "tangent_rtol"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"tangent_max_iters": 0},
     "tangent_max_iters"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"fast_steps": 0}, "fast_steps"),
    ("homotopy", lambda **k: sf.homotopy("convex", **k), {"schedule": [0.5, NAN]}, "schedule"),
    ("arclength_homotopy", sf.arclength_homotopy, {"initial_arclength": NAN},
     "initial_arclength"),
    ("arclength_homotopy", sf.arclength_homotopy, {"max_step": NAN}, "max_step"),
    ("arclength_homotopy", sf.arclength_homotopy, {"min_step": NAN}, "min_step"),
    ("arclength_homotopy", sf.arclength_homotopy, {"corrector_tol": NAN}, "corrector_tol"),
    ("arclength_homotopy", sf.arclength_homotopy, {"krylov_rtol": INF}, "krylov_rtol"),
    ("arclength_homotopy", sf.arclength_homotopy, {"descent_gtol": NAN}, "descent_gtol"),
    ("arclength_homotopy", sf.arclength_homotopy, {"max_path_steps": 0}, "max_path_steps"),
    ("arclength_homotopy", sf.arclength_homotopy, {"krylov_max_iters": 0}, "krylov_max_iters"),
]  # fmt: skip


@pytest.mark.parametrize(
    "who, make, kwargs, name",
    HYPER,
    ids=[f"{who}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for who, _, kw, _ in HYPER],
)
def test_bad_hyper_parameter_is_refused_at_construction(who, make, kwargs, name):
    """A ``ValueError`` naming the transform, the argument, the value and what is allowed."""
    with pytest.raises(ValueError, match=rf"^{re.escape(who)}: .*{re.escape(name)}") as error:
        make(**kwargs)
    message = str(error.value)
    assert "must" in message or "need" in message, message
    value = kwargs.get(name, next(iter(kwargs.values())))
    if isinstance(value, float):
        assert repr(value) in message or str(value) in message, message


def test_hyper_parameter_that_is_not_a_number_is_a_type_error():
    with pytest.raises(TypeError, match=r"newton_krylov: damping must be a number, got str"):
        sf.newton_krylov(damping="0.1")
    with pytest.raises(TypeError, match=r"sgd: learning_rate must be a number, got bool"):
        sf.sgd(True)
    with pytest.raises(TypeError, match=r"scale_by_schedule: schedule must be a callable"):
        sf.scale_by_schedule(0.1)


def test_a_tensor_hyper_parameter_is_still_a_number():
    assert sf.sgd(torch.tensor(0.1)) is not None
    with pytest.raises(ValueError, match=r"sgd: learning_rate must be > 0"):
        sf.sgd(torch.tensor(math.nan))


# --- missing extras ---------------------------------------------------------------------

MISSING = [
    ("newton_krylov", sf.newton_krylov, "value_fn"),
    ("gauss_newton", sf.gauss_newton, "residual_fn"),
    ("armijo", sf.armijo, "value_fn"),
    ("armijo_sync_free", sf.armijo_sync_free, "value"),
    ("wolfe", sf.wolfe, "value"),
    ("trust_region", sf.trust_region, "curvature"),
    ("levenberg_marquardt", sf.levenberg_marquardt, "residual_fn"),
    ("hessian_free", sf.hessian_free, "value_fn"),
    ("multi_batch_lbfgs", sf.multi_batch_lbfgs, "overlap_value_fn"),
    ("homotopy", lambda: sf.homotopy("convex"), "value_fn"),
    ("arclength_homotopy", sf.arclength_homotopy, "value_fn"),
]


@pytest.mark.parametrize("who, make, missing", MISSING, ids=[m[0] for m in MISSING])
def test_missing_extra_is_named(who, make, missing):
    params = make_params()
    t = make()
    given = {k: v for k, v in extras(params).items() if k != missing}
    with pytest.raises(TypeError, match=rf"^{re.escape(who)}.*{missing}"):
        t.update(given["grad"], t.init(params), params, **given)


# --- the other entry points -------------------------------------------------------------


def vector_loss(p, *args):
    return p["a"] ** 2


def lazy_batch_loss(p, batch):
    return vector_loss(p)


ENTRY_POINTS = [
    ("value_and_grad non-scalar", ValueError, r"scalar \(0-d\) loss.*\.sum\(\) or \.mean\(\)",
     lambda p: sf.value_and_grad(vector_loss)(p)),
    ("value_and_grad non-tensor leaf", TypeError, r"leaf at \['a'\].*torch\.as_tensor",
     lambda p: sf.value_and_grad(quadratic)({"a": [1.0, 2.0]})),
    ("hvp non-scalar", ValueError, r"scalar \(0-d\) loss",
     lambda p: sf.hvp(vector_loss, p, p)),
    ("hvp structure", ValueError, r"(?s)structures differ.*same containers",
     lambda p: sf.hvp(quadratic, p, {"a": p["a"]})),
    ("hvp mode", ValueError, r"forward-over-reverse.*reverse-over-reverse",
     lambda p: sf.hvp(quadratic, p, p, mode="forward")),
    ("ggn_vp structure", ValueError, r"structures differ",
     lambda p: sf.ggn_vp(residuals, p, {"a": p["a"]})),
    ("minimize non-scalar", ValueError, r"scalar \(0-d\) loss",
     lambda p: sf.minimize(vector_loss, p, sf.chain(sf.lbfgs(), sf.wolfe()))),
    ("minimize integer params", TypeError, r"floating-point.*\.to\(torch\.float64\)",
     lambda p: sf.minimize(quadratic, {"a": torch.ones(2, dtype=torch.int64)}, sf.lbfgs())),
    ("minimize empty params", ValueError, r"empty",
     lambda p: sf.minimize(quadratic, {}, sf.lbfgs())),
    ("minimize non-finite start", ValueError, r"nan at the starting params",
     lambda p: sf.minimize(lambda q: quadratic(q) * math.nan, p, sf.lbfgs())),
    ("minimize missing extra", TypeError, r"levenberg_marquardt needs the residual_fn",
     lambda p: sf.minimize(quadratic, p, sf.levenberg_marquardt())),
    ("minimize no curvature", TypeError, r"trust_region needs .*curvature.*Chain it after",
     lambda p: sf.minimize(quadratic, p, sf.trust_region())),
    ("continuation_path non-scalar", ValueError, r"scalar \(0-d\) loss",
     lambda p: sf.continuation_path(lambda q, lam: vector_loss(q), p,
                                    sf.chain(sf.lbfgs(), sf.wolfe()), [0.5, 1.0])),
    ("continuation_path NaN schedule", ValueError, r"continuation_path: schedule must be finite",
     lambda p: sf.continuation_path(lambda q, lam: quadratic(q), p,
                                    sf.chain(sf.lbfgs(), sf.wolfe()), [0.5, math.nan])),
    ("training_step non-scalar", ValueError, r"scalar \(0-d\) loss",
     lambda p: sf.training_step(sf.sgd(0.1), lazy_batch_loss, p, sf.sgd(0.1).init(p), None)),
    ("training_step before init", TypeError, r"sgd\.update got state=None: call init first",
     lambda p: sf.training_step(sf.sgd(0.1), lambda q, b: quadratic(q), p, None, None)),
    ("training_step foreign state", TypeError, r"sgd got a state of type LevenbergState",
     lambda p: sf.training_step(sf.sgd(0.1), lambda q, b: quadratic(q), p,
                                sf.levenberg().init(p), None)),
    ("training_step a factory", TypeError, r"training_step: optimizer must be a Transform.*sf\.lbfgs\(\)",
     lambda p: sf.training_step(sf.lbfgs, lambda q, b: quadratic(q), p, None, None)),
    ("training_step missing extra", TypeError, r"multi_batch_lbfgs needs .*overlap_value_fn",
     lambda p: sf.training_step(sf.multi_batch_lbfgs(), lambda q, b: quadratic(q), p,
                                sf.multi_batch_lbfgs().init(p), None)),
    ("apply_updates structure", ValueError, r"(?s)updates must be a pytree like the params.*structures differ",
     lambda p: sf.apply_updates(p, {"a": p["a"]})),
    ("apply_updates shape", ValueError, r"updates leaf has shape \(3,\), params leaf \(2,\)",
     lambda p: sf.apply_updates(p, {"a": torch.zeros(3, dtype=D), "b": p["b"]})),
    ("apply_updates dtype", TypeError, r"updates leaf has dtype torch\.float32.*do not cast",
     lambda p: sf.apply_updates(p, {k: v.float() for k, v in p.items()})),
    ("apply_updates non-tensor", TypeError, r"updates leaves must be tensors, got float",
     lambda p: sf.apply_updates(p, {"a": 1.0, "b": p["b"]})),
]  # fmt: skip


@pytest.mark.parametrize(
    "error, pattern, call", [e[1:] for e in ENTRY_POINTS], ids=[e[0] for e in ENTRY_POINTS]
)
def test_entry_point_names_the_problem(error, pattern, call):
    with pytest.raises(error, match=pattern):
        call(make_params())


def test_functional_loss_refuses_a_non_scalar_loss_and_batchnorm_in_training():
    layer = torch.nn.Linear(2, 1).double()
    value_fn, params = sf.functional_loss(layer, lambda out, y: (out - y) ** 2)
    batch = (torch.ones(4, 2, dtype=D), torch.ones(4, 1, dtype=D))
    with pytest.raises(ValueError, match=r"scalar \(0-d\) loss, got shape \(4, 1\)"):
        sf.value_and_grad(value_fn)(params, batch)
    with pytest.raises(ValueError, match=r"BatchNorm1d in training mode.*module\.eval\(\)"):
        sf.functional_loss(torch.nn.BatchNorm1d(2), lambda out, y: out.sum())


def test_mixed_dtype_least_squares_lists_the_dtypes():
    params = {"a": torch.ones(2, dtype=D), "b": torch.ones(2, dtype=torch.float32)}
    with pytest.raises(TypeError, match=r"one dtype across leaves, got \['torch\.float32', "):
        sf.least_squares(lambda p: torch.cat([p["a"], p["b"].double()]), params)
