r"""Training losses: CCNN (constrained latent P from tags), MIL-FCN and full pixel supervision.

All losses take logits (B, h, w, K) and a per-example weight ``valid`` (B,) (0 for padding), and
average over the valid examples only: ``loss = sum_b valid_b * loss_b / max(sum_b valid_b, 1)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ccnn_jax import constraints as constraints_lib
from ccnn_jax import solvers

VOID = 255


def _weighted_mean(per_example_B: jax.Array, valid_B: jax.Array) -> jax.Array:
    valid_B = valid_B.astype(per_example_B.dtype)
    return jnp.sum(per_example_B * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def ccnn_loss(
    logits_BxHxWxK: jax.Array,
    tags_BxK: jax.Array,
    valid_B: jax.Array,
    *,
    size_BxK: jax.Array | None = None,
    background: int | None = 0,
    method: str = "newton",
    hardness: float | None = None,
    solver_kwargs: dict[str, Any] | None = None,
    constraint_kwargs: dict[str, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Constrained CNN loss: cross-entropy from the latent P to the network's Q.

    For every image, ``P = argmin_P KL(P || Q) s.t. constraints(tags[, size])`` is solved on
    ``stop_gradient(log Q)``; then

    .. math:: L_b = -\frac{1}{N} \sum_i \sum_l P_i(l) \log Q_i(l),
              \qquad \partial L_b / \partial \text{logits}_i = (Q_i - P_i) / N,

    with N = h * w pixels, and the batch loss averages ``L_b`` over the valid examples.

    Args:
      logits_BxHxWxK: network scores (any spatial resolution, e.g. a coarse output-stride map).
      tags_BxK: multi-hot image-level tags (background included where the dataset has one).
      valid_B: 1 for real examples, 0 for padding (padding contributes nothing).
      size_BxK: optional 1-bit size hints (class covers > 10% of the image); when given, the
        size constraints are used and ``hardness`` defaults to ``constraints.SIZE_HARDNESS``.
      background: index of the background label, or None when there is none (CamVid).
      method: solver, "newton" or "pga".
      hardness: solver inverse temperature; default 1 (tags) or SIZE_HARDNESS (size hints).
      solver_kwargs: extra keyword arguments for ``solve_batch`` (tol, max_iter, ...).
      constraint_kwargs: bounds for ``constraints.from_tags`` (fg_lower, bg_lower, bg_upper,
        ...); default: the original CCNN's VOC values.

    Returns:
      (loss, aux) where aux holds the latent ``p`` (B, h, w, K) and the solver statistics over
      valid examples: ``solver_iterations`` (mean), ``solver_converged`` (fraction),
      ``solver_gap`` (mean duality gap), ``solver_violation`` (max constraint violation).
    """
    if logits_BxHxWxK.ndim != 4:
        raise ValueError(f"logits_BxHxWxK must be (B, H, W, K), got {logits_BxHxWxK.shape}")
    b, _, _, k = logits_BxHxWxK.shape
    if tags_BxK.shape != (b, k):
        raise ValueError(f"tags_BxK must have shape {(b, k)}, got {tags_BxK.shape}")
    if size_BxK is not None and size_BxK.shape != (b, k):
        raise ValueError(f"size_BxK must have shape {(b, k)}, got {size_BxK.shape}")
    valid_B = valid_B.astype(jnp.float32)
    log_q = jax.nn.log_softmax(logits_BxHxWxK.astype(jnp.float32), axis=-1)
    # Padding (valid = 0) has zero tags; give it all labels so its (ignored) solve stays finite.
    tags_BxK = tags_BxK.astype(jnp.float32)
    real_B = (valid_B > 0) & jnp.any(tags_BxK > 0, axis=-1)
    safe_tags_BxK = jnp.where(real_B[:, None], tags_BxK, 1.0)
    ckw = dict(constraint_kwargs or {})
    if size_BxK is None:
        cons = jax.vmap(lambda t: constraints_lib.from_tags(t, background=background, **ckw))(
            safe_tags_BxK
        )
        hardness = 1.0 if hardness is None else hardness
    else:
        safe_size_BxK = jnp.where(real_B[:, None], size_BxK.astype(jnp.float32), 0.0)
        cons = jax.vmap(
            lambda t, s: constraints_lib.from_tags(t, background=background, size=s, **ckw)
        )(safe_tags_BxK, safe_size_BxK)
        hardness = constraints_lib.SIZE_HARDNESS if hardness is None else hardness
    sol = solvers.solve_batch(
        jax.lax.stop_gradient(log_q),
        cons,
        method=method,
        hardness=hardness,
        **(solver_kwargs or {}),
    )
    p = jax.lax.stop_gradient(jnp.where(real_B[:, None, None, None], sol.p, jnp.exp(log_q)))
    # sum_l P log Q with P = 0 exactly on masked labels (0 * finite log Q = 0).
    ce_B = -jnp.mean(jnp.sum(p * log_q, axis=-1), axis=(1, 2))
    loss = _weighted_mean(ce_B, real_B)
    info = sol.info
    aux = {
        "p": p,
        "solver_iterations": _weighted_mean(info.iterations.astype(jnp.float32), real_B),
        "solver_converged": _weighted_mean(info.converged.astype(jnp.float32), real_B),
        "solver_gap": _weighted_mean(info.gap.astype(jnp.float32), real_B),
        "solver_violation": jnp.max(jnp.where(real_B, info.max_violation, 0.0)),
    }
    return loss, aux


