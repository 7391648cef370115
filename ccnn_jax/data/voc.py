"""``voc_segmentation``: PASCAL VOC 2012 semantic segmentation from a manual download.

Configs:

- ``voc2012`` (default): ``train`` (1,464 images) and ``validation`` (1,449) from
  ``ImageSets/Segmentation/{train,val}.txt``.
- ``sbd_augmented``: the same ``validation``; ``train`` is the standard augmented set
  (10,582 images with the full downloads) used by DeepLab and most weakly supervised work:

      train_aug = (SBD train ∪ SBD val ∪ VOC12 train) − VOC12 val

  Masks come from VOC's ``SegmentationClass`` PNG when the image has one (finer, with void
  outlines), otherwise from SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``, no void). Images
  come from VOC's ``JPEGImages``, falling back to SBD's ``img/``.

Masks are palette PNGs; the palette *index* is the class (0..20) and 255 is void. The colour
is never used.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ccnn_jax.data import checks, common

CLASS_NAMES = [
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
VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = (
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz"
)

VOC_LAYOUT = f"""\
  manual_dir/{VOC_TAR}      (the official archive, 2.0 GB, from {VOC_URL}),
  or its extracted tree:
  manual_dir/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt, val.txt
  manual_dir/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  manual_dir/VOCdevkit/VOC2012/SegmentationClass/<id>.png   (palette PNG, index = class)"""

SBD_LAYOUT = f"""\
  and, for config sbd_augmented, SBD extracted from benchmark.tgz ({SBD_URL}):
  manual_dir/benchmark_RELEASE/dataset/train.txt, val.txt
  manual_dir/benchmark_RELEASE/dataset/cls/<id>.mat          (GTcls.Segmentation)
  manual_dir/benchmark_RELEASE/dataset/img/<id>.jpg"""

_PREFIX = "VOCdevkit/VOC2012/"


class VocFiles:
    """Read access to ``VOCdevkit/VOC2012`` files, in an extracted tree or in the official tar.

    Paths are relative to ``VOC2012/`` (e.g. ``"JPEGImages/2007_000032.jpg"``).
    """

    def __init__(self, manual_dir: epath.Path, layout: str = VOC_LAYOUT):
        self.layout = layout
        tree = manual_dir / "VOCdevkit" / "VOC2012"
        tar_path = manual_dir / VOC_TAR
        self._tar = None
        if tree.is_dir():
            self._root = tree
            self.where = str(tree)
        elif tar_path.exists():
            self._tar = tarfile.open(tar_path, "r:*")
            self._members = {
                m.name[m.name.index(_PREFIX) + len(_PREFIX) :]: m
                for m in self._tar.getmembers()
                if m.isfile() and _PREFIX in m.name
            }
            if not self._members:
                raise checks.BadInputError(
                    f"{tar_path} contains no files under {_PREFIX}; expected the official "
                    f"archive. Expected layout:\n{layout}"
                )
            self.where = f"{tar_path}:{_PREFIX}"
        else:
            raise checks.missing(f"{tar_path} or the folder {tree}", layout)

    def name(self, rel: str) -> str:
        """How error messages name the file ``rel``."""
        return f"{self.where.rstrip('/')}/{rel}" if self._tar is None else f"{self.where}{rel}"

    def exists(self, rel: str) -> bool:
        return (self._root / rel).is_file() if self._tar is None else rel in self._members

    def read(self, rel: str) -> bytes:
        """Bytes of ``rel``; MissingDownloadError naming it if absent."""
        if not self.exists(rel):
            raise checks.missing(self.name(rel), self.layout)
        if self._tar is None:
            return (self._root / rel).read_bytes()
        return self._tar.extractfile(self._members[rel]).read()

    def read_ids(self, rel: str) -> list[str]:
        """Image ids listed one per line in ``rel`` (an ImageSets file)."""
        return [line.strip() for line in self.read(rel).decode().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def read_sbd_mask(path: epath.Path) -> np.ndarray:
    """(H, W) uint8 class indices from an SBD ``cls/<id>.mat`` file (``GTcls.Segmentation``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(
            io.BytesIO(path.read_bytes()), struct_as_record=False, squeeze_me=True
        )
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:
        raise checks.BadInputError(
            f"cannot read GTcls.Segmentation from SBD file {path}: {type(e).__name__}: {e}"
        ) from None
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > 255:
        raise checks.BadInputError(
            f"SBD file {path}: GTcls.Segmentation must be a 2-D array of values in [0, 255], got "
            f"shape {seg.shape}"
        )
    return seg.astype(np.uint8)


def sbd_augmented_ids(
    voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]
) -> list[str]:
    """The 10,582-image recipe: (SBD train ∪ SBD val ∪ VOC12 train) − VOC12 val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


class VocSegmentation(common.SegmentationBuilder):
    """PASCAL VOC 2012 segmentation (21 classes, 255 = void), optionally SBD-augmented."""

    CLASS_NAMES = CLASS_NAMES
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="voc2012", description="VOC 2012 train (1,464) / val (1,449)."
        ),
        tfds.core.BuilderConfig(
            name="sbd_augmented",
            description="train = (SBD train+val ∪ VOC12 train) − VOC12 val (10,582); "
            "validation = VOC12 val (1,449).",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {VOC_TAR} from {VOC_URL} and put it (or its extracted VOCdevkit/ folder) "
        f"in manual_dir:\n{VOC_LAYOUT}\n{SBD_LAYOUT}"
    )

    def _split_generators(self, dl_manager):
        sbd = self.builder_config.name == "sbd_augmented"
        layout = VOC_LAYOUT + ("\n" + SBD_LAYOUT if sbd else "")
        manual_dir = checks.require_manual_dir(dl_manager, layout)
        files = VocFiles(manual_dir, layout)
        seg_sets = "ImageSets/Segmentation/"
        voc_train = files.read_ids(seg_sets + "train.txt")
        voc_val = files.read_ids(seg_sets + "val.txt")
        if not sbd:
            return {
                "train": self._generate_examples(files, voc_train),
                "validation": self._generate_examples(files, voc_val),
            }
        sbd_dir = manual_dir / "benchmark_RELEASE" / "dataset"
        if not sbd_dir.is_dir():
            raise checks.missing(f"the folder {sbd_dir}", layout)
        sbd_train = checks.read_list(sbd_dir / "train.txt", layout)
        sbd_val = checks.read_list(sbd_dir / "val.txt", layout)
        train_ids = sbd_augmented_ids(voc_train, voc_val, sbd_train, sbd_val)
        return {
            "train": self._generate_examples(files, train_ids, sbd_dir=sbd_dir),
            "validation": self._generate_examples(files, voc_val),
        }

    def _generate_examples(
        self, files: VocFiles, ids: list[str], sbd_dir: epath.Path | None = None
    ):
        lut = checks.identity_lut(len(CLASS_NAMES))
        for image_id in ids:
            image_rel = f"JPEGImages/{image_id}.jpg"
            mask_rel = f"SegmentationClass/{image_id}.png"
            raw_label = label_bytes = None
            if sbd_dir is not None and not files.exists(mask_rel):
                mask_name = str(sbd_dir / "cls" / f"{image_id}.mat")
                if not (sbd_dir / "cls" / f"{image_id}.mat").exists():
                    raise checks.missing(
                        f"{mask_rel} in {files.where} or {mask_name} (for id {image_id})",
                        files.layout,
                    )
                raw_label = read_sbd_mask(sbd_dir / "cls" / f"{image_id}.mat")
            else:
                mask_name = files.name(mask_rel)
                label_bytes = files.read(mask_rel)
            if sbd_dir is not None and not files.exists(image_rel):
                sbd_image = sbd_dir / "img" / f"{image_id}.jpg"
                if not sbd_image.exists():
                    raise checks.missing(
                        f"{image_rel} in {files.where} or {sbd_image} (for id {image_id})",
                        files.layout,
                    )
                image_name, image_bytes = str(sbd_image), sbd_image.read_bytes()
            else:
                image_name, image_bytes = files.name(image_rel), files.read(image_rel)
            yield (
                image_id,
                checks.make_example(
                    image_bytes,
                    label_bytes,
                    raw_label=raw_label,
                    lut=lut,
                    num_classes=len(CLASS_NAMES),
                    image_name=image_name,
                    label_name=mask_name,
                    filename=f"{image_id}.jpg",
                ),
            )
