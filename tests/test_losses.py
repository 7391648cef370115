"""CCNN / MIL / supervised losses: the CCNN gradient is (q - p) / N, padding is ignored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnn_jax import constraints, losses

K = 4
TAGS = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]], np.float32)  # 3rd image: padding
VALID = np.array([1.0, 1.0, 0.0], np.float32)


def _logits(b=3, h=6, w=5, seed=0):
    return 2.0 * jax.random.normal(jax.random.key(seed), (b, h, w, K))


def test_ccnn_gradient_is_q_minus_p_over_n_single_image():
    logits = _logits(b=1)
    tags = jnp.asarray(TAGS[:1])
    (loss, aux), g = jax.value_and_grad(
        lambda z: losses.ccnn_loss(z, tags, jnp.ones(1)), has_aux=True
    )(logits)
    n = 6 * 5
    q = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(g, (q - aux["p"]) / n, rtol=1e-5, atol=1e-7)
    # loss is the mean pixel cross-entropy from P to Q
    expected = -np.sum(np.asarray(aux["p"]) * np.log(np.asarray(q))) / n
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # P is a distribution, zero on labels absent from the tags, and meets the constraints
    p = np.asarray(aux["p"])
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.all(p[..., 2:] == 0.0)
    assert aux["solver_converged"] == 1.0
    assert 0.3 - 1e-3 <= p[..., 0].mean() <= 0.7 + 1e-3


def test_ccnn_batch_weights_valid_examples_only():
    logits = _logits()
    grad_fn = jax.value_and_grad(lambda z, t, v: losses.ccnn_loss(z, t, v), has_aux=True)
    (loss, aux), g = grad_fn(logits, jnp.asarray(TAGS), jnp.asarray(VALID))
    q = jax.nn.softmax(logits, axis=-1)
    n, n_valid = 30, 2
    np.testing.assert_allclose(g[:2], (q[:2] - aux["p"][:2]) / (n * n_valid), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g[2], 0.0)
    assert np.isfinite(float(loss))
    # changing the padded example changes nothing
    logits2 = logits.at[2].set(100.0 * jax.random.normal(jax.random.key(5), (6, 5, K)))
    (loss2, _), g2 = grad_fn(logits2, jnp.asarray(TAGS), jnp.asarray(VALID))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(g2[:2], g[:2], rtol=1e-6)
    # solver statistics are reported
    for key in ("solver_iterations", "solver_converged", "solver_gap", "solver_violation"):
        assert np.isfinite(float(aux[key])), key


def test_ccnn_size_hints_make_large_class_cover_ten_percent():
    logits = _logits(b=1, seed=3).at[..., 1].add(-6.0)  # Q nearly ignores label 1
    tags = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # label 2 can take background's remaining 30%
    size = jnp.array([[0.0, 1.0, 0.0, 0.0]])
    _, aux = losses.ccnn_loss(logits, tags, jnp.ones(1), size_BxK=size)
    p = np.asarray(aux["p"])
    assert p[..., 1].mean() >= 0.1 - 1e-3
    _, aux_tags = losses.ccnn_loss(logits, tags, jnp.ones(1))
    assert np.asarray(aux_tags["p"])[..., 1].mean() < 0.1  # tags alone ask for only 5%
    assert constraints.SIZE_HARDNESS == 1000.0


def test_ccnn_without_background_class():
    logits = _logits(b=1)
    _, aux = losses.ccnn_loss(
        logits, jnp.array([[0.0, 1.0, 1.0, 0.0]]), jnp.ones(1), background=None
    )
    p = np.asarray(aux["p"])
    assert np.all(p[..., [0, 3]] == 0)
    assert p[..., 1].mean() >= 0.05 - 1e-3 and p[..., 2].mean() >= 0.05 - 1e-3


def test_mil_loss_by_hand():
    logits = _logits()
    loss, _ = losses.mil_loss(logits, jnp.asarray(TAGS), jnp.asarray(VALID))
    s = np.asarray(logits).max(axis=(1, 2))
    bce = np.logaddexp(0, s) - TAGS * s  # -t log sigmoid(s) - (1 - t) log(1 - sigmoid(s))
    expected = bce[:2].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_supervised_loss_ignores_void_and_padding():
    logits = _logits()
    mask = np.array(jax.random.randint(jax.random.key(2), (3, 6, 5), 0, K))
    mask[0, :2] = 255
    loss, _ = losses.supervised_loss(logits, jnp.asarray(mask), jnp.asarray(VALID))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    picked = [
        -logp[b, i, j, mask[b, i, j]]
        for b in range(2)
        for i in range(6)
        for j in range(5)
        if mask[b, i, j] != 255
    ]
    assert float(loss) == pytest.approx(np.mean(picked), rel=1e-5)
    all_void = jnp.full((3, 6, 5), 255)
    assert float(losses.supervised_loss(logits, all_void, jnp.asarray(VALID))[0]) == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="tags_BxK"):
        losses.ccnn_loss(_logits(), jnp.ones((3, K + 1)), jnp.ones(3))
    with pytest.raises(ValueError, match="mask_BxHxW"):
        losses.supervised_loss(_logits(), jnp.zeros((3, 3, 5), jnp.int32), jnp.ones(3))
    with pytest.raises(ValueError, match="tags_BxK"):
        losses.mil_loss(_logits(), jnp.ones((2, K)), jnp.ones(3))


def test_ccnn_constraint_bounds_reach_the_solver():
    logits = jnp.zeros((1, 6, 5, K)).at[..., 0].set(6.0)  # Q says background almost everywhere
    tags = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    _, aux = losses.ccnn_loss(logits, tags, jnp.ones(1))
    assert np.asarray(aux["p"])[..., 0].mean() == pytest.approx(0.7, abs=1e-3)  # VOC default
    _, aux = losses.ccnn_loss(
        logits, tags, jnp.ones(1), constraint_kwargs={"bg_upper": 0.9, "fg_lower": 0.02}
    )
    assert np.asarray(aux["p"])[..., 0].mean() == pytest.approx(0.9, abs=1e-3)


def test_classification_loss_is_softmax_ce_over_object_classes():
    scores = jax.random.normal(jax.random.key(3), (3, K))
    tags = np.array([[1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], np.float32)  # bg + one object
    valid = np.array([1.0, 1.0, 0.0], np.float32)  # third image is padding
    loss, _ = losses.classification_loss(scores, tags, valid, background=0)
    log_p = jax.nn.log_softmax(scores[:, 1:], axis=-1)  # background is not a class
    expected = -(log_p[0, 1] + log_p[1, 2]) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    grad = jax.grad(lambda s: losses.classification_loss(s, tags, valid, background=0)[0])(scores)
    np.testing.assert_array_equal(np.asarray(grad[:, 0]), 0.0)  # no gradient to background
    np.testing.assert_array_equal(np.asarray(grad[2]), 0.0)  # nor from padding
    # two tagged objects share the target; without a background class every label is one
    both = np.array([[1, 1, 1, 0]], np.float32)
    loss2, _ = losses.classification_loss(scores[:1], both, np.ones(1), background=0)
    np.testing.assert_allclose(loss2, -(log_p[0, 0] + log_p[0, 1]) / 2, rtol=1e-6)
    loss3, _ = losses.classification_loss(scores[:1], tags[:1], np.ones(1), background=None)
    np.testing.assert_allclose(
        loss3, -jnp.mean(jax.nn.log_softmax(scores[0])[jnp.array([0, 2])]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="scores_BxK"):
        losses.classification_loss(scores[:, :2], tags, valid, background=0)


def test_padding_pixels_take_no_part_in_constraints_or_losses():
    """Augmentation padding (pixels = 0): the CCNN rows hold over image pixels only, the loss
    has no gradient there, and MIL's max skips it."""
    logits = _logits(b=2, h=4, w=4)
    tags = np.array([[1, 1, 0, 0], [1, 0, 1, 1]], np.float32)
    pixels = np.ones((2, 8, 8), np.float32)
    pixels[:, :, 4:] = 0.0  # the right half of each image is padding (2 logit columns)

    def ccnn(lg):
        return losses.ccnn_loss(lg, tags, np.ones(2), background=0, pixels_BxHxW=pixels)

    (_, aux), grad = jax.value_and_grad(ccnn, has_aux=True)(logits)
    np.testing.assert_array_equal(np.asarray(grad[:, :, 2:]), 0.0)
    p_image = np.asarray(aux["p"])[:, :, :2]  # the image's pixels (left half)
    bounds = constraints.VOC_BOUNDS
    bg_share = p_image[..., 0].mean(axis=(1, 2))
    assert np.all(bg_share >= bounds.bg_lower - 1e-3) and np.all(bg_share <= bounds.bg_upper + 1e-3)
    # padding outranking everything would win MIL's max without the pixel map
    padded = logits.at[:, :, 2:, :].set(50.0)
    with_map, _ = losses.mil_loss(padded, tags, np.ones(2), pixels_BxHxW=pixels)
    reference, _ = losses.mil_loss(logits[:, :, :2], tags, np.ones(2))
    np.testing.assert_allclose(with_map, reference, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        losses.mil_loss(logits, tags, np.ones(2), pixels_BxHxW=np.ones((2, 6, 6)))
