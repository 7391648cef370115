"""Every method from the same pretrained start, the same steps and schedule — one command.

    python experiments/compare.py --workdir runs/compare
    python experiments/compare.py --workdir runs/compare_s1 --config.seed=1

Trains ``full``, ``mil``, ``ccnn`` and ``ccnn_size`` (``--methods``) with one config
(``--config``, default the embedded synthetic dataset, with any ``--config.*`` overrides, e.g.
``--config.seed`` changes the initialisation and data order of pretraining and of every
method), only ``config.method`` differing. Each method is a run in ``<workdir>/<method>``
(resumable; a finished one is reused); pretraining is shared and cached (see
``ccnn_jax/pretrain.py``). Writes ``<workdir>/comparison.json``
(``{"seed", "rows": [{"method", "miou", "pixel_accuracy", "per_class_iou", "steps", "seconds"}]}``),
``comparison.md`` (the table with ratios to full supervision beside the paper's) and
``comparison.png`` (one row of validation predictions per method).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS

#: The paper's PASCAL VOC 2012 figures (mIoU %), Pathak et al. 2015, for the ratio column.
PAPER_VOC = {"full": 62.2, "ccnn": 35.3, "ccnn_size": 43.3, "mil": 24.9}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    from ccnn_jax import comparison

    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    table = comparison.compare(FLAGS.config, methods, FLAGS.workdir, paper=PAPER_VOC)
    print(table)
    print(f"written to {os.path.join(FLAGS.workdir, 'comparison.json')} (.md, .png)")


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")
    flags.DEFINE_string("workdir", None, "directory for the runs and the comparison files")
    flags.DEFINE_string("methods", "full,mil,ccnn,ccnn_size", "comma-separated methods")
    flags.DEFINE_string(
        "jax_cache_dir",
        os.path.join(os.path.expanduser("~"), ".cache", "ccnn_jax", "xla"),
        "persistent XLA compilation cache; empty to disable",
    )
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
