"""Datasets: TFDS builders (registered on import) and the grain input pipeline.

``import ccnn_jax.data`` registers ``ccnn_synthetic`` and the real-dataset builders.
"""

from ccnn_jax.data import common, synthetic  # noqa: F401

# isort: split
from ccnn_jax.data import camvid, pet, voc  # noqa: F401  (real-dataset builders)
