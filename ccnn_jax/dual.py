r"""The dual of CCNN's constrained latent problem, the latent distribution, and a certificate.

For one image with N pixels, scores ``f = log_q`` (N, K) (log-probabilities or logits), hardness
s (an inverse temperature, 1 by default) and constraints ``(a, b, beta, mask, w)``, the primal is

.. math::

    \min_{P,\ \xi \ge 0}\ \frac{1}{N}\sum_i \frac{1}{s}\,\mathrm{KL}\big(P_i \,\|\, Q^s_i\big)
    + \beta^\top \xi
    \quad\text{s.t.}\quad s_c(P) = \frac1N\sum_i w_c(i)\, a_c^\top P_i \ge b_c - \xi_c,
    \quad P_i(l) = 0 \text{ for masked } l,

with :math:`Q^s_i = \mathrm{softmax}(s f_i)` (Q itself for s = 1). Its dual, concave over the box
:math:`0 \le \lambda \le \beta`, is

.. math::

    g(\lambda) = \lambda^\top b - \frac1N \sum_i \frac1s \Big(
        \operatorname{lse}_{l \in mask}\big(s (f_i + A_i^\top\lambda)\big)
        - \operatorname{lse}_l (s f_i) \Big),
    \qquad A_i = \mathrm{diag}(w(i))\, a,

maximised by :math:`P_i = \mathrm{softmax}_{mask}(s (f_i + A_i^\top \lambda))`, with
:math:`\nabla g = b - s(P)` and :math:`-\nabla^2 g = \frac{s}{N}\sum_i A_i(\mathrm{diag} P_i -
P_i P_i^\top)A_i^\top`. The second lse makes g(0) the cost of the mask alone and makes
everything invariant to adding a per-pixel constant to ``f`` (DESIGN.md's g omits it; it is a
constant). At any :math:`\lambda` in the box the duality gap of :math:`P(\lambda)` is exactly

.. math::

    \mathrm{primal}(P(\lambda)) - g(\lambda) = \sum_c \lambda_c (s_c - b_c)
        + \sum_{c\ \mathrm{soft}} \beta_c\, (b_c - s_c)_+ ,

which is >= 0 once the hard rows hold, and 0 exactly at the optimum.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ccnn_jax.constraints import LinearConstraints

Array = jax.Array

#: Finite floor for scores, so that -inf log-probabilities (q = 0) stay NaN-free.
LOG_FLOOR = -1e15

#: Largest spread of the label shifts s (A^T lambda)_l (over allowed labels) at which the
#: factorised latent is exact: a factor exp(s f_il - m_i) that underflowed (< e^-87) then
#: stays below e^-27 of the pixel's largest term, and the normaliser stays above e^-60.
FACTOR_SPAN = 60.0


class Problem(NamedTuple):
    """One image's problem in flat form (internal): pixels flattened to N."""

    f_NxK: Array  # scores, floored at LOG_FLOOR
    lse0_N: Array  # lse_l(s f_i), the normaliser of Q^s
    a_CxK: Array
    b_C: Array
    beta_C: Array
    mask_K: Array
    w_CxN: Array | None
    hardness: Array
    # Factorised form (no weights only): exp(s f_il - m_i) (0 on masked labels) and m_i, the
    # largest allowed s f_il, so that P(lambda) needs no exponential over N x K.
    e0_NxK: Array | None = None
    m_N: Array | None = None


class DualEval(NamedTuple):
    """The dual and its derivatives at one lambda (internal)."""

    g: Array  # scalar dual value
    grad_C: Array  # b - s(P)
    value_C: Array  # s(P), the constraint values
    neg_hess_CxC: Array | None  # -Hessian, PSD
    logz_N: Array  # (lse_mask(s (f_i + A_i^T lam)) - lse(s f_i)) / s; g = lam . b - mean(logz)


class Certificate(NamedTuple):
    """Primal value of P(lambda) (with slack penalties), dual value, their gap, hard violation."""

    primal: Array
    dual: Array
    gap: Array
    max_violation: Array


def make_problem(
    log_q: Array, cons: LinearConstraints, hardness=1.0, factorise: bool = False
) -> Problem:
    """Flattens ``log_q`` (*pixels, K) and ``cons.weights`` (C, *pixels) to N pixels.

    ``factorise`` (no weights only) also stores exp(s f_il - m_i), with which :func:`_latent`
    skips the N x K exponential whenever the label shifts span at most :data:`FACTOR_SPAN`. It
    branches with ``lax.cond``, so it pays off only where that is not vmapped (under ``vmap``
    both branches run).
    """
    k = log_q.shape[-1]
    s = jnp.asarray(hardness, jnp.float32)
    f = jnp.maximum(log_q.reshape(-1, k).astype(jnp.float32), LOG_FLOOR)
    w = None if cons.weights is None else cons.weights.reshape(cons.a.shape[0], -1)
    mask = cons.mask.astype(bool)
    e0 = m = None
    if factorise and w is None:
        z0 = jnp.where(mask, s * f, -jnp.inf)
        m = jnp.max(z0, axis=-1)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e0 = jnp.exp(z0 - m[:, None])
    return Problem(
        f_NxK=f,
        lse0_N=jax.nn.logsumexp(s * f, axis=-1),
        a_CxK=cons.a.astype(jnp.float32),
        b_C=cons.b.astype(jnp.float32),
        beta_C=cons.beta.astype(jnp.float32),
        mask_K=mask,
        w_CxN=None if w is None else w.astype(jnp.float32),
        hardness=s,
        e0_NxK=e0,
        m_N=m,
    )


