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
from ccnn_jax import metrics, reporting
from ccnn_jax.metrics import kl_divergence

VARIANTS = ("tags", "oracle", "ccnn_tags")

_VOC = constraints_lib.VOC_BOUNDS
DESCRIPTIONS = {
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
    tags_fraction: float = 0.05,
    oracle_fraction: float = 0.9,
) -> constraints_lib.LinearConstraints:
    """Batched constraints (leading axis B) of ``variant`` for a batch with tags and masks.

    Every variant has C = K + 2 rows (``tags``/``oracle``: the K label rows then two inert rows,
    a = 0, b = 0), the shape of ``from_tags``, so all variants share one compiled solver.
    Padding examples (zero tags) get no active row in ``tags``/``oracle`` and an all-allowed
    mask in ``ccnn_tags``, so they are always feasible.
    """
    tags = jnp.asarray(batch["tags"], jnp.float32)
    if tags.ndim != 2 or tags.shape[1] != num_classes:
        raise ValueError(f"batch['tags'] must have shape (B, {num_classes}), got {tags.shape}")
    if variant == "tags":
        return jax.vmap(_foreground_rows)(tags_alpha(tags, tags_fraction))
    if variant == "oracle":
        return jax.vmap(_foreground_rows)(oracle_alpha(batch["mask"], num_classes, oracle_fraction))
    if variant == "ccnn_tags":
        return jax.vmap(lambda t: constraints_lib.from_tags(t, background=background))(tags)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def describe(variant: str, *, tags_fraction: float, oracle_fraction: float) -> str:
    return DESCRIPTIONS[variant].format(tags_alpha=tags_fraction, oracle_fraction=oracle_fraction)


def take(tree, index: int):
    """Example ``index`` of a batched pytree (e.g. one image's constraints)."""
    return jax.tree.map(lambda x: x[index], tree)


@functools.partial(jax.jit, static_argnames=("epsilon",))
def kl_stats(log_full, log_under, p, weight, *, epsilon: float) -> dict[str, jax.Array]:
    """Per-image KLs (B,) of one batch between Q_full, Q_under and P, and the pixel counts.

    ``log_full``, ``log_under``: (B, H, W, K) log-probabilities; ``p`` (B, H, W, K) the latent;
    ``weight`` (B, H, W) from :func:`labelled_pixels`; the second KL argument is smoothed by
    ``epsilon`` (:func:`smoothed_log`).
    """
    q_full, q_under = jnp.exp(log_full), jnp.exp(log_under)
    log_p = jnp.log(p)
    kl_fu, count = kl_per_image(log_full, smoothed_log(q_under, epsilon), weight)
    kl_fp, _ = kl_per_image(log_full, smoothed_log(p, epsilon), weight)
    kl_pf, _ = kl_per_image(log_p, smoothed_log(q_full, epsilon), weight)
    kl_uf, _ = kl_per_image(log_under, smoothed_log(q_full, epsilon), weight)
    return {
        "kl_full_under": kl_fu,
        "kl_full_latent": kl_fp,
        "kl_latent_full": kl_pf,
        "kl_under_full": kl_uf,
        "count": count,
    }


class Accumulator:
    """Per-image values (kept images only) and a confusion matrix, summed over batches."""

    def __init__(self, num_classes: int):
        self.k = num_classes
        self.values: dict[str, list[np.ndarray]] = {}
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def add(self, keep: np.ndarray, **per_image):
        for name, v in per_image.items():
            self.values.setdefault(name, []).append(np.asarray(v)[keep])

    def add_confusion(self, pred, mask, valid):
        c = metrics.confusion_matrix(
            jnp.asarray(pred), jnp.asarray(mask), self.k, jnp.asarray(valid)
        )
        self.confusion += np.asarray(c, np.int64)

    def cat(self, name) -> np.ndarray:
        return np.concatenate(self.values[name])

    def mean_over_images(self, name) -> float:
        """:func:`mean_over_images` of ``name`` with the accumulated pixel counts."""
        return mean_over_images(self.cat(name), self.cat("count"))

    def segmentation(self) -> dict:
        return {
            "pixel_accuracy": metrics.pixel_accuracy(self.confusion),
            "miou": metrics.mean_iou(self.confusion),
        }


# ----------------------------------------------------------------------------- report

TABLE_COLUMNS = (
    "map",
    "KL(Q_full‖·)",
    "reduction",
    "KL(·‖Q_full)",
    "pixel_accuracy",
    "miou",
    "active",
    "converged",
    "max gap",
    "ms/image",
)


def table_rows(results: dict) -> list[dict]:
    """One row per map of a results dict: Q_under, P of each variant, Q_full."""
    rows = [
        {
            "map": f"Q_under (step {results['under_steps']})",
            "KL(Q_full‖·)": results["kl_full_under"],
            "reduction": 0.0,
            "KL(·‖Q_full)": results["kl_under_full"],
            **results["under"],
        }
    ]
    for v, r in results["variants"].items():
        rows.append(
            {
                "map": f"P `{v}`",
                "KL(Q_full‖·)": r["kl_full_latent"],
                "reduction": r["reduction"],
                "KL(·‖Q_full)": r["kl_latent_full"],
                "pixel_accuracy": r["pixel_accuracy"],
                "miou": r["miou"],
                "converged": r["solver"]["converged_fraction"],
                "active": r["solver"]["active_fraction"],
                "max gap": f"{r['solver']['max_gap']:.1e}",
                "ms/image": r["solver"]["batched_ms_per_image"],
            }
        )
    rows.append(
        {
            "map": f"Q_full (step {results['full_steps']})",
            "KL(Q_full‖·)": 0.0,
            "KL(·‖Q_full)": 0.0,
            **results["full"],
        }
    )
    return rows


def markdown(results: dict) -> str:
    """The results table, and the CVXPY comparison when the results have one."""
    text = reporting.markdown_table(table_rows(results), TABLE_COLUMNS)
    c = results.get("cvxpy")
    if c:
        text += (
            f"\nCVXPY/Clarabel on {c['images']} image(s) of {c['image_size'][0]}x"
            f"{c['image_size'][1]} (`{c['variant']}`): {c['cvxpy_seconds_per_image']:.2f} s/image"
            f" vs {c['ours_single_ms_per_image']:.2f} ms/image for our single-image solve "
            f"({c['speedup_single']:.0f}x); max |P_ours - P_cvxpy| = {c['max_abs_diff_p']:.1e}.\n"
        )
    return text