def mil_loss(
    logits_BxHxWxK: jax.Array, tags_BxK: jax.Array, valid_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""MIL-FCN (multi-class MIL): sigmoid cross-entropy of max-pooled class scores vs tags.

    .. math:: s_{b,l} = \max_i \text{logits}_{b,i}(l), \quad
              L_b = \frac{1}{K} \sum_l \text{BCE}(\sigma(s_{b,l}), t_{b,l}).
    """
    if logits_BxHxWxK.ndim != 4:
        raise ValueError(f"logits_BxHxWxK must be (B, H, W, K), got {logits_BxHxWxK.shape}")
    scores_BxK = jnp.max(logits_BxHxWxK.astype(jnp.float32), axis=(1, 2))
    if tags_BxK.shape != scores_BxK.shape:
        raise ValueError(f"tags_BxK must have shape {scores_BxK.shape}, got {tags_BxK.shape}")
    bce_BxK = optax.sigmoid_binary_cross_entropy(scores_BxK, tags_BxK.astype(jnp.float32))
    return _weighted_mean(jnp.mean(bce_BxK, axis=-1), valid_B), {}


def supervised_loss(
    logits_BxHxWxK: jax.Array, mask_BxHxW: jax.Array, valid_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Pixel cross-entropy against the mask, void (255, or any label >= K) ignored.

    .. math:: L = \frac{\sum_{b,i} v_b [y_{b,i} \ne void] (-\log Q_{b,i}(y_{b,i}))}
                       {\max(1, \sum_{b,i} v_b [y_{b,i} \ne void])}

    The logits must be at the mask's resolution (upsample coarse logits first).
    """
    if logits_BxHxWxK.shape[:3] != mask_BxHxW.shape:
        raise ValueError(
            f"logits_BxHxWxK {logits_BxHxWxK.shape} and mask_BxHxW {mask_BxHxW.shape} must agree "
            "on (B, H, W); upsample coarse logits to the mask resolution first"
        )
    k = logits_BxHxWxK.shape[-1]
    labeled = (mask_BxHxW >= 0) & (mask_BxHxW < k)
    weight = labeled.astype(jnp.float32) * valid_B.astype(jnp.float32)[:, None, None]
    labels = jnp.where(labeled, mask_BxHxW, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxHxWxK.astype(jnp.float32), labels)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0), {}
