"""voc_segmentation on fake downloads in the official layouts (tar and extracted tree)."""

import io

import fakes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ccnn_jax.data import checks, voc


def prepare(manual_dir, data_dir, config="voc2012"):
    builder = voc.VocSegmentation(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def read_back(data_dir, name="voc_segmentation"):
    ds = tfds.data_source(name, data_dir=str(data_dir))
    return {split: [src[i] for i in range(len(src))] for split, src in ds.items()}


def assert_round_trip(got, expected):
    """Every expected example is stored exactly once, with its own image and mask."""
    assert set(got) == set(expected)
    for split, examples in expected.items():
        by_name = {ex["image/filename"].decode(): ex for ex in got[split]}
        assert sorted(by_name) == sorted(f"{stem}.jpg" for stem in examples), split
        for stem, fake in examples.items():
            ex = by_name[f"{stem}.jpg"]
            np.testing.assert_array_equal(ex["image"], fake.image)  # decoded JPEG, exact
            np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], fake.mask)
            assert ex["segmentation_mask"].dtype == np.uint8
            tags = sorted(int(t) for t in ex["labels"])
            assert tags == sorted(set(np.unique(fake.mask).tolist()) - {255})


@pytest.mark.parametrize("as_tar", [True, False], ids=["tar", "tree"])
def test_round_trip(tmp_path, as_tar):
    expected = fakes.write_voc(tmp_path / "manual", as_tar=as_tar)
    assert (tmp_path / "manual" / fakes.VOC_TAR).exists() == as_tar
    # The fake has void outlines and several classes: the test can see if they are lost.
    assert all((fx.mask == 255).any() for s in expected.values() for fx in s.values())
    builder = prepare(tmp_path / "manual", tmp_path / "data")
    assert builder.info.features["labels"].feature.names == fakes.VOC_CLASSES
    assert_round_trip(read_back(tmp_path / "data"), expected)


def test_masks_are_palette_indices_not_colours(tmp_path):
    expected = fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_TRAIN[0]
    png = tmp_path / "manual/VOCdevkit/VOC2012/SegmentationClass" / f"{stem}.png"
    with Image.open(png) as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    assert not np.array_equal(rgb[..., 0], expected["train"][stem].mask)
    prepare(tmp_path / "manual", tmp_path / "data")
    got = read_back(tmp_path / "data")["train"]
    ex = next(e for e in got if e["image/filename"].decode() == f"{stem}.jpg")
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], expected["train"][stem].mask)


def test_sbd_augmented(tmp_path):
    manual = tmp_path / "manual"
    voc_ex = fakes.write_voc(manual, as_tar=False)
    # SBD train has a VOC train id, a VOC val id (must be dropped) and a new id; SBD val has
    # a new id whose image exists only in SBD's img/ folder.
    new = fakes.write_sbd(
        manual,
        voc=voc_ex,
        sbd_train=[fakes.VOC_TRAIN[0], fakes.VOC_VAL[0], "2011_000001"],
        sbd_val=["2011_000002"],
        sbd_only_images=["2011_000002"],
    )
    ids = voc.sbd_augmented_ids(
        fakes.VOC_TRAIN,
        fakes.VOC_VAL,
        [fakes.VOC_TRAIN[0], fakes.VOC_VAL[0], "2011_000001"],
        ["2011_000002"],
    )
    assert ids == sorted([*fakes.VOC_TRAIN, "2011_000001", "2011_000002"])
    prepare(manual, tmp_path / "data", config="sbd_augmented")
    got = read_back(tmp_path / "data", "voc_segmentation/sbd_augmented")
    # VOC masks win where VOC has one (the fake SBD copy of that mask is all background).
    expected = {"train": {**voc_ex["train"], **new}, "validation": voc_ex["validation"]}
    assert_round_trip(got, expected)


# ------------------------------------------------------------------------------------------
# Bad input


def test_missing_download_names_the_expected_files(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "README.txt").write_text("not VOC")
    with pytest.raises(checks.MissingDownloadError, match=fakes.VOC_TAR) as e:
        prepare(manual, tmp_path / "data")
    assert "VOCdevkit/VOC2012" in str(e.value) and "SegmentationClass" in str(e.value)