def _shift(lam_C: Array, prob: Problem) -> Array:
    """sum_c lambda_c w_c(i) a_c: (K,) without weights, (N, K) with."""
    if prob.w_CxN is None:
        return lam_C @ prob.a_CxK
    return (prob.w_CxN.T * lam_C) @ prob.a_CxK


def _latent(lam_C: Array, prob: Problem) -> tuple[Array, Array]:
    """P (N, K) and lse_mask(s (f + A^T lam)) (N,). P is normalised by the sum of the
    exponentials, not by exp(-lse), so it sums to 1 to float32 precision at any scale."""
    if prob.e0_NxK is None:
        return _latent_exact(lam_C, prob)
    shift_K = prob.hardness * _shift(lam_C, prob)
    top = jnp.max(jnp.where(prob.mask_K, shift_K, -jnp.inf))
    span = top - jnp.min(jnp.where(prob.mask_K, shift_K, jnp.inf))
    return jax.lax.cond(
        span <= FACTOR_SPAN,
        lambda: _latent_factorised(shift_K, top, prob),
        lambda: _latent_exact(lam_C, prob),
    )


def _latent_factorised(shift_K: Array, top: Array, prob: Problem) -> tuple[Array, Array]:
    """As :func:`_latent` from exp(s f_il - m_i) * exp(shift_l - top): K exponentials, where
    shift = s A^T lam and top its largest allowed entry."""
    e = prob.e0_NxK * jnp.where(prob.mask_K, jnp.exp(shift_K - top), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, prob.m_N + top + jnp.log(total[:, 0])


def _latent_exact(lam_C: Array, prob: Problem) -> tuple[Array, Array]:
    """As :func:`_latent`, with one exponential per pixel and label (any shifts, any weights)."""
    z = prob.hardness * (prob.f_NxK + _shift(lam_C, prob))
    z = jnp.where(prob.mask_K, z, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, (top + jnp.log(total))[:, 0]


def _values(p_NxK: Array, prob: Problem) -> Array:
    """s(P) (C,): s_c = (1/N) sum_i w_c(i) a_c . P_i; without weights, a @ mean_i P_i."""
    if prob.w_CxN is None:
        return prob.a_CxK @ p_NxK.mean(axis=0)
    return jnp.mean((p_NxK @ prob.a_CxK.T) * prob.w_CxN.T, axis=0)


def _neg_hessian(p_NxK: Array, prob: Problem) -> Array:
    r"""(s/N) sum_i A_i (diag P_i - P_i P_i^T) A_i^T, PSD in float32.

    Without weights this is :math:`s\, a\, \Sigma\, a^\top` with the K x K label covariance
    :math:`\Sigma = \frac1N\sum_i (\mathrm{diag} P_i - P_i P_i^\top)`. Its rows sum to 0, so
    :math:`\Sigma` is the Laplacian of the co-occurrence weights
    :math:`O_{lm} = \frac1N\sum_i P_{il} P_{im}` (l != m): the diagonal is taken as the row sums
    of O rather than :math:`\bar P_l - O_{ll}`, a difference of two O(1) numbers when P is nearly
    one-hot (large logits or hardness). The result is PSD to rounding, costs one K x N x K
    product, and forms nothing of size N x C.

    With weights, each pixel's covariance is centred on its most likely label m_i,
    :math:`\sum_l P_{il} (a_l - a_{m_i})(a_l - a_{m_i})^\top - \tilde u_i \tilde u_i^\top` with
    :math:`\tilde u_i = \sum_l P_{il}(a_l - a_{m_i})` (an N x C x K product).
    """
    n, k = p_NxK.shape
    a = prob.a_CxK
    if prob.w_CxN is None:
        cooccur_KxK = jnp.where(jnp.eye(k, dtype=bool), 0.0, p_NxK.T @ p_NxK / n)
        laplacian_KxK = jnp.diag(cooccur_KxK.sum(axis=1)) - cooccur_KxK
        neg_hess = prob.hardness * (a @ laplacian_KxK @ a.T)
    else:
        w = prob.w_CxN
        mode = jax.nn.one_hot(jnp.argmax(p_NxK, axis=-1), k, dtype=p_NxK.dtype)
        p_off = p_NxK * (1.0 - mode)
        p_centred = p_off - mode * p_off.sum(-1, keepdims=True)  # sums to 0, exact off the mode
        u = (p_centred @ a.T) * w.T
        centred_NxCxK = w.T[:, :, None] * (a[None] - (mode @ a.T)[:, :, None])
        first = jnp.einsum("icl,il,idl->cd", centred_NxCxK, p_off, centred_NxCxK)
        neg_hess = prob.hardness * (first - u.T @ u) / n
    return 0.5 * (neg_hess + neg_hess.T)


def evaluate(lam_C: Array, prob: Problem, with_hessian: bool = True) -> DualEval:
    """g(lambda), its gradient b - s(P), s(P) and (optionally) -Hessian, in one pass over pixels."""
    p, lse = _latent(lam_C, prob)
    value = _values(p, prob)
    logz = (lse - prob.lse0_N) / prob.hardness
    hess = _neg_hessian(p, prob) if with_hessian else None
    return DualEval(
        g=lam_C @ prob.b_C - jnp.mean(logz),
        grad_C=prob.b_C - value,
        value_C=value,
        neg_hess_CxC=hess,
        logz_N=logz,
    )


def rise(new: DualEval, old: DualEval, lam_new: Array, lam_old: Array, prob: Problem) -> Array:
    """g(new) - g(old) from per-pixel differences: far less float32 cancellation than g - g."""
    return (lam_new - lam_old) @ prob.b_C - jnp.mean(new.logz_N - old.logz_N)


def gap_and_violation(lam_C: Array, value_C: Array, prob: Problem) -> tuple[Array, Array]:
    """Duality gap of P(lambda) (closed form, see module doc) and worst hard-row violation."""
    hard = jnp.isinf(prob.beta_C)
    shortfall = jnp.maximum(prob.b_C - value_C, 0.0)
    penalty = jnp.where(hard, 0.0, prob.beta_C * shortfall)
    gap = jnp.sum(lam_C * (value_C - prob.b_C) + penalty)
    return gap, jnp.max(jnp.where(hard, shortfall, 0.0))


def infeasibility_slope(lam_C: Array, prob: Problem) -> Array:
    r"""Farkas test: the slope of g along the hard-row part d of lambda, normalised by |d|_1.

    .. math:: g_\infty(d) = d^\top b - \frac1N \sum_i \max_{l \in mask} (A_i^\top d)_l

    If :math:`g_\infty(d) > 0` for some :math:`d \ge 0` on the hard rows, g grows without
    bound along d and the hard rows admit no P; for a feasible problem it is <= 0 for every d.
    """
    d = jnp.where(jnp.isinf(prob.beta_C), lam_C, 0.0)
    scores = _shift(d, prob)  # (K,) without weights: the same for every pixel
    top = jnp.max(jnp.where(prob.mask_K, scores, -jnp.inf), axis=-1)
    return (d @ prob.b_C - jnp.mean(top)) / (jnp.sum(d) + 1e-30)


@jax.jit
def dual_objective(lam: Array, log_q: Array, cons: LinearConstraints, hardness=1.0) -> Array:
    r"""The concave dual g(lambda) of one image (see the module docstring).

    Args:
      lam: (C,) multipliers, meaningful in the box ``0 <= lam <= beta``.
      log_q: (*pixels, K) log-probabilities or logits.
      cons: the image's ``LinearConstraints``.
      hardness: inverse temperature s.

    >>> import jax.numpy as jnp
    >>> from ccnn_jax import constraints
    >>> cons = constraints.foreground(jnp.array([0.0, 0.0]))
    >>> float(dual_objective(jnp.zeros(2), jnp.log(jnp.full((4, 2), 0.5)), cons))
    0.0
    """
    return evaluate(lam, make_problem(log_q, cons, hardness), with_hessian=False).g


@jax.jit
def latent_distribution(lam: Array, log_q: Array, cons: LinearConstraints, hardness=1.0) -> Array:
    r"""P_i = softmax_mask(s (f_i + A_i^T lambda)), same shape as ``log_q``; masked labels are 0."""
    p, _ = _latent(lam, make_problem(log_q, cons, hardness))
    return p.reshape(log_q.shape)


@jax.jit
def certificate(lam: Array, log_q: Array, cons: LinearConstraints, hardness=1.0) -> Certificate:
    """Primal value of P(lambda) incl. slack penalties, dual value g(lambda), gap, hard violation.

    ``primal`` is computed from its definition (mean KL plus penalties), independently of the
    closed-form ``gap``; the two agree up to rounding.
    """
    prob = make_problem(log_q, cons, hardness)
    p, lse = _latent(lam, prob)
    value = _values(p, prob)
    s = prob.hardness
    # (1/s) KL(P_i || Q^s_i) = sum_l P_il (log P_il / s - f_il) + lse0_i / s, with masked P = 0.
    log_p = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    kl = jnp.sum(p * (log_p / s - prob.f_NxK), axis=-1) + prob.lse0_N / s
    hard = jnp.isinf(prob.beta_C)
    shortfall = jnp.maximum(prob.b_C - value, 0.0)
    primal = jnp.mean(kl) + jnp.sum(jnp.where(hard, 0.0, prob.beta_C * shortfall))
    dual = lam @ prob.b_C - jnp.mean(lse - prob.lse0_N) / s
    gap, violation = gap_and_violation(lam, value, prob)
    return Certificate(primal=primal, dual=dual, gap=gap, max_violation=violation)
