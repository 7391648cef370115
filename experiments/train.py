"""Train and evaluate a segmentation net (CCNN from tags by default) — a thin CLI.

    python experiments/train.py --workdir runs/ccnn
    python experiments/train.py --config ccnn_jax/configs/synthetic.py:mil --workdir runs/mil
    python experiments/train.py --workdir runs/ccnn --config.num_steps=300

Rerunning with the same ``--workdir`` resumes from the latest checkpoint.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    import jax

    from ccnn_jax import run, train

    train.maybe_initialize_distributed(FLAGS.multihost)
    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    results = run.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    keys = ("method", "dataset", "miou", "pixel_accuracy", "steps", "seconds")
    print(json.dumps({k: results[k] for k in keys}))
    print(
        f"validation mIoU = {results['miou']:.4f}  (written to "
        f"{os.path.join(FLAGS.workdir, 'results.json')})"
    )


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and results")
    flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
    flags.DEFINE_string(
        "jax_cache_dir",
        os.path.join(os.path.expanduser("~"), ".cache", "ccnn_jax", "xla"),
        "persistent XLA compilation cache (makes reruns start fast); empty to disable",
    )
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
