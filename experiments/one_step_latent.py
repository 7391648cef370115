r"""The seed's demonstration: one convex latent step from an under-trained network.

    python experiments/one_step_latent.py --workdir runs/one_step
    python experiments/one_step_latent.py --workdir runs/one_step_s1 --config.seed=1
    python experiments/one_step_latent.py --workdir runs/one_step_tiny \
        --config ccnn_jax/configs/one_step.py:tiny

Trains (or restores from ``<workdir>/under`` and ``<workdir>/full``) a fully supervised network
stopped when its validation pixel accuracy first reaches ``under_accuracy`` (Q_under) and fully
trained (Q_full); for every validation image solves ``P = argmin KL(P || Q_under)`` under each
constraint variant and reports KL(Q_full || Q_under), KL(Q_full || P),
``reduction = 1 - KL(Q_full||P) / KL(Q_full||Q_under)``, pixel accuracy and mIoU of the argmax
maps (against the ground truth and against Q_full's argmax, overall and per class), the alpha
sweep of the seed's constraint, solver statistics, and the time of our solver against
CVXPY/Clarabel on the same primal. Library: ``ccnn_jax/one_step_run.py``; definitions:
``ccnn_jax/one_step.py``; configs and expected results: ``ccnn_jax/configs/one_step.py``.

Writes ``results.json``, ``results.md`` and ``latent.png`` to the workdir.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from ccnn_jax import cli, one_step_report, one_step_run
from ccnn_jax.configs import one_step as one_step_config

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = FLAGS.config, FLAGS.workdir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Reuse compiled programs: the two training runs, and every rerun, compile the same ones.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    results = one_step_run.run(config, workdir)
    print(one_step_report.markdown(results))
    print(json.dumps({k: results[k] for k in ("kl_full_under", "kl_full_latent", "reduction")}))
    print(
        f"total {results['seconds']['total']:.1f} s; written to "
        f"{os.path.join(workdir, 'results.json')}"
    )


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", one_step_config.__file__, "ml_collections config file"
    )
    flags.DEFINE_string("workdir", None, "directory for the cached networks and results")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
