"""Session-wide test settings: pretraining caches go to a temporary directory."""

import os
import tempfile


def pytest_configure(config):
    # ccnn_jax.pretrain caches pretrained runs under $CCNN_JAX_CACHE (default ~/.cache); tests,
    # and the subprocesses they start, must not read or fill the user's cache.
    os.environ["CCNN_JAX_CACHE"] = tempfile.mkdtemp(prefix="ccnn_jax_test_cache_")
