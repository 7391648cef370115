"""CCNN and baselines on PASCAL VOC 2012 (``voc_segmentation``; 21 classes incl. background).

Needs the download (``VOCtrainval_11-May-2012.tar`` in ``manual_dir``; see the README's data
section) and realistically an accelerator. Command::

    python experiments/train.py --config ccnn_jax/configs/voc.py:ccnn --workdir runs/voc_ccnn \\
        --config.manual_dir=/path/to/downloads
    python experiments/train.py --config ccnn_jax/configs/voc.py:full --workdir runs/voc_full \\
        --config.manual_dir=/path/to/downloads

Variants: ``ccnn`` (tags, default), ``ccnn_size``, ``mil``, ``full``; append ``,sbd`` for the
SBD-augmented training set (``voc_segmentation/sbd_augmented``, 10,582 images).

What to expect: not run by us (no VOC download or accelerator here). The network is a UNet
trained from scratch, not the ImageNet-pretrained VGG16 of the paper (35.3 mIoU for CCNN from
tags vs 62.2 fully supervised on VOC 2012 val), so expect clearly lower absolute mIoU; the ordering
full > ccnn_size > ccnn > mil is what the method predicts. Outputs as for the synthetic configs
(results.json, predictions.png, curves.png, metrics.jsonl, tensorboard/).
"""

import ml_collections

from ccnn_jax import configs


def get_config(config_string: str = "ccnn") -> ml_collections.ConfigDict:
    method, options = configs.parse(config_string, ("sbd",))
    c = configs.base(
        method, "voc_segmentation/sbd_augmented" if "sbd" in options else "voc_segmentation"
    )
    c.image_size = (320, 320)
    c.model.width = 64
    c.model.depth = 5
    c.model.norm = "batch"
    c.model.output_stride = 8  # constraints on the coarse map, as the FCN-based original
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_steps = 30_000
    c.warmup_steps = 1000
    c.log_every = 100
    c.checkpoint_every = 2000
    c.worker_count = 8
    return c