def test_empty_manual_dir_names_the_layout(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(checks.MissingDownloadError, match="JPEGImages"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_missing_mask_names_the_file(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_VAL[1]
    (tmp_path / "manual/VOCdevkit/VOC2012/SegmentationClass" / f"{stem}.png").unlink()
    with pytest.raises(checks.MissingDownloadError, match=f"SegmentationClass/{stem}.png"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_missing_split_list_names_the_file(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=True, val=[])
    # Rebuild the tar without val.txt.
    import tarfile

    src = tmp_path / "manual" / fakes.VOC_TAR
    dst = tmp_path / "manual" / "tmp.tar"
    with tarfile.open(src) as a, tarfile.open(dst, "w") as b:
        for m in a.getmembers():
            if not m.name.endswith("Segmentation/val.txt"):
                b.addfile(m, a.extractfile(m) if m.isfile() else None)
    dst.replace(src)
    with pytest.raises(checks.MissingDownloadError, match="ImageSets/Segmentation/val.txt"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_corrupt_image_names_the_file(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_TRAIN[1]
    jpg = tmp_path / "manual/VOCdevkit/VOC2012/JPEGImages" / f"{stem}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated
    with pytest.raises(checks.BadInputError, match=f"cannot decode image .*{stem}.jpg"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_mask_size_mismatch_names_both_files(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_TRAIN[2]
    png = tmp_path / "manual/VOCdevkit/VOC2012/SegmentationClass" / f"{stem}.png"
    png.write_bytes(
        fakes.encode_png(np.zeros((fakes.H, fakes.W + 1), np.uint8), fakes.voc_palette())
    )
    with pytest.raises(checks.BadInputError, match=f"{stem}.png.*{stem}.jpg"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_unknown_label_values_name_the_file_and_values(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_TRAIN[0]
    mask = np.zeros((fakes.H, fakes.W), np.uint8)
    mask[3, 4], mask[5, 6] = 21, 254
    png = tmp_path / "manual/VOCdevkit/VOC2012/SegmentationClass" / f"{stem}.png"
    png.write_bytes(fakes.encode_png(mask, fakes.voc_palette()))
    match = rf"{stem}.png: unknown label values \[21, 254\]"
    with pytest.raises(checks.BadInputError, match=match):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_rgb_mask_is_rejected(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=False)
    stem = fakes.VOC_TRAIN[0]
    png = tmp_path / "manual/VOCdevkit/VOC2012/SegmentationClass" / f"{stem}.png"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((fakes.H, fakes.W, 3), np.uint8)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    with pytest.raises(checks.BadInputError, match=f"{stem}.png.*mode 'RGB'"):
        prepare(tmp_path / "manual", tmp_path / "data")


def test_pipeline_reads_fake_voc(tmp_path):
    from ccnn_jax.data import pipeline

    expected = fakes.write_voc(tmp_path / "manual", as_tar=True)
    pipeline.prepare(
        "voc_segmentation", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual")
    )
    meta = pipeline.dataset_meta("voc_segmentation", data_dir=str(tmp_path / "data"))
    assert (meta.num_classes, meta.background, meta.class_names) == (21, 0, fakes.VOC_CLASSES)
    loader = pipeline.make_loader(
        "voc_segmentation",
        "validation",
        data_dir=str(tmp_path / "data"),
        batch_size=4,
        image_size=(16, 16),
        train=False,
        seed=0,
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].shape == (4, 16, 16)
    n_val = len(expected["validation"])
    np.testing.assert_array_equal(batch["valid"], [1.0] * n_val + [0.0] * (4 - n_val))
    # Tags of the real examples are exactly the classes of their full-size masks.
    want = sorted(
        tuple(sorted(set(np.unique(fx.mask).tolist()) - {255}))
        for fx in expected["validation"].values()
    )
    got = sorted(tuple(np.flatnonzero(t).tolist()) for t in batch["tags"][:n_val])
    assert got == want


def test_sbd_config_without_sbd_names_the_folder(tmp_path):
    fakes.write_voc(tmp_path / "manual", as_tar=True)
    with pytest.raises(checks.MissingDownloadError, match="benchmark_RELEASE/dataset") as e:
        prepare(tmp_path / "manual", tmp_path / "data", config="sbd_augmented")
    assert "benchmark.tgz" in str(e.value)


def test_corrupt_sbd_mat_names_the_file(tmp_path):
    manual = tmp_path / "manual"
    voc_ex = fakes.write_voc(manual, as_tar=False)
    fakes.write_sbd(manual, voc=voc_ex, sbd_train=["2011_000001"], sbd_val=[], sbd_only_images=[])
    (manual / "benchmark_RELEASE/dataset/cls/2011_000001.mat").write_bytes(b"not a mat file")
    with pytest.raises(checks.BadInputError, match="SBD file .*2011_000001.mat"):
        prepare(manual, tmp_path / "data", config="sbd_augmented")
