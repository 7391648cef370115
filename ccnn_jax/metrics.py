r"""Segmentation metrics: confusion matrix (void ignored), IoU, mIoU, pixel accuracy, KL.

``confusion[t, p]`` counts the pixels of true class t predicted as p; pixels whose label is void
(255, or anything outside [0, K)) and pixels of invalid (padding) examples are not counted.

.. math:: \mathrm{IoU}_k = \frac{C_{kk}}{\sum_p C_{kp} + \sum_t C_{tk} - C_{kk}}, \quad
          \mathrm{mIoU} = \operatorname{mean}_{k: \text{union}_k > 0} \mathrm{IoU}_k, \quad
          \mathrm{acc} = \frac{\operatorname{tr} C}{\sum C}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    pred_BxHxW: jax.Array,
    mask_BxHxW: jax.Array,
    num_classes: int,
    valid_B: jax.Array | None = None,
) -> jax.Array:
    """(K, K) int32 confusion matrix of one batch; jit-able (fixed output shape)."""
    if pred_BxHxW.shape != mask_BxHxW.shape:
        raise ValueError(
            f"pred_BxHxW {pred_BxHxW.shape} and mask_BxHxW {mask_BxHxW.shape} must match"
        )
    k = num_classes
    weight = (mask_BxHxW >= 0) & (mask_BxHxW < k)
    if valid_B is not None:
        weight = weight & (valid_B > 0).reshape((-1,) + (1,) * (mask_BxHxW.ndim - 1))
    index = jnp.where(weight, mask_BxHxW * k + jnp.clip(pred_BxHxW, 0, k - 1), 0)
    counts = jnp.bincount(index.ravel(), weights=weight.ravel().astype(jnp.int32), length=k * k)
    return counts.astype(jnp.int32).reshape(k, k)


def iou_per_class(confusion_KxK) -> np.ndarray:
    """Per-class IoU as float64; NaN for classes absent from both truth and prediction."""
    c = np.asarray(confusion_KxK, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion_KxK must be square, got shape {c.shape}")
    tp = np.diag(c)
    union = c.sum(axis=0) + c.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(confusion_KxK) -> float:
    """Mean IoU over classes present in the truth or the prediction (NaN if there are none)."""
    iou = iou_per_class(confusion_KxK)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(confusion_KxK) -> float:
    """Fraction of non-void pixels labelled correctly (NaN if there are none)."""
    c = np.asarray(confusion_KxK, dtype=np.float64)
    total = c.sum()
    return float(np.trace(c) / total) if total > 0 else float("nan")


def summarize(confusion_KxK, class_names: list[str] | None = None) -> dict:
    """{"miou", "pixel_accuracy", "per_class_iou" (list, None for absent classes)}."""
    iou = iou_per_class(confusion_KxK)
    if class_names is not None and len(class_names) != len(iou):
        raise ValueError(f"class_names has {len(class_names)} names for {len(iou)} classes")
    return {
        "miou": mean_iou(confusion_KxK),
        "pixel_accuracy": pixel_accuracy(confusion_KxK),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def kl_divergence(log_p_xK: jax.Array, log_q_xK: jax.Array, axis: int = -1) -> jax.Array:
    r"""Per-pixel KL(P || Q) = sum_l P(l) (log P(l) - log Q(l)), with 0 log 0 = 0."""
    p = jnp.exp(log_p_xK)
    return jnp.sum(jnp.where(p > 0, p * (log_p_xK - log_q_xK), 0.0), axis=axis)
