"""The street-scene config of ccnn_synthetic: generator statistics and the TFDS builder (tiny)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccnn_jax.data import common, pipeline, streets, synthetic

NAME = "ccnn_synthetic/streets_tiny"
K = len(streets.CLASS_NAMES)
CONFIG = synthetic.SyntheticConfig(name="streets", scene="streets")


@pytest.fixture(scope="module")
def scenes():
    """300 scenes of the ``streets`` config (64x64) straight from the generator."""
    return [streets.generate_scene(5, "train", i, CONFIG) for i in range(300)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    pipeline.prepare(NAME, data_dir=str(path))
    return str(path)


def test_generator_is_deterministic_in_seed_split_and_index():
    a = streets.generate_scene(3, "train", 5, CONFIG)
    b = streets.generate_scene(3, "train", 5, CONFIG)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    for other in (streets.generate_scene(4, "train", 5, CONFIG),
                  streets.generate_scene(3, "validation", 5, CONFIG),
                  streets.generate_scene(3, "train", 6, CONFIG)):  # fmt: skip
        assert a.image.tobytes() != other.image.tobytes()


def test_scene_fields_are_consistent(scenes):
    for s in scenes[:50]:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.uint8
        assert set(np.unique(s.mask).tolist()) <= set(range(K)) | {common.VOID}
        labelled = s.mask != common.VOID
        lut = np.array(s.region_classes)
        np.testing.assert_array_equal(s.mask[labelled], lut[s.regions[labelled]])
        assert s.labels == sorted(set(np.unique(s.mask).tolist()) - {common.VOID})
        counts = np.bincount(s.mask.ravel(), minlength=256)
        assert s.large == [k for k in s.labels if counts[k] > 0.1 * s.mask.size]


def test_void_band_is_one_pixel_at_class_boundaries(scenes):
    s = scenes[0]
    void = s.mask == common.VOID
    assert 0.02 < void.mean() < 0.15
    full = np.array(s.region_classes)[s.regions]  # the mask before the void band
    for y, x in zip(*np.nonzero(void), strict=True):
        neighbours = [full[y + dy, x + dx] for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
                      if 0 <= y + dy < 64 and 0 <= x + dx < 64]  # fmt: skip
        assert any(n != full[y, x] for n in neighbours), (y, x)


def test_most_classes_in_most_images_and_some_classes_small(scenes):
    present = np.zeros((len(scenes), K), bool)
    share = np.zeros((len(scenes), K))
    for i, s in enumerate(scenes):
        present[i, s.labels] = True
        share[i] = np.bincount(s.mask.ravel(), minlength=256)[:K] / s.mask.size
    per_image = present.sum(axis=1)
    assert per_image.mean() >= 7.5, per_image.mean()  # of 11
    assert np.mean(per_image >= 7) > 0.8
    frequency = present.mean(axis=0)
    assert frequency.min() > 0.3, dict(zip(streets.CLASS_NAMES, frequency.round(2)))
    big = [streets.SKY, streets.BUILDING, streets.ROAD, streets.SIDEWALK]
    assert (frequency[big] > 0.95).all()
    # small classes: the median share where present is under 2% of the image
    for k in (streets.POLE, streets.SIGN, streets.PEDESTRIAN, streets.BICYCLIST, streets.FENCE):
        assert np.median(share[present[:, k], k]) < 0.02, streets.CLASS_NAMES[k]
    assert share[:, big].sum(axis=1).mean() > 0.6


def test_layout_sky_above_road_and_objects_on_the_ground(scenes):
    rows = np.arange(64)[:, None] * np.ones((1, 64))
    for s in scenes[:100]:
        sky, road = s.mask == streets.SKY, s.mask == streets.ROAD
        assert rows[sky].mean() < rows[road].mean()
        if (s.mask == streets.CAR).any():
            assert rows[s.mask == streets.CAR].max() > rows[sky].min()


def _region_features(scenes):
    colours, positions, labels = [], [], []
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for s in scenes:
        for j, cls in enumerate(s.region_classes):
            visible = (s.regions == j) & (s.mask != common.VOID)
            if visible.sum() < 4:
                continue
            colours.append(s.image[visible].mean(axis=0) / 255.0)
            positions.append([yy[visible].mean(), xx[visible].mean(), np.sqrt(visible.mean())])
            labels.append(cls)
    return np.array(colours), np.array(positions), np.array(labels)


def _nearest_mean_accuracy(features, labels):
    """Balanced accuracy of nearest-class-mean on the second half, means from the first half."""
    half = len(labels) // 2
    classes = np.unique(labels[:half])
    means = np.stack([features[:half][labels[:half] == c].mean(axis=0) for c in classes])
    pred = classes[((features[half:, None] - means[None]) ** 2).sum(-1).argmin(1)]
    truth = labels[half:]
    return np.mean([np.mean(pred[truth == c] == c) for c in classes if (truth == c).any()])


def test_mean_region_colour_does_not_predict_the_class(scenes):
    """Nearest-class-mean on each region's mean RGB is near chance (1/11); position is not."""
    colours, positions, labels = _region_features(scenes)
    assert len(labels) > 2000 and len(np.unique(labels)) == K
    colour_acc = _nearest_mean_accuracy(colours, labels)
    assert colour_acc < 0.16, f"mean colour predicts the class: balanced accuracy {colour_acc:.3f}"
    position_acc = _nearest_mean_accuracy(positions, labels)
    assert position_acc > colour_acc + 0.15, (position_acc, colour_acc)


def test_builder_features_and_class_names(data_dir):
    builder = tfds.builder(NAME, data_dir=data_dir)
    assert builder.info.features["labels"].feature.names == list(streets.CLASS_NAMES)
    assert builder.info.features["large"].feature.names == list(streets.CLASS_NAMES)
    meta = pipeline.dataset_meta(NAME, data_dir=data_dir)
    assert meta.background is None and meta.num_classes == K  # no background class
    cfg = builder.builder_config
    ds = tfds.data_source(NAME, data_dir=data_dir)
    assert {split: len(ds[split]) for split in ds} == {"train": 48, "validation": 16}
    for split in ds:
        for i in range(len(ds[split])):
            ex = ds[split][i]
            name = ex["image/filename"].decode()
            scene = streets.generate_scene(cfg.seed, split, int(name.split("_")[-1]), cfg)
            assert name.startswith(split)
            np.testing.assert_array_equal(ex["image"], scene.image)
            np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], scene.mask)
            assert [int(t) for t in ex["labels"]] == scene.labels
            assert [int(t) for t in ex["large"]] == scene.large


def test_unknown_scene_kind_is_an_error():
    with pytest.raises(ValueError, match="config.scene"):
        synthetic.scene_generator(synthetic.SyntheticConfig(name="x", scene="forest"))
    with pytest.raises(ValueError, match="image_size"):
        streets.generate_scene(0, "train", 0, synthetic.SyntheticConfig(name="x", image_size=8))
