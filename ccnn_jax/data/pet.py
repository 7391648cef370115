"""Oxford-IIIT Pet as a 3-class weak-label dataset: background, cat, dog.

TFDS's own ``oxford_iiit_pet`` builder downloads the data, but preparing it needs TensorFlow
once (it re-encodes a few corrupt JPEGs with ``tf.image``). Prepare it in the array_record
format, with the optional extra ``pip install -e '.[tf]'``::

    python -c "import tensorflow_datasets as tfds; \\
      tfds.builder('oxford_iiit_pet', data_dir=DATA_DIR, file_format='array_record')\\
      .download_and_prepare()"

Then ``ccnn_oxford_pet`` (this module's builder) converts it, without TensorFlow, to the common
features. The trimap becomes a class mask:

    trimap 1 (pet)        -> 1 + species   (cat = 1, dog = 2; TFDS species 0 = Cat, 1 = Dog)
    trimap 2 (background) -> 0
    trimap 3 (border)     -> 255 (void)

Splits: ``train`` = the source ``train`` (the official trainval list); ``validation`` = the
source ``test``, since the dataset has no separate validation split.
:func:`convert_example` converts one source example.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ccnn_jax.data import checks, common

CLASS_NAMES = ["background", "cat", "dog"]
SPECIES_NAMES = ["Cat", "Dog"]  # TFDS oxford_iiit_pet "species" ClassLabel
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
SOURCE = "oxford_iiit_pet"
_SPLITS = {"train": "train", "validation": "test"}

PREPARE_SOURCE = (
    "pip install -e '.[tf]'  # TensorFlow, needed once to prepare TFDS's oxford_iiit_pet\n"
    "python -c \"import tensorflow_datasets as tfds; tfds.builder('oxford_iiit_pet', "
    "data_dir='{data_dir}', file_format='array_record').download_and_prepare()\""
)


def pet_lut(species: int, name: str = "example") -> np.ndarray:
    """Trimap value -> class index for a pet of ``species`` (0 = Cat, 1 = Dog)."""
    if species not in (0, 1):
        raise checks.BadInputError(f"{name}: species must be 0 (Cat) or 1 (Dog), got {species!r}")
    lut = np.full(256, checks.UNKNOWN, np.int16)
    lut[TRIMAP_PET] = 1 + species
    lut[TRIMAP_BACKGROUND] = 0
    lut[TRIMAP_BORDER] = common.VOID
    return lut


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def convert_example(example: Mapping) -> tuple[str, dict]:
    """One ``oxford_iiit_pet`` example -> (key, the common features), as the builder stores it.

    Args:
      example: dict with ``image`` (JPEG/PNG bytes), ``segmentation_mask`` (PNG bytes of the
        trimap in {1, 2, 3}), ``species`` 0/1 and ``file_name``, as the source returns them
        with image decoding skipped (:func:`open_source`).
    Returns:
      ``(file name, example)`` with the features of :func:`checks.make_example`.
    Raises:
      BadInputError naming the file for a bad species, a size mismatch or trimap values
      outside {1, 2, 3}.
    """
    name = _text(example["file_name"])
    return name, checks.make_example(
        bytes(example["image"]),
        bytes(example["segmentation_mask"]),
        lut=pet_lut(int(example["species"]), name),
        num_classes=len(CLASS_NAMES),
        image_name=f"{SOURCE} image {name}",
        label_name=f"{SOURCE} trimap of {name}",
        filename=name,
    )


def open_source(data_dir: os.PathLike | str | None, split: str | None = None):
    """``oxford_iiit_pet`` as a random-access source whose image and mask stay encoded bytes.

    Raises:
      MissingDownloadError with the command to prepare it if it is not prepared in
      array_record format under ``data_dir``.
    """
    builder = tfds.builder(SOURCE, data_dir=data_dir)
    how = PREPARE_SOURCE.format(data_dir=builder.data_dir_root)
    if not builder.is_prepared():
        raise checks.MissingDownloadError(
            f"expected TFDS's {SOURCE} prepared at {builder.data_dir}, which is missing. "
            f"Prepare it once (needs TensorFlow) with:\n{how}"
        )
    try:
        return builder.as_data_source(
            split,
            decoders={
                "image": tfds.decode.SkipDecoding(),
                "segmentation_mask": tfds.decode.SkipDecoding(),
            },
        )
    except (NotImplementedError, ValueError) as e:
        raise checks.BadInputError(
            f"{SOURCE} at {builder.data_dir} cannot be read without TensorFlow ({e}). Prepare "
            f"it in the array_record format (in another data_dir, or delete it first):\n{how}"
        ) from None


class CcnnOxfordPet(common.SegmentationBuilder):
    """Oxford-IIIT Pet with classes background/cat/dog and the trimap border as void.

    Reads TFDS's prepared ``oxford_iiit_pet`` from ``source_data_dir`` (default: this builder's
    ``data_dir``); see the module docstring for how to prepare it.
    """

    CLASS_NAMES = CLASS_NAMES
    HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"

    def __init__(self, *, source_data_dir: os.PathLike | str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._source_data_dir = source_data_dir

    def _split_generators(self, dl_manager):
        del dl_manager  # the source is TFDS's prepared oxford_iiit_pet
        source_dir = epath.Path(self._source_data_dir or self.data_dir_root)
        source = open_source(source_dir)
        missing = sorted(set(_SPLITS.values()) - set(source))
        if missing:
            raise checks.MissingDownloadError(
                f"expected splits {missing} in {SOURCE} under {source_dir}, found {sorted(source)}"
            )
        return {ours: self._generate_examples(source[theirs]) for ours, theirs in _SPLITS.items()}

    def _generate_examples(self, source):
        for i in range(len(source)):
            yield convert_example(source[i])
