r"""Solvers for the box-constrained concave dual: projected Newton (default) and projected gradient.

Both maximise g(lambda) of :mod:`ccnn_jax.dual` over the box :math:`0 \le \lambda \le
\min(\beta, \lambda_{max})` in a fixed-shape ``lax.while_loop``, one evaluation of the dual per
iteration, and stop when the KKT residual
:math:`\|\lambda - \Pi_{box}(\lambda + \nabla g)\|_\infty` and the relative duality gap are both
below ``tol``. Infeasible hard rows make g unbounded above; the loop stops as soon as the
hard-row part of lambda is a Farkas direction (:func:`ccnn_jax.dual.infeasibility_slope` > 0),
and hard multipliers are capped at ``max_lambda`` as a backstop. Either is reported as
``feasible=False``, with finite lambda and P.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccnn_jax import dual
from ccnn_jax.constraints import LinearConstraints

Array = jax.Array

_ARMIJO = 1e-4  # sufficient-increase fraction of the first-order prediction
_EPS32 = 1e-6  # relative rounding error of float32 sums over pixels


class SolveInfo(NamedTuple):
    """Per-image solver report.

    iterations: evaluations of the dual used. max_violation: worst hard-row violation of P.
    gap: duality gap primal(P) - g(lambda). converged: KKT residual and relative gap <= tol.
    feasible: False when the hard rows were proven infeasible, or when an input was invalid
    (see :func:`_inputs_valid`; eager calls raise on such inputs instead).
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
    gap, _ = dual.gap_and_violation(lam, ev.value_C, prob)
    primal = ev.g + gap
    return (_residual(lam, ev.grad_C, upper) <= tol) & (jnp.abs(gap) <= tol * (1 + jnp.abs(primal)))


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
    noise = _EPS32 * (1.0 + jnp.mean(jnp.abs(ev.logz_N)) + jnp.abs(lam) @ jnp.abs(prob.b_C))
    settles = (res_new <= 0.5 * res_old) & (increase >= -noise)
    return armijo | certified | settles


def _newton_direction(ev: dual.DualEval, lam, upper, mu) -> tuple[Array, Array]:
    """Damped Newton step on the free variables; bound-active variables stay put."""
    grad, m = ev.grad_C, ev.neg_hess_CxC
    active = ((lam <= 0.0) & (grad <= 0.0)) | ((lam >= upper) & (grad >= 0.0))
    free = ~active
    both = free[:, None] & free[None, :]
    m_free = jnp.where(both, m, 0.0) + jnp.diag(jnp.where(free, mu, 1.0))
    grad_free = jnp.where(free, grad, 0.0)
    d = jnp.linalg.solve(m_free, grad_free)
    return jnp.where(free, d, 0.0), grad_free


def _initial_radius(prob: dual.Problem) -> Array:
    """A step of lambda ~ the per-pixel spread of the scores can flip any pixel's label."""
    f = jnp.where(prob.mask_K, prob.f_NxK, jnp.nan)
    spread = jnp.nanmax(f, axis=-1) - jnp.nanmin(f, axis=-1)
    return 1.0 + jnp.mean(jnp.clip(spread, 0.0, 1e4))


