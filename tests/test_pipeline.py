"""Tests of the grain input pipeline on ccnn_synthetic/tiny (48 train, 16 validation, 32x32)."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccnn_jax.data import common, pipeline
from ccnn_jax.data.pipeline import _sample

NAME = "ccnn_synthetic/tiny"
K = 9


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare(NAME, data_dir=path)
    return path


def _loader(data_dir, split="train", **kw):
    args = dict(data_dir=data_dir, batch_size=8, image_size=(32, 32), train=True, seed=0)
    args.update(kw)
    return pipeline.make_loader(NAME, split, **args)


def _take(it, n):
    return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_dataset_meta(data_dir):
    meta = pipeline.dataset_meta(NAME, data_dir=data_dir)
    assert meta.num_classes == K == len(meta.class_names)
    assert meta.class_names[0] == "background" and meta.background == 0
    assert meta.name == NAME


@pytest.mark.parametrize("train", [True, False])
def test_batch_shapes_dtypes_ranges_and_targets(data_dir, train):
    image_size = (24, 40)
    split = "train" if train else "validation"
    loader = _loader(data_dir, split, train=train, batch_size=4, image_size=image_size)
    batches = _take(iter(loader), 3)
    assert len(batches) == 3
    for b in batches:
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, 24, 40, 3)
        assert b["mask"].dtype == np.int32 and b["mask"].shape == (4, 24, 40)
        assert b["tags"].dtype == np.float32 and b["tags"].shape == (4, K)
        assert b["size"].dtype == np.float32 and b["size"].shape == (4, K)
        assert b["valid"].dtype == np.float32 and b["valid"].shape == (4,)
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert set(np.unique(b["mask"])) <= set(range(K)) | {common.VOID}
        for mask, tags, size in zip(b["mask"], b["tags"], b["size"], strict=True):
            present = sorted(set(np.unique(mask).tolist()) - {common.VOID})
            assert np.flatnonzero(tags).tolist() == present
            counts = np.bincount(mask[mask != common.VOID], minlength=K)
            np.testing.assert_array_equal(size, (counts > 0.1 * mask.size).astype(np.float32))
        np.testing.assert_array_equal(b["valid"], np.ones(4, np.float32))


def test_eval_at_native_size_reproduces_stored_examples_and_pads(data_dir):
    source = tfds.data_source(NAME, split="validation", data_dir=data_dir)
    loader = _loader(data_dir, "validation", train=False, batch_size=5)
    batches = list(loader)  # eval: one pass (num_epochs=None means 1 for eval)
    assert len(batches) == 4  # 16 examples -> 5 + 5 + 5 + 1 (padded)
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [1.0] * 16 + [0.0] * 4)
    masks = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    tags = np.concatenate([b["tags"] for b in batches])
    for i in range(16):  # dataset order, pixels intact (void included)
        ex = source[i]
        np.testing.assert_array_equal(masks[i], ex["segmentation_mask"][..., 0].astype(np.int32))
        np.testing.assert_allclose(images[i] * 255, ex["image"], atol=1e-3)
        assert np.flatnonzero(tags[i]).tolist() == [int(x) for x in ex["labels"]]
    assert (masks[16:] == common.VOID).all()
    assert not tags[16:].any() and not images[16:].any()


def test_split_slice_reads_only_that_subset(data_dir):
    """A TFDS slice (e.g. a labelled subset "train[:10%]") reads the first records only."""
    source = tfds.data_source(NAME, split="validation", data_dir=data_dir)
    batches = list(_loader(data_dir, "validation[:6]", train=False, batch_size=4))
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [1.0] * 6 + [0.0] * 2)
    masks = np.concatenate([b["mask"] for b in batches])
    for i in range(6):
        np.testing.assert_array_equal(
            masks[i], source[i]["segmentation_mask"][..., 0].astype(np.int32)
        )
    with pytest.raises(ValueError, match="split: 'test\\[:6\\]' is not a split"):
        _loader(data_dir, "test[:6]")


def test_sample_geometry_keeps_void():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, K, (6, 8)).astype(np.uint8)
    mask[2, :] = common.VOID
    image = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    img, m, inside = _sample(image, mask, (6, 8), 1.0, (0.0, 0.0), False)
    assert inside.all()
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(img, image, atol=1e-3)
    img, m, _ = _sample(image, mask, (6, 8), 1.0, (0.0, 0.0), True)
    np.testing.assert_array_equal(m, mask[:, ::-1])
    np.testing.assert_allclose(img, image[:, ::-1], atol=1e-3)
    # 2x upscale, shifted by one source pixel: nearest-neighbour blocks, void rows stay void
    img, m, _ = _sample(image, mask, (8, 8), 2.0, (-2.0, -2.0), False)
    np.testing.assert_array_equal(m, np.kron(mask[1:5, 1:5], np.ones((2, 2), np.uint8)))
    # shrink into a larger canvas: outside pixels are void / black
    img, m, inside = _sample(image, mask, (10, 12), 1.0, (2.0, 3.0), False)
    np.testing.assert_array_equal(m[2:8, 3:11], mask)
    assert (m[:2] == common.VOID).all() and (m[:, :3] == common.VOID).all()
    assert (img[:2] == 0).all()
    # the padding map marks exactly the pixels outside the source (not the dataset's void)
    expected = np.zeros((10, 12), bool)
    expected[2:8, 3:11] = True
    np.testing.assert_array_equal(inside, expected)


def test_augmentation_preserves_void_pixels(data_dir):
    """Training masks still carry the dataset's void band; another seed gives other crops."""
    batches = _take(iter(_loader(data_dir, batch_size=16)), 3)
    masks = np.concatenate([b["mask"] for b in batches])
    assert (masks == common.VOID).mean() > 0.01
    flips = _take(iter(_loader(data_dir, batch_size=16, seed=1)), 1)[0]
    assert not np.array_equal(flips["mask"], batches[0]["mask"])


def test_deterministic_order_from_seed(data_dir):
    a = _take(iter(_loader(data_dir)), 4)
    b = _take(iter(_loader(data_dir)), 4)
    c = _take(iter(_loader(data_dir, seed=1)), 4)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_train_repeats_and_shuffles_epochs(data_dir):
    # 48 examples, batch 8: 6 batches per epoch; the second epoch is a different permutation
    batches = _take(iter(_loader(data_dir)), 12)
    assert len(batches) == 12
    finite = list(_loader(data_dir, num_epochs=1))
    assert len(finite) == 6


def test_resume_from_state(data_dir):
    it = iter(_loader(data_dir))
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)  # crosses the epoch boundary at batch 6
    fresh = iter(_loader(data_dir))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_shard_by_process_single_process_sees_everything(data_dir):
    a = list(_loader(data_dir, "validation", train=False, batch_size=4))
    b = list(_loader(data_dir, "validation", train=False, batch_size=4, shard_by_process=False))
    _assert_batches_equal(a, b)


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="name: unknown dataset 'no_such_dataset'"):
        pipeline.make_loader(
            "no_such_dataset",
            "train",
            data_dir=data_dir,
            batch_size=2,
            image_size=(8, 8),
            train=True,
            seed=0,
        )
    with pytest.raises(ValueError, match="split: 'test' is not a split"):
        _loader(data_dir, "test")
    with pytest.raises(ValueError, match="not prepared"):  # empty data_dir
        _loader(str(tmp_path), "train")
    with pytest.raises(ValueError, match="batch_size"):
        _loader(data_dir, batch_size=0)
    with pytest.raises(ValueError, match="name: unknown dataset"):
        pipeline.dataset_meta("no_such_dataset", data_dir=data_dir)
