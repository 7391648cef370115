"""grain input pipeline over ``tfds.data_source`` for every builder whose features follow common.py.

Per example (numpy, no TensorFlow): decode (TFDS/PIL) -> geometric transform -> targets.

- Geometry: one affine map from output pixel (i, j) to source pixel
  ``((i + .5 - oy) / s - .5, (j' + .5 - ox) / s - .5)`` (``j' = W - 1 - j`` when flipped).
  The image is sampled bilinearly (box-prefiltered first when ``s < 1/2``), the mask by nearest
  neighbour; pixels that fall outside the source are image 0 and mask void (255).
  Train: ``s = s_cover * u``, ``s_cover = max(H/h, W/w)``, ``u`` log-uniform in
  :data:`TRAIN_SCALE_RANGE`, random offset (crop or pad), horizontal flip with p = 1/2.
  Eval: ``s = min(H/h, W/w)`` (fit, aspect kept), centred, void padding.
- Targets from the *output* mask: ``tags[k] = [count_k > 0]``,
  ``size[k] = [count_k > common.LARGE_FRACTION * H * W]`` (void never counts).

Batches are dicts of numpy arrays (see :func:`make_loader`). Shuffling and augmentation are
deterministic in ``seed``; the iterator's ``get_state``/``set_state`` resume exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from ccnn_jax.data import common

TRAIN_SCALE_RANGE = (0.8, 1.25)
"""Random rescale factor range (relative to the cover scale), drawn log-uniformly."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and constraint builder need to know about a dataset."""

    name: str
    class_names: list[str]
    num_classes: int
    background: int | None


def _ccnn_builder_names(cls) -> set[str]:
    """Names of the builder classes defined in ccnn_jax modules (subclasses of ``cls``)."""
    names = set()
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("ccnn_jax.") and not inspect.isabstract(sub):
            names.add(sub.name)
        names |= _ccnn_builder_names(sub)
    return names


