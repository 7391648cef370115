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

Evaluation (internal, :func:`evaluate`). With :math:`m_i = \max_{l \in mask} s f_{il}` and
:math:`h_{il} = s f_{il} - m_i \le 0`, the per-pixel term is
:math:`m_i + \operatorname{lse}_l(h_{il} + s (A_i^\top\lambda)_l)`; the :math:`m_i` do not
depend on :math:`\lambda` and are folded into one constant, so differences of g between two
:math:`\lambda` carry no rounding from them.
Without pixel weights the shift :math:`\mu = s\, a^\top\lambda` is the same for every pixel, and
with :math:`E = \exp(h)` (N x K, computed once) and :math:`u = \exp(\mu - \max\mu)`

.. math::

    d = E u, \qquad P = \mathrm{diag}(d^{-1})\, E\, \mathrm{diag}(u), \qquad
    \bar P = \frac1N\, u \odot (E^\top d^{-1}),

so an evaluation costs one matrix-vector product, one elementwise product (for the K x K Gram
product :math:`P^\top P` of the Hessian; without it, a second matrix-vector product) and no
exponential over N x K. The factorisation is exact while the shifts span at most
:data:`FACTOR_SPAN` nats; beyond, the direct exponential is used.
Labels a problem masks can be dropped before solving (``make_problem(keep=...)``), so that an
image with 3 allowed labels out of 21 costs 3 columns per evaluation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccnn_jax.constraints import LinearConstraints

Array = jax.Array

#: Finite floor for scores, so that -inf log-probabilities (q = 0) stay NaN-free.
LOG_FLOOR = -1e15

#: Largest spread of the label shifts s (A^T lambda)_l (over allowed labels) at which the
#: factorised latent is exact: a factor exp(h_il) that underflowed (< e^-87) then stays below
#: e^-27 of the pixel's largest term, and the normaliser stays above e^-60.
FACTOR_SPAN = 60.0


def working_dtype(x) -> np.dtype:
    """float64 for float64 scores (with ``jax_enable_x64``), float32 for anything else."""
    return np.dtype(np.float64) if jnp.result_type(x) == np.float64 else np.dtype(np.float32)


class Problem(NamedTuple):
    """One image's problem in flat form (internal): pixels flattened to N, labels maybe kept.

    ``h_NxK`` is :math:`s f - m` on allowed labels (``-inf`` on masked ones); ``e0_NxK`` is
    :math:`\\exp(h)` (factorised form only, without pixel weights); ``offset`` is the constant
    :math:`\\frac{1}{sN}\\sum_i (m_i - \\operatorname{lse}_l s f_{il})` of g. ``labels_K`` are the
    original indices of the kept columns (None: all K, in order). ``scores_ok`` is False when
    ``log_q`` held NaN or +inf (or ``s f`` overflowed); the arrays are then made finite.
    """

    h_NxK: Array
    e0_NxK: Array | None
    offset: Array
    a_CxK: Array
    b_C: Array
    beta_C: Array
    mask_K: Array
    w_CxN: Array | None
    hardness: Array
    labels_K: Array | None = None
    scores_ok: Array | bool = True


class DualEval(NamedTuple):
    """The dual and its derivatives at one lambda (internal)."""

    g: Array  # scalar dual value
    grad_C: Array  # b - s(P)
    value_C: Array  # s(P), the constraint values
    neg_hess_CxC: Array | None  # -Hessian, PSD
    logz_N: Array  # lse_l(h_i + s shift_il) / s: g = lam . b - mean(logz) - offset


class Certificate(NamedTuple):
    """Primal value of P(lambda) (with slack penalties), dual value, their gap, hard violation."""

    primal: Array
    dual: Array
    gap: Array
    max_violation: Array


def kept_labels(mask_K: Array, keep: int) -> Array:
    """The first ``keep`` labels with allowed ones first (in label order), then masked ones."""
    return jnp.argsort(~mask_K.astype(bool), stable=True)[:keep]


