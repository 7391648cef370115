r"""Statistics of the one-step latent demonstration (pure functions of arrays).

The seed's experiment: an under-trained network gives :math:`Q^u`, a fully trained one
:math:`Q^f`; the latent :math:`P = \arg\min_P \mathrm{KL}(P \| Q^u)` under linear constraints is
solved from :math:`Q^u`. How much closer P is to the fully trained network than :math:`Q^u` is

.. math::

    \mathrm{KL}(A \| B) = \operatorname{mean}_{\text{images}}\ \operatorname{mean}_{i:\,y_i \ne
    \text{void}}\ \sum_l A_i(l) \log \frac{A_i(l)}{\tilde B_i(l)}, \qquad
    \text{reduction} = 1 - \frac{\mathrm{KL}(Q^f \| P)}{\mathrm{KL}(Q^f \| Q^u)},

a per-pixel KL averaged over the labelled (non-void) pixels of each image, then over the images
that have at least one. The second argument is smoothed,
:math:`\tilde B = (1 - \varepsilon) B + \varepsilon / K`, so that a P with exact zeros (labels
masked by the tag constraints) gives a finite KL; with :math:`\varepsilon = 10^{-6}` the change is
below :math:`10^{-5}` nats where B has no zeros.

Constraint variants (all solved on :math:`\log Q^u`, every row
:math:`\frac1N \sum_i P_i(l) \ge \alpha_l` over all N pixels of the image, void included):

- ``all_labels``: :math:`\alpha_l` = ``alpha`` for every label of every image, whatever its
  tags; no mask; hard rows. The seed's constraint (:func:`ccnn_jax.constraints.foreground`): it
  needs no annotation at all, and lifts every label the network under-predicts to ``alpha``.
- ``tags``: :math:`\alpha_l` = ``tags_alpha`` (default 0.05) for every label in the image's tags
  (background included), 0 (an inert row) for the others; no label is masked; hard rows. This is
  the seed's "every label" constraint with only image-level tags as input.
- ``oracle``: :math:`\alpha_l` = ``oracle_fraction`` (default 0.9) times the true share of the
  image's pixels labelled l (void counts for no label); no mask; hard rows.
- ``ccnn_tags``: the original CCNN tag constraints (:func:`ccnn_jax.constraints.from_tags`):
  absent labels masked (P = 0), the foreground and background bounds of
  ``constraints.VOC_BOUNDS`` (soft foreground lower bounds, hard background interval).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ccnn_jax import constraints as constraints_lib
from ccnn_jax import metrics
from ccnn_jax.metrics import kl_divergence

VARIANTS = ("all_labels", "tags", "oracle", "ccnn_tags")

_VOC = constraints_lib.VOC_BOUNDS
DESCRIPTIONS = {
    "all_labels": "sum_i P_i(l) >= {alpha} N for every label, every image (hard, no mask)",
    "tags": "sum_i P_i(l) >= {tags_alpha} N for tagged labels (hard, no mask)",
    "oracle": "sum_i P_i(l) >= {oracle_fraction} x true pixels of l (hard, no mask)",
    "ccnn_tags": (
        f"CCNN from_tags: absent masked, fg >= {_VOC.fg_lower} (soft), "
        f"bg in [{_VOC.bg_lower}, {_VOC.bg_upper}]"
    ),
}


def labelled_pixels(mask_BxHxW: jax.Array, num_classes: int, valid_B: jax.Array) -> jax.Array:
    """(B, H, W) float32: 1 where the pixel has a label in [0, K) and its image is valid."""
    mask = jnp.asarray(mask_BxHxW)
    labelled = (mask >= 0) & (mask < num_classes)
    valid = jnp.asarray(valid_B).reshape((-1,) + (1,) * (mask.ndim - 1)) > 0
    return (labelled & valid).astype(jnp.float32)


def smoothed_log(p_xK: jax.Array, epsilon: float) -> jax.Array:
    r""":math:`\log((1 - \varepsilon) p + \varepsilon / K)` (finite where p = 0 if epsilon > 0)."""
    k = p_xK.shape[-1]
    return jnp.log((1.0 - epsilon) * p_xK + epsilon / k)


@jax.jit
def kl_per_image(
    log_a_BxHxWxK: jax.Array, log_b_BxHxWxK: jax.Array, weight_BxHxW: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Per-image weighted mean over pixels of KL(A_i || B_i); returns (mean (B,), count (B,)).

    ``weight`` is usually :func:`labelled_pixels`; an image with no weight gets mean 0, count 0.
    """
    kl = kl_divergence(log_a_BxHxWxK, log_b_BxHxWxK)
    count = weight_BxHxW.sum(axis=(1, 2))
    total = (kl * weight_BxHxW).sum(axis=(1, 2))
    return total / jnp.maximum(count, 1.0), count


