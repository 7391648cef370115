"""Features shared by every ccnn_jax segmentation builder, and how to feed them without TensorFlow.

Every builder (``ccnn_synthetic``, ``voc_segmentation``, ``camvid``, ...) subclasses
:class:`SegmentationBuilder`: its features are ``segmentation_features(class_names, **extra)``
and it writes ``file_format="array_record"`` so that ``download_and_prepare`` and
``tfds.data_source`` work with TensorFlow absent (verified with tensorflow-datasets 4.9.10, no
``tensorflow`` module installed).

What a builder's ``_generate_examples`` must yield per example (checked by hand, see below):

- ``"image"``: PNG or JPEG **bytes**, a path (``str``/``os.PathLike``) to a PNG/JPEG file, or a
  ``PIL.Image.Image``. Its decoded form must be uint8 RGB (H, W, 3). **Not a numpy array**:
  TFDS encodes numpy images with a TensorFlow graph and fails with ``No module named
  'tensorflow'``. Use :func:`encode_png` to turn an (H, W, 3) uint8 array into PNG bytes.
- ``"segmentation_mask"``: PNG bytes/path/PIL image whose decoded pixels are the class index,
  one channel: a mode ``"L"`` (grey) or ``"P"`` (palette, e.g. VOC; PIL returns the indices)
  PNG. 255 = void/ignore (:data:`VOID`). Use :func:`encode_mask` for an (H, W) or (H, W, 1)
  uint8 array. Bytes are stored as given, *unvalidated* (TFDS does not check shape or mode of
  bytes), so an RGB colour-coded mask must be converted to indices first.
- ``"labels"``: :func:`labels_in_mask` of the mask: the sorted class indices present, void
  excluded (a list of ints; may be empty if the mask is all void).
- ``"image/filename"``: a ``str`` (the source file name, or a synthetic id).
- any extra features passed as ``**extra_features`` (e.g. the synthetic ``large`` size hint).

What ``tfds.data_source(name, data_dir=...)[split][i]`` returns: ``image`` uint8 (H, W, 3),
``segmentation_mask`` uint8 (H, W, 1), ``labels`` a list of ``np.int64``,
``image/filename`` **bytes** (decode with ``.decode()``). Images are decoded with PIL
(OpenCV is not installed; TFDS logs a warning once).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

VOID = 255
"""Mask value meaning void / ignore (excluded from tags, losses and metrics)."""

LARGE_FRACTION = 0.1
"""A class is ``large`` (its 1-bit size hint is set) when it covers more than this fraction of
the image's pixels."""


def segmentation_features(
    class_names: Sequence[str], **extra_features: tfds.features.FeatureConnector
) -> tfds.features.FeaturesDict:
    """The common ``FeaturesDict`` of every segmentation builder, plus ``extra_features``.

    Args:
      class_names: the K class names; mask values are indices into this list (``< K``) or
        :data:`VOID`. K must be < 255.
      **extra_features: additional feature connectors keyed by name.
    Returns:
      ``FeaturesDict`` with ``image`` uint8 (H, W, 3), ``segmentation_mask`` uint8 (H, W, 1),
      ``labels`` = ``Sequence(ClassLabel(names=class_names))``, ``image/filename`` text.
    """
    class_names = list(class_names)
    if not class_names or len(class_names) >= VOID:
        raise ValueError(f"class_names: expected 1..{VOID - 1} names, got {len(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names: names must be unique, got {class_names}")
    reserved = {"image", "segmentation_mask", "labels", "image/filename"}
    clash = reserved & set(extra_features)
    if clash:
        raise ValueError(f"extra_features: names {sorted(clash)} are reserved for common features")
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "segmentation_mask": tfds.features.Image(
                shape=(None, None, 1), dtype=np.uint8, use_colormap=True
            ),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
            "image/filename": tfds.features.Text(),
            **extra_features,
        }
    )


def labels_in_mask(mask: np.ndarray, num_classes: int, *, source: str | None = None) -> list[int]:
    """Sorted class indices present in ``mask`` (void excluded).

    Args:
      mask: integer array of any shape, values in ``[0, num_classes)`` or :data:`VOID`.
      num_classes: K.
      source: optional file name put in the error message.
    Raises:
      ValueError naming ``source`` and the offending values if any value is neither a class
      index nor void.
    """
    values = np.unique(np.asarray(mask))
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == VOID)]
    if bad:
        where = f" in {source}" if source else ""
        raise ValueError(
            f"mask{where}: label values {bad} are neither a class index in [0, {num_classes}) "
            f"nor void ({VOID})"
        )
    return [int(v) for v in values if v != VOID]


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) RGB image (what ``image`` features should be fed).

    ``compress_level`` 0 (stored) is ~2x faster to encode and decode than 1, ~30% larger.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes (mode "L") of a uint8 (H, W) or (H, W, 1) class-index mask."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask: expected uint8 (H, W) or (H, W, 1), got {mask.dtype} {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the segmentation builders: array_record by default, the common features.

    A subclass sets ``CLASS_NAMES`` (or overrides :meth:`class_names`, e.g. per builder config),
    optionally ``HOMEPAGE`` and :meth:`extra_features`; the dataset description is the
    subclass module's docstring.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES: Sequence[str] = ()
    HOMEPAGE: str | None = None

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # array_record by default: it is written and read without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def class_names(self) -> Sequence[str]:
        return self.CLASS_NAMES

    def extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=sys.modules[type(self).__module__].__doc__,
            features=segmentation_features(self.class_names(), **self.extra_features()),
            homepage=self.HOMEPAGE,
        )
