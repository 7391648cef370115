"""Training configs (ml_collections): the shared skeleton and one module per dataset.

``synthetic.py``, ``voc.py``, ``camvid.py`` (and ``one_step.py`` for the one-step demonstration)
each define ``get_config(config_string)``; pass their file path to ``--config`` of the scripts in
``experiments/``, e.g. ``--config ccnn_jax/configs/synthetic.py:mil``. Each dataset config calls
:func:`parse` on its config string (``"<method>[,option...]"``) and :func:`base`, then sets its
dataset, image size, model and schedule. :func:`base` is the one place for the fields every run
reads, with their defaults, so the dataset configs hold only what differs.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ccnn_jax import constraints
from ccnn_jax.data import pipeline

METHODS = ("ccnn", "ccnn_size", "mil", "full", "pretrain")


def parse(config_string: str | None, options: tuple[str, ...]) -> tuple[str, set[str]]:
    """``"mil,tiny"`` -> ("mil", {"tiny"}); unknown methods or options raise ValueError."""
    parts = [p.strip() for p in (config_string or "ccnn").split(",") if p.strip()]
    method = parts[0] if parts else "ccnn"
    if method not in METHODS:
        raise ValueError(f"config string: method must be one of {METHODS}, got {method!r}")
    unknown = set(parts[1:]) - set(options)
    if unknown:
        raise ValueError(
            f"config string: unknown options {sorted(unknown)} (known: {', '.join(options)})"
        )
    return method, set(parts[1:])


def base(method: str, dataset: str) -> ml_collections.ConfigDict:
    """Every field a training run reads, with defaults; the dataset config overrides them.

    Constraint bounds default to the original CCNN's VOC values, ``constraints.VOC_BOUNDS``.
    """
    c = ml_collections.ConfigDict()
    c.method = method
    c.dataset = dataset
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.train_split = "train"  # or a TFDS slice, e.g. "train[:10%]" (a labelled subset)
    c.image_size = (64, 64)
    c.scale_range = pipeline.TRAIN_SCALE_RANGE  # training augmentation: rescale, crop, flip
    c.seed = 0
    # Workdir of another run to start from (its newest checkpoint's model variables; fresh
    # optimizer and step), as the original CCNN started from a pretrained network.
    c.init_from = ml_collections.config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.width = 16
    c.model.depth = 4
    c.model.norm = "group"
    c.model.output_stride = 1
    c.model.classifier = False  # a bottleneck image classifier (needed by pretraining)

    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_steps = 1000
    c.learning_rate = 1e-3
    c.warmup_steps = 20
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0  # 0: no clipping
    c.final_lr_fraction = 0.01  # the cosine schedule ends at this fraction of learning_rate

    c.solver = ml_collections.ConfigDict()
    c.solver.method = "newton"
    c.solver.tol = 1e-4
    c.solver.max_iter = 50
    # Inverse temperature s of the latent P ~ Q^s exp(s A^T lam); None: 1 for tags, 1000
    # (the original's value) with size hints. Large s gives a near one-hot P.
    c.hardness = ml_collections.config_dict.placeholder(float)
    # The keyword arguments of constraints.from_tags (see constraints.TagBounds).
    c.constraints = ml_collections.ConfigDict(dataclasses.asdict(constraints.VOC_BOUNDS))
    c.mil_warmup_steps = 0  # > 0: MIL loss for the first steps, then CCNN
    c.mil_weight = 0.0  # > 0: CCNN + mil_weight * MIL

    # Pretraining, the ImageNet analogue (ccnn_jax/pretrain.py): the network is first trained as
    # an image classifier on pretrain.dataset (after pretrain.easy_steps on pretrain.easy_dataset,
    # a curriculum), cached and shared by every method, then every run starts from it.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 0  # 0: no pretraining (start from config.init_from or from scratch)
    c.pretrain.dataset = "ccnn_synthetic/objects"
    c.pretrain.easy_dataset = "ccnn_synthetic/objects_easy"
    c.pretrain.easy_steps = 0  # 0: no easy stage
    c.pretrain.image_size = (32, 32)
    c.pretrain.scale_range = (1.0, 1.0)  # the objects vary in size already: flips only
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 2e-3
    c.pretrain.warmup_steps = 50
    # Where the pretrained run lives; None: <cache>/pretrain/<hash of the pretraining config>
    # with <cache> = $CCNN_JAX_CACHE or ~/.cache/ccnn_jax, so every later run reuses it.
    c.pretrain.workdir = ml_collections.config_dict.placeholder(str)

    c.log_every = 10
    c.checkpoint_every = 100
    c.max_checkpoints_to_keep = 3
    c.num_grid_images = 8
    c.worker_count = 0
    return c
