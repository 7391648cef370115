r"""Solvers for the box-constrained concave dual: projected Newton (default) and projected gradient.

Both maximise g(lambda) of :mod:`ccnn_jax.dual` over the box :math:`0 \le \lambda \le
\min(\beta, \lambda_{max})` in a fixed-shape ``lax.while_loop``, one evaluation of the dual per
iteration, and stop when the KKT residual
:math:`\|\lambda - \Pi_{box}(\lambda + \nabla g)\|_\infty` and the relative duality gap are both
below ``tol``. Infeasible hard rows make g unbounded above; the loop stops as soon as the
hard-row part of lambda is a Farkas direction (:func:`ccnn_jax.dual.infeasibility_slope` > 0),
and hard multipliers are capped at ``max_lambda`` as a backstop. Either is reported as
``feasible=False``, with finite lambda and P.

Cost. Labels the mask forbids are dropped before the loop: an image with n allowed labels is
solved on the first of 4, 8, 16 or K columns that holds them (a ``lax.switch``, so only that
branch runs outside ``vmap``; see :func:`_label_buckets`); a branch on fewer than K columns also
drops the rows that are zero on every allowed label with b <= 0 (their multiplier is 0),
keeping 2 keep + 2 rows (an image with more live rows takes a wider branch); and on the CPU
the loop evaluates the dual in factorised form (two matrix-vector products and a K x K Gram
product per evaluation, see :mod:`ccnn_jax.dual`).
P, s(P) and g are returned from the loop's own last evaluation (P = E u / d on the kept
columns, scattered to K labels); outside the loop a solve adds one exponential pass over all
N x K scores, for g's constant and the check that ``log_q`` holds no NaN / +inf.

Differentiation. ``solve`` and ``solve_batch`` have a custom JVP (hence also a VJP, by JAX's
transposition) from the implicit function theorem on the optimality conditions of the box-
constrained dual. With F the free rows (:math:`0 < \lambda_c < \min(\beta_c, \lambda_{max})`)
and the bound rows held at their bound,

.. math::

    M_{FF}\, d\lambda_F = db_F - \partial_\theta s_F(P)\, d\theta - M_{FU}\, d\beta_U,
    \qquad d\lambda_U = d\beta_U, \qquad d\lambda_{L} = 0,

where :math:`M = -\nabla^2 g`, U the rows at the upper bound :math:`\beta_c` and L those at 0;
then :math:`dP = \partial_\lambda P\, d\lambda + \partial_\theta P\, d\theta` (by JAX's own
differentiation of an exact recomputation of P, which runs only under differentiation) and
:math:`d g^* = \partial g\, (d\lambda, d\theta)`, for :math:`\theta` = ``log_q``, ``cons.a``,
``cons.b``, ``cons.weights`` and ``hardness``. This is the exact derivative wherever strict
complementarity holds (every bound row has a nonzero gradient, so a small change of
:math:`\theta` keeps it at its bound). Where it fails (a row at a bound with zero gradient) the
solution map has a kink; the rule then returns the one-sided derivative of the branch on which
such rows stay at their bound. A singular :math:`M_{FF}` (e.g. two identical free rows) is
solved in the least-squares, minimum-norm sense. ``lam0`` has zero derivative (the optimum does
not depend on it); ``info`` carries derivatives in ``primal``, ``dual`` (both
:math:`dg^*`) and ``gap`` (of its closed form at P(lambda)). Infeasible or invalid problems
(``feasible`` False) get zero derivatives. Differentiating costs about two exponential passes
over the N x K scores on all K labels (one for M and :math:`\partial_\theta s(P)`, one for dP)
plus K x K and C x C algebra; no iteration of the loop is differentiated. Forward mode
(``jax.jvp``, ``jacfwd``) and reverse mode (``jax.grad``, ``jacrev``) agree, under ``jit`` and
``vmap``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from ccnn_jax import dual
from ccnn_jax.constraints import LinearConstraints

Array = jax.Array

_ARMIJO = 1e-4  # sufficient-increase fraction of the first-order prediction


def _eps(dtype) -> float:
    """Relative rounding error of sums over pixels: 1e-6 in float32, 2e-15 in float64."""
    return 8.0 * float(jnp.finfo(dtype).eps)


class SolveInfo(NamedTuple):
    """Per-image solver report.

    iterations: evaluations of the dual used. max_violation: worst hard-row violation of P.
    gap: duality gap primal(P) - g(lambda). converged: KKT residual and relative gap <= tol.
    feasible: False when the hard rows were proven infeasible, or when an input was invalid
    (NaN or +inf in ``log_q``, ``beta < 0``, no allowed label, hardness not finite and > 0, ...;
    such inputs raise ``ValueError`` outside ``jit``).
    """

    iterations: Array
    max_violation: Array
    gap: Array
    converged: Array
    feasible: Array
    primal: Array
    dual: Array


class Solution(NamedTuple):
    """lam (C,) multipliers; p the latent distribution (shape of ``log_q``); info a SolveInfo."""

    lam: Array
    p: Array
    info: SolveInfo


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


# ----------------------------------------------------------------------------- invalid inputs


def _sanitise(cons: LinearConstraints, hardness, tol, max_lambda, dtype, checks: bool = True):
    """Finite stand-ins for invalid traced inputs, and one validity flag per argument.

    Eager calls raise on these inputs (:func:`_check`); under ``jit`` the solve runs on the
    stand-ins (no iteration) and reports ``feasible = converged = False``. The checks are also
    ``checkify.debug_check``s, which ``checkify.checkify(..., errors=checkify.user_checks)``
    turns into errors naming the argument.
    """
    s = jnp.asarray(hardness, dtype)
    tol = jnp.asarray(tol, dtype)
    max_lambda = jnp.asarray(max_lambda, dtype)
    a, b, beta = (x.astype(dtype) for x in (cons.a, cons.b, cons.beta))
    mask = cons.mask.astype(bool)
    ok = {
        "hardness must be finite and > 0": jnp.isfinite(s) & (s > 0),
        "tol must be >= 0": tol >= 0,
        "max_lambda must be > 0": max_lambda > 0,
        "cons.a must be finite": jnp.all(jnp.isfinite(a)),
        "cons.b must be finite": jnp.all(jnp.isfinite(b)),
        "cons.beta must be >= 0 (inf = hard)": jnp.all(beta >= 0),
        "cons.mask must allow at least one label": jnp.any(mask),
    }
    weights = cons.weights
    if weights is not None:
        weights = weights.astype(dtype)
        ok["cons.weights must be finite"] = jnp.all(jnp.isfinite(weights))
        weights = jnp.where(jnp.isfinite(weights), weights, 0.0)
    for message, flag in ok.items() if checks else ():
        checkify.debug_check(flag, "solve: " + message)
    safe = LinearConstraints(
        a=jnp.where(jnp.isfinite(a), a, 0.0),
        b=jnp.where(jnp.isfinite(b), b, 0.0),
        beta=jnp.where(beta >= 0, beta, 0.0),
        mask=jnp.where(jnp.any(mask), mask, True),
        weights=weights,
    )
    valid = functools.reduce(jnp.logical_and, ok.values())
    return (
        safe,
        jnp.where(ok["hardness must be finite and > 0"], s, 1.0),
        jnp.where(tol >= 0, tol, 0.0),
        jnp.where(max_lambda > 0, max_lambda, 1e6),
        valid,
    )


# ----------------------------------------------------------------------------- one image


class _Core(NamedTuple):
    """What the loop decides for one image: the multipliers, its flags, and P, s(P) and g
    (short of :func:`ccnn_jax.dual.mask_cost`) at the final lambda, from the loop's own
    (factorised, kept-column) evaluation. Only ``lam`` carries a derivative (implicit, see
    :func:`_core_jvp`); :func:`_report` differentiates P, s(P) and g itself."""

    lam: Array
    iterations: Array
    converged: Array
    feasible: Array
    p: Array  # (N, K) P on all labels
    value: Array  # (C,) s(P)
    g_part: Array  # g(lambda) - mask_cost


def _core_forward(
    method, max_iter, keep, factorise, log_q, cons, hardness, tol, max_lambda, lam0
) -> _Core:
    """The loop for one image on ``keep`` label columns (see :func:`solve`); P is formed after."""
    dtype = dual.working_dtype(log_q)
    cons, s, tol, max_lambda, valid = _sanitise(cons, hardness, tol, max_lambda, dtype)
    c = cons.a.shape[0]
    rows = _row_budget(keep, log_q.shape[-1], c)
    live = _live_rows(cons)
    lam0 = jnp.where(live, lam0.astype(dtype), 0.0)  # a dead row's multiplier is 0 (optimal)
    if rows < c:
        # the branch holds at most ``rows`` live rows (_bucket_index): solve on those; the others
        # are zero on every allowed label with b <= 0, so their optimal multiplier is 0
        order = jnp.argsort(~live, stable=True)[:rows]
        cons = LinearConstraints(
            a=cons.a[order],
            b=cons.b[order],
            beta=cons.beta[order],
            mask=cons.mask,
            weights=None if cons.weights is None else cons.weights[order],
        )
        lam0 = lam0[order]
    prob = dual.make_problem(log_q, cons, s, factorise=factorise, keep=keep, with_offset=False)
    upper = _upper(prob, max_lambda)
    lam0 = jnp.where(jnp.isfinite(lam0), jnp.clip(lam0, 0.0, upper), 0.0)
    st = _LOOPS[method](prob, lam0, tol, max_iter, max_lambda, ~valid)
    value = st.ev.value_C  # s(P) at the final lambda, from the loop's last accepted evaluation
    hard = jnp.isinf(prob.beta_C)
    at_cap = hard & (st.lam >= 0.5 * max_lambda) & (prob.b_C - value > tol)
    feasible = ~(jnp.any(at_cap) | _infeasible(st.lam, prob, tol)) & valid
    converged = _converged(st.lam, st.ev, prob, upper, tol) & feasible
    # P at the final lambda on the kept columns (factorised: no exponential), then all K labels
    p = dual.scatter_labels(dual.latent(st.lam, prob), prob, log_q.shape[-1])
    lam = st.lam
    if rows < c:  # back to all C rows (s(P) of a dead row is exactly 0)
        lam = jnp.zeros(c, dtype).at[order].set(lam)
        value = jnp.zeros(c, dtype).at[order].set(value)
    return _Core(
        lam=lam,
        iterations=st.it,
        converged=converged,
        feasible=feasible,
        p=p,
        value=value,
        g_part=st.ev.g,
    )


_core = jax.custom_jvp(_core_forward, nondiff_argnums=(0, 1, 2, 3))


def _free_solve(m_CxC: Array, free_C: Array, rhs_C: Array) -> Array:
    """Least-squares minimum-norm solution of M_FF x_F = rhs_F (x = 0 off F), by eigh."""
    both = free_C[:, None] & free_C[None, :]
    evals, evecs = jnp.linalg.eigh(jnp.where(both, m_CxC, 0.0))
    cutoff = 10.0 * m_CxC.shape[0] * _eps(m_CxC.dtype) * jnp.max(jnp.abs(evals))
    inv = jnp.where(evals > cutoff, 1.0 / jnp.where(evals > cutoff, evals, 1.0), 0.0)
    return jnp.where(free_C, evecs @ (inv * (evecs.T @ jnp.where(free_C, rhs_C, 0.0))), 0.0)


@_core.defjvp
def _core_jvp(method, max_iter, keep, factorise, primals, tangents):
    r"""d lambda by implicit differentiation at the optimum (see the module doc)."""
    log_q, cons, hardness, tol, max_lambda, lam0 = primals
    dlog_q, dcons, dhardness = tangents[:3]
    core = _core(method, max_iter, keep, factorise, *primals)
    lam = core.lam
    dtype = lam.dtype
    safe, s, _, max_lambda, _ = _sanitise(cons, hardness, tol, max_lambda, dtype, checks=False)
    upper = jnp.minimum(safe.beta, max_lambda)
    at_upper = (lam >= upper) & (lam > 0)
    free = (lam > 0) & ~at_upper
    # rows at the upper bound beta (not the cap max_lambda) move with it
    dlam_bound = jnp.where(at_upper & (safe.beta <= max_lambda), dcons.beta.astype(dtype), 0.0)

    def constraint_values(lam, log_q, a, weights, s):
        """s(P(lambda, theta)) on all K labels, and P."""
        rows = LinearConstraints(a, safe.b, safe.beta, safe.mask, weights)
        prob = dual.make_problem(log_q, rows, s, with_offset=False)
        p, _ = dual._exact(lam, prob)
        return dual.values(p, prob), (p, prob)

    theta = (log_q, safe.a, safe.weights, s)
    dtheta = tuple(
        None if x is None else jnp.asarray(t, x.dtype)
        for t, x in zip((dlog_q, dcons.a, dcons.weights, dhardness), theta, strict=True)
    )
    _, dvalue, (p, prob) = jax.jvp(
        constraint_values, (lam, *theta), (dlam_bound, *dtheta), has_aux=True
    )
    m = dual.neg_hessian(p, prob.a_CxK, prob.w_CxN, prob.hardness)
    dlam_free = _free_solve(m, free, dcons.b.astype(dtype) - dvalue)
    float0 = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731
    dcore = _Core(
        lam=jnp.where(core.feasible, dlam_bound + dlam_free, 0.0),
        iterations=float0(core.iterations),
        converged=float0(core.converged),
        feasible=float0(core.feasible),
        p=jnp.zeros_like(core.p),
        value=jnp.zeros_like(core.value),
        g_part=jnp.zeros_like(core.g_part),
    )
    return core, dcore


@jax.custom_jvp
def _outputs(lam, log_q, cons, s, fast):
    """P (shaped like ``log_q``), s(P) and g at the loop's lambda: the values are the loop's own
    (``fast``: P, s(P), g), the derivatives those of :func:`ccnn_jax.dual.finish` (an exact
    recomputation that runs only when differentiating)."""
    del lam, s
    p, value, g = fast
    return p.reshape(log_q.shape), value, g


@_outputs.defjvp
def _outputs_jvp(primals, tangents):
    lam, log_q, cons, s, fast = primals
    dlam, dlog_q, dcons, ds, _ = tangents
    _, dout = jax.jvp(
        lambda *x: tuple(dual.finish(*x)[:3]), (lam, log_q, cons, s), (dlam, dlog_q, dcons, ds)
    )
    return _outputs(lam, log_q, cons, s, fast), dout


def _report(core: _Core, log_q, cons, hardness, tol, max_lambda) -> Solution:
    """P, s(P), g and the certificate at the loop's lambda, on all K labels, from the loop's own
    P (no exponential over the kept columns) plus one exponential pass over all labels for g's
    constant and the check of ``log_q``. Differentiable through lambda (implicit,
    :func:`_core_jvp`) and directly through the inputs (:func:`_outputs`); infeasible or invalid
    images get zero derivatives."""
    dtype = core.lam.dtype
    safe, s, _, _, _ = _sanitise(cons, hardness, tol, max_lambda, dtype, checks=False)
    mask_cost, scores_ok = dual.mask_cost(log_q, s)
    checkify.debug_check(
        scores_ok,
        "solve: log_q contains NaN or +inf (or s * log_q "
        "overflows); expected finite logits or log-probabilities",
    )
    fast = jax.lax.stop_gradient((core.p.astype(dtype), core.value, core.g_part + mask_cost))
    p, value, g = _outputs(core.lam, log_q, safe, s, fast)
    ok = core.feasible & scores_ok
    hold = lambda x: jnp.where(ok, x, jax.lax.stop_gradient(x))  # noqa: E731
    b, beta = safe.b.astype(dtype), safe.beta.astype(dtype)
    hard = jnp.isinf(beta)
    shortfall = jnp.maximum(b - value, 0.0)
    # hard rows (beta = inf) carry no penalty; 0 * inf would make their cotangents NaN
    gap = jnp.sum(core.lam * (value - b) + jnp.where(hard, 0.0, beta) * shortfall)
    info = SolveInfo(
        iterations=core.iterations,
        max_violation=jnp.max(jnp.where(hard, shortfall, 0.0)),
        gap=hold(gap),
        converged=core.converged & scores_ok,
        feasible=ok,
        primal=hold(g + gap),
        dual=hold(g),
    )
    return Solution(lam=hold(core.lam), p=hold(p), info=info)


# ----------------------------------------------------------------------------- dispatch


def _label_buckets(k: int) -> tuple[int, ...]:
    """Column counts a problem is solved on: the smallest that holds its allowed labels.

    Each is a branch of the compiled solver (compile time grows with their number), so small
    label sets, where dropping columns saves little, keep all K. Powers of two (4, 8, 16) at
    least 3 columns short of K: besides the Gram product's keep^2, elementwise passes over a
    row of 16 columns vectorise far better than over 21 (on the CPU).
    """
    if k <= 6:
        return (k,)
    return tuple(b for b in (4, 8, 16) if b <= k - 3) + (k,)


def _row_budget(keep: int, k: int, c: int) -> int:
    """Rows a branch on ``keep`` < K columns solves on: about a lower and an upper bound per
    label plus two (the C x C Newton algebra is most of an iteration's cost at small N); the
    all-K branch keeps every row."""
    return c if keep >= k else min(c, 2 * keep + 2)


def _live_rows(cons: LinearConstraints) -> Array:
    """Rows that matter: nonzero on an allowed label, or b > 0 (then a zero row is violated).
    A dead row has s_c(P) = 0 for every P and b_c <= 0, so lambda_c = 0 is optimal."""
    mask = jnp.where(jnp.any(cons.mask), cons.mask.astype(bool), True)
    return jnp.any((cons.a != 0) & mask, axis=-1) | (cons.b > 0)


def _bucket_index(cons: LinearConstraints, buckets: tuple[int, ...]) -> Array:
    """The first branch that holds the image's allowed labels and its live rows."""
    mask_K = cons.mask.astype(bool)
    k, c = mask_K.shape[-1], cons.a.shape[-2]
    allowed = jnp.where(jnp.any(mask_K), jnp.sum(mask_K), k)
    live = jnp.sum(_live_rows(cons))
    fits = [(allowed <= b) & (live <= _row_budget(b, k, c)) for b in buckets[:-1]]
    if not fits:
        return jnp.asarray(0, jnp.int32)
    return jnp.sum(jnp.cumprod(~jnp.stack(fits))).astype(jnp.int32)


def _core_one(log_q, cons, hardness, tol, max_lambda, lam0, *, method, max_iter, factorise):
    """The loop for one image, in the branch whose column count holds its allowed labels."""
    buckets = _label_buckets(log_q.shape[-1])
    branches = [functools.partial(_core, method, max_iter, keep, factorise) for keep in buckets]
    args = (log_q, cons, hardness, tol, max_lambda, lam0)
    if len(branches) == 1:
        return branches[0](*args)
    return jax.lax.switch(_bucket_index(cons, buckets), branches, *args)


def _zeros_lam(log_q, cons, batched: bool):
    dtype = dual.working_dtype(log_q)
    return jnp.zeros(cons.a.shape[: 2 if batched else 1], dtype)


@functools.partial(jax.jit, static_argnames=("method", "max_iter"))
def _solve_jit(log_q, cons, tol, hardness, max_lambda, lam0, *, method, max_iter):
    lam0 = _zeros_lam(log_q, cons, False) if lam0 is None else lam0
    core = _core_one(
        log_q,
        cons,
        hardness,
        tol,
        max_lambda,
        lam0,
        method=method,
        max_iter=max_iter,
        factorise=True,
    )
    return _report(core, log_q, cons, hardness, tol, max_lambda)


@functools.partial(jax.jit, static_argnames=("method", "max_iter", "sequential"))
def _solve_batch_jit(log_q, cons, tol, hardness, max_lambda, lam0, *, method, max_iter, sequential):
    lam0 = _zeros_lam(log_q, cons, True) if lam0 is None else lam0
    if sequential:
        # one image after the other; only lambda and the flags leave the loop
        core = jax.lax.map(
            lambda x: _core_one(
                *x[:2],
                hardness,
                tol,
                max_lambda,
                x[2],
                method=method,
                max_iter=max_iter,
                factorise=True,
            ),
            (log_q, cons, lam0),
        )
    else:
        # lockstep: one column count for the whole batch (the largest any image needs)
        buckets = _label_buckets(log_q.shape[-1])
        branches = [
            jax.vmap(
                functools.partial(_core, method, max_iter, keep, False),
                in_axes=(0, 0, None, None, None, 0),
            )
            for keep in buckets
        ]
        args = (log_q, cons, hardness, tol, max_lambda, lam0)
        if len(branches) == 1:
            core = branches[0](*args)
        else:
            index = jnp.max(jax.vmap(lambda x: _bucket_index(x, buckets))(cons))
            core = jax.lax.switch(index, branches, *args)
    # P and the report for the whole batch at once, outside the loop
    return jax.vmap(_report, in_axes=(0, 0, 0, None, None, None))(
        core, log_q, cons, hardness, tol, max_lambda
    )


# ----------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array) and not isinstance(x, jax.core.Tracer)


def _scalar_value(x) -> float | None:
    """The value of a concrete scalar argument, or None if traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return float(np.asarray(x))


def _check(
    log_q,
    cons: LinearConstraints,
    method,
    batched: bool,
    *,
    tol,
    max_iter,
    hardness,
    max_lambda,
    lam0,
) -> None:
    """Eager validation at the API boundary; value checks are skipped for traced arguments."""
    if method not in _DEFAULT_MAX_ITER:
        raise ValueError(f"solve: method must be 'newton' or 'pga', got {method!r}")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
    ):
        raise ValueError(
            f"solve: max_iter must be an integer >= 1 (or None for the default), got {max_iter!r}"
        )
    for name, value, ok, allowed in (
        ("tol", tol, lambda v: v >= 0, ">= 0"),
        ("hardness", hardness, lambda v: np.isfinite(v) and v > 0, "finite and > 0"),
        ("max_lambda", max_lambda, lambda v: np.isfinite(v) and v > 0, "finite and > 0"),
    ):
        if np.ndim(value) != 0:
            raise ValueError(f"solve: {name} must be a scalar, got shape {np.shape(value)}")
        v = _scalar_value(value)
        if v is not None and not ok(v):
            raise ValueError(f"solve: {name} must be {allowed}, got {v}")
    if not isinstance(log_q, np.ndarray | jax.Array):
        raise ValueError(
            f"solve: log_q must be a numpy or jax array of shape (*pixels, K), got "
            f"{type(log_q).__name__}"
        )
    if not jnp.issubdtype(log_q.dtype, jnp.floating):
        raise ValueError(f"solve: log_q must be floating point, got dtype {log_q.dtype}")
    lead = 1 if batched else 0
    if cons.a.ndim != 2 + lead:
        want = "(B, C, K)" if batched else "(C, K)"
        raise ValueError(f"cons.a must have shape {want}, got {cons.a.shape}")
    if cons.a.shape[-2] == 0:
        raise ValueError(
            "cons has C = 0 rows; solve needs at least one (an inert row is a = 0, b = 0)"
        )
    k = cons.a.shape[-1]
    if log_q.ndim < 2 + lead or log_q.shape[-1] != k:
        want = "(B, *pixels, K)" if batched else "(*pixels, K)"
        raise ValueError(f"log_q must have shape {want} with K = {k}, got {log_q.shape}")
    if batched and log_q.shape[0] != cons.a.shape[0]:
        raise ValueError(f"log_q has batch {log_q.shape[0]} but cons has batch {cons.a.shape[0]}")
    if cons.weights is not None:
        want = (*log_q.shape[:lead], cons.a.shape[-2], *log_q.shape[lead:-1])
        if tuple(cons.weights.shape) != want:
            raise ValueError(
                f"cons.weights must have shape {want} (C, *pixels), got {cons.weights.shape}"
            )
    if lam0 is not None:
        want = tuple(cons.a.shape[:-1])
        if tuple(np.shape(lam0)) != want:
            form = "(B, C)" if batched else "(C,)"
            raise ValueError(
                f"solve: lam0 must have shape {want} {form}, like the multipliers, "
                f"got {tuple(np.shape(lam0))}"
            )
        if _is_concrete(lam0) and not bool(jnp.all(jnp.isfinite(lam0))):
            raise ValueError("solve: lam0 must be finite (it is clipped into the box)")
    if _is_concrete(log_q):
        if bool(jnp.any(jnp.isnan(log_q) | (log_q == jnp.inf))):  # reduced on device
            raise ValueError(
                "log_q contains NaN or +inf; expected finite logits or "
                "log-probabilities (-inf allowed for q = 0)"
            )


def solve(
    log_q: Array,
    cons: LinearConstraints,
    *,
    method: str = "newton",
    tol: float = 1e-6,
    max_iter: int | None = None,
    hardness: float = 1.0,
    max_lambda: float = 1e6,
    lam0: Array | None = None,
) -> Solution:
    r"""Finds the P closest to Q in KL under ``cons``, by maximising the concave dual on its box.

    .. math::

        \max_{0 \le \lambda \le \beta}\ g(\lambda), \qquad
        P_i = \mathrm{softmax}_{mask}\big(s\,(f_i + A_i^\top\lambda)\big).

    Args:
      log_q: (*pixels, K) log-probabilities or logits of one image, e.g. (H, W, K) or (N, K).
        float64 scores (with ``jax_enable_x64``) are solved in float64, others in float32.
      cons: ``LinearConstraints`` over K labels (weights, if any, shaped (C, *pixels)); C >= 1.
      method: ``"newton"`` (projected Newton, default) or ``"pga"`` (projected gradient with
        Barzilai-Borwein steps, written with optax).
      tol: KKT-residual tolerance (in fractions of the image) and relative-gap tolerance, >= 0.
      max_iter: evaluations of the dual at most, >= 1 (default 100 for newton, 2000 for pga).
      hardness: inverse temperature s, finite and > 0 (1 = KL; CCNN used 1000 with size
        constraints).
      max_lambda: cap on hard-row multipliers (> 0); reaching it while violated means
        infeasible.
      lam0: (C,) warm start, e.g. the multipliers of the previous solve of the same image;
        clipped into the box. Default zeros.

    Returns:
      ``Solution(lam, p, info)``. jit- and vmap-able (``method``/``max_iter`` are static) and
      differentiable: ``jax.grad``/``jax.jvp`` of any function of ``p``, ``lam``,
      ``info.primal`` or ``info.dual`` w.r.t. ``log_q``, ``cons.a``, ``cons.b``,
      ``cons.beta`` (rows at their upper bound), ``cons.weights`` and ``hardness`` use implicit
      differentiation at the optimum (see :mod:`ccnn_jax.solvers`): exact where strict
      complementarity holds (every multiplier at a bound has a nonzero gradient there);
      otherwise the one-sided derivative with such rows held at their bound; zero for
      infeasible or invalid problems. For a batch prefer
      :func:`solve_batch`: under ``vmap`` every label-count branch and both sides of the
      factorised latent's test run.

    Raises:
      ValueError: naming the argument, for concrete invalid inputs. Traced invalid inputs
      (under ``jit``) give ``feasible = converged = False`` with finite values instead.

    >>> import jax.numpy as jnp
    >>> from ccnn_jax import constraints
    >>> cons = constraints.foreground(jnp.array([0.5, 0.0]))
    >>> sol = solve(jnp.log(jnp.array([[0.9, 0.1], [0.8, 0.2]])), cons)
    >>> [round(float(x), 3) for x in sol.p.mean(0)], bool(sol.info.converged)
    ([0.5, 0.5], True)
    """
    _check(
        log_q,
        cons,
        method,
        batched=False,
        tol=tol,
        max_iter=max_iter,
        hardness=hardness,
        max_lambda=max_lambda,
        lam0=lam0,
    )
    max_iter = max_iter or _DEFAULT_MAX_ITER[method]
    return _solve_jit(
        log_q, cons, tol, hardness, max_lambda, lam0, method=method, max_iter=max_iter
    )


def solve_batch(
    log_q: Array,
    cons: LinearConstraints,
    *,
    method: str = "newton",
    tol: float = 1e-6,
    max_iter: int | None = None,
    hardness: float = 1.0,
    max_lambda: float = 1e6,
    sequential: bool | None = None,
    lam0: Array | None = None,
) -> Solution:
    """``solve`` mapped over a leading image axis of ``log_q``, of every field of ``cons`` and of
    ``lam0`` (B, C).

    ``sequential=False`` vmaps: the images run in lockstep, so each costs the batch's largest
    iteration count and column count, which suits accelerators. ``sequential=True`` solves one
    image after the other (``lax.map``): each stops at its own iteration count, is solved on as
    few label columns as it allows, and uses the factorised latent of
    :func:`ccnn_jax.dual.make_problem`, which is faster on a CPU. ``None`` (default):
    sequential on the CPU backend, vmapped elsewhere. The results agree to float32 rounding;
    both are differentiable like :func:`solve`.
    """
    _check(
        log_q,
        cons,
        method,
        batched=True,
        tol=tol,
        max_iter=max_iter,
        hardness=hardness,
        max_lambda=max_lambda,
        lam0=lam0,
    )
    max_iter = max_iter or _DEFAULT_MAX_ITER[method]
    if sequential is None:
        sequential = jax.default_backend() == "cpu"
    return _solve_batch_jit(
        log_q,
        cons,
        tol,
        hardness,
        max_lambda,
        lam0,
        method=method,
        max_iter=max_iter,
        sequential=bool(sequential),
    )
