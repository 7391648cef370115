r"""Training losses: CCNN (constrained latent P from tags), MIL-FCN and full pixel supervision.

All losses take logits (B, h, w, K) and a per-example weight ``valid`` (B,) (0 for padding), and
average over the valid examples only: ``loss = sum_b valid_b * loss_b / max(sum_b valid_b, 1)``.

Methods (``config.method``), dispatched by :func:`compute_loss` from a :class:`LossSpec`:

- ``"ccnn"``: CCNN from tags — per image, P = argmin KL(P || Q) under the tag constraints,
  solved on stop_gradient(log Q); loss = CE(P, Q) (:func:`ccnn_loss`).
- ``"ccnn_size"``: the same with the 1-bit size hints (hardness ``SIZE_HARDNESS``).
- ``"mil"``: MIL-FCN, sigmoid CE of max-pooled class scores against tags (:func:`mil_loss`).
- ``"full"``: pixel-wise CE against the masks, the fully supervised upper bound
  (:func:`supervised_loss`).
- ``"pretrain"``: image classification over the object classes (:func:`classification_loss`),
  the ImageNet-style pretraining every method starts from (:mod:`ccnn_jax.pretrain`); its
  inputs are the network's image class scores (B, K), not per-pixel logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ccnn_jax import configs, solvers
from ccnn_jax import constraints as constraints_lib
from ccnn_jax.models import upsample_logits


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
    pixels_BxHxW: jax.Array | None = None,
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
      pixels_BxHxW: optional map of the pixels that belong to the image (1) rather than to
        augmentation padding (0), at any resolution that is a multiple of the logits'. The
        constraints and the loss then count image pixels only (the constraint rows get the
        pixel weights :math:`w_i = m_i N / \sum_j m_j` of the area-averaged map m), so that
        foreground mass cannot be parked on the padding.

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
    pix_Bxhxw = jnp.ones(log_q.shape[:3], jnp.float32)
    if pixels_BxHxW is not None:
        pix_Bxhxw = _area_average(pixels_BxHxW, log_q.shape[1:3])
        count_B = jnp.sum(pix_Bxhxw, axis=(1, 2))
        scale_B = pix_Bxhxw[0].size / jnp.maximum(count_B, 1e-6)
        weight_Bxhxw = pix_Bxhxw * scale_B[:, None, None]
        weight_BxCxhxw = jnp.broadcast_to(
            weight_Bxhxw[:, None], (b, cons.num_rows, *weight_Bxhxw.shape[1:])
        )
        cons = dataclasses.replace(cons, weights=weight_BxCxhxw)
    sol = solvers.solve_batch(
        jax.lax.stop_gradient(log_q),
        cons,
        method=method,
        hardness=hardness,
        **(solver_kwargs or {}),
    )
    p = jax.lax.stop_gradient(jnp.where(real_B[:, None, None, None], sol.p, jnp.exp(log_q)))
    # sum_l P log Q with P = 0 exactly on masked labels (0 * finite log Q = 0).
    ce_Bxhxw = -jnp.sum(p * log_q, axis=-1)
    ce_B = jnp.sum(ce_Bxhxw * pix_Bxhxw, axis=(1, 2)) / jnp.maximum(
        jnp.sum(pix_Bxhxw, axis=(1, 2)), 1e-6
    )
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
    logits_BxHxWxK: jax.Array,
    tags_BxK: jax.Array,
    valid_B: jax.Array,
    *,
    pixels_BxHxW: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""MIL-FCN (multi-class MIL): sigmoid cross-entropy of max-pooled class scores vs tags.

    .. math:: s_{b,l} = \max_i \text{logits}_{b,i}(l), \quad
              L_b = \frac{1}{K} \sum_l \text{BCE}(\sigma(s_{b,l}), t_{b,l}),

    the max over the pixels of the image (``pixels_BxHxW`` > 0 after area-averaging to the
    logits' resolution, when given; augmentation padding is skipped).
    """
    if logits_BxHxWxK.ndim != 4:
        raise ValueError(f"logits_BxHxWxK must be (B, H, W, K), got {logits_BxHxWxK.shape}")
    logits = logits_BxHxWxK.astype(jnp.float32)
    if pixels_BxHxW is not None:
        inside = _area_average(pixels_BxHxW, logits.shape[1:3]) > 0
        logits = jnp.where(inside[..., None], logits, -1e9)
    scores_BxK = jnp.max(logits, axis=(1, 2))
    if tags_BxK.shape != scores_BxK.shape:
        raise ValueError(f"tags_BxK must have shape {scores_BxK.shape}, got {tags_BxK.shape}")
    bce_BxK = optax.sigmoid_binary_cross_entropy(scores_BxK, tags_BxK.astype(jnp.float32))
    return _weighted_mean(jnp.mean(bce_BxK, axis=-1), valid_B), {}


