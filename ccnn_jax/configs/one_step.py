"""The seed's one-step demonstration on the embedded synthetic dataset (``ccnn_synthetic/default``).

Command (trains and caches both networks in the workdir the first time; a rerun reuses them)::

    python experiments/one_step_latent.py --workdir runs/one_step
    python experiments/one_step_latent.py --workdir runs/one_step_tiny \
        --config ccnn_jax/configs/one_step.py:tiny

A fully supervised UNet (the ``full`` variant of ``ccnn_jax/configs/synthetic.py``) is trained
for ``full_steps``; the under-trained network is the same run (same seed, data order and
learning-rate schedule) stopped after ``under_steps``. P is solved from the under-trained
network's output on every validation image for each constraint variant (see
``ccnn_jax/one_step.py``), and compared with the fully trained network's output.

Expected: see the README's one-step section for the measured table and runtime (2-core CPU).
"""

import ml_collections

from ccnn_jax.configs import synthetic


def get_config(config_string: str = "default") -> ml_collections.ConfigDict:
    variant = (config_string or "default").strip()
    if variant not in ("default", "tiny"):
        raise ValueError(f"config string must be 'default' or 'tiny', got {variant!r}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    # Training of both networks (pixel supervision); dataset, model and optimiser come from here.
    c.train = synthetic.get_config("full,tiny" if tiny else "full")
    c.full_steps = 600
    c.under_steps = 20
    c.train.num_steps = c.get_ref("full_steps")
    c.train.checkpoint_every = 50

    # Latent P: constraint variants (ccnn_jax/one_step.py), solved on log Q_under.
    c.variants = ("tags", "oracle", "ccnn_tags")
    c.default_variant = "tags"
    c.tags_alpha = 0.05
    c.oracle_fraction = 0.9
    c.solver = ml_collections.ConfigDict()
    c.solver.method = "newton"
    c.solver.tol = 1e-6
    c.solver.max_iter = 100
    c.kl_epsilon = 1e-6  # smoothing of the KL's second argument (finite KL for masked P)

    # CVXPY/Clarabel reference on the first validation images (the seed's solver).
    c.cvxpy_images = 3
    c.cvxpy_variant = "tags"
    c.cvxpy_max_side = 64  # solve the top-left crop of at most this side (both solvers)

    c.eval_batch_size = 50
    c.num_figure_images = 6

    if tiny:
        c.full_steps = 6
        c.under_steps = 2
        c.train.checkpoint_every = 3
        c.cvxpy_images = 1
        c.cvxpy_max_side = 8
        c.eval_batch_size = 8
        c.num_figure_images = 3
    return c
