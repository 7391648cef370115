"""Train and evaluate a segmentation net (CCNN from tags by default) — a thin CLI.

    python experiments/train.py --workdir runs/ccnn
    python experiments/train.py --config experiments/configs/synthetic.py:mil --workdir runs/mil
    python experiments/train.py --workdir runs/ccnn --config.num_steps=300

Rerunning with the same ``--workdir`` resumes from the latest checkpoint.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout without installing
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and results")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir",
    os.path.join(os.path.expanduser("~"), ".cache", "ccnn_jax", "xla"),
    "persistent XLA compilation cache (makes reruns start fast); empty to disable",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    import jax

    from ccnn_jax import train

    train.maybe_initialize_distributed(_MULTIHOST.value)
    if _JAX_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _JAX_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    summary = {k: results[k] for k in ("method", "dataset", "miou", "pixel_accuracy", "steps",
                                       "seconds")}  # fmt: skip
    print(json.dumps(summary))
    print(
        f"validation mIoU = {results['miou']:.4f}  (written to "
        f"{os.path.join(_WORKDIR.value, 'results.json')})"
    )


if __name__ == "__main__":
    app.run(main)