def _area_average(pixels_BxHxW: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w): the mean of ``pixels_BxHxW`` over each h x w cell (H, W multiples of h, w)."""
    b, big_h, big_w = pixels_BxHxW.shape
    h, w = size
    if big_h % h or big_w % w:
        raise ValueError(
            f"pixels_BxHxW {pixels_BxHxW.shape[1:]} must be a multiple of the logits' {size}"
        )
    cells = pixels_BxHxW.astype(jnp.float32).reshape(b, h, big_h // h, w, big_w // w)
    return cells.mean(axis=(2, 4))


def object_classes(num_classes: int, background: int | None) -> jax.Array:
    """(K,) bool: the labels an image classifier chooses among (all but background)."""
    labels = jnp.arange(num_classes)
    return labels != background if background is not None else jnp.ones(num_classes, bool)


def classification_loss(
    scores_BxK: jax.Array, tags_BxK: jax.Array, valid_B: jax.Array, *, background: int | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Softmax cross-entropy of image class scores against the tagged object classes.

    .. math:: L_b = -\sum_{l \ne bg} t_{b,l} \log \operatorname{softmax}_{l \ne bg}(s_b)_l,
              \qquad t_b = \text{tags}_b / \textstyle\sum_{l \ne bg} \text{tags}_{b,l},

    i.e. the usual single-label loss when an image holds one object (ImageNet-style
    pretraining); background is not a class of the classifier. Images without an object tag
    count as padding.
    """
    if scores_BxK.ndim != 2 or tags_BxK.shape != scores_BxK.shape:
        raise ValueError(
            f"scores_BxK {scores_BxK.shape} and tags_BxK {tags_BxK.shape} must both be (B, K)"
        )
    is_object = object_classes(scores_BxK.shape[-1], background)
    tags = jnp.where(is_object, tags_BxK.astype(jnp.float32), 0.0)
    count_B = jnp.sum(tags, axis=-1)
    target = tags / jnp.maximum(count_B, 1.0)[:, None]
    log_p = jax.nn.log_softmax(jnp.where(is_object, scores_BxK.astype(jnp.float32), -1e9), -1)
    ce_B = -jnp.sum(jnp.where(target > 0, target * log_p, 0.0), axis=-1)
    real_B = (valid_B > 0) & (count_B > 0)
    return _weighted_mean(ce_B, real_B), {}


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


# ----------------------------------------------------------------------------- method dispatch


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static loss settings of a run (hashable, so jitted steps can close over them).

    Built from a config by :func:`loss_spec`; ``constraints`` holds the ``from_tags`` bounds as
    sorted (name, value) items, ``hardness`` None means 1 (tags) or ``SIZE_HARDNESS`` (sizes).
    """

    method: str
    background: int | None
    num_classes: int
    solver_method: str
    solver_tol: float
    solver_max_iter: int
    mil_warmup_steps: int
    mil_weight: float
    constraints: tuple[tuple[str, float], ...]
    hardness: float | None

    def __post_init__(self):
        if self.method not in configs.METHODS:
            raise ValueError(f"method must be one of {configs.METHODS}, got {self.method!r}")


def loss_spec(config: ml_collections.ConfigDict, meta) -> LossSpec:
    """The :class:`LossSpec` of ``config`` for a dataset with ``meta`` (background, K)."""
    s = config.solver
    return LossSpec(
        method=config.method,
        background=meta.background,
        num_classes=meta.num_classes,
        solver_method=s.method,
        solver_tol=float(s.tol),
        solver_max_iter=int(s.max_iter),
        mil_warmup_steps=int(config.mil_warmup_steps),
        mil_weight=float(config.mil_weight),
        constraints=tuple(sorted((k, float(v)) for k, v in config.constraints.items())),
        hardness=None if config.hardness is None else float(config.hardness),
    )


def compute_loss(
    logits_BxhxwxK: jax.Array, batch: dict, spec: LossSpec, step: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured method's loss on (possibly coarse) logits; aux has scalars (+ ``p``).

    For ``"pretrain"`` the first argument is the image class scores (B, K).

    With ``mil_weight > 0`` the CCNN loss gets ``mil_weight * MIL`` added, and with
    ``mil_warmup_steps > 0`` the loss is MIL alone while ``step < mil_warmup_steps``.
    """
    valid = batch["valid"]
    if spec.method == "pretrain":
        return classification_loss(logits_BxhxwxK, batch["tags"], valid, background=spec.background)
    if spec.method in ("ccnn", "ccnn_size") and (spec.mil_warmup_steps or spec.mil_weight):
        loss, aux = compute_loss(
            logits_BxhxwxK, batch, dataclasses.replace(spec, mil_warmup_steps=0, mil_weight=0.0)
        )
        mil, _ = mil_loss(logits_BxhxwxK, batch["tags"], valid, pixels_BxHxW=batch.get("pixels"))
        aux["ccnn_loss"], aux["mil_loss"] = loss, mil
        loss = loss + spec.mil_weight * mil
        if step is not None and spec.mil_warmup_steps:
            loss = jnp.where(step < spec.mil_warmup_steps, mil, loss)
        return loss, aux
    if spec.method in ("ccnn", "ccnn_size"):
        return ccnn_loss(
            logits_BxhxwxK,
            batch["tags"],
            valid,
            size_BxK=batch["size"] if spec.method == "ccnn_size" else None,
            background=spec.background,
            method=spec.solver_method,
            hardness=spec.hardness,
            solver_kwargs={"tol": spec.solver_tol, "max_iter": spec.solver_max_iter},
            constraint_kwargs=dict(spec.constraints),
            pixels_BxHxW=batch.get("pixels"),
        )
    if spec.method == "mil":
        return mil_loss(logits_BxhxwxK, batch["tags"], valid, pixels_BxHxW=batch.get("pixels"))
    logits = upsample_logits(logits_BxhxwxK, batch["mask"].shape[1:3])
    return supervised_loss(logits, batch["mask"], valid)
