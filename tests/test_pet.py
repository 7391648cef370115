"""oxford_iiit_pet adapter: the trimap/species mapping, and ccnn_oxford_pet on a fake source.

The fake source is a builder with the name, version and features of TFDS's
``oxford_iiit_pet`` (so ``tfds.builder("oxford_iiit_pet", data_dir=tmp)`` finds it), prepared
as array_record from in-memory examples: no TensorFlow, no download.
"""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ccnn_jax.data import checks, pet

H, W = 24, 32


def fake_trimap(index: int) -> np.ndarray:
    """Background (2) with a pet (1) rectangle outlined by border (3), placed by ``index``."""
    trimap = np.full((H, W), 2, np.uint8)
    y, x = 2 + index % 10, 3 + (5 * index) % 20
    trimap[y : y + 10, x : x + 9] = 3
    trimap[y + 1 : y + 9, x + 1 : x + 8] = 1
    return trimap


def expected_mask(trimap: np.ndarray, species: int) -> np.ndarray:
    return np.select([trimap == 1, trimap == 2], [1 + species, 0], 255).astype(np.uint8)


def fake_example(index: int, species: int) -> dict:
    rng = np.random.default_rng(index)
    return {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "segmentation_mask": fake_trimap(index)[..., None],
        "species": np.int64(species),
        "label": np.int64(index % 37),
        "file_name": f"pet_{index}.jpg".encode(),
    }


def convert(ex: dict) -> dict:
    """The builder's conversion of a fake example, encoded as the source stores it."""
    trimap = np.asarray(ex["segmentation_mask"])
    encoded = {
        **ex,
        "image": _png(ex["image"]),
        "segmentation_mask": _png(trimap[..., 0] if trimap.ndim == 3 else trimap),
    }
    key, out = pet.convert_example(encoded)
    assert key == out["image/filename"]
    with Image.open(io.BytesIO(out["segmentation_mask"])) as im:
        mask = np.asarray(im)
    return {**out, "image": _decoded(out["image"]), "segmentation_mask": mask[..., None]}


@pytest.mark.parametrize("species", [0, 1], ids=["cat", "dog"])
def test_convert_example_maps_trimap(species):
    ex = fake_example(3, species)
    out = convert(ex)
    trimap = ex["segmentation_mask"][..., 0]
    assert out["segmentation_mask"].shape == (H, W, 1)
    assert out["segmentation_mask"].dtype == np.uint8
    mask = out["segmentation_mask"][..., 0]
    np.testing.assert_array_equal(mask[trimap == 1], 1 + species)
    np.testing.assert_array_equal(mask[trimap == 2], 0)
    np.testing.assert_array_equal(mask[trimap == 3], 255)
    np.testing.assert_array_equal(mask, expected_mask(trimap, species))
    assert out["labels"] == [0, 1 + species]
    np.testing.assert_array_equal(out["image"], ex["image"])
    assert out["image/filename"] == "pet_3.jpg"
    assert pet.CLASS_NAMES[1 + species] == pet.SPECIES_NAMES[species].lower()


def test_convert_example_accepts_2d_trimap_and_all_border():
    ex = fake_example(1, 1)
    ex["segmentation_mask"] = np.full((H, W), 3, np.uint8)
    out = convert(ex)
    assert (out["segmentation_mask"] == 255).all() and out["labels"] == []


def test_convert_example_bad_input_names_the_file():
    ex = fake_example(2, 0)
    ex["segmentation_mask"] = ex["segmentation_mask"].copy()
    ex["segmentation_mask"][0, 0, 0] = 0
    ex["segmentation_mask"][0, 1, 0] = 7
    with pytest.raises(checks.BadInputError, match=r"pet_2.jpg: unknown label values \[0, 7\]"):
        convert(ex)
    ex = fake_example(2, 0)
    ex["species"] = np.int64(2)
    with pytest.raises(checks.BadInputError, match="pet_2.jpg: species"):
        convert(ex)
    ex = fake_example(2, 0)
    ex["segmentation_mask"] = ex["segmentation_mask"][:-1]
    with pytest.raises(checks.BadInputError, match="pet_2.jpg"):
        convert(ex)


# ------------------------------------------------------------------------------------------
# ccnn_oxford_pet end to end on a fake prepared oxford_iiit_pet


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decoded(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


FAKE_SPLITS = {"train": [(0, 0), (1, 1), (2, 1)], "test": [(3, 0), (4, 1)]}


def prepare_fake_source(data_dir):
    """A prepared ``oxford_iiit_pet`` (array_record) with the features of TFDS's builder."""
    with tfds.core.registered.skip_registration():

        class FakeOxfordIiitPet(tfds.core.GeneratorBasedBuilder):
            name = "oxford_iiit_pet"
            VERSION = tfds.builder_cls("oxford_iiit_pet").VERSION

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(encoding_format="jpeg"),
                            "label": tfds.features.ClassLabel(num_classes=37),
                            "species": tfds.features.ClassLabel(names=pet.SPECIES_NAMES),
                            "file_name": tfds.features.Text(),
                            "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
                            "head_bbox": tfds.features.BBoxFeature(),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s) for s in FAKE_SPLITS}

            def _generate_examples(self, split):
                for index, species in FAKE_SPLITS[split]:
                    ex = fake_example(index, species)
                    yield (
                        index,
                        {
                            "image": _jpeg(ex["image"]),
                            "segmentation_mask": _png(ex["segmentation_mask"][..., 0]),
                            "species": species,
                            "label": index % 37,
                            "file_name": f"pet_{index}.jpg",
                            "head_bbox": tfds.features.BBox(0.1, 0.1, 0.5, 0.5),
                        },
                    )

    FakeOxfordIiitPet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_ccnn_oxford_pet_round_trip(tmp_path):
    source_dir, data_dir = tmp_path / "source", tmp_path / "data"
    prepare_fake_source(source_dir)
    builder = pet.CcnnOxfordPet(data_dir=str(data_dir), source_data_dir=str(source_dir))
    builder.download_and_prepare()
    assert builder.info.features["labels"].feature.names == ["background", "cat", "dog"]
    ds = tfds.data_source("ccnn_oxford_pet", data_dir=str(data_dir))
    assert set(ds) == {"train", "validation"}
    for ours, theirs in (("train", "train"), ("validation", "test")):
        got = {ds[ours][i]["image/filename"].decode(): ds[ours][i] for i in range(len(ds[ours]))}
        assert sorted(got) == sorted(f"pet_{i}.jpg" for i, _ in FAKE_SPLITS[theirs])
        for index, species in FAKE_SPLITS[theirs]:
            fake = fake_example(index, species)
            ex = got[f"pet_{index}.jpg"]
            np.testing.assert_array_equal(ex["image"], _decoded(_jpeg(fake["image"])))
            want = expected_mask(fake["segmentation_mask"][..., 0], species)
            np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], want)
            assert sorted(int(t) for t in ex["labels"]) == [0, 1 + species]


def test_missing_source_says_how_to_prepare_it(tmp_path):
    builder = pet.CcnnOxfordPet(data_dir=str(tmp_path / "data"))
    with pytest.raises(checks.MissingDownloadError, match=r"oxford_iiit_pet.*\n.*\[tf\]"):
        builder.download_and_prepare()