def mean_over_images(per_image, count) -> float:
    """Mean of the per-image values over images with a positive pixel count (NaN if none)."""
    per_image = np.asarray(per_image, np.float64)
    keep = np.asarray(count) > 0
    return float(per_image[keep].mean()) if keep.any() else float("nan")


def reduction(kl_full_latent: float, kl_full_under: float) -> float:
    r""":math:`1 - \mathrm{KL}(Q^f\|P) / \mathrm{KL}(Q^f\|Q^u)` (the share of the KL removed)."""
    if not kl_full_under > 0:
        raise ValueError(f"kl_full_under must be > 0 to define a reduction, got {kl_full_under}")
    return 1.0 - kl_full_latent / kl_full_under


def all_labels_alpha(tags_BxK: jax.Array, alpha: float) -> jax.Array:
    """(B, K): ``alpha`` for every label of every image that has a tag (0 for padding examples)."""
    tags = jnp.asarray(tags_BxK)
    real = jnp.any(tags > 0, axis=-1, keepdims=True)
    return jnp.where(real, jnp.float32(alpha), jnp.zeros_like(tags, jnp.float32))


def tags_alpha(tags_BxK: jax.Array, fraction: float) -> jax.Array:
    """(B, K): ``fraction`` for every tagged label, 0 elsewhere."""
    return jnp.where(jnp.asarray(tags_BxK) > 0, jnp.float32(fraction), 0.0)


def oracle_alpha(mask_BxHxW: jax.Array, num_classes: int, fraction: float) -> jax.Array:
    """(B, K): ``fraction`` x (pixels labelled l) / (all pixels), void counting for no label."""
    mask = jnp.asarray(mask_BxHxW)
    n = mask.shape[1] * mask.shape[2]
    one_hot = jax.nn.one_hot(mask, num_classes, dtype=jnp.float32)  # void (255) -> all zeros
    return fraction * one_hot.sum(axis=(1, 2)) / n


def _foreground_rows(alpha_K: jax.Array) -> constraints_lib.LinearConstraints:
    """``constraints.foreground(alpha)`` (hard rows, no mask) plus two inert rows."""
    k = alpha_K.shape[0]
    inert = constraints_lib.LinearConstraints(
        a=jnp.zeros((2, k), jnp.float32),
        b=jnp.zeros(2, jnp.float32),
        beta=jnp.full(2, jnp.inf, jnp.float32),
        mask=jnp.ones(k, bool),
    )
    return constraints_lib.concatenate([constraints_lib.foreground(alpha_K), inert])


def variant_constraints(
    variant: str,
    batch: dict,
    *,
    num_classes: int,
    background: int | None,
    alpha: float = 0.02,
    tags_fraction: float = 0.05,
    oracle_fraction: float = 0.9,
) -> constraints_lib.LinearConstraints:
    """Batched constraints (leading axis B) of ``variant`` for a batch with tags and masks.

    Every variant has C = K + 2 rows (``all_labels``/``tags``/``oracle``: the K label rows then
    two inert rows, a = 0, b = 0), the shape of ``from_tags``, so all variants share one compiled
    solver. Padding examples (zero tags) get no active row in ``all_labels``/``tags``/``oracle``
    and an all-allowed mask in ``ccnn_tags``, so they are always feasible.
    """
    tags = jnp.asarray(batch["tags"], jnp.float32)
    if tags.ndim != 2 or tags.shape[1] != num_classes:
        raise ValueError(f"batch['tags'] must have shape (B, {num_classes}), got {tags.shape}")
    if variant == "all_labels":
        return jax.vmap(_foreground_rows)(all_labels_alpha(tags, alpha))
    if variant == "tags":
        return jax.vmap(_foreground_rows)(tags_alpha(tags, tags_fraction))
    if variant == "oracle":
        return jax.vmap(_foreground_rows)(oracle_alpha(batch["mask"], num_classes, oracle_fraction))
    if variant == "ccnn_tags":
        return jax.vmap(lambda t: constraints_lib.from_tags(t, background=background))(tags)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def describe(variant: str, *, alpha: float, tags_fraction: float, oracle_fraction: float) -> str:
    return DESCRIPTIONS[variant].format(
        alpha=alpha, tags_alpha=tags_fraction, oracle_fraction=oracle_fraction
    )


