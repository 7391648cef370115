"""One-step latent demonstration: statistics on hand-made arrays, and the CLI end to end (tiny)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnn_jax import constraints, one_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


def _log(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


def test_kl_of_identical_distributions_is_zero():
    rng = np.random.default_rng(0)
    log_q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 5, K)), jnp.float32))
    weight = jnp.ones((2, 3, 5))
    kl, count = one_step.kl_per_image(log_q, log_q, weight)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    np.testing.assert_array_equal(count, [15, 15])


def test_kl_per_image_matches_hand_computation_and_excludes_void():
    # one image, 1x2 pixels: pixel 0 labelled, pixel 1 void
    a = np.array([[[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]])
    b = np.array([[[[0.25, 0.75, 0.0, 0.0], [0.97, 0.01, 0.01, 0.01]]]])
    mask = np.array([[[2, 255]]])
    weight = one_step.labelled_pixels(mask, K, np.ones(1))
    np.testing.assert_array_equal(weight, [[[1.0, 0.0]]])
    kl, count = one_step.kl_per_image(_log(a), _log(b), weight)
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)  # 0 log 0 = 0
    np.testing.assert_allclose(kl, [expected], rtol=1e-5)
    np.testing.assert_array_equal(count, [1])
    # with the void pixel counted the mean would change: the void pixel's KL is large
    kl_all, _ = one_step.kl_per_image(_log(a), _log(b), jnp.ones((1, 1, 2)))
    assert abs(float(kl_all[0]) - expected) > 0.1


def test_labelled_pixels_drops_padding_examples():
    mask = np.zeros((2, 2, 2), np.int32)
    w = one_step.labelled_pixels(mask, K, np.array([1.0, 0.0]))
    np.testing.assert_array_equal(w.sum(axis=(1, 2)), [4.0, 0.0])


def test_mean_over_images_skips_images_without_pixels():
    assert one_step.mean_over_images([1.0, 3.0, 100.0], [5, 1, 0]) == 2.0
    assert np.isnan(one_step.mean_over_images([1.0], [0]))


def test_smoothed_log_makes_kl_to_a_zero_finite():
    p = jnp.array([[1.0, 0.0, 0.0, 0.0]])
    q = jnp.array([[0.5, 0.5, 0.0, 0.0]])
    eps = 1e-6
    kl = float(
        one_step.kl_per_image(
            _log(q)[None, None], one_step.smoothed_log(p, eps)[None, None], jnp.ones((1, 1, 1))
        )[0][0]
    )
    expected = 0.5 * np.log(0.5 / (1 - eps + eps / K)) + 0.5 * np.log(0.5 / (eps / K))
    np.testing.assert_allclose(kl, expected, rtol=1e-4)
    # and leaves a distribution without zeros (almost) unchanged
    r = jnp.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(one_step.smoothed_log(r, eps), jnp.log(r), atol=1e-5)


def test_reduction_formula():
    assert one_step.reduction(0.25, 1.0) == 0.75
    assert one_step.reduction(2.0, 1.0) == -1.0
    with pytest.raises(ValueError, match="kl_full_under"):
        one_step.reduction(0.1, 0.0)


def test_alphas():
    tags = np.array([[1.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(one_step.tags_alpha(tags, 0.05), [[0.05, 0.0, 0.05, 0.0]])
    mask = np.array([[[0, 0, 2, 255]]])  # 4 pixels: 2 of label 0, 1 of label 2, 1 void
    np.testing.assert_allclose(one_step.oracle_alpha(mask, K, 0.9), [[0.45, 0.0, 0.225, 0.0]])


def test_variant_constraints():
    rng = np.random.default_rng(1)
    b, h, w = 3, 4, 5
    mask = rng.integers(0, K, size=(b, h, w)).astype(np.int32)
    mask[:, 0] = 255
    mask[1] = np.where(mask[1] == 3, 1, mask[1])  # label 3 absent from image 1
    tags = np.stack([np.isin(np.arange(K), m).astype(np.float32) for m in mask])
    batch = {"tags": tags, "mask": mask}
    rows = np.broadcast_to(np.concatenate([np.eye(K), np.zeros((2, K))]), (b, K + 2, K))

    tags_cons = one_step.variant_constraints(
        "tags", batch, num_classes=K, background=0, tags_fraction=0.07
    )
    np.testing.assert_array_equal(tags_cons.a, rows)  # K label rows + 2 inert rows
    np.testing.assert_allclose(tags_cons.b[:, :K], np.where(tags > 0, 0.07, 0.0))
    np.testing.assert_array_equal(tags_cons.b[:, K:], 0.0)
    assert np.all(np.isinf(tags_cons.beta)) and np.all(tags_cons.mask)

    oracle = one_step.variant_constraints(
        "oracle", batch, num_classes=K, background=0, oracle_fraction=0.8
    )
    true = np.stack([(m[..., None] == np.arange(K)).mean(axis=(0, 1)) for m in mask])
    np.testing.assert_array_equal(oracle.a, rows)
    np.testing.assert_allclose(oracle.b[:, :K], 0.8 * true, rtol=1e-6)
    assert oracle.b[1, 3] == 0.0 and np.all(oracle.mask)

    ccnn = one_step.variant_constraints("ccnn_tags", batch, num_classes=K, background=0)
    for i in range(b):
        ref = constraints.from_tags(tags[i], background=0)
        for field in ("a", "b", "beta", "mask"):
            np.testing.assert_array_equal(getattr(ccnn, field)[i], getattr(ref, field))
    assert not ccnn.mask[1, 3]  # absent label suppressed

    with pytest.raises(ValueError, match="variant"):
        one_step.variant_constraints("nope", batch, num_classes=K, background=0)
    with pytest.raises(ValueError, match="tags"):
        one_step.variant_constraints(
            "tags", {"tags": tags[:, :2], "mask": mask}, num_classes=K, background=0
        )


def test_cli_end_to_end_tiny(tmp_path):
    """The CLI on ccnn_synthetic/tiny: outputs exist, the reduction is computed from the KLs."""
    workdir = tmp_path / "wd"
    env = dict(
        os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PLATFORMS="cpu"
    )
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "one_step_latent.py"),
        "--config",
        os.path.join(ROOT, "ccnn_jax", "configs", "one_step.py") + ":tiny",
        f"--config.train.data_dir={tmp_path / 'tfds'}",
        f"--workdir={workdir}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "latent.png"):
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    assert results["reduction"] == 1.0 - results["kl_full_latent"] / results["kl_full_under"]
    assert results["kl_full_latent"] == results["variants"]["tags"]["kl_full_latent"]
    assert set(results["variants"]) == set(one_step.VARIANTS)
    for r in results["variants"].values():
        assert r["reduction"] == 1.0 - r["kl_full_latent"] / results["kl_full_under"]
        assert r["solver"]["converged_fraction"] == 1.0
        assert 0.0 <= r["pixel_accuracy"] <= 1.0
    assert results["num_images"] == 16  # the tiny validation split
    assert results["cvxpy"]["max_abs_diff_p"] < 1e-3
    assert results["kl_full_under"] > 0
    table = (workdir / "results.md").read_text()
    assert "P `oracle`" in table and "CVXPY" in table