def make_problem(
    log_q: Array,
    cons: LinearConstraints,
    hardness=1.0,
    factorise: bool = False,
    keep: int | None = None,
    with_offset: bool = True,
) -> Problem:
    """Flattens ``log_q`` (*pixels, K) and ``cons.weights`` (C, *pixels) to N pixels.

    Args:
      factorise: (no weights only) also store :math:`E = \\exp(h)`, so that an evaluation needs
        no exponential over N x K (see the module doc). :func:`evaluate` then branches with
        ``lax.cond``, which pays off only where it is not vmapped (under ``vmap`` both run).
      keep: keep only ``keep`` label columns, the allowed ones first (:func:`kept_labels`);
        exact when at most ``keep`` labels are allowed (the solver picks it so). P over the
        kept columns goes back to K labels with ``labels_K``.
      with_offset: compute g's constant ``offset`` in full and ``scores_ok`` (an exponential
        pass over all N x K scores); without, ``offset`` omits its lse term (it is
        :math:`\frac{1}{sN}\\sum_i m_i`, so g is short by :math:`\frac{1}{sN}\\sum_i
        \\operatorname{lse}_l s f_{il}`, see :func:`mask_cost`) and ``scores_ok`` is True;
        neither the differences nor the derivatives of g in lambda change.
    """
    k = log_q.shape[-1]
    dtype = working_dtype(log_q)
    s = jnp.asarray(hardness, dtype)
    raw_NxK = log_q.reshape(-1, k).astype(dtype)
    scores_ok = True
    if with_offset:
        # lse over every label of s f: NaN or +inf anywhere makes it non-finite (the flag)
        lse0_N = jax.nn.logsumexp(s * jnp.maximum(raw_NxK, LOG_FLOOR), axis=-1)
        scores_ok = jnp.all(jnp.isfinite(lse0_N))
    mask = cons.mask.astype(bool)
    a = cons.a.astype(dtype)
    labels = None
    if keep is not None and keep < k:
        labels = kept_labels(mask, keep)
        raw_NxK, a, mask = jnp.take(raw_NxK, labels, axis=1), a[:, labels], mask[labels]
    f = jnp.nan_to_num(raw_NxK, nan=LOG_FLOOR, posinf=-LOG_FLOOR, neginf=LOG_FLOOR)
    z = jnp.where(mask, s * jnp.maximum(f, LOG_FLOOR), -jnp.inf)
    m = jnp.max(z, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    h = z - m[:, None]
    w = None if cons.weights is None else cons.weights.reshape(cons.a.shape[0], -1).astype(dtype)
    offset = jnp.mean(m) / s
    if with_offset:
        offset = jnp.where(scores_ok, jnp.mean(m - lse0_N) / s, 0.0)
    return Problem(
        h_NxK=h,
        e0_NxK=jnp.exp(h) if factorise and w is None else None,
        offset=offset,
        a_CxK=a,
        b_C=cons.b.astype(dtype),
        beta_C=cons.beta.astype(dtype),
        mask_K=mask,
        w_CxN=w,
        hardness=s,
        labels_K=labels,
        scores_ok=scores_ok,
    )


def mask_cost(log_q: Array, hardness) -> tuple[Array, Array]:
    r"""The part of g's constant that ``make_problem(with_offset=False)`` leaves out,
    :math:`\frac{1}{sN}\sum_i \operatorname{lse}_l s f_{il}` over all K labels, and whether it
    is finite (``log_q`` holds no NaN or +inf, and ``s f`` does not overflow)."""
    k = log_q.shape[-1]
    raw_NxK = log_q.reshape(-1, k).astype(working_dtype(log_q))
    lse0_N = jax.nn.logsumexp(hardness * jnp.maximum(raw_NxK, LOG_FLOOR), axis=-1)
    ok = jnp.all(jnp.isfinite(lse0_N))
    return jnp.where(ok, jnp.mean(lse0_N) / hardness, 0.0), ok


def scatter_labels(p_NxKk: Array, prob: Problem, k: int) -> Array:
    """P over the kept columns -> (N, k) over all labels (0 on the labels not kept)."""
    if prob.labels_K is None:
        return p_NxKk
    keep = prob.labels_K.shape[0]
    position_K = jnp.zeros(k, jnp.int32).at[prob.labels_K].set(jnp.arange(keep, dtype=jnp.int32))
    kept_K = jnp.zeros(k, bool).at[prob.labels_K].set(prob.mask_K)
    return jnp.where(kept_K, jnp.take(p_NxKk, position_K, axis=1), 0.0)


def _shift(lam_C: Array, prob: Problem) -> Array:
    """sum_c lambda_c w_c(i) a_c: (K,) without weights, (N, K) with."""
    if prob.w_CxN is None:
        return lam_C @ prob.a_CxK
    return (prob.w_CxN.T * lam_C) @ prob.a_CxK


def _span(shift_K: Array, prob: Problem) -> tuple[Array, Array]:
    """Largest allowed s * shift and the spread of the allowed ones."""
    top = jnp.max(jnp.where(prob.mask_K, shift_K, -jnp.inf))
    return top, top - jnp.min(jnp.where(prob.mask_K, shift_K, jnp.inf))


def _exact(lam_C: Array, prob: Problem) -> tuple[Array, Array]:
    """P (N, K) and logz (N,) with one exponential per pixel and label (any shifts, weights).

    P is normalised by the sum of the exponentials, so it sums to 1 to rounding at any scale.
    """
    z = prob.h_NxK + prob.hardness * _shift(lam_C, prob)
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, (top + jnp.log(total))[:, 0] / prob.hardness


def _factors(lam_C: Array, prob: Problem):
    """u = exp(s shift - top) (0 on masked labels), d = E u, top and the shifts' span."""
    shift_K = prob.hardness * _shift(lam_C, prob)
    top, span = _span(shift_K, prob)
    u_K = jnp.where(prob.mask_K, jnp.exp(shift_K - top), 0.0)
    return u_K, prob.e0_NxK @ u_K, top, span


def latent(lam_C: Array, prob: Problem) -> Array:
    """P (N, K') over the problem's columns: softmax_mask(h_i + s A_i^T lambda)."""
    if prob.e0_NxK is None:
        return _exact(lam_C, prob)[0]
    u_K, d_N, _, span = _factors(lam_C, prob)
    return jax.lax.cond(
        span <= FACTOR_SPAN,
        lambda: prob.e0_NxK * u_K / d_N[:, None],
        lambda: _exact(lam_C, prob)[0],
    )


def values(p_NxK: Array, prob: Problem) -> Array:
    """s(P) (C,): s_c = (1/N) sum_i w_c(i) a_c . P_i; without weights, a @ mean_i P_i."""
    if prob.w_CxN is None:
        return prob.a_CxK @ p_NxK.mean(axis=0)
    return jnp.mean((p_NxK @ prob.a_CxK.T) * prob.w_CxN.T, axis=0)


def _laplacian_hessian(cooccur_KxK: Array, a_CxK: Array, hardness: Array) -> Array:
    """s a L a^T with L the Laplacian of the off-diagonal co-occurrences (see neg_hessian)."""
    k = cooccur_KxK.shape[0]
    off_KxK = jnp.where(jnp.eye(k, dtype=bool), 0.0, cooccur_KxK)
    laplacian_KxK = jnp.diag(off_KxK.sum(axis=1)) - off_KxK
    neg_hess = hardness * (a_CxK @ laplacian_KxK @ a_CxK.T)
    return 0.5 * (neg_hess + neg_hess.T)


def neg_hessian(p_NxK: Array, a_CxK: Array, w_CxN: Array | None, hardness) -> Array:
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
    a = a_CxK
    if w_CxN is None:
        return _laplacian_hessian(p_NxK.T @ p_NxK / n, a, hardness)
    w = w_CxN
    mode = jax.nn.one_hot(jnp.argmax(p_NxK, axis=-1), k, dtype=p_NxK.dtype)
    p_off = p_NxK * (1.0 - mode)
    p_centred = p_off - mode * p_off.sum(-1, keepdims=True)  # sums to 0, exact off the mode
    u = (p_centred @ a.T) * w.T
    centred_NxCxK = w.T[:, :, None] * (a[None] - (mode @ a.T)[:, :, None])
    first = jnp.einsum("icl,il,idl->cd", centred_NxCxK, p_off, centred_NxCxK)
    neg_hess = hardness * (first - u.T @ u) / n
    return 0.5 * (neg_hess + neg_hess.T)


def _dual_eval(lam_C, prob, value_C, logz_N, hess) -> DualEval:
    return DualEval(
        g=lam_C @ prob.b_C - jnp.mean(logz_N) - prob.offset,
        grad_C=prob.b_C - value_C,
        value_C=value_C,
        neg_hess_CxC=hess,
        logz_N=logz_N,
    )


def _evaluate_exact(lam_C: Array, prob: Problem, with_hessian: bool) -> DualEval:
    p, logz = _exact(lam_C, prob)
    hess = neg_hessian(p, prob.a_CxK, prob.w_CxN, prob.hardness) if with_hessian else None
    return _dual_eval(lam_C, prob, values(p, prob), logz, hess)


def evaluate(lam_C: Array, prob: Problem, with_hessian: bool = True) -> DualEval:
    """g(lambda), its gradient b - s(P), s(P) and (optionally) -Hessian, in one pass over pixels.

    In factorised form (see the module doc): d = E u, then P = E u / d for the Gram product,
    or :math:`E^\\top d^{-1}` alone without the Hessian.
    """
    if prob.e0_NxK is None:
        return _evaluate_exact(lam_C, prob, with_hessian)
    u_K, d_N, top, span = _factors(lam_C, prob)

    def factorised():
        n = d_N.shape[0]
        logz = (top + jnp.log(d_N)) / prob.hardness
        if not with_hessian:
            pbar_K = u_K * ((1.0 / d_N) @ prob.e0_NxK) / n
            return _dual_eval(lam_C, prob, prob.a_CxK @ pbar_K, logz, None)
        # The Gram product needs P itself: diag(u) E^T diag(d^-2) E diag(u) would overflow
        # float32 (d^-2 reaches e^120 at the span limit).
        p = prob.e0_NxK * u_K / d_N[:, None]
        hess = _laplacian_hessian(p.T @ p / n, prob.a_CxK, prob.hardness)
        return _dual_eval(lam_C, prob, prob.a_CxK @ p.mean(axis=0), logz, hess)

    return jax.lax.cond(
        span <= FACTOR_SPAN, factorised, lambda: _evaluate_exact(lam_C, prob, with_hessian)
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


class Finish(NamedTuple):
    """What a solve reports at its final lambda (see :func:`finish`)."""

    p: Array  # P, shaped like log_q
    value_C: Array  # s(P)
    g: Array  # g(lambda)
    scores_ok: Array  # log_q had no NaN / +inf


def finish(lam_C: Array, log_q: Array, cons: LinearConstraints, hardness=1.0) -> Finish:
    """P on all K labels, s(P) and g(lambda) in one exponential pass (and one more for the
    constant of g, skipped by XLA when g is not used); differentiable in every argument."""
    prob = make_problem(log_q, cons, hardness)
    p, logz = _exact(lam_C, prob)
    return Finish(
        p=p.reshape(log_q.shape),
        value_C=values(p, prob),
        g=lam_C @ prob.b_C - jnp.mean(logz) - prob.offset,
        scores_ok=prob.scores_ok,
    )


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
    return latent(lam, make_problem(log_q, cons, hardness)).reshape(log_q.shape)


@jax.jit
def certificate(lam: Array, log_q: Array, cons: LinearConstraints, hardness=1.0) -> Certificate:
    """Primal value of P(lambda) incl. slack penalties, dual value g(lambda), gap, hard violation.

    ``primal`` is computed from its definition (mean KL plus penalties), independently of the
    closed-form ``gap``; the two agree up to rounding.
    """
    prob = make_problem(log_q, cons, hardness)
    ev = evaluate(lam, prob, with_hessian=False)
    p = latent(lam, prob)
    s = prob.hardness
    k = log_q.shape[-1]
    f = jnp.maximum(log_q.reshape(-1, k).astype(p.dtype), LOG_FLOOR)
    lse0 = jax.nn.logsumexp(s * f, axis=-1)
    # (1/s) KL(P_i || Q^s_i) = sum_l P_il (log P_il / s - f_il) + lse0_i / s, with masked P = 0.
    log_p = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    kl = jnp.sum(p * (log_p / s - f), axis=-1) + lse0 / s
    hard = jnp.isinf(prob.beta_C)
    shortfall = jnp.maximum(prob.b_C - ev.value_C, 0.0)
    primal = jnp.mean(kl) + jnp.sum(jnp.where(hard, 0.0, prob.beta_C * shortfall))
    gap, violation = gap_and_violation(lam, ev.value_C, prob)
    return Certificate(primal=primal, dual=ev.g, gap=gap, max_violation=violation)
