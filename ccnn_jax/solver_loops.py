"""The solver loops on one image's dual (:mod:`ccnn_jax.dual`): projected Newton and projected
gradient with Barzilai-Borwein steps, each a fixed-shape ``lax.while_loop`` with one evaluation
of the dual per iteration, and the stopping tests (KKT residual, relative gap, Farkas
direction for infeasible hard rows). See :mod:`ccnn_jax.solvers` for the method."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ccnn_jax import dual

Array = jax.Array

_ARMIJO = 1e-4  # sufficient-increase fraction of the first-order prediction


def _eps(dtype) -> float:
    """Relative rounding error of sums over pixels: 1e-6 in float32, 2e-15 in float64."""
    return 8.0 * float(jnp.finfo(dtype).eps)


class _Loop(NamedTuple):
    it: Array
    lam: Array
    ev: dual.DualEval
    step: Array  # Newton: damping mu; PGA: backtracking multiplier
    radius: Array  # Newton: trust radius (infinity norm); PGA: unused
    opt_state: optax.OptState  # PGA only (empty tuple for Newton)
    updates: Array  # PGA only: the pending optax update
    done: Array


def _upper(prob: dual.Problem, max_lambda) -> Array:
    return jnp.minimum(prob.beta_C, max_lambda)


def _residual(lam, grad, upper) -> Array:
    return jnp.max(jnp.abs(lam - jnp.clip(lam + grad, 0.0, upper)))


def _converged(lam, ev: dual.DualEval, prob, upper, tol) -> Array:
    """KKT residual <= tol and |gap| <= tol relative to the size of its terms,
    ``1 + sum_c lambda_c (|b_c| + |s_c|)`` (the gap is about lambda . residual once the residual
    is small, so this asks no more than float32 can resolve; it needs no constant of g)."""
    gap, _ = dual.gap_and_violation(lam, ev.value_C, prob)
    scale = 1.0 + lam @ (jnp.abs(prob.b_C) + jnp.abs(ev.value_C))
    return (_residual(lam, ev.grad_C, upper) <= tol) & (jnp.abs(gap) <= tol * scale)


def _infeasible(lam, prob, tol) -> Array:
    return dual.infeasibility_slope(lam, prob) > tol


def _finished(lam, ev: dual.DualEval, prob, upper, tol) -> Array:
    return _converged(lam, ev, prob, upper, tol) | _infeasible(lam, prob, tol)


def _accept(ev_new: dual.DualEval, ev: dual.DualEval, lam_new, lam, prob, upper) -> Array:
    """Accept a trial point that increases g, by one of three tests.

    1. Armijo sufficient increase along the projection arc (from per-pixel differences);
    2. certified increase: for concave g, ``grad g(new) . (new - old) >= 0`` implies
       ``g(new) >= g(old)``, a test that needs no function values;
    3. at float32 resolution, where both are noise: the KKT residual halves and g does not
       drop by more than its rounding error.
    """
    step = lam_new - lam
    increase = dual.rise(ev_new, ev, lam_new, lam, prob)
    armijo = increase >= _ARMIJO * (ev.grad_C @ step)
    certified = ev_new.grad_C @ step >= 0.0
    res_new = _residual(lam_new, ev_new.grad_C, upper)
    res_old = _residual(lam, ev.grad_C, upper)
    scale = 1.0 + jnp.mean(jnp.abs(ev.logz_N)) + jnp.abs(lam) @ jnp.abs(prob.b_C)
    settles = (res_new <= 0.5 * res_old) & (increase >= -_eps(lam.dtype) * scale)
    return armijo | certified | settles


def _newton_direction(ev: dual.DualEval, lam, upper, mu) -> tuple[Array, Array]:
    """Damped Newton step on the free variables; bound-active variables stay put."""
    grad, m = ev.grad_C, ev.neg_hess_CxC
    active = ((lam <= 0.0) & (grad <= 0.0)) | ((lam >= upper) & (grad >= 0.0))
    free = ~active
    both = free[:, None] & free[None, :]
    m_free = jnp.where(both, m, 0.0) + jnp.diag(jnp.where(free, mu, 1.0))
    grad_free = jnp.where(free, grad, 0.0)
    # SPD (M is PSD, mu > 0): Cholesky, which unlike LU needs no pivoting loop in XLA
    d = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m_free, lower=True), grad_free)
    # a failed factorisation (rounding; NaN) falls back to a diagonally scaled gradient step
    d = jnp.where(jnp.all(jnp.isfinite(d)), d, grad_free / jnp.diag(m_free))
    return jnp.where(free, d, 0.0), grad_free


def _initial_radius(prob: dual.Problem) -> Array:
    """A step of lambda ~ the per-pixel spread of the scores can flip any pixel's label."""
    spread = -jnp.min(jnp.where(prob.mask_K, prob.h_NxK, 0.0), axis=-1) / prob.hardness
    return 1.0 + jnp.mean(jnp.clip(spread, 0.0, 1e4))


