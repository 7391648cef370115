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
branch runs outside ``vmap``; see ``solver_core._label_buckets``); a branch on fewer than K
columns also drops the rows that are zero on every allowed label with b <= 0 (their
multiplier is 0), keeping 2 keep + 2 rows (an image with more live rows takes a wider
branch); and on the CPU the loop evaluates the dual in factorised form (two matrix-vector
products and a K x K Gram product per evaluation, see :mod:`ccnn_jax.dual`).
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

import jax
import jax.numpy as jnp
import numpy as np

from ccnn_jax.constraints import LinearConstraints
from ccnn_jax.solver_core import Solution, SolveInfo, _solve_batch_jit, _solve_jit
from ccnn_jax.solver_loops import (
    _DEFAULT_MAX_ITER,
    BarzilaiBorweinState,
    scale_by_barzilai_borwein,
)

__all__ = [
    "BarzilaiBorweinState",
    "Solution",
    "SolveInfo",
    "scale_by_barzilai_borwein",
    "solve",
    "solve_batch",
]

Array = jax.Array


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
