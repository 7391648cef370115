"""Pretraining, the ImageNet analogue: the segmentation network first learns to classify objects.

The paper never trained from scratch: its FCN and its MIL baseline started from an
ImageNet-pretrained VGG-16, a network that already recognises objects; the constraints then
taught it where they are. Here the network (a UNet with ``model.classifier=True``) is trained as
an image classifier (``method="pretrain"``, :func:`ccnn_jax.losses.classification_loss` on the
pooled bottleneck features) on a classification set of one object per image. The classifier's
weights then score every bottleneck position (FCN's conversion, see
:mod:`ccnn_jax.models.unet`), so every method starts from per-pixel class scores.

A curriculum makes it learn sooner: with random colours and textures on cluttered backgrounds a
classifier trained from scratch sits at chance for a thousand steps or more, while on the easy
look (smooth shapes on smooth backgrounds, no clutter) it learns within a few hundred steps and
then moves to the full look quickly. So pretraining runs ``pretrain.easy_steps`` on
``pretrain.easy_dataset`` at the peak learning rate and then ``pretrain.steps`` on
``pretrain.dataset`` with warmup and cosine decay, each stage a training run (fresh optimizer,
warm-started from the previous stage).

The pretraining config depends only on ``config.model``, ``config.seed``, ``config.data_dir``,
the optimizer's regularisation and ``config.pretrain``, not on the method, so every method and
every later run with the same settings shares one cached pretrained run.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
from etils import epath

from ccnn_jax import configs

#: Fields of the training config that a pretraining stage inherits.
INHERITED = ("seed", "data_dir", "weight_decay", "grad_clip_norm", "final_lr_fraction")

#: Part of the cache key: bump when the pretraining recipe changes in code (stage_configs).
VERSION = 1


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The pretraining stages of ``config`` as (name, training config) pairs, in order:
    ``("easy", ...)`` when ``pretrain.easy_steps > 0``, then ``("objects", ...)``."""
    p = config.pretrain
    stages = []
    if p.easy_steps > 0:
        stages.append(("easy", p.easy_dataset, int(p.easy_steps)))
    stages.append(("objects", p.dataset, int(p.steps)))
    out = []
    for name, dataset, steps in stages:
        c = configs.base("pretrain", dataset)
        c.model = config.model.copy_and_resolve_references()
        for field in INHERITED:
            c[field] = config[field]
        c.image_size = tuple(p.image_size)
        c.scale_range = tuple(p.scale_range)
        c.batch_size = c.eval_batch_size = int(p.batch_size)
        c.learning_rate = float(p.learning_rate)
        c.warmup_steps = int(p.warmup_steps)
        c.num_steps = steps
        if name == "easy":  # keep the peak rate: the schedule's decay belongs to the last stage
            c.final_lr_fraction = 1.0
        c.log_every = 50
        c.checkpoint_every = 500
        c.max_checkpoints_to_keep = 1
        out.append((name, c))
    return out


def cache_root() -> epath.Path:
    """``$CCNN_JAX_CACHE`` or ``~/.cache/ccnn_jax``."""
    root = os.environ.get("CCNN_JAX_CACHE") or os.path.join("~", ".cache", "ccnn_jax")
    return epath.Path(os.path.abspath(os.path.expanduser(root)))


def pretrain_workdir(config: ml_collections.ConfigDict) -> epath.Path:
    """``config.pretrain.workdir``, or ``<cache_root>/pretrain/<hash>`` where the hash covers
    what the stages read from ``config`` (``model``, :data:`INHERITED`, ``pretrain``), so a
    changed pretraining setting pretrains anew while method-only settings (constraints,
    hardness, solver, schedule of the fine-tuning) reuse the cache."""
    if config.pretrain.workdir:
        return epath.Path(os.path.abspath(os.path.expanduser(config.pretrain.workdir)))
    pretrain = config.pretrain.to_dict()
    pretrain.pop("workdir", None)
    key = {"version": VERSION, "model": config.model.to_dict(), "pretrain": pretrain}
    key.update({field: config[field] for field in INHERITED})
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_root() / "pretrain" / digest


def ensure_pretrained(config: ml_collections.ConfigDict, *, progress: bool = True) -> epath.Path:
    """Runs (or resumes, or reuses) every pretraining stage of ``config``; returns the workdir
    of the last stage, whose checkpoint initialises the run (``init_from``).

    Each stage is a :func:`ccnn_jax.run.train_and_evaluate` run in ``<workdir>/<stage>``,
    warm-started from the previous stage; a stage whose ``results.json`` says it finished is
    skipped, so a finished pretraining costs nothing but reading that file.
    """
    from ccnn_jax import run  # run imports this module

    root = pretrain_workdir(config)
    previous = None
    for name, stage in stage_configs(config):
        workdir = root / name
        stage.init_from = None if previous is None else os.fspath(previous)
        if not _finished(workdir, stage):
            print(f"Pretraining stage {name!r} in {workdir}", flush=True)
            results = run.train_and_evaluate(stage, workdir, progress=progress)
            print(
                f"Pretraining stage {name!r}: validation accuracy {results['accuracy']:.3f}",
                flush=True,
            )
        previous = workdir
    return previous


def _finished(workdir: epath.Path, stage: ml_collections.ConfigDict) -> bool:
    path = workdir / "results.json"
    if not path.exists():
        return False
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(results.get("finished")) and results.get("steps") == stage.num_steps
