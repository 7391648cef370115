"""Pretrain the segmentation network as an image classifier (the ImageNet analogue) — a thin CLI.

    python experiments/pretrain.py
    python experiments/pretrain.py --config.seed=1 --config.pretrain.steps=3000

Runs (or resumes, or reuses) the pretraining of ``--config`` (default the embedded synthetic
dataset's; see ``ccnn_jax/pretrain.py``) in its cache directory and prints where it is and its
validation accuracy. ``experiments/train.py`` and ``experiments/compare.py`` do this by
themselves before a run's first step; this script only makes it explicit.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from ccnn_jax import pretrain

    config = FLAGS.config
    if config.pretrain.steps < 1:
        raise app.UsageError("config.pretrain.steps must be >= 1 to pretrain")
    workdir = pretrain.ensure_pretrained(config)
    results = json.loads((workdir / "results.json").read_text())
    print(json.dumps({"workdir": str(workdir), "accuracy": results["accuracy"]}))


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
