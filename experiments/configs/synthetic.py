"""CCNN and baselines on the embedded synthetic dataset (``ccnn_synthetic/default``, 64x64).

Command (the main job; prepares the dataset the first time, ~25 s)::

    python experiments/train.py --workdir runs/ccnn
    python experiments/train.py --config experiments/configs/synthetic.py:ccnn_size \
        --workdir runs/ccnn_size
    python experiments/train.py --config experiments/configs/synthetic.py:mil --workdir runs/mil
    python experiments/train.py --config experiments/configs/synthetic.py:full --workdir runs/full

Variants (the config string after ``:``): ``ccnn`` (tags, default), ``ccnn_size`` (tags + 1-bit
size hints), ``mil`` (MIL-FCN baseline), ``full`` (pixel supervision, the upper bound);
append ``,tiny`` to use the ``ccnn_synthetic/tiny`` dataset with a tiny net (tests, smoke runs).

Expected (2-core CPU): see the README's training section for the measured table.
"""

import ml_collections

METHODS = ("ccnn", "ccnn_size", "mil", "full")


def get_config(config_string: str = "ccnn") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (config_string or "ccnn").split(",") if p.strip()]
    method = parts[0] if parts else "ccnn"
    if method not in METHODS:
        raise ValueError(f"config string: method must be one of {METHODS}, got {method!r}")
    unknown = set(parts[1:]) - {"tiny"}
    if unknown:
        raise ValueError(f"config string: unknown options {sorted(unknown)} (known: tiny)")
    c = ml_collections.ConfigDict()
    c.method = method
    c.dataset = "ccnn_synthetic/default"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.image_size = (64, 64)
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.width = 16
    c.model.depth = 4
    c.model.norm = "group"
    c.model.output_stride = 4  # logits (and constraints) on the 16x16 map, as FCN's coarse map

    c.batch_size = 16
    c.eval_batch_size = 50
    c.num_steps = 400
    c.learning_rate = 1e-3
    c.warmup_steps = 20
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0

    c.solver = ml_collections.ConfigDict()
    c.solver.method = "newton"
    c.solver.tol = 1e-4
    c.solver.max_iter = 50
    c.mil_warmup_steps = 0  # > 0: MIL loss for the first steps, then CCNN
    # CCNN's tag constraints with bounds for this dataset. The original's VOC values (background
    # in [0.3, 0.7], each present label >= 5%) contradict these images: background covers more
    # than 70% of the image in 87% of them (median 86%) and 43% of the objects cover < 5%, so
    # the hard background upper bound would force foreground mass onto background pixels.
    c.constraints = ml_collections.ConfigDict()
    c.constraints.fg_lower = 0.03
    c.constraints.bg_lower = 0.6
    c.constraints.bg_upper = 0.97
    c.constraints.size_fg_lower = 0.1  # the size bit: the object covers > 10%
    c.constraints.size_bg_lower = 0.5
    c.constraints.size_bg_upper = 0.9  # a > 10% object leaves < 90% to the background
    c.mil_weight = 0.0  # > 0: CCNN + mil_weight * MIL

    c.log_every = 10
    c.checkpoint_every = 100
    c.max_checkpoints_to_keep = 3
    c.num_grid_images = 8
    c.worker_count = 0

    if "tiny" in parts:
        c.dataset = "ccnn_synthetic/tiny"
        c.image_size = (32, 32)
        c.model.width = 4
        c.model.depth = 2
        c.model.output_stride = 2
        c.batch_size = 8
        c.eval_batch_size = 8
        c.num_steps = 6
        c.warmup_steps = 1
        c.log_every = 2
        c.checkpoint_every = 3
        c.num_grid_images = 4
    return c
