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


def cvxpy_cached(cache_dir, log_q, cons, hardness: float = 1.0):
    """:func:`cvxpy_primal`'s P, cached in ``cache_dir`` by a hash of its inputs (None: no
    cache). Returns ``(P (N, K), seconds of the solve that made it, whether it was cached)``."""
    import hashlib
    import os
    import time

    h = hashlib.sha256()
    for x in (log_q, cons.a, cons.b, cons.beta, cons.mask, np.float64(hardness)):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(str((x.dtype, x.shape)).encode())
        h.update(x.tobytes())
    path = None if cache_dir is None else os.path.join(cache_dir, f"{h.hexdigest()[:24]}.npz")
    if path is not None and os.path.exists(path):
        with np.load(path) as f:
            return f["p"], float(f["seconds"]), True
    t0 = time.perf_counter()
    p, _ = cvxpy_primal(log_q, cons, hardness)
    seconds = time.perf_counter() - t0
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = os.path.join(cache_dir, f".{os.path.basename(path)}.tmp.npz")
        np.savez(tmp, p=p, seconds=seconds)
        os.replace(tmp, path)
    return p, seconds, False


def compare_with_cvxpy(
    log_q_BxHxWxK,
    cons_B,
    valid_B,
    *,
    images: int,
    max_side: int,
    solver_kwargs: dict,
    cache_dir=None,
) -> dict:
    """``ccnn_jax.solve`` against :func:`cvxpy_primal` on the first ``images`` valid images of a
    batch (their top-left ``max_side`` crops): time per image and the largest |P difference|.

    ``cons_B`` are the batch's constraints (leading axis B); ours is timed as the median of three
    solves after a compiling one; CVXPY's P and time are cached in ``cache_dir``.
    """
    import time

    import jax

    from ccnn_jax import solve

    index = [i for i in range(len(valid_B)) if valid_B[i] > 0][:images]
    if len(index) < images:
        raise ValueError(f"images = {images} exceeds the {len(index)} valid images of the batch")
    ours_s, cvx_s, diffs, cached = [], [], [], []
    for i in index:
        log_q = jax.numpy.asarray(log_q_BxHxWxK[i, :max_side, :max_side])
        cons = jax.tree.map(lambda x, i=i: x[i], cons_B)
        jax.block_until_ready(solve(log_q, cons, **solver_kwargs))  # compile
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sol = jax.block_until_ready(solve(log_q, cons, **solver_kwargs))
            times.append(time.perf_counter() - t0)
        p_cvx, seconds, was_cached = cvxpy_cached(cache_dir, np.asarray(log_q), cons)
        k = log_q.shape[-1]
        diffs.append(float(np.abs(np.asarray(sol.p, np.float64).reshape(-1, k) - p_cvx).max()))
        ours_s.append(float(np.median(times)))
        cvx_s.append(seconds)
        cached.append(was_cached)
    h, w = log_q_BxHxWxK.shape[1:3]
    return {
        "images": len(index),
        "image_size": [min(h, max_side), min(w, max_side)],
        "cvxpy_seconds_per_image": float(np.mean(cvx_s)),
        "ours_single_ms_per_image": 1e3 * float(np.mean(ours_s)),
        "speedup_single": float(np.mean(cvx_s) / np.mean(ours_s)),
        "max_abs_diff_p": float(max(diffs)),
        "cvxpy_cached": all(cached),
    }
