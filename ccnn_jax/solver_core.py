"""One image's solve behind :func:`ccnn_jax.solvers.solve`: stand-ins for invalid traced inputs,
the loop on the kept label columns and live rows with its implicit-differentiation JVP, the
report (P, s(P), g and the certificate), and the dispatch over column buckets, jitted for one
image and for a batch. See :mod:`ccnn_jax.solvers` for the method and the derivative."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ccnn_jax import dual
from ccnn_jax.constraints import LinearConstraints
from ccnn_jax.solver_loops import _LOOPS, _converged, _eps, _infeasible, _upper

Array = jax.Array


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
