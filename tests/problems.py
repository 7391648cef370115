"""Random constrained-latent problems with fixed shapes, shared by the solver tests.

Every family returns ``(log_q (H, W, K) float32, LinearConstraints)`` with hard rows feasible
by construction, so a correct solver must reach a zero gap and zero hard violation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ccnn_jax import LinearConstraints, constraints

H, W, K = 12, 12, 6
N = H * W
FAMILIES = (
    "tags",
    "tags_size",
    "foreground_hard",
    "foreground_slack",
    "general",
    "box",
    "satisfied",
)


def logits(rng: np.random.Generator, scale: float, k: int = K) -> np.ndarray:
    """Network-like scores: a random per-label bias plus per-pixel noise, times ``scale``."""
    bias = rng.normal(size=k) * 1.5
    return ((bias + rng.normal(size=(H, W, k))) * scale).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _random_tags(rng):
    tags = np.zeros(K, bool)
    tags[0] = True
    tags[rng.choice(np.arange(1, K), size=rng.integers(1, 4), replace=False)] = True
    return tags


def _box_weights(rng):
    w = np.zeros((H, W), np.float32)
    r0, c0 = rng.integers(0, H // 2, size=2)
    w[r0 : r0 + rng.integers(3, H // 2), c0 : c0 + rng.integers(3, W // 2)] = 1.0
    return w


def make(family: str, seed: int, scale: float):
    """One problem of ``family`` with logits of magnitude about ``scale``."""
    rng = np.random.default_rng(seed)
    f = logits(rng, scale)
    if family == "tags":
        return f, constraints.from_tags(_random_tags(rng))
    if family == "tags_size":
        tags = _random_tags(rng)
        size = tags & (rng.random(K) < 0.5)
        size[0] = False
        return f, constraints.from_tags(tags, size=size)
    if family in ("foreground_hard", "foreground_slack"):
        alpha = rng.dirichlet(np.ones(K)) * rng.uniform(0.2, 0.95)
        beta = np.inf if family == "foreground_hard" else rng.uniform(0.1, 5.0, size=K)
        return f, constraints.foreground(alpha, beta=beta)
    if family == "general":
        c = 4
        a = rng.uniform(-1, 1, size=(c, K)).astype(np.float32)
        p0 = rng.dirichlet(np.ones(K), size=N)  # a feasible P: b is below s(P0)
        b = (p0 @ a.T).mean(0) - rng.uniform(0.0, 0.05, size=c)
        beta = np.where(rng.random(c) < 0.5, np.inf, rng.uniform(0.5, 5.0, size=c))
        return f, LinearConstraints(
            a=jnp.asarray(a),
            b=jnp.asarray(b, jnp.float32),
            beta=jnp.asarray(beta, jnp.float32),
            mask=jnp.ones(K, bool),
        )
    if family == "box":
        tags = _random_tags(rng)
        label = int(rng.choice(np.flatnonzero(tags[1:])) + 1)
        box = constraints.box(_box_weights(rng), label, K, fraction=0.75)
        return f, constraints.concatenate([constraints.from_tags(tags), box])
    if family == "satisfied":  # rows Q already satisfies: lam = 0 and P = Q
        q = _softmax(f.astype(np.float64)).reshape(N, K)
        b = q.mean(0) - rng.uniform(0.001, 0.05, size=K)
        return f, constraints.foreground(b, beta=np.inf)
    raise ValueError(family)