def _newton_loop(prob: dual.Problem, lam0, tol, max_iter, max_lambda, skip) -> _Loop:
    """Projected Newton with Levenberg-Marquardt damping mu and an infinity-norm trust radius.

    One evaluation of g, grad g and -Hessian per iteration; the accepted point's evaluation is
    carried to the next iteration. A rejected trial shrinks the radius to the secant estimate of
    the best fraction of its length (within [0.1, 0.5]) and doubles mu; an accepted one relaxes
    both. ``skip`` (an invalid input) stops the loop before its first step.
    """
    upper = _upper(prob, max_lambda)
    ev0 = dual.evaluate(lam0, prob)

    def mu_floor(ev):
        return 1e-6 * jnp.max(jnp.diag(ev.neg_hess_CxC)) + 1e-12

    init = _Loop(
        it=jnp.asarray(1, jnp.int32),
        lam=lam0,
        ev=ev0,
        step=mu_floor(ev0),
        radius=_initial_radius(prob),
        opt_state=(),
        updates=jnp.zeros_like(lam0),
        done=_finished(lam0, ev0, prob, upper, tol) | skip,
    )

    def body(st: _Loop) -> _Loop:
        d, _ = _newton_direction(st.ev, st.lam, upper, st.step)
        d = d * jnp.minimum(1.0, st.radius / (jnp.max(jnp.abs(d)) + 1e-30))
        lam_new = jnp.clip(st.lam + d, 0.0, upper)
        ev_new = dual.evaluate(lam_new, prob)
        ok = _accept(ev_new, st.ev, lam_new, st.lam, prob, upper)
        step_len = jnp.max(jnp.abs(lam_new - st.lam))
        lam = jnp.where(ok, lam_new, st.lam)
        ev = jax.tree.map(lambda n, o: jnp.where(ok, n, o), ev_new, st.ev)
        mu = jnp.where(ok, jnp.maximum(st.step / 4.0, mu_floor(ev_new)), 2.0 * st.step)
        # Rejected: the next radius comes from the secant maximiser of g along the rejected step,
        # t* = g'(0) / (g'(0) - g'(1)) with g'(t) the directional derivatives at its two ends.
        slope0, slope1 = st.ev.grad_C @ (lam_new - st.lam), ev_new.grad_C @ (lam_new - st.lam)
        t_star = slope0 / jnp.maximum(slope0 - slope1, 1e-30)
        shrink = jnp.clip(jnp.where(slope1 < 0, t_star, 0.25), 0.1, 0.5)
        radius = jnp.where(ok, jnp.maximum(st.radius, 2.0 * step_len), shrink * step_len)
        stuck = (step_len == 0.0) | (mu > 1e30)
        done = _finished(lam, ev, prob, upper, tol) | stuck
        return st._replace(it=st.it + 1, lam=lam, ev=ev, step=mu, radius=radius, done=done)

    return jax.lax.while_loop(lambda st: (~st.done) & (st.it < max_iter), body, init)


