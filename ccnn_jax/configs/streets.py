"""Training on the CamVid-like street scenes (``ccnn_synthetic/streets``, 64x64, 11 classes).

The dataset of the seed's one-step demonstration in the seed's setting (every pixel one of
CamVid's 11 classes, no background; ``ccnn_jax/data/streets.py``). Command::

    python experiments/train.py --config ccnn_jax/configs/streets.py:full --workdir runs/streets

Variants (the config string after ``:``): ``full`` (pixel supervision, default), ``ccnn``,
``ccnn_size``, ``mil``; append ``,tiny`` for ``ccnn_synthetic/streets_tiny`` with a tiny net
(tests). The one-step demonstration (``ccnn_jax/configs/one_step.py``) trains ``full`` twice
from this config: stopped at 66% validation pixel accuracy, and to the end.
"""

import ml_collections

from ccnn_jax import configs


def get_config(config_string: str = "full") -> ml_collections.ConfigDict:
    method, options = configs.parse(config_string or "full", ("tiny",))
    c = configs.base(method, "ccnn_synthetic/streets")
    c.image_size = (64, 64)
    c.model.width = 16
    c.model.depth = 4
    c.model.norm = "group"
    c.model.output_stride = 1  # poles are 2 pixels wide: logits at full resolution
    c.batch_size = 16
    c.eval_batch_size = 50
    c.num_steps = 600
    c.learning_rate = 3e-3
    c.warmup_steps = 5
    c.checkpoint_every = 100
    # No background class: the tag constraints are foreground rows only (from_tags with
    # background=None), each present label >= 5% with slack penalty 2, as configs.base.
    if "tiny" in options:
        c.dataset = "ccnn_synthetic/streets_tiny"
        c.image_size = (32, 32)
        c.model.width = 4
        c.model.depth = 2
        c.batch_size = 8
        c.eval_batch_size = 8
        c.num_steps = 8
        c.warmup_steps = 1
        c.log_every = 2
        c.checkpoint_every = 4
        c.num_grid_images = 4
    return c
