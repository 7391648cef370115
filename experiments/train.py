"""Train and evaluate a segmentation net (CCNN from tags by default) — a thin CLI.

    python experiments/train.py --workdir runs/ccnn
    python experiments/train.py --config ccnn_jax/configs/synthetic.py:mil --workdir runs/mil
    python experiments/train.py --workdir runs/ccnn --config.num_steps=300

Rerunning with the same ``--workdir`` resumes from the latest checkpoint.

Multi-host (one process per host, same command on every host; the workdir, ``data_dir`` and the
pretraining cache ``$CCNN_JAX_CACHE`` must be on storage all hosts share)::

    python experiments/train.py --multihost --workdir gs://bucket/runs/ccnn ...   # TPU / SLURM
    python experiments/train.py --multihost --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0 --workdir /shared/runs/ccnn ...         # by hand
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax import cli
from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    import jax

    from ccnn_jax import distributed, run, train

    train.maybe_initialize_distributed(FLAGS.multihost, **_distributed_kwargs())
    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    with distributed.exit_on_error():  # one failing process must not leave the others hanging
        results = run.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    keys = ("method", "dataset", "miou", "pixel_accuracy", "steps", "seconds")
    print(json.dumps({k: results[k] for k in keys}))
    print(
        f"validation mIoU = {results['miou']:.4f}  (written to "
        f"{os.path.join(FLAGS.workdir, 'results.json')})"
    )


def _distributed_kwargs() -> dict:
    """The multi-host flags as keyword arguments of ``ccnn_jax.distributed.initialize``."""
    where = {
        "coordinator_address": FLAGS.coordinator_address,
        "num_processes": FLAGS.num_processes,
        "process_id": FLAGS.process_id,
    }
    given = [f"--{name}" for name, value in where.items() if value is not None]
    if given and not FLAGS.multihost:
        raise app.UsageError(f"{', '.join(given)} only apply with --multihost")
    return {
        **where,
        "initialization_timeout_s": FLAGS.initialization_timeout,
        "heartbeat_timeout_s": FLAGS.heartbeat_timeout,
    }


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and results")
    flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
    # Multi-host: on Cloud TPU / SLURM / Open MPI, --multihost alone detects the cluster.
    flags.DEFINE_string("coordinator_address", None, "multihost: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multihost: number of processes")
    flags.DEFINE_integer("process_id", None, "multihost: this process's index")
    flags.DEFINE_integer(
        "initialization_timeout", 300, "multihost: seconds to wait for the other processes"
    )
    flags.DEFINE_integer(
        "heartbeat_timeout", 100, "multihost: seconds after which a silent process is dead"
    )
    flags.DEFINE_string(
        "jax_cache_dir",
        os.path.join(os.path.expanduser("~"), ".cache", "ccnn_jax", "xla"),
        "persistent XLA compilation cache (makes reruns start fast); empty to disable",
    )
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
