"""Datasets: TFDS builders (registered on import) and the grain input pipeline.

``import ccnn_jax.data`` registers ``ccnn_synthetic`` and the real-dataset builders.
"""

from ccnn_jax.data import common  # noqa: F401
