r"""Linear constraints on the latent distribution P, and builders for CCNN's constraint sets.

A constraint set with C rows over K labels reads, for an image with N pixels,

.. math::

    \frac{1}{N} \sum_i w_c(i) \sum_l a_{cl} P_i(l) \;\ge\; b_c - \xi_c, \qquad \xi_c \ge 0,

with slack penalty :math:`\beta_c \xi_c` (``beta = inf`` makes a row hard) and a label mask:
labels with ``mask[l] == False`` get :math:`P_i(l) = 0` exactly. ``b`` is a fraction of the
image (0.05 means "5% of the pixels").

Builders return a fixed number of rows for a given K (unused rows are inert: ``a = 0,
b = 0``), so constraint sets of different images stack into a batch and ``vmap``. They are
traceable: ``jax.vmap(from_tags)(tags_BxK)`` works inside ``jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Hardness (inverse temperature) the original CCNN used with 1-bit size constraints.
SIZE_HARDNESS = 1000.0


@dataclasses.dataclass(frozen=True)
class TagBounds:
    """The bounds of :func:`from_tags`, as fractions of the image (``fg_slack``: a penalty).

    Attributes:
      fg_lower: lower bound of each present foreground label.
      fg_slack: slack penalty of those lower bounds (``inf`` makes them hard).
      bg_lower, bg_upper: hard bounds of the background when any foreground is present.
      size_fg_lower: hard lower bound of a present label with its size bit set.
      size_fg_upper: hard upper bound of a present label with its size bit clear (the hint's
        threshold: such an object covers at most this fraction).
      size_bg_lower, size_bg_upper: hard background bounds when any size bit is set.
    """

    fg_lower: float = 0.05
    fg_slack: float = 2.0
    bg_lower: float = 0.3
    bg_upper: float = 0.7
    size_fg_lower: float = 0.1
    size_fg_upper: float = 0.1
    size_bg_lower: float = 0.2
    size_bg_upper: float = 0.7


#: The original CCNN's bounds for PASCAL VOC (``python_layers.py``): the defaults of
#: :func:`from_tags` and of ``configs.base().constraints``.
VOC_BOUNDS = TagBounds()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearConstraints:
    """C linear rows on P: ``(1/N) sum_i w_c(i) a_c . P_i >= b_c - xi_c``, penalty ``beta . xi``.

    Attributes:
      a: (C, K) per-label coefficients.
      b: (C,) right-hand sides, as fractions of the image.
      beta: (C,) slack penalties, ``>= 0``; ``inf`` makes the row hard.
      mask: (K,) bool, labels allowed in P.
      weights: None (weight 1 everywhere) or (C, *pixels) per-pixel weights.

    A batch is the same type with one leading axis on every field. Concrete (non-traced)
    inputs are validated on construction; a ``ValueError`` names the offending field.
    """

    a: Array
    b: Array
    beta: Array
    mask: Array
    weights: Array | None = None

    def __post_init__(self):
        if _all_concrete(self.a, self.b, self.beta, self.mask, self.weights):
            validate(self)

    @property
    def num_rows(self) -> int:
        return self.a.shape[-2]

    @property
    def num_labels(self) -> int:
        return self.a.shape[-1]


def _all_concrete(*xs) -> bool:
    """True when every field is a concrete array (not a tracer, not a tree-util placeholder)."""
    for x in xs:
        if x is None:
            continue
        if isinstance(x, jax.core.Tracer) or not isinstance(x, np.ndarray | jax.Array):
            return False
    return True


def validate(cons: LinearConstraints) -> None:
    """Checks shapes and values of concrete constraints; raises ``ValueError`` naming the field."""
    a, b, beta, mask, weights = (cons.a, cons.b, cons.beta, cons.mask, cons.weights)
    if a.ndim < 2:
        raise ValueError(f"LinearConstraints.a must have shape (C, K), got {a.shape}")
    batch, (c, k) = a.shape[:-2], a.shape[-2:]
    expect = {"b": (*batch, c), "beta": (*batch, c), "mask": (*batch, k)}
    for name, shape in expect.items():
        got = getattr(cons, name).shape
        if tuple(got) != shape:
            want = "(C,)" if name != "mask" else "(K,)"
            raise ValueError(
                f"LinearConstraints.{name} must have shape {want} = {shape} to match a {a.shape},"
                f" got {tuple(got)}"
            )
    if weights is not None and tuple(weights.shape[: len(batch) + 1]) != (*batch, c):
        raise ValueError(
            f"LinearConstraints.weights must have shape (C, *pixels) with C = {c}"
            f" (leading {(*batch, c)}), got {tuple(weights.shape)}"
        )
    a_np, b_np, beta_np = (np.asarray(x) for x in (a, b, beta))
    if not np.all(np.isfinite(a_np)):
        raise ValueError("LinearConstraints.a must be finite (found NaN or inf)")
    if not np.all(np.isfinite(b_np)):
        raise ValueError("LinearConstraints.b must be finite (found NaN or inf)")
    if np.any(np.isnan(beta_np)) or np.any(beta_np < 0):
        raise ValueError(f"LinearConstraints.beta must be >= 0 (inf = hard), got {beta_np}")
    if weights is not None and not np.all(np.isfinite(np.asarray(weights))):
        raise ValueError("LinearConstraints.weights must be finite (found NaN or inf)")
    mask_np = np.asarray(mask)
    if mask_np.dtype != np.bool_:
        raise ValueError(f"LinearConstraints.mask must be bool, got dtype {mask_np.dtype}")
    if not np.all(mask_np.any(axis=-1)):
        raise ValueError("LinearConstraints.mask allows no label: at least one must be True")


def _row(k: int, label) -> Array:
    return jax.nn.one_hot(label, k, dtype=jnp.float32)


def from_tags(
    tags: Array,
    *,
    background: int | None = 0,
    fg_lower: float = VOC_BOUNDS.fg_lower,
    fg_slack: float = VOC_BOUNDS.fg_slack,
    bg_lower: float = VOC_BOUNDS.bg_lower,
    bg_upper: float = VOC_BOUNDS.bg_upper,
    size: Array | None = None,
    size_fg_lower: float = VOC_BOUNDS.size_fg_lower,
    size_fg_upper: float = VOC_BOUNDS.size_fg_upper,
    size_bg_lower: float = VOC_BOUNDS.size_bg_lower,
    size_bg_upper: float = VOC_BOUNDS.size_bg_upper,
) -> LinearConstraints:
    r"""CCNN's constraints from image-level tags (default bounds: :data:`VOC_BOUNDS`).

    Labels absent from ``tags`` are masked (P = 0; the suppression constraint). Every present
    foreground label l gets :math:`\frac1N\sum_i P_i(l) \ge` ``fg_lower`` with slack penalty
    ``fg_slack``; when any foreground label is present, background gets
    ``bg_lower <= P(bg) <= bg_upper`` (hard; the upper bound is the row ``-P(bg) >= -bg_upper``).

    With a 1-bit size hint (``size[l]``: label l covers more than 10% of the image), a large
    present foreground label gets the hard lower bound ``size_fg_lower``, a small one (bit
    clear) the hard upper bound ``size_fg_upper`` (the row ``-P(l) >= -size_fg_upper``), and
    background is bounded to ``[size_bg_lower, size_bg_upper]`` when any label is large, to
    ``[size_bg_lower, 1]`` when all are small. (The original's size mode zeroed the small
    labels outright, its hint naming only the large ones; here the bit's both values bound.)

    Args:
      tags: (K,) bool or 0/1, labels present in the image (background may be included).
      background: index of the background label, or None for datasets without one
        (foreground rows only; the two background rows stay inert).
      size: optional (K,) bool or 0/1 size bits.

    Returns:
      ``LinearConstraints`` with C = K + 2 rows: K per-label lower bounds (inert for absent
      labels and for background), then background lower and upper bounds; with ``size``,
      K more rows follow, the small labels' upper bounds (inert for the others).
    """
    tags = jnp.asarray(tags)
    if tags.ndim != 1:
        raise ValueError(f"from_tags: tags must have shape (K,), got {tags.shape}")
    k = tags.shape[0]
    present = tags.astype(bool)
    is_bg = jnp.zeros(k, bool) if background is None else jnp.arange(k) == background
    fg = present & ~is_bg
    any_fg = fg.any()
    if size is not None and jnp.shape(size) != (k,):
        raise ValueError(f"from_tags: size must have shape (K,) = ({k},), got {jnp.shape(size)}")
    large = jnp.zeros(k, bool) if size is None else jnp.asarray(size).astype(bool) & fg

    label_a = jnp.where(fg[:, None], jnp.eye(k, dtype=jnp.float32), 0.0)
    label_b = jnp.where(fg, jnp.where(large, size_fg_lower, fg_lower), 0.0)
    label_beta = jnp.where(large, jnp.inf, fg_slack)

    any_large = large.any()
    lo = jnp.where(any_large, size_bg_lower, bg_lower)
    hi = jnp.where(any_large, size_bg_upper, bg_upper if size is None else 1.0)
    if background is None:
        bg_a = jnp.zeros((2, k), jnp.float32)
        bg_b = jnp.zeros(2, jnp.float32)
    else:
        e_bg = _row(k, background)
        on = any_fg.astype(jnp.float32)
        bg_a = jnp.stack([e_bg, -e_bg]) * on
        bg_b = jnp.stack([lo, -hi]).astype(jnp.float32) * on

    a, b, beta = [label_a, bg_a], [label_b, bg_b], [label_beta, jnp.full(2, jnp.inf)]
    if size is not None:
        small = fg & ~large
        a.append(jnp.where(small[:, None], -jnp.eye(k, dtype=jnp.float32), 0.0))
        b.append(jnp.where(small, -size_fg_upper, 0.0))
        beta.append(jnp.full(k, jnp.inf))

    mask = present | is_bg
    mask = jnp.where(mask.any(), mask, True)  # no tag at all: nothing is known, allow every label
    return LinearConstraints(
        a=jnp.concatenate(a),
        b=jnp.concatenate(b).astype(jnp.float32),
        beta=jnp.concatenate(beta).astype(jnp.float32),
        mask=mask,
    )


def foreground(alpha: Array, beta: Array | float = jnp.inf, mask: Array | None = None):
    r"""The seed demonstration's rows: :math:`\frac1N\sum_i P_i(l) \ge \alpha_l` for every label.

    Args:
      alpha: (K,) lower bounds as fractions of the image.
      beta: slack penalty, scalar or (K,); ``inf`` (default) makes every row hard.
      mask: optional (K,) bool label mask (default: all labels allowed).
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim != 1:
        raise ValueError(f"foreground: alpha must have shape (K,), got {alpha.shape}")
    k = alpha.shape[0]
    return LinearConstraints(
        a=jnp.eye(k, dtype=jnp.float32),
        b=alpha,
        beta=jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (k,)),
        mask=jnp.ones(k, bool) if mask is None else jnp.asarray(mask, bool),
    )


