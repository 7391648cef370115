"""Validation shared by the real-dataset builders: every bad input fails loudly, naming the file.

A builder turns one (image file, label file) pair into a common example (see
:mod:`ccnn_jax.data.common`) with :func:`make_example`, which

- decodes the image fully (a truncated or non-image file raises :class:`BadInputError`
  naming it) and keeps the original bytes when they already decode to RGB;
- decodes the label file as *indices* (palette index for mode ``"P"``, grey value for ``"L"``),
  never as colours, and rejects colour (RGB) label files;
- requires equal sizes, naming both files;
- maps raw label values through a lookup table ``lut`` (256 entries, raw value -> class index,
  :data:`~ccnn_jax.data.common.VOID`, or :data:`UNKNOWN`); any raw value that maps to
  :data:`UNKNOWN` raises, naming the file and the values;
- re-encodes the mask as a mode ``"L"`` PNG and sets ``labels`` to the classes in the mask.

:func:`require_manual_dir` and :func:`missing` produce the "download not found" errors that
name the expected file or folder and the layout.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping

import numpy as np
from etils import epath
from PIL import Image

from ccnn_jax.data import common

UNKNOWN = -1
"""Lookup-table entry for raw label values that are neither a class nor void."""


class BadInputError(ValueError):
    """A source file is unreadable, malformed or inconsistent with its partner file."""


class MissingDownloadError(FileNotFoundError):
    """An expected downloaded file or folder is not in ``manual_dir``."""


def missing(what: os.PathLike | str, layout: str) -> MissingDownloadError:
    """The error for a missing file/folder ``what``, explaining the expected ``layout``."""
    return MissingDownloadError(f"expected {what}, but not found. Expected layout:\n{layout}")


def require_manual_dir(dl_manager, layout: str) -> epath.Path:
    """``dl_manager.manual_dir``, or :class:`MissingDownloadError` naming ``layout``.

    TFDS raises a bare ``AssertionError`` when ``manual_dir`` is missing or empty; this turns it
    into an error that says which files to put there.
    """
    try:
        return epath.Path(dl_manager.manual_dir)
    except AssertionError as e:
        raise MissingDownloadError(f"{e}\nExpected layout of manual_dir:\n{layout}") from None


def identity_lut(num_classes: int) -> np.ndarray:
    """Lookup table mapping ``0..num_classes-1`` to themselves, void to void, the rest UNKNOWN."""
    lut = np.full(256, UNKNOWN, np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[common.VOID] = common.VOID
    return lut


def decode_image(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
    """Fully decode an RGB image; returns (bytes to store, (H, W)).

    Returns ``data`` unchanged when it decodes to mode ``"RGB"``; other modes (grey, CMYK,
    palette, RGBA) are converted to RGB and re-encoded as PNG (lossless), so the stored image is
    always (H, W, 3).

    Raises:
      BadInputError naming ``name`` if the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "RGB":
                return data, (img.height, img.width)
            rgb = np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt/truncated files.
        raise BadInputError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
    return common.encode_png(rgb), rgb.shape[:2]


def decode_label_png(data: bytes, name: str) -> np.ndarray:
    """Decode a single-channel label image to its raw uint8 values (H, W).

    Palette (``"P"``) images give the palette *index*, grey (``"L"``) images the grey value;
    16/32-bit grey images are accepted if every value is < 256.

    Raises:
      BadInputError naming ``name`` if undecodable or not single-channel.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            values = np.asarray(img)
    except Exception as e:
        raise BadInputError(f"cannot decode label image {name}: {type(e).__name__}: {e}") from None
    if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise BadInputError(
            f"label image {name}: expected a single-channel (palette 'P' or grey 'L') image of "
            f"class indices, got PIL mode {mode!r}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadInputError(
            f"label image {name}: values must be in [0, 255], got range "
            f"[{values.min()}, {values.max()}]"
        )
    return values.astype(np.uint8)


def check_same_size(
    image_hw: tuple[int, int], mask_hw: tuple[int, int], image_name: str, mask_name: str
) -> None:
    """Raise BadInputError naming both files unless the image and mask sizes are equal."""
    if tuple(image_hw) != tuple(mask_hw):
        raise BadInputError(
            f"mask {mask_name} has size (H, W) = {tuple(mask_hw)} but its image {image_name} has "
            f"{tuple(image_hw)}; they must be equal"
        )


def apply_lut(raw_HxW: np.ndarray, lut: np.ndarray, name: str) -> np.ndarray:
    """Map raw label values through ``lut``; unknown values raise, naming ``name`` and them."""
    mapped = lut[raw_HxW]
    if np.any(mapped == UNKNOWN):
        bad = sorted(int(v) for v in np.unique(raw_HxW[mapped == UNKNOWN]))
        known = sorted(int(v) for v in np.flatnonzero(lut != UNKNOWN))
        raise BadInputError(
            f"label image {name}: unknown label values {bad} (expected one of {known}, where "
            f"{[int(v) for v in known if lut[v] == common.VOID]} mean void)"
        )
    return mapped.astype(np.uint8)


def make_example(
    image_bytes: bytes,
    label_bytes: bytes | None,
    *,
    lut: np.ndarray,
    num_classes: int,
    image_name: str,
    label_name: str,
    filename: str,
    raw_label: np.ndarray | None = None,
) -> dict:
    """A validated common example from an image and its label file (or raw label array).

    Args:
      image_bytes: encoded image (JPEG/PNG).
      label_bytes: encoded single-channel label PNG; ignored when ``raw_label`` is given.
      lut: (256,) raw value -> class index / VOID / UNKNOWN.
      num_classes: K.
      image_name, label_name: what error messages call the two files.
      filename: stored as ``image/filename``.
      raw_label: optional already-decoded (H, W) raw label values (e.g. from a ``.mat`` file).
    Returns:
      dict with ``image`` bytes, ``segmentation_mask`` PNG bytes (mode "L"), ``labels`` (sorted
      class indices in the mask) and ``image/filename``.
    """
    image_out, image_hw = decode_image(image_bytes, image_name)
    if raw_label is None:
        raw_label = decode_label_png(label_bytes, label_name)
    check_same_size(image_hw, raw_label.shape[:2], image_name, label_name)
    mask_HxW = apply_lut(raw_label, lut, label_name)
    return {
        "image": image_out,
        "segmentation_mask": common.encode_mask(mask_HxW),
        "labels": common.labels_in_mask(mask_HxW, num_classes, source=label_name),
        "image/filename": filename,
    }


def read_list(path: epath.Path, layout: str) -> list[str]:
    """Non-empty stripped lines of a text file; MissingDownloadError if it does not exist."""
    if not path.exists():
        raise missing(path, layout)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_pairs(
    images: Mapping[str, object], labels: Mapping[str, object], image_dir: str, label_dir: str
) -> list[str]:
    """Sorted keys present in both; BadInputError naming unmatched files in either folder."""
    only_images = sorted(set(images) - set(labels))
    only_labels = sorted(set(labels) - set(images))
    if only_images:
        raise BadInputError(
            f"{len(only_images)} image(s) in {image_dir} have no label file in {label_dir}: "
            f"{_some(only_images)}"
        )
    if only_labels:
        raise BadInputError(
            f"{len(only_labels)} label file(s) in {label_dir} have no image in {image_dir}: "
            f"{_some(only_labels)}"
        )
    return sorted(images)


def _some(names: Iterable[str], n: int = 10) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