class BarzilaiBorweinState(NamedTuple):
    prev_params: Array
    prev_grads: Array
    alpha: Array


def scale_by_barzilai_borwein(alpha_init: Array, min_alpha=1e-10, max_alpha=1e10):
    r"""optax transform scaling gradients by the Barzilai-Borwein step :math:`s^\top s / s^\top y`.

    :math:`s = x_k - x_{k-1}`, :math:`y = \nabla_k - \nabla_{k-1}`; ``alpha_init`` is used until a
    step with positive curvature :math:`s^\top y > 0` has been seen.
    """

    def init_fn(params):
        return BarzilaiBorweinState(
            prev_params=params,
            prev_grads=jnp.zeros_like(params),
            alpha=jnp.asarray(alpha_init, params.dtype),
        )

    def update_fn(grads, state, params):
        s = params - state.prev_params
        y = grads - state.prev_grads
        sy, ss = s @ y, s @ s
        alpha = jnp.where(sy > 0, ss / jnp.where(sy > 0, sy, 1.0), state.alpha)
        alpha = jnp.clip(alpha, min_alpha, max_alpha)
        return alpha * grads, BarzilaiBorweinState(params, grads, alpha)

    return optax.GradientTransformation(init_fn, update_fn)


def _pga_loop(prob: dual.Problem, lam0, tol, max_iter, max_lambda, skip) -> _Loop:
    upper = _upper(prob, max_lambda)
    ev0 = dual.evaluate(lam0, prob, with_hessian=False)
    # 1 / Lipschitz bound of grad g: s * max_{i,l} sum_c (w_c(i) a_cl)^2.
    if prob.w_CxN is None:
        lip = jnp.max(jnp.sum(prob.a_CxK**2, axis=0))
    else:
        lip = jnp.max(jnp.einsum("ci,cl->il", prob.w_CxN**2, prob.a_CxK**2))
    tx = optax.chain(
        scale_by_barzilai_borwein(1.0 / (prob.hardness * lip + 1e-12)), optax.scale(-1.0)
    )
    # optax minimises: feed it -grad g, so its updates ascend g.
    updates, opt_state = tx.update(-ev0.grad_C, tx.init(lam0), lam0)
    init = _Loop(
        it=jnp.asarray(1, jnp.int32),
        lam=lam0,
        ev=ev0,
        step=jnp.asarray(1.0, lam0.dtype),
        radius=jnp.asarray(0.0, lam0.dtype),
        opt_state=opt_state,
        updates=updates,
        done=_finished(lam0, ev0, prob, upper, tol) | skip,
    )

    def body(st: _Loop) -> _Loop:
        lam_new = optax.projections.projection_box(
            optax.apply_updates(st.lam, st.step * st.updates), 0.0, upper
        )
        ev_new = dual.evaluate(lam_new, prob, with_hessian=False)
        ok = _accept(ev_new, st.ev, lam_new, st.lam, prob, upper)
        new_updates, new_opt_state = tx.update(-ev_new.grad_C, st.opt_state, lam_new)
        pick = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        lam = pick(lam_new, st.lam)
        ev = jax.tree.map(pick, ev_new, st.ev)
        stuck = jnp.max(jnp.abs(lam_new - st.lam)) <= 1e-30
        return st._replace(
            it=st.it + 1,
            lam=lam,
            ev=ev,
            step=jnp.where(ok, 1.0, st.step * 0.25),
            opt_state=jax.tree.map(pick, new_opt_state, st.opt_state),
            updates=pick(new_updates, st.updates),
            done=_finished(lam, ev, prob, upper, tol) | stuck,
        )

    return jax.lax.while_loop(lambda st: (~st.done) & (st.it < max_iter), body, init)


_DEFAULT_MAX_ITER = {"newton": 100, "pga": 2000}
_LOOPS = {"newton": _newton_loop, "pga": _pga_loop}
