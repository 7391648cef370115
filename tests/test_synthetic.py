"""Tests of the ccnn_synthetic generator and TFDS builder (tiny config, tmp data dirs)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccnn_jax.data import common, pipeline, shapes, synthetic

NAME = "ccnn_synthetic/tiny"
K = len(synthetic.CLASS_NAMES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    pipeline.prepare(NAME, data_dir=str(path))
    return str(path)


@pytest.fixture(scope="module")
def scenes():
    """400 default-config (64x64) scenes straight from the generator (no TFDS)."""
    cfg = synthetic.SyntheticConfig(name="default")
    return [synthetic.generate_scene(7, "train", i, cfg) for i in range(400)]


def _all_examples(data_dir):
    ds = tfds.data_source(NAME, data_dir=data_dir)
    return {split: [ds[split][i] for i in range(len(ds[split]))] for split in ds}


def test_generator_is_deterministic_in_seed():
    cfg = synthetic.SyntheticConfig(name="t", image_size=48)
    a = synthetic.generate_scene(3, "train", 5, cfg)
    b = synthetic.generate_scene(3, "train", 5, cfg)
    c = synthetic.generate_scene(4, "train", 5, cfg)
    d = synthetic.generate_scene(3, "validation", 5, cfg)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.tobytes() != d.image.tobytes()


def test_builder_same_seed_same_bytes(data_dir, tmp_path):
    pipeline.prepare(NAME, data_dir=str(tmp_path))
    first, second = _all_examples(data_dir), _all_examples(str(tmp_path))
    assert set(first) == {"train", "validation"}
    assert len(first["train"]) == 48 and len(first["validation"]) == 16
    for split in first:
        for ex1, ex2 in zip(first[split], second[split], strict=True):
            assert ex1["image"].tobytes() == ex2["image"].tobytes()
            assert ex1["segmentation_mask"].tobytes() == ex2["segmentation_mask"].tobytes()
            assert ex1["image/filename"] == ex2["image/filename"]


def test_stored_examples_match_generator_and_tags_match_masks(data_dir):
    builder = tfds.builder(NAME, data_dir=data_dir)
    cfg = builder.builder_config
    for split, examples in _all_examples(data_dir).items():
        filenames = sorted(ex["image/filename"].decode() for ex in examples)
        assert filenames == [f"{split}_{i:06d}" for i in range(len(examples))]
        for ex in examples:
            idx = int(ex["image/filename"].decode().split("_")[-1])
            scene = synthetic.generate_scene(cfg.seed, split, idx, cfg)
            mask = ex["segmentation_mask"][..., 0]
            assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"], scene.image)
            np.testing.assert_array_equal(mask, scene.mask)
            present = sorted(set(np.unique(mask).tolist()) - {common.VOID})
            assert [int(x) for x in ex["labels"]] == present
            counts = np.bincount(mask.ravel(), minlength=256)
            large = [c for c in present if counts[c] > 0.1 * mask.size]
            assert [int(x) for x in ex["large"]] == large


def test_class_frequencies_and_object_sizes(scenes):
    counts = np.zeros(K)
    for s in scenes:
        counts[s.labels] += 1
    fg = counts[1:]
    assert counts[0] >= 0.95 * len(scenes)  # background nearly always visible
    assert fg.min() > 0, f"a class never appears: {fg}"
    assert fg.max() < 2.0 * fg.min(), f"class frequencies too unbalanced: {fg}"
    objects = [len(s.object_classes) for s in scenes]
    assert set(objects) == {1, 2, 3}
    frac = np.array(
        [np.mean(s.instances == j) for s in scenes for j in range(len(s.object_classes))]
    )
    assert frac.min() > 0  # every object keeps visible pixels
    assert np.mean(frac < 0.05) > 0.08 and np.mean(frac > 0.3) > 0.1  # < 5% to > 30%
    # large hints match the masks and occur for foreground classes
    assert any(c != 0 for s in scenes for c in s.large)


def test_background_share_is_voc_like(scenes):
    """The original CCNN's background bounds [0.3, 0.7] hold for most images, as on VOC."""
    bg = np.array([np.mean(s.mask == 0) for s in scenes])
    assert 0.45 < np.median(bg) < 0.7
    assert np.mean((bg >= 0.3) & (bg <= 0.7)) > 0.8