def _newton_loop(prob: dual.Problem, lam0, tol, max_iter, max_lambda) -> _Loop:
    """Projected Newton with Levenberg-Marquardt damping mu and an infinity-norm trust radius.

    One evaluation of g, grad g and -Hessian per iteration; the accepted point's evaluation is
    carried to the next iteration. A rejected trial shrinks the radius to the secant estimate of
    the best fraction of its length (within [0.1, 0.5]) and doubles mu; an accepted one relaxes
    both.
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
        done=_finished(lam0, ev0, prob, upper, tol),
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
            alpha=jnp.asarray(alpha_init, jnp.float32),
        )

    def update_fn(grads, state, params):
        s = params - state.prev_params
        y = grads - state.prev_grads
        sy, ss = s @ y, s @ s
        alpha = jnp.where(sy > 0, ss / jnp.where(sy > 0, sy, 1.0), state.alpha)
        alpha = jnp.clip(alpha, min_alpha, max_alpha)
        return alpha * grads, BarzilaiBorweinState(params, grads, alpha)

    return optax.GradientTransformation(init_fn, update_fn)


def _pga_loop(prob: dual.Problem, lam0, tol, max_iter, max_lambda) -> _Loop:
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
        step=jnp.asarray(1.0, jnp.float32),
        radius=jnp.asarray(0.0, jnp.float32),
        opt_state=opt_state,
        updates=updates,
        done=_finished(lam0, ev0, prob, upper, tol),
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


def _solve(log_q, cons, tol, hardness, max_lambda, *, method, max_iter, factorise=True):
    prob = dual.make_problem(log_q, cons, hardness, factorise=factorise)
    lam0 = jnp.zeros(cons.a.shape[0], jnp.float32)
    loop = {"newton": _newton_loop, "pga": _pga_loop}[method]
    st = loop(prob, lam0, tol, max_iter, max_lambda)
    p, _ = dual._latent(st.lam, prob)
    value = st.ev.value_C  # s(P) at the final lambda, from the loop's last accepted evaluation
    gap, violation = dual.gap_and_violation(st.lam, value, prob)
    upper = _upper(prob, max_lambda)
    hard = jnp.isinf(prob.beta_C)
    at_cap = hard & (st.lam >= 0.5 * max_lambda) & (prob.b_C - value > tol)
    valid = _inputs_valid(log_q, cons, tol, hardness, max_lambda)
    feasible = ~(jnp.any(at_cap) | _infeasible(st.lam, prob, tol)) & valid
    converged = _converged(st.lam, st.ev, prob, upper, tol) & feasible
    info = SolveInfo(
        iterations=st.it,
        max_violation=violation,
        gap=gap,
        converged=converged,
        feasible=feasible,
        primal=st.ev.g + gap,
        dual=st.ev.g,
    )
    return Solution(lam=st.lam, p=p.reshape(log_q.shape), info=info)


def _inputs_valid(log_q, cons: LinearConstraints, tol, hardness, max_lambda) -> Array:
    """False when an input is outside its domain, e.g. traced under ``jit``, where nothing can
    raise: NaN or +inf in ``log_q``, non-finite ``a``, ``b`` or weights, ``beta`` < 0 or NaN,
    no allowed label, ``tol`` < 0 or NaN, hardness or ``max_lambda`` not finite and > 0. Such a
    solve reports ``feasible = converged = False``, so a NaN never passes for a success."""

    def finite(x):
        return jnp.all(jnp.isfinite(x))

    def positive(x):
        return jnp.isfinite(x) & (x > 0)

    checks = [
        ~jnp.any(jnp.isnan(log_q) | (log_q == jnp.inf)),
        finite(cons.a),
        finite(cons.b),
        jnp.all(cons.beta >= 0),  # False for NaN; inf = hard
        jnp.any(cons.mask),
        positive(hardness),
        tol >= 0,
        positive(max_lambda),
    ]
    if cons.weights is not None:
        checks.append(finite(cons.weights))
    return jnp.all(jnp.stack(checks))


@functools.partial(jax.jit, static_argnames=("method", "max_iter"))
def _solve_jit(log_q, cons, tol, hardness, max_lambda, *, method, max_iter):
    return _solve(log_q, cons, tol, hardness, max_lambda, method=method, max_iter=max_iter)


@functools.partial(jax.jit, static_argnames=("method", "max_iter", "sequential"))
def _solve_batch_jit(log_q, cons, tol, hardness, max_lambda, *, method, max_iter, sequential):
    fn = functools.partial(_solve, method=method, max_iter=max_iter, factorise=sequential)
    if sequential:
        return jax.lax.map(lambda x: fn(*x, tol, hardness, max_lambda), (log_q, cons))
    return jax.vmap(fn, in_axes=(0, 0, None, None, None))(log_q, cons, tol, hardness, max_lambda)


def _is_concrete(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array) and not isinstance(x, jax.core.Tracer)


def _check(log_q, cons: LinearConstraints, method, batched: bool) -> None:
    """Eager validation at the API boundary; skipped for traced arguments."""
    if method not in _DEFAULT_MAX_ITER:
        raise ValueError(f"solve: method must be 'newton' or 'pga', got {method!r}")
    lead = 1 if batched else 0
    if cons.a.ndim != 2 + lead:
        want = "(B, C, K)" if batched else "(C, K)"
        raise ValueError(f"cons.a must have shape {want}, got {cons.a.shape}")
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
    if _is_concrete(log_q):
        with jax.ensure_compile_time_eval():  # a constant inside a jit trace: still eager
            bad = bool(jnp.any(jnp.isnan(log_q) | (log_q == jnp.inf)))  # reduced on device
        if bad:
            raise ValueError(
                "log_q contains NaN or +inf; expected finite logits or "
                "log-probabilities (-inf allowed for q = 0)"
            )


def _check_arguments(log_q, cons: LinearConstraints, tol, max_iter, hardness, max_lambda):
    """Eager checks of the arguments beside the constraints' own (one line naming the argument
    and its range); a traced value is left to :func:`_inputs_valid`."""
    if not isinstance(log_q, np.ndarray | jax.Array):
        raise ValueError(
            f"solve: log_q must be a numpy or jax array of shape (*pixels, K), got "
            f"{type(log_q).__name__}"
        )
    if cons.a.shape[-2] == 0:
        raise ValueError(
            "solve: cons has C = 0 rows; at least one is needed (an inert row is a = 0, b = 0)"
        )
    if max_iter is not None and not (
        isinstance(max_iter, int | np.integer) and not isinstance(max_iter, bool) and max_iter >= 1
    ):
        raise ValueError(f"solve: max_iter must be an integer >= 1 or None, got {max_iter!r}")
    for name, value, allowed in (
        ("tol", tol, ">= 0"),
        ("hardness", hardness, "finite and > 0"),
        ("max_lambda", max_lambda, "finite and > 0"),
    ):
        if isinstance(value, jax.core.Tracer):
            continue
        v = np.asarray(value)
        if v.shape != () or not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"solve: {name} must be a real scalar, got {value!r}")
        ok = v >= 0 if name == "tol" else np.isfinite(v) and v > 0
        if not ok:
            raise ValueError(f"solve: {name} must be {allowed}, got {value!r}")


def solve(
    log_q: Array,
    cons: LinearConstraints,
    *,
    method: str = "newton",
    tol: float = 1e-6,
    max_iter: int | None = None,
    hardness: float = 1.0,
    max_lambda: float = 1e6,
) -> Solution:
    r"""Finds the P closest to Q in KL under ``cons``, by maximising the concave dual on its box.

    .. math::

        \max_{0 \le \lambda \le \beta}\ g(\lambda), \qquad
        P_i = \mathrm{softmax}_{mask}\big(s\,(f_i + A_i^\top\lambda)\big).

    Args:
      log_q: (*pixels, K) log-probabilities or logits of one image, e.g. (H, W, K) or (N, K).
      cons: ``LinearConstraints`` over K labels (weights, if any, shaped (C, *pixels)).
      method: ``"newton"`` (projected Newton, default) or ``"pga"`` (projected gradient with
        Barzilai-Borwein steps, written with optax).
      tol: KKT-residual tolerance (in fractions of the image) and relative-gap tolerance.
      max_iter: evaluations of the dual at most (default 100 for newton, 2000 for pga).
      hardness: inverse temperature s (1 = KL; CCNN used 1000 with size constraints).
      max_lambda: cap on hard-row multipliers; reaching it while violated means infeasible.

    Returns:
      ``Solution(lam, p, info)``. jit- and vmap-able (``method``/``max_iter`` are static); for a
      batch prefer :func:`solve_batch`: under ``vmap`` the factorised latent's branch runs on
      both sides.
    """
    _check_arguments(log_q, cons, tol, max_iter, hardness, max_lambda)
    _check(log_q, cons, method, batched=False)
    max_iter = max_iter or _DEFAULT_MAX_ITER[method]
    return _solve_jit(log_q, cons, tol, hardness, max_lambda, method=method, max_iter=max_iter)


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
) -> Solution:
    """``solve`` mapped over a leading image axis of ``log_q`` and of every field of ``cons``.

    ``sequential=False`` vmaps: the images run in lockstep, so each costs the batch's largest
    iteration count, which suits accelerators. ``sequential=True`` solves one image after the
    other (``lax.map``): each stops at its own iteration count and the factorised latent of
    :func:`ccnn_jax.dual.make_problem` applies, which is faster on a CPU, whose cores are
    already kept busy by one image's N x K arrays. ``None`` (default): sequential on the CPU
    backend, vmapped elsewhere. The results agree to float32 rounding.
    """
    _check_arguments(log_q, cons, tol, max_iter, hardness, max_lambda)
    _check(log_q, cons, method, batched=True)
    max_iter = max_iter or _DEFAULT_MAX_ITER[method]
    if sequential is None:
        sequential = jax.default_backend() == "cpu"
    return _solve_batch_jit(
        log_q,
        cons,
        tol,
        hardness,
        max_lambda,
        method=method,
        max_iter=max_iter,
        sequential=bool(sequential),
    )
