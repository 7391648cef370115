r"""Reference solvers on the CPU, for tests and benchmarks: CVXPY on the primal, SciPy on the dual.

Both solve the same problem as :func:`ccnn_jax.solve` (see :mod:`ccnn_jax.dual`) in float64:

- :func:`cvxpy_primal`: :math:`\min_{P,\xi} \frac1N \sum_i \frac1s \mathrm{KL}(P_i\|Q^s_i) +
  \beta^\top\xi` with the rows, simplex and mask as explicit constraints (what the seed
  demonstration did), solved by Clarabel. Needs ``cvxpy`` and ``clarabel`` (the ``test`` extra).
- :func:`scipy_dual`: L-BFGS-B on :math:`-g(\lambda)` over the box, in numpy.
"""

from __future__ import annotations

import numpy as np


def _flat(log_q, cons, hardness):
    f = np.asarray(log_q, np.float64)
    k = f.shape[-1]
    f = np.maximum(f.reshape(-1, k), -1e15)
    a = np.asarray(cons.a, np.float64)
    w = cons.weights
    w = None if w is None else np.asarray(w, np.float64).reshape(a.shape[0], -1)
    mask = np.asarray(cons.mask, bool)
    sf = hardness * f
    log_qs = sf - _lse(sf)[:, None]
    return f, a, np.asarray(cons.b, np.float64), np.asarray(cons.beta, np.float64), mask, w, log_qs


def _lse(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def cvxpy_primal(log_q, cons, hardness: float = 1.0, solver: str = "CLARABEL"):
    """Solves the primal with CVXPY; returns ``(P (N, K) float64, optimal value)``."""
    import cvxpy as cp

    f, a, b, beta, mask, w, log_qs = _flat(log_q, cons, hardness)
    n, k = f.shape
    p = cp.Variable((n, k), nonneg=True)
    hard = np.isinf(beta)
    xi = cp.Variable(int((~hard).sum()), nonneg=True) if (~hard).any() else None
    # (1/s) KL(P || Q^s) = (1/s) sum [ -entr(P) - P log Q^s ]
    log_qs_safe = np.where(np.isfinite(log_qs), log_qs, -1e6)
    objective = (cp.sum(-cp.entr(p)) - cp.sum(cp.multiply(p, log_qs_safe))) / (n * hardness)
    rows = []
    for c in range(a.shape[0]):
        weights = np.ones(n) if w is None else w[c]
        rows.append(cp.sum(cp.multiply(weights[:, None] * a[c][None, :], p)) / n)
    constraints = [cp.sum(p, axis=1) == 1]
    if (~mask).any():
        constraints.append(p[:, ~mask] == 0)
    soft_idx = 0
    for c in range(a.shape[0]):
        if hard[c]:
            constraints.append(rows[c] >= b[c])
        else:
            constraints.append(rows[c] >= b[c] - xi[soft_idx])
            soft_idx += 1
    if xi is not None:
        objective = objective + beta[~hard] @ xi
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver=solver)
    return np.asarray(p.value), float(problem.value)


def scipy_dual(log_q, cons, hardness: float = 1.0, tol: float = 1e-10, max_lambda: float = 1e6):
    """Maximises the dual with SciPy's L-BFGS-B; returns ``(lam (C,), P (N, K))`` in float64."""
    from scipy.optimize import minimize

    f, a, b, beta, mask, w, _ = _flat(log_q, cons, hardness)
    s = hardness
    lse0 = _lse(s * f)

    def latent(lam):
        shift = lam @ a if w is None else (w.T * lam) @ a
        z = np.where(mask, s * (f + shift), -np.inf)
        lse = _lse(z)
        return np.exp(z - lse[:, None]), lse

    def neg_g(lam):
        p, lse = latent(lam)
        u = p @ a.T if w is None else (p @ a.T) * w.T
        g = lam @ b - np.mean(lse - lse0) / s
        return -g, -(b - u.mean(axis=0))

    bounds = [(0.0, min(bt, max_lambda)) for bt in beta]
    # ftol = 0: stop on the projected gradient only. The relative-reduction test stops early
    # (dual 1e-2 below the optimum) on near piecewise-linear duals (confident logits).
    res = minimize(
        neg_g,
        np.zeros(a.shape[0]),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"ftol": 0.0, "gtol": tol, "maxiter": 20000},
    )
    return res.x, latent(res.x)[0]