def box(
    box_mask: Array, label: int, num_labels: int, *, fraction: float = 0.75, beta: float = jnp.inf
) -> LinearConstraints:
    r"""At least ``fraction`` of the box's pixels take ``label`` (the paper's bounding boxes).

    The row is :math:`\frac1N\sum_i [i \in box] P_i(label) \ge fraction \cdot |box| / N`,
    i.e. a pixel-weighted row with the box indicator as weights.

    Args:
      box_mask: (H, W) or (N,) bool/0-1 indicator of the box.
      label: the box's label.
      num_labels: K.
    """
    w = jnp.asarray(box_mask, jnp.float32)
    area = w.mean()
    return LinearConstraints(
        a=_row(num_labels, label)[None],
        b=(fraction * area)[None].astype(jnp.float32),
        beta=jnp.full((1,), beta, jnp.float32),
        mask=jnp.ones(num_labels, bool),
        weights=w[None],
    )


def concatenate(sets: Sequence[LinearConstraints]) -> LinearConstraints:
    """Stacks the rows of several constraint sets over the same labels and pixels.

    Masks are combined with AND. If any set has pixel weights, the others get weight 1.
    """
    if not sets:
        raise ValueError("concatenate: need at least one LinearConstraints")
    pixel_shape = next((s.weights.shape[1:] for s in sets if s.weights is not None), None)

    def weights_of(s):
        if s.weights is not None:
            return s.weights
        return jnp.ones((s.a.shape[0], *pixel_shape), jnp.float32)

    mask = sets[0].mask
    for s in sets[1:]:
        mask = mask & s.mask
    return LinearConstraints(
        a=jnp.concatenate([s.a for s in sets]),
        b=jnp.concatenate([s.b for s in sets]),
        beta=jnp.concatenate([s.beta for s in sets]),
        mask=mask,
        weights=None if pixel_shape is None else jnp.concatenate([weights_of(s) for s in sets]),
    )