def take(tree, index: int):
    """Example ``index`` of a batched pytree (e.g. one image's constraints)."""
    return jax.tree.map(lambda x: x[index], tree)


def per_class_sums(value_BxHxW: jax.Array, mask_BxHxW: jax.Array, weight_BxHxW, num_classes: int):
    """(B, K): the sum of ``value * weight`` over the pixels whose true label is k."""
    one_hot = jax.nn.one_hot(mask_BxHxW, num_classes, dtype=jnp.float32)  # void -> all zeros
    return jnp.einsum("bhw,bhwk->bk", value_BxHxW * weight_BxHxW, one_hot)


@functools.partial(jax.jit, static_argnames=("epsilon", "num_classes"))
def kl_stats(
    log_full, log_under, p, weight, mask, *, epsilon: float, num_classes: int
) -> dict[str, jax.Array]:
    """Per-image KLs (B,) of one batch between Q_full, Q_under and P, and the pixel counts;
    per true class (B, K): the summed KL(Q_full || Q_under), KL(Q_full || P) and pixel counts.

    ``log_full``, ``log_under``: (B, H, W, K) log-probabilities; ``p`` (B, H, W, K) the latent;
    ``weight`` (B, H, W) from :func:`labelled_pixels`; ``mask`` (B, H, W) the true labels; the
    second KL argument is smoothed by ``epsilon`` (:func:`smoothed_log`).
    """
    q_full, q_under = jnp.exp(log_full), jnp.exp(log_under)
    log_p = jnp.log(p)
    kl_fu, count = kl_per_image(log_full, smoothed_log(q_under, epsilon), weight)
    kl_fp, _ = kl_per_image(log_full, smoothed_log(p, epsilon), weight)
    kl_pf, _ = kl_per_image(log_p, smoothed_log(q_full, epsilon), weight)
    kl_uf, _ = kl_per_image(log_under, smoothed_log(q_full, epsilon), weight)
    fu_map = kl_divergence(log_full, smoothed_log(q_under, epsilon))
    fp_map = kl_divergence(log_full, smoothed_log(p, epsilon))
    return {
        "kl_full_under": kl_fu,
        "kl_full_latent": kl_fp,
        "kl_latent_full": kl_pf,
        "kl_under_full": kl_uf,
        "count": count,
        "kl_full_under_class": per_class_sums(fu_map, mask, weight, num_classes),
        "kl_full_latent_class": per_class_sums(fp_map, mask, weight, num_classes),
        "count_class": per_class_sums(jnp.ones_like(weight), mask, weight, num_classes),
    }


