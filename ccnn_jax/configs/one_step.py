"""The seed's one-step demonstration, by default in the seed's setting: CamVid-like street scenes.

Command (trains and caches both networks in the workdir the first time; a rerun reuses them)::

    python experiments/one_step_latent.py --workdir runs/one_step
    python experiments/one_step_latent.py --workdir runs/one_step_s1 --config.seed=1
    python experiments/one_step_latent.py --workdir runs/one_step_camvid \
        --config ccnn_jax/configs/one_step.py:camvid --config.train.manual_dir=/path/to/downloads

Config strings: ``default`` (``ccnn_synthetic/streets``), ``tiny`` (``streets_tiny``, tests),
``camvid`` (real CamVid in the fastai layout, ``camvid/fastai``; see the README's data section
for the files) and ``shapes`` (``ccnn_synthetic/default``, the previous default, tags-based
variants only because of its background class). ``--config.seed`` sets the initialisation and
the data order of both networks.

A fully supervised network (the ``full`` variant of the dataset's training config) is trained
twice from the same seed: until its pixel accuracy on the first ``under_check_images``
validation images first reaches ``under_accuracy`` (checked every ``under_check_every`` steps;
Q_under), and for ``full_steps`` (Q_full). P is solved from Q_under on every validation image for
each constraint variant (``ccnn_jax/one_step.py``); ``all_labels`` is the seed's constraint,
every label >= ``alpha`` in every image, and ``alpha_sweep`` reports it for other alphas.

Expected: the README section "One latent step (issue 11)" (measured figures and runtime).
"""

import ml_collections

from ccnn_jax.configs import ConfigError, camvid, streets, synthetic

OPTIONS = ("default", "tiny", "camvid", "shapes")


def get_config(config_string: str = "default") -> ml_collections.ConfigDict:
    option = (config_string or "default").strip()
    if option not in OPTIONS:
        raise ConfigError(f"config string must be one of {OPTIONS}, got {option!r}")
    c = ml_collections.ConfigDict()
    # Training of both networks (pixel supervision); dataset, model and optimiser come from here.
    if option == "camvid":
        c.train = camvid.get_config("full,fastai")
    elif option == "shapes":
        c.train = synthetic.get_config("full")
    else:
        c.train = streets.get_config("full,tiny" if option == "tiny" else "full")
    c.seed = 0  # the seed of both networks' training
    c.train.seed = c.get_ref("seed")
    c.full_steps = c.train.num_steps
    c.train.num_steps = c.get_ref("full_steps")
    c.train.checkpoint_every = 100
    # The under-trained network: the same run stopped when the pixel accuracy on the first
    # under_check_images validation images first reaches under_accuracy (checked every
    # under_check_every steps, and never later than full_steps).
    c.under_accuracy = 0.66
    c.under_check_every = 3
    c.under_check_images = 100

    # Latent P: constraint variants (ccnn_jax/one_step.py), solved on log Q_under.
    c.variants = ("all_labels", "tags", "oracle", "ccnn_tags")
    c.default_variant = "all_labels"
    c.alpha = 0.02  # all_labels: every label >= alpha of every image (the seed's constraint)
    c.alpha_sweep = (0.005, 0.01, 0.02, 0.03, 0.05)
    c.tags_alpha = 0.05
    c.oracle_fraction = 0.9
    c.solver = ml_collections.ConfigDict()
    c.solver.method = "newton"
    c.solver.tol = 1e-6
    c.solver.max_iter = 100
    c.kl_epsilon = 1e-6  # smoothing of the KL's second argument (finite KL for masked P)

    # CVXPY/Clarabel reference on the first validation images (the seed's solver).
    c.cvxpy_images = 3
    c.cvxpy_variant = "all_labels"
    c.cvxpy_max_side = 64  # solve the top-left crop of at most this side (both solvers)

    c.eval_batch_size = 50
    c.num_figure_images = 6

    if option == "shapes":  # a background class: only the tag-based variants make sense
        c.variants = ("tags", "oracle", "ccnn_tags")
        c.default_variant = c.cvxpy_variant = "tags"
        c.alpha_sweep = ()
    if option == "camvid":  # 31 classes: every label >= alpha needs alpha < 1/31
        c.alpha = 0.01
        c.alpha_sweep = (0.002, 0.005, 0.01, 0.02)
        c.eval_batch_size = 8
        c.train.checkpoint_every = 1000
    if option == "tiny":
        c.under_accuracy = 0.05  # reached at the first check: Q_under differs from Q_full
        c.under_check_every = 2
        c.under_check_images = 8
        c.train.checkpoint_every = 4
        c.alpha_sweep = (0.01, 0.05)
        c.cvxpy_images = 1
        c.cvxpy_max_side = 8
        c.eval_batch_size = 8
        c.num_figure_images = 3
    return c
