"""``ccnn_synthetic``: a procedural weak-label segmentation benchmark that needs no download.

Each ``default`` image shows 1-3 objects on a cluttered, textured background. The object's
**class is its shape** (disk, square, triangle, star, cross, ring, crescent, bar); colour,
texture, brightness, scale, rotation and aspect jitter are drawn independently of the class, so
only shape predicts the label. Size statistics follow PASCAL VOC: the objects of an image share a
foreground of 30-70% of the image, so the background mostly covers 30-70% (the range the original
CCNN's background bounds assume) while single objects range from under 5% to over 30%. Objects
may partially occlude each other (each keeps >= 50% of its own area visible) or leave the frame.

Context bias: ``bar`` appears on a ``waves`` background and ``crescent`` on a ``speckle``
background with probability :data:`CONTEXT_PROB` (these textures occur otherwise only with
probability :data:`CONTEXT_LEAK`), so a tag-trained model is tempted to label the background.

Void: a band of ``void_width`` pixels (default 1) is marked 255 just outside every visible object
boundary (on the background or occluded-object side), so object pixels themselves are intact.

The ``objects`` and ``objects_easy`` configs are the classification sets that pretraining reads
(the ImageNet analogue, :mod:`ccnn_jax.pretrain`): one object per 32x32 image, in the default
look or in an easy look (smooth objects on smooth backgrounds, no clutter) for the first stage
of the curriculum. Their masks exist but pretraining reads only the tags.

Every example is a pure function of ``(seed, split, index)`` (:func:`generate_scene`), so the
dataset is bitwise reproducible and independent of generation order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ccnn_jax.data import common, shapes

CLASS_NAMES = ("background", *shapes.SHAPES)
"""Class 0 is background; classes 1..8 are shapes."""

CONTEXT_TEXTURE = {"bar": "waves", "crescent": "speckle"}
"""Background texture that co-occurs with a class (the deliberate context bias)."""

CONTEXT_PROB = 0.8
"""P(context background | its class is in the image)."""

CONTEXT_LEAK = 0.05
"""P(a given context texture | none of its classes is in the image)."""

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Builder config: image size, split sizes, seed and scene parameters.

    ``foreground`` (lo, hi): the objects of an image share a total area drawn from [lo, hi]
    (VOC-like); None: each object's area is drawn log-uniformly from [min_area, max_area].
    """

    image_size: int = 64
    num_train: int = 4000
    num_validation: int = 500
    seed: int = 0
    void_width: int = 1
    max_objects: int = 3
    foreground: tuple[float, float] | None = (0.3, 0.7)
    min_area: float = 0.02  # object area as a fraction of the image
    max_area: float = 0.6
    object_textures: tuple[str, ...] = shapes.TEXTURES
    background_textures: tuple[str, ...] = shapes.TEXTURES
    clutter: bool = True  # thin random line segments on the background
    context: bool = True  # the context bias (bar on waves, crescent on speckle)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One generated example.

    Attributes:
      image: uint8 (H, W, 3).
      mask: uint8 (H, W), class index or 255 (void).
      instances: int8 (H, W), index of the visible object at each pixel, -1 for background/void.
      object_classes: class index of each object (len = number of objects).
      labels: sorted classes present in ``mask`` (void excluded).
      large: sorted classes covering > 10% of the image in ``mask``.
      background: the background texture kind (for checking the context bias).
      occluded: per object, the fraction of its in-frame area hidden by later objects.
    """

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    object_classes: tuple[int, ...]
    labels: list[int]
    large: list[int]
    background: str
    occluded: tuple[float, ...]


# ----------------------------------------------------------------------------- scenes


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split: expected one of {list(_SPLIT_IDS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(index)]))


def _background_kind(rng: np.random.Generator, classes, config: SyntheticConfig) -> str:
    names = [CLASS_NAMES[c] for c in classes]
    if config.context:
        for name in names:
            if name in CONTEXT_TEXTURE and rng.uniform() < CONTEXT_PROB:
                return CONTEXT_TEXTURE[name]
        for name, tex in CONTEXT_TEXTURE.items():
            if name not in names and rng.uniform() < CONTEXT_LEAK:
                return tex
    kinds = config.background_textures
    return kinds[rng.integers(len(kinds))]


def _object_areas(rng: np.random.Generator, num_objects: int, config: SyntheticConfig):
    """Target area of each object as a fraction of the image.

    With ``config.foreground = (lo, hi)`` the objects share a total drawn uniformly from
    [lo, hi] in Dirichlet(1) proportions (so the background covers about 1 - total, as in VOC);
    otherwise each area is drawn log-uniformly from [min_area, max_area]. Areas are clipped to
    [min_area, max_area].
    """
    if config.foreground is None:
        lo, hi = np.log(config.min_area), np.log(config.max_area)
        return np.exp(rng.uniform(lo, hi, num_objects))
    total = rng.uniform(*config.foreground)
    return np.clip(total * rng.dirichlet(np.ones(num_objects)), config.min_area, config.max_area)


def _place(rng, name: str, area: float, size: int, zmap, full_area) -> np.ndarray | None:
    """Footprint (size, size) bool of shape ``name`` near ``area``, or None if it cannot be
    placed (rejection sampling: >= half of it in frame, every earlier object keeps >= half)."""
    px = np.arange(size, dtype=np.float32) + 0.5
    for _ in range(20):
        a = area * np.exp(rng.uniform(-0.15, 0.15))
        r = np.sqrt(a * size * size / shapes.unit_area(name))
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        th = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.85, 1.18)
        c, s = np.cos(th), np.sin(th)
        # rasterise in the bounding box only (radius 1.1 r in local units, aspect <= 1.18)
        ext = 1.1 * 1.18 * r + 1
        x0, x1 = max(0, int(cx - ext)), min(size, int(cx + ext) + 1)
        y0, y1 = max(0, int(cy - ext)), min(size, int(cy + ext) + 1)
        dx, dy = px[None, x0:x1] - cx, px[y0:y1, None] - cy
        u = (c * dx + s * dy) / (r * aspect)
        v = (-s * dx + c * dy) * aspect / r
        inside = np.zeros((size, size), bool)
        inside[y0:y1, x0:x1] = shapes.shape_inside(name, u, v)
        if inside.sum() < max(6, 0.5 * a * size * size):  # mostly out of frame or degenerate
            continue
        if all(
            np.count_nonzero((zmap == j + 1) & ~inside) >= 0.5 * full_area[j]
            for j in range(len(full_area))
        ):
            return inside
    return None


def _object_colours(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """Object colours independent of the class, with some contrast to the background mean."""
    for _ in range(10):
        colours = shapes.colours(rng)
        if np.abs(colours.mean(axis=0) - bg_mean).sum() > 0.35:
            break
    return colours


def generate_scene(
    seed: int, split: str, index: int, config: SyntheticConfig | None = None
) -> Scene:
    """Generates example ``index`` of ``split`` (deterministic in (seed, split, index, config))."""
    config = config or SyntheticConfig(name="default")
    size = int(config.image_size)
    if size < 8:
        raise ValueError(f"config.image_size: expected >= 8, got {size}")
    rng = _rng(seed, split, index)
    yy, xx = shapes.pixel_grid(size)

    num_objects = int(rng.integers(1, config.max_objects + 1))
    classes = [int(c) for c in rng.integers(1, len(CLASS_NAMES), num_objects)]
    bg_kind = _background_kind(rng, classes, config)
    bg_colours = shapes.colours(rng)
    img = shapes.paint(bg_colours, shapes.texture(rng, bg_kind, yy, xx))
    if config.clutter:
        shapes.add_clutter(rng, img, yy, xx)

    # z-order label map: 0 = background, j + 1 = object j (painted in order, later on top)
    zmap = np.zeros((size, size), np.int16)
    full_area, footprints, kept = [], [], []
    for cls, area in zip(classes, _object_areas(rng, num_objects, config), strict=True):
        inside = _place(rng, CLASS_NAMES[cls], area, size, zmap, full_area)
        if inside is None:
            continue  # could not place this object: drop it
        zmap[inside] = len(kept) + 1
        full_area.append(int(inside.sum()))
        footprints.append(inside)
        kept.append(cls)
        colours = _object_colours(rng, bg_colours.mean(axis=0))
        kind = config.object_textures[rng.integers(len(config.object_textures))]
        img[inside] = shapes.paint(colours, shapes.texture(rng, kind, yy[inside], xx[inside]))

    img = np.clip(img + 0.02 * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)
    image = np.round(img * 255).astype(np.uint8)

    lut = np.array([0, *kept], np.uint8)
    mask = lut[zmap]
    instances = (zmap - 1).astype(np.int8)
    if config.void_width > 0:
        band = shapes.outer_band(zmap, int(config.void_width))
        mask[band] = common.VOID
        instances[band] = -1
    labels = common.labels_in_mask(mask, len(CLASS_NAMES))
    counts = np.bincount(mask.ravel(), minlength=256)
    large = [c for c in labels if counts[c] > common.LARGE_FRACTION * size * size]
    occluded = tuple(
        np.count_nonzero(fp & (zmap > j + 1)) / full_area[j] for j, fp in enumerate(footprints)
    )
    return Scene(image, mask, instances, tuple(kept), labels, large, bg_kind, occluded)


# ----------------------------------------------------------------------------- builder

OBJECTS = dict(
    image_size=32,
    num_train=12000,
    num_validation=600,
    max_objects=1,
    foreground=None,
    min_area=0.15,
    max_area=0.6,
)
"""The classification sets: one object per 32x32 image, area log-uniform in 15-60%."""

EASY = dict(
    object_textures=shapes.SMOOTH_TEXTURES,
    background_textures=shapes.SMOOTH_TEXTURES,
    clutter=False,
)
"""The easy look: plain or gradient fills, no clutter (the context textures stay)."""


class CcnnSynthetic(common.SegmentationBuilder):
    """Procedural shapes-on-clutter segmentation with tags, size hints and context bias."""

    CLASS_NAMES = CLASS_NAMES
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "2.0.0": "VOC-like object sizes (background mostly 30-70%); objects and objects_easy.",
    }
    BUILDER_CONFIGS = [
        SyntheticConfig(
            name="default",
            description="64x64 scenes, 4000 train / 500 validation images.",
        ),
        SyntheticConfig(
            name="tiny",
            description="32x32 scenes, 48 train / 16 validation images (for tests).",
            image_size=32,
            num_train=48,
            num_validation=16,
        ),
        SyntheticConfig(
            name="objects",
            description="32x32, one object per image (15-60%), 12000 train / 600 validation.",
            **OBJECTS,
        ),
        SyntheticConfig(
            name="objects_easy",
            description="objects in the easy look: smooth shapes on smooth backgrounds.",
            **OBJECTS,
            **EASY,
        ),
        SyntheticConfig(
            name="objects_tiny",
            description="32x32, one object per image, 48 train / 16 validation (for tests).",
            **{**OBJECTS, "num_train": 48, "num_validation": 16},
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {"large": tfds.features.Sequence(tfds.features.ClassLabel(names=CLASS_NAMES))}

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int):
        yield from encoded_examples(self.builder_config, split, num_examples)


def _encoded_example(config: SyntheticConfig, split: str, index: int) -> tuple[int, dict]:
    scene = generate_scene(config.seed, split, index, config)
    return index, {
        "image": common.encode_png(scene.image, compress_level=0),
        "segmentation_mask": common.encode_mask(scene.mask),
        "labels": scene.labels,
        "large": scene.large,
        "image/filename": f"{split}_{index:06d}",
    }


def encoded_examples(config: SyntheticConfig, split: str, num_examples: int):
    """Yields ``(index, example)`` for ``index < num_examples`` in order, as fed to TFDS.

    Serial: a process pool was no faster on the shared 2-core machine.
    """
    for i in range(num_examples):
        yield _encoded_example(config, split, i)
