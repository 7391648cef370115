"""Command-line experiments on top of the ``ccnn_jax`` package (importable by the tests).

Each script is a thin absl CLI: ``--config`` (an ml_collections config file from
``ccnn_jax/configs/``, with ``:<config string>``), ``--workdir`` (where a run keeps its
checkpoints and results) or ``--out`` (the path prefix of a benchmark's json and markdown).
Flags are defined in ``_define_flags()`` when a script runs, so importing one defines none.
"""