@pytest.mark.parametrize("name", ["objects", "objects_easy"])
def test_classification_sets_hold_one_object(name):
    cfg = next(c for c in synthetic.CcnnSynthetic.BUILDER_CONFIGS if c.name == name)
    scenes = [synthetic.generate_scene(0, "train", i, cfg) for i in range(200)]
    assert all(len(s.object_classes) == 1 for s in scenes)
    assert all(s.labels == [0, s.object_classes[0]] for s in scenes)
    classes = np.bincount([s.object_classes[0] for s in scenes], minlength=K)[1:]
    assert classes.min() > 10  # every shape occurs
    area = np.array([np.mean(s.instances == 0) for s in scenes])
    assert np.percentile(area, 5) > 0.08 and np.percentile(area, 95) < 0.65
    if name == "objects_easy":  # smooth fills, no clutter: few edges inside object/background
        assert {s.background for s in scenes} <= {*shapes.SMOOTH_TEXTURES, "waves", "speckle"}


def test_partial_occlusion_occurs(scenes):
    occ = np.array([o for s in scenes for o in s.occluded])
    assert np.mean(occ > 0.05) > 0.1  # some objects are partly hidden ...
    assert occ.max() <= 0.5  # ... but each keeps at least half of its area
    for s in scenes:
        for j, cls in enumerate(s.object_classes):
            assert (s.mask[s.instances == j] == cls).all()


def test_mean_object_colour_does_not_predict_class(scenes):
    """Nearest-centroid on mean RGB of each object's pixels is near chance (1/8)."""
    feats, labels = [], []
    for s in scenes:
        for j, cls in enumerate(s.object_classes):
            feats.append(s.image[s.instances == j].mean(axis=0) / 255.0)
            labels.append(cls)
    feats, labels = np.array(feats), np.array(labels)
    assert len(labels) > 600
    half = len(labels) // 2
    centroids = np.stack([feats[:half][labels[:half] == c].mean(0) for c in range(1, K)])
    dist = ((feats[half:, None, :] - centroids[None]) ** 2).sum(-1)
    acc = np.mean(dist.argmin(1) + 1 == labels[half:])
    assert acc < 0.2, f"colour predicts the class: accuracy {acc:.3f} (chance 0.125)"
    # the same classifier on a shape statistic (fill ratio of the bounding box) does better
    fill = []
    for s in scenes:
        for j in range(len(s.object_classes)):
            ys, xs = np.nonzero(s.instances == j)
            fill.append(len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    fill = np.array(fill)[:, None]
    c_fill = np.stack([fill[:half][labels[:half] == c].mean(0) for c in range(1, K)])
    acc_fill = np.mean(
        ((fill[half:, None] - c_fill[None]) ** 2).sum(-1).argmin(1) + 1 == labels[half:]
    )
    assert acc_fill > acc + 0.05


def test_context_bias(scenes):
    for name, texture in synthetic.CONTEXT_TEXTURE.items():
        cls = synthetic.CLASS_NAMES.index(name)
        with_cls = [s.background == texture for s in scenes if cls in s.object_classes]
        without = [
            s.background == texture
            for s in scenes
            if not set(s.object_classes)
            & {synthetic.CLASS_NAMES.index(n) for n in synthetic.CONTEXT_TEXTURE}
        ]
        assert np.mean(with_cls) > 0.6, name
        assert np.mean(without) < 0.15, name


def test_void_band_outside_objects():
    cfg0 = synthetic.SyntheticConfig(name="t", image_size=48, void_width=0)
    cfg1 = synthetic.SyntheticConfig(name="t", image_size=48, void_width=1)
    for i in range(20):
        s0 = synthetic.generate_scene(1, "train", i, cfg0)
        s1 = synthetic.generate_scene(1, "train", i, cfg1)
        assert not (s0.mask == common.VOID).any()
        void = s1.mask == common.VOID
        assert void.any()
        # same scene; void only replaces pixels that are not visible pixels of the top object
        np.testing.assert_array_equal(s0.image, s1.image)
        np.testing.assert_array_equal(s1.mask[~void], s0.mask[~void])
        # each void pixel borders a different object instance (or background/object boundary)
        m = s0.instances.astype(int)
        diff = np.zeros_like(void)
        diff[1:] |= m[1:] != m[:-1]
        diff[:-1] |= m[:-1] != m[1:]
        diff[:, 1:] |= m[:, 1:] != m[:, :-1]
        diff[:, :-1] |= m[:, :-1] != m[:, 1:]
        assert (diff[void]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_scene(0, "training", 0)
    with pytest.raises(ValueError, match="shape name"):
        shapes.shape_inside("hexagon", np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate_scene(0, "train", 0, synthetic.SyntheticConfig(name="t", image_size=4))