class Accumulator:
    """Per-image values (kept images only) and two confusion matrices summed over batches: of
    the argmax map against the ground truth, and against the fully trained network's argmax."""

    def __init__(self, num_classes: int):
        self.k = num_classes
        self.values: dict[str, list[np.ndarray]] = {}
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.agreement = np.zeros((num_classes, num_classes), np.int64)

    def add(self, keep: np.ndarray, **per_image):
        for name, v in per_image.items():
            self.values.setdefault(name, []).append(np.asarray(v)[keep])

    def add_confusion(self, pred, mask, valid, full_pred=None):
        """Adds argmax ``pred`` against ``mask``; and against ``full_pred`` (Q_full's argmax) on
        the labelled pixels of ``mask`` when given."""
        pred, mask, valid = jnp.asarray(pred), jnp.asarray(mask), jnp.asarray(valid)
        c = metrics.confusion_matrix(pred, mask, self.k, valid)
        self.confusion += np.asarray(c, np.int64)
        if full_pred is not None:
            labelled = (mask >= 0) & (mask < self.k)
            target = jnp.where(labelled, jnp.asarray(full_pred), 255)
            c = metrics.confusion_matrix(pred, target, self.k, valid)
            self.agreement += np.asarray(c, np.int64)

    def cat(self, name) -> np.ndarray:
        return np.concatenate(self.values[name])

    def mean_over_images(self, name) -> float:
        """:func:`mean_over_images` of ``name`` with the accumulated pixel counts."""
        return mean_over_images(self.cat(name), self.cat("count"))

    def segmentation(self) -> dict:
        """Pixel accuracy, mIoU and per-class IoU against the ground truth; the same against
        Q_full's argmax (``agreement_*``) when agreement was accumulated."""
        out = {
            "pixel_accuracy": metrics.pixel_accuracy(self.confusion),
            "miou": metrics.mean_iou(self.confusion),
            "per_class_iou": metrics.summarize(self.confusion)["per_class_iou"],
        }
        if self.agreement.any():
            out["agreement_accuracy"] = metrics.pixel_accuracy(self.agreement)
            out["agreement_miou"] = metrics.mean_iou(self.agreement)
        return out

    def per_class_kl(self) -> dict[str, list[float | None]]:
        """Per true class, over all pixels of that class: mean KL(Q_full || Q_under), mean
        KL(Q_full || P) and the reduction 1 - their ratio (None where a class has no pixel)."""
        fu = self.cat("kl_full_under_class").sum(axis=0)
        fp = self.cat("kl_full_latent_class").sum(axis=0)
        n = self.cat("count_class").sum(axis=0)
        present = (n > 0) & (fu > 0)
        nan = np.full(self.k, np.nan)
        return {
            "kl_full_under": _none_for_nan(np.where(n > 0, fu / np.maximum(n, 1), nan)),
            "kl_full_latent": _none_for_nan(np.where(n > 0, fp / np.maximum(n, 1), nan)),
            "reduction": _none_for_nan(np.where(present, 1 - fp / np.where(present, fu, 1), nan)),
            "pixels": [int(x) for x in n],
        }


def _none_for_nan(values) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


@functools.partial(jax.jit, static_argnames=("iterations",))
def best_label_shift(log_full, log_under, weight, *, iterations: int = 30) -> jax.Array:
    r"""Per image, the log-probabilities of the label shift of :math:`Q^u` closest to :math:`Q^f`.

    .. math::

        \hat\lambda = \arg\min_{\lambda \in \mathbb{R}^K} \sum_i w_i\,
        \mathrm{KL}\big(Q^f_i \,\|\, \operatorname{softmax}(\log Q^u_i + \lambda)\big)

    Every P of a constraint set whose rows weigh all pixels alike (``all_labels``, ``tags``,
    ``oracle``) has this form with some :math:`\lambda`, so :math:`\mathrm{KL}(Q^f \| \hat P)`
    bounds what any such P can reach: the ceiling of the reduction. The problem is convex
    (the Hessian is :math:`\sum_i w_i (\operatorname{diag} \hat P_i - \hat P_i \hat P_i^T)`);
    solved by damped Newton steps with the best of a few step sizes.
    ``log_full``, ``log_under`` (B, H, W, K), ``weight`` (B, H, W); returns (B, H, W, K).
    """
    k = log_under.shape[-1]
    q_f = jnp.exp(log_full).reshape(log_full.shape[0], -1, k)
    lq_u = log_under.reshape(q_f.shape)
    w = (
        weight.reshape(q_f.shape[:2])[..., None]
        / jnp.maximum(weight.sum((1, 2)), 1.0)[:, None, None]
    )
    steps = jnp.asarray([1.0, 0.5, 0.25, 0.1, 0.0])

    def objective(lam):  # (B, K) -> (B,)
        log_p = jax.nn.log_softmax(lq_u + lam[:, None, :], -1)
        return -(w * q_f * log_p).sum((1, 2))

    def newton(_, lam):
        p = jax.nn.softmax(lq_u + lam[:, None, :], -1)
        grad = (w * (p - q_f)).sum(1)
        hess = jnp.einsum("bnk,bnl->bkl", -w * p, p) + jax.vmap(jnp.diag)((w * p).sum(1))
        delta = jnp.linalg.solve(hess + 1e-6 * jnp.eye(k), grad[..., None])[..., 0]
        trials = jax.vmap(lambda t: objective(lam - t * delta))(steps)  # (steps, B)
        return lam - steps[jnp.argmin(trials, 0)][:, None] * delta

    lam = jax.lax.fori_loop(0, iterations, newton, jnp.zeros((q_f.shape[0], k), q_f.dtype))
    return jax.nn.log_softmax(log_under + lam[:, None, None, :], -1)