def _builder(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
    import ccnn_jax.data  # noqa: F401  (registers the builders)

    try:
        return tfds.builder(name, data_dir=data_dir, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        ours = sorted(_ccnn_builder_names(tfds.core.DatasetBuilder))
        raise ValueError(
            f"name: unknown dataset {name!r}; ccnn_jax registers {ours} "
            "(add '/<config>' for a builder config, e.g. 'ccnn_synthetic/tiny')"
        ) from None
    except ValueError as e:  # e.g. an unknown config name
        raise ValueError(f"name: cannot build dataset {name!r}: {e}") from None


def _meta_from_info(name: str, info: tfds.core.DatasetInfo) -> DatasetMeta:
    features = info.features
    missing = {"image", "segmentation_mask", "labels"} - set(features.keys())
    if missing:
        raise ValueError(
            f"name: dataset {name!r} lacks the common segmentation features {sorted(missing)} "
            "(see ccnn_jax/data/common.py)"
        )
    names = list(features["labels"].feature.names)
    background = 0 if names and names[0].lower() == "background" else None
    return DatasetMeta(name=name, class_names=names, num_classes=len(names), background=background)


def dataset_meta(name: str, data_dir: str | None = None) -> DatasetMeta:
    """Class names, K and the background index (0 if class 0 is "background", else None)."""
    return _meta_from_info(name, _builder(name, data_dir).info)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> None:
    """``download_and_prepare`` the dataset as array_record (no-op if already prepared).

    ``manual_dir`` is where the real-dataset builders look for the user's downloads; the
    synthetic builder generates its data locally and ignores it.
    """
    builder = _builder(name, data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config, file_format="array_record")


# ----------------------------------------------------------------------------- transforms


def _sample(
    image_hxwx3: np.ndarray,
    mask_hxw: np.ndarray,
    out_hw: tuple[int, int],
    scale: float,
    offset_yx: tuple[float, float],
    flip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine resample (scale, offset, optional h-flip) to ``out_hw``: image bilinear, mask nearest.

    Returns image float32 (H, W, 3) in [0, 255], mask uint8 (H, W) and ``inside`` bool (H, W),
    False where the output pixel lies outside the source (padding: image 0, mask void).
    """
    out_h, out_w = out_hw
    h, w = mask_hxw.shape
    ys = (np.arange(out_h, dtype=np.float32) + 0.5 - offset_yx[0]) / scale - 0.5
    xs = (np.arange(out_w, dtype=np.float32) + 0.5 - offset_yx[1]) / scale - 0.5
    if flip:
        xs = xs[::-1]
    # mask: nearest neighbour, void outside the source
    iy, ix = np.floor(ys + 0.5).astype(np.int64), np.floor(xs + 0.5).astype(np.int64)
    oky, okx = (iy >= 0) & (iy < h), (ix >= 0) & (ix < w)
    mask = mask_hxw[np.clip(iy, 0, h - 1)][:, np.clip(ix, 0, w - 1)]
    inside = oky[:, None] & okx[None, :]
    if not inside.all():
        mask = np.where(inside, mask, np.uint8(common.VOID))
    # image: bilinear (box prefilter by an integer factor when shrinking by more than 2x)
    img = image_hxwx3
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor > 1:
        img = np.asarray(Image.fromarray(img).reduce(factor))
        ys, xs = (ys + 0.5) / factor - 0.5, (xs + 0.5) / factor - 0.5
    ih, iw = img.shape[:2]
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    y0c, y1c = np.clip(y0, 0, ih - 1), np.clip(y0 + 1, 0, ih - 1)
    x0c, x1c = np.clip(x0, 0, iw - 1), np.clip(x0 + 1, 0, iw - 1)
    img = img.astype(np.float32)
    rows = img[y0c] * (1 - wy) + img[y1c] * wy  # (H, iw, 3)
    out = rows[:, x0c] * (1 - wx) + rows[:, x1c] * wx
    if not inside.all():
        out = out * inside[..., None]
    return out, mask, inside


def _targets(mask_hxw: np.ndarray, num_classes: int, filename) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot tags (K,) and size hints (K,) from a mask; unknown label values raise."""
    counts = np.bincount(mask_hxw.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes : common.VOID])
    if bad.size:
        raise ValueError(
            f"mask of {filename!r}: label values {(bad + num_classes).tolist()} are neither a "
            f"class index in [0, {num_classes}) nor void ({common.VOID})"
        )
    counts = counts[:num_classes]
    tags = (counts > 0).astype(np.float32)
    size = (counts > common.LARGE_FRACTION * mask_hxw.size).astype(np.float32)
    return tags, size


def _check_example(ex: dict) -> tuple[np.ndarray, np.ndarray]:
    image, mask = ex["image"], ex["segmentation_mask"]
    if mask.ndim == 3:
        mask = mask[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(
            f"example {ex.get('image/filename')!r}: image {image.shape} and mask {mask.shape} "
            "do not match (expected (H, W, 3) and (H, W, 1))"
        )
    return image, mask


def _finish(image, mask, inside, num_classes, filename) -> dict:
    tags, size = _targets(mask, num_classes, filename)
    return {
        "image": image * np.float32(1 / 255),
        "pixels": inside.astype(np.float32),
        "mask": mask.astype(np.int32),
        "tags": tags,
        "size": size,
        "valid": np.float32(1.0),
    }


@dataclasses.dataclass(frozen=True)
class _EvalTransform(grain.MapTransform):
    """Fit inside the output size (aspect kept), centred, void padding."""

    image_size: tuple[int, int]
    num_classes: int

    def map(self, ex):
        image, mask = _check_example(ex)
        (out_h, out_w), (h, w) = self.image_size, mask.shape
        s = min(out_h / h, out_w / w)
        off = ((out_h - h * s) / 2, (out_w - w * s) / 2)
        image, mask, inside = _sample(image, mask, self.image_size, s, off, False)
        return _finish(image, mask, inside, self.num_classes, ex.get("image/filename"))


@dataclasses.dataclass(frozen=True)
class _TrainTransform(grain.RandomMapTransform):
    """Random rescale (cover scale times log-uniform factor), random crop/pad, random h-flip."""

    image_size: tuple[int, int]
    num_classes: int
    scale_range: tuple[float, float] = TRAIN_SCALE_RANGE

    def random_map(self, ex, rng: np.random.Generator):
        image, mask = _check_example(ex)
        (out_h, out_w), (h, w) = self.image_size, mask.shape
        lo, hi = self.scale_range
        s = max(out_h / h, out_w / w) * math.exp(rng.uniform(math.log(lo), math.log(hi)))
        dy, dx = out_h - h * s, out_w - w * s  # < 0: crop, > 0: pad
        off = (rng.uniform(min(0.0, dy), max(0.0, dy)), rng.uniform(min(0.0, dx), max(0.0, dx)))
        flip = bool(rng.integers(2))
        image, mask, inside = _sample(image, mask, self.image_size, s, off, flip)
        return _finish(image, mask, inside, self.num_classes, ex.get("image/filename"))


@dataclasses.dataclass(frozen=True)
class _PadAndStack:
    """grain batch_fn: stack examples, padding a short batch with all-void, valid=0 examples."""

    batch_size: int

    def __call__(self, examples: Sequence[dict]) -> dict:
        examples = list(examples)
        if len(examples) < self.batch_size:
            first = examples[0]
            pad = {k: np.zeros_like(v) for k, v in first.items()}
            pad["mask"] = np.full_like(first["mask"], common.VOID)
            examples += [pad] * (self.batch_size - len(examples))
        return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------- loader


def make_loader(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    batch_size: int,
    image_size: tuple[int, int],
    train: bool,
    seed: int,
    num_epochs: int | None = None,
    shard_by_process: bool = True,
    worker_count: int = 0,
    scale_range: tuple[float, float] = TRAIN_SCALE_RANGE,
) -> grain.DataLoader:
    """A grain ``DataLoader`` of fixed-shape batches from a prepared dataset.

    Args:
      name: TFDS name, e.g. ``"ccnn_synthetic/default"``; must be prepared (see :func:`prepare`).
      split: e.g. ``"train"``, ``"validation"``, or a TFDS slice such as ``"train[:10%]"``.
      batch_size: B (per JAX process).
      image_size: output (H, W).
      train: random augmentation, shuffling, drop the last partial batch; otherwise fit-resize,
        dataset order, pad the last batch with all-void ``valid = 0`` examples.
      seed: shuffling and augmentation seed.
      num_epochs: passes over the split; ``None`` = forever for train and 1 for eval.
      shard_by_process: give each JAX process a disjoint shard (``grain.ShardByJaxProcess``).
      worker_count: grain worker processes (0 = in the calling process).
      scale_range: (lo, hi) of the random rescale factor when training, e.g. (1, 1) for
        flips only.
    Returns:
      Iterable whose iterator yields dicts ``image`` float32 (B, H, W, 3) in [0, 1], ``pixels``
      float32 (B, H, W) (1 where the pixel comes from the image, 0 on augmentation padding:
      not label information), ``mask`` int32 (B, H, W) (255 = void), ``tags`` float32 (B, K),
      ``size`` float32 (B, K), ``valid`` float32 (B,), and has ``get_state()`` /
      ``set_state(state)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    image_size = tuple(int(x) for x in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size: expected (H, W) with H, W >= 1, got {image_size}")
    builder = _builder(name, data_dir)
    meta = _meta_from_info(name, builder.info)
    if split.split("[", 1)[0] not in builder.info.splits:
        raise ValueError(
            f"split: {split!r} is not a split of {name!r} in {builder.data_dir} "
            f"(available: {sorted(builder.info.splits.keys()) or 'none: not prepared'})"
        )
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # not prepared, or prepared in a non-random-access format
        raise ValueError(
            f"name: cannot read {name!r} split {split!r} from {builder.data_dir} ({e}); "
            f"run ccnn_jax.data.pipeline.prepare({name!r}, data_dir=...) first"
        ) from None
    if num_epochs is None and not train:
        num_epochs = 1
    shard = (
        grain.ShardByJaxProcess(drop_remainder=train) if shard_by_process else grain.NoSharding()
    )
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=train,
        num_epochs=num_epochs,
        seed=seed,
    )
    if train:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < lo <= hi, got {scale_range}")
        transform = _TrainTransform(image_size, meta.num_classes, (lo, hi))
    else:
        transform = _EvalTransform(image_size, meta.num_classes)
    batch = grain.Batch(
        batch_size=batch_size, drop_remainder=train, batch_fn=_PadAndStack(batch_size)
    )
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app, use their defaults.
        flags.FLAGS.mark_as_parsed()
    # One reader thread: grain's default (16 threads) costs ~1.5x the CPU per batch on 2 cores.
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(16, 2 * batch_size))
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, batch],
        worker_count=worker_count,
        read_options=read,
    )
